"""Time-varying step sizes in the layers: ``timestamps`` (irregular sampling) and
``selective=True`` (input-dependent ``dt``), in nnx and in the derived linen classes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from oscillator_reference import reference_apply

from flax_linoss import linen, ops
from flax_linoss.nnx import LinOSSBlock, LinOSSLayer, LinOSSModel
from flax_linoss.nnx.layers import SOFTPLUS_INV_ONE


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-30))


# One input shape (and P = 4) for every test: few distinct compiled programs.
B, L, H, P = 2, 24, 3, 4


def _x(shape=(B, L, H), seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


def _times(batch=B, length=L, seed=0, scale=1.0):
    """Irregular increasing times: gaps in (0.2, 3) time units."""
    gaps = np.random.default_rng(seed).uniform(0.2, 3.0, (batch, length))
    return (scale * np.cumsum(gaps, axis=1)).astype(np.float32)


def _reference(layer, x, steps):
    """The float64 reference of ``layer`` with the per-step sizes ``steps [B, L, P]``."""
    a, _, g = layer.constrained()
    with jax.enable_x64(True):
        return reference_apply(
            x,
            a,
            steps,
            layer.b[...],
            layer.c[...],
            layer.d[...],
            g,
            discretization=layer.discretization,
        )[0]


def test_regular_timestamps_are_the_time_invariant_layer():
    layer = LinOSSLayer(H, P, discretization="damped", time_scale=0.25, rngs=nnx.Rngs(0))
    x = _x()
    t = 0.25 * np.arange(L, dtype=np.float32) + 3.0  # any start: the first gap is 1 unit
    assert rel_err(layer(x, timestamps=np.broadcast_to(t, (B, L))), layer(x)) < 1e-6


@pytest.mark.parametrize("disc", ["im", "imex", "damped"])
def test_timestamps_scale_each_step_by_its_gap(disc):
    layer = LinOSSLayer(H, P, discretization=disc, time_scale=2.0, rngs=nnx.Rngs(1))
    x = _x(seed=1)
    t = _times(seed=2, scale=2.0)
    mask = np.ones((B, L), bool)
    mask[1, 19:] = False  # padding at the end: ignored, whatever its timestamps
    t[1, 19:] = 0.0
    _, dt, _ = layer.constrained()
    gaps = np.diff(t, axis=1, prepend=t[:, :1] - 2.0) / 2.0  # the first gap: one unit
    steps = ops.clamp_steps(
        disc, layer.constrained()[0], dt * gaps[..., None], layer.constrained()[2]
    )
    np.testing.assert_allclose(
        layer.step_sizes(x, timestamps=t, mask=mask)[mask], steps[mask], rtol=1e-6
    )
    got = layer(x, timestamps=t, mask=mask)
    want = _reference(layer, x[:, :19], steps[:, :19])
    assert rel_err(got[:, :19], want) < 2e-5
    # A sequence that ignores its timestamps is another function of the same input.
    assert rel_err(layer(x, mask=mask)[:, :19], want) > 1e-2


def test_timestamps_continue_across_calls_with_the_initial_timestamp():
    layer = LinOSSLayer(H, P, rngs=nnx.Rngs(2))
    x, t = _x(seed=3), _times(seed=4)
    whole = layer(x, timestamps=t)
    first, state = layer(x[:, :12], timestamps=t[:, :12], return_state=True)
    second = layer(x[:, 12:], timestamps=t[:, 12:], initial_state=state, initial_timestamp=t[:, 11])
    assert rel_err(np.concatenate([first, second], 1), whole) < 1e-5


def test_reverse_runs_the_gaps_backwards():
    layer = LinOSSLayer(H, P, rngs=nnx.Rngs(3))
    x, t = _x(seed=5), _times(seed=6)
    rev = layer(x, timestamps=t, reverse=True)
    # Reversed in time, the same observations: times t_max - t, read forwards.
    flipped = layer(x[:, ::-1], timestamps=(t.max(1, keepdims=True) - t)[:, ::-1])[:, ::-1]
    assert rel_err(rev, flipped) < 1e-5


def test_selective_starts_as_the_time_invariant_layer_and_learns_per_step_sizes():
    kw = dict(discretization="imex", rngs=nnx.Rngs(4))
    plain = LinOSSLayer(H, P, **kw)
    layer = LinOSSLayer(H, P, selective=True, **dict(kw, rngs=nnx.Rngs(4)))
    assert layer.dt_kernel[...].shape == (H, P) and np.all(layer.dt_kernel[...] == 0)
    np.testing.assert_allclose(jax.nn.softplus(layer.dt_bias[...]), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(SOFTPLUS_INV_ONE), np.log(np.e - 1), rtol=1e-12)
    x = _x(seed=7)
    assert rel_err(layer(x), plain(x)) < 1e-6
    # With a learned projection: dt_t = dt * softplus(x W + b), against the float64 reference,
    # values and the gradient of W.
    w = 0.3 * np.random.default_rng(0).normal(size=(H, P)).astype(np.float32)
    ct = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    a, dt, _ = layer.constrained()
    layer.dt_kernel[...] = w
    value, grads = nnx.value_and_grad(lambda m: jnp.sum(ct * m(x)))(layer)
    grad = grads.dt_kernel[...]
    with jax.enable_x64(True):
        x64 = jnp.asarray(x, jnp.float64)

        def ref_loss(w):
            steps = dt * jax.nn.softplus(x64 @ w + layer.dt_bias[...].astype(jnp.float64))
            steps = ops.clamp_steps("imex", a, steps)
            return jnp.sum(
                ct
                * reference_apply(
                    x64,
                    a,
                    steps,
                    layer.b[...],
                    layer.c[...],
                    layer.d[...],
                    discretization="imex",
                )[0]
            )

        ref_value, ref_grad = jax.jit(jax.value_and_grad(ref_loss))(jnp.asarray(w, jnp.float64))
    assert rel_err(value, ref_value) < 2e-5
    assert rel_err(grad, ref_grad) < 2e-5


def test_low_rank_selective_parameters():
    layer = LinOSSLayer(H, P, selective=True, selective_rank=2, rngs=nnx.Rngs(5))
    assert layer.dt_kernel is None
    assert layer.dt_down[...].shape == (H, 2) and layer.dt_up[...].shape == (2, P)
    assert np.all(layer.dt_up[...] == 0) and np.any(layer.dt_down[...] != 0)
    x = _x()
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
    assert np.any(np.asarray(grads.dt_up[...]) != 0)  # learns from the first step
    assert np.any(np.asarray(grads.dt_bias[...]) != 0)


def test_selective_imex_stays_stable_with_large_gates():
    x = _x((B, 3000, H))
    outs = {}
    for constraint in ("stable", "paper"):
        layer = LinOSSLayer(
            H, P, discretization="imex", selective=True, constraint=constraint, rngs=nnx.Rngs(6)
        )
        layer.dt_bias[...] = jnp.full((P,), 8.0)  # gates of about 8: beyond 2 / sqrt(a)
        steps = np.asarray(layer.step_sizes(x))
        a = np.asarray(layer.constrained()[0])
        outs[constraint] = np.asarray(layer(x))
        # "stable" clamps every step into the stable range; "paper" (the papers' IMEX) does not.
        assert np.all(steps**2 * a <= 4.0 * (1 + 1e-6)) == (constraint == "stable")
    # Clamped: an undamped oscillator under noise (amplitude ~ sqrt(t)), no exponential growth.
    out = outs["stable"]
    assert (
        np.all(np.isfinite(out)) and np.abs(out[:, -500:]).max() < 20 * np.abs(out[:, :500]).max()
    )
    assert not np.all(np.abs(outs["paper"]) < 1e10)  # unclamped, it blows up


def test_bad_timestamp_and_selective_options_are_clear_errors():
    layer = LinOSSLayer(H, P, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"`timestamps` of shape \(2, 25\) does not match"):
        layer(_x(), timestamps=np.ones((B, L + 1), np.float32))
    t = _times()
    t[1, 3] = t[1, 2]
    with pytest.raises(ValueError, match="step 3 of sequence 1 is not after"):
        layer(_x(), timestamps=t)
    with pytest.raises(ValueError, match="selective_rank is an option of selective=True"):
        LinOSSLayer(3, 4, selective_rank=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="time_scale must be a number > 0"):
        LinOSSLayer(3, 4, time_scale=0, rngs=nnx.Rngs(0))


def test_block_and_model_pass_timestamps_to_every_layer():
    x, t = _x(), _times(seed=8)
    model = LinOSSModel(H, 2, 8, P, 2, dropout_rate=0.0, deterministic=True, rngs=nnx.Rngs(0))
    regular = np.broadcast_to(np.arange(L, dtype=np.float32), (B, L))
    assert rel_err(model(x, timestamps=regular), model(x)) < 1e-6
    assert rel_err(model(x, timestamps=t), model(x)) > 1e-3
    block = LinOSSBlock(H, P, dropout_rate=0.0, deterministic=True, rngs=nnx.Rngs(0))
    assert rel_err(block(x, timestamps=t), block(x)) > 1e-3


def test_linen_gets_the_options_and_the_same_computation():
    x, t = _x(), _times(seed=9)
    layer = linen.LinOSSLayer(P, selective=True, selective_rank=2, time_scale=0.5)
    v = layer.init(jax.random.PRNGKey(0), x)
    assert set(v["params"]) == {"a_raw", "dt_raw", "b", "c", "d", "dt_bias", "dt_down", "dt_up"}
    p = jax.tree.map(np.asarray, v["params"])
    p["dt_up"] = 0.5 * np.ones_like(p["dt_up"])
    got = layer.apply({"params": p}, x, timestamps=t)
    source = LinOSSLayer(H, P, selective=True, selective_rank=2, time_scale=0.5, rngs=nnx.Rngs(0))
    for name, value in p.items():
        getattr(source, name)[...] = value
    assert rel_err(got, source(x, timestamps=t)) < 1e-6
    model = linen.LinOSSModel(1, 8, P, 2, selective=True, time_scale=2.0)
    vm = model.init(jax.random.PRNGKey(0), x, deterministic=True)
    assert "dt_kernel" in vm["params"]["blocks_0"]["ssm"]
    out = model.apply(vm, x, deterministic=True, timestamps=t)
    assert out.shape == (2, 2) and np.all(np.isfinite(out))


def test_timestamps_split_with_the_length_under_logical_axis_rules(monkeypatch):
    """Under a mesh whose rules split ``"length"``, a layer with timestamps (and a padding
    mask) runs its recurrence over the split length and equals the unsplit layer."""
    from flax import linen as nn
    from jax.sharding import PartitionSpec as Spec

    seen = []
    real = ops.linoss_apply
    monkeypatch.setattr(
        ops, "linoss_apply", lambda *a, **k: seen.append(k.get("sequence_axis")) or real(*a, **k)
    )
    layer = LinOSSLayer(H, P, discretization="imex", rngs=nnx.Rngs(5))
    x, t = _x(seed=7), _times(seed=8)
    valid = np.random.default_rng(9).uniform(size=(B, L)) > 0.3
    valid[0, 6:12] = False  # a whole shard held
    want = layer(x, timestamps=t, mask=valid)
    mesh = jax.make_mesh((4,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh), nn.logical_axis_rules((("length", "seq"),)):
        put = lambda a: jax.device_put(a, jax.NamedSharding(mesh, Spec(None, "seq")))
        got = nnx.jit(lambda m, *a: m(a[0], timestamps=a[1], mask=a[2]))(
            layer, put(x), put(t), put(valid)
        )
    assert "seq" in seen
    assert rel_err(got, want) < 1e-5
