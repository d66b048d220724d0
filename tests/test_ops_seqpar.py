"""Sequence parallelism: linoss_apply(..., sequence_axis=) inside shard_map over 8 CPU devices
equals the float64 step-by-step reference of the whole sequence, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from oscillator_reference import random_problem, random_steps, reference_apply

from flax_linoss import ops


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-30))


def _mesh():
    return jax.make_mesh((8,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))


# Shards of 7 and 13 steps (under every chunk and block) and of 50; every kind of local path:
# auto (the native kernel per device), the chunked matmuls, a Pallas kernel in the
# interpreter; and a dt per step (sharded like the input: the carry across a shard is the
# product of its transitions).
@pytest.mark.parametrize(
    ("scan", "disc", "shard", "reverse", "varying"),
    [
        ("auto", "damped", 13, False, False),
        ("chunked", "imex", 50, True, False),
        ("pallas", "im", 13, True, False),
        ("auto", "imex", 7, True, True),
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

    def loss(*p):
        out, state = sharded(*p)
        return jnp.sum(ct * out) + jnp.sum(ct_z * state.z), (out, state)

    grads, (out, state) = jax.jit(jax.grad(loss, argnums=tuple(range(nargs)), has_aux=True))(*args)

    with jax.enable_x64(True):

        def ref_loss(*p):
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
            z_l = jnp.stack([jnp.real(z_l), jnp.imag(z_l)], 1)
            return jnp.sum(ct * flip(out)) + jnp.sum(ct_z * z_l), (flip(out), z_l)

        f64 = [jnp.asarray(x, jnp.float64) for x in args]
        grad_ref = jax.grad(ref_loss, argnums=tuple(range(nargs)), has_aux=True)
        ref_grads, (ref_out, ref_z) = jax.tree.map(np.asarray, grad_ref(*f64))

    assert rel_err(out, ref_out) < 3e-5, ("output", rel_err(out, ref_out))
    assert rel_err(state.z, ref_z) < 3e-5, ("final state", rel_err(state.z, ref_z))
    for name, gr, rg in zip("u a dt b c d g".split(), grads, ref_grads):
        assert rel_err(gr, rg) < 3e-5, (f"d/d{name}", rel_err(gr, rg))


def test_sequence_axis_errors_are_clear():
    u, a, dt, b, c, d, _ = random_problem(0, 1, 16, 2, 3, "im")
    with pytest.raises(ValueError, match="not a mesh axis here"):
        ops.linoss_apply(u, a, dt, b, c, d, sequence_axis="seq")
    with pytest.raises(ValueError, match="sequence_axis with `mask`"):
        ops.linoss_apply(u, a, dt, b, c, d, sequence_axis="seq", mask=np.ones((1, 16), bool))
