"""Attention masks -> what a causal oscillator mixer can use: step validity and segments.

Pure JAX (no Flax). A recurrent mixer cannot apply an arbitrary ``[q, kv]`` pattern; all it
can honour is *which steps exist* (padding) and *where a new sequence starts* (packing).
:func:`read_mask` reads both off the mask forms that Flax transformers pass to attention:

* ``[batch..., length]``: per-step validity (``True``/non-zero = a real token); leading
  batch axes may be missing or ``1`` (broadcast).
* ``[batch..., length, kv_length]`` (no heads axis: Gemma's ``attn_mask``) or
  ``[batch..., heads, length, kv_length]`` (``flax.linen.make_attention_mask``,
  ``make_causal_mask``, ``combine_masks``; batch and heads axes may be ``1`` and broadcast;
  heads are reduced with "any"). Query ``i`` sits at key column ``c_i``: ``c_i = i`` for a
  whole sequence (``kv_length == length``), and ``c_i = (write_index + i) % kv_length``
  when decoding into a cache of ``kv_length`` slots from the write position
  ``write_index`` (Gemma's ``end_index``):

  - step ``i`` is valid iff ``mask[..., i, c_i]`` (a padded query row/key column is
    ``False`` there; a causal or a full padding mask is ``True`` there for real tokens);
  - a valid step ``i`` starts a new segment iff ``mask[..., i, c_j]`` is ``False`` for the
    last valid step ``j`` before it (in this call, or the one a decoding state remembers):
    the block-diagonal packing mask of the lm1b example. Steps before the first valid one
    never start a segment (nothing to reset).

  Everything else in the mask is ignored: a causal mixer is causal whatever the mask says
  (a full, non-causal padding mask on it is fine and means "these steps are valid"), and a
  bidirectional mixer reads the same validity and segments for its reverse scan.

Legend: ``L`` length.
"""

from __future__ import annotations

from typing import NamedTuple

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


class Steps(NamedTuple):
    """What a mask means to a recurrence (each field ``None`` when the mask does not say).

    Attributes:
      valid: ``[batch..., L]`` bool, the steps that exist.
      segment_ids: ``[batch..., L]`` int32; the state restarts wherever the id changes.
      restart: ``[batch...]`` bool, the first valid step starts a new segment after the
        state carried in from an earlier call (decoding).
      last: ``[batch...]`` int32, the absolute index of the last valid step seen so far
        (``-1``: none), for the next decoding call.
    """

    valid: jax.Array | None = None
    segment_ids: jax.Array | None = None
    restart: jax.Array | None = None
    last: jax.Array | None = None


def read_mask(
    mask: jax.Array | None,
    lead_shape: tuple[int, ...],
    *,
    where: str = "mixer",
    write_index: jax.Array | None = None,
    last: jax.Array | None = None,
) -> Steps:
    """Reads a padding or attention mask as :class:`Steps` (see the module doc).

    Args:
      mask: ``None``, ``[batch..., L]``, ``[batch..., L, K]`` or ``[batch..., heads, L, K]``;
        any dtype, non-zero = allowed. ``K`` (the key length) must be ``L`` unless
        ``write_index`` is given.
      lead_shape: ``(batch..., L)``, the input's shape without its feature axis.
      where: name used in error messages.
      write_index: ``[batch...]`` int, the key column (cache slot, modulo ``K``) of this
        call's first step; ``None`` for a whole sequence (step ``i`` at column ``i``).
      last: ``[batch...]`` int, the absolute index of the last valid step before this call
        (``-1``: none), from the decoding state (with ``write_index`` only).

    Raises:
      ValueError: if the mask has none of these forms or does not broadcast to the input.
    """
    lead_shape = tuple(lead_shape)
    batch, length = lead_shape[:-1], lead_shape[-1]
    decoding = write_index is not None
    if mask is None:
        if not decoding:
            return Steps()
        start, _ = _decoding(batch, write_index, last)
        return Steps(last=start + (length - 1))  # every step valid
    mask = jnp.asarray(mask)
    expected = (
        f"a [batch..., length] = {list(lead_shape)} validity mask, or a [batch..., length, "
        f"kv_length] / [batch..., heads, length, kv_length] = {[*batch, 'heads', length, 'K']} "
        "attention mask (K = length, or the cache size when decoding with a write position)"
    )
    if 1 <= mask.ndim <= len(lead_shape):  # per step, broadcast over leading batch axes
        valid = _broadcast(_as_bool(mask), lead_shape, f"mask of shape {mask.shape}", where)
        return Steps(valid=valid, last=_advance(valid, write_index, last) if decoding else None)
    if mask.ndim not in (len(lead_shape) + 1, len(lead_shape) + 2):
        raise ValueError(
            f"{where}: mask of shape {list(mask.shape)} (rank {mask.ndim}) does not fit an "
            f"input of shape [..., {length}, features]; expected {expected}."
        )
    kv_length = mask.shape[-1]
    if mask.shape[-2] != length or (write_index is None and kv_length != length):
        raise ValueError(
            f"{where}: mask of shape {list(mask.shape)} has query/key lengths "
            f"{list(mask.shape[-2:])} but the input has length {length}; expected {expected}. "
            "(A cache-sized mask needs a decoding state: pass `state=` / decode, or pass "
            "mask=None or the new tokens' [batch..., length] validity.)"
        )
    attn = _as_bool(mask)
    if mask.ndim == len(lead_shape) + 2:
        attn = jnp.any(attn, axis=-3)  # heads
    attn = _broadcast(attn, (*batch, length, kv_length), f"mask of shape {list(mask.shape)}", where)
    return _steps(attn, write_index, last)


def reduce_mask(
    mask: jax.Array | None, lead_shape: tuple[int, ...], *, where: str = "mixer"
) -> tuple[jax.Array | None, jax.Array | None]:
    """``(valid, segment_ids)`` of a whole sequence's mask (:func:`read_mask` without a
    decoding state)."""
    steps = read_mask(mask, lead_shape, where=where)
    return steps.valid, steps.segment_ids


def _decoding(batch, write_index, last):
    """``(start, carried)`` ``[batch...]`` int32 (sharded like the decoding state)."""
    start = jnp.broadcast_to(jnp.asarray(write_index).astype(jnp.int32), batch)
    if last is None:
        return start, jnp.full_like(start, -1)
    return start, jnp.broadcast_to(jnp.asarray(last).astype(jnp.int32), batch)


def _last_valid(valid: jax.Array) -> jax.Array:
    """``[..., L]`` int32: the index of the last valid step up to each step (``-1``: none)."""
    steps = jnp.arange(valid.shape[-1], dtype=jnp.int32)
    return jax.lax.cummax(jnp.where(valid, steps, -1), axis=valid.ndim - 1)


def _advance(valid: jax.Array, write_index, last) -> jax.Array:
    """The absolute index of the last valid step after a call of ``valid [..., L]``."""
    start, carried = _decoding(valid.shape[:-1], write_index, last)
    final = _last_valid(valid)[..., -1]
    return jnp.where(final >= 0, start + final, carried)


def _steps(attn: jax.Array, write_index, last) -> Steps:
    """``attn [..., L, K]`` bool -> :class:`Steps` (query ``i`` at column ``c_i``)."""
    length, kv_length = attn.shape[-2:]

    def at(cols_):
        return jnp.take_along_axis(attn, cols_[..., None], axis=-1)[..., 0]

    decoding = write_index is not None
    if decoding:
        start, carried = _decoding(attn.shape[:-2], write_index, last)
        cols = (start[..., None] + jnp.arange(length, dtype=jnp.int32)) % kv_length
        valid = at(cols)
    else:  # a whole sequence: step i at column i
        valid = jnp.diagonal(attn, axis1=-2, axis2=-1)
    last_in = _last_valid(valid)
    prev = jnp.concatenate([jnp.full_like(last_in[..., :1], -1), last_in[..., :-1]], axis=-1)
    in_call = prev >= 0
    if decoding:
        prev_col = jnp.where(
            in_call,
            jnp.take_along_axis(cols, jnp.maximum(prev, 0), axis=-1),
            (jnp.maximum(carried, 0) % kv_length)[..., None],
        )
        has_prev = in_call | (carried >= 0)[..., None]
    else:
        prev_col, has_prev = jnp.maximum(prev, 0), in_call
    starts = valid & has_prev & jnp.logical_not(at(prev_col))
    segment_ids = jnp.cumsum(starts, axis=-1, dtype=jnp.int32)
    if not decoding:
        return Steps(valid, segment_ids)
    restart = jnp.any(starts & jnp.logical_not(in_call), axis=-1)
    new_last = jnp.where(last_in[..., -1] >= 0, start + last_in[..., -1], carried)
    return Steps(valid, segment_ids, restart, new_last)


def restarts(steps: Steps, segment_ids, valid, state) -> jax.Array:
    """``[batch...]`` bool: the call's first valid step starts a new sequence after the
    decoding ``state`` (its mask says so, or its ``segment_ids`` entry differs from the last
    valid step's); the state before it is then zero."""
    restart = jnp.zeros_like(state.last, bool) if steps.restart is None else steps.restart
    if segment_ids is not None:
        v = jnp.ones(segment_ids.shape, bool) if valid is None else valid
        first = jnp.argmax(v, axis=-1)
        first_seg = jnp.take_along_axis(segment_ids, first[..., None], axis=-1)[..., 0]
        changed = (first_seg != state.segment) & jnp.any(v, axis=-1) & (state.last >= 0)
        restart = restart | changed
    return restart


def last_value(values, valid, previous) -> jax.Array:
    """``[batch...]``: the entry of ``values [batch..., L]`` at the last valid step (else
    ``previous``)."""
    v = jnp.ones(values.shape, bool) if valid is None else valid
    final = _last_valid(v)[..., -1]
    value = jnp.take_along_axis(values, jnp.maximum(final, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(final >= 0, value.astype(previous.dtype), previous)


def last_segment(segment_ids, valid, previous) -> jax.Array:
    """``[batch...]``: the ``segment_ids`` entry of the last valid step (else ``previous``)."""
    return previous if segment_ids is None else last_value(segment_ids, valid, previous)


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
