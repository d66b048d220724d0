"""flax_linoss.ops.linoss_apply: every CPU scan path against the float64 step-by-step reference.

The Pallas kernels (in the interpreter) are checked the same way in test_ops_pallas.py,
sequence parallelism in test_ops_seqpar.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oscillator_reference import (
    assert_rel_close,
    random_problem,
    reference_apply,
    reference_grads,
    reference_step,
    rel_err,
)

from flax_linoss import ops
from flax_linoss.ops._auto import resolve_scan
from flax_linoss.ops._scans import chunked

SCANS = ["sequential", "associative", "adjoint", "native", "chunked"]
FLAG_SCANS = ["sequential", "associative", "adjoint", "native"]
DISCS = ["im", "imex", "damped"]
# "Several thousand" steps included, and lengths around the chunked path's chunk (64 on CPU)
# and the native kernel's checkpoint spacing (64). Tolerances are relative to the largest
# reference value.
LENGTHS = [1, 2, 37, 3000]


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

    ref_grads, ref_out, _ = reference_grads(args, disc, ct)

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
    # The step shares the sequential scan's arithmetic (up to the matmuls' rounding, which
    # depends on their shapes and the machine): both equal the reference.
    with jax.enable_x64(True):
        ref, z_l, y_l = reference_apply(u, a, dt, b, c, d, g, discretization=disc)
    ref_state = ops.LinOSSState.from_complex(np.asarray(z_l), np.asarray(y_l))
    assert_rel_close((np.stack(outs, 1), state), (ref, ref_state), 1e-5, "steps")
    assert_rel_close((full, final), (ref, ref_state), 1e-5, "scan")


# Each path with one scheme (the schemes differ only in the coefficients the paths share).
@pytest.mark.parametrize(("scan", "disc"), [(s, DISCS[i % 3]) for i, s in enumerate(SCANS)])
def test_final_state_continues_a_sequence_exactly(disc, scan):
    u, a, dt, b, c, d, g = random_problem(4, 2, 50, 3, 4, disc)
    kw = dict(g=g, discretization=disc, scan=scan)
    whole, whole_state = ops.linoss_apply(u, a, dt, b, c, d, return_state=True, **kw)
    first, state = ops.linoss_apply(u[:, :21], a, dt, b, c, d, return_state=True, **kw)
    second, end_state = ops.linoss_apply(
        u[:, 21:], a, dt, b, c, d, initial_state=state, return_state=True, **kw
    )
    # Both ways are the reference's outputs and final state.
    with jax.enable_x64(True):
        ref, z_l, y_l = reference_apply(u, a, dt, b, c, d, g, discretization=disc)
    ref_state = ops.LinOSSState.from_complex(np.asarray(z_l), np.asarray(y_l))
    split = (np.concatenate([first, second], 1), end_state)
    assert_rel_close(split, (ref, ref_state), 1e-5, "continued")
    assert_rel_close((whole, whole_state), (ref, ref_state), 1e-5, "whole")


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
    with jax.enable_x64(True):
        flipped = reference_apply(u[:, ::-1], a, dt, b, c, d, g, discretization="damped")[0]
    assert_rel_close(rev, np.asarray(flipped)[:, ::-1], 1e-5)
    assert rel_err(rev, ops.linoss_apply(u, a, dt, b, c, d, **kw)) > 1e-2


def _flags(rng, batch, length):
    """A mask with masked steps at the start, the end, in runs and at a segment start, and
    packed segments (one of them a single step)."""
    valid = rng.uniform(size=(batch, length)) > 0.25
    valid[:, 0] = False
    valid[0, -3:] = False
    seg = np.cumsum(rng.uniform(size=(batch, length)) < 0.08, axis=1)
    seg[0, length // 2] += 100  # a one-step segment
    return valid, seg


@pytest.mark.parametrize(("disc", "length"), [("im", 37), ("imex", 64), ("damped", 130)])
def test_flags_match_float64_reference_values_and_gradients(disc, length):
    # Masks (hold) and packed segments (reset) on every path that takes them, against the
    # reference's step-by-step semantics; 130 crosses the native kernel's 64-step chunks.
    u, a, dt, b, c, d, g = random_problem(length + 1, 3, length, 4, 5, disc)
    rng = np.random.default_rng(length)
    valid, seg = _flags(rng, 3, length)
    ct = rng.normal(size=u.shape).astype(np.float32)
    ct_z = rng.normal(size=(3, 2, 5)).astype(np.float32)
    st0 = ops.LinOSSState.from_complex(
        *(rng.normal(size=(2, 3, 5)) + 1j * rng.normal(size=(2, 3, 5))).astype(np.complex64)
    )
    nargs = 7 if disc == "damped" else 6
    args = (u, a, dt, b, c, d, g)[:nargs]

    z0, y0 = st0.to_complex()
    ref_grads, ref_out, _ = reference_grads(
        args, disc, ct, ct_z=ct_z, z0=z0, y0=y0, valid=valid, segment_ids=seg
    )

    for scan in FLAG_SCANS:

        def loss(*p, scan=scan):
            out, state = ops.linoss_apply(
                *p[:6],
                g=p[6] if disc == "damped" else None,
                discretization=disc,
                scan=scan,
                mask=valid,
                segment_ids=seg,
                initial_state=st0,
                return_state=True,
            )
            return jnp.sum(ct * out) + jnp.sum(ct_z * state.z), out

        grads, out = jax.jit(jax.grad(loss, argnums=tuple(range(nargs)), has_aux=True))(*args)
        assert rel_err(out, ref_out) < 2e-5, (scan, "output", rel_err(out, ref_out))
        for name, gr, rg in zip("u a dt b c d g".split(), grads, ref_grads):
            assert rel_err(gr, rg) < 2e-5, (scan, f"d/d{name}", rel_err(gr, rg))


@pytest.mark.parametrize("scan", [*FLAG_SCANS, "auto"])
def test_masked_steps_are_as_if_removed(scan):
    u, a, dt, b, c, d, _ = random_problem(8, 1, 20, 3, 4, "im")
    valid = np.ones((1, 20), bool)
    valid[0, [0, 1, 7, 8, 9, 19]] = False
    garbage = u.copy()
    garbage[~valid] = 1e3  # what padded positions hold must not matter
    out = ops.linoss_apply(garbage, a, dt, b, c, d, mask=valid, scan=scan)
    with jax.enable_x64(True):
        alone = reference_apply(u[:, valid[0]], a, dt, b, c, d, discretization="im")[0]
    assert_rel_close(out[:, valid[0]], alone, 1e-5)


@pytest.mark.parametrize(("scan", "reverse"), [(s, i % 2 == 0) for i, s in enumerate(FLAG_SCANS)])
def test_segments_restart_the_state(scan, reverse):
    u, a, dt, b, c, d, g = random_problem(9, 2, 24, 3, 4, "damped")
    seg = np.repeat(np.array([[1, 2, 3], [5, 5, 6]]), 8, axis=1)
    kw = dict(g=g, discretization="damped", scan=scan, reverse=reverse)
    out = ops.linoss_apply(u, a, dt, b, c, d, segment_ids=seg, **kw)
    flip = (lambda x: x[:, ::-1]) if reverse else (lambda x: x)
    for row in range(2):
        for sid in np.unique(seg[row]):
            sel = seg[row] == sid
            with jax.enable_x64(True):
                piece = flip(u[row : row + 1, sel])
                alone = reference_apply(piece, a, dt, b, c, d, g, discretization="damped")[0]
            assert_rel_close(out[row : row + 1, sel], flip(np.asarray(alone)), 1e-5)


def test_chunked_refuses_flags_and_auto_keeps_flags_on_the_fast_path():
    u, a, dt, b, c, d, _ = random_problem(0, 1, 5, 2, 2, "im")
    with pytest.raises(ValueError, match="time-invariant"):
        ops.linoss_apply(u, a, dt, b, c, d, scan="chunked", mask=np.ones((1, 5), bool))
    # Packed and padded inputs stay on the fused paths: adjoint / native on CPU, the kernels
    # per device on accelerators.
    assert resolve_scan("auto", flags=True, platform="cpu") == "adjoint"  # 8 devices, jit
    assert resolve_scan("auto", flags=True, platform="tpu") == "associative"


def test_fft_was_removed_with_a_clear_message():
    assert "fft" not in ops.SCANS
    with pytest.raises(ValueError, match=r"Unknown scan 'fft': it was removed.*'chunked'"):
        ops.table.check_scan("fft")
    u, a, dt, b, c, d, _ = random_problem(0, 1, 5, 2, 2, "im")
    with pytest.raises(ValueError, match="removed"):
        ops.linoss_apply(u, a, dt, b, c, d, scan="fft")


def test_auto_resolves_per_platform(monkeypatch):
    # This session has 8 CPU devices: under plain jit XLA may split the batch over them, so
    # the partitionable pure-JAX paths (kernels per device: test_ops_native.py and below).
    assert jax.device_count() == 8
    assert resolve_scan("auto", platform="cpu") == "adjoint"
    assert resolve_scan("auto", platform="tpu") == "chunked"
    assert resolve_scan("auto", platform="gpu") == "chunked"
    assert resolve_scan("auto", platform="cuda", flags=True) == "associative"
    assert resolve_scan("chunked", platform="tpu") == "chunked"
    # Per device (one device here, like shard_map / pmap): the kernels.
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    assert resolve_scan("auto", platform="tpu") == "pallas"
    assert resolve_scan("auto", platform="tpu", flags=True) == "pallas"
    assert resolve_scan("auto", platform="tpu", dtype=jnp.float64) == "chunked"  # f32 kernels
    monkeypatch.setenv("FLAX_LINOSS_KERNELS", "0")
    assert resolve_scan("auto", platform="tpu") == "chunked"
    with pytest.raises(RuntimeError, match="FLAX_LINOSS_KERNELS=0"):
        resolve_scan("pallas", platform="tpu")


def test_scan_table_is_the_one_source():
    # Every name is an entry; the enum members are their strings; capabilities as documented.
    assert ops.SCANS == tuple(s.value for s in ops.Scan)
    assert set(ops.SCAN_TABLE) == set(ops.Scan)
    assert ops.Scan.CHUNKED == "chunked" and ops.CHUNKED == "chunked"
    assert {"chunked": 1}[ops.Scan.CHUNKED] == 1  # hashes like its string
    assert ops.table.check_scan(ops.PALLAS) == "pallas"
    table = ops.SCAN_TABLE
    assert [s for s, p in table.items() if not p.flags] == [ops.Scan.CHUNKED]
    assert [s for s, p in table.items() if p.forward_ad] == [ops.Scan.SEQUENTIAL]
    assert {s for s, p in table.items() if not p.partitions} == {ops.NATIVE, ops.PALLAS}
    assert table[ops.NATIVE].unavailable_reason("tpu") is not None
    assert table[ops.CHUNKED].unavailable_reason("gpu") is None


def test_forward_mode_autodiff_where_the_table_says():
    u, a, dt, b, c, d, _ = random_problem(3, 1, 9, 2, 3, "im")
    f = lambda scan: lambda x: ops.linoss_apply(x, a, dt, b, c, d, scan=scan)
    _, tangent = jax.jvp(f("sequential"), (u,), (np.ones_like(u),))
    assert np.all(np.isfinite(tangent))
    with pytest.raises(TypeError):
        jax.jvp(f("adjoint"), (u,), (np.ones_like(u),))


def test_chunked_partitions_over_the_batch_under_a_multi_device_jit():
    # What auto uses on accelerators under a plain jit: XLA's SPMD partitioner splits it like
    # any op (no gathering of the sequence onto every device), with the same result.
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    u, a, dt, b, c, d, _ = random_problem(14, 8, 70, 3, 4, "im")
    us = jax.device_put(u, NamedSharding(mesh, P("data")))

    def loss(u, a):
        return jnp.sum(ops.linoss_apply(u, a, dt, b, c, d, scan="chunked") ** 2)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    hlo = step.lower(us, a).compile().as_text()
    assert "all-gather" not in hlo  # the [N, L, ...] arrays stay split over the batch
    (val, (g_u, g_a)), want = step(us, a), jax.jit(step)(u, a)
    assert g_u.sharding.spec[0] == "data"
    # Same path, batch split or not: the same numbers up to the matmuls' rounding.
    assert_rel_close((val, g_u, g_a), (want[0], *want[1]), 1e-5)


def test_chunk_length_per_platform():
    assert chunked.chunk_length(16384, "tpu") == 128
    assert chunked.chunk_length(16384, "gpu") == 64
    assert chunked.chunk_length(5, "tpu") == 8  # capped at the next power of two


def test_leading_batch_dims_and_complex_parameters():
    u, a, dt, b, c, d, _ = random_problem(10, 6, 11, 3, 4, "im")
    bc = b[..., 0] + 1j * b[..., 1]
    cc = c[..., 0] + 1j * c[..., 1]
    flat = ops.linoss_apply(u, a, dt, b, c, d)
    nested = ops.linoss_apply(u.reshape(2, 3, 11, 3), a, dt, bc, cc, d)
    assert_rel_close(nested.reshape(6, 11, 3), flat, 1e-5)


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
    assert_rel_close((z, y), (z0, y0), 1e-4)  # 500 float32 steps forward, undone in float64
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
        (
            dict(u=np.ones((2, 5, 4), np.float32)),
            ValueError,
            r"`u` has 4 features \(last axis of shape \(2, 5, 4\)\) but the layer was built "
            r"for 3 features \(H from `d`, `b`, `c`\)",
        ),
        (dict(u=np.ones((2, 5, 3), np.int32)), TypeError, "floating"),
        (dict(u=np.ones((2, 0, 3), np.float32)), ValueError, "length 0"),
        (dict(a=-np.ones(4, np.float32)), ValueError, "`a` must be >= 0"),
        (dict(dt=np.full(4, 1.5, np.float32)), ValueError, r"`dt` must be \(0.0, 1.0\]"),
        (dict(dt=np.zeros(4, np.float32)), ValueError, r"`dt` must be \(0.0, 1.0\]"),
        (dict(dt=np.full(4, np.nan, np.float32)), ValueError, "non-finite"),
        (dict(b=np.ones((4, 3), np.float32)), ValueError, "`b` must be complex"),
        (dict(c=np.ones((3, 5, 2), np.float32)), ValueError, "`c` must be complex"),
        (dict(d=np.ones(5, np.float32)), ValueError, r"`d` must have shape \[H\] = \[3\]"),
        (dict(d=np.ones((3, 1), np.float32)), ValueError, "`d` must have shape"),
        (dict(discretization="rk4"), ValueError, "Unknown discretization 'rk4'"),
        (dict(scan="fast"), ValueError, "Unknown scan 'fast'"),
        (dict(g=np.ones(4, np.float32)), ValueError, "only used by 'damped'"),
        (dict(discretization="damped"), ValueError, "needs the damping"),
        (dict(check="values"), ValueError, "check must be True, 'shapes' or False"),
        (dict(a=np.ones(4, np.complex64)), TypeError, "`a` must be a real floating array"),
        (dict(dt=np.ones(4, np.int32)), TypeError, "`dt` must be a real floating array"),
        (dict(d=np.ones(3, np.complex64)), TypeError, "`d` must be a real floating array"),
    ],
)
def test_bad_input_raises_clear_errors(change, error, match):
    u, a, dt, b, c, d, _ = random_problem(0, 2, 5, 3, 4, "im")
    kw = dict(u=u, a=a, dt=dt, b=b, c=c, d=d, g=None, discretization="im", scan="auto")
    kw["check"] = True
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
            check=kw["check"],
        )


def test_empty_layers_are_clear_errors_not_zero_division():
    u, a, dt, b, c, d, _ = random_problem(0, 2, 5, 3, 4, "im")
    with pytest.raises(ValueError, match=r"no oscillators \(P = 0\)"):
        ops.linoss_apply(u, a[:0], dt[:0], b[:0], c[:, :0], d)
    with pytest.raises(ValueError, match=r"no features \(H = 0\)"):
        ops.linoss_apply(u[..., :0], a, dt, b[:, :0], c[:0], d[:0])
    with pytest.raises(ValueError, match=r"P >= 1"):
        ops.init_oscillators(jax.random.PRNGKey(0), 0, "im")
    with pytest.raises(ValueError, match=r"H >= 1"):
        ops.complex_uniform_init()(jax.random.PRNGKey(0), (4, 0, 2))


def test_check_levels_shapes_only_skips_the_value_checks():
    u, a, dt, b, c, d, _ = random_problem(0, 2, 5, 3, 4, "im")
    bad_dt = np.full(4, 1.5, np.float32)  # out of range: only the value check sees it
    with pytest.raises(ValueError, match="`dt` must be"):
        ops.linoss_apply(u, a, bad_dt, b, c, d, check=True)
    ops.linoss_apply(u, a, bad_dt, b, c, d, check="shapes")  # no host copy, no error
    with pytest.raises(ValueError, match="built for 3 features"):
        ops.linoss_apply(u[..., :2], a, dt, b, c, d, check="shapes")  # shapes still checked
    ops.linoss_step(ops.LinOSSState.zeros((2,), 4), u[:, 0], a, bad_dt, b, c, d, check="shapes")


def test_bad_state_and_mask_shapes():
    u, a, dt, b, c, d, _ = random_problem(0, 2, 5, 3, 4, "im")
    with pytest.raises(ValueError, match=r"initial_state\.z"):
        ops.linoss_apply(u, a, dt, b, c, d, initial_state=ops.LinOSSState.zeros((2,), 3))
    with pytest.raises(ValueError, match="`mask` of shape"):
        ops.linoss_apply(u, a, dt, b, c, d, mask=np.ones((2, 4), bool))


def test_states_masks_and_steps_that_used_to_pass_silently():
    # Each was accepted and misread (or crashed in JAX): now one line naming the argument.
    u, a, dt, b, c, d, _ = random_problem(0, 3, 5, 3, 4, "im")
    zeros = ops.LinOSSState.zeros((3,), 4)
    cases = [
        # A plain [B, 2, P] array: read as z = row 0, y = row 1 (B = 3 lost a row).
        (dict(initial_state=np.zeros((3, 2, 4), np.float32)), TypeError, "`initial_state` must"),
        # Complex leaves: the imaginary part was dropped.
        (
            dict(initial_state=ops.LinOSSState(zeros.z.astype(jnp.complex64), zeros.y)),
            TypeError,
            r"`initial_state\.z` has dtype complex64.*from_complex",
        ),
        # NaN in a float mask counted as a valid step.
        (
            dict(mask=np.array([[1.0, np.nan, 1, 0, 1]] * 3)),
            ValueError,
            r"`mask` has 3 NaN value\(s\) \(the first at index \(0, 1\)\)",
        ),
    ]
    for kw, error, match in cases:
        with pytest.raises(error, match=match) as excinfo:
            ops.linoss_apply(u, a, dt, b, c, d, **kw)
        assert "\n" not in str(excinfo.value)
    # A 0/1 float mask is fine, and traced masks are not read (NaN would count as valid).
    ops.linoss_apply(u, a, dt, b, c, d, mask=np.array([[1.0, 0, 1, 0, 1]] * 3))
    with pytest.raises(ValueError, match="`u_t` must have shape"):
        ops.linoss_step(zeros, np.float32(1.0), a, dt, b, c, d)
    with pytest.raises(TypeError, match="`state` must be a LinOSSState"):
        ops.linoss_step(np.zeros((3, 2, 4), np.float32), u[:, 0], a, dt, b, c, d)


def test_step_with_a_wrong_state_is_a_clear_error():
    u, a, dt, b, c, d, _ = random_problem(0, 2, 5, 3, 4, "im")
    with pytest.raises(ValueError, match=r"`state\.z` has shape \(2, 2, 5\) but the layer was "):
        ops.linoss_step(ops.LinOSSState.zeros((2,), 5), u[:, 0], a, dt, b, c, d)
    with pytest.raises(ValueError, match="does not broadcast to the batch shape"):
        ops.linoss_step(ops.LinOSSState.zeros((3,), 4), u[:, 0], a, dt, b, c, d)
    with pytest.raises(ValueError, match="built for 3 features"):
        ops.linoss_step(ops.LinOSSState.zeros((2,), 4), u[:, 0, :2], a, dt, b, c, d)


def test_parallel_paths_apply_the_float32_transitions_exact_powers():
    # The parallel paths apply M^(2^k) and tables M^j built by squaring. Squared in plain
    # float32 they drifted like the power of a transition whose phase is off by ~2^k eps (on
    # LinOSS-IMEX at a dt^2 = 3.96: 3x the loop's error at L = 10^5, 7x at 10^6, see
    # benchmarks/RESULTS.md) and, near a double eigenvalue, overflowed; squared in
    # double-word arithmetic each is the float32 M's own power to about one rounding (a few
    # hundred where M is nearly defective). Checked against float64 step-by-step powers of
    # the same float32 M on LinOSS-IMEX at the "stable" edge and on D-LinOSS at its margin
    # band's edge with the least damping (sin(theta) = 2.8e-3).
    from flax_linoss.ops import params, schemes
    from flax_linoss.ops._scans import _common

    dt = np.float32([0.3, 0.55, 0.8, 1.0])
    g = np.float32(params.DAMPED_MARGIN) / dt
    cases = [
        ("imex", schemes.transition(np.float32(3.96) / dt**2, dt, "imex"), 1e-6),
        ("damped", schemes.transition(ops.stable_band(dt, g, 7.6e-6)[1], dt, "damped", g), 1e-4),
    ]
    length = 4096
    for name, tr, tol in cases:
        m = tuple(tr)[:4]
        m64 = np.asarray(tr.matrix(), np.float64)  # [Q, 2, 2]
        exact = [np.broadcast_to(np.eye(2), m64.shape)]
        loop32 = [exact[0].astype(np.float32)]  # the float32 loop's own powers
        for _ in range(length - 1):
            exact.append(np.einsum("qij,qjk->qik", m64, exact[-1]))
            loop32.append(np.einsum("qij,qjk->qik", m64.astype(np.float32), loop32[-1]))
        as_array = lambda p, tr=tr: np.asarray(schemes.Transition(*p, *tr[4:]).matrix())
        assert rel_err(as_array(_common.power(m, 1000)), exact[1000]) < tol, name
        assert rel_err(as_array(_common.powers(m, 130)), np.stack(exact[:130])) < 1e-6, name
        # The prefix scan's impulse response x_k = M^k e_z applies M^(2^i) in float32: as
        # accurate as the float32 loop, within a factor (x20) for the nearly defective M.
        impulse = jnp.zeros((1, length, 4)).at[:, 0].set(1.0)
        x1, x2 = jax.jit(_common.prefix_scan)(m, impulse, jnp.zeros_like(impulse))
        steps = [1000, length - 1]
        got = np.stack([np.stack([x1[0, k], x2[0, k]], -1) for k in steps])
        want = np.stack([exact[k][:, :, 0] for k in steps])
        loop = np.stack([loop32[k][:, :, 0] for k in steps])
        assert rel_err(got, want) < 20 * rel_err(loop, want), name
