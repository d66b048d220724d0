"""Sequence and oscillator parallelism: linoss_apply(..., sequence_axis=, oscillator_axis=)
inside shard_map over 8 CPU devices equals the float64 step-by-step reference of the whole
sequence and all oscillators, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from oscillator_reference import random_problem, random_steps, reference_apply, rel_err

from flax_linoss import ops


def _assert_equals_reference(sharded, reference, args, ct, ct_z):
    """Values and gradients of ``sharded(*args) -> (out, state)`` (float32) against
    ``reference(*args) -> (out, z_L as [N, 2, P])`` (float64), through ``sum(ct * out) +
    sum(ct_z * z_L)``."""
    argnums = tuple(range(len(args)))

    def loss(*p):
        out, state = sharded(*p)
        return jnp.sum(ct * out) + jnp.sum(ct_z * state.z), (out, state.z)

    grads, (out, z) = jax.jit(jax.grad(loss, argnums=argnums, has_aux=True))(*args)
    with jax.enable_x64(True):

        def ref_loss(*p):
            out, z_l = reference(*p)
            return jnp.sum(ct * out) + jnp.sum(ct_z * z_l), (out, z_l)

        f64 = [jnp.asarray(x, jnp.float64) for x in args]
        grad_ref = jax.jit(jax.grad(ref_loss, argnums=argnums, has_aux=True))
        ref_grads, (ref_out, ref_z) = jax.tree.map(np.asarray, grad_ref(*f64))
    assert rel_err(out, ref_out) < 3e-5, ("output", rel_err(out, ref_out))
    assert rel_err(z, ref_z) < 3e-5, ("final state", rel_err(z, ref_z))
    for name, gr, rg in zip("u a dt b c d g".split(), grads, ref_grads):
        assert rel_err(gr, rg) < 3e-5, (f"d/d{name}", rel_err(gr, rg))


def _mesh():
    return jax.make_mesh((8,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))


# Shards of 3, 7 and 13 steps (under every chunk and block) and of 50; every kind of local
# path: auto (the native kernel per device), the chunked matmuls, a Pallas kernel in the
# interpreter, and the two loops (lax.scan, fori_loop: their carries must keep the shard's
# type), small, with every scheme (four of them behind the slow marker); a dt per step
# (sharded like the input: the carry across a shard is the product of its transitions);
# auto without kernels (it takes the adjoint loop) runs the README's example in
# test_readme.py.
@pytest.mark.parametrize(
    ("scan", "disc", "shard", "reverse", "varying"),
    [
        ("auto", "damped", 13, False, False),
        ("chunked", "imex", 50, True, False),
        ("pallas", "im", 13, True, False),
        ("auto", "imex", 7, True, True),
        ("sequential", "imex", 3, True, False),
        ("adjoint", "damped", 3, False, True),
        pytest.param("sequential", "im", 3, False, False, marks=pytest.mark.slow),
        pytest.param("sequential", "damped", 3, False, True, marks=pytest.mark.slow),
        pytest.param("adjoint", "im", 3, True, False, marks=pytest.mark.slow),
        pytest.param("adjoint", "imex", 3, True, False, marks=pytest.mark.slow),
    ],
)
def test_sharded_sequence_equals_the_whole_sequence(scan, disc, shard, reverse, varying):
    length = 8 * shard
    u, a, dt, b, c, d, g = random_problem(shard, 2, length, 3, 4, disc)
    if varying:
        dt = random_steps(shard, (2, length, 4), disc, a, g)
    rng = np.random.default_rng(shard)
    ct = rng.normal(size=u.shape).astype(np.float32)
    ct_z = rng.normal(size=(2, 2, 4)).astype(np.float32)
    z0, y0 = rng.normal(size=(2, 2, 4)) + 1j * rng.normal(size=(2, 2, 4))
    state0 = ops.LinOSSState.from_complex(z0.astype(np.complex64), y0.astype(np.complex64))
    nargs = 7 if disc == "damped" else 6
    args = (u, a, dt, b, c, d, g)[:nargs]
    flip = (lambda x: x[:, ::-1]) if reverse else (lambda x: x)

    def sharded(*p):
        def local(u, dt, state, *params):
            return ops.linoss_apply(
                u,
                params[0],
                dt,
                *params[1:4],
                g=params[4] if disc == "damped" else None,
                discretization=disc,
                scan=scan,
                initial_state=state,
                return_state=True,
                reverse=reverse,
                sequence_axis="seq",
            )

        dt_spec = P(None, "seq") if varying else P()
        specs = (P(None, "seq"), dt_spec, P()) + (P(),) * (len(p) - 2)
        return jax.shard_map(local, mesh=_mesh(), in_specs=specs, out_specs=(P(None, "seq"), P()))(
            p[0], p[2], state0, p[1], *p[3:]
        )

    def reference(*p):
        out, z_l, _ = reference_apply(
            flip(p[0]),
            p[1],
            flip(p[2]) if varying else p[2],
            *p[3:6],
            p[6] if disc == "damped" else None,
            discretization=disc,
            z0=z0,
            y0=y0,
        )
        return flip(out), jnp.stack([jnp.real(z_l), jnp.imag(z_l)], 1)

    _assert_equals_reference(sharded, reference, args, ct, ct_z)


def test_sequence_axis_errors_are_clear():
    u, a, dt, b, c, d, _ = random_problem(0, 1, 16, 2, 3, "im")
    with pytest.raises(ValueError, match="not a mesh axis here"):
        ops.linoss_apply(u, a, dt, b, c, d, sequence_axis="seq")


# A padding mask under sequence parallelism: held steps (runs of them crossing shard
# boundaries, a whole shard held) against the float64 reference, values and gradients,
# forward and reversed, on a loop path and the native kernel.
@pytest.mark.parametrize(
    ("scan", "disc", "reverse", "packed"),
    [
        ("auto", "damped", False, False),
        ("adjoint", "imex", True, False),
        ("sequential", "im", False, False),
        ("auto", "im", False, True),
        ("adjoint", "damped", True, True),
    ],
)
def test_a_padding_mask_under_sequence_parallelism_equals_the_whole_sequence(
    scan, disc, reverse, packed
):
    """Held steps (runs crossing shard boundaries, a whole shard held) and, ``packed``,
    segments too (one starting exactly at a shard boundary, one inside a shard, one spanning
    several shards)."""
    shard = 5
    length = 8 * shard
    u, a, dt, b, c, d, g = random_problem(7, 2, length, 3, 4, disc)
    rng = np.random.default_rng(7)
    valid = rng.uniform(size=(2, length)) > 0.3
    valid[0, 3:12] = False  # across a boundary
    valid[1, 2 * shard : 3 * shard] = False  # a whole shard
    seg = np.zeros((2, length), np.int32)
    if packed:
        seg[0, shard:] += 1  # at a boundary
        seg[0, 2 * shard + 2 :] += 1  # inside a shard
        seg[1, 13:] = 5  # one segment over several shards
        seg[1, 4 * shard :] = 7  # at a boundary, after a held shard's neighbour
    ct = rng.normal(size=u.shape).astype(np.float32)
    ct_z = rng.normal(size=(2, 2, 4)).astype(np.float32)
    nargs = 7 if disc == "damped" else 6
    args = (u, a, dt, b, c, d, g)[:nargs]
    flip = (lambda x: x[:, ::-1]) if reverse else (lambda x: x)

    def sharded(*p):
        def local(u, mask, ids, *params):
            return ops.linoss_apply(
                u,
                *params[:5],
                g=params[5] if disc == "damped" else None,
                discretization=disc,
                scan=scan,
                mask=mask,
                segment_ids=ids if packed else None,
                return_state=True,
                reverse=reverse,
                sequence_axis="seq",
            )

        specs = (P(None, "seq"),) * 3 + (P(),) * (len(p) - 1)
        fn = jax.shard_map(local, mesh=_mesh(), in_specs=specs, out_specs=(P(None, "seq"), P()))
        return fn(p[0], valid, seg, *p[1:])

    def reference(*p):
        out, z_l, _ = reference_apply(
            flip(p[0]),
            *p[1:6],
            p[6] if disc == "damped" else None,
            discretization=disc,
            valid=flip(valid),
            segment_ids=flip(seg) if packed else None,
        )
        return flip(out), jnp.stack([jnp.real(z_l), jnp.imag(z_l)], 1)

    _assert_equals_reference(sharded, reference, args, ct, ct_z)


# Oscillators split over "osc" (each device runs its own, the output projection is summed
# across the axis), alone and with the sequence split over "seq" too; a mask (held steps)
# on the oscillator split alone.
@pytest.mark.parametrize(
    ("scan", "disc", "seq", "masked"),
    [("auto", "damped", 4, False), ("adjoint", "im", 1, True), ("chunked", "imex", 2, False)],
)
def test_oscillators_split_over_an_axis_equal_all_oscillators(scan, disc, seq, masked):
    osc = 8 // seq
    mesh = jax.make_mesh((seq, osc), ("seq", "osc"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    length, num_osc = 6 * seq, 2 * osc
    u, a, dt, b, c, d, g = random_problem(seq, 2, length, 3, num_osc, disc)
    rng = np.random.default_rng(seq)
    ct = rng.normal(size=u.shape).astype(np.float32)
    ct_z = rng.normal(size=(2, 2, num_osc)).astype(np.float32)
    mask = rng.uniform(size=(2, length)) > 0.3 if masked else None
    nargs = 7 if disc == "damped" else 6
    args = (u, a, dt, b, c, d, g)[:nargs]
    seq_axis = "seq" if seq > 1 else None

    def sharded(*p):
        def local(u, mask, *params):
            return ops.linoss_apply(
                u,
                *params[:5],
                g=params[5] if disc == "damped" else None,
                discretization=disc,
                scan=scan,
                mask=mask,
                return_state=True,
                sequence_axis=seq_axis,
                oscillator_axis="osc",
            )

        specs = (P(None, seq_axis), P(None, seq_axis), P("osc"), P("osc"), P("osc"))
        specs += (P(None, "osc"), P()) + (P("osc"),) * (nargs - 6)
        out_specs = (P(None, seq_axis), ops.LinOSSState(P(None, None, "osc"), P(None, None, "osc")))
        fn = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=out_specs)
        return fn(p[0], mask, *p[1:])

    def reference(*p):
        out, z_l, _ = reference_apply(
            *p[:6], p[6] if disc == "damped" else None, discretization=disc, valid=mask
        )
        return out, jnp.stack([jnp.real(z_l), jnp.imag(z_l)], 1)

    _assert_equals_reference(sharded, reference, args, ct, ct_z)


def test_oscillator_axis_outside_shard_map_is_a_clear_error():
    u, a, dt, b, c, d, _ = random_problem(0, 1, 16, 2, 3, "im")
    with pytest.raises(ValueError, match="oscillator_axis='osc' is not a mesh axis"):
        ops.linoss_apply(u, a, dt, b, c, d, oscillator_axis="osc")


@pytest.mark.parametrize("scan", ["sequential", "adjoint"])
def test_loops_under_shard_map_over_the_batch_with_a_replicated_initial_state(scan):
    # The same carry typing without sequence_axis: the state is replicated, the input varies.
    u, a, dt, b, c, d, _ = random_problem(1, 8, 6, 2, 3, "im")
    state = ops.LinOSSState(jnp.ones((2, 3)), jnp.ones((2, 3)))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    run = lambda u: ops.linoss_apply(u, a, dt, b, c, d, scan=scan, initial_state=state)
    sharded = jax.shard_map(run, mesh=mesh, in_specs=P("data"), out_specs=P("data"))(u)
    with jax.enable_x64(True):
        ones = np.ones((8, 3)) * (1 + 1j)
        ref = reference_apply(u, a, dt, b, c, d, discretization="im", z0=ones, y0=ones)[0]
    assert rel_err(sharded, ref) < 1e-5


@pytest.mark.parametrize(
    ("reverse", "packed", "initial"),
    [(False, True, True), (True, True, False), (True, False, True)],
)
def test_timestamp_gaps_of_a_sharded_sequence_equal_the_whole_sequence(reverse, packed, initial):
    """Each shard's first gaps reach the last valid time before it: across a shard with no
    valid step, not across a segment start (at a boundary or inside a shard), to the
    initial timestamp (``NaN`` in one row: none) while the first segment lasts."""
    shard, rows = 4, 3
    length = 8 * shard
    rng = np.random.default_rng(11)
    times = np.cumsum(rng.uniform(0.2, 3.0, (rows, length)), axis=1).astype(np.float32)
    valid = rng.uniform(size=(rows, length)) > 0.3
    valid[0, shard : 3 * shard] = False  # two whole shards
    valid[1, :6] = False  # the first valid step in the second shard
    seg = np.zeros((rows, length), np.int32)
    if packed:
        seg[0, 2 * shard :] = 1  # starts at a boundary, inside the held shards
        seg[1, 4 * shard + 1 :] = 2  # inside a shard
        seg[2, 5 * shard :] = 3  # at a boundary
    t0 = np.array([times[0, 0] - 0.5, np.nan, times[2, 0] - 2.0], np.float32)
    kw = dict(reverse=reverse, time_scale=0.5)
    if reverse:
        t0 = t0 + times[:, -1] + 1.0

    def local(t, mask, ids, t0):
        return ops.timestamp_gaps(
            t,
            mask=mask,
            segment_ids=ids if packed else None,
            initial_timestamp=t0 if initial else None,
            sequence_axis="seq",
            **kw,
        )

    specs = (P(None, "seq"),) * 3 + (P(),)
    fn = jax.shard_map(local, mesh=_mesh(), in_specs=specs, out_specs=P(None, "seq"))
    got = jax.jit(fn)(times, valid, seg, t0)
    want = ops.timestamp_gaps(
        times,
        mask=valid,
        segment_ids=seg if packed else None,
        initial_timestamp=t0 if initial else None,
        **kw,
    )
    np.testing.assert_allclose(got, want, rtol=1e-6)
