"""A small decoder-only linen language model, written here for the linen mixer tests.

Token embedding, sinusoidal positions, ``num_layers`` pre-norm blocks (self-attention, then
an MLP), a final norm and a logits layer. Each block calls flax's attention the stock way:
``nn.SelfAttention(num_heads=..., decode=...)(x, mask)``, looked up when the block's
``@nn.compact`` call runs, so ``swap_attention`` reaches it without editing this file.
``LMConfig.mixer`` names a registered mixer instead (``get_mixer(mixer)(...)`` with the same
arguments, called ``(x, mask=mask)``): the "one config value" way.

Training mode shifts the targets right (a 0 "start" token; packed rows restart at each
segment) and builds a causal + padding (+ segment) mask, padding being token 0. Decode mode
(flax's ``"cache"`` collection) takes already-shifted inputs, any number per call; the
position offset is kept in the cache under ``positions/next``. As is flax's convention,
``init`` of the decode model on a full-length input creates the parameters and the empty
cache.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

from flax_linoss import get_mixer


@dataclasses.dataclass(frozen=True)
class LMConfig:
    vocab_size: int
    width: int = 32
    num_heads: int = 2
    num_layers: int = 1
    qkv_features: int = 32
    mlp_dim: int = 64
    max_len: int = 64
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    deterministic: bool = True
    decode: bool = False
    #: ``None``: the stock ``nn.SelfAttention`` line; else a registered mixer name.
    mixer: str | None = None

    def replace(self, **changes) -> LMConfig:
        return dataclasses.replace(self, **changes)


def shift_right(tokens, segment_ids=None):
    """``[B, L]`` tokens moved one step later, 0 in front (and at each segment start)."""
    shifted = jnp.pad(tokens, ((0, 0), (1, 0)))[:, :-1]
    if segment_ids is not None:
        same = segment_ids == jnp.pad(segment_ids, ((0, 0), (1, 0)))[:, :-1]
        shifted = jnp.where(same, shifted, 0)
    return shifted


def _sinusoids(length: int, width: int) -> np.ndarray:
    """``[length, width]``: sines then cosines of ``position / 10000 ** (i / half)``."""
    half = width // 2
    angle = np.arange(length)[:, None] / 10_000 ** (np.arange(half)[None] / half)
    table = np.zeros((length, width), np.float32)
    table[:, :half], table[:, half : 2 * half] = np.sin(angle), np.cos(angle)
    return table


class Positions(nn.Module):
    """Adds the sinusoid of each step's position: ``positions`` if given (packing), else
    ``0 .. L-1``, offset in decode mode by the steps decoded so far."""

    config: LMConfig

    @nn.compact
    def __call__(self, x, positions=None):
        table = jnp.asarray(_sinusoids(self.config.max_len, x.shape[-1]))
        length = x.shape[1]
        if positions is not None:
            return x + table[positions]
        start = 0
        if self.config.decode:
            ready = self.has_variable("cache", "next")
            next_step = self.variable("cache", "next", lambda: jnp.zeros((), jnp.int32))
            if ready:  # an init call only creates the (zero) offset
                start = next_step.value
                next_step.value = start + length
        return x + lax.dynamic_slice_in_dim(table, start, length)[None]


class Block(nn.Module):
    config: LMConfig

    @nn.compact
    def __call__(self, x, mask):
        c = self.config
        kwargs = dict(
            num_heads=c.num_heads,
            qkv_features=c.qkv_features,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.xavier_uniform(), ("embed", "kv")
            ),
            use_bias=False,
            broadcast_dropout=False,
            dropout_rate=c.attention_dropout_rate,
            deterministic=c.deterministic,
            decode=c.decode,
        )
        h = nn.LayerNorm(name="attn_norm")(x)
        if c.mixer is None:
            h = nn.SelfAttention(**kwargs)(h, mask)  # the stock line, unchanged by swaps
        else:
            h = get_mixer(c.mixer)(**kwargs)(h, mask=mask)
        x = x + nn.Dropout(c.dropout_rate)(h, deterministic=c.deterministic)
        h = nn.LayerNorm(name="mlp_norm")(x)
        h = nn.gelu(nn.Dense(c.mlp_dim, name="mlp_in")(h))
        h = nn.Dropout(c.dropout_rate)(h, deterministic=c.deterministic)
        h = nn.Dense(x.shape[-1], name="mlp_out")(h)
        return x + nn.Dropout(c.dropout_rate)(h, deterministic=c.deterministic)


class DecoderLM(nn.Module):
    """``apply(variables, tokens [B, L], positions=None, segment_ids=None) -> logits
    [B, L, vocab]``: step ``t``'s logits predict ``tokens[:, t]`` (training mode shifts
    the inputs itself) or the token after ``tokens[:, t]`` (decode mode)."""

    config: LMConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None):
        c = self.config
        if c.decode:
            inputs, mask = tokens, None  # the cache holds the past; a step sees all of it
        else:
            inputs = shift_right(tokens, segment_ids)
            valid = tokens > 0
            mask = nn.combine_masks(
                nn.make_attention_mask(valid, valid), nn.make_causal_mask(tokens)
            )
            if segment_ids is not None:
                mask = nn.combine_masks(
                    mask, nn.make_attention_mask(segment_ids, segment_ids, jnp.equal)
                )
        x = nn.Embed(c.vocab_size, c.width, name="embed")(inputs)
        x = Positions(c, name="positions")(x, positions)
        x = nn.Dropout(c.dropout_rate)(x, deterministic=c.deterministic)
        for i in range(c.num_layers):
            x = Block(c, name=f"block_{i}")(x, mask)
        return nn.Dense(c.vocab_size, name="logits")(nn.LayerNorm(name="final_norm")(x))
