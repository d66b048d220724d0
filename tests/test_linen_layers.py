"""flax_linoss.linen: the LinOSS layer, block and model in Flax linen."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oscillator_reference import assert_rel_close, reference_apply

from flax_linoss import ops
from flax_linoss.linen import LinOSSBlock, LinOSSLayer, LinOSSModel


def _x(shape, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


@pytest.mark.parametrize("disc", ["im", "imex", "damped"])
def test_layer_params_and_output_are_the_core_applied_to_constrained_params(disc):
    x = _x((3, 17, 5))
    layer = LinOSSLayer(8, discretization=disc)
    variables = jax.jit(layer.init)(jax.random.PRNGKey(1), x)
    p = variables["params"]
    shapes = {k: v.shape for k, v in p.items()}
    expected = {"a_raw": (8,), "dt_raw": (8,), "b": (8, 5, 2), "c": (5, 8, 2), "d": (5,)}
    if disc == "damped":
        expected["g_raw"] = (8,)
    assert shapes == expected
    y = jax.jit(layer.apply)(variables, x)
    a, dt, g = ops.constrain(disc, p["a_raw"], p["dt_raw"], p.get("g_raw"))
    with jax.enable_x64(True):
        want = reference_apply(x, a, dt, p["b"], p["c"], p["d"], g, discretization=disc)[0]
    assert y.shape == x.shape
    assert_rel_close(y, want, 1e-5)


def test_default_inits_are_the_papers():
    x = _x((2, 4, 6))
    p = LinOSSLayer(512, discretization="im").init(jax.random.PRNGKey(0), x)["params"]
    assert 0 <= float(p["a_raw"].min()) and float(p["a_raw"].max()) < 1
    assert float(jnp.abs(p["b"]).max()) <= 1 / np.sqrt(6)
    assert float(jnp.abs(p["c"]).max()) <= 1 / np.sqrt(512)
    pd = LinOSSLayer(512, discretization="damped").init(jax.random.PRNGKey(0), x)["params"]
    a, dt, g = ops.constrain("damped", pd["a_raw"], pd["dt_raw"], pd["g_raw"])
    rho = np.asarray(ops.schemes.spectral_radius(ops.schemes.transition(a, dt, "damped", g)))
    assert rho.min() > 0.9 - 1e-3 and rho.max() <= 1.0 + 1e-6  # the ring [0.9, 1]


def test_layer_state_passthrough_and_reverse():
    x = _x((2, 20, 3))
    layer = LinOSSLayer(4)
    v = layer.init(jax.random.PRNGKey(0), x)
    whole = layer.apply(v, x)
    first, state = layer.apply(v, x[:, :9], return_state=True)
    second = layer.apply(v, x[:, 9:], initial_state=state)
    assert_rel_close(jnp.concatenate([first, second], 1), whole, 1e-5)
    rev = layer.apply(v, x, reverse=True)
    assert_rel_close(rev, layer.apply(v, x[:, ::-1])[:, ::-1], 1e-5)


def test_bfloat16_compute_dtype():
    x = _x((2, 64, 8))
    layer = LinOSSLayer(16, dtype=jnp.bfloat16)
    v = layer.init(jax.random.PRNGKey(0), x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(v))
    y = layer.apply(v, x)
    assert y.dtype == jnp.bfloat16
    y32 = LinOSSLayer(16).apply(v, x)
    err = float(jnp.abs(y.astype(jnp.float32) - y32).max() / jnp.abs(y32).max())
    assert err < 3e-2


def test_layer_bad_input():
    layer = LinOSSLayer(4)
    v = layer.init(jax.random.PRNGKey(0), _x((2, 5, 3)))
    with pytest.raises(ValueError, match="built for 3 features"):
        layer.apply(v, _x((2, 5, 4)))
    with pytest.raises(ValueError, match="length, features"):
        layer.apply(v, _x((3,)))
    with pytest.raises(ValueError, match="Unknown discretization"):
        LinOSSLayer(4, discretization="rk4").init(jax.random.PRNGKey(0), _x((2, 5, 3)))
    with pytest.raises(ValueError, match="Unknown scan"):
        LinOSSLayer(4, scan="magic").init(jax.random.PRNGKey(0), _x((2, 5, 3)))


def test_block_batch_norm_training_and_dropout():
    x = _x((4, 12, 6))
    block = LinOSSBlock(8, dropout_rate=0.5)
    v = block.init(jax.random.PRNGKey(0), x, deterministic=True)
    assert set(v) == {"params", "batch_stats"}
    y, updates = block.apply(
        v, x, deterministic=False, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(1)}
    )
    # Running statistics moved towards the batch statistics (momentum 0.99).
    mean = np.asarray(x).mean(axis=(0, 1))
    np.testing.assert_allclose(updates["batch_stats"]["norm"]["mean"], 0.01 * mean, rtol=1e-4)
    y2 = block.apply(
        v, x, deterministic=False, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(2)}
    )[0]
    assert not np.allclose(y, y2)  # different dropout masks
    e1, e2 = block.apply(v, x, deterministic=True), block.apply(v, x, deterministic=True)
    np.testing.assert_array_equal(e1, e2)


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_block_other_norms(norm):
    x = _x((2, 6, 4))
    v = LinOSSBlock(4, norm=norm).init(jax.random.PRNGKey(0), x, deterministic=True)
    assert "batch_stats" not in v
    assert LinOSSBlock(4, norm=norm).apply(v, x, deterministic=True).shape == x.shape
    with pytest.raises(ValueError, match="Unknown norm"):
        LinOSSBlock(4, norm="group").init(jax.random.PRNGKey(0), x, deterministic=True)


def test_scp1_model_parameter_count_matches_the_paper():
    # The papers count 991,240 for LinOSS-IM on SelfRegulationSCP1 (7 inputs with the time
    # channel, H=128, P=256, 6 blocks, 2 classes), including 1,536 batch-norm statistics and,
    # in equinox, one "first time" flag per batch norm (6). D-LinOSS adds G: 992,776.
    x = jnp.zeros((2, 896, 7))
    count = lambda model: sum(
        leaf.size
        for leaf in jax.tree.leaves(
            jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, deterministic=True))
        )
    )
    assert count(LinOSSModel(6, 128, 256, 2)) + 6 == 991_240
    assert count(LinOSSModel(6, 128, 256, 2, discretization="damped")) + 6 == 992_776


def test_model_heads_and_masking():
    x = _x((3, 24, 5))
    clf = LinOSSModel(2, 8, 6, 4)
    v = clf.init(jax.random.PRNGKey(0), x, deterministic=True)
    assert clf.apply(v, x, deterministic=True).shape == (3, 4)
    reg = LinOSSModel(1, 8, 6, 2, task="regression", output_step=4)
    vr = reg.init(jax.random.PRNGKey(0), x, deterministic=True)
    out = reg.apply(vr, x, deterministic=True)
    assert out.shape == (3, 6, 2) and float(jnp.abs(out).max()) <= 1.0
    # Padding at the end with a mask changes nothing in evaluation mode.
    padded = jnp.concatenate([x, 100.0 * jnp.ones((3, 7, 5))], axis=1)
    mask = jnp.arange(31)[None, :] < 24
    logits = clf.apply(v, x, deterministic=True)
    logits_padded = clf.apply(v, padded, deterministic=True, mask=jnp.broadcast_to(mask, (3, 31)))
    assert_rel_close(logits_padded, logits, 1e-5)
    with pytest.raises(ValueError, match="Unknown task"):
        LinOSSModel(1, 8, 6, 2, task="ranking").init(jax.random.PRNGKey(0), x, deterministic=True)
    with pytest.raises(ValueError, match="rank 3"):
        clf.apply(v, x[0], deterministic=True)


def test_fields_keep_their_positional_order():
    # The linen classes are derived from nnx ones; new options go after the old fields so
    # positional construction keeps working.
    fields = lambda cls: [f for f in cls.__dataclass_fields__ if f not in ("parent", "name")]
    layer = ["state_size", "discretization", "scan", "oscillator_init", "b_init", "c_init"]
    layer += ["d_init", "dtype", "param_dtype"]
    assert fields(LinOSSLayer)[: len(layer)] == layer
    block = ["state_size", "discretization", "scan", "oscillator_init", "norm", "dropout_rate"]
    block += ["norm_axis_name", "deterministic", "dtype", "param_dtype"]
    assert fields(LinOSSBlock)[: len(block)] == block
    model = ["num_blocks", "hidden_size", "state_size", "output_size", "task", "output_step"]
    assert fields(LinOSSModel)[: len(model) + len(block) - 1] == model + block[1:]


def test_updating_statistics_needs_a_mutable_collection_as_in_linen():
    import flax.errors

    x = _x((2, 6, 4))
    block = LinOSSBlock(4, dropout_rate=0.0)
    v = block.init(jax.random.PRNGKey(0), x, deterministic=True)
    with pytest.raises(flax.errors.ModifyScopeVariableError):
        block.apply(v, x, deterministic=False)  # batch_stats not mutable
    # Evaluation changes nothing and needs nothing mutable.
    block.apply(v, x, deterministic=True)
