"""The nnx decoder of the Gemma-protocol fixture, its causal mask and position builders."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gemma_style import layers, modules
from gemma_style.transformer_cfg import AttentionType, ShardingConfig, TransformerConfig

__all__ = [
    "AttentionType",
    "Cache",
    "ShardingConfig",
    "Transformer",
    "TransformerConfig",
    "build_positions_from_mask",
    "make_causal_attn_mask",
]

#: ``{"layer_0": LayerCache, ...}``
Cache = dict[str, modules.LayerCache]


class Transformer(nnx.Module):
    """Embedder, ``num_layers`` blocks, final norm, tied logits with an optional soft cap.

    Called as ``model(last_tokens [B, L], positions [B, L], cache | None,
    attention_mask [B, L, L'], rngs=None) -> (logits [B, L, V], new_cache | None)``.
    """

    def __init__(
        self,
        config: TransformerConfig,
        *,
        rngs: nnx.Rngs,
        sow_config: modules.SowConfig = modules.SowConfig(),  # noqa: B008 (frozen)
    ):
        shd = config.shd_config
        self.embedder = modules.Embedder(
            config.num_embed,
            config.embed_dim,
            dtype=config.dtype,
            param_dtype=config.weight_dtype,
            embedding_metadata={"out_sharding": shd.emb_vd},
            rngs=rngs,
        )
        self.layers = nnx.List(
            [
                modules.Block(config, config.attention_type(i), rngs=rngs, sow_config=sow_config)
                for i in range(config.num_layers)
            ]
        )
        self.final_norm = layers.RMSNorm(
            config.embed_dim,
            scale_metadata={"out_sharding": shd.rms_norm_weight},
            rngs=rngs,
            dtype=config.dtype,
            weight_dtype=config.weight_dtype,
        )
        self.final_dropout = nnx.Dropout(config.dropout_rate)
        self.config = config
        self.shd_config = shd
        self.sow_config = sow_config

    @property
    def num_embed(self) -> int:
        return self.config.num_embed

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def __call__(
        self,
        last_tokens: jax.Array,
        positions: jax.Array,
        cache: Cache | None,
        attention_mask: jax.Array,
        rngs: nnx.Rngs | None = None,
    ) -> tuple[jax.Array, Cache | None]:
        x = self.embedder(last_tokens, out_sharding=self.shd_config.act_btd)
        new_cache = None if cache is None else {}
        for i, layer in enumerate(self.layers):
            name = f"layer_{i}"
            layer_cache, x = layer(
                x, positions, None if cache is None else cache[name], attention_mask, rngs=rngs
            )
            if cache is not None:
                new_cache[name] = layer_cache
        x = self.final_dropout(self.final_norm(x), rngs=rngs)
        logits = self.embedder.attend(x, out_sharding=self.shd_config.act_btd)
        cap = self.config.final_logit_softcap
        if cap is not None:
            logits = cap * jnp.tanh(logits / cap)
        return logits, new_cache

    def init_cache(self, cache_size: int, batch_size: int, dtype: Any = jnp.float32) -> Cache:
        """Each layer's empty cache, under ``layer_<i>``."""
        return {
            f"layer_{i}": layer.init_cache(cache_size, batch_size, dtype)
            for i, layer in enumerate(self.layers)
        }


def make_causal_attn_mask(input_mask: jax.Array) -> jax.Array:
    """``[B, L] -> [B, L, L]``: step ``i`` sees the valid (True) steps ``j <= i``."""
    length = input_mask.shape[-1]
    causal = jnp.arange(length)[:, None] >= jnp.arange(length)[None, :]
    return input_mask.astype(bool)[..., None, :] & causal


def build_positions_from_mask(input_mask: jax.Array) -> jax.Array:
    """``[B, L] -> [B, L]``: each valid step's index among the valid steps (padding
    before the first valid step gets 0, later padding the previous step's index)."""
    count = jnp.cumsum(input_mask.astype(jnp.int32), axis=-1)
    return jnp.maximum(count - 1, 0)
