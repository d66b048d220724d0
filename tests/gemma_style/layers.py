"""Pieces shared by the nnx and linen decoders: RMS norm, rotary embedding, the attention
core (cache write, grouped-query scores, masks, soft cap, sliding window)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

#: The score given to masked keys (finite, so a fully masked row stays finite).
K_MASK = -1e30


class RMSNorm(nnx.Module):
    """``x / rms(x) * (1 + scale)`` over the last axis; ``scale`` starts at zero."""

    def __init__(
        self,
        dim: int,
        *,
        rngs: nnx.Rngs,
        scale_metadata: dict[str, Any] | None = None,
        dtype: Any = jnp.float32,
        weight_dtype: Any = jnp.float32,
    ):
        del rngs  # deterministic initialisation
        self.dtype = dtype
        self.scale = nnx.Param(jnp.zeros((dim,), weight_dtype), **(scale_metadata or {}))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, dtype: Any) -> jax.Array:
    x = x.astype(jnp.float32)
    normed = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    return (normed * (1.0 + scale.astype(jnp.float32))).astype(dtype)


def apply_rope(
    x: jax.Array, positions: jax.Array, *, base_frequency: float, scale_factor: float = 1.0
) -> jax.Array:
    """Rotates pairs ``(x[..., i], x[..., i + h/2])`` of ``x [B, T, N, H]`` by the angle
    ``positions [B, T] / scale_factor * base_frequency ** (-2i / H)``."""
    if scale_factor < 1.0:
        raise ValueError(f"rope scale_factor must be >= 1, got {scale_factor}.")
    half = x.shape[-1] // 2
    inv_freq = base_frequency ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions.astype(jnp.float32)[..., None, None] / scale_factor * inv_freq
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    a, b = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1).astype(x.dtype)


def write_cache(cache: dict[str, jax.Array], k: jax.Array, v: jax.Array):
    """Writes ``k, v [B, T, K, H]`` into the left-aligned cache at ``end_index % size``.

    Returns:
      ``(keys, values, new_cache, query_index)``: the whole cache's keys and values
      ``[B, size, K, H]``, the updated cache dict, and the slot index of each new step
      ``[T]`` (for the sliding window).
    """
    end = cache["end_index"][0]
    slot = end % cache["k"].shape[1]
    keys = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, slot, 0, 0))
    values = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, slot, 0, 0))
    new_cache = {"k": keys, "v": values, "end_index": cache["end_index"] + k.shape[1]}
    return keys, values, new_cache, end + jnp.arange(k.shape[1])


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    attn_mask: jax.Array,
    *,
    query_index: jax.Array,
    soft_cap: float | None,
    sliding_window: int | None,
    dropout: Callable[[jax.Array], jax.Array] = lambda p: p,
) -> jax.Array:
    """Grouped-query attention of scaled queries ``q [B, T, N, H]`` over ``k, v
    [B, S, K, H]`` (``N`` a multiple of ``K``) under ``attn_mask [B, T, S]`` (True: the
    key is visible). Returns ``[B, T, N, H]``."""
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    if attn_mask.shape != (b, t, s):
        raise ValueError(
            f"attn_mask must be [batch, length, keys] = {(b, t, s)}, got {attn_mask.shape}."
        )
    grouped = q.reshape(b, t, kv_heads, n // kv_heads, h)
    logits = jnp.einsum("btkgh,bskh->btkgs", grouped, k).astype(jnp.float32)
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    mask = attn_mask.astype(bool)
    if sliding_window is not None:
        near = jnp.abs(query_index[:, None] - jnp.arange(s)[None, :]) < sliding_window
        mask = mask & near[None]
    logits = jnp.where(mask[:, :, None, None, :], logits, K_MASK)
    probs = dropout(jax.nn.softmax(logits, axis=-1).astype(v.dtype))
    return jnp.einsum("btkgs,bskh->btkgh", probs, v).reshape(b, t, n, h)
