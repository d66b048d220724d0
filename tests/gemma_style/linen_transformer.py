"""The linen decoder of the Gemma-protocol fixture (same call protocol as the nnx one)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from gemma_style import linen_modules
from gemma_style.transformer import build_positions_from_mask, make_causal_attn_mask
from gemma_style.transformer_cfg import AttentionType, TransformerConfig

__all__ = [
    "AttentionType",
    "Transformer",
    "TransformerConfig",
    "build_positions_from_mask",
    "make_causal_attn_mask",
]


class Transformer(nn.Module):
    """``model.apply(variables, last_tokens [B, L], positions [B, L], cache | None,
    attention_mask [B, L, L']) -> (logits [B, L, V], new_cache | None)``; the cache comes
    from ``model.apply(variables, cache_size, batch_size, dtype, method=Transformer.init_cache)``.
    Reads the model fields of :class:`TransformerConfig` (not ``dtype``, ``dropout_rate``
    or ``shd_config``)."""

    config: TransformerConfig

    def setup(self):
        c = self.config
        self.embedder = linen_modules.Embedder(vocab_size=c.num_embed, embed_dim=c.embed_dim)
        blocks = []
        for i in range(c.num_layers):
            attn_type = c.attention_type(i)
            local = attn_type == AttentionType.LOCAL_SLIDING
            blocks.append(
                linen_modules.Block(
                    name=f"layer_{i}",
                    num_heads=c.num_heads,
                    num_kv_heads=c.num_kv_heads,
                    embed_dim=c.embed_dim,
                    head_dim=c.head_dim,
                    hidden_dim=c.hidden_dim,
                    use_post_attn_norm=c.use_post_attn_norm,
                    use_post_ffw_norm=c.use_post_ffw_norm,
                    attn_type=attn_type,
                    query_pre_attn_scalar=c.query_pre_attn_scalar(),
                    rope_base_frequency=(
                        c.local_base_frequency if local else c.global_base_frequency
                    ),
                    rope_scale_factor=c.local_scale_factor if local else c.global_scale_factor,
                    attn_logits_soft_cap=c.attn_logits_soft_cap,
                    sliding_window_size=c.sliding_window_size,
                    use_qk_norm=c.use_qk_norm,
                )
            )
        self.blocks = blocks
        self.final_norm = linen_modules.RMSNorm()

    def __call__(self, last_tokens, positions, cache, attention_mask):
        x = self.embedder.encode(last_tokens)
        new_cache = None if cache is None else {}
        for i, block in enumerate(self.blocks):
            name = f"layer_{i}"
            layer_cache, x = block(
                x, positions, None if cache is None else cache[name], attention_mask
            )
            if cache is not None:
                new_cache[name] = layer_cache
        logits = self.embedder.decode(self.final_norm(x))
        cap = self.config.final_logit_softcap
        if cap is not None:
            logits = cap * jnp.tanh(logits / cap)
        return logits, new_cache

    def init_cache(self, cache_size: int, batch_size: int, dtype: Any = jnp.float32):
        return {
            f"layer_{i}": block.init_cache(cache_size, batch_size, dtype)
            for i, block in enumerate(self.blocks)
        }
