"""``scan="associative"``: a parallel prefix scan, ``O(log L)`` depth.

Without flags and with a fixed ``dt``, ``M`` is time-invariant and the scan is Hillis-Steele
needing only ``M^(2^i)`` per level (no per-step copies of ``M``, unlike the papers' code),
in a ``fori_loop`` (small programs, fast compiles), with the adjoint recurrence solved the
same way for the backward pass. With flags and a fixed ``dt`` (a held step's transition is
the identity, a reset's zero) it is ``lax.associative_scan`` over per-step elements whose
transition is ``M^c`` or zero, looked up in a table of powers (see ``_flagged``); with
per-step coefficients, over per-step ``(A_t, b_t)`` pairs; both differentiated by
autodiff. It partitions under a multi-device ``jit``; ``auto`` uses it for flagged and
time-varying inputs there on accelerators, where ``chunked`` cannot take them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flax_linoss.ops._scans._common import (
    Flags,
    coefficient_grads,
    is_time_varying,
    powers,
    prefix_scan,
    run_custom,
    transpose2,
    with_adjoint,
)


def _forward(coeffs, v, z0, y0, flags):
    del flags
    m11, m12, m21, m22, f1, f2 = coeffs
    b1 = (f1 * v).at[:, 0].add(m11 * z0 + m12 * y0)
    b2 = (f2 * v).at[:, 0].add(m21 * z0 + m22 * y0)
    zs, ys = prefix_scan((m11, m12, m21, m22), b1, b2)
    return ys, zs[:, -1], zs


def _backward(res, cts):
    coeffs, v, z0, y0, _, ys, zs = res
    g_ys, g_zl = cts
    m11, m12, m21, m22, f1, f2 = coeffs
    # lambda_t = M^T lambda_{t+1} + (0, g_t), with the final-state cotangent entering at L-1.
    c1 = jnp.zeros_like(g_ys).at[:, -1].add(g_zl.astype(g_ys.dtype))
    lz, ly = prefix_scan(transpose2(coeffs[:4]), c1[:, ::-1], g_ys[:, ::-1])
    lz, ly = lz[:, ::-1], ly[:, ::-1]
    z_prev = jnp.concatenate([z0[:, None], zs[:, :-1]], axis=1)
    y_prev = jnp.concatenate([y0[:, None], ys[:, :-1]], axis=1)
    g_coeffs = coefficient_grads(lz, ly, z_prev, y_prev, v)
    g_v = f1 * lz + f2 * ly
    g_z0 = m11 * lz[:, 0] + m21 * ly[:, 0]
    g_y0 = m12 * lz[:, 0] + m22 * ly[:, 0]
    return g_coeffs, g_v, g_z0, g_y0


_parallel = with_adjoint(_forward, _backward)


def _flagged(tr, v, z0, y0, flags: Flags):
    length = v.shape[1]
    # With flags every step's transition is the identity (held), M, or zero (a reset), so
    # the transition of any run of steps is M^c (c: the run's unheld steps) or zero: an
    # element is (c [N, L] int32, zeroed [N, L] bool, b), and the combine looks M^c up in a
    # table of M^0 .. M^L per channel (double-word products, each power rounded once; the
    # table is 4 / N times the size of the input). Multiplying the per-step matrices out
    # in float32 instead compounds like repeated squaring of M: it drifted and, near a
    # double eigenvalue, overflowed at L = 10^5.
    table = powers(tuple(tr)[:4], length + 1)  # four [L + 1, Q]
    shape = v.shape[:2]
    hold = jnp.zeros(shape, bool) if flags.hold is None else flags.hold
    zeroed = jnp.zeros(shape, bool) if flags.reset is None else flags.reset
    count = jnp.where(hold, 0, 1).astype(jnp.int32)
    # A held step: identity transition, no forcing.
    b1 = jnp.where(hold[..., None], 0.0, tr.f1 * v)
    b2 = jnp.where(hold[..., None], 0.0, tr.f2 * v)

    def transition(c, z):
        """``M^c`` (zero where ``z``) for counts ``c [N, L']``: four ``[N, L', Q]``."""
        return tuple(jnp.where(z[..., None], 0.0, jnp.take(p, c, axis=0)) for p in table)

    # Fold the initial state into the first element: x_0 = A_0 x_init + b_0.
    p = transition(count[:, :1], zeroed[:, :1])
    b1 = b1.at[:, :1].add(p[0] * z0[:, None] + p[1] * y0[:, None])
    b2 = b2.at[:, :1].add(p[2] * z0[:, None] + p[3] * y0[:, None])

    def combine(earlier, later):
        c_i, z_i, x1_i, x2_i = earlier
        c_j, z_j, x1_j, x2_j = later
        m11, m12, m21, m22 = transition(c_j, z_j)
        x1 = m11 * x1_i + m12 * x2_i + x1_j
        x2 = m21 * x1_i + m22 * x2_i + x2_j
        return c_i + c_j, z_i | z_j, x1, x2

    _, _, zs, ys = jax.lax.associative_scan(combine, (count, zeroed, b1, b2), axis=1)
    return ys, zs[:, -1], ys[:, -1]


def _varying(tr, v, z0, y0, flags: Flags | None):
    length, q = v.shape[1:]
    # Elements (A [., L, 2, 2, Q], b [N, L, 2, Q]): two stacked leaves keep the scan's graph
    # (and its compile time) small. A is shared across the batch until a flag or per-step
    # coefficients make it vary.
    m = jnp.stack([jnp.stack([tr.m11, tr.m12], -2), jnp.stack([tr.m21, tr.m22], -2)], -3)
    if is_time_varying(tr):
        a = m  # [N, L, 2, 2, Q]
    else:
        a = jnp.broadcast_to(m, (1, length, 2, 2, q))
    b = jnp.stack([tr.f1 * v, tr.f2 * v], axis=2)  # [N, L, 2, Q]
    flags = flags or Flags(None, None)
    if flags.hold is not None:
        # A held step: identity transition, no forcing.
        hold = flags.hold[:, :, None, None, None]
        a = jnp.where(hold, jnp.eye(2, dtype=v.dtype)[:, :, None], a)
        b = jnp.where(hold[..., 0], jnp.zeros((), v.dtype), b)
    if flags.reset is not None:
        a = a * jnp.logical_not(flags.reset)[:, :, None, None, None].astype(v.dtype)
    # Fold the initial state into the first element: x_0 = A_0 x_init + b_0.
    x0 = jnp.stack([z0, y0], axis=1)  # [N, 2, Q]
    b = b.at[:, 0].add(jnp.einsum("nijq,njq->niq", a[:, 0], x0))

    def combine(earlier, later):
        a_i, b_i = earlier
        a_j, b_j = later
        a_new = jnp.einsum("...ijq,...jkq->...ikq", a_j, a_i)
        b_new = jnp.einsum("...ijq,...jq->...iq", a_j, b_i) + b_j
        return a_new, b_new

    _, xs = jax.lax.associative_scan(combine, (a, b), axis=1)
    zs, ys = xs[:, :, 0], xs[:, :, 1]
    return ys, zs[:, -1], ys[:, -1]


def run(tr, v, z0, y0, flags: Flags | None):
    """``(ys [N, L, Q], z_L [N, Q], y_L [N, Q])`` for ``v [N, L, Q]``, ``z0, y0 [N, Q]``;
    ``tr``'s fields ``[Q]`` or per step ``[N, L, Q]``."""
    if is_time_varying(tr):
        return _varying(tr, v, z0, y0, flags)
    if flags is None:
        return run_custom(_parallel, tr, v, z0, y0, None)
    return _flagged(tr, v, z0, y0, flags)
