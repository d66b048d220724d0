"""Time-varying step sizes: ``linoss_apply`` / ``linoss_step`` with ``dt [..., L, P]``.

Every path that takes a per-step ``dt`` against the float64 step-by-step reference (values
and gradients, including the gradient of every ``dt[t]``), a constant per-step ``dt`` against
today's ``dt [P]``, the routing around ``chunked``, the single step, the helpers of
``flax_linoss.ops.steps`` and the errors. The Pallas kernels are checked in
test_ops_pallas.py, sequence parallelism in test_ops_seqpar.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oscillator_reference import random_problem, random_steps, reference_apply

from flax_linoss import ops
from flax_linoss.ops._auto import resolve_scan
from flax_linoss.ops._scans import native

SCANS = ["sequential", "associative", "adjoint", "native"]
NAMES = ["u", "a", "dt", "b", "c", "d", "g"]


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-30))


def _flags(rng, batch, length):
    valid = rng.uniform(size=(batch, length)) > 0.2
    valid[0, 60:66] = False  # held steps across the native kernel's 64-step chunk boundary
    seg = np.cumsum(rng.uniform(size=(batch, length)) < 0.03, axis=1)
    seg[-1, 64:] += 5  # a segment starting at a chunk boundary
    return valid, seg


def _reference_grads(disc, args, ct, ct_z, st0, reverse, **flags):
    flip = (lambda x: None if x is None else x[:, ::-1]) if reverse else (lambda x: x)
    nargs = len(args)
    with jax.enable_x64(True):

        def loss(*p):
            out, z_l, _ = reference_apply(
                flip(p[0]),
                p[1],
                flip(p[2]) if p[2].ndim > 1 else p[2],
                *p[3:6],
                p[6] if nargs == 7 else None,
                discretization=disc,
                z0=st0.to_complex()[0],
                y0=st0.to_complex()[1],
                valid=flip(flags.get("mask")),
                segment_ids=flip(flags.get("segment_ids")),
            )
            z_l = jnp.stack([jnp.real(z_l), jnp.imag(z_l)], 1)
            return jnp.sum(ct * flip(out)) + jnp.sum(ct_z * z_l), flip(out)

        f64 = [jnp.asarray(x, jnp.float64) for x in args]
        grads, out = jax.jit(jax.grad(loss, argnums=tuple(range(nargs)), has_aux=True))(*f64)
        return [np.asarray(x) for x in grads], np.asarray(out)


def _grads(scan, disc, args, ct, ct_z, st0, reverse, **flags):
    nargs = len(args)

    def loss(*p):
        out, state = ops.linoss_apply(
            *p[:6],
            g=p[6] if nargs == 7 else None,
            discretization=disc,
            scan=scan,
            initial_state=st0,
            return_state=True,
            reverse=reverse,
            **flags,
        )
        return jnp.sum(ct * out) + jnp.sum(ct_z * state.z), out

    return jax.jit(jax.grad(loss, argnums=tuple(range(nargs)), has_aux=True))(*args)


# Length 130 crosses the native kernel's checkpoints (every 64 steps) and is no multiple of
# them; with flags, an initial state and the final state's cotangent; reverse for one scheme.
@pytest.mark.parametrize(
    ("disc", "flagged", "reverse"),
    [("im", True, False), ("imex", False, True), ("damped", True, True)],
)
def test_per_step_dt_matches_float64_reference_values_and_gradients(disc, flagged, reverse):
    batch, length, num_osc = 2, 130, 3
    u, a, _, b, c, d, g = random_problem(length, batch, length, 3, num_osc, disc)
    dt = random_steps(7, (batch, length, num_osc), disc, a, g)  # sizes up to 2
    rng = np.random.default_rng(1)
    ct = rng.normal(size=u.shape).astype(np.float32)
    ct_z = rng.normal(size=(batch, 2, num_osc)).astype(np.float32)
    st0 = ops.LinOSSState.from_complex(
        *(rng.normal(size=(2, batch, num_osc)) + 1j * rng.normal(size=(2, batch, num_osc)))
    )
    flags = {}
    if flagged:
        flags["mask"], flags["segment_ids"] = _flags(rng, batch, length)
    args = (u, a, dt, b, c, d, g)[: 7 if disc == "damped" else 6]
    ref_grads, ref_out = _reference_grads(disc, args, ct, ct_z, st0, reverse, **flags)
    for scan in SCANS:
        grads, out = _grads(scan, disc, args, ct, ct_z, st0, reverse, **flags)
        assert grads[2].shape == dt.shape  # d/d dt[t] for every step
        assert rel_err(out, ref_out) < 2e-5, (scan, "output", rel_err(out, ref_out))
        for name, gr, rg in zip(NAMES, grads, ref_grads):
            assert rel_err(gr, rg) < 2e-5, (scan, f"d/d{name}", rel_err(gr, rg))


def test_dt_without_a_batch_axis_is_shared_by_the_batch():
    u, a, _, b, c, d, _ = random_problem(2, 3, 20, 2, 4, "im")
    dt = random_steps(3, (20, 4), "im", a)
    ct = np.random.default_rng(0).normal(size=u.shape).astype(np.float32)
    with jax.enable_x64(True):
        ref = jax.grad(
            lambda x: jnp.sum(ct * reference_apply(u, a, x, b, c, d, discretization="im")[0])
        )(jnp.asarray(dt, jnp.float64))
    # Broadcasting happens before any path runs: one path shows it.
    got = jax.grad(lambda x: jnp.sum(ct * ops.linoss_apply(u, a, x, b, c, d, scan="adjoint")))(dt)
    assert got.shape == (20, 4) and rel_err(got, ref) < 2e-5


@pytest.mark.parametrize("scan", SCANS)
def test_a_constant_per_step_dt_equals_the_time_invariant_layer(scan):
    # The same problem with dt [P] and with dt broadcast to [B, L, P]: both match the float64
    # reference, and each other: bit for bit where the path does the same arithmetic per step
    # (the associative path's per-step elements are another algorithm: to rounding).
    disc, batch, length = "damped", 2, 70
    u, a, dt, b, c, d, g = random_problem(9, batch, length, 3, 4, disc)
    steps = np.broadcast_to(dt, (batch, length, 4)).copy()
    ct = np.random.default_rng(2).normal(size=u.shape).astype(np.float32)
    kw = dict(g=g, discretization=disc, scan=scan)
    if scan == "native" and not native.available():
        pytest.skip(f"native kernel unavailable: {native.unavailable_reason()}")
    fixed, varying = (np.asarray(ops.linoss_apply(u, a, x, b, c, d, **kw)) for x in (dt, steps))
    if scan == "associative":
        assert rel_err(varying, fixed) < 1e-6
    else:
        np.testing.assert_array_equal(varying, fixed)

    def run(x):
        def loss(a, x):
            return jnp.sum(ct * ops.linoss_apply(u, a, x, b, c, d, **kw))

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(a, x)

    (value, (g_a, g_dt)), (value_t, (g_a_t, g_dt_t)) = run(dt), run(steps)
    with jax.enable_x64(True):

        def ref_loss(a, x):
            out = reference_apply(u, a, x, b, c, d, g, discretization=disc)[0]
            return jnp.sum(jnp.asarray(ct, jnp.float64) * out)

        f64 = lambda x: jnp.asarray(x, jnp.float64)
        ref, (ref_a, ref_dt) = jax.value_and_grad(ref_loss, argnums=(0, 1))(f64(a), f64(dt))
    # The d/d dt [P] is the sum of the d/d dt[t] over the steps.
    for v, ga, gd in ((value, g_a, g_dt), (value_t, g_a_t, np.sum(g_dt_t, (0, 1)))):
        assert rel_err(v, ref) < 1e-5
        assert rel_err(ga, ref_a) < 1e-5
        assert rel_err(gd, ref_dt) < 1e-5


def test_the_step_with_per_example_dt_continues_the_sequence():
    disc = "imex"
    u, a, _, b, c, d, _ = random_problem(3, 3, 12, 4, 5, disc)
    dt = random_steps(4, (3, 12, 5), disc, a)
    full, final = ops.linoss_apply(
        u, a, dt, b, c, d, discretization=disc, scan="sequential", return_state=True
    )
    state = ops.LinOSSState.zeros((3,), 5)
    outs = []
    for t in range(12):
        state, y_t = ops.linoss_step(state, u[:, t], a, dt[:, t], b, c, d, discretization=disc)
        outs.append(y_t)
    np.testing.assert_allclose(np.stack(outs, 1), full, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(state.y, final.y, rtol=1e-6, atol=1e-6)


def test_chunked_refuses_and_auto_routes_around_a_time_varying_dt(monkeypatch):
    u, a, _, b, c, d, _ = random_problem(0, 1, 5, 2, 2, "im")
    dt = random_steps(0, (1, 5, 2), "im", a)
    with pytest.raises(ValueError, match="time-invariant by construction"):
        ops.linoss_apply(u, a, dt, b, c, d, scan="chunked")
    assert not ops.SCAN_TABLE[ops.CHUNKED].time_varying
    assert [s for s, p in ops.SCAN_TABLE.items() if not p.time_varying] == [ops.CHUNKED]
    for platform in ("tpu", "gpu", "cpu"):  # 8 devices under a plain jit here
        assert resolve_scan("auto", time_varying=True, platform=platform) != "chunked"
    assert resolve_scan("auto", time_varying=True, platform="tpu") == "associative"
    monkeypatch.setattr(jax, "device_count", lambda: 1)  # per device: the kernels
    assert resolve_scan("auto", time_varying=True, platform="tpu") == "pallas"


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((2, 6, 4), r"`dt` must have shape \[P\] = \[4\].*\[2, 5, 4\]"),
        ((2, 5, 3), r"`dt` must have shape \[P\] = \[4\]"),
        ((3, 5, 4), r"broadcasting to \[2, 5, 4\]"),
    ],
)
def test_bad_per_step_dt_shapes_are_clear_errors(shape, match):
    u, a, _, b, c, d, _ = random_problem(0, 2, 5, 3, 4, "im")
    with pytest.raises(ValueError, match=match):
        ops.linoss_apply(u, a, np.ones(shape, np.float32), b, c, d)


def test_per_step_dt_values_must_be_positive_not_at_most_one():
    u, a, _, b, c, d, _ = random_problem(0, 2, 5, 3, 4, "im")
    big = np.full((2, 5, 4), 3.0, np.float32)  # a long gap: a valid step size
    assert np.all(np.isfinite(ops.linoss_apply(u, a, big, b, c, d)))
    with pytest.raises(ValueError, match=r"`dt` must be > 0.0"):
        ops.linoss_apply(u, a, big * 0, b, c, d)
    with pytest.raises(ValueError, match=r"`dt` must be \(0.0, 1.0\]"):
        ops.linoss_apply(u, a, big[0, 0], b, c, d)  # [P] stays a constrained dt
    with pytest.raises(ValueError, match=r"varying, \[..., P\] broadcasting to \[2, 4\]"):
        ops.linoss_step(ops.LinOSSState.zeros((2,), 4), u[:, 0], a, big[:, :2], b, c, d)


# ---------------------------------------------------------------------------- ops.steps


def test_timestamp_gaps_on_a_regular_grid_are_one_time_unit():
    t = 0.5 * np.arange(6, dtype=np.float32)[None].repeat(2, 0)
    np.testing.assert_array_equal(ops.timestamp_gaps(t, time_scale=0.5), np.ones((2, 6)))
    np.testing.assert_array_equal(ops.timestamp_gaps(t, time_scale=0.5, reverse=True), 1.0)


def test_timestamp_gaps_skip_masked_steps_and_restart_per_segment():
    t = np.array([[0.0, 1.0, 3.0, 99.0, 4.5, 0.0, 2.0]], np.float32)
    mask = np.array([[1, 1, 1, 0, 1, 1, 1]], bool)
    seg = np.array([[0, 0, 0, 0, 0, 1, 1]])
    gaps = ops.timestamp_gaps(t, mask=mask, segment_ids=seg)
    np.testing.assert_allclose(gaps, [[1.0, 1.0, 2.0, 1.0, 1.5, 1.0, 2.0]])
    back = ops.timestamp_gaps(t, mask=mask, segment_ids=seg, reverse=True)
    np.testing.assert_allclose(back, [[1.0, 2.0, 1.5, 1.0, 1.0, 2.0, 1.0]])
    cont = ops.timestamp_gaps(t[:, :3], initial_timestamp=np.array([-0.5], np.float32))
    np.testing.assert_allclose(cont, [[0.5, 1.0, 2.0]])


def test_timestamps_that_do_not_increase_are_a_clear_error():
    t = np.array([[0.0, 2.0, 1.0]], np.float32)
    with pytest.raises(ValueError, match="step 2 of sequence 0 is not after"):
        ops.timestamp_gaps(t)
    ops.timestamp_gaps(t, mask=np.array([[1, 1, 0]], bool))  # a masked step may be anything
    with pytest.raises(ValueError, match="time_scale must be > 0"):
        ops.timestamp_gaps(t, time_scale=0.0)


@pytest.mark.parametrize("disc", ["im", "imex", "damped"])
def test_clamped_steps_keep_every_eigenvalue_inside_the_unit_circle(disc):
    rng = np.random.default_rng(0)
    a = rng.uniform(0.0, 30.0, 64).astype(np.float32)
    g = rng.uniform(0.0, 2.0, 64).astype(np.float32) if disc == "damped" else None
    dt = np.geomspace(0.01, 100.0, 64, dtype=np.float32)[:, None].repeat(64, 1)  # [L, P]
    steps = ops.clamp_steps(disc, a, dt, g)
    if disc == "imex":  # the "stable" constraint's bound, per step
        assert np.all(steps**2 * a <= (4.0 - ops.params.IMEX_MARGIN) * (1 + 1e-6))
    if disc == "damped":  # inside (or, for short steps, below) the band
        assert np.all(a <= ops.stable_band(steps, g)[1] * (1 + 1e-6))
    radius = np.asarray(ops.schemes.spectral_radius(ops.schemes.transition(a, steps, disc, g)))
    assert np.all(radius <= 1.0 + 1e-3), radius.max()  # (a double root at the band's edge)
    if disc == "im":
        assert steps is dt  # stable for every step: nothing to clamp
    else:
        assert np.all(steps <= dt) and np.any(steps < dt)
        free = ops.step_limit(disc, a, g)
        np.testing.assert_array_equal(np.minimum(dt, free), steps)  # a pure clamp
    grads = jax.grad(lambda a: jnp.sum(ops.clamp_steps(disc, a, dt, g)))(np.zeros_like(a))
    assert np.all(np.isfinite(grads))  # a = 0 (no bound) has no inf / nan gradient
