"""Per-step step sizes: from timestamps (irregular sampling), and the per-step stability clamp.

:func:`flax_linoss.ops.linoss_apply` takes a ``dt [..., L, P]`` with a time axis: each step
its own transition and forcing. Two uses build it from the learned per-oscillator ``dt [P]``:

* **Irregularly sampled series** (as S5 does): ``dt_t = dt * gap_t`` with ``gap_t`` the time
  since the previous observation in units of a time scale (:func:`timestamp_gaps`); on a
  regular grid of one time unit every gap is 1 and the layer is exactly the time-invariant
  one.
* **Selective (input-dependent) step sizes**: ``dt_t = dt * softplus(W x_t + b)``, in
  :class:`flax_linoss.nnx.LinOSSLayer` (``selective=True``).

A per-step size may exceed 1. LinOSS-IM is stable for every ``dt > 0``; LinOSS-IMEX and
D-LinOSS are stable only for ``dt`` below a bound that depends on ``a`` (and ``g``), so
:func:`clamp_steps` clamps each step into its stable range (the ``"stable"`` constraint,
applied per step); the layers call it.

Legend: ``L`` length, ``P`` oscillators.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flax_linoss.ops import _seqpar, schemes
from flax_linoss.ops._scans._common import resets_from_segments
from flax_linoss.ops.params import IMEX_MARGIN, PAPER, STABLE, check_constraint

__all__ = ["clamp_steps", "step_limit", "timestamp_gaps"]


def _concrete(x):
    return None if x is None or isinstance(x, jax.core.Tracer) else np.asarray(x)


def _combine_last(earlier, later):
    """The monoid of :func:`_last_valid`: ``(start, has, value)`` elements, a later value
    wins if it is valid, a segment start cuts off what came before."""
    r_a, h_a, x_a = earlier
    r_b, h_b, x_b = later
    return r_a | r_b, h_b | (~r_b & h_a), jnp.where(h_b | r_b, x_b, x_a)


def _last_valid(valid, values, starts):
    """Per position, the last valid value at or before it within its segment.

    A segmented "last valid" prefix scan (log depth) of :func:`_combine_last`. Arrays
    ``[N, L]``; returns ``(has, value)``.
    """
    _, has, value = jax.lax.associative_scan(_combine_last, (starts, valid, values), axis=1)
    return has, value


def _carried_in(summary, initial, axis, reverse):
    """Sequence parallelism: the last valid value processed before this shard, in the
    segment this shard starts in (``NaN`` where there is none), ``[N, 1]``.

    Each shard's ``summary`` (its :func:`_combine_last` element: ``(any start, has, last
    value)``, ``[N]`` each, the shard's first step a start where a segment starts there) is
    shared over ``axis``, and the summaries of the shards processed before this one are
    folded after ``initial`` (``[N, 1]``, ``NaN``: none)."""
    first = initial[:, 0].astype(summary[2].dtype)
    start = (jnp.zeros(first.shape, bool), ~jnp.isnan(first), jnp.nan_to_num(first))
    (_, got, value), _ = _seqpar.fold_shards(_combine_last, start, summary, axis, reverse)
    return jnp.where(got, value, jnp.nan)[:, None]


def timestamp_gaps(
    timestamps: jax.Array,
    *,
    mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    reverse: bool = False,
    initial_timestamp: jax.Array | None = None,
    time_scale: float = 1.0,
    sequence_axis: str | None = None,
) -> jax.Array:
    """The time between each observation and the one processed before it, ``[..., L]``.

    In units of ``time_scale``: multiply a layer's ``dt [P]`` by ``gaps[..., None]`` for
    the per-step ``dt [..., L, P]``.

    * The first processed step of a sequence (and of each packed segment) has gap 1, one
      time unit, as on a regular grid, unless ``initial_timestamp`` is given: then the
      first segment's first step has the gap to it (streaming: the time of the observation
      that produced ``initial_state``).
    * A masked step is skipped: the next valid step's gap is to the last valid observation
      (a masked step's own gap is 1; it does not change the state anyway).
    * With ``reverse`` (processing from the last step to the first) the gap of step ``n``
      is to the observation after it: ``t_{n+1} - t_n``.

    Args:
      timestamps: ``[..., L]`` observation times, increasing along the sequence over its
        valid steps (packed segments each start anew).
      mask: optional ``[..., L]`` bool, ``True`` = valid.
      segment_ids: optional ``[..., L]`` int; the state restarts where the id changes.
      reverse: gaps for a recurrence run from the last step to the first.
      initial_timestamp: optional ``[...]`` time of the observation before the first
        processed step (the last processed one with ``reverse``); ``NaN`` in a row that has
        none (its first step then has gap 1, as without it).
      time_scale: the time unit: a gap of ``time_scale`` is one step of the learned ``dt``.
      sequence_axis: inside ``shard_map``, the mesh axis over which ``L`` is split (as for
        :func:`flax_linoss.ops.linoss_apply`): the gaps of this shard's steps, the first
        ones to the last valid observation of the shards before it (a segment starting at
        the shard boundary, found from the previous shard's last id, starts anew).

    Returns:
      ``[..., L]`` float32 (float64 for float64 timestamps) gaps, ``> 0`` on valid steps.

    Raises:
      ValueError: ``time_scale <= 0``, or concrete (not traced) timestamps that do not
        increase over the valid steps of a sequence or segment.
    """
    if not time_scale > 0:
        raise ValueError(f"time_scale must be > 0, got {time_scale!r}.")
    t = jnp.asarray(timestamps)
    if t.ndim < 1:
        raise ValueError(f"timestamps must have shape [..., length], got {t.shape}.")
    dtype = t.dtype if jnp.issubdtype(t.dtype, jnp.floating) else jnp.float32
    shape = t.shape

    def rows(x, dtype=None):
        x = jnp.broadcast_to(jnp.asarray(x, dtype), shape).reshape(-1, shape[-1])
        return x[:, ::-1] if reverse else x  # in processing order

    # In processing order; reversed time runs forward in -t.
    flat = rows(t, jnp.promote_types(dtype, jnp.float32))
    flat = -flat if reverse else flat
    valid = jnp.ones(flat.shape, bool) if mask is None else rows(mask).astype(bool)
    starts = jnp.zeros(flat.shape, bool)
    if segment_ids is not None:
        seg = rows(segment_ids)
        starts = resets_from_segments(seg)
    t0 = None
    if initial_timestamp is not None:
        t0 = jnp.asarray(initial_timestamp, flat.dtype)
        t0 = jnp.broadcast_to(-t0 if reverse else t0, shape[:-1]).reshape(-1, 1)
    if sequence_axis is not None and segment_ids is not None:
        starts = _seqpar.boundary_resets(seg, starts, sequence_axis, reverse)
    has, last = _last_valid(valid, flat, starts)
    if sequence_axis is not None:  # the first steps' gaps reach into the shards before
        none = jnp.full((flat.shape[0], 1), jnp.nan, flat.dtype)
        summary = (jnp.any(starts, 1), has[:, -1], last[:, -1])
        t0 = _carried_in(summary, none if t0 is None else t0, sequence_axis, reverse)
    # The previous valid observation in the same segment: the running value one step back.
    first = jnp.zeros_like(has[:, :1])
    prev_has = jnp.concatenate([first, has[:, :-1]], axis=1) & ~starts
    prev = jnp.concatenate([jnp.zeros_like(flat[:, :1]), last[:, :-1]], axis=1)
    gaps = jnp.where(prev_has, flat - prev, time_scale)
    if t0 is not None:
        # Steps of the first segment before (and at) its first valid step.
        in_first = jnp.cumsum(starts, axis=1) == 0
        gaps = jnp.where(in_first & ~prev_has & ~jnp.isnan(t0), flat - t0, gaps)
    gaps = jnp.where(valid, gaps, time_scale) / time_scale
    _check_increasing(_concrete(gaps), _concrete(valid), reverse)
    return (gaps[:, ::-1] if reverse else gaps).reshape(shape)


def _check_increasing(gaps, valid, reverse: bool) -> None:
    if gaps is None or valid is None:
        return
    bad = valid & ~(gaps > 0)
    if np.any(bad):
        row, step = (int(i[0]) for i in np.nonzero(bad))
        step = gaps.shape[1] - 1 - step if reverse else step
        raise ValueError(
            f"`timestamps` must increase over the valid steps of each sequence (and segment): "
            f"step {step} of sequence {row} is not after the observation before it (gap "
            f"{float(gaps[row, step]):.4g} time units). Mask padded steps with `mask`."
        )


def step_limit(
    discretization: str, a: jax.Array, g: jax.Array | None = None, *, constraint: str = STABLE
) -> jax.Array | None:
    """The largest stable step size per oscillator, ``[P]`` (``inf`` where unbounded), or
    ``None`` where every ``dt > 0`` is stable.

    * LinOSS-IM: ``None`` (eigenvalue modulus ``1/sqrt(1 + dt^2 a)`` for every ``dt``).
    * LinOSS-IMEX with ``constraint="stable"``: ``dt^2 a <= 4 - IMEX_MARGIN``, the bound
      the time-invariant ``"stable"`` constraint keeps (``"paper"``: ``None``, as the
      papers' IMEX, which may diverge).
    * D-LinOSS (either constraint): the top of its band, ``a <= (2 + dt g + 2 sqrt(1 + dt g))
      / dt^2``, i.e. ``dt <= (g + 2 sqrt(a)) / a``. Below it the eigenvalues have modulus
      ``1/sqrt(1 + dt g)`` (complex) or are real in ``(0, 1)`` (steps shorter than the band's
      bottom: over-damped, still stable).
    """
    schemes.check_discretization(discretization)
    check_constraint(constraint)
    if discretization == schemes.IM or (discretization == schemes.IMEX and constraint == PAPER):
        return None
    pos = a > 0
    safe = jnp.where(pos, a, 1.0)  # no inf / nan gradients where a = 0 (no bound there)
    if discretization == schemes.IMEX:
        limit = jnp.sqrt((4.0 - IMEX_MARGIN) / safe)
    else:
        if g is None:
            raise ValueError("discretization='damped' (D-LinOSS) needs the damping `g`.")
        limit = (g + 2.0 * jnp.sqrt(safe)) / safe
    return jnp.where(pos, limit, jnp.inf)


def clamp_steps(
    discretization: str,
    a: jax.Array,
    dt: jax.Array,
    g: jax.Array | None = None,
    *,
    constraint: str = STABLE,
) -> jax.Array:
    """Per-step sizes clamped into the scheme's stable range (see :func:`step_limit`).

    Args:
      discretization: ``"im"``, ``"imex"`` or ``"damped"``.
      a: ``[P]`` constrained stiffness.
      dt: ``[..., P]`` step sizes (e.g. ``[..., L, P]``), ``> 0``.
      g: ``[P]`` damping (``"damped"`` only).
      constraint: ``"stable"`` or ``"paper"`` (which LinOSS-IMEX leaves unclamped).

    Returns:
      ``min(dt, limit)``, shaped like ``dt`` (``dt`` itself for LinOSS-IM).
    """
    limit = step_limit(discretization, a, g, constraint=constraint)
    return dt if limit is None else jnp.minimum(dt, limit.astype(dt.dtype))
