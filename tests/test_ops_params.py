"""flax_linoss.ops.params and .schemes: constraints, the stable band, inits, spectra."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_linoss import ops
from flax_linoss.ops import schemes


def _random_raw(seed, num_osc=256):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (
        jax.random.uniform(k1, (num_osc,)),  # the papers' a_raw ~ U[0, 1)
        jax.random.normal(k2, (num_osc,)),  # dt_raw: any real
        jax.random.uniform(k3, (num_osc,), minval=0.01, maxval=2.0),  # g_raw > 0
    )


def test_linoss_constrain_is_relu_and_sigmoid():
    a, dt = ops.linoss_constrain(jnp.array([-1.0, 0.5]), jnp.array([0.0, 100.0]))
    np.testing.assert_allclose(a, [0.0, 0.5])
    np.testing.assert_allclose(dt, [0.5, 1.0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spectral_radius_below_one_for_im_and_damped_and_one_for_imex(seed):
    a_raw, dt_raw, g_raw = _random_raw(seed)
    a, dt = ops.linoss_constrain(a_raw, dt_raw)
    assert np.all(np.asarray(schemes.spectral_radius(schemes.transition(a, dt, "im"))) < 1.0)
    rho_imex = np.asarray(schemes.spectral_radius(schemes.transition(a, dt, "imex")))
    np.testing.assert_allclose(rho_imex, 1.0, atol=2e-6)
    a_d, dt_d, g_d = ops.damped_constrain(a_raw * 10, dt_raw=dt_raw, g_raw=g_raw)
    rho = np.asarray(schemes.spectral_radius(schemes.transition(a_d, dt_d, "damped", g_d)))
    assert np.all(rho < 1.0)
    # In the band the modulus is 1/sqrt(1 + dt g): to rounding strictly inside, and to
    # ~sqrt(eps) at the clamped edges (a double eigenvalue is ill-conditioned).
    want = 1 / np.sqrt(1 + np.asarray(dt_d * g_d))
    lo, hi = ops.stable_band(dt_d, g_d)
    inside = np.asarray((a_raw * 10 > lo * 1.01) & (a_raw * 10 < hi * 0.99))
    assert inside.sum() > 20 and (~inside).sum() > 5
    np.testing.assert_allclose(rho[inside], want[inside], rtol=1e-5)
    np.testing.assert_allclose(rho[~inside], want[~inside], rtol=3e-3)


def test_im_modulus_formula():
    a_raw, dt_raw, _ = _random_raw(3)
    a, dt = ops.linoss_constrain(a_raw, dt_raw)
    rho = schemes.spectral_radius(schemes.transition(a, dt, "im"))
    np.testing.assert_allclose(rho, 1 / np.sqrt(1 + np.asarray(dt**2 * a)), rtol=1e-5)


def test_band_edges_are_where_eigenvalues_meet():
    dt = jnp.array([0.3, 0.7, 1.0])
    g = jnp.array([0.0, 0.5, 2.0])
    lo, hi = ops.stable_band(dt, g)
    for edge in (lo, hi):
        tr = schemes.transition(edge, dt, "damped", g)
        trace, det = tr.m11 + tr.m22, tr.m11 * tr.m22 - tr.m12 * tr.m21
        np.testing.assert_allclose(trace**2 - 4 * det, 0.0, atol=1e-5)
    mid = (lo + hi) / 2
    ev = schemes.eigenvalues(schemes.transition(mid, dt, "damped", g))
    assert np.all(np.abs(np.imag(ev)) > 1e-3)  # complex inside the band


def test_damped_constrain_projects_into_the_band_and_keeps_inside_values():
    dt_raw = jnp.zeros(4)  # dt = 0.5
    g_raw = jnp.array([0.2, 0.2, 0.2, -1.0])  # relu -> g = 0 for the last
    dt = jax.nn.sigmoid(dt_raw)
    margin = ops.params.DAMPED_MARGIN
    g_want = jnp.array([0.2, 0.2, 0.2, margin / 0.5])  # g = 0 is raised to the damping floor
    lo, hi = ops.stable_band(dt, g_want, margin)
    a_raw = jnp.array([lo[0] - 1.0, (lo[1] + hi[1]) / 2, hi[2] + 5.0, 1.0])
    a, dt_c, g = ops.damped_constrain(a_raw, dt_raw=dt_raw, g_raw=g_raw)
    np.testing.assert_allclose(a[:3], [lo[0], a_raw[1], hi[2]], rtol=1e-6)
    np.testing.assert_allclose(g, g_want, rtol=1e-6)
    # The margin band lies inside the papers' band, by 2 (1 - sqrt(1 - margin)) sqrt(1 + dt g)
    # / dt^2 at each end.
    lo0, hi0 = ops.stable_band(dt, g_want)
    shift = 2 * (1 - np.sqrt(1 - margin)) * np.sqrt(1 + 0.5 * g_want) / 0.25
    np.testing.assert_allclose(lo - lo0, shift, rtol=1e-2)
    np.testing.assert_allclose(hi0 - hi, shift, rtol=0.05, atol=4e-6)
    np.testing.assert_allclose(dt_c, dt)
    # The clamp passes gradients inside the band only (the reference's behaviour).
    grad = jax.grad(lambda x: jnp.sum(ops.damped_constrain(x, dt_raw=dt_raw, g_raw=g_raw)[0]))(
        a_raw
    )
    np.testing.assert_allclose(grad[:3], [0.0, 1.0, 0.0])


def test_ring_init_places_eigenvalues_on_the_ring():
    key = jax.random.PRNGKey(0)
    raw = ops.ring_init(key, 512, r_min=0.9, r_max=0.99, theta_min=0.1, theta_max=2.0)
    a, dt, g = ops.damped_constrain(raw["a_raw"], dt_raw=raw["dt_raw"], g_raw=raw["g_raw"])
    # Already in the band: the projection changes nothing.
    np.testing.assert_allclose(a, raw["a_raw"], rtol=1e-6)
    ev = np.asarray(schemes.eigenvalues(schemes.transition(a, dt, "damped", g)))
    r, theta = np.abs(ev), np.abs(np.angle(ev))
    assert r.min() > 0.9 - 1e-4 and r.max() < 0.99 + 1e-4
    assert theta.min() > 0.1 - 1e-3 and theta.max() < 2.0 + 1e-3
    # A degenerate ring gives exactly the requested eigenvalue.
    raw = ops.ring_init(key, 8, r_min=0.95, r_max=0.95, theta_min=1.0, theta_max=1.0)
    a, dt, g = ops.damped_constrain(raw["a_raw"], dt_raw=raw["dt_raw"], g_raw=raw["g_raw"])
    ev = np.asarray(schemes.eigenvalues(schemes.transition(a, dt, "damped", g)))
    np.testing.assert_allclose(np.abs(ev), 0.95, rtol=1e-5)
    np.testing.assert_allclose(np.abs(np.angle(ev)), 1.0, rtol=1e-4)


def test_ring_init_rejects_bad_rings():
    with pytest.raises(ValueError, match="r_min"):
        ops.ring_init(jax.random.PRNGKey(0), 4, r_min=0.5, r_max=1.2)
    with pytest.raises(ValueError, match="theta_min"):
        ops.ring_init(jax.random.PRNGKey(0), 4, theta_min=2.0, theta_max=1.0)


def test_uniform_init_and_init_oscillators():
    raw = ops.uniform_init(jax.random.PRNGKey(0), 1000)
    for x in raw.values():
        assert x.shape == (1000,) and 0.0 <= float(x.min()) and float(x.max()) < 1.0
    im = ops.init_oscillators(jax.random.PRNGKey(0), 7, "im")
    assert sorted(im) == ["a_raw", "dt_raw"]
    damped = ops.init_oscillators(jax.random.PRNGKey(0), 7, "damped")
    assert sorted(damped) == ["a_raw", "dt_raw", "g_raw"]
    with pytest.raises(ValueError, match="lacks"):
        ops.init_oscillators(jax.random.PRNGKey(0), 7, "im", init=lambda k, n, d: {})


def test_complex_uniform_init_bounds():
    init = ops.complex_uniform_init()
    b = init(jax.random.PRNGKey(0), (64, 16, 2))
    assert float(jnp.abs(b).max()) <= 1 / 4 and float(jnp.abs(b).max()) > 0.2
    with pytest.raises(ValueError, match=r"\[\.\.\., 2\]"):
        init(jax.random.PRNGKey(0), (4, 3))


def test_transition_needs_g_for_damped_and_rejects_unknown_names():
    with pytest.raises(ValueError, match="needs the damping"):
        schemes.transition(jnp.ones(2), jnp.ones(2), "damped")
    with pytest.raises(ValueError, match="Unknown discretization"):
        schemes.transition(jnp.ones(2), jnp.ones(2), "euler")


def test_damped_constrain_takes_keywords_and_returns_the_order_of_constrain():
    a_raw, dt_raw, g_raw = _random_raw(4, 8)
    with pytest.raises(TypeError):
        ops.damped_constrain(a_raw, g_raw, dt_raw)  # the old positional order fails loudly
    got = ops.damped_constrain(a_raw, dt_raw=dt_raw, g_raw=g_raw)
    want = ops.constrain("damped", a_raw, dt_raw, g_raw)
    for x, y in zip(got, want):
        np.testing.assert_array_equal(x, y)
    assert got[1].shape == (8,) and float(got[1].min()) > 0 and float(got[1].max()) <= 1


def test_stable_constraint_keeps_imex_strictly_inside_and_changes_nothing_else():
    a_raw, dt_raw, g_raw = _random_raw(5)
    a_raw = a_raw * 10  # many outside the IMEX range a dt^2 < 4
    assert ops.CONSTRAINTS == ("paper", "stable")
    a_p, dt_p, _ = ops.constrain("imex", a_raw, dt_raw)
    a_s, dt_s, _ = ops.constrain("imex", a_raw, dt_raw, constraint="stable")
    np.testing.assert_array_equal(dt_p, dt_s)
    over = np.asarray(a_p * dt_p**2 > 4)
    assert over.sum() > 20
    assert np.all(np.asarray(a_s * dt_s**2) <= 4 - 0.04 + 1e-5)
    inside = np.asarray(a_p * dt_p**2 < 3.95)
    np.testing.assert_array_equal(np.asarray(a_s)[inside], np.asarray(a_p)[inside])
    assert np.all(
        np.asarray(schemes.spectral_radius(schemes.transition(a_s, dt_s, "imex"))) < 1 + 1e-5
    )
    assert np.all(
        np.asarray(schemes.spectral_radius(schemes.transition(a_p, dt_p, "imex")))[over] > 1.1
    )
    for disc, g in (("im", None), ("damped", g_raw)):
        paper = ops.constrain(disc, a_raw, dt_raw, g)
        stable = ops.constrain(disc, a_raw, dt_raw, g, constraint="stable")
        for x, y in zip(paper, stable):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="Unknown constraint 'safe'"):
        ops.constrain("imex", a_raw, dt_raw, constraint="safe")


def test_stable_imex_never_overflows_over_a_million_steps():
    # 24 random raw IMEX parameter sets (as 24 independent oscillators), a_raw drawn wider
    # than the papers' U[0, 1) init, as training can move it: with the papers' constraint some
    # leave the stable range and overflow, with "stable" none does.
    key_a, key_dt, key_u = jax.random.split(jax.random.PRNGKey(12), 3)
    a_raw = jax.random.uniform(key_a, (24,), maxval=20.0)
    dt_raw = jax.random.normal(key_dt, (24,))
    u = jax.random.uniform(key_u, (1, 1_000_000, 1), minval=-1.0, maxval=1.0)
    b = jnp.ones((24, 1, 2)) / 2
    c = jnp.ones((1, 24, 2)) / 24
    finite = {}
    for constraint in ops.CONSTRAINTS:
        a, dt, _ = ops.constrain("imex", a_raw, dt_raw, constraint=constraint)
        _, state = ops.linoss_apply(
            u, a, dt, b, c, jnp.zeros(1), discretization="imex", return_state=True
        )
        finite[constraint] = np.isfinite(np.asarray(state.y)).all(axis=(0, 1))
        if constraint == "paper":
            unstable = np.asarray(a * dt**2 > 4)
    assert finite["stable"].all()
    assert unstable.sum() >= 3
    np.testing.assert_array_equal(~finite["paper"], unstable)


def _float32_spectral_radius(a, dt, g):
    """The spectral radius of the float32 transition the scans run (``schemes.transition``
    in float32, as ``linoss_apply`` computes it), its eigenvalues computed in float64."""
    tr = schemes.transition(jnp.float32(a), jnp.float32(dt), "damped", jnp.float32(g))
    m11, m12, m21, m22 = (np.asarray(x, np.float64) for x in tuple(tr)[:4])
    half = (m11 + m22) / 2
    root = np.sqrt((half * half - (m11 * m22 - m12 * m21)).astype(complex))
    return np.maximum(np.abs(half + root), np.abs(half - root))


@pytest.mark.parametrize("constraint", ops.CONSTRAINTS)
def test_damped_constraint_keeps_the_float32_spectral_radius_below_one(constraint):
    # The edge the issue found: raw a = 50, dt = 20, g = -10 became a = 4, dt = 1, g = 0, a
    # double eigenvalue at -1 (radius 1.00000002 in float32). Then random raw sets, wide:
    # a_raw far beyond either band edge, dt from ~1e-7 to 1, g_raw negative, tiny or large.
    edge = ops.constrain(
        "damped", jnp.float32(50), jnp.float32(20), jnp.float32(-10), constraint=constraint
    )
    assert float(_float32_spectral_radius(*edge)) < 1.0
    rng = np.random.default_rng(0)
    n = 20_000
    a_raw = rng.uniform(-1, 1, n) * rng.choice([1.0, 10.0, 1e2, 1e4], n)
    dt_raw = rng.normal(0.0, 4.0, n)
    g_raw = rng.normal(0.0, 1.0, n) * rng.choice([0.0, 1e-6, 1e-3, 1.0, 10.0], n)
    raw = [jnp.asarray(x, jnp.float32) for x in (a_raw, dt_raw, g_raw)]
    a, dt, g = ops.constrain("damped", *raw, constraint=constraint)
    radius = _float32_spectral_radius(a, dt, g)
    assert np.all(np.isfinite(np.asarray(a))) and radius.max() < 1.0, radius.max()
    # And away from the dt^2 floor (dt >= 1e-3), at least the documented margin: the modulus
    # is sqrt(det) <= 1 / sqrt(1 + DAMPED_MARGIN), to the determinant's rounding.
    usual = np.asarray(dt) >= 1e-3
    assert radius[usual].max() < 1 - 0.4 * ops.params.DAMPED_MARGIN


@pytest.mark.slow
def test_damped_edges_stay_finite_and_accurate_at_1e5_steps_on_every_path():
    # The edge (raw a = 50, dt = 20, g = -10) and 40 random raw sets, many clamped to
    # the band edges with little damping, under both constraints: before the margins and the
    # double-word powers, associative and chunked went non-finite at steps 69-74k. Each path
    # is compared with the float64 reference, bounded by the float32 loop's own error.
    from conftest import optimized_jit
    from oscillator_reference import reference_apply, rel_err

    rng = np.random.default_rng(3)
    n = 41
    a_raw = np.r_[50.0, rng.uniform(-1, 1, n - 1) * rng.choice([1.0, 1e2, 1e4], n - 1)]
    dt_raw = np.r_[20.0, rng.normal(0.0, 2.0, n - 1)]
    g_raw = np.r_[-10.0, rng.normal(0.0, 1.0, n - 1) * rng.choice([0.0, 1e-4, 1.0], n - 1)]
    raw = [jnp.asarray(x, jnp.float32) for x in (a_raw, dt_raw, g_raw)]
    length = 100_000
    u = jax.random.uniform(jax.random.PRNGKey(0), (1, length, 1), minval=-1.0, maxval=1.0)
    b = jnp.ones((n, 1, 2)) / 2
    c = jnp.zeros((1, n, 2)).at[..., 0].set(1 / n)  # Re(C y): the mean of the real parts
    d = jnp.zeros(1)
    paths = {  # 10^5 steps: compiled with XLA's optimisation (see conftest.optimized_jit)
        (scan, masked): optimized_jit(
            lambda u, a, dt, g, scan=scan, masked=masked: ops.linoss_apply(
                u,
                a,
                dt,
                b,
                c,
                d,
                g=g,
                discretization="damped",
                scan=scan,
                mask=jnp.ones((1, length), bool) if masked else None,  # the per-step scan
            )
        )
        for scan, masked in (
            ("sequential", False),
            ("associative", False),
            ("chunked", False),
            ("associative", True),
        )
    }
    reference = optimized_jit(  # compiled once, the parameters as arguments
        lambda u, a, dt, g: reference_apply(u, a, dt, b, c, d, g, discretization="damped")[0]
    )
    for constraint in ops.CONSTRAINTS:
        a, dt, g = ops.constrain("damped", *raw, constraint=constraint)
        with jax.enable_x64(True):
            ref = np.asarray(reference(u, a, dt, g))
        errors = {}
        for (scan, flags), path in paths.items():
            out = path(u, a, dt, g)
            assert np.all(np.isfinite(np.asarray(out))), (constraint, scan, flags)
            errors[(scan, flags)] = rel_err(out, ref)
        # Near a double eigenvalue float32 itself is inaccurate over 10^5 steps (the loop's
        # error here is tens of percent); the parallel paths add at most a factor.
        loop = errors.pop(("sequential", False))
        for scan, err in errors.items():
            assert err < 2 * loop, (constraint, scan, err, loop)
