"""A plain step-by-step float64 reference of the three schemes, written from the equations,
and the one rule for comparing float32 results in the tests.

The reference deliberately shares nothing with ``flax_linoss.ops``: complex arithmetic, the
implicit equations solved per step as written in the papers, no transition matrices.

The rule (:func:`rel_err`, :func:`assert_rel_close`): float32 results are compared by their
*norm-relative* error, ``max |x - ref| / max |ref|`` over the whole array, with ``ref`` the
float64 reference wherever the quantity has one. Two float32 paths are never compared
element by element at a fixed ``atol``/``rtol``: their rounding differs by path and by
machine (the native kernel is compiled with ``-march=native``, so fused multiply-adds
depend on the CPU), and one element of an array whose entries reach 19 may differ by
several ``eps * 19`` while being small itself. Where two float32 results of different code
must be compared without a reference (e.g. decoding step by step against a whole-sequence
scan inside a model), the bound is norm-relative too and well above rounding: at least
``100 eps`` (about ``1e-5``) for a few hundred steps of a well-conditioned recurrence.
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


#: float32's machine epsilon, the unit of the tolerances.
EPS32 = float(np.finfo(np.float32).eps)


def rel_err(x, ref) -> float:
    """``max |x - ref| / max |ref|`` (``max |x|`` where ``ref`` is all zero), in float64
    (complex128 for complex arrays)."""
    wide = np.complex128 if np.iscomplexobj(x) or np.iscomplexobj(ref) else np.float64
    x, ref = np.asarray(x, wide), np.asarray(ref, wide)
    scale = np.abs(ref).max() if ref.size else 0.0
    if scale == 0.0:
        return float(np.abs(x).max()) if x.size else 0.0
    return float(np.abs(x - ref).max() / scale)


def assert_rel_close(got, want, tol: float, what: str = "") -> None:
    """Asserts ``rel_err(x, ref) < tol`` for each pair of leaves of two pytrees (arrays,
    tuples, dicts, ``LinOSSState``s), naming the leaf that fails."""
    got_leaves, got_tree = jax.tree.flatten(got)
    want_leaves, want_tree = jax.tree.flatten(want)
    assert len(got_leaves) == len(want_leaves), (what, got_tree, want_tree)
    for i, (x, ref) in enumerate(zip(got_leaves, want_leaves)):
        assert np.shape(x) == np.shape(ref), (what, i, np.shape(x), np.shape(ref))
        err = rel_err(x, ref)
        assert err < tol, f"{what} leaf {i}: norm-relative error {err:.3g} >= {tol:.3g}"


def reference_grads(
    args, disc, ct, *, ct_z=None, z0=None, y0=None, valid=None, segment_ids=None, reverse=False
):
    """The reference's ``(grads, out, z_L)`` for ``loss = sum(ct * out) + sum(ct_z * z_L)``.

    Args:
      args: ``(u, a, dt, b, c, d)`` or ``(u, a, dt, b, c, d, g)`` (``g`` for ``"damped"``);
        ``dt`` ``[P]`` or per step ``[B, L, P]``.
      disc: the scheme.
      ct, ct_z: cotangents of the output ``[B, L, H]`` and of the final velocity
        ``[B, 2, P]`` (real, imaginary) (``None``: not in the loss).
      z0, y0, valid, segment_ids: as in :func:`reference_apply`.
      reverse: the sequence is processed from its last step (inputs and flags flipped,
        outputs flipped back), as ``linoss_apply(..., reverse=True)``.

    Returns:
      float64 numpy ``(grads, out, z_L)``: one gradient per argument, the output, the final
      velocity as ``[B, 2, P]``.
    """
    nargs = len(args)
    flip = (lambda x: None if x is None else x[:, ::-1]) if reverse else (lambda x: x)
    with jax.enable_x64(True):

        def loss(*p):
            out, z_l, _ = reference_apply(
                flip(p[0]),
                p[1],
                flip(p[2]) if jnp.ndim(p[2]) > 1 else p[2],  # a dt per step runs reversed too
                *p[3:6],
                p[6] if nargs == 7 else None,
                discretization=disc,
                z0=z0,
                y0=y0,
                valid=flip(valid),
                segment_ids=flip(segment_ids),
            )
            out = flip(out)
            z_l = jnp.stack([jnp.real(z_l), jnp.imag(z_l)], 1)
            total = jnp.sum(jnp.asarray(ct, jnp.float64) * out)
            if ct_z is not None:
                total = total + jnp.sum(jnp.asarray(ct_z, jnp.float64) * z_l)
            return total, (out, z_l)

        f64 = [jnp.asarray(x, jnp.float64) for x in args]
        grad = jax.jit(jax.grad(loss, argnums=tuple(range(nargs)), has_aux=True))
        grads, (out, z_l) = grad(*f64)
        return jax.tree.map(np.asarray, (grads, out, z_l))
