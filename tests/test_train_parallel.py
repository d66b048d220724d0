"""The three train-step implementations and a single-device run agree (8 fake CPU devices)."""

import jax
import numpy as np
import pytest

from flax_linoss.train import config as config_lib
from flax_linoss.train import default_config, trainer
from flax_linoss.train import parallel as par_lib
from flax_linoss.train.model import to_framework

STEPS = 4


def _run(impl, num_devices, framework="linen"):
    """Trains STEPS steps from the linen model's initial state (converted for nnx); returns
    the final state in linen form, the losses and the initial state."""
    config = default_config.get_tiny_config()
    config.framework = framework
    config.model.dropout_rate = 0.0  # shard_map / pmap draw per-device dropout masks
    config.parallel.implementation = impl
    config.parallel.num_devices = num_devices
    s = trainer.setup(config)
    linen = trainer.setup(default_config.get_tiny_config())
    init = trainer.create_train_state(linen)
    template = jax.eval_shape(lambda: trainer.create_train_state(s))
    it = trainer.data_lib.train_iterator(config, s.splits["train"])
    start = to_framework(init, template, "linen", framework)
    state = s.parallel.put_state(s.parallel.replicate(start))
    losses = []
    for _ in range(STEPS):
        batch = trainer.data_lib.prepare_batch(config, next(it))
        state, m = s.parallel.step(state, s.parallel.put_batch(batch))
        losses.append(float(par_lib.to_host(m["loss"])))
    state = jax.tree.map(par_lib.to_host, s.parallel.canonical_state(state))
    state = to_framework(state, jax.eval_shape(lambda: init), framework, "linen")
    return state, losses, jax.tree.map(np.asarray, init)


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    old = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_compilation_cache_dir", old)


@pytest.fixture(scope="module")
def single_device():
    return _run("jit", 1)


def _assert_same(got, ref):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize(
    ("impl", "framework"),
    [("jit", "linen"), ("shard_map", "linen"), ("pmap", "linen"), ("shard_map", "nnx")],
)
def test_implementations_match_single_device(impl, framework, single_device):
    assert len(jax.devices()) == 8
    ref, ref_losses, init = single_device
    got, losses, _ = _run(impl, 8, framework)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    # Parameters, batch-norm statistics (reduced across the data axis), optimiser state.
    _assert_same(got, ref)
    # The steps really moved the parameters and the statistics.
    moved = [
        np.max(np.abs(a - b))
        for a, b in zip(
            jax.tree.leaves(got["params"]), jax.tree.leaves(init["params"]), strict=True
        )
    ]
    assert max(moved) > 1e-3
    assert int(got["step"]) == STEPS


def test_pmap_with_model_axis_is_rejected_before_compiling():
    config = default_config.get_tiny_config()
    config.parallel.implementation = "pmap"
    config.parallel.model_axis_size = 2
    with pytest.raises(config_lib.ConfigError, match=r"pmap.*model axis"):
        trainer.setup(config)


def test_batch_must_split_over_devices():
    config = default_config.get_tiny_config()
    config.data.batch_size = 12  # not a multiple of 8
    with pytest.raises(ValueError, match="does not split over 8"):
        trainer.setup(config)
