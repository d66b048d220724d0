"""Sharded training on 8 fake CPU devices gives the numbers of one device: every
implementation, the fsdp / model / seq axes, the papers' model and the transformer, linen and
nnx; the state is born sharded where the rules say; the memory line."""

import functools
import importlib.util
import pathlib

import jax
import numpy as np
import pytest

from flax_linoss import ops
from flax_linoss.train import config as config_lib
from flax_linoss.train import default_config, trainer
from flax_linoss.train import parallel as par_lib
from flax_linoss.train import sharding as sharding_lib
from flax_linoss.train.model import to_framework

STEPS = 3
REPO = pathlib.Path(__file__).resolve().parents[1]


def _mixers_config(task="mqar"):
    spec = importlib.util.spec_from_file_location("mixers_config", REPO / "configs" / "mixers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(task)


def _paper():
    config = default_config.get_tiny_config()
    config.model.dropout_rate = 0.0  # shard_map / pmap draw per-device dropout masks
    return config


def _lm(block="plain"):
    """A tiny LinOSS + attention hybrid on MQAR (the LinOSS mixer's ``block``)."""
    config = _mixers_config()
    config.model.mixer_block = block
    config.data.options.update(
        vocab_size=32, seq_len=16, num_kv_pairs=2, num_train=64, num_val=32, num_test=32
    )
    config.model.update(hidden_size=16, state_size=8, num_blocks=2, num_heads=2)
    config.model.mixer = "linoss-im,attention"
    config.data.update(batch_size=16, eval_batch_size=32)
    config.optimizer.warmup_steps = 1
    return config


def _leaf(tree):
    return jax.tree.leaves(tree)[0]


def _with(config, **over):
    for key, value in over.items():
        section, leaf = key.split("__")
        config[section][leaf] = value
    return config


@functools.cache
def _initial_state(make):
    """The single-device linen initial state of ``make()`` (host arrays)."""
    ref = trainer.setup(_with(make(), parallel__num_devices=1))
    return jax.tree.map(np.asarray, trainer.create_train_state(ref))


def _run(make, framework="linen", **over):
    """Trains STEPS steps of ``make()`` with ``over`` (``section__field``) from the
    single-device linen initial state (converted for nnx); returns the final state (linen
    form, host arrays), the losses, the initial state and the Setup."""
    config = _with(make(), **over)
    config.framework = framework
    s = trainer.setup(config)
    init = _initial_state(make)
    start = to_framework(init, s.abstract_state, "linen", framework)
    state = s.parallel.put_state(s.parallel.place(start))
    it = trainer.data_lib.train_iterator(s.config, s.splits["train"])
    losses = []
    for _ in range(STEPS):
        batch = trainer.data_lib.prepare_batch(s.config, next(it))
        state, m = s.parallel.step(state, s.parallel.put_batch(batch))
        losses.append(float(par_lib.to_host(m["loss"])))
    state = s.parallel.canonical_state(state)
    host = jax.tree.map(np.asarray, state)
    host = to_framework(host, jax.eval_shape(lambda: init), framework, "linen")
    return host, losses, init, s, state


@pytest.fixture
def recurrence_axes(monkeypatch):
    """The ``(sequence_axis, oscillator_axis)`` of every traced ``linoss_apply`` call."""
    seen = set()
    real = ops.linoss_apply

    def spy(*args, **kwargs):
        seen.add((kwargs.get("sequence_axis"), kwargs.get("oscillator_axis")))
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "linoss_apply", spy)
    return seen


@pytest.fixture(scope="module")
def paper_single():
    return _run(_paper, parallel__num_devices=1)


@pytest.fixture(scope="module")
def lm_single():
    return _run(_lm, parallel__num_devices=1)


def _outer_lm():
    return _lm("outer")


def _assert_same(got, ref, moved_from=None):
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-5)  # losses
    # Parameters, batch-norm statistics (of the global batch), optimiser state, step. Not
    # attention's key bias: softmax is invariant to it, its gradient is rounding noise, which
    # Adam scales up to the learning rate.
    flat = jax.tree_util.tree_flatten_with_path
    for (path, a), b in zip(flat(got[0])[0], jax.tree.leaves(ref[0]), strict=True):
        if "'key'" not in jax.tree_util.keystr(path):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6, err_msg=str(path))
    assert int(got[0].step) == STEPS
    # The steps really moved the parameters.
    moved = [
        np.max(np.abs(a - b))
        for a, b in zip(jax.tree.leaves(got[0].params), jax.tree.leaves(got[2].params), strict=True)
    ]
    assert max(moved) > 1e-3


@pytest.mark.parametrize(
    ("impl", "framework", "over"),
    [
        ("jit", "linen", {"parallel__fsdp_axis_size": 2, "parallel__model_axis_size": 2}),
        ("jit", "nnx", {"parallel__num_devices": 4, "parallel__sequence_axis_size": 2}),
        ("shard_map", "linen", {"parallel__fsdp_axis_size": 2}),
        ("pmap", "linen", {}),
        ("shard_map", "nnx", {}),
    ],
)
def test_paper_model_matches_single_device(impl, framework, over, paper_single, recurrence_axes):
    assert len(jax.devices()) == 8
    got = _run(_paper, framework, parallel__implementation=impl, **over)
    _assert_same(got, paper_single)
    # The recurrence ran split as the mesh says (the length, the oscillators).
    seq = "seq" if over.get("parallel__sequence_axis_size") == 2 else None
    osc = "model" if over.get("parallel__model_axis_size") == 2 else None
    assert (seq, osc) in recurrence_axes <= {(seq, osc), (None, None)}  # (None, None): init
    if impl == "jit" and over.get("parallel__model_axis_size") == 2:
        b = got[4].params["blocks_0"]["ssm"]["b"]
        mu = got[4].opt_state[0].mu["blocks_0"]["ssm"]["b"]
        assert tuple(b.sharding.spec) == tuple(mu.sharding.spec) == ("model", "fsdp", None)


@pytest.mark.parametrize(
    ("framework", "over"),
    [
        ("linen", {"parallel__fsdp_axis_size": 2, "parallel__model_axis_size": 2}),
        ("nnx", {"parallel__sequence_axis_size": 2, "parallel__model_axis_size": 2}),
    ],
)
def test_transformer_matches_single_device(framework, over, lm_single, recurrence_axes):
    got = _run(_lm, framework, **over)
    _assert_same(got, lm_single)
    # The oscillators split over `model`; under `seq` the mixers' recurrence splits its
    # length too, with the segment ids they read from the attention mask (packing). (Calls
    # with nothing to split: the decoding steps, one token at a time.)
    seq = "seq" if "parallel__sequence_axis_size" in over else None
    assert (seq, "model") in recurrence_axes <= {(seq, "model"), (seq, None), (None, None)}
    if framework == "nnx":
        mixer = got[4].params["blocks"][0]["mixer"]
        assert tuple(_leaf(mixer["linoss"]["b"]).sharding.spec) == ("model", "fsdp", None)
        assert tuple(_leaf(mixer["in_proj"]["kernel"]).sharding.spec) == ("fsdp", "model")
        query = _leaf(got[4].params["blocks"][1]["mixer"]["query"]["kernel"])
        assert tuple(query.sharding.spec) == ("fsdp", "model", None)


def test_outer_block_transformer_matches_single_device(monkeypatch):
    # The default (outer) block under fsdp x model x seq: its projections and convolution
    # shard like attention's; its convolution, gaps and recurrence split the length (`seq`).
    single = _run(_outer_lm, "nnx", parallel__num_devices=1)
    seen = set()
    real = ops.outer_apply
    monkeypatch.setattr(
        ops, "outer_apply", lambda *a, **k: seen.add(k.get("sequence_axis")) or real(*a, **k)
    )
    got = _run(
        _outer_lm,
        "nnx",
        parallel__fsdp_axis_size=2,
        parallel__model_axis_size=2,
        parallel__sequence_axis_size=2,
    )
    _assert_same(got, single)
    assert "seq" in seen  # (None: the decoding steps, one token at a time)
    mixer = got[4].params["blocks"][0]["mixer"]
    assert tuple(_leaf(mixer["key"]["kernel"]).sharding.spec) == ("fsdp", "model")
    assert tuple(_leaf(mixer["conv_kernel"]).sharding.spec)[2] is not None  # H split


def _float64_outer_lm():
    config = _outer_lm()
    config.model.update(mixer="linoss-im", dtype="float64", param_dtype="float64")
    return config


def test_float64_sharded_run_matches_one_device_to_float64_rounding():
    # In float64 the sharded run agrees with one device to ~1e-15: a sharding mistake (a
    # statistic of the local batch, a lost or doubled partial sum, a wrong slice) shows at
    # any size here, where in float32 the rounding of the other reduction order is 1e-7.
    # (A pure LinOSS model: Flax's attention takes its softmax in float32.)
    with jax.enable_x64(True):
        single = _run(_float64_outer_lm, "nnx", parallel__num_devices=1)
        got = _run(
            _float64_outer_lm,
            "nnx",
            parallel__fsdp_axis_size=2,
            parallel__model_axis_size=2,
            parallel__sequence_axis_size=2,
        )
    leaves = jax.tree.leaves(got[0].params)
    assert {a.dtype for a in leaves} == {np.dtype(np.float64)}
    np.testing.assert_allclose(got[1], single[1], rtol=1e-13)  # losses
    for a, b in zip(jax.tree.leaves(got[0]), jax.tree.leaves(single[0]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
    moved = [np.max(np.abs(a - b)) for a, b in zip(leaves, jax.tree.leaves(got[2].params))]
    assert max(moved) > 1e-3


def test_float64_needs_64_bit_jax():
    config = _with(_paper(), model__param_dtype="float64")
    with pytest.raises(config_lib.ConfigError, match="needs 64-bit JAX: add --jax_enable_x64"):
        config_lib.validate(config)
    with jax.enable_x64(True):
        assert config_lib.validate(config) is config


def test_state_is_created_sharded_and_rules_are_overridable():
    config = _with(_paper(), parallel__fsdp_axis_size=2, parallel__model_axis_size=2)
    config.parallel.logical_axis_rules.oscillator = ""  # never split the oscillators
    s = trainer.setup(config)
    state = trainer.create_train_state(s)
    ssm = state.params["blocks_0"]["ssm"]
    assert tuple(ssm["b"].sharding.spec) == (None, "fsdp", None)
    assert tuple(ssm["a_raw"].sharding.spec) == (None,)
    kernel = state.params["encoder"]["kernel"]  # [1, H]: H over fsdp
    assert tuple(kernel.sharding.spec) == (None, "fsdp")
    assert kernel.addressable_shards[0].data.shape == (kernel.shape[0], kernel.shape[1] // 2)
    stats = state.batch_stats["blocks_0"]["norm"]["mean"]
    assert tuple(stats.sharding.spec) == ("fsdp",)
    config.parallel.logical_axis_rules.embed = "fsdp+tensor"
    with pytest.raises(config_lib.ConfigError, match="'tensor', not a mesh axis"):
        trainer.setup(config)


def test_memory_line_of_the_mixers_transformer_with_fsdp_and_model():
    config = _mixers_config()
    config.model.mixer = "linoss-im,attention"
    config.data.options.update(num_train=64, num_val=32, num_test=32)  # the model is unchanged
    config.parallel.update(fsdp_axis_size=2, model_axis_size=2)
    s = trainer.setup(config)
    line = sharding_lib.memory_line(s.abstract_state, s.parallel.state_shardings)
    x, y = (float(v) for v in line.split()[2:8:5])
    assert line == f"memory: params+optimizer {x:.3f} MiB per device of {y:.3f} MiB total"
    largest, total = sharding_lib.memory_per_device(
        (s.abstract_state.params, s.abstract_state.opt_state),
        (s.parallel.state_shardings.params, s.parallel.state_shardings.opt_state),
    )
    assert largest / total <= 0.35, line
    assert abs(total / 2**20 - y) < 1e-3
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(s.abstract_state.params))
    assert 0 <= total - 4 * n * 3 < 64  # float32 parameters, Adam's two moments, counts


def test_every_logical_name_has_a_default_rule():
    from flax_linoss.common import BATCH_AXIS, LENGTH_AXIS
    from flax_linoss.mixers.base import PARAM_AXES

    tables = (sharding_lib.PAPER_AXES, sharding_lib.TRANSFORMER_AXES, PARAM_AXES)
    names = {n for table in tables for axes in table.values() for n in axes if n}
    rules = default_config.get_config().parallel.logical_axis_rules
    assert names | {BATCH_AXIS, LENGTH_AXIS} == set(rules)


def test_pmap_with_other_axes_is_rejected_before_compiling():
    for axis in ("fsdp", "model", "sequence"):
        config = _paper()
        config.parallel.implementation = "pmap"
        config.parallel[f"{axis}_axis_size"] = 2
        with pytest.raises(config_lib.ConfigError, match=rf"pmap.*{axis}_axis_size=1"):
            trainer.setup(config)


def test_batch_and_length_must_split_over_devices():
    config = _paper()
    config.data.batch_size = 12  # not a multiple of 8
    with pytest.raises(ValueError, match="does not split over 8"):
        trainer.setup(config)
    config = _with(_paper(), parallel__sequence_axis_size=8)
    config.data.options.length = 36
    with pytest.raises(config_lib.ConfigError, match="must divide the sequence length 36"):
        trainer.setup(config)


def _bench_sharding():
    path = REPO / "benchmarks" / "bench_sharding.py"
    spec = importlib.util.spec_from_file_location("bench_sharding", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_sharding_compares_the_logged_losses_window_by_window():
    bench = _bench_sharding()
    one = {10: 2.0, 100: 1.0, 150: 0.5, 400: 0.25}
    sharded = {10: 2.0 * (1 + 1e-7), 100: 1.0 * (1 - 3e-6), 150: 0.5, 400: 0.25 * 1.1}
    got = bench.agreement(sharded, one)
    assert got == [pytest.approx(3e-6), 0.0, None, pytest.approx(0.1), None, None]
    assert bench.held_through(sharded, one) == 150
    assert bench.held_through(sharded, one, tolerance=1e-6) == 10
    with pytest.raises(ValueError, match="different steps"):
        bench.agreement({10: 1.0}, {20: 1.0})
    row = dict(case="mqar-linoss", precision="float64", windows=got, held=150, steps=400)
    page = bench.markdown([dict(row, memory=(1.0, 4.0), test=(0.5, 0.25))], "python bench")
    line = page.splitlines()[-1]
    assert line.startswith("| mqar, `linoss-im` | float64 | 3.0e-06 | 0.0e+00 | - | 1.0e-01 |")
    assert "| 1.0e-01 | step 150 of 400 | 0.500 / 0.250 | 0.250 (1.000 / 4.000 MiB) |" in line
    cmd = bench.command(bench.CASES["default-seq"], "float64", None, True, "/tmp/w")
    assert "--jax_enable_x64" in cmd and "--config.parallel.sequence_axis_size=2" in cmd
    assert not any(c.startswith("--config.train.num_steps") for c in cmd)
