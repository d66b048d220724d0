"""Short causal depthwise convolution over the valid steps of a sequence, with a decoding buffer.

The short convolution that recurrent blocks put before their recurrence (Mamba, Griffin, H3,
the outer-product oscillator block), written for the masks and packing of
:func:`flax_linoss.ops.linoss_apply`::

    y_t = w[W-1] x_t + sum_{j=1}^{W-1} w[W-1-j] x_(j-th valid step before t) + b

* ``mask``: a masked step does not exist for the convolution, as for the recurrence (it
  leaves the buffer unchanged): a valid step sees the previous ``W - 1`` *valid* inputs,
  whatever padding lies between them, so a padded sequence gives the valid steps of the
  unpadded one. A masked step's output is computed the same way from its own input and the
  held buffer (like the recurrence's masked step, which reads the held state).
* ``segment_ids``: a step never sees an input of an earlier segment (the buffer restarts
  empty wherever the id changes between consecutive steps).
* The buffer (the decoding state) is the last ``W - 1`` valid inputs, oldest first,
  ``[..., W - 1, D]``; :func:`causal_conv` takes it as ``initial_state`` (the inputs before
  the first step) and returns the one after the last step; :func:`causal_conv_step` moves it
  by one step.

Legend: ``L`` length, ``D`` channels, ``W`` width (taps).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flax_linoss.ops import _checks

__all__ = ["causal_conv", "causal_conv_step", "conv_state_zeros"]


def conv_state_zeros(batch_shape, width: int, channels: int, dtype=jnp.float32) -> jnp.ndarray:
    """An empty buffer ``[*batch_shape, width - 1, channels]``."""
    return jnp.zeros((*tuple(batch_shape), max(width - 1, 0), channels), dtype)


def _check(x, w, b, where: str):
    if np.ndim(x) < 1 or np.ndim(w) != 2:
        raise ValueError(
            f"{where}: expected `w` of shape [width, channels] and `x` [..., channels], got "
            f"w {np.shape(w)} and x {np.shape(x)}."
        )
    width, channels = np.shape(w)
    if width < 1:
        raise ValueError(f"{where}: `w` needs at least one tap, got shape {np.shape(w)}.")
    if np.shape(x)[-1] != channels:
        raise ValueError(
            f"{where}: `x` has {np.shape(x)[-1]} channels (last axis of {np.shape(x)}) but `w` "
            f"{np.shape(w)} has {channels}."
        )
    if b is not None and np.shape(b) != (channels,):
        raise ValueError(
            f"{where}: `b` must have shape [channels] = [{channels}], got {np.shape(b)}."
        )
    for name, t in (("x", x), ("w", w)):
        if not jnp.issubdtype(jnp.result_type(t), jnp.floating):
            raise TypeError(f"{where}: `{name}` must be floating, got {jnp.result_type(t)}.")
    return width, channels


def _check_buffer(buffer, shape, name: str, where: str):
    if not _checks.broadcasts_to(np.shape(buffer), shape):
        raise ValueError(
            f"{where}: `{name}` of shape {np.shape(buffer)} must broadcast to [..., width - 1, "
            f"channels] = {list(shape)}."
        )


def causal_conv(
    x: jnp.ndarray,
    w: jnp.ndarray,
    b: jnp.ndarray | None = None,
    *,
    mask: jnp.ndarray | None = None,
    segment_ids: jnp.ndarray | None = None,
    initial_state: jnp.ndarray | None = None,
    return_state: bool = False,
):
    """Causal depthwise convolution of ``x [..., L, D]`` with taps ``w [W, D]``.

    Args:
      x: ``[..., L, D]``.
      w: ``[W, D]``; ``w[W - 1]`` multiplies the current step, ``w[W - 1 - j]`` the ``j``-th
        valid step before it.
      b: optional ``[D]`` bias.
      mask: ``[..., L]`` bool, ``True`` = valid (see the module docstring).
      segment_ids: ``[..., L]`` int (packed sequences).
      initial_state: the buffer before the first step, ``[..., W - 1, D]`` (oldest first;
        broadcast over the batch); empty (zeros) by default.
      return_state: also return the buffer after the last step (in ``x``'s dtype).

    Returns:
      ``y [..., L, D]`` in the result dtype of ``x`` and ``w``, and with ``return_state``
      the final buffer ``[..., W - 1, D]``.
    """
    where = "causal_conv"
    width, channels = _check(x, w, b, where)
    if np.ndim(x) < 2:
        raise ValueError(
            f"{where}: expected `x` of shape [..., length, channels], got {np.shape(x)}."
        )
    *lead, length, _ = np.shape(x)
    lead = tuple(lead)
    if initial_state is not None:
        _check_buffer(initial_state, (*lead, width - 1, channels), "initial_state", where)
    for name, f in (("mask", mask), ("segment_ids", segment_ids)):
        if f is not None:
            _checks.check_per_step(name, f, (*lead, length), where)
    return _conv(x, w, b, mask, segment_ids, initial_state, return_state=return_state)


@functools.partial(jax.jit, static_argnames=("return_state",))
def _conv(x, w, b, mask, segment_ids, initial_state, *, return_state):
    *lead, length, channels = x.shape
    lead = tuple(lead)
    width = w.shape[0]
    n = int(np.prod(lead)) if lead else 1
    dtype = jnp.result_type(x, w)
    xf = x.reshape(n, length, channels).astype(dtype)
    hist = width - 1
    if initial_state is None:
        buf = jnp.zeros((n, hist, channels), dtype)
    else:
        buf = jnp.broadcast_to(initial_state, (*lead, hist, channels)).reshape(n, hist, channels)
        buf = buf.astype(dtype)
    per_step = lambda f: (
        None if f is None else jnp.broadcast_to(f, (*lead, length)).reshape(n, length)
    )
    valid, seg = per_step(mask), per_step(segment_ids)

    # The sequence the taps slide over: the buffer, then the valid inputs in order
    # ("compacted"), with the run (segment) each came from; the buffer is run 0.
    if valid is None:
        compact = xf
        before = jnp.broadcast_to(jnp.arange(length), (n, length))  # valid steps before t
    else:
        valid = valid.astype(bool)
        order = jnp.argsort(jnp.logical_not(valid), axis=1, stable=True)
        compact = jnp.take_along_axis(xf, order[..., None], axis=1)
        before = jnp.cumsum(valid, axis=1, dtype=jnp.int32) - valid.astype(jnp.int32)
    seq = jnp.concatenate([buf, compact], axis=1)  # [N, W - 1 + L, D]
    if seg is None:
        run = None
    else:
        starts = (seg[:, 1:] != seg[:, :-1]).astype(jnp.int32)
        run = jnp.concatenate([jnp.zeros((n, 1), jnp.int32), jnp.cumsum(starts, 1)], 1)
        run_c = run if valid is None else jnp.take_along_axis(run, order, axis=1)
        seq_run = jnp.concatenate([jnp.zeros((n, hist), jnp.int32), run_c], axis=1)

    y = xf * w[-1]
    for j in range(1, width):  # the j-th valid input before t: seq[W - 1 + before_t - j]
        idx = hist + before - j
        tap = jnp.take_along_axis(seq, idx[..., None], axis=1)
        if run is not None:
            same = jnp.take_along_axis(seq_run, idx, axis=1) == run
            tap = jnp.where(same[..., None], tap, 0.0)
        y = y + tap * w[hist - j]
    if b is not None:
        y = y + b
    y = y.reshape(*lead, length, channels)
    if not return_state:
        return y
    # The last W - 1 valid inputs of the last run, oldest first.
    total = length if valid is None else jnp.sum(valid, axis=1, dtype=jnp.int32)
    idx = hist + jnp.reshape(total, (-1, 1)) - jnp.arange(hist, 0, -1)[None]  # [N or 1, W - 1]
    idx = jnp.broadcast_to(idx, (n, hist))
    out = jnp.take_along_axis(seq, idx[..., None], axis=1)
    if run is not None:
        same = jnp.take_along_axis(seq_run, idx, axis=1) == run[:, -1:]
        out = jnp.where(same[..., None], out, 0.0)
    return y, out.reshape(*lead, hist, channels).astype(x.dtype)


def causal_conv_step(
    state: jnp.ndarray,
    x_t: jnp.ndarray,
    w: jnp.ndarray,
    b: jnp.ndarray | None = None,
    *,
    mask: jnp.ndarray | None = None,
):
    """One decoding step of :func:`causal_conv`.

    Args:
      state: the buffer ``[..., W - 1, D]`` (the last ``W - 1`` valid inputs, oldest first).
      x_t: ``[..., D]``.
      w, b: as in :func:`causal_conv`.
      mask: ``[...]`` bool; ``False`` leaves the buffer unchanged (the output is still
        computed from ``x_t`` and the buffer).

    Returns:
      ``(next_state, y_t)``.
    """
    where = "causal_conv_step"
    width, channels = _check(x_t, w, b, where)
    _check_buffer(state, (*np.shape(x_t)[:-1], width - 1, channels), "state", where)
    return _conv_step(state, x_t, w, b, mask)


@jax.jit
def _conv_step(state, x_t, w, b, mask):
    dtype = jnp.result_type(x_t, w)
    hist = w.shape[0] - 1
    state = jnp.broadcast_to(state, (*x_t.shape[:-1], hist, x_t.shape[-1]))
    y = x_t.astype(dtype) * w[-1] + jnp.einsum("...jd,jd->...d", state.astype(dtype), w[:-1])
    if b is not None:
        y = y + b
    new = jnp.concatenate([state[..., 1:, :], x_t[..., None, :].astype(state.dtype)], axis=-2)
    if mask is not None:
        new = jnp.where(jnp.asarray(mask, bool)[..., None, None], new, state)
    return new, y
