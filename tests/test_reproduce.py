"""Reproducing the papers: the reference's batch norm, one seed for everything, and
`reproduce` (results files, resume after a crash, finished seeds skipped, seed-parallel ==
sequential, per-seed plot)."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import kill_after, tiny_config, xla_flags
from flax import nnx
from jax.sharding import PartitionSpec as P

from flax_linoss import linen as fl
from flax_linoss import nnx as fn
from flax_linoss.train import data as data_lib
from flax_linoss.train import trainer
from flax_linoss.train.plots import plot_run
from flax_linoss.train.reproduce import reproduce, seed_dir

# ----------------------------------------------------------------------------------------
# The reference code's batch norm (equinox 0.11.4 BatchNorm, channelwise_affine=False).


def _eqx_batch_norm(batches, momentum=0.99, eps=1e-5):
    """A direct numpy transcription of equinox 0.11.4's BatchNorm.__call__ as the LinOSS
    block uses it: applied to x.T ([H, L]) under vmap over the batch with axis_name, so each
    channel's statistics are pmean over the batch of means over time. Yields, per training
    batch, the output and the (running mean, running var) after it."""
    state, first = (np.zeros(batches[0].shape[-1]), np.ones(batches[0].shape[-1])), True
    for x in batches:
        xt = np.swapaxes(x, 1, 2).astype(np.float64)  # [B, H, L]
        mean = xt.mean(axis=2).mean(axis=0)  # mean over L, pmean over the batch
        var = ((xt - mean[None, :, None]) ** 2).mean(axis=2).mean(axis=0)
        var = np.maximum(0.0, var)
        if first:
            running = (mean, var)
        else:
            running = (
                (1 - momentum) * mean + momentum * state[0],
                (1 - momentum) * var + momentum * state[1],
            )
        first, state = False, running
        out = (xt - running[0][None, :, None]) / np.sqrt(running[1][None, :, None] + eps)
        yield np.swapaxes(out, 1, 2), running


def _batches(n=3, shape=(4, 9, 5)):
    rng = np.random.default_rng(0)
    return [(rng.normal(size=shape) * (i + 1) + 3 * i).astype(np.float32) for i in range(n)]


def test_running_batch_norm_matches_equinox_in_linen():
    batches = _batches()
    bn = fl.RunningBatchNorm()
    v = bn.init(jax.random.key(0), batches[0], use_running_average=True)
    for x, (want, (mean, var)) in zip(batches, _eqx_batch_norm(batches), strict=True):
        y, upd = bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
        v = upd
        np.testing.assert_allclose(y, want, atol=2e-5, rtol=2e-5)
        np.testing.assert_allclose(v["batch_stats"]["mean"], mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(v["batch_stats"]["var"], var, rtol=1e-5)
    # Inference normalises with the stored running statistics and changes nothing.
    x = batches[0]
    want = (x - mean) / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(bn.apply(v, x, use_running_average=True), want, atol=2e-5)
    # Flax's BatchNorm (norm="batch") normalises with the batch's statistics instead.
    flax_bn = nn.BatchNorm(use_bias=False, use_scale=False, momentum=0.99, epsilon=1e-5)
    fv = flax_bn.init(jax.random.key(0), batches[1], use_running_average=True)
    y_flax, _ = flax_bn.apply(fv, batches[1], use_running_average=False, mutable=["batch_stats"])
    second = list(_eqx_batch_norm(batches[:2]))[1][0]
    assert not np.allclose(y_flax, second, atol=1e-2)


def test_running_batch_norm_matches_equinox_in_nnx_and_blocks_agree():
    batches = _batches()
    bn = fn.RunningBatchNorm(5)
    assert not bool(bn.initialized[...])
    for x, (want, (mean, var)) in zip(batches, _eqx_batch_norm(batches), strict=True):
        np.testing.assert_allclose(bn(x, use_running_average=False), want, atol=2e-5, rtol=2e-5)
        np.testing.assert_allclose(bn.mean[...], mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(bn.var[...], var, rtol=1e-5)
    assert bool(bn.initialized[...])
    # Inference normalises with the stored statistics and leaves them alone.
    x = jnp.asarray(batches[0])
    np.testing.assert_allclose(
        bn(x, use_running_average=True), (x - mean) / np.sqrt(var + 1e-5), atol=2e-5
    )
    np.testing.assert_allclose(bn.mean[...], mean, rtol=1e-5, atol=1e-5)
    # The option reaches the block in both APIs (linen == nnx in training, stats included).
    x = jnp.asarray(batches[0])
    block = fl.LinOSSBlock(6, norm="batch_running", dropout_rate=0.0)
    v = block.init(jax.random.key(0), x, deterministic=True)
    y, upd = block.apply(v, x, deterministic=False, mutable=["batch_stats"])
    mod = fn.LinOSSBlock(5, 6, norm="batch_running", dropout_rate=0.0, rngs=nnx.Rngs(0))
    from flax_linoss import convert

    convert.linen_to_nnx(v, mod)
    np.testing.assert_allclose(mod(x, deterministic=False), y, atol=1e-5)
    np.testing.assert_allclose(mod.norm.var[...], upd["batch_stats"]["norm"]["var"], rtol=1e-6)


def test_running_batch_norm_over_a_data_parallel_mesh_uses_global_statistics():
    batches = _batches(n=2, shape=(8, 9, 5))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    local = fn.RunningBatchNorm(5, axis_name="data")
    graphdef, state = nnx.split(local)

    def step(state, x):
        m = nnx.merge(graphdef, state)
        y = m(x, use_running_average=False)
        return nnx.state(m), y

    run = jax.jit(
        jax.shard_map(
            step, mesh=mesh, in_specs=(P(), P("data")), out_specs=(P(), P("data")), check_vma=False
        )
    )
    for x, (want, (mean, _)) in zip(batches, _eqx_batch_norm(batches), strict=True):
        state, y = run(state, x)
        np.testing.assert_allclose(y, want, atol=2e-5, rtol=2e-5)
        np.testing.assert_allclose(state["mean"][...], mean, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------
# One seed, as in the papers.


def _paper_scp1(shared_data_dir, seed):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "uea_scp1.py"
    spec = importlib.util.spec_from_file_location("uea_scp1", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("linoss_im")
    config.seed = seed
    config.data.options.root = str(shared_data_dir / "uea")
    return config


def test_one_seed_drives_split_and_init(shared_data_dir):
    if not (shared_data_dir / "uea" / "SelfRegulationSCP1").is_dir():
        pytest.skip("SelfRegulationSCP1 not available")
    a, b = (_paper_scp1(shared_data_dir, s) for s in (2345, 3456))
    assert data_lib.split_seed(a) == 2345 and data_lib.split_seed(b) == 3456
    ia = data_lib.load_dataset(a)["test"].arrays["series"]
    ib = data_lib.load_dataset(b)["test"].arrays["series"]
    assert ia.shape == ib.shape == (85, 896, 6) and not np.array_equal(ia, ib)
    again = data_lib.load_dataset(_paper_scp1(shared_data_dir, 2345))["test"].arrays["series"]
    np.testing.assert_array_equal(ia, again)
    # The split can still be fixed on its own.
    b.data.split_seed = 2345
    np.testing.assert_array_equal(data_lib.load_dataset(b)["test"].arrays["series"], ia)


def test_two_seeds_initialise_differently_the_same_seed_identically():
    def init(seed):
        config = _tiny(seed)
        return trainer.create_train_state(trainer.setup(config)).params

    a, b, a2 = init(1), init(2), init(1)
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    jax.tree.map(np.testing.assert_array_equal, a, a2)


# ----------------------------------------------------------------------------------------
# `reproduce` at tiny size.


def _tiny(seed=0, **over):
    protocol = {
        "seed": seed,
        "data.split_seed": -1,
        "train.num_steps": 40,
        "train.eval_every": 4,
        "train.checkpoint_every": 4,
        "train.patience": 1,
        "train.best_ties": "last",
    }
    return tiny_config(**{**protocol, **over})


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("seq"))
    return workdir, reproduce(_tiny(), workdir, seeds=[3, 5], command="test")


def test_results_files(sequential):
    workdir, results = sequential
    on_disk = json.load(open(os.path.join(workdir, "results.json")))
    assert on_disk["seeds"][0]["seed"] == 3 and len(on_disk["seeds"]) == 2
    tests = [r["test_at_best_val"] * 100 for r in results["seeds"]]
    assert results["test_mean"] == pytest.approx(np.mean(tests))
    assert results["test_std"] == pytest.approx(np.std(tests))  # ddof=0, as the papers
    md = open(os.path.join(workdir, "results.md")).read()
    assert "| 3 |" in md and "| 5 |" in md and "Budget: 40 steps per seed" in md
    for r in results["seeds"]:
        assert r["steps_run"] <= 40 and r["train_seconds"] > 0
    # The per-seed plot draws every seed's validation curve.
    assert os.path.getsize(plot_run(workdir)) > 5000


def test_finished_seeds_are_skipped_and_a_crashed_seed_resumes(
    sequential, tmp_path, tamper_train_stream, capsys
):
    _, ref = sequential
    workdir = str(tmp_path / "crash")
    # Seed 3 finishes; seed 5 crashes after its step-8 checkpoint.
    tamper_train_stream(kill_after(10), when=lambda config: config.seed == 5)
    with pytest.raises(KeyboardInterrupt):
        reproduce(_tiny(), workdir, seeds=[3, 5])
    tamper_train_stream.undo()
    assert os.path.exists(os.path.join(seed_dir(workdir, 3), "results.json"))
    assert not os.path.exists(os.path.join(seed_dir(workdir, 5), "results.json"))
    mtime = os.path.getmtime(os.path.join(seed_dir(workdir, 3), "results.json"))
    capsys.readouterr()
    again = reproduce(_tiny(), workdir, seeds=[3, 5])
    out = capsys.readouterr().out
    assert "seed 3: finished earlier, skipped" in out
    assert f"Resumed from {seed_dir(workdir, 5)} at step 8." in out  # not from scratch
    assert os.path.getmtime(os.path.join(seed_dir(workdir, 3), "results.json")) == mtime  # skipped
    for got, want in zip(again["seeds"], ref["seeds"], strict=True):
        for key in ("best_step", "best_val", "test_at_best_val", "steps_run", "stopped_early"):
            assert got[key] == pytest.approx(want[key]), key


def test_seed_parallel_equals_sequential(sequential, tmp_path):
    _, ref = sequential
    workdir = str(tmp_path / "par")
    got = reproduce(_tiny(), workdir, seeds=[3, 5], seed_parallel=True)
    # One seed stopped early while the other went on: its updates were masked out.
    assert sorted(r["steps_run"] for r in ref["seeds"]) == [12, 20]
    for a, b in zip(got["seeds"], ref["seeds"], strict=True):
        for key in ("best_step", "steps_run", "stopped_early"):
            assert a[key] == b[key], key
        assert a["test_at_best_val"] == pytest.approx(b["test_at_best_val"], abs=1e-6)
        assert a["val_curve"] == pytest.approx(b["val_curve"], abs=1e-6)


def test_the_reference_outputs_give_the_published_row():
    from flax_linoss.train import published

    seeds = published.REFERENCE_SEEDS[("LinOSS-IM", "SelfRegulationSCP1")]
    tests = [100 * r.test_at_best for r in seeds.values()]
    mean, std = published.TABLE["LinOSS-IM"]["SelfRegulationSCP1"]
    assert (round(np.mean(tests), 1), round(np.std(tests), 1)) == (mean, std)
    assert [r.best_step for r in seeds.values()] == [11000, 9000, 13000, 1000, 1000]
    assert [r.first_best_step for r in seeds.values()] == [10000, 9000, 3000, 1000, 1000]


def test_reproduce_from_the_command_line(tmp_path):
    import subprocess
    import sys

    cfg = tmp_path / "tiny.py"
    cfg.write_text(
        "from flax_linoss.train.default_config import get_tiny_config\n"
        "def get_config():\n"
        "    c = get_tiny_config()\n"
        "    c.data.split_seed = -1\n"
        "    return c\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())
    cmd = [
        sys.executable,
        "-m",
        "flax_linoss",
        "reproduce",
        f"--config={cfg}",
        f"--workdir={tmp_path / 'r'}",
        "--seeds=1,2",
        "--max_steps=8",
        "--eval_every=4",
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "over 2 seeds" in out.stdout
    results = json.load(open(tmp_path / "r" / "results.json"))
    assert [r["steps_run"] for r in results["seeds"]] == [8, 8]
    assert results["budget"]["num_steps"] == 8 and results["budget"]["eval_every"] == 4
    assert (
        "Budget: 8 steps per seed, evaluation every 4 steps"
        in open(tmp_path / "r" / "results.md").read()
    )
