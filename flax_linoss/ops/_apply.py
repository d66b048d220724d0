"""``linoss_apply`` (a whole sequence) and ``linoss_step`` (one step, for decoding).

Both validate once at this boundary (:mod:`._checks`), then run one jitted program:
projection in, the recurrence by the chosen path of the scan table, projection out.

Legend: ``N`` flattened batch, ``L`` length, ``H`` features, ``P`` oscillators, ``Q = 2P``
real channels.
"""

from __future__ import annotations

import functools
from typing import Literal, overload

import jax
import jax.numpy as jnp
import numpy as np

from flax_linoss.ops import _checks, _project, _seqpar, schemes
from flax_linoss.ops._auto import resolve_scan
from flax_linoss.ops._project import LNQ
from flax_linoss.ops._scans._common import (
    Flags,
    recurrence_step,
    resets_from_segments,
    vary,
    varying_axes,
)
from flax_linoss.ops._state import LinOSSState
from flax_linoss.ops.table import AUTO, PALLAS, SCAN_TABLE, Scan


@overload
def linoss_apply(
    u: jax.Array,
    a: jax.Array,
    dt: jax.Array,
    b: jax.Array,
    c: jax.Array,
    d: jax.Array,
    *,
    g: jax.Array | None = None,
    discretization: str = schemes.IM,
    scan: str = AUTO,
    initial_state: LinOSSState | None = None,
    return_state: Literal[False] = False,
    reverse: bool = False,
    mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    sequence_axis: str | None = None,
    oscillator_axis: str | None = None,
    check: bool | str = True,
) -> jax.Array: ...


@overload
def linoss_apply(
    u: jax.Array,
    a: jax.Array,
    dt: jax.Array,
    b: jax.Array,
    c: jax.Array,
    d: jax.Array,
    *,
    g: jax.Array | None = None,
    discretization: str = schemes.IM,
    scan: str = AUTO,
    initial_state: LinOSSState | None = None,
    return_state: Literal[True],
    reverse: bool = False,
    mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    sequence_axis: str | None = None,
    oscillator_axis: str | None = None,
    check: bool | str = True,
) -> tuple[jax.Array, LinOSSState]: ...


def linoss_apply(
    u: jnp.ndarray,
    a: jnp.ndarray,
    dt: jnp.ndarray,
    b: jnp.ndarray,
    c: jnp.ndarray,
    d: jnp.ndarray,
    *,
    g: jnp.ndarray | None = None,
    discretization: str = schemes.IM,
    scan: str = AUTO,
    initial_state: LinOSSState | None = None,
    return_state: bool = False,
    reverse: bool = False,
    mask: jnp.ndarray | None = None,
    segment_ids: jnp.ndarray | None = None,
    sequence_axis: str | None = None,
    oscillator_axis: str | None = None,
    check: bool | str = True,
) -> jax.Array | tuple[jax.Array, LinOSSState]:
    """Applies a LinOSS / D-LinOSS layer to a sequence, for already-constrained parameters.

    Computes ``x_n = M_n x_{n-1} + f_n (B u_n)`` per oscillator (see
    :mod:`flax_linoss.ops.schemes`) from ``initial_state`` (zero by default) and returns
    ``Re(C y_n) + d * u_n``. With ``dt [P]`` the transition ``M`` and forcing ``f`` are the
    same at every step; with a time axis, ``dt [..., L, P]``, each step has its own (for
    irregularly sampled series and input-dependent, selective step sizes; see
    :mod:`flax_linoss.ops.steps`). The recurrence runs in float32 (float64 if ``a``/``dt`` are
    float64) whatever the dtype of ``u``; the projections run in ``u``'s dtype with
    float32 accumulation.

    Args:
      u: ``[..., L, H]`` real input.
      a: ``[P]`` stiffness, ``>= 0``.
      dt: ``[P]`` time steps in ``(0, 1]``, or per step ``[..., L, P]`` (any size ``> 0``;
        broadcast over the batch where it has no batch axes, e.g. ``[L, P]``; aligned with
        ``u``'s positions, also with ``reverse``). For LinOSS-IMEX and D-LinOSS a per-step
        size must lie in the scheme's stable range: :func:`flax_linoss.ops.clamp_steps`
        clamps it (the layers do). The scan table says which paths take it
        (``"chunked"`` does not; ``"auto"`` routes around it).
      b: ``[P, H]`` complex input matrix, or real ``[P, H, 2]`` (re, im) pairs.
      c: ``[H, P]`` complex output matrix, or real ``[H, P, 2]``.
      d: ``[H]`` real feed-through.
      g: ``[P]`` damping ``>= 0``, for ``discretization="damped"`` only.
      discretization: ``"im"``, ``"imex"`` or ``"damped"``.
      scan: a name of the scan table (:data:`flax_linoss.ops.SCANS`; see
        :mod:`flax_linoss.ops.table`), ``"auto"`` by default.
      initial_state: a :class:`LinOSSState` with ``[..., 2, P]`` leaves (broadcast over the
        batch), the state before the first processed step.
      return_state: also return the state after the last processed step.
      reverse: process the sequence from its last step to its first (for bidirectional
        models); outputs stay in the original order.
      mask: ``[..., L]`` bool, ``True`` = valid (a float or int mask counts non-zero as
        valid; a concrete float mask with NaN is refused). A masked step leaves the state
        unchanged (as if it were absent); its output is computed from the held state.
      segment_ids: ``[..., L]`` int; the state restarts from zero wherever the id changes
        between consecutive processed steps (packed sequences).
      sequence_axis: inside ``shard_map``, the mesh axis over which ``L`` is split: each
        shard scans its part from a zero state, the shards' end states are combined by a
        prefix over the shards with ``M^(L_shard)``, and each shard adds its incoming
        state's response in closed form. ``initial_state`` is the state before the whole
        sequence (the same on every shard); the returned state is the whole sequence's
        final state (the same on every shard). With a ``mask``, ``segment_ids`` (or a
        per-step ``dt``) each shard reduces its steps to one affine map instead (held steps
        are the identity, a segment start drops the state: a shard's first step too when
        its id differs from the previous shard's last), the maps are chained over the
        shards and each shard scans from its incoming state.
      check: ``True`` validates shapes and, when not traced, the values of ``a``, ``dt``,
        ``g`` (a host copy); ``"shapes"`` validates shapes only; ``False`` nothing.

    Returns:
      ``y [..., L, H]`` in ``u``'s dtype, and with ``return_state`` also the final
      :class:`LinOSSState` with ``[..., 2, P]`` leaves.
    """
    shapes, values = _checks.check_levels(check)
    if shapes:
        _checks.check_inputs(u, a, dt, b, c, d, g, discretization, values=values)
        if initial_state is not None:
            lead = tuple(np.shape(u)[:-2])
            _checks.check_state(initial_state, np.shape(a)[0], lead, name="initial_state")
        _checks.check_mask_values(mask)
    flagged = mask is not None or segment_ids is not None
    if oscillator_axis is not None:
        _checks.check_mesh_axis("oscillator_axis", oscillator_axis)
    path = resolve_scan(
        scan,
        flags=flagged,
        time_varying=_checks.time_varying(dt),
        dtype=_project.recurrence_dtype(a, dt, g),
    )
    variant = None
    if path == PALLAS:
        from flax_linoss.ops._scans import pallas

        variant = pallas.interpret_kernel()
    return _apply(
        u,
        a,
        dt,
        b,
        c,
        d,
        g,
        initial_state,
        mask,
        segment_ids,
        discretization=discretization,
        path=path,
        variant=variant,
        return_state=return_state,
        reverse=reverse,
        sequence_axis=sequence_axis,
        oscillator_axis=oscillator_axis,
    )


def _flat_state(state: LinOSSState | None, lead, num_osc: int, dtype):
    n = int(np.prod(lead)) if lead else 1
    if state is None:
        zero = jnp.zeros((n, 2 * num_osc), dtype)
        return zero, zero
    out = []
    for name, x in zip(("z", "y"), state):
        x = jnp.asarray(x)
        if x.shape[-2:] != (2, num_osc):
            raise ValueError(
                f"initial_state.{name} must have shape [..., 2, P] = [..., 2, {num_osc}], "
                f"got {x.shape}."
            )
        try:
            x = jnp.broadcast_to(x, (*lead, 2, num_osc))
        except ValueError as e:
            raise ValueError(
                f"initial_state.{name} of shape {x.shape} does not broadcast to the batch "
                f"shape {tuple(lead)}."
            ) from e
        out.append(x.reshape(n, 2 * num_osc).astype(dtype))
    return tuple(out)


def _flat_per_step(x, name: str, shape: tuple[int, ...], reverse: bool, time_axis: int = -1):
    """``x`` broadcast to ``shape`` (``[..., L]``, or ``[..., L, P]`` with ``time_axis=-2``),
    the batch flattened to ``[N, L(, P)]``, in processing order."""
    if x is None:
        return None
    x = jnp.asarray(x)
    if x.shape != shape:
        try:
            x = jnp.broadcast_to(x, shape)
        except ValueError as e:
            form = "[..., length]" if time_axis == -1 else "[..., length, P]"
            raise ValueError(
                f"`{name}` of shape {x.shape} does not match the input's {form} = {list(shape)}."
            ) from e
    x = x.reshape(-1, *shape[len(shape) + time_axis :])
    return jnp.flip(x, 1) if reverse else x


# Compiled as one program (cheap eager calls); inlined when called under an outer jit.
@functools.partial(
    jax.jit,
    static_argnames=(
        "discretization",
        "path",
        "variant",
        "return_state",
        "reverse",
        "sequence_axis",
        "oscillator_axis",
    ),
)
def _apply(
    u,
    a,
    dt,
    b,
    c,
    d,
    g,
    initial_state,
    mask,
    segment_ids,
    *,
    discretization,
    path: Scan,
    variant,
    return_state,
    reverse,
    sequence_axis,
    oscillator_axis,
):
    del variant  # only a cache key: which kernel the Pallas interpreter runs
    entry = SCAN_TABLE[path]
    *lead, length, feats = u.shape
    lead = tuple(lead)
    num_osc = a.shape[0]
    q = 2 * num_osc
    u_flat = u.reshape(-1, length, feats)
    n = u_flat.shape[0]
    if dt.ndim > 1:  # a transition per step: [N, L, Q], in the path's layout
        dt = _flat_per_step(dt, "dt", (*lead, length, num_osc), reverse, time_axis=-2)
        if entry.layout == LNQ:
            dt = jnp.swapaxes(dt, 0, 1)
    tr, rdt = _project.real_transition(a, dt, g, discretization)
    channels = entry.channels(n, q) if entry.channels is not None else q
    if channels != q:
        # Extra zero channels: zero coefficients and zero weights keep them exactly zero.
        tr = schemes.Transition(*(_project.pad_channels(x, channels) for x in tr))
    v = _project.project_in(u_flat[:, ::-1] if reverse else u_flat, b, rdt, entry.layout, channels)
    z0, y0 = (
        _project.pad_channels(x, channels) for x in _flat_state(initial_state, lead, num_osc, rdt)
    )
    valid = _flat_per_step(mask, "mask", (*lead, length), reverse)
    seg = _flat_per_step(segment_ids, "segment_ids", (*lead, length), reverse)
    resets = None if seg is None else resets_from_segments(seg)
    if sequence_axis is not None and seg is not None:  # a segment may start at the boundary
        resets = _seqpar.boundary_resets(seg, resets, sequence_axis, reverse)
    flags = Flags.of_valid(valid, resets)
    if sequence_axis is not None:
        ys, z_l, y_l = _seqpar.run(entry, tr, v, z0, y0, sequence_axis, reverse, flags)
    else:
        # Inside shard_map a replicated initial state starts loops whose carries vary with
        # the input: type it like the input (an exact no-op) so the loop types match.
        z0, y0 = (vary(x, varying_axes(v)) for x in (z0, y0))
        ys, z_l, y_l = entry.run(tr, v, z0, y0, flags)
    time_axis = 0 if entry.layout == LNQ else 1
    if reverse:
        ys = jnp.flip(ys, time_axis)
    out = _project.project_out(
        ys, c, d, u_flat, rdt, entry.layout, channels, oscillator_axis=oscillator_axis
    ).reshape(u.shape)
    if not return_state:
        return out
    final = LinOSSState(
        z_l[:, :q].reshape(*lead, 2, num_osc), y_l[:, :q].reshape(*lead, 2, num_osc)
    )
    return out, final


def linoss_step(
    state: LinOSSState,
    u_t: jnp.ndarray,
    a: jnp.ndarray,
    dt: jnp.ndarray,
    b: jnp.ndarray,
    c: jnp.ndarray,
    d: jnp.ndarray,
    *,
    g: jnp.ndarray | None = None,
    discretization: str = schemes.IM,
    check: bool | str = True,
):
    """One recurrence step for decoding; the same arithmetic as the ``"sequential"`` scan.

    Args:
      state: :class:`LinOSSState` with ``[..., 2, P]`` leaves (``[B, 2, P]`` typically).
      u_t: ``[..., H]`` input at this step.
      a, b, c, d, g, discretization: as in :func:`linoss_apply`.
      dt: ``[P]``, or this step's ``[..., P]`` (broadcasting to ``u_t``'s batch): the
        ``dt[..., t, :]`` of a time-varying :func:`linoss_apply`.
      check: as in :func:`linoss_apply` (``True``, ``"shapes"`` or ``False``).

    Returns:
      ``(next_state, y_t)`` with ``y_t [..., H]`` in ``u_t``'s dtype.
    """
    u_t = jnp.asarray(u_t)
    shapes, values = _checks.check_levels(check)
    if shapes:
        _checks.check_step_input(u_t)
        _checks.check_inputs(
            u_t[..., None, :], a, dt, b, c, d, g, discretization, values=values, step=True
        )
        _checks.check_state(state, np.shape(a)[0], tuple(u_t.shape[:-1]))
    return _step(state, u_t, a, dt, b, c, d, g, discretization=discretization)


@functools.partial(jax.jit, static_argnames=("discretization",))
def _step(state, u_t, a, dt, b, c, d, g, *, discretization):
    num_osc = a.shape[0]
    tr, rdt = _project.real_transition(a, dt, g, discretization)
    lead = u_t.shape[:-1]
    v = _project.project_in(u_t, b, rdt)
    z, y = (
        jnp.broadcast_to(x, (*lead, 2, num_osc)).reshape(*lead, 2 * num_osc).astype(rdt)
        for x in state
    )
    z, y = recurrence_step(tr, z, y, v)
    out = _project.project_out(y, c, d, u_t, rdt)
    return LinOSSState(z.reshape(*lead, 2, num_osc), y.reshape(*lead, 2, num_osc)), out
