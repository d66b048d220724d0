"""A plain step-by-step float64 reference of the three schemes, written from the equations.

It deliberately shares nothing with ``flax_linoss.ops``: complex arithmetic, the implicit
equations solved per step as written in the papers, no transition matrices.
"""

import jax
import jax.numpy as jnp
import numpy as np


def reference_step(z, y, bu, a, dt, g, discretization):
    """One step from the scheme's equations; all complex ``[..., P]``."""
    if discretization == "im":
        # z_n = z + dt(-a y_n + Bu), y_n = y + dt z_n  =>  y_n (1 + dt^2 a) = y + dt z + dt^2 Bu
        y_new = (y + dt * z + dt**2 * bu) / (1 + dt**2 * a)
        z_new = z + dt * (-a * y_new + bu)
    elif discretization == "imex":
        z_new = z + dt * (-a * y + bu)
        y_new = y + dt * z_new
    else:
        # z_n = z + dt(-a y - g z_n + Bu)  =>  z_n (1 + dt g) = z + dt(-a y + Bu)
        z_new = (z + dt * (-a * y + bu)) / (1 + dt * g)
        y_new = y + dt * z_new
    return z_new, y_new


def reference_apply(
    u, a, dt, b, c, d, g=None, *, discretization, z0=None, y0=None, valid=None, segment_ids=None
):
    """``u [B, L, H]``, real-pair ``b [P, H, 2]``, ``c [H, P, 2]``; returns (out, z_L, y_L).

    ``dt`` is ``[P]`` (the same step everywhere) or per step ``[L, P]`` / ``[B, L, P]``: step
    ``t`` then uses ``dt[..., t, :]`` in the scheme's equations.

    ``valid [B, L]`` (a ``False`` step is skipped: the state stays as it was) and
    ``segment_ids [B, L]`` (the state restarts from zero where the id changes) as written in
    the docs, step by step. Must be called under ``jax.enable_x64(True)``; everything is cast
    to float64/complex128.
    """
    f64 = lambda x: None if x is None else jnp.asarray(x, jnp.float64)
    u, a, dt, g, d = f64(u), f64(a), f64(dt), f64(g), f64(d)
    b = f64(b)[..., 0] + 1j * f64(b)[..., 1]
    c = f64(c)[..., 0] + 1j * f64(c)[..., 1]
    batch, _, _ = u.shape
    num_osc = a.shape[0]
    zero = jnp.zeros((batch, num_osc), jnp.complex128)
    z0 = zero if z0 is None else jnp.asarray(z0, jnp.complex128)
    y0 = zero if y0 is None else jnp.asarray(y0, jnp.complex128)

    length = u.shape[1]
    dt_steps = jnp.broadcast_to(dt if dt.ndim > 1 else dt[None], (batch, length, num_osc))
    valid = jnp.ones((batch, length), bool) if valid is None else jnp.asarray(valid, bool)
    seg = jnp.zeros((batch, length), int) if segment_ids is None else jnp.asarray(segment_ids)
    new_segment = jnp.concatenate([jnp.zeros((batch, 1), bool), seg[:, 1:] != seg[:, :-1]], 1)

    def body(carry, inp):
        z, y = carry
        u_t, ok, restart, dt_t = inp
        z = jnp.where(restart[:, None], 0.0, z)
        y = jnp.where(restart[:, None], 0.0, y)
        bu = u_t @ b.T  # [B, P]
        z_new, y_new = reference_step(z, y, bu, a, dt_t, g, discretization)
        z = jnp.where(ok[:, None], z_new, z)
        y = jnp.where(ok[:, None], y_new, y)
        return (z, y), jnp.real(y @ c.T) + d * u_t

    steps = (jnp.swapaxes(u, 0, 1), valid.T, new_segment.T, jnp.swapaxes(dt_steps, 0, 1))
    (z_l, y_l), out = jax.lax.scan(body, (z0, y0), steps)
    return jnp.swapaxes(out, 0, 1), z_l, y_l


def random_steps(seed, shape, discretization, a, g=None):
    """Random per-step sizes ``[..., L, P]`` in ``(0.1, 2)`` (beyond ``(0, 1]``: gaps between
    timestamps), within each scheme's stable range for ``a``, ``g`` (as float32 numpy)."""
    rng = np.random.default_rng(seed)
    dt = rng.uniform(0.1, 2.0, shape)
    a = np.asarray(a, np.float64)
    if discretization == "imex":  # dt^2 a <= 3.5 < 4
        dt = np.minimum(dt, np.sqrt(3.5 / np.maximum(a, 1e-9)))
    if discretization == "damped":  # dt^2 a < 2 (2 + dt g): eigenvalue moduli < 1
        g = np.asarray(g, np.float64)
        dt = np.minimum(dt, 0.9 * (g + np.sqrt(g**2 + 4 * a)) / np.maximum(a, 1e-9))
    return np.asarray(dt, np.float32)


def random_problem(seed, batch, length, features, num_osc, discretization):
    """Random valid constrained parameters (as float32 numpy) and an input."""
    rng = np.random.default_rng(seed)
    f32 = lambda x: np.asarray(x, np.float32)
    a = f32(rng.uniform(0.0, 1.0, num_osc))
    dt = f32(1 / (1 + np.exp(-rng.uniform(0.0, 1.0, num_osc))))
    g = f32(rng.uniform(0.0, 0.5, num_osc)) if discretization == "damped" else None
    b = f32(rng.uniform(-1, 1, (num_osc, features, 2)) / np.sqrt(features))
    c = f32(rng.uniform(-1, 1, (features, num_osc, 2)) / np.sqrt(num_osc))
    d = f32(rng.normal(size=features))
    u = f32(rng.normal(size=(batch, length, features)))
    return u, a, dt, b, c, d, g
