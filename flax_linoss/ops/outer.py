"""Outer-product oscillator recurrence: linear attention whose memory is made of oscillators.

Per head, a ``K x V`` state (``K`` key dims, ``V`` value dims) is driven by ``k_t v_t^T``
and read by ``q_t``, as in linear attention, H3 and gated linear attention; here every
entry of it is a LinOSS oscillator: key dim ``i`` of a head carries a position/velocity pair
``S[i, j] = (z, y)`` with the real 2x2 transition ``M_i`` and forcing ``f_i`` of a LinOSS
scheme (:mod:`flax_linoss.ops.schemes`, learned ``a_i``, ``dt_i`` and for D-LinOSS ``g_i``)::

    S_t[i, j] = M_i S_{t-1}[i, j] + f_i k_t[i] v_t[j]
    o_t[j]    = sum_i q_t[i] (c_i . S_t[i, j])

where ``c_i = (c_z, c_y)`` (``readout``) weighs the velocity and the position; by default
``c = (0, 1)``, the position, as the LinOSS layers read it. So
``o_t = sum_{s <= t} sum_i q_t[i] K_i(t - s) k_s[i] v_s`` with the second-order (damped,
oscillating) kernel ``K_i(tau) = c_i^T M_i^tau f_i`` in place of linear attention's
exponential decay. Reading the velocity (``c = (1, 0)``) gives a kernel that starts at its
largest value and, for a slow oscillator, stays nearly flat (``K(tau) ~ dt`` at ``a = 0``):
the form that recalls in context (``benchmarks/MIXERS.md``); the position's kernel starts
near zero and rises (``~ dt^2 (tau + 1)`` at ``a = 0``).

Two forms, equal up to rounding:

* :func:`outer_apply`, the training form: chunks of ``T`` steps; inside a chunk the exact
  quadratic form with a table of ``M_i^tau`` for ``tau <= T``, the
  state carried from chunk to chunk by a ``lax.scan`` over the chunks (``ceil(L / T)``
  steps on ``[N, heads, K, V]``). Everything is real float32 arithmetic (float64 with
  float64 parameters); the inputs may be bfloat16.
* On CPU, the same training form as a fused C++ kernel (``scan="native"``, what
  ``"auto"`` runs per device for a time-invariant ``dt``): the recurrence step by step,
  the state of each (batch row, head) in cache, its exact adjoint backwards with states
  recomputed from checkpoints (:func:`flax_linoss.ops._scans.native.outer_run`).
* :func:`outer_step`, the decoding form: one step, state in, state out.

Time-varying step sizes (``dt [..., L, H, K]``: a selective gate, or the gaps of
irregularly sampled timestamps) take a third form of the training path: the per-step
transitions ``M_{i,t}`` (a masked step the identity, a segment start zero) and, inside each
chunk, the products ``M_t ... M_{s+1} f_s`` built step by step (``T`` batched 2x2
products), with the same chunk-to-chunk carry.

Masks and packing as in :func:`flax_linoss.ops.linoss_apply`: a masked step leaves the
state unchanged (its output is read from the held state), which the training form gets
exactly by running each chunk on the clock of its valid steps (the lag between steps ``s``
and ``t`` is the number of valid steps in ``(s, t]``); ``segment_ids`` restart the state
from zero wherever the id changes between consecutive steps (block-diagonal inside a chunk,
the carried state dropped across a segment start).

Legend: ``N`` flattened batch, ``L`` length, ``H`` heads, ``K`` key dims per head, ``V``
value dims per head, ``T`` chunk length.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flax_linoss.ops import _auto, _checks, _seqpar, schemes
from flax_linoss.ops._scans import native
from flax_linoss.ops._scans._common import (
    Flags,
    fold_flags,
    matmul2,
    resets_from_segments,
    vary,
    varying_axes,
)

__all__ = [
    "DEFAULT_CHUNK",
    "OUTER_SCANS",
    "OuterState",
    "outer_apply",
    "outer_step",
    "outer_transition",
]

#: Default chunk length ``T`` of :func:`outer_apply` (capped at the sequence length).
DEFAULT_CHUNK = 8

#: The paths of :func:`outer_apply`: ``"chunked"`` (pure JAX, every platform),
#: ``"native"`` (the fused C++ kernels on CPU) and ``"auto"``.
OUTER_SCANS = ("auto", "chunked", "native")


class OuterState(NamedTuple):
    """The state of :func:`outer_apply` / :func:`outer_step`: one oscillator per entry.

    Attributes:
      z: ``[..., H, K, V]`` velocities.
      y: ``[..., H, K, V]`` positions.
    """

    z: jnp.ndarray
    y: jnp.ndarray

    @classmethod
    def zeros(
        cls, batch_shape, num_heads: int, key_dim: int, value_dim: int, dtype=jnp.float32
    ) -> OuterState:
        """A zero state for a batch of shape ``batch_shape``."""
        shape = (*tuple(batch_shape), num_heads, key_dim, value_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def _rdt(a, dt, g):
    return jnp.promote_types(
        jnp.float32, jnp.result_type(*[x for x in (a, dt, g) if x is not None])
    )


def outer_transition(a, dt, g=None, discretization: str = schemes.IM) -> schemes.Transition:
    """The per-(head, key dim) coefficients ``[H, K]`` in the recurrence dtype."""
    rdt = _rdt(a, dt, g)
    g = None if g is None else jnp.asarray(g).astype(rdt)
    return schemes.transition(
        jnp.asarray(a).astype(rdt), jnp.asarray(dt).astype(rdt), discretization, g
    )


# ----------------------------------------------------------------------------------------
# Checks at the boundary.


def _check(q, k, v, a, dt, g, readout, discretization, check, per_step=None):
    """``per_step``: the shape a per-step ``dt`` must broadcast to (``None``: ``[H, K]``
    only)."""
    shapes, values = _checks.check_levels(check)
    if not shapes:
        return
    schemes.check_discretization(discretization)
    q_shape, k_shape, v_shape = np.shape(q), np.shape(k), np.shape(v)
    if len(q_shape) < 2:
        raise ValueError(f"`q` must be [..., heads, key_dim], got shape {q_shape}.")
    if k_shape != q_shape:
        raise ValueError(f"`k` must have the shape of `q` {q_shape}, got {k_shape}.")
    if len(v_shape) != len(q_shape) or v_shape[:-1] != q_shape[:-1]:
        raise ValueError(
            f"`v` must be [..., heads, value_dim] with the leading axes of `q` "
            f"{list(q_shape[:-1])}, got {v_shape}."
        )
    hk = q_shape[-2:]
    if readout is not None and np.shape(readout) != (*hk, 2):
        raise ValueError(
            f"`readout` must have shape [heads, key_dim, 2] = {[*hk, 2]} (velocity and "
            f"position weights), got {np.shape(readout)}."
        )
    for name, x in (("a", a), ("dt", dt), ("g", g)):
        if x is None or np.shape(x) == hk:
            continue
        if name == "dt" and per_step is not None and _checks.broadcasts_to(np.shape(x), per_step):
            continue
        steps = "" if per_step is None else f", or per step broadcasting to {list(per_step)}"
        raise ValueError(
            f"`{name}` must have shape [heads, key_dim] = {list(hk)}{steps}, got {np.shape(x)}."
        )
    if discretization == schemes.DAMPED and g is None:
        raise ValueError("discretization='damped' (D-LinOSS) needs the damping `g`.")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise TypeError(f"`{name}` must be floating, got {jnp.result_type(x)}.")
    if values:
        _checks._check_values(a, dt, g)


def _per_step(dt, q_shape):
    """The shape a per-step ``dt`` broadcasts to: ``q``'s leading axes, ``[H, K]``."""
    return None if np.shape(dt) == tuple(q_shape[-2:]) else tuple(q_shape)


def _check_state(state, shape, name="initial_state"):
    if not isinstance(state, tuple) or len(state) != 2:
        raise TypeError(f"`{name}` must be an OuterState(z, y), got {type(state).__name__}.")
    for part, x in zip(("z", "y"), state):
        if not _checks.broadcasts_to(np.shape(x), shape):
            raise ValueError(
                f"`{name}.{part}` has shape {np.shape(x)}; expected [..., heads, key_dim, "
                f"value_dim] broadcasting to {list(shape)}."
            )


# ----------------------------------------------------------------------------------------
# The training form.


def outer_apply(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    a: jnp.ndarray,
    dt: jnp.ndarray,
    *,
    g: jnp.ndarray | None = None,
    discretization: str = schemes.IM,
    readout: jnp.ndarray | None = None,
    initial_state: OuterState | None = None,
    return_state: bool = False,
    mask: jnp.ndarray | None = None,
    segment_ids: jnp.ndarray | None = None,
    chunk: int | None = None,
    check: bool | str = True,
    sequence_axis: str | None = None,
    scan: str = "auto",
):
    """Runs the outer-product oscillator recurrence over a sequence (chunked form).

    Args:
      q, k: ``[..., L, H, K]`` queries and keys.
      v: ``[..., L, H, V]`` values.
      a: ``[H, K]`` stiffness, ``>= 0`` (constrained: see :func:`flax_linoss.ops.constrain`).
      dt: ``[H, K]`` time steps in ``(0, 1]``, or per step ``[..., L, H, K]`` (broadcast
        over the batch; each step's inside the scheme's stable range, see
        :func:`flax_linoss.ops.clamp_steps`).
      g: ``[H, K]`` damping ``>= 0``, for ``discretization="damped"`` only.
      discretization: ``"im"``, ``"imex"`` or ``"damped"``.
      readout: ``[H, K, 2]`` weights ``(c_z, c_y)`` of the velocity and the position that
        ``q`` reads (see the module docstring); ``None`` reads the position.
      initial_state: an :class:`OuterState` with ``[..., H, K, V]`` leaves (broadcast over
        the batch), the state before the first step; zero by default.
      return_state: also return the state after the last step.
      mask: ``[..., L]`` bool, ``True`` = valid; a masked step leaves the state unchanged.
      segment_ids: ``[..., L]`` int; the state restarts from zero before every step whose id
        differs from the previous step's (packed sequences).
      chunk: the chunk length ``T`` (default :data:`DEFAULT_CHUNK`, capped at ``L``).
      check: ``True`` validates shapes and, when not traced, the values of ``a``, ``dt``,
        ``g``; ``"shapes"`` shapes only; ``False`` nothing (as in ``linoss_apply``).
      sequence_axis: inside ``shard_map``, the mesh axis over which ``L`` is split (as for
        :func:`flax_linoss.ops.linoss_apply`): each shard runs its chunks from zero, the
        shards' maps (their end state from zero and the product of their chunks' decays)
        are shared and chained, and each shard's chunks then carry its incoming state.
        ``initial_state`` and the returned final state are the whole sequence's (the same
        on every shard); a segment starting at a shard boundary is found from the
        previous shard's last id.
      scan: ``"chunked"`` (pure JAX), ``"native"`` (the fused CPU kernels: a
        time-invariant ``dt``, no ``sequence_axis``; ``chunk`` does not apply) or
        ``"auto"``: ``"native"`` where it can run and code runs per device (a
        single-device process, or inside ``shard_map``: XLA cannot split a custom call over
        devices), else ``"chunked"``.

    Returns:
      ``o [..., L, H, V]`` in ``q``'s dtype, and with ``return_state`` the final
      :class:`OuterState` (``[..., H, K, V]``, in the recurrence dtype: float32, or float64
      with float64 parameters).
    """
    _check(q, k, v, a, dt, g, readout, discretization, check, _per_step(dt, np.shape(q)))
    *lead, length, heads, key_dim = np.shape(q)
    value_dim = np.shape(v)[-1]
    if length < 1:
        raise ValueError(f"`q` has no steps (length 0, shape {np.shape(q)}).")
    lead = tuple(lead)
    if initial_state is not None:
        _check_state(initial_state, (*lead, heads, key_dim, value_dim))
    for name, x in (("mask", mask), ("segment_ids", segment_ids)):
        if x is not None:
            _checks.check_per_step(name, x, (*lead, length))
    if chunk is None:
        chunk = DEFAULT_CHUNK
    if not isinstance(chunk, int | np.integer) or chunk < 1:
        raise ValueError(f"`chunk` must be a positive int, got {chunk!r}.")
    chunk = int(min(chunk, length))
    scan = _resolve_scan(scan, np.ndim(dt) > 2, sequence_axis)
    return _apply(
        q,
        k,
        v,
        a,
        dt,
        g,
        readout,
        initial_state,
        mask,
        segment_ids,
        discretization=discretization,
        chunk=chunk,
        return_state=return_state,
        axis=sequence_axis,
        scan=scan,
    )


def _resolve_scan(scan: str, per_step: bool, axis) -> str:
    """``"chunked"`` or ``"native"`` for ``scan`` (one of :data:`OUTER_SCANS`; see
    :func:`outer_apply`)."""
    obstacle = None
    if per_step:
        obstacle = "it takes a time-invariant `dt` (this one is per step)"
    elif axis is not None:
        obstacle = "it runs whole sequences (no `sequence_axis`)"
    return _auto.native_or("outer_apply", scan, "chunked", obstacle)


@functools.partial(
    jax.jit, static_argnames=("discretization", "chunk", "return_state", "axis", "scan")
)
def _apply(
    q,
    k,
    v,
    a,
    dt,
    g,
    readout,
    initial_state,
    mask,
    segment_ids,
    *,
    discretization,
    chunk,
    return_state,
    axis,
    scan="chunked",
):
    *lead, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    lead = tuple(lead)
    rdt = _rdt(a, dt, g)
    tr = outer_transition(a, dt, g, discretization)
    flat = lambda x, d: x.reshape(-1, length, heads, d).astype(rdt)
    qf, kf, vf = flat(q, key_dim), flat(k, key_dim), flat(v, value_dim)
    n = qf.shape[0]
    state_shape = (*lead, heads, key_dim, value_dim)
    if initial_state is None:
        z0 = y0 = jnp.zeros((n, heads, key_dim, value_dim), rdt)
    else:
        z0, y0 = (
            jnp.broadcast_to(jnp.asarray(x), state_shape)
            .reshape(n, heads, key_dim, value_dim)
            .astype(rdt)
            for x in initial_state
        )
    per_step = lambda x: (
        None if x is None else jnp.broadcast_to(x, (*lead, length)).reshape(n, length)
    )
    valid = per_step(mask)
    seg = per_step(segment_ids)
    starts = None if seg is None else resets_from_segments(seg)
    if axis is not None and seg is not None:  # a segment may start at the shard boundary
        starts = _seqpar.boundary_resets(seg, starts, axis, False)
    ro = None if readout is None else tuple(jnp.moveaxis(readout.astype(rdt), -1, 0))
    if scan == "native":
        cz, cy = (0.0, 1.0) if ro is None else ro
        coeffs = (*tr, cz, cy)
        coeffs = [
            jnp.broadcast_to(jnp.asarray(x, rdt), (heads, key_dim)).reshape(-1) for x in coeffs
        ]
        o, z_l, y_l = native.outer_run(coeffs, qf, kf, vf, z0, y0, Flags.of_valid(valid, starts))
    else:
        if np.ndim(dt) > 2:  # per step: [N, L, H, K] transitions, masks and restarts folded in
            full = (*lead, length, heads, key_dim)
            tr = tuple(jnp.broadcast_to(x, full).reshape(n, length, heads, key_dim) for x in tr)
            tr = _fold_steps(tr, valid, starts)
            pieces = _chunked_steps(qf, kf, vf, tr, ro, chunk)
        else:
            pieces = _chunked(qf, kf, vf, tr, ro, valid, starts, chunk)
        o, (z_l, y_l) = _finish(pieces, z0, y0, length, axis)
    o = o.reshape(*lead, length, heads, value_dim).astype(q.dtype)
    if not return_state:
        return o
    return o, OuterState(z_l.reshape(state_shape), y_l.reshape(state_shape))


def _chunked(q, k, v, tr, readout, valid, starts, chunk):
    """The chunks of a time-invariant recurrence, for :func:`_finish`: ``q, k [N, L, H,
    K]``, ``v [N, L, H, V]``; ``starts [N, L]`` (or ``None``) the segment starts.

    Works in the layout ``[N, H, C, T, .]`` (heads beside the batch), so every contraction
    is a batched matmul over ``(N, H, C)``.
    """
    n, length, heads, key_dim = q.shape
    rdt = q.dtype
    t = chunk
    c = -(-length // t)
    pad = c * t - length

    def chunks(x):  # [N, L, H, D] -> [N, H, C, T, D] (zero padded)
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
        return jnp.transpose(x.reshape(n, c, t, heads, x.shape[-1]), (0, 3, 1, 2, 4))

    # The clock: valid steps counted inside each chunk (padding is invalid), and the run
    # (segment) of every step; [N or 1, C, T].
    if valid is None:
        w = (jnp.arange(c * t) < length).astype(jnp.int32).reshape(1, c, t)
    else:
        w = jnp.pad(valid.astype(jnp.int32), ((0, 0), (0, pad))).reshape(n, c, t)
    count = jnp.cumsum(w, axis=-1)  # valid steps in the chunk up to and including t
    total = count[..., -1]  # [., C]
    run = None
    if starts is not None:  # the run (segment) of every step; padding starts none
        run = jnp.cumsum(jnp.pad(starts.astype(jnp.int32), ((0, 0), (0, pad))), axis=1)
        run = run.reshape(n, c, t)

    # Tables over the lag tau: M^tau (tau = 0 .. T) and K_tau = M^tau f (tau < T), [T(+1), H, K].
    p11, p12, p21, p22 = _table(tuple(tr)[:4], t + 1)
    gz = p11[:t] * tr.f1 + p12[:t] * tr.f2
    gy = p21[:t] * tr.f1 + p22[:t] * tr.f2
    # What q reads: y, or cz z + cy y. The kernel K(tau) and the rows that read the carry.
    if readout is None:
        kern, rows = gy, (p21, p22)
    else:
        cz, cy = readout
        kern = cz * gz + cy * gy
        rows = (cz * p11 + cy * p21, cz * p12 + cy * p22)

    def lookup(idx, *tables):
        """``tables[j][idx]`` as ``[., H, C, T, K]`` for ``idx [., C, T]``, by a one-hot
        matmul (no gather: its gradient would be a scatter)."""
        onehot = jax.nn.one_hot(idx, tables[0].shape[0], dtype=rdt)
        both = jnp.concatenate([x.reshape(x.shape[0], -1) for x in tables], axis=1)
        out = (onehot @ both).reshape(*idx.shape, len(tables), heads, key_dim)
        return [jnp.moveaxis(out[..., i, :, :], -2, 1) for i in range(len(tables))]

    qc, kc, vc = chunks(q), chunks(k), chunks(v)  # [N, H, C, T, D]
    wc = w.astype(rdt)[:, None, :, :, None]  # [., 1, C, T, 1]
    kc = kc * wc  # masked (and padded) steps force nothing

    # Inside each chunk, scores A[t, s] = sum_i q_t[i] K_i(lag) k_s[i] for s <= t in the same
    # run, lag = count_t - count_s < T: every candidate lag j as one matmul, then the one
    # that applies (a one-hot selection).
    lag = count[..., :, None] - count[..., None, :]  # [., C, T, T]
    allowed = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
    if run is not None:
        allowed = allowed & (run[..., :, None] == run[..., None, :])
    pick = jax.nn.one_hot(jnp.where(allowed, lag, -1), t, dtype=rdt)  # [., C, T, T(s), T(j)]
    qj = qc[:, :, :, :, None, :] * jnp.transpose(kern, (1, 0, 2))[:, None, None]  # [N,H,C,T,J,K]
    cand = jnp.matmul(qj.reshape(n, heads, c, t * t, key_dim), jnp.swapaxes(kc, -1, -2)).reshape(
        n, heads, c, t, t, t
    )  # [N, H, C, T(t), T(j), T(s)]
    scores = jnp.einsum("nhctjs,nctsj->nhcts", cand, jnp.broadcast_to(pick, (n, c, t, t, t)))
    o = jnp.matmul(scores, vc)  # [N, H, C, T, V]

    # Each chunk's end state from a zero start: sum_s M^(total - count_s) f k_s v_s^T.
    ez, ey = lookup(total[..., None] - count, gz, gy)  # [., H, C, T, K]
    to_end = wc
    if run is not None:
        to_end = to_end * (run == run[..., -1:]).astype(rdt)[:, None, :, :, None]
    kend = jnp.concatenate([ez, ey], axis=-1) * jnp.concatenate([kc, kc], -1) * to_end
    w_end = jnp.matmul(jnp.swapaxes(kend, -1, -2), vc)  # [N, H, C, 2K, V]
    # The carried state's decay over a chunk: M^total, dropped across a segment start.
    dmat = lookup(total[..., None], p11, p12, p21, p22)  # each [., H, C, 1, K]
    if run is None:
        keep = jnp.ones((1, 1, c, 1, 1), rdt)
        run_before = None
    else:
        run_before = jnp.concatenate([jnp.zeros((n, 1), jnp.int32), run[:, :-1, -1]], axis=1)
        keep = (run[..., -1] == run_before).astype(rdt)[:, None, :, None, None]
    dmat = [jnp.broadcast_to(x * keep, (n, heads, c, 1, key_dim))[:, :, :, 0] for x in dmat]

    # Every step reads the carried state advanced by its clock: e_read^T M^count S.
    r21, r22 = lookup(count, *rows)  # [., H, C, T, K]
    read = jnp.concatenate([r21, r22], -1) * jnp.concatenate([qc, qc], -1)
    if run is not None:
        read = read * (run == run_before[..., None]).astype(rdt)[:, None, :, :, None]
    return _Pieces(o, read, tuple(dmat), w_end)


class _Pieces(NamedTuple):
    """A chunked form's work before the chunk-to-chunk carry (``[N, H, C, ...]``): the
    outputs from inside the chunks ``o [., T, V]``, what each step reads of the state
    carried into its chunk ``read [., T, 2K]``, each chunk's decay (four ``[., K]``) and
    its end state from zero ``w_end [., 2K, V]``."""

    o: jnp.ndarray
    read: jnp.ndarray
    decay: tuple
    w_end: jnp.ndarray


def _finish(pieces: _Pieces, z0, y0, length: int, axis):
    """``(o [N, L, H, V], final state)``: the state carried from chunk to chunk from ``(z0,
    y0)`` (under ``axis``, from the state this shard receives) and read by every step."""
    o, read, decay, w_end = pieces
    final = None
    if axis is not None:
        (z0, y0), final = _shard_start(decay, w_end, z0, y0, axis)
    # Inside shard_map the chunk loop's carry must vary where the pieces do.
    z0, y0 = (vary(x, varying_axes(*pieces)) for x in (z0, y0))
    (z_l, y_l), before = _carry(z0, y0, decay, w_end)  # before: [N, H, C, 2K, V]
    o = o + jnp.matmul(read, before)
    n, heads, c, t, _ = o.shape
    o = jnp.transpose(o, (0, 2, 3, 1, 4)).reshape(n, c * t, heads, -1)[:, :length]
    return o, ((z_l, y_l) if final is None else final)


def _shard_start(decay, w_end, z0, y0, axis):
    """Sequence parallelism: ``(the state into this shard, the whole sequence's final
    state)``. Each shard's map ``S_out = D S_in + e`` (``D`` the product of its chunks'
    decays, ``e`` its end state from zero) is shared over ``axis`` and chained from the
    initial state ``(z0, y0)``."""
    zero = vary(jnp.zeros_like(z0), varying_axes(decay, w_end))
    end, _ = _carry(zero, zero, decay, w_end)

    def compose(acc, d):  # D_c ... D_0
        return matmul2(d, acc), None

    one, nil = jnp.ones_like(decay[0][:, :, 0]), jnp.zeros_like(decay[0][:, :, 0])
    step_axis = lambda x: jnp.moveaxis(x, 2, 0)  # [N, H, C, K] -> [C, N, H, K]
    total, _ = jax.lax.scan(compose, (one, nil, nil, one), tuple(map(step_axis, decay)))
    return _seqpar.fold_shards(_seqpar.affine_chain, (z0, y0), (total, end), axis)


def _table(m, n: int):
    """``m^j`` for ``j = 0 .. n-1`` (four ``[n, H, K]``) by ``n - 1`` plain products.

    A chunk is short, so ``j`` roundings stay at the level of the products that use the
    table; the long scans' compensated powers (:func:`._scans._common.powers`) would cost
    a double-word loop and its gradient, about half of this form's compile time.
    """
    one, zero = jnp.ones_like(m[0]), jnp.zeros_like(m[0])
    rows = [(one, zero, zero, one)]
    for _ in range(n - 1):
        rows.append(matmul2(m, rows[-1]))
    return tuple(jnp.stack(x) for x in zip(*rows))


def _fold_steps(tr, valid, starts):
    """Per-step coefficients ``[N, L, H, K]`` with the flags folded in: a masked step is
    the identity (the state held, nothing forced), a segment start (``starts [N, L]``)
    drops what came before (``M = 0``)."""
    per_entry = lambda f: None if f is None else f[..., None, None]
    hold = None if valid is None else ~valid.astype(bool)
    return tuple(fold_flags(tr, per_entry(hold), per_entry(starts)))


def _chunked_steps(q, k, v, tr, readout, chunk):
    """:func:`_chunked` for per-step coefficients ``tr`` (six ``[N, L, H, K]``, flags
    folded in).

    Inside a chunk, ``G[t, s] = M_t ... M_{s+1} f_s`` (``G[s, s] = f_s``, zero for ``s >
    t``) and ``P_t = M_t ... M_0`` are built step by step; the scores are ``A[t, s] = sum_i
    q_t[i] c_i^T G[t, s, i] k_s[i]``, a chunk's end state from zero ``sum_s G[T-1, s] k_s
    v_s^T``, its decay ``P_{T-1}``, and step ``t`` reads the carried state through
    ``c^T P_t``.
    """
    n, length, heads, _ = q.shape
    t = chunk
    c = -(-length // t)
    pad = c * t - length

    def chunks(x, fill=0):  # [N, L, H, D] -> [N, H, C, T, D], padded with `fill`
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)), constant_values=fill)
        return jnp.transpose(x.reshape(n, c, t, heads, x.shape[-1]), (0, 3, 1, 2, 4))

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    # Padding steps are the identity: the state after the last step is carried unchanged.
    m = [chunks(x, fill) for x, fill in zip(tr[:4], (1, 0, 0, 1))]
    f1, f2 = chunks(tr[4]), chunks(tr[5])
    cz, cy = (0, 1) if readout is None else (x[:, None, None, :] for x in readout)  # [H,1,1,K]
    cz, cy = (jnp.asarray(x, q.dtype) for x in (cz, cy))
    first = jnp.arange(t)[:, None]  # s, against the step j being added
    step_axis = lambda x: jnp.moveaxis(x, 3, 0)  # [N, H, C, T, D] -> [T, N, H, C, D]

    def add_step(carry, xs):
        """Step ``j`` of every chunk: ``G[j, s] = M_j G[j-1, s]`` (``f_j`` at ``s = j``),
        ``P_j = M_j P_{j-1}``; emits row ``j`` of the scores and what ``q_j`` reads."""
        (gz, gy), p = carry  # G over s: [N, H, C, T(s), K]; P: four [N, H, C, K]
        j, e11, e12, e21, e22, g1, g2, q_j = xs  # [N, H, C, K] each (j a scalar)
        b = lambda x: x[..., None, :]
        gz, gy = b(e11) * gz + b(e12) * gy, b(e21) * gz + b(e22) * gy
        gz = jnp.where(first == j, b(g1), gz)
        gy = jnp.where(first == j, b(g2), gy)
        row = jnp.sum(b(q_j) * (cz * gz + cy * gy) * kc, -1)  # [N, H, C, T(s)]
        p = matmul2((e11, e12, e21, e22), p)
        c0 = lambda x: x[..., 0, :] if jnp.ndim(x) else x  # [H, 1, 1, K] -> [H, 1, K]
        read = jnp.concatenate([c0(cz) * p[0] + c0(cy) * p[2], c0(cz) * p[1] + c0(cy) * p[3]], -1)
        return ((gz, gy), p), (row, read)

    ones = jnp.ones_like(kc[..., 0, :])
    zeros = jnp.zeros_like(ones)
    xs = (jnp.arange(t), *map(step_axis, (*m, f1, f2, qc)))
    ((gz, gy), p), (scores, read) = jax.lax.scan(
        add_step, ((jnp.zeros_like(kc), jnp.zeros_like(kc)), (ones, zeros, zeros, ones)), xs
    )
    scores = jnp.moveaxis(scores, 0, 3)  # [N, H, C, T(t), T(s)]
    o = jnp.matmul(scores, vc)
    # Each chunk's end state from zero (G of its last step) and its decay P_{T-1}.
    kend = jnp.concatenate([gz * kc, gy * kc], -1)  # [N, H, C, T, 2K]
    w_end = jnp.matmul(jnp.swapaxes(kend, -1, -2), vc)  # [N, H, C, 2K, V]
    read = jnp.moveaxis(read, 0, 3) * jnp.concatenate([qc, qc], -1)  # [N, H, C, T, 2K]
    return _Pieces(o, read, p, w_end)  # a chunk's decay: P_{T-1}


def _carry(z0, y0, decay, w_end):
    """The state from chunk to chunk: ``S_c = D_c S_{c-1} + W_c`` for each chunk's decay
    ``D_c`` (four ``[N, H, C, K]``) and end state from zero ``W_c [N, H, C, 2K, V]``.
    Returns ``((z_L, y_L), the state before each chunk [N, H, C, 2K, V])``."""
    key_dim = z0.shape[-2]

    def step(state, xs):  # state: [N, H, K, V] each
        *d, wk = xs
        chunk_map = (d, (wk[..., :key_dim, :], wk[..., key_dim:, :]))
        return _seqpar.affine_chain(state, chunk_map), jnp.concatenate(state, axis=-2)

    move = lambda x: jnp.moveaxis(x, 2, 0)
    final, before = jax.lax.scan(step, (z0, y0), tuple(map(move, (*decay, w_end))))
    return final, jnp.moveaxis(before, 0, 2)


# ----------------------------------------------------------------------------------------
# The decoding form.


def outer_step(
    state: OuterState,
    q_t: jnp.ndarray,
    k_t: jnp.ndarray,
    v_t: jnp.ndarray,
    a: jnp.ndarray,
    dt: jnp.ndarray,
    *,
    g: jnp.ndarray | None = None,
    discretization: str = schemes.IM,
    readout: jnp.ndarray | None = None,
    mask: jnp.ndarray | None = None,
    check: bool | str = True,
):
    """One step of the recurrence, for decoding.

    Args:
      state: :class:`OuterState` with ``[..., H, K, V]`` leaves (float32; see
        :meth:`OuterState.zeros`).
      q_t, k_t: ``[..., H, K]``; ``v_t``: ``[..., H, V]``.
      a, dt, g, discretization, readout: as in :func:`outer_apply` (a per-step ``dt``:
        this step's, ``[..., H, K]``).
      mask: ``[...]`` bool; ``False`` leaves the state unchanged (the output is read from
        it).
      check: as in :func:`outer_apply`.

    Returns:
      ``(next_state, o_t)`` with ``o_t [..., H, V]`` in ``q_t``'s dtype and the state in the
      recurrence dtype.
    """
    _check(q_t, k_t, v_t, a, dt, g, readout, discretization, check, _per_step(dt, np.shape(q_t)))
    shape = (*np.shape(q_t), np.shape(v_t)[-1])
    if _checks.check_levels(check)[0]:
        _check_state(state, shape, "state")
    return _step(state, q_t, k_t, v_t, a, dt, g, readout, mask, discretization=discretization)


@functools.partial(jax.jit, static_argnames=("discretization",))
def _step(state, q_t, k_t, v_t, a, dt, g, readout, mask, *, discretization):
    rdt = _rdt(a, dt, g)
    tr = outer_transition(a, dt, g, discretization)
    m11, m12, m21, m22, f1, f2 = (x[..., None] for x in tr)  # [H, K, 1]
    z, y = (jnp.asarray(x).astype(rdt) for x in state)
    kv = k_t.astype(rdt)[..., None] * v_t.astype(rdt)[..., None, :]  # [..., H, K, V]
    zn = m11 * z + m12 * y + f1 * kv
    yn = m21 * z + m22 * y + f2 * kv
    if mask is not None:
        keep = jnp.asarray(mask, bool)[..., None, None, None]
        zn, yn = jnp.where(keep, zn, z), jnp.where(keep, yn, y)
    read = yn
    if readout is not None:
        cz, cy = (x[..., None] for x in jnp.moveaxis(readout.astype(rdt), -1, 0))
        read = cz * zn + cy * yn
    o = jnp.einsum("...hk,...hkv->...hv", q_t.astype(rdt), read)
    return OuterState(zn, yn), o.astype(q_t.dtype)
