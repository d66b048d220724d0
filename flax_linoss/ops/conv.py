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

On CPU, per device, :func:`causal_conv` runs as a fused C++ kernel (``scan="native"``, see
:mod:`flax_linoss.ops._scans.native`); elsewhere, and with ``sequence_axis``, as gathers
over the valid steps (``scan="jax"``).

Legend: ``L`` length, ``D`` channels, ``W`` width (taps).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flax_linoss.ops import _auto, _checks, _seqpar
from flax_linoss.ops._scans import native
from flax_linoss.ops._scans._common import Flags, resets_from_segments

__all__ = ["CONV_SCANS", "causal_conv", "causal_conv_step", "conv_state_zeros"]

#: The paths of :func:`causal_conv`: ``"jax"`` (gathers over the valid steps, every
#: platform), ``"native"`` (the fused C++ kernels on CPU) and ``"auto"``.
CONV_SCANS = ("auto", "jax", "native")


def conv_state_zeros(batch_shape, width: int, channels: int, dtype=jnp.float32) -> jnp.ndarray:
    """An empty buffer ``[*batch_shape, width - 1, channels]``."""
    return jnp.zeros((*tuple(batch_shape), max(width - 1, 0), channels), dtype)


def _check(x, w, b, where: str):
    """Checks ``x`` (an array, or a tuple of streams whose channels add up to ``w``'s),
    ``w [W, D]`` and ``b [D]``; returns ``(W, D)``."""
    xs = x if isinstance(x, tuple) else (x,)
    shown = [np.shape(t) for t in xs] if isinstance(x, tuple) else np.shape(x)
    if not xs or any(np.ndim(t) < 1 for t in xs) or np.ndim(w) != 2:
        raise ValueError(
            f"{where}: expected `w` of shape [width, channels] and `x` [..., channels], got "
            f"w {np.shape(w)} and x {shown}."
        )
    width, channels = np.shape(w)
    if width < 1:
        raise ValueError(f"{where}: `w` needs at least one tap, got shape {np.shape(w)}.")
    got = sum(np.shape(t)[-1] for t in xs)
    if got != channels:
        what = "the streams of `x` have" if isinstance(x, tuple) else "`x` has"
        raise ValueError(
            f"{where}: {what} {got} channels (last axis of {shown}) but `w` {np.shape(w)} has "
            f"{channels}."
        )
    if b is not None and np.shape(b) != (channels,):
        raise ValueError(
            f"{where}: `b` must have shape [channels] = [{channels}], got {np.shape(b)}."
        )
    for name, t in (*(("x", t) for t in xs), ("w", w)):
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
    sequence_axis: str | None = None,
    scan: str = "auto",
):
    """Causal depthwise convolution of ``x [..., L, D]`` with taps ``w [W, D]``.

    Args:
      x: ``[..., L, D]``, or a tuple of streams ``[..., L, D_s]`` side by side in the
        channels of ``w``, ``b`` and the buffers (``D`` their sum): the result is then the
        tuple of their outputs, as if ``x`` were their concatenation, convolved and split
        again (the CPU kernels do it without copying; a block's queries, keys and values).
      w: ``[W, D]``; ``w[W - 1]`` multiplies the current step, ``w[W - 1 - j]`` the ``j``-th
        valid step before it.
      b: optional ``[D]`` bias.
      mask: ``[..., L]`` bool, ``True`` = valid (see the module docstring).
      segment_ids: ``[..., L]`` int (packed sequences).
      initial_state: the buffer before the first step, ``[..., W - 1, D]`` (oldest first;
        broadcast over the batch); empty (zeros) by default.
      return_state: also return the buffer after the last step (in ``x``'s dtype).
      sequence_axis: inside ``shard_map``, the mesh axis over which ``L`` is split (as for
        :func:`flax_linoss.ops.linoss_apply`): each shard starts from the last ``W - 1``
        valid inputs of the shards before it, in its first step's segment (each shard's
        last inputs, their count and whether a segment starts in it are shared, and
        folded after ``initial_state``). ``initial_state`` and the returned buffer are the
        whole sequence's.
      scan: ``"jax"``, ``"native"`` (the fused CPU kernels: float32 or float64, no
        ``sequence_axis``) or ``"auto"``: ``"native"`` where it can run and code runs per
        device (a single-device process, or inside ``shard_map``), else ``"jax"``.

    Returns:
      ``y [..., L, D]`` in the result dtype of ``x`` and ``w`` (a tuple for a tuple of
      streams), and with ``return_state`` the final buffer ``[..., W - 1, D]``.
    """
    where = "causal_conv"
    streams = isinstance(x, tuple | list)
    xs = tuple(x) if streams else (x,)
    width, channels = _check(xs if streams else x, w, b, where)
    for t in xs:
        if np.ndim(t) < 2 or np.shape(t)[:-1] != np.shape(xs[0])[:-1]:
            raise ValueError(
                f"{where}: expected `x` of shape [..., length, channels] (every stream the "
                f"same [..., length]), got {[np.shape(t) for t in xs] if streams else np.shape(x)}."
            )
    *lead, length, _ = np.shape(xs[0])
    lead = tuple(lead)
    if initial_state is not None:
        _check_buffer(initial_state, (*lead, width - 1, channels), "initial_state", where)
    for name, f in (("mask", mask), ("segment_ids", segment_ids)):
        if f is not None:
            _checks.check_per_step(name, f, (*lead, length), where)
    obstacle = None
    if sequence_axis is not None:
        obstacle = "it runs whole sequences (no `sequence_axis`)"
    elif jnp.result_type(*xs, w) not in (jnp.float32, jnp.float64):
        obstacle = f"it computes in float32 or float64 (here {jnp.result_type(*xs, w)})"
    scan = _auto.native_or(where, scan, "jax", obstacle)
    out = _conv(
        xs,
        w,
        b,
        mask,
        segment_ids,
        initial_state,
        return_state=return_state,
        axis=sequence_axis,
        scan=scan,
    )
    ys, *state = out
    y = ys if streams else ys[0]
    return (y, *state) if return_state else y


@functools.partial(jax.jit, static_argnames=("return_state", "axis", "scan"))
def _conv(xs, w, b, mask, segment_ids, initial_state, *, return_state, axis=None, scan="jax"):
    """``(the streams' y, ...)`` and with ``return_state`` the final buffer."""
    *lead, length, _ = xs[0].shape
    lead = tuple(lead)
    width, channels = w.shape
    n = int(np.prod(lead)) if lead else 1
    dtype = jnp.result_type(*xs, w)
    flat = [x.reshape(n, length, x.shape[-1]).astype(dtype) for x in xs]
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
    starts = None if seg is None else resets_from_segments(seg)
    if scan == "native":
        ys, out = native.conv_run(flat, w.astype(dtype), buf, Flags.of_valid(valid, starts))
    else:
        xf = flat[0] if len(flat) == 1 else jnp.concatenate(flat, axis=-1)
        if axis is not None:
            if seg is not None:  # a segment may start at the shard boundary
                starts = _seqpar.boundary_resets(seg, starts, axis, False)
            mine = _taps(xf, valid, starts, jnp.zeros_like(buf), hist)[1:]
            buf, final = _incoming(buf, mine, axis)
        y, tail, *_ = _taps(xf, valid, starts, buf, hist, w)
        out = tail if axis is None else final
        ys = jnp.split(y, np.cumsum([x.shape[-1] for x in xs])[:-1], axis=-1)
    if b is not None:
        bs = jnp.split(b, np.cumsum([x.shape[-1] for x in xs])[:-1])
        ys = [y + bias for y, bias in zip(ys, bs)]
    ys = tuple(y.reshape(*lead, length, y.shape[-1]) for y in ys)
    if not return_state:
        return (ys,)
    return ys, out.reshape(*lead, hist, channels).astype(xs[0].dtype)


def _incoming(buf, mine, axis):
    """Sequence parallelism: ``(the buffer into this shard, the one after the last
    shard)`` from each shard's ``(tail, count, starts)`` (see :func:`_taps`), folded over
    the shards before it after ``buf``."""
    hist = buf.shape[1]

    def fold(acc, shard):  # the buffer after a shard: its own inputs after the earlier ones
        tail, count, restarts = shard
        slot = jnp.arange(hist)[None, :]  # [1, W - 1]
        shifted = jnp.minimum(slot + count[:, None], hist - 1)  # acc[i + count]
        earlier = jnp.take_along_axis(acc, shifted[..., None], axis=1)
        kept = (slot < hist - count[:, None]) & ~restarts[:, None]
        return jnp.where(kept[..., None], earlier, tail)

    return _seqpar.fold_shards(fold, buf, mine, axis)


def _taps(xf, valid, starts, buf, hist, w=None):
    """The convolution ``y [N, L, D]`` (``None`` without ``w``) of ``xf [N, L, D]`` from the
    buffer ``buf [N, W - 1, D]``, the last ``W - 1`` valid inputs of the last segment run
    (oldest first, zeros for the ones missing), how many of them are this call's own
    (``[N]``, at most ``W - 1``) and whether a segment starts in it (``[N]``).
    ``starts [N, L]`` marks the segment starts (the first step included: a start there
    hides the buffer)."""
    n, length, _ = xf.shape
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
    run = None
    if starts is not None:
        run = jnp.cumsum(starts.astype(jnp.int32), axis=1)
        run_c = run if valid is None else jnp.take_along_axis(run, order, axis=1)
        seq_run = jnp.concatenate([jnp.zeros((n, hist), jnp.int32), run_c], axis=1)
    y = None if w is None else xf * w[-1]
    for j in range(1, 0 if w is None else hist + 1):  # the j-th valid input before t:
        idx = hist + before - j  # seq[W - 1 + before_t - j]
        tap = jnp.take_along_axis(seq, idx[..., None], axis=1)
        if run is not None:
            same = jnp.take_along_axis(seq_run, idx, axis=1) == run
            tap = jnp.where(same[..., None], tap, 0.0)
        y = y + tap * w[hist - j]
    # The last W - 1 valid inputs of the last run, oldest first.
    total = length if valid is None else jnp.sum(valid, axis=1, dtype=jnp.int32)
    idx = hist + jnp.reshape(total, (-1, 1)) - jnp.arange(hist, 0, -1)[None]  # [N or 1, W - 1]
    idx = jnp.broadcast_to(idx, (n, hist))
    tail = jnp.take_along_axis(seq, idx[..., None], axis=1)
    own = jnp.broadcast_to(idx >= hist, (n, hist))
    if run is not None:
        same = jnp.take_along_axis(seq_run, idx, axis=1) == run[:, -1:]
        tail = jnp.where(same[..., None], tail, 0.0)
        own = own & same
    restarts = jnp.zeros((n,), bool) if starts is None else jnp.any(starts, axis=1)
    return y, tail, jnp.sum(own, axis=1, dtype=jnp.int32), restarts


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
