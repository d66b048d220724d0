"""linen modules of the Gemma-protocol fixture (the protocol of Google DeepMind's
``gemma`` library, written here): embedder, attention, MLP, block.

``Block.setup`` builds its attention through the module-global name ``Attention``, so
replacing ``linen_modules.Attention`` swaps it; linen runs ``setup`` inside every
``init``/``apply``, so a swap must be active while those run (or are first traced).
Activations and parameters are float32; there is no dropout and no sharding config (the
nnx fixture covers those).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from gemma_style import layers
from gemma_style.transformer_cfg import (
    DEFAULT_ROPE_BASE_FREQUENCY,
    DEFAULT_ROPE_SCALE_FACTOR,
    AttentionType,
)

__all__ = ["Attention", "AttentionType", "Block", "Embedder", "FeedForward", "RMSNorm"]

LayerCache = dict[str, jax.Array]


class RMSNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
        return layers.rms_norm(x, scale, x.dtype)


class Einsum(nn.Module):
    """``jnp.einsum(eqn, x, w)`` with one parameter ``w`` of ``shape``."""

    shape: tuple[int, ...]
    weight_name: str = "w"

    @nn.compact
    def __call__(self, eqn: str, x):
        w = self.param(self.weight_name, nn.initializers.normal(self.shape[-2] ** -0.5), self.shape)
        return jnp.einsum(eqn, x, w)


class Embedder(nn.Module):
    vocab_size: int
    embed_dim: int

    def setup(self):
        self.input_embedding_table = self.param(
            "input_embedding", nn.initializers.normal(), (self.vocab_size, self.embed_dim)
        )

    def encode(self, tokens):
        return self.input_embedding_table[tokens] * jnp.sqrt(float(self.embed_dim))

    def decode(self, x):
        return x @ self.input_embedding_table.T


class Attention(nn.Module):
    """Attention called as ``attn(x [B, L, D], segment_pos [B, L], cache | None,
    attn_mask [B, L, L']) -> (new_cache | None, out [B, L, D])``."""

    num_heads: int
    num_kv_heads: int
    features: int
    head_dim: int
    attn_type: AttentionType
    query_pre_attn_scalar: float
    rope_base_frequency: int = DEFAULT_ROPE_BASE_FREQUENCY
    rope_scale_factor: float = DEFAULT_ROPE_SCALE_FACTOR
    attn_logits_soft_cap: float | None = None
    sliding_window_size: int | None = None
    use_qk_norm: bool = False

    @property
    def use_qkv_einsum(self) -> bool:
        return self.num_kv_heads == self.num_heads

    def setup(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads.")
        if self.attn_type == AttentionType.LOCAL_SLIDING and self.sliding_window_size is None:
            raise ValueError("sliding_window_size must be set for LOCAL_SLIDING attention.")
        n, k, d, h = self.num_heads, self.num_kv_heads, self.features, self.head_dim
        if self.use_qkv_einsum:
            self.qkv_einsum = Einsum((3, n, d, h))
        else:
            self.q_einsum = Einsum((n, d, h))
            self.kv_einsum = Einsum((2, k, d, h))
        self.attn_vec_einsum = Einsum((n, h, d))
        if self.use_qk_norm:
            self._query_norm = RMSNorm()
            self._key_norm = RMSNorm()

    def __call__(self, x, segment_pos, cache: LayerCache | None, attn_mask):
        if self.use_qkv_einsum:
            q, k, v = self.qkv_einsum("BTD,SNDH->SBTNH", x)
        else:
            q = self.q_einsum("BTD,NDH->BTNH", x)
            k, v = self.kv_einsum("BTD,CKDH->CBTKH", x)
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
        )
        return new_cache, self.attn_vec_einsum("BTNH,NHD->BTD", encoded)

    def init_cache(self, cache_size: int, batch_size: int, dtype: Any = jnp.float32) -> LayerCache:
        shape = (batch_size, cache_size, self.num_kv_heads, self.head_dim)
        return {
            "k": jnp.zeros(shape, dtype),
            "v": jnp.zeros(shape, dtype),
            "end_index": jnp.zeros((batch_size,), jnp.int32),
        }


class FeedForward(nn.Module):
    """``linear(gelu(x @ gate) * (x @ up))`` with gate and up stacked in ``gating_einsum``."""

    features: int
    hidden_dim: int

    @nn.compact
    def __call__(self, x):
        d, f = self.features, self.hidden_dim
        gating = self.param("gating_einsum", nn.initializers.normal(d**-0.5), (2, d, f))
        linear = self.param("linear", nn.initializers.normal(f**-0.5), (f, d))
        gated = jnp.einsum("...D,CDF->...CF", x, gating)
        return jnp.einsum("...F,FD->...D", nn.gelu(gated[..., 0, :]) * gated[..., 1, :], linear)


class Block(nn.Module):
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    head_dim: int
    hidden_dim: int
    use_post_attn_norm: bool
    use_post_ffw_norm: bool
    attn_type: AttentionType
    query_pre_attn_scalar: float
    rope_base_frequency: int = DEFAULT_ROPE_BASE_FREQUENCY
    rope_scale_factor: float = DEFAULT_ROPE_SCALE_FACTOR
    attn_logits_soft_cap: float | None = None
    sliding_window_size: int | None = None
    use_qk_norm: bool = False

    def setup(self):
        self.pre_attention_norm = RMSNorm()
        # The module-global lookup a swap replaces (at every init / apply).
        self.attn = Attention(
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            features=self.embed_dim,
            head_dim=self.head_dim,
            attn_type=self.attn_type,
            query_pre_attn_scalar=self.query_pre_attn_scalar,
            rope_base_frequency=self.rope_base_frequency,
            rope_scale_factor=self.rope_scale_factor,
            attn_logits_soft_cap=self.attn_logits_soft_cap,
            sliding_window_size=self.sliding_window_size,
            use_qk_norm=self.use_qk_norm,
        )
        self.post_attention_norm = RMSNorm() if self.use_post_attn_norm else None
        self.pre_ffw_norm = RMSNorm()
        self.mlp = FeedForward(features=self.embed_dim, hidden_dim=self.hidden_dim)
        self.post_ffw_norm = RMSNorm() if self.use_post_ffw_norm else None

    def __call__(self, x, segment_pos, cache: LayerCache | None, attn_mask):
        cache, y = self.attn(self.pre_attention_norm(x), segment_pos, cache, attn_mask)
        if self.post_attention_norm is not None:
            y = self.post_attention_norm(y)
        x = x + y
        y = self.mlp(self.pre_ffw_norm(x))
        if self.post_ffw_norm is not None:
            y = self.post_ffw_norm(y)
        return cache, x + y

    def init_cache(self, cache_size: int, batch_size: int, dtype: Any = jnp.float32) -> LayerCache:
        return self.attn.init_cache(cache_size, batch_size, dtype)
