"""flax_linoss.nnx: the LinOSS layer, block and model in Flax nnx."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from oscillator_reference import assert_rel_close, reference_apply

from flax_linoss.nnx import LinOSSBlock, LinOSSLayer, LinOSSModel


def _x(shape, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


@pytest.mark.parametrize("disc", ["im", "damped"])
def test_layer_is_the_core_applied_to_constrained_params(disc):
    layer = LinOSSLayer(5, 8, discretization=disc, rngs=nnx.Rngs(0))
    x = _x((3, 17, 5))
    a, dt, g = layer.constrained()
    with jax.enable_x64(True):
        want = reference_apply(
            x, a, dt, layer.b[...], layer.c[...], layer.d[...], g, discretization=disc
        )[0]
    assert_rel_close(layer(x), want, 1e-5)
    assert (layer.g_raw is None) == (disc != "damped")
    assert layer.b[...].shape == (8, 5, 2) and layer.c[...].shape == (5, 8, 2)


def test_layer_bad_input():
    layer = LinOSSLayer(3, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="built for 3 features"):
        layer(_x((2, 5, 4)))
    with pytest.raises(ValueError, match="length, features"):
        layer(_x((3,)))
    with pytest.raises(ValueError, match="Unknown discretization"):
        LinOSSLayer(3, 4, discretization="rk4", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="Unknown scan"):
        LinOSSLayer(3, 4, scan="magic", rngs=nnx.Rngs(0))


def test_block_train_and_eval_modes():
    block = LinOSSBlock(6, 8, dropout_rate=0.5, rngs=nnx.Rngs(0, dropout=1))
    x = _x((4, 12, 6))
    y1, y2 = block(x), block(x)
    assert not np.allclose(y1, y2)  # training: fresh dropout masks
    mean = np.asarray(x).mean(axis=(0, 1))
    # Two training calls moved the running mean twice (momentum 0.99).
    np.testing.assert_allclose(block.norm.mean[...], (1 - 0.99**2) * mean, rtol=1e-4)
    block.eval()
    np.testing.assert_array_equal(block(x), block(x))


@pytest.mark.parametrize("norm", ["batch", "batch_running"])
def test_float64_block_keeps_its_batch_statistics_in_float64(norm):
    # Flax's BatchNorm makes float32 statistics; with float64 parameters they are float64
    # (JAX warns, and will refuse, writing float64 statistics into float32 ones).
    with jax.enable_x64(True), warnings.catch_warnings():
        warnings.simplefilter("error")
        block = LinOSSBlock(6, 8, norm=norm, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        x = jax.random.normal(jax.random.key(0), (4, 12, 6), jnp.float64) + 1.0
        block(x)
        assert block.norm.mean[...].dtype == block.norm.var[...].dtype == jnp.float64
        # The statistic keeps the float64 digits of the batch mean.
        want = (1 - 0.99) * np.asarray(x).mean(axis=(0, 1))
        if norm == "batch_running":  # the first call sets the statistics
            want = np.asarray(x).mean(axis=(0, 1))
        np.testing.assert_allclose(block.norm.mean[...], want, rtol=1e-12)


def test_model_trains_with_an_nnx_optimizer():
    model = LinOSSModel(3, 1, 16, 8, 2, rngs=nnx.Rngs(0), dropout_rate=0.0)
    x = _x((16, 20, 3))
    y = (x[:, :5, 0].mean(axis=1) > 0).astype(jnp.int32)
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]


def test_model_shapes_and_feature_check():
    reg = LinOSSModel(5, 1, 8, 6, 2, task="regression", output_step=4, rngs=nnx.Rngs(0))
    assert reg(_x((3, 24, 5)), deterministic=True).shape == (3, 6, 2)
    with pytest.raises(ValueError, match="built for 5 features"):
        reg(_x((3, 24, 4)))
