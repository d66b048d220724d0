"""``scan="adjoint"``: one loop over time with a hand-written adjoint backward pass.

The forward pass is one ``fori_loop`` over the time axis of the ``[N, L, Q]`` array (no
transposes) that keeps every velocity; the backward pass is one more loop running the
exact adjoint recurrence (see :mod:`._common`) backwards, accumulating the gradients of
``M`` and ``f`` in the same loop (with per-step coefficients: writing each step's gradient).
Autodiff of ``lax.scan`` instead stores and replays generic per-step residuals. The fastest
pure-JAX path on CPU; loop-bound on accelerators (a ``fori_loop`` iteration costs
microseconds there). Takes both flags and per-step coefficients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flax_linoss.ops import schemes
from flax_linoss.ops._scans._common import (
    Flags,
    coefficients_at,
    flags_at,
    is_time_varying,
    recurrence_step,
    run_custom,
    with_adjoint,
)


def _forward(coeffs, v, z0, y0, flags):
    length = v.shape[1]

    def body(t, carry):
        z, y, zs, ys = carry
        hold, keep = flags_at(flags, t, v.dtype)
        if keep is not None:
            z, y = z * keep, y * keep
        tr = schemes.Transition(*coefficients_at(coeffs, t))
        zn, yn = recurrence_step(tr, z, y, jax.lax.dynamic_index_in_dim(v, t, 1, keepdims=False))
        if hold is not None:
            zn, yn = jnp.where(hold, z, zn), jnp.where(hold, y, yn)
        zs = jax.lax.dynamic_update_index_in_dim(zs, zn, t, 1)
        ys = jax.lax.dynamic_update_index_in_dim(ys, yn, t, 1)
        return zn, yn, zs, ys

    empty = jnp.zeros_like(v)
    _, _, zs, ys = jax.lax.fori_loop(0, length, body, (z0, y0, empty, empty))
    return ys, zs[:, -1], zs


def _backward(res, cts):
    coeffs, v, z0, y0, flags, ys, zs = res
    g_ys, g_zl = cts
    length = v.shape[1]
    varying = is_time_varying(coeffs)

    def previous(xs, x0, t):
        # x_{t-1}, with x_{-1} the initial state.
        prev = jax.lax.dynamic_index_in_dim(xs, jnp.maximum(t - 1, 0), 1, keepdims=False)
        return jnp.where(t == 0, x0, prev)

    def body(i, carry):
        # rho = k A^T lambda_{t+1} (plus the final-state cotangent); lambda_t = rho + e_y g_t.
        t = length - 1 - i
        rz, ry, g_v, acc = carry
        m11, m12, m21, m22, f1, f2 = coefficients_at(coeffs, t)
        hold, keep = flags_at(flags, t, v.dtype)
        lz = rz
        ly = ry + jax.lax.dynamic_index_in_dim(g_ys, t, 1, keepdims=False)
        vt = jax.lax.dynamic_index_in_dim(v, t, 1, keepdims=False)
        zp, yp = previous(zs, z0, t), previous(ys, y0, t)
        if keep is not None:
            zp, yp = zp * keep, yp * keep
        gv = f1 * lz + f2 * ly
        terms = (lz * zp, lz * yp, ly * zp, ly * yp, lz * vt, ly * vt)
        rz, ry = m11 * lz + m21 * ly, m12 * lz + m22 * ly
        if hold is not None:
            # A held step: identity transition, no forcing, no parameter gradient.
            gv = jnp.where(hold, 0.0, gv)
            terms = tuple(jnp.where(hold, 0.0, x) for x in terms)
            rz, ry = jnp.where(hold, lz, rz), jnp.where(hold, ly, ry)
        if keep is not None:
            rz, ry = rz * keep, ry * keep
        g_v = jax.lax.dynamic_update_index_in_dim(g_v, gv, t, 1)
        if varying:  # each step's own coefficients: its terms are their gradient
            acc = tuple(jax.lax.dynamic_update_index_in_dim(a, x, t, 1) for a, x in zip(acc, terms))
        else:
            acc = tuple(a + x for a, x in zip(acc, terms))
        return rz, ry, g_v, acc

    zero = jnp.zeros_like(z0)
    acc = (jnp.zeros_like(v),) * 6 if varying else (zero,) * 6
    init = (g_zl.astype(z0.dtype), zero, jnp.zeros_like(v), acc)
    rz, ry, g_v, acc = jax.lax.fori_loop(0, length, body, init)
    g_coeffs = acc if varying else tuple(jnp.sum(x, axis=0) for x in acc)
    return g_coeffs, g_v, rz, ry


_recurrence = with_adjoint(_forward, _backward)


def run(tr, v, z0, y0, flags: Flags | None):
    """``(ys [N, L, Q], z_L [N, Q], y_L [N, Q])`` for ``v [N, L, Q]``, ``z0, y0 [N, Q]``;
    ``tr``'s fields ``[Q]`` or per step ``[N, L, Q]``."""
    return run_custom(_recurrence, tr, v, z0, y0, flags)
