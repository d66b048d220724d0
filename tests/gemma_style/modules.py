"""nnx modules of the Gemma-protocol test decoder: embedder, attention, MLP, block.

``Block.__init__`` builds its attention through the module-global name ``Attention`` (as
flax's ``examples/gemma/modules.py`` does), so replacing ``modules.Attention`` swaps it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from gemma_style import layers
from gemma_style.transformer_cfg import (
    DEFAULT_ROPE_BASE_FREQUENCY,
    DEFAULT_ROPE_SCALE_FACTOR,
    AttentionType,
    ShardingConfig,
    TransformerConfig,
)

__all__ = [
    "Attention",
    "AttentionType",
    "Block",
    "Embedder",
    "FeedForward",
    "LayerCache",
    "ShardingConfig",
    "SowConfig",
    "TransformerConfig",
]

#: ``{"k": [B, S, K, H], "v": [B, S, K, H], "end_index": [B] int32}``
LayerCache = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class SowConfig:
    """Which residual-stream activations a block records as ``nnx.Intermediate``."""

    rs_after_attention: bool = False
    rs_after_ffw: bool = False

    def maybe_sow(self, name: str, value: jax.Array, module: nnx.Module) -> None:
        if getattr(self, name):
            module.sow(nnx.Intermediate, name, value)


def _unshard_axis(spec: P | None, axis: int) -> P | None:
    """``spec`` with ``axis`` unsharded (a single key-value head cannot be split)."""
    if spec is None:
        return None
    entries = list(spec)
    entries[axis] = None
    return P(*entries)


def _drop_axis(spec: P | None, axis: int) -> P | None:
    return None if spec is None else P(*(e for i, e in enumerate(spec) if i != axis))


class Embedder(nnx.Embed):
    """Token embedding scaled by ``sqrt(embed_dim)``; ``attend`` gives the logits."""

    def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
        y = super().__call__(x, out_sharding=out_sharding)
        return y * jnp.sqrt(jnp.asarray(self.features, y.dtype))


class Attention(nnx.Module):
    """Multi-head, grouped-query or multi-query attention with RoPE and a KV cache.

    Called as ``attn(x [B, L, D], segment_pos [B, L], cache | None, attn_mask [B, L, L'],
    rngs=None) -> (new_cache | None, out [B, L, D])``; ``L'`` is ``L`` without a cache and
    the cache size with one.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        features: int,
        head_dim: int,
        query_pre_attn_scalar: float,
        attn_type: AttentionType,
        *,
        rngs: nnx.Rngs,
        rope_base_frequency: int = DEFAULT_ROPE_BASE_FREQUENCY,
        rope_scale_factor: float = DEFAULT_ROPE_SCALE_FACTOR,
        attn_logits_soft_cap: float | None = None,
        sliding_window_size: int | None = None,
        use_qk_norm: bool = False,
        sow_config: SowConfig = SowConfig(),
        shd_config: ShardingConfig,
        dtype: Any = jnp.float32,
        weight_dtype: Any = jnp.float32,
        dropout_rate: float = 0.0,
    ):
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads.")
        if attn_type == AttentionType.LOCAL_SLIDING and sliding_window_size is None:
            raise ValueError("sliding_window_size must be set for LOCAL_SLIDING attention.")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.query_pre_attn_scalar = query_pre_attn_scalar
        self.attn_type = attn_type
        self.rope_base_frequency = rope_base_frequency
        self.rope_scale_factor = rope_scale_factor
        self.attn_logits_soft_cap = attn_logits_soft_cap
        self.sliding_window_size = sliding_window_size
        self.use_qk_norm = use_qk_norm
        self.sow_config = sow_config
        self.shd_config = shd_config
        einsum = dict(dtype=dtype, param_dtype=weight_dtype, rngs=rngs)
        if self.use_qkv_einsum:
            self.qkv_einsum = nnx.Einsum(
                "BTD,SNDH->SBTNH",
                (3, num_heads, features, head_dim),
                kernel_metadata={"out_sharding": shd_config.qkv_weight_cndh},
                **einsum,
            )
            self.kv_act_sharding = shd_config.act_sbtnh
        else:
            self.q_einsum = nnx.Einsum(
                "BTD,NDH->BTNH",
                (num_heads, features, head_dim),
                kernel_metadata={"out_sharding": shd_config.q_weight_ndh},
                **einsum,
            )
            kv_kernel, kv_act = shd_config.kv_weight_cndh, shd_config.act_sbtnh
            if num_kv_heads == 1:
                kv_kernel, kv_act = _unshard_axis(kv_kernel, 1), _unshard_axis(kv_act, 3)
            self.kv_einsum = nnx.Einsum(
                "BTD,CKDH->CBTKH",
                (2, num_kv_heads, features, head_dim),
                kernel_metadata={"out_sharding": kv_kernel},
                **einsum,
            )
            self.kv_act_sharding = kv_act
        self.attn_vec_einsum = nnx.Einsum(
            "BTNH,NHD->BTD",
            (num_heads, head_dim, features),
            kernel_metadata={"out_sharding": shd_config.o_weight_nhd},
            **einsum,
        )
        if use_qk_norm:
            norm = dict(rngs=rngs, dtype=dtype, weight_dtype=weight_dtype)
            self._query_norm = layers.RMSNorm(head_dim, **norm)
            self._key_norm = layers.RMSNorm(head_dim, **norm)
        self.dropout = nnx.Dropout(dropout_rate)

    @property
    def use_qkv_einsum(self) -> bool:
        return self.num_kv_heads == self.num_heads

    def __call__(
        self,
        x: jax.Array,
        segment_pos: jax.Array,
        cache: LayerCache | None,
        attn_mask: jax.Array,
        rngs: nnx.Rngs | None = None,
    ) -> tuple[LayerCache | None, jax.Array]:
        shd = self.shd_config
        if self.use_qkv_einsum:
            q, k, v = self.qkv_einsum(x, out_sharding=shd.act_sbtnh)
        else:
            q = self.q_einsum(x, out_sharding=shd.act_btnh)
            k, v = self.kv_einsum(x, out_sharding=self.kv_act_sharding)
        if self.use_qk_norm:
            q, k = self._query_norm(q), self._key_norm(k)
        rope = dict(base_frequency=self.rope_base_frequency, scale_factor=self.rope_scale_factor)
        q = layers.apply_rope(q, segment_pos, **rope) * self.query_pre_attn_scalar
        k = layers.apply_rope(k, segment_pos, **rope)
        if cache is None:
            new_cache, query_index = None, jnp.arange(x.shape[1])
        else:
            k, v, new_cache, query_index = layers.write_cache(cache, k, v)
        local = self.attn_type == AttentionType.LOCAL_SLIDING
        encoded = layers.attend(
            q,
            k,
            v,
            attn_mask,
            query_index=query_index,
            soft_cap=self.attn_logits_soft_cap,
            sliding_window=self.sliding_window_size if local else None,
            dropout=lambda p: self.dropout(p, rngs=rngs),
        )
        return new_cache, self.attn_vec_einsum(encoded, out_sharding=shd.act_btd)

    def init_cache(self, cache_size: int, batch_size: int, dtype: Any = jnp.float32) -> LayerCache:
        """An empty cache: keys and values ``[batch_size, cache_size, K, H]`` (sharded like
        the key/value activations) and ``end_index [batch_size]`` (int32 zeros)."""
        shape = (batch_size, cache_size, self.num_kv_heads, self.head_dim)
        sharding = _drop_axis(self.kv_act_sharding, 0)
        return {
            "k": jnp.zeros(shape, dtype, out_sharding=sharding),
            "v": jnp.zeros(shape, dtype, out_sharding=sharding),
            "end_index": jnp.zeros((batch_size,), jnp.int32),
        }


class FeedForward(nnx.Module):
    """Gated MLP: ``down(gelu(gate(x)) * up(x))`` with dropout on the hidden units."""

    def __init__(
        self,
        features: int,
        hidden_dim: int,
        *,
        rngs: nnx.Rngs,
        shd_config: ShardingConfig,
        dtype: Any = jnp.float32,
        weight_dtype: Any = jnp.float32,
        dropout_rate: float = 0.0,
    ):
        def linear(n_in, n_out, spec):
            return nnx.Linear(
                n_in,
                n_out,
                use_bias=False,
                dtype=dtype,
                param_dtype=weight_dtype,
                kernel_metadata={"out_sharding": spec},
                rngs=rngs,
            )

        self.gate_proj = linear(features, hidden_dim, shd_config.ffw_weight_df)
        self.up_proj = linear(features, hidden_dim, shd_config.ffw_weight_df)
        self.down_proj = linear(hidden_dim, features, shd_config.ffw_weight_fd)
        self.dropout = nnx.Dropout(dropout_rate)
        self.shd_config = shd_config

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        act = self.shd_config.act_btf
        hidden = nnx.gelu(self.gate_proj(x, out_sharding=act)) * self.up_proj(x, out_sharding=act)
        hidden = self.dropout(hidden, rngs=rngs)
        return self.down_proj(hidden, out_sharding=self.shd_config.act_btd)


class Block(nnx.Module):
    """Pre-norm residual block: attention, then the gated MLP (optional post norms)."""

    def __init__(
        self,
        config: TransformerConfig,
        attn_type: AttentionType,
        *,
        rngs: nnx.Rngs,
        sow_config: SowConfig = SowConfig(),
    ):
        shd = config.shd_config
        local = attn_type == AttentionType.LOCAL_SLIDING

        def norm():
            return layers.RMSNorm(
                config.embed_dim,
                scale_metadata={"out_sharding": shd.rms_norm_weight},
                rngs=rngs,
                dtype=config.dtype,
                weight_dtype=config.weight_dtype,
            )

        self.pre_attention_norm = norm()
        # The module-global lookup a swap replaces.
        self.attn = Attention(
            num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads,
            features=config.embed_dim,
            head_dim=config.head_dim,
            query_pre_attn_scalar=config.query_pre_attn_scalar(),
            attn_type=attn_type,
            rngs=rngs,
            rope_base_frequency=(
                config.local_base_frequency if local else config.global_base_frequency
            ),
            rope_scale_factor=config.local_scale_factor if local else config.global_scale_factor,
            attn_logits_soft_cap=config.attn_logits_soft_cap,
            sliding_window_size=config.sliding_window_size,
            use_qk_norm=config.use_qk_norm,
            sow_config=sow_config,
            shd_config=shd,
            dtype=config.dtype,
            weight_dtype=config.weight_dtype,
            dropout_rate=config.dropout_rate,
        )
        self.post_attention_norm = norm() if config.use_post_attn_norm else None
        self.pre_ffw_norm = norm()
        self.mlp = FeedForward(
            config.embed_dim,
            config.hidden_dim,
            rngs=rngs,
            shd_config=shd,
            dtype=config.dtype,
            weight_dtype=config.weight_dtype,
            dropout_rate=config.dropout_rate,
        )
        self.post_ffw_norm = norm() if config.use_post_ffw_norm else None
        self.dropout = nnx.Dropout(config.dropout_rate)
        self.sow_config = sow_config

    def __call__(
        self,
        x: jax.Array,
        segment_pos: jax.Array,
        cache: LayerCache | None,
        attn_mask: jax.Array,
        rngs: nnx.Rngs | None = None,
    ) -> tuple[LayerCache | None, jax.Array]:
        cache, y = self.attn(self.pre_attention_norm(x), segment_pos, cache, attn_mask, rngs=rngs)
        if self.post_attention_norm is not None:
            y = self.post_attention_norm(y)
        x = x + y
        self.sow_config.maybe_sow("rs_after_attention", x, self)
        y = self.mlp(self.pre_ffw_norm(x), rngs=rngs)
        if self.post_ffw_norm is not None:
            y = self.post_ffw_norm(y)
        x = self.dropout(x + y, rngs=rngs)
        self.sow_config.maybe_sow("rs_after_ffw", x, self)
        return cache, x

    def init_cache(self, cache_size: int, batch_size: int, dtype: Any = jnp.float32) -> LayerCache:
        return self.attn.init_cache(cache_size, batch_size, dtype)
