"""flax_linoss.ops.scan: every scan path against the float64 step-by-step reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oscillator_reference import random_problem, reference_apply, reference_step

from flax_linoss import ops

SCANS = ["sequential", "associative", "fft", "adjoint", "native"]
DISCS = ["im", "imex", "damped"]
# "Several thousand" steps included. Tolerances are relative to the largest reference value.
LENGTHS = [1, 2, 37, 3000]


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    scale = np.abs(ref).max()
    if scale == 0.0:
        return float(np.abs(x).max())
    return float(np.abs(x - ref).max() / scale)


def _params(disc, a, dt, b, c, d, g):
    return (a, dt, b, c, d) + ((g,) if disc == "damped" else ())


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("disc", DISCS)
def test_all_scans_match_float64_reference_values_and_gradients(disc, length):
    u, a, dt, b, c, d, g = random_problem(length, 2, length, 6, 5, disc)
    if disc == "damped":
        # Keep every oscillator's memory (1/(1 - |lambda|)) well under the length, where float32
        # is well conditioned. Nearly undamped oscillators over thousands of steps lose
        # ~L * eps of relative accuracy in d/dg on every path (see test below).
        g = np.maximum(g, 0.05).astype(np.float32)
    ct = np.random.default_rng(1).normal(size=u.shape).astype(np.float32)
    args = (u, *_params(disc, a, dt, b, c, d, g))
    nargs = len(args)

    with jax.enable_x64(True):

        def ref_loss(*p):
            gg = p[6] if disc == "damped" else None
            out = reference_apply(*p[:6], gg, discretization=disc)[0]
            return jnp.sum(jnp.asarray(ct, jnp.float64) * out), out

        f64 = [jnp.asarray(x, jnp.float64) for x in args]
        ref_grads, ref_out = jax.grad(ref_loss, argnums=tuple(range(nargs)), has_aux=True)(*f64)
        ref_grads = [np.asarray(x) for x in ref_grads]
        ref_out = np.asarray(ref_out)

    tol = 1e-5 if length < 100 else 5e-5
    for scan in SCANS:

        def loss(*p, scan=scan):
            gg = p[6] if disc == "damped" else None
            out = ops.linoss_apply(*p[:6], g=gg, discretization=disc, scan=scan)
            return jnp.sum(ct * out), out

        grads, out = jax.jit(jax.grad(loss, argnums=tuple(range(nargs)), has_aux=True))(*args)
        assert out.dtype == jnp.float32
        assert rel_err(out, ref_out) < tol, (scan, "output", rel_err(out, ref_out))
        names = ["u", "a", "dt", "b", "c", "d", "g"]
        for name, gr, rg in zip(names, grads, ref_grads):
            assert rel_err(gr, rg) < tol, (scan, f"d/d{name}", rel_err(gr, rg))


def test_nearly_undamped_long_sequences_are_equally_accurate_on_every_path():
    # With g -> 0 the damped oscillator remembers beyond L = 3000 steps; d/dg is then
    # ill-conditioned in float32. All paths, including autodiff of the plain sequential scan,
    # must stay within the same (documented) bound.
    disc, length = "damped", 3000
    u, a, dt, b, c, d, g = random_problem(7, 1, length, 4, 3, disc)
    g = np.array([0.002, 0.2, 0.4], np.float32)
    ct = np.random.default_rng(2).normal(size=u.shape).astype(np.float32)
    with jax.enable_x64(True):
        ref = jax.grad(
            lambda gg: jnp.sum(
                jnp.asarray(ct, jnp.float64)
                * reference_apply(u, a, dt, b, c, d, gg, discretization=disc)[0]
            )
        )(jnp.asarray(g, jnp.float64))
    for scan in SCANS:
        got = jax.grad(
            lambda gg, scan=scan: jnp.sum(
                ct * ops.linoss_apply(u, a, dt, b, c, d, g=gg, discretization=disc, scan=scan)
            )
        )(g)
        assert rel_err(got, ref) < 3e-3, scan


@pytest.mark.parametrize("disc", DISCS)
def test_step_loop_equals_scan_and_final_state(disc):
    u, a, dt, b, c, d, g = random_problem(3, 3, 29, 4, 6, disc)
    full, final = ops.linoss_apply(
        u, a, dt, b, c, d, g=g, discretization=disc, scan="sequential", return_state=True
    )
    state = ops.LinOSSState.zeros((3,), 6)
    outs = []
    for t in range(u.shape[1]):
        state, y_t = ops.linoss_step(state, u[:, t], a, dt, b, c, d, g=g, discretization=disc)
        outs.append(y_t)
    # The step shares the sequential scan's arithmetic: identical up to matmul rounding.
    np.testing.assert_allclose(np.stack(outs, 1), full, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(state.z, final.z, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(state.y, final.y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scan", SCANS)
@pytest.mark.parametrize("disc", DISCS)
def test_final_state_continues_a_sequence_exactly(disc, scan):
    u, a, dt, b, c, d, g = random_problem(4, 2, 50, 3, 4, disc)
    kw = dict(g=g, discretization=disc, scan=scan)
    whole, whole_state = ops.linoss_apply(u, a, dt, b, c, d, return_state=True, **kw)
    first, state = ops.linoss_apply(u[:, :21], a, dt, b, c, d, return_state=True, **kw)
    second, end_state = ops.linoss_apply(
        u[:, 21:], a, dt, b, c, d, initial_state=state, return_state=True, **kw
    )
    np.testing.assert_allclose(np.concatenate([first, second], 1), whole, atol=2e-5, rtol=0)
    np.testing.assert_allclose(end_state.z, whole_state.z, atol=2e-5, rtol=0)
    np.testing.assert_allclose(end_state.y, whole_state.y, atol=2e-5, rtol=0)
    # And the final state is the reference's final state.
    with jax.enable_x64(True):
        _, z_l, y_l = reference_apply(u, a, dt, b, c, d, g, discretization=disc)
    z_c, y_c = whole_state.to_complex()
    np.testing.assert_allclose(z_c, np.asarray(z_l), atol=2e-5)
    np.testing.assert_allclose(y_c, np.asarray(y_l), atol=2e-5)


@pytest.mark.parametrize("scan", SCANS)
def test_initial_state_gradient_matches_reference(scan):
    disc = "im"
    u, a, dt, b, c, d, _ = random_problem(5, 2, 40, 3, 4, disc)
    rng = np.random.default_rng(0)
    z0 = (rng.normal(size=(2, 4)) + 1j * rng.normal(size=(2, 4))).astype(np.complex64)
    y0 = (rng.normal(size=(2, 4)) + 1j * rng.normal(size=(2, 4))).astype(np.complex64)
    st = ops.LinOSSState.from_complex(z0, y0)

    def loss(state):
        out = ops.linoss_apply(
            u, a, dt, b, c, d, discretization=disc, scan=scan, initial_state=state
        )
        return jnp.sum(out**2)

    got = jax.grad(loss)(st)
    with jax.enable_x64(True):

        def ref_loss(zr, zi, yr, yi):
            out = reference_apply(
                u, a, dt, b, c, d, discretization=disc, z0=zr + 1j * zi, y0=yr + 1j * yi
            )[0]
            return jnp.sum(out**2)

        parts = [jnp.asarray(x, jnp.float64) for x in (z0.real, z0.imag, y0.real, y0.imag)]
        gz_r, gz_i, gy_r, gy_i = jax.grad(ref_loss, argnums=(0, 1, 2, 3))(*parts)
    assert rel_err(got.z[:, 0], gz_r) < 1e-5 and rel_err(got.z[:, 1], gz_i) < 1e-5
    assert rel_err(got.y[:, 0], gy_r) < 1e-5 and rel_err(got.y[:, 1], gy_i) < 1e-5


@pytest.mark.parametrize("scan", SCANS)
def test_reverse_is_the_flipped_forward(scan):
    u, a, dt, b, c, d, g = random_problem(6, 2, 33, 3, 4, "damped")
    kw = dict(g=g, discretization="damped", scan=scan)
    rev = ops.linoss_apply(u, a, dt, b, c, d, reverse=True, **kw)
    fwd_of_flipped = ops.linoss_apply(u[:, ::-1], a, dt, b, c, d, **kw)[:, ::-1]
    np.testing.assert_allclose(rev, fwd_of_flipped, atol=1e-5)
    assert not np.allclose(rev, ops.linoss_apply(u, a, dt, b, c, d, **kw), atol=1e-3)


@pytest.mark.parametrize("scan", ["sequential", "associative", "auto"])
def test_masked_steps_are_as_if_removed(scan):
    u, a, dt, b, c, d, _ = random_problem(8, 1, 20, 3, 4, "im")
    valid = np.ones((1, 20), bool)
    valid[0, [0, 1, 7, 8, 9, 19]] = False
    garbage = u.copy()
    garbage[~valid] = 1e3  # what padded positions hold must not matter
    out = ops.linoss_apply(garbage, a, dt, b, c, d, mask=valid, scan=scan)
    alone = ops.linoss_apply(u[:, valid[0]], a, dt, b, c, d, scan="sequential")
    np.testing.assert_allclose(out[:, valid[0]], alone, atol=1e-5)


@pytest.mark.parametrize("scan", ["sequential", "associative"])
@pytest.mark.parametrize("reverse", [False, True])
def test_segments_restart_the_state(scan, reverse):
    u, a, dt, b, c, d, g = random_problem(9, 2, 24, 3, 4, "damped")
    seg = np.repeat(np.array([[1, 2, 3], [5, 5, 6]]), 8, axis=1)
    kw = dict(g=g, discretization="damped", scan=scan, reverse=reverse)
    out = ops.linoss_apply(u, a, dt, b, c, d, segment_ids=seg, **kw)
    for row in range(2):
        for sid in np.unique(seg[row]):
            sel = seg[row] == sid
            alone = ops.linoss_apply(u[row : row + 1, sel], a, dt, b, c, d, **kw)
            np.testing.assert_allclose(out[row : row + 1, sel], alone, atol=1e-5)


def test_time_invariant_paths_refuse_masks():
    u, a, dt, b, c, d, _ = random_problem(0, 1, 5, 2, 2, "im")
    for scan in ["fft", "adjoint", "native"]:
        with pytest.raises(ValueError, match="time-invariant"):
            ops.linoss_apply(u, a, dt, b, c, d, scan=scan, mask=np.ones((1, 5), bool))


def test_auto_resolves_per_platform():
    # This session has 8 CPU devices: under plain jit XLA may split the batch over them, so
    # the partitionable pure-JAX path (the native kernel in single-device processes and
    # per-device code: test_ops_native.py).
    assert jax.device_count() == 8
    assert ops.resolve_scan("auto", platform="cpu") == "adjoint"
    assert ops.resolve_scan("auto", platform="cpu", masked=True) == "sequential"
    assert ops.resolve_scan("auto", platform="tpu") == "associative"
    assert ops.resolve_scan("auto", platform="gpu", masked=True) == "associative"
    assert ops.resolve_scan("fft", platform="tpu") == "fft"


def test_leading_batch_dims_and_complex_parameters():
    u, a, dt, b, c, d, _ = random_problem(10, 6, 11, 3, 4, "im")
    bc = b[..., 0] + 1j * b[..., 1]
    cc = c[..., 0] + 1j * c[..., 1]
    flat = ops.linoss_apply(u, a, dt, b, c, d)
    nested = ops.linoss_apply(u.reshape(2, 3, 11, 3), a, dt, bc, cc, d)
    np.testing.assert_allclose(nested.reshape(6, 11, 3), flat, atol=1e-6)


def test_bfloat16_activations_keep_a_float32_recurrence():
    u, a, dt, b, c, d, _ = random_problem(11, 2, 300, 8, 16, "imex")
    ub = jnp.asarray(u, jnp.bfloat16)
    out, state = ops.linoss_apply(ub, a, dt, b, c, d, discretization="imex", return_state=True)
    assert out.dtype == jnp.bfloat16
    assert state.z.dtype == jnp.float32 and state.y.dtype == jnp.float32
    ref = ops.linoss_apply(np.asarray(ub, np.float32), a, dt, b, c, d, discretization="imex")
    # bf16 projections (8 mantissa bits) with a float32 recurrence: ~1e-2 relative, not worse.
    assert rel_err(out, ref) < 3e-2


def test_a_million_steps_stay_finite_and_bounded():
    rng = np.random.default_rng(0)
    length = 1_000_000
    u = rng.uniform(-1, 1, (1, length, 2)).astype(np.float32)
    _, a, dt, b, c, d, g = random_problem(12, 1, 1, 2, 3, "damped")
    for disc in ["im", "damped"]:
        gg = g if disc == "damped" else None
        out = np.asarray(ops.linoss_apply(u, a, dt, b, c, d, g=gg, discretization=disc))
        assert np.all(np.isfinite(out))
        # Bounded input, contracting dynamics: the response does not grow.
        early, late = np.abs(out[0, :100_000]).max(), np.abs(out[0, -100_000:]).max()
        assert late < 1.5 * early, (disc, early, late)
    # IMEX conserves energy: a kicked oscillator neither decays nor grows over 10^6 steps.
    kick = np.zeros((1, length, 2), np.float32)
    kick[0, 0] = 1.0
    out = np.asarray(ops.linoss_apply(kick, a, dt, b, c, np.zeros_like(d), discretization="imex"))
    assert np.all(np.isfinite(out))
    early, late = np.abs(out[0, 1:10_000]).max(), np.abs(out[0, -10_000:]).max()
    assert 0.5 * early < late < 2.0 * early


def test_imex_is_time_reversible():
    u, a, dt, b, c, d, _ = random_problem(13, 2, 500, 3, 4, "imex")
    rng = np.random.default_rng(1)
    z0 = (rng.normal(size=(2, 4)) + 1j * rng.normal(size=(2, 4))).astype(np.complex64)
    y0 = (rng.normal(size=(2, 4)) + 1j * rng.normal(size=(2, 4))).astype(np.complex64)
    _, final = ops.linoss_apply(
        u,
        a,
        dt,
        b,
        c,
        d,
        discretization="imex",
        initial_state=ops.LinOSSState.from_complex(z0, y0),
        return_state=True,
    )
    z, y = (np.asarray(x, np.complex128) for x in final.to_complex())
    bu = np.einsum("blh,ph->blp", u.astype(np.float64), b[..., 0] + 1j * b[..., 1])
    a64, dt64 = a.astype(np.float64), dt.astype(np.float64)
    for t in range(u.shape[1] - 1, -1, -1):
        # Undo y_n = y + dt z_n, then z_n = z + dt(-a y + Bu_n): explicit in reverse.
        y = y - dt64 * z
        z = z - dt64 * (-a64 * y + bu[:, t])
    np.testing.assert_allclose(z, z0, atol=1e-4)
    np.testing.assert_allclose(y, y0, atol=1e-4)
    # Sanity: the reference's own step undone the same way is exact in float64.
    z1, y1 = reference_step(
        z0.astype(np.complex128), y0.astype(np.complex128), bu[:, 0], a64, dt64, None, "imex"
    )
    y_back = y1 - dt64 * z1
    np.testing.assert_allclose(y_back, y0, atol=1e-12)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (dict(u=np.ones(3, np.float32)), ValueError, "length, features"),
        (dict(u=np.ones((2, 5, 4), np.float32)), ValueError, "4 features"),
        (dict(u=np.ones((2, 5, 3), np.int32)), TypeError, "floating"),
        (dict(u=np.ones((2, 0, 3), np.float32)), ValueError, "length 0"),
        (dict(a=-np.ones(4, np.float32)), ValueError, "`a` must be >= 0"),
        (dict(dt=np.full(4, 1.5, np.float32)), ValueError, r"`dt` must be \(0.0, 1.0\]"),
        (dict(dt=np.zeros(4, np.float32)), ValueError, r"`dt` must be \(0.0, 1.0\]"),
        (dict(dt=np.full(4, np.nan, np.float32)), ValueError, "non-finite"),
        (dict(b=np.ones((4, 3), np.float32)), ValueError, "`b` must be complex"),
        (dict(discretization="rk4"), ValueError, "Unknown discretization 'rk4'"),
        (dict(scan="fast"), ValueError, "Unknown scan 'fast'"),
        (dict(g=np.ones(4, np.float32)), ValueError, "only used by 'damped'"),
        (dict(discretization="damped"), ValueError, "needs the damping"),
    ],
)
def test_bad_input_raises_clear_errors(change, error, match):
    u, a, dt, b, c, d, _ = random_problem(0, 2, 5, 3, 4, "im")
    kw = dict(u=u, a=a, dt=dt, b=b, c=c, d=d, g=None, discretization="im", scan="auto")
    kw.update(change)
    with pytest.raises(error, match=match):
        ops.linoss_apply(
            kw["u"],
            kw["a"],
            kw["dt"],
            kw["b"],
            kw["c"],
            kw["d"],
            g=kw["g"],
            discretization=kw["discretization"],
            scan=kw["scan"],
        )


def test_bad_state_and_mask_shapes():
    u, a, dt, b, c, d, _ = random_problem(0, 2, 5, 3, 4, "im")
    with pytest.raises(ValueError, match=r"initial_state\.z"):
        ops.linoss_apply(u, a, dt, b, c, d, initial_state=ops.LinOSSState.zeros((2,), 3))
    with pytest.raises(ValueError, match="`mask` of shape"):
        ops.linoss_apply(u, a, dt, b, c, d, mask=np.ones((2, 4), bool))
