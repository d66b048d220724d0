"""Attention masks -> what a causal oscillator mixer can use: step validity and segments.

Pure JAX (no Flax). A recurrent mixer cannot apply an arbitrary ``[q, kv]`` pattern; all it
can honour is *which steps exist* (padding) and *where a new sequence starts* (packing).
:func:`reduce_mask` reads both off the mask forms that Flax transformers pass to attention:

* ``[batch..., length]``: per-step validity (``True``/non-zero = a real token); leading
  batch axes may be missing or ``1`` (broadcast).
* ``[batch..., heads, length, length]`` as built by ``flax.linen.make_attention_mask``,
  ``make_causal_mask`` and ``combine_masks`` (batch and heads axes may be ``1`` and
  broadcast; heads are reduced with "any"):

  - step ``i`` is valid iff ``mask[..., i, i]`` (a padded query row/key column is ``False``
    on the diagonal; a causal or a full padding mask is ``True`` there for real tokens);
  - a valid step ``i`` starts a new segment iff ``mask[..., i, j]`` is ``False`` for the
    last valid step ``j < i`` (the block-diagonal packing mask of the lm1b example). Steps
    before the first valid one never start a segment (nothing to reset).

  Everything else in the mask is ignored: a causal mixer is causal whatever the mask says
  (a full, non-causal padding mask on it is fine and means "these steps are valid"), and a
  bidirectional mixer reads the same validity and segments for its reverse scan.

Legend: ``L`` length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _as_bool(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    return x if x.dtype == jnp.bool_ else x != 0


def _broadcast(x: jax.Array, shape: tuple[int, ...], what: str, where: str) -> jax.Array:
    try:
        return jnp.broadcast_to(x, shape)
    except ValueError as e:
        raise ValueError(f"{where}: {what} cannot broadcast to {list(shape)}.") from e


def reduce_mask(
    mask: jax.Array | None, lead_shape: tuple[int, ...], *, where: str = "mixer"
) -> tuple[jax.Array | None, jax.Array | None]:
    """Reduces a padding or attention mask to ``(valid, segment_ids)``.

    Args:
      mask: ``None``, ``[batch..., L]`` or ``[batch..., heads, L, L]`` (see module doc); any
        dtype, non-zero = allowed.
      lead_shape: ``(batch..., L)``, the input's shape without its feature axis.
      where: name used in error messages.

    Returns:
      ``valid [batch..., L]`` bool or ``None``, and ``segment_ids [batch..., L]`` int32 (for
      an attention-shaped mask) or ``None``.

    Raises:
      ValueError: if the mask has neither form or does not broadcast to the input.
    """
    if mask is None:
        return None, None
    mask = jnp.asarray(mask)
    lead_shape = tuple(lead_shape)
    batch, length = lead_shape[:-1], lead_shape[-1]
    expected = (
        f"a [batch..., length] = {list(lead_shape)} validity mask or a [batch..., heads, "
        f"length, length] = {[*batch, 'heads', length, length]} self-attention mask"
    )
    if 1 <= mask.ndim <= len(lead_shape):  # per step, broadcast over leading batch axes
        return _broadcast(_as_bool(mask), lead_shape, f"mask of shape {mask.shape}", where), None
    if mask.ndim == len(lead_shape) + 2:
        if mask.shape[-2:] != (length, length):
            raise ValueError(
                f"{where}: mask of shape {list(mask.shape)} has query/key lengths "
                f"{list(mask.shape[-2:])} but the input has length {length}; expected "
                f"{expected}. (A recurrent mixer keeps its own decoding state: during "
                "decoding pass mask=None or the new tokens' [batch..., length] validity.)"
            )
        attn = jnp.any(_as_bool(mask), axis=-3)  # heads
        attn = _broadcast(
            attn, (*batch, length, length), f"mask of shape {list(mask.shape)}", where
        )
        return _validity_and_segments(attn)
    raise ValueError(
        f"{where}: mask of shape {list(mask.shape)} (rank {mask.ndim}) does not fit an input "
        f"of shape [..., {length}, features]; expected {expected}."
    )


def _validity_and_segments(attn: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``attn [..., L, L]`` bool -> ``(valid [..., L], segment_ids [..., L])``."""
    length = attn.shape[-1]
    valid = jnp.diagonal(attn, axis1=-2, axis2=-1)
    steps = jnp.arange(length, dtype=jnp.int32)
    last_valid = jax.lax.cummax(jnp.where(valid, steps, -1), axis=valid.ndim - 1)
    prev = jnp.concatenate(
        [jnp.full_like(last_valid[..., :1], -1), last_valid[..., :-1]], axis=-1
    )  # the last valid step before i, or -1
    linked = jnp.take_along_axis(attn, jnp.maximum(prev, 0)[..., None], axis=-1)[..., 0]
    starts = valid & (prev >= 0) & jnp.logical_not(linked)
    return valid, jnp.cumsum(starts, axis=-1, dtype=jnp.int32)


def combine_segment_ids(*ids: jax.Array | None) -> jax.Array | None:
    """Segment ids that change wherever any of ``ids`` (each ``[..., L]``) changes."""
    ids = [jnp.asarray(x) for x in ids if x is not None]
    if not ids:
        return None
    if len(ids) == 1:
        return ids[0]
    shape = np.broadcast_shapes(*(x.shape for x in ids))
    change = jnp.zeros(shape, bool)
    for x in ids:
        x = jnp.broadcast_to(x, shape)
        step = jnp.concatenate([jnp.zeros_like(x[..., :1], bool), x[..., 1:] != x[..., :-1]], -1)
        change = change | step
    return jnp.cumsum(change, axis=-1, dtype=jnp.int32)


def check_segment_ids(
    segment_ids: jax.Array | None, lead_shape: tuple[int, ...], *, where: str = "mixer"
) -> jax.Array | None:
    """Broadcasts ``segment_ids`` to ``[batch..., L]`` with a clear error."""
    if segment_ids is None:
        return None
    segment_ids = jnp.asarray(segment_ids)
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise TypeError(f"{where}: segment_ids must be integers, got {segment_ids.dtype}.")
    return _broadcast(
        segment_ids, tuple(lead_shape), f"segment_ids of shape {list(segment_ids.shape)}", where
    )
