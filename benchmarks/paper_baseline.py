"""A transcription of the papers' published LinOSS algorithm, used only as a benchmark baseline.

This follows the structure of the official code (not its text): per example (``vmap`` over
the batch), complex ``B u_n`` for every step, the constant transition ``M`` materialised as
``[L, 4P]`` copies, the forcing as ``[L, 2P]`` complex, a ``vmap``-ed 2x2 binary operator in
``lax.associative_scan``, then complex ``C y_n``. It is deliberately *not* optimised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.vmap
def _binary_operator(q_i, q_j):
    a_i, b_i = q_i
    a_j, b_j = q_j
    n = a_i.size // 4
    i11, i12, i21, i22 = a_i[:n], a_i[n : 2 * n], a_i[2 * n : 3 * n], a_i[3 * n :]
    j11, j12, j21, j22 = a_j[:n], a_j[n : 2 * n], a_j[2 * n : 3 * n], a_j[3 * n :]
    a_new = jnp.concatenate(
        [
            j11 * i11 + j12 * i21,
            j11 * i12 + j12 * i22,
            j21 * i11 + j22 * i21,
            j21 * i12 + j22 * i22,
        ]
    )
    b1, b2 = b_i[:n], b_i[n:]
    b_new = jnp.concatenate([j11 * b1 + j12 * b2, j21 * b1 + j22 * b2])
    return a_new, b_new + b_j


def _transition(a, dt, g, discretization):
    if discretization == "im":
        s = 1.0 / (1.0 + dt**2 * a)
        m = (1.0 - dt**2 * a * s, -dt * a * s, dt * s, s)
        return m, (m[0] * dt, m[2] * dt)
    if discretization == "imex":
        m = (jnp.ones_like(a), -dt * a, dt, 1.0 - dt**2 * a)
        return m, (dt, dt**2)
    s = 1.0 + dt * g
    m = (1.0 / s, -dt * a / s, dt / s, 1.0 - dt**2 * a / s)
    return m, (dt / s, dt**2 / s)


def _single_sequence(u, a, dt, g, b_complex, c_complex, d, discretization):
    bu = jax.vmap(lambda x: b_complex @ x)(u)  # [L, P] complex
    (m11, m12, m21, m22), (f1, f2) = _transition(a, dt, g, discretization)
    m = jnp.concatenate([m11, m12, m21, m22])
    m_elements = m * jnp.ones((u.shape[0], 4 * a.shape[0]))
    f = jnp.hstack((f1 * bu, f2 * bu))
    _, xs = jax.lax.associative_scan(_binary_operator, (m_elements, f))
    ys = xs[:, a.shape[0] :]
    y = jax.vmap(lambda x: (c_complex @ x).real)(ys)
    return y + jax.vmap(lambda x: d * x)(u)


def paper_linoss_apply(u, a, dt, b, c, d, *, g=None, discretization="im"):
    """Baseline forward pass. ``u [B, L, H]``, ``b [P, H, 2]``, ``c [H, P, 2]`` real pairs."""
    b_complex = b[..., 0] + 1j * b[..., 1]
    c_complex = c[..., 0] + 1j * c[..., 1]
    fn = lambda x: _single_sequence(x, a, dt, g, b_complex, c_complex, d, discretization)
    return jax.vmap(fn)(u)
