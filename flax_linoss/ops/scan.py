"""The LinOSS layer as pure JAX: projections, recurrence (three scan paths), single step.

Legend: ``N`` flattened batch, ``L`` length, ``H`` features, ``P`` oscillators,
``Q = 2P`` real channels (the real and imaginary parts of the complex forcing ``B u``).

Because ``M`` and ``f`` are real and time-invariant, the complex state of each oscillator
splits into two real 2-vectors driven by ``Re(Bu)`` and ``Im(Bu)``. The core therefore runs
on ``Q = 2P`` real channels with real arithmetic only (no complex dtypes, which TPUs support
poorly), and the output ``Re(C y)`` becomes one real matmul with ``[Re(C), -Im(C)]``.

Scan paths (all exact up to float rounding, all differentiable):

* ``"sequential"``: ``lax.scan`` over time with the 2x2 update, ``O(L)`` depth.
* ``"associative"``: a parallel prefix scan over ``(M, b)`` pairs, ``O(log L)`` depth. With
  a time-invariant ``M`` it is a Hillis-Steele scan needing only ``M^(2^i)`` per level (no
  per-step copies of ``M``, unlike the reference code), in a ``fori_loop`` (small programs,
  fast compiles), with the adjoint recurrence solved the same way for the backward pass.
  With masks or segments (time-varying transitions) it is ``lax.associative_scan`` over
  per-step ``(A_k, b_k)``.
* ``"fft"``: since ``M`` is time-invariant, ``y = K * v`` is a causal convolution with the
  real kernel ``K_j = (M^j f)_y``. The kernel is built from ``M^j`` (no batch dimension)
  and applied with real FFTs. Initial and final
  states are handled exactly through ``M^j``.
* ``"adjoint"``: the sequential recurrence in one loop over the time axis of the
  ``[N, L, Q]`` array (no transposes), with a hand-written backward pass: the exact adjoint
  recurrence ``lambda_k = M^T lambda_{k+1} + e_y g_k`` run backwards in one more loop that
  also accumulates the gradients of ``M`` and ``f``. Autodiff of ``lax.scan`` instead stores
  and replays generic per-step residuals; this is the fastest path on CPU.
* ``"auto"`` picks per platform (see :func:`resolve_scan`).

Masks and packed segments need a time-varying transition, so they run on the sequential
or associative path (``"auto"`` chooses one; ``"fft"`` with them is an error).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flax_linoss.ops import native, schemes

SEQUENTIAL = "sequential"
ASSOCIATIVE = "associative"
FFT = "fft"
ADJOINT = "adjoint"
NATIVE = "native"
AUTO = "auto"
SCANS = (AUTO, SEQUENTIAL, ASSOCIATIVE, FFT, ADJOINT, NATIVE)


class LinOSSState(NamedTuple):
    """Oscillator state, real and imaginary parts stacked on axis ``-2``.

    Attributes:
      z: ``[..., 2, P]`` velocities (``z[..., 0, :]`` real part, ``z[..., 1, :]`` imaginary).
      y: ``[..., 2, P]`` positions, same layout.
    """

    z: jnp.ndarray
    y: jnp.ndarray

    @classmethod
    def zeros(cls, batch_shape, num_oscillators: int, dtype=jnp.float32) -> LinOSSState:
        """A zero state for a batch of shape ``batch_shape``."""
        shape = (*tuple(batch_shape), 2, num_oscillators)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @classmethod
    def from_complex(cls, z: jnp.ndarray, y: jnp.ndarray) -> LinOSSState:
        """Builds a state from complex ``[..., P]`` velocities and positions."""
        return cls(
            jnp.stack([jnp.real(z), jnp.imag(z)], -2), jnp.stack([jnp.real(y), jnp.imag(y)], -2)
        )

    def to_complex(self) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Returns complex ``(z, y)``, each ``[..., P]``."""
        return (
            self.z[..., 0, :] + 1j * self.z[..., 1, :],
            self.y[..., 0, :] + 1j * self.y[..., 1, :],
        )


# ----------------------------------------------------------------------------------------
# Validation (once, at the edge).


def check_scan(scan: str) -> str:
    """Returns ``scan`` if known, else raises a ``ValueError`` listing the choices."""
    if scan not in SCANS:
        raise ValueError(f"Unknown scan {scan!r}; expected one of {list(SCANS)}.")
    return scan


def _concrete(x) -> np.ndarray | None:
    """``x`` as numpy if its value is known now (not traced), else ``None``."""
    if x is None or isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def _complex_shape(x, name: str, shape: tuple[int, ...]) -> None:
    xs = tuple(np.shape(x))
    if jnp.iscomplexobj(x):
        ok = xs == shape
    else:
        ok = xs == (*shape, 2)
    if not ok:
        raise ValueError(
            f"`{name}` must be complex {list(shape)} or real (re, im) pairs {[*shape, 2]}, "
            f"got shape {list(xs)} ({jnp.result_type(x)})."
        )


def check_inputs(u, a, dt, b, c, d, g, discretization: str, scan: str) -> None:
    """Raises a clear ``ValueError``/``TypeError`` for malformed inputs to :func:`linoss_apply`."""
    schemes.check_discretization(discretization)
    check_scan(scan)
    if np.ndim(u) < 2:
        raise ValueError(f"`u` must have shape [..., length, features], got shape {np.shape(u)}.")
    if np.shape(u)[-2] == 0:
        raise ValueError(f"`u` has length 0 (shape {np.shape(u)}); it needs at least one step.")
    if not jnp.issubdtype(jnp.result_type(u), jnp.floating):
        raise TypeError(f"`u` must be a real floating array, got dtype {jnp.result_type(u)}.")
    if np.ndim(a) != 1:
        raise ValueError(f"`a` must have shape [P], got {np.shape(a)}.")
    num_osc = np.shape(a)[0]
    for name, x in (("dt", dt), ("g", g)):
        if x is not None and tuple(np.shape(x)) != (num_osc,):
            raise ValueError(f"`{name}` must have shape [P] = [{num_osc}], got {np.shape(x)}.")
    if discretization == schemes.DAMPED and g is None:
        raise ValueError("discretization='damped' (D-LinOSS) needs the damping `g` [P].")
    if discretization != schemes.DAMPED and g is not None:
        raise ValueError(f"`g` (damping) is only used by 'damped', not by {discretization!r}.")
    if np.ndim(d) != 1:
        raise ValueError(f"`d` must have shape [H], got {np.shape(d)}.")
    feats = np.shape(d)[0]
    _complex_shape(b, "b", (num_osc, feats))
    _complex_shape(c, "c", (feats, num_osc))
    if np.shape(u)[-1] != feats:
        raise ValueError(
            f"`u` has {np.shape(u)[-1]} features (last axis of shape {np.shape(u)}) but the "
            f"layer has H = {feats} (from `d`, `b` and `c`)."
        )
    for name, x, lo, lo_open, hi in (
        ("a", a, 0.0, False, None),
        ("dt", dt, 0.0, True, 1.0),
        ("g", g, 0.0, False, None),
    ):
        xv = _concrete(x)
        if xv is None:
            continue
        if not np.all(np.isfinite(xv)):
            raise ValueError(f"`{name}` has non-finite values.")
        bad = (xv <= lo) if lo_open else (xv < lo)
        if hi is not None:
            bad |= xv > hi
        if np.any(bad):
            rng = f"({lo}, {hi}]" if hi is not None else f">= {lo}"
            raise ValueError(
                f"`{name}` must be {rng} (already constrained); got min {xv.min():.4g}, "
                f"max {xv.max():.4g}. Use flax_linoss.ops.linoss_constrain/damped_constrain."
            )


# ----------------------------------------------------------------------------------------
# Projections.


def _split_complex(x) -> tuple[jnp.ndarray, jnp.ndarray]:
    if jnp.iscomplexobj(x):
        return jnp.real(x), jnp.imag(x)
    return x[..., 0], x[..., 1]


def input_weights(b) -> jnp.ndarray:
    """``[H, Q]`` real matrix with ``u @ W = [Re(Bu) | Im(Bu)]`` for ``b`` complex ``[P, H]``."""
    b_re, b_im = _split_complex(b)
    return jnp.concatenate([b_re, b_im], axis=0).T


def output_weights(c) -> jnp.ndarray:
    """``[Q, H]`` real matrix with ``[y_re | y_im] @ W = Re(C y)`` for ``c`` complex ``[H, P]``."""
    c_re, c_im = _split_complex(c)
    return jnp.concatenate([c_re, -c_im], axis=1).T


def recurrence_dtype(*params) -> jnp.dtype:
    """float32, or float64 when the oscillator parameters are float64."""
    return jnp.promote_types(jnp.float32, jnp.result_type(*[p for p in params if p is not None]))


# ----------------------------------------------------------------------------------------
# Recurrence on real channels: x_n = M x_{n-1} + f v_n, x = (z, y), each [N, Q].


def recurrence_step(tr: schemes.Transition, z, y, v):
    """One step of the 2x2 update; shared by the sequential scan and :func:`linoss_step`."""
    z_new = tr.m11 * z + tr.m12 * y + tr.f1 * v
    y_new = tr.m21 * z + tr.m22 * y + tr.f2 * v
    return z_new, y_new


def _resets(segment_ids):
    """``[N, L]`` bool: the state restarts from zero before step k (segment id changed)."""
    first = jnp.zeros_like(segment_ids[:, :1], dtype=bool)
    return jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def _sequential(tr, v, z0, y0, valid, reset):
    def body(carry, inp):
        z, y = carry
        vt, ok, rs = inp
        if rs is not None:
            keep = jnp.logical_not(rs)[:, None].astype(z.dtype)
            z, y = z * keep, y * keep
        zn, yn = recurrence_step(tr, z, y, vt)
        if ok is not None:
            zn = jnp.where(ok[:, None], zn, z)
            yn = jnp.where(ok[:, None], yn, y)
        return (zn, yn), yn

    def time_major(x):
        return None if x is None else jnp.swapaxes(x, 0, 1)

    (z_l, y_l), ys = jax.lax.scan(
        body, (z0, y0), (time_major(v), time_major(valid), time_major(reset))
    )
    return jnp.swapaxes(ys, 0, 1), z_l, y_l


def _associative(tr, v, z0, y0, valid, reset):
    length, q = v.shape[1:]
    # Elements (A [., L, 2, 2, Q], b [N, L, 2, Q]): two stacked leaves keep the scan's graph
    # (and its compile time) small. Without masks, A is shared across the batch.
    m = jnp.stack([jnp.stack([tr.m11, tr.m12]), jnp.stack([tr.m21, tr.m22])])  # [2, 2, Q]
    a = jnp.broadcast_to(m, (1, length, 2, 2, q))
    b = jnp.stack([tr.f1 * v, tr.f2 * v], axis=2)  # [N, L, 2, Q]
    if valid is not None:
        # A masked step holds the state: identity transition, no forcing.
        ok = valid[:, :, None, None, None]
        a = jnp.where(ok, a, jnp.eye(2, dtype=v.dtype)[:, :, None])
        b = jnp.where(ok[..., 0], b, jnp.zeros((), v.dtype))
    if reset is not None:
        a = a * jnp.logical_not(reset)[:, :, None, None, None].astype(v.dtype)
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


def _lti_forward(coeffs, v, z0, y0):
    m11, m12, m21, m22, f1, f2 = coeffs
    tr = schemes.Transition(m11, m12, m21, m22, f1, f2)
    length = v.shape[1]

    def body(t, carry):
        z, y, zs, ys = carry
        z, y = recurrence_step(tr, z, y, jax.lax.dynamic_index_in_dim(v, t, 1, keepdims=False))
        zs = jax.lax.dynamic_update_index_in_dim(zs, z, t, 1)
        ys = jax.lax.dynamic_update_index_in_dim(ys, y, t, 1)
        return z, y, zs, ys

    empty = jnp.zeros_like(v)
    _, _, zs, ys = jax.lax.fori_loop(0, length, body, (z0, y0, empty, empty))
    return ys, zs[:, -1], zs


def _lti_bwd(res, cts):
    coeffs, v, z0, y0, ys, zs = res
    g_ys, g_zl = cts
    m11, m12, m21, m22, f1, f2 = coeffs
    length = v.shape[1]

    def previous(xs, x0, t):
        # x_{t-1}, with x_{-1} the initial state.
        prev = jax.lax.dynamic_index_in_dim(xs, jnp.maximum(t - 1, 0), 1, keepdims=False)
        return jnp.where(t == 0, x0, prev)

    def body(i, carry):
        # r = M^T lambda_{t+1} (plus the final-state cotangent); lambda_t = r + e_y g_t.
        t = length - 1 - i
        rz, ry, g_v, acc = carry
        lz = rz
        ly = ry + jax.lax.dynamic_index_in_dim(g_ys, t, 1, keepdims=False)
        vt = jax.lax.dynamic_index_in_dim(v, t, 1, keepdims=False)
        zp, yp = previous(zs, z0, t), previous(ys, y0, t)
        g_v = jax.lax.dynamic_update_index_in_dim(g_v, f1 * lz + f2 * ly, t, 1)
        acc = (
            acc[0] + lz * zp,
            acc[1] + lz * yp,
            acc[2] + ly * zp,
            acc[3] + ly * yp,
            acc[4] + lz * vt,
            acc[5] + ly * vt,
        )
        return m11 * lz + m21 * ly, m12 * lz + m22 * ly, g_v, acc

    zero = jnp.zeros_like(z0)
    init = (g_zl.astype(z0.dtype), zero, jnp.zeros_like(v), (zero,) * 6)
    rz, ry, g_v, acc = jax.lax.fori_loop(0, length, body, init)
    g_coeffs = tuple(jnp.sum(x, axis=0) for x in acc)
    return g_coeffs, g_v, rz, ry


def _time_invariant(recurrence, tr, v, z0, y0):
    """``(ys, z_L, y_L)`` from a custom-VJP recurrence built by :func:`_with_adjoint`."""
    ys, z_l = recurrence(tuple(tr), v, z0, y0)
    return ys, z_l, ys[:, -1]


def _prefix_scan(m, b1, b2):
    """Parallel prefix scan of ``x_k = M x_{k-1} + b_k`` (``x_{-1} = 0``), Hillis-Steele form.

    After level ``i`` every ``x_k`` holds ``sum_{j < 2^(i+1)} M^j b_{k-j}``; the combine is
    the associative ``(M, b)`` product with ``M`` time-invariant, so each level needs only
    ``M^(2^i)`` (``[Q]`` coefficients) and one shift of the sequence. ``ceil(log2 L)``
    levels run in a ``fori_loop``, so the program is small whatever ``L``.

    Args:
      m: ``(m11, m12, m21, m22)``, each ``[Q]``.
      b1, b2: ``[N, L, Q]`` forcing of the two state components.

    Returns:
      ``(x1, x2)``, each ``[N, L, Q]``.
    """
    length = b1.shape[1]
    position = jnp.arange(length)[None, :, None]

    def level(i, carry):
        x1, x2, p11, p12, p21, p22 = carry
        shift = jnp.left_shift(1, i)

        def shifted(x):
            return jnp.where(position >= shift, jnp.roll(x, shift, axis=1), 0.0)

        s1, s2 = shifted(x1), shifted(x2)
        x1, x2 = x1 + p11 * s1 + p12 * s2, x2 + p21 * s1 + p22 * s2
        p = (
            p11 * p11 + p12 * p21,
            p11 * p12 + p12 * p22,
            p21 * p11 + p22 * p21,
            p21 * p12 + p22 * p22,
        )
        return (x1, x2, *p)

    levels = max(0, (length - 1).bit_length())
    x1, x2, *_ = jax.lax.fori_loop(0, levels, level, (b1, b2, *m))
    return x1, x2


def _adjoint_gradients(coeffs, v, z0, y0, zs, ys, lz, ly):
    """Gradients of the LTI recurrence from the adjoint states ``lambda = (lz, ly)``."""
    m11, m12, m21, m22, f1, f2 = coeffs
    z_prev = jnp.concatenate([z0[:, None], zs[:, :-1]], axis=1)
    y_prev = jnp.concatenate([y0[:, None], ys[:, :-1]], axis=1)
    total = lambda x: jnp.sum(x, axis=(0, 1))
    g_coeffs = (
        total(lz * z_prev),
        total(lz * y_prev),
        total(ly * z_prev),
        total(ly * y_prev),
        total(lz * v),
        total(ly * v),
    )
    g_v = f1 * lz + f2 * ly
    g_z0 = m11 * lz[:, 0] + m21 * ly[:, 0]
    g_y0 = m12 * lz[:, 0] + m22 * ly[:, 0]
    return g_coeffs, g_v, g_z0, g_y0


def _parallel_forward(coeffs, v, z0, y0):
    m11, m12, m21, m22, f1, f2 = coeffs
    b1 = (f1 * v).at[:, 0].add(m11 * z0 + m12 * y0)
    b2 = (f2 * v).at[:, 0].add(m21 * z0 + m22 * y0)
    zs, ys = _prefix_scan((m11, m12, m21, m22), b1, b2)
    return ys, zs[:, -1], zs


def _lti_parallel_bwd(res, cts):
    coeffs, v, z0, y0, ys, zs = res
    g_ys, g_zl = cts
    m11, m12, m21, m22 = coeffs[:4]
    # lambda_t = M^T lambda_{t+1} + (0, g_t), with the final-state cotangent entering at L-1.
    c1 = jnp.zeros_like(g_ys).at[:, -1].add(g_zl.astype(g_ys.dtype))
    lz, ly = _prefix_scan((m11, m21, m12, m22), c1[:, ::-1], g_ys[:, ::-1])
    return _adjoint_gradients(coeffs, v, z0, y0, zs, ys, lz[:, ::-1], ly[:, ::-1])


def _with_adjoint(forward, backward):
    """A custom-VJP ``(coeffs, v, z0, y0) -> (ys, z_L)`` from a forward solver returning
    ``(ys, z_L, aux)`` and a backward pass ``(residuals, cotangents) -> gradients``; the
    residuals are ``(coeffs, v, z0, y0, ys, aux)`` (``aux``: every velocity, or the native
    kernel's checkpoints)."""

    @jax.custom_vjp
    def recurrence(coeffs, v, z0, y0):
        ys, z_l, _ = forward(coeffs, v, z0, y0)
        return ys, z_l

    def fwd(coeffs, v, z0, y0):
        ys, z_l, aux = forward(coeffs, v, z0, y0)
        return (ys, z_l), (coeffs, v, z0, y0, ys, aux)

    recurrence.defvjp(fwd, backward)
    return recurrence


# Sequential loop, backward = one fused reverse loop over the adjoint recurrence.
_lti_recurrence = _with_adjoint(_lti_forward, _lti_bwd)
# Parallel prefix scan, backward = the adjoint recurrence by the same parallel scan.
_lti_parallel = _with_adjoint(_parallel_forward, _lti_parallel_bwd)
# The same two passes as the sequential loop, as the fused C++ kernel (CPU).
_lti_native = _with_adjoint(native.forward, native.backward)


def matrix_powers(tr: schemes.Transition, n: int):
    """``M^j`` for ``j = 0 .. n-1``: four ``[n, Q]`` arrays (entries 11, 12, 21, 22).

    A ``lax.scan`` over ``n`` steps of ``[Q]``-sized work: cheap next to the batched
    recurrence, exact in its rounding, and small to compile and differentiate (repeated
    doubling was faster to run but its fused gradient took minutes to compile).
    """

    def body(p, _):
        nxt = (
            tr.m11 * p[0] + tr.m12 * p[2],
            tr.m11 * p[1] + tr.m12 * p[3],
            tr.m21 * p[0] + tr.m22 * p[2],
            tr.m21 * p[1] + tr.m22 * p[3],
        )
        return nxt, p

    one, zero = jnp.ones_like(tr.m11), jnp.zeros_like(tr.m11)
    _, powers = jax.lax.scan(body, (one, zero, zero, one), None, length=n)
    return powers


def _fft_size(length: int) -> int:
    # A power of two >= 2L - 1 makes the circular convolution a linear one.
    return max(2, 1 << (2 * length - 2).bit_length())


def _fft(tr, v, z0, y0, want_final: bool):
    length = v.shape[1]
    p11, p12, p21, p22 = matrix_powers(tr, length + 1)
    kernel_y = p21[:length] * tr.f1 + p22[:length] * tr.f2  # [L, Q]
    nfft = _fft_size(length)
    vt = jnp.swapaxes(v, 1, 2)  # [N, Q, L]: FFT over the contiguous last axis.
    vf = jnp.fft.rfft(vt, n=nfft, axis=-1)
    kf = jnp.fft.rfft(kernel_y.T, n=nfft, axis=-1)
    ys = jnp.fft.irfft(vf * kf, n=nfft, axis=-1)[..., :length]
    # The free response of the initial state: (M^(k+1) x_init)_y at step k.
    ys = ys + (p21[1:].T * z0[..., None] + p22[1:].T * y0[..., None])
    ys = jnp.swapaxes(ys, 1, 2)
    if not want_final:
        return ys, None, ys[:, -1]
    kernel_z = (p11[:length] * tr.f1 + p12[:length] * tr.f2)[::-1]  # M^(L-1-k) f, z-part
    z_l = jnp.einsum("nlq,lq->nq", v, kernel_z) + p11[length] * z0 + p12[length] * y0
    return ys, z_l, ys[:, -1]


def resolve_scan(scan: str, *, masked: bool = False, platform: str | None = None) -> str:
    """Maps ``"auto"`` to a concrete scan for ``platform`` (default: JAX's default backend).

    * CPU: ``"native"`` (the fused C++ kernel, measured fastest here, see
      ``benchmarks/RESULTS.md``) in a single-device process or inside ``shard_map``/``pmap``;
      ``"adjoint"`` where the kernel cannot be built or where XLA may partition the batch
      over several devices (plain ``jit``, see :func:`_per_device`); with masks or
      segments, ``"sequential"`` (``associative_scan`` never beat ``lax.scan`` on CPU).
    * GPU, TPU and others: ``"associative"`` (logarithmic depth, the papers' choice on
      accelerators).

    Raises:
      ValueError: a time-invariant-only path with masks, or ``"native"`` off the CPU.
      RuntimeError: ``"native"`` asked for where the kernel cannot be built (says why).
    """
    check_scan(scan)
    if masked and scan in (FFT, ADJOINT, NATIVE):
        raise ValueError(
            f"scan={scan!r} needs a time-invariant transition and cannot apply `mask` or "
            "`segment_ids`; use 'sequential', 'associative' or 'auto'."
        )
    platform = platform or jax.default_backend()
    if scan == NATIVE:
        if platform != "cpu":
            raise ValueError(
                f"scan='native' is a CPU kernel; the platform here is {platform!r}. Use "
                "'auto' (or 'associative') on accelerators."
            )
        if not native.available():
            raise RuntimeError(
                f"scan='native' is unavailable: {native.unavailable_reason()}. Use 'auto' "
                "or 'adjoint'."
            )
    if scan != AUTO:
        return scan
    if platform == "cpu":
        if masked:
            return SEQUENTIAL
        return NATIVE if _per_device() and native.available() else ADJOINT
    return ASSOCIATIVE


def _per_device() -> bool:
    """Whether traced code works on one device's data: a single-device process, or inside
    ``shard_map``/``pmap`` (every mesh axis manual).

    Elsewhere, with several devices, XLA's SPMD partitioner may split the batch across
    devices; it cannot split the ``native`` custom call and would gather its inputs onto every
    device, so ``"auto"`` takes the pure-JAX ``"adjoint"`` path, which partitions.
    """
    if jax.device_count() == 1:
        return True
    get_mesh = getattr(jax.sharding, "get_abstract_mesh", None)
    if get_mesh is None:
        return False
    mesh = get_mesh()
    manual = jax.sharding.AxisType.Manual
    return bool(mesh.axis_names) and all(t == manual for t in mesh.axis_types)


def oscillator_recurrence(
    tr: schemes.Transition,
    v: jnp.ndarray,
    z0: jnp.ndarray,
    y0: jnp.ndarray,
    *,
    scan: str = AUTO,
    valid: jnp.ndarray | None = None,
    segment_ids: jnp.ndarray | None = None,
    want_final: bool = False,
):
    """Runs ``x_n = M x_{n-1} + f v_n`` on real channels.

    Args:
      tr: coefficients, each ``[Q]``.
      v: ``[N, L, Q]`` forcing.
      z0, y0: ``[N, Q]`` initial state.
      scan: a name in :data:`SCANS`.
      valid: optional ``[N, L]`` bool; a step with ``False`` leaves the state unchanged.
      segment_ids: optional ``[N, L]`` int; the state restarts from zero where it changes.
      want_final: whether the final velocity is needed (the fft path skips it otherwise).

    Returns:
      ``(ys [N, L, Q], z_L [N, Q] or None, y_L [N, Q])``.
    """
    reset = None if segment_ids is None else _resets(segment_ids)
    path = resolve_scan(scan, masked=valid is not None or reset is not None)
    if path == SEQUENTIAL:
        return _sequential(tr, v, z0, y0, valid, reset)
    if path == ASSOCIATIVE:
        if valid is None and reset is None:
            return _time_invariant(_lti_parallel, tr, v, z0, y0)
        return _associative(tr, v, z0, y0, valid, reset)
    if path == ADJOINT:
        return _time_invariant(_lti_recurrence, tr, v, z0, y0)
    if path == NATIVE:
        return _time_invariant(_lti_native, tr, v, z0, y0)
    return _fft(tr, v, z0, y0, want_final)


# ----------------------------------------------------------------------------------------
# Public API.


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


def _flat_per_step(x, name: str, lead_len: tuple[int, ...], reverse: bool):
    if x is None:
        return None
    x = jnp.asarray(x)
    if x.shape != lead_len:
        try:
            x = jnp.broadcast_to(x, lead_len)
        except ValueError as e:
            raise ValueError(
                f"`{name}` of shape {x.shape} does not match the input's [..., length] = "
                f"{list(lead_len)}."
            ) from e
    x = x.reshape(-1, lead_len[-1])
    return x[:, ::-1] if reverse else x


def _real_transition(a, dt, g, discretization):
    """The transition on the ``Q = 2P`` real channels, in the recurrence dtype."""
    rdt = recurrence_dtype(a, dt, g)
    g = None if g is None else g.astype(rdt)
    return schemes.transition(a.astype(rdt), dt.astype(rdt), discretization, g).tile(2), rdt


def _rows(x):
    """``[..., F] -> [M, F]``. The projections run as 2-D matmuls: XLA's CPU backend then
    uses the operands as they are in the backward pass, where with batch dimensions it
    first copies large transposes (measured: ~20% of the projections' cost)."""
    return x.reshape(-1, x.shape[-1])


def _project_in(u, b, rdt):
    """``[..., H] -> [..., Q]``: ``[Re(Bu) | Im(Bu)]`` in ``u``'s dtype, accumulated in ``rdt``."""
    w = input_weights(b).astype(u.dtype)
    v = jnp.matmul(_rows(u), w, preferred_element_type=rdt)
    return v.reshape(*u.shape[:-1], w.shape[1])


def _project_out(ys, c, d, u, rdt):
    """``Re(C y) + d * u`` in ``u``'s dtype; ``ys [..., Q]``, ``u [..., H]``."""
    w = output_weights(c).astype(u.dtype)
    out = jnp.matmul(_rows(ys.astype(u.dtype)), w, preferred_element_type=rdt)
    return (out.reshape(u.shape) + d.astype(rdt) * u).astype(u.dtype)


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
    check: bool = True,
):
    """Applies a LinOSS / D-LinOSS layer to a sequence, for already-constrained parameters.

    Computes ``x_n = M x_{n-1} + f (B u_n)`` per oscillator (see
    :mod:`flax_linoss.ops.schemes`) from ``initial_state`` (zero by default) and returns
    ``Re(C y_n) + d * u_n``. The recurrence runs in float32 (float64 if ``a``/``dt`` are
    float64) whatever the dtype of ``u``; the projections run in ``u``'s dtype with
    float32 accumulation.

    Args:
      u: ``[..., L, H]`` real input.
      a: ``[P]`` stiffness, ``>= 0``.
      dt: ``[P]`` time steps in ``(0, 1]``.
      b: ``[P, H]`` complex input matrix, or real ``[P, H, 2]`` (re, im) pairs.
      c: ``[H, P]`` complex output matrix, or real ``[H, P, 2]``.
      d: ``[H]`` real feed-through.
      g: ``[P]`` damping ``>= 0``, for ``discretization="damped"`` only.
      discretization: ``"im"``, ``"imex"`` or ``"damped"``.
      scan: ``"auto"``, ``"sequential"``, ``"associative"``, ``"fft"``, ``"adjoint"`` or
        ``"native"`` (see :func:`resolve_scan`).
      initial_state: a :class:`LinOSSState` with ``[..., 2, P]`` leaves (broadcast over the
        batch), the state before the first processed step.
      return_state: also return the state after the last processed step.
      reverse: process the sequence from its last step to its first (for bidirectional
        models); outputs stay in the original order.
      mask: ``[..., L]`` bool, ``True`` = valid. A masked step leaves the state unchanged
        (as if it were absent); its output is computed from the held state.
      segment_ids: ``[..., L]`` int; the state restarts from zero wherever the id changes
        between consecutive processed steps (packed sequences).
      check: validate shapes and (when not traced) values.

    Returns:
      ``y [..., L, H]`` in ``u``'s dtype, and with ``return_state`` also the final
      :class:`LinOSSState` with ``[..., 2, P]`` leaves.
    """
    if check:
        check_inputs(u, a, dt, b, c, d, g, discretization, scan)
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
        scan=scan,
        return_state=return_state,
        reverse=reverse,
    )


# Compiled as one program (cheap eager calls); inlined when called under an outer jit.
@functools.partial(jax.jit, static_argnames=("discretization", "scan", "return_state", "reverse"))
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
    scan,
    return_state,
    reverse,
):
    *lead, length, feats = u.shape
    lead = tuple(lead)
    num_osc = a.shape[0]
    tr, rdt = _real_transition(a, dt, g, discretization)
    u_flat = u.reshape(-1, length, feats)
    v = _project_in(u_flat[:, ::-1] if reverse else u_flat, b, rdt)
    z0, y0 = _flat_state(initial_state, lead, num_osc, rdt)
    valid = _flat_per_step(mask, "mask", (*lead, length), reverse)
    seg = _flat_per_step(segment_ids, "segment_ids", (*lead, length), reverse)
    if valid is not None:
        valid = valid.astype(bool)
    ys, z_l, y_l = oscillator_recurrence(
        tr, v, z0, y0, scan=scan, valid=valid, segment_ids=seg, want_final=return_state
    )
    if reverse:
        ys = ys[:, ::-1]
    out = _project_out(ys, c, d, u_flat, rdt).reshape(u.shape)
    if not return_state:
        return out
    final = LinOSSState(z_l.reshape(*lead, 2, num_osc), y_l.reshape(*lead, 2, num_osc))
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
    check: bool = True,
):
    """One recurrence step for decoding; the same arithmetic as the ``"sequential"`` scan.

    Args:
      state: :class:`LinOSSState` with ``[..., 2, P]`` leaves (``[B, 2, P]`` typically).
      u_t: ``[..., H]`` input at this step.
      a, dt, b, c, d, g, discretization: as in :func:`linoss_apply`.
      check: validate shapes and (when not traced) values.

    Returns:
      ``(next_state, y_t)`` with ``y_t [..., H]`` in ``u_t``'s dtype.
    """
    u_t = jnp.asarray(u_t)
    if check:
        check_inputs(u_t[..., None, :], a, dt, b, c, d, g, discretization, AUTO)
    return _step(state, u_t, a, dt, b, c, d, g, discretization=discretization)


@functools.partial(jax.jit, static_argnames=("discretization",))
def _step(state, u_t, a, dt, b, c, d, g, *, discretization):
    num_osc = a.shape[0]
    tr, rdt = _real_transition(a, dt, g, discretization)
    lead = u_t.shape[:-1]
    v = _project_in(u_t, b, rdt)
    z, y = (
        jnp.broadcast_to(x, (*lead, 2, num_osc)).reshape(*lead, 2 * num_osc).astype(rdt)
        for x in state
    )
    z, y = recurrence_step(tr, z, y, v)
    out = _project_out(y, c, d, u_t, rdt)
    return LinOSSState(z.reshape(*lead, 2, num_osc), y.reshape(*lead, 2, num_osc)), out
