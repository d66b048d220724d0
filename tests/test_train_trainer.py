"""The trainer in-process: determinism, JSONL and plots, linen/nnx interchangeability, early
stopping, NaN stop, refusal of an incompatible workdir, restore into other device counts."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import kill_after, nan_from, xla_flags
from conftest import tiny_config as _tiny

from flax_linoss.train import checkpoint as ckpt_lib
from flax_linoss.train import trainer
from flax_linoss.train.metrics import read_metrics
from flax_linoss.train.model import to_framework
from flax_linoss.train.plots import plot_run


def _final_params(workdir, framework="linen"):
    config = _tiny(framework=framework)
    target = jax.eval_shape(lambda: trainer.create_train_state(trainer.setup(config)))
    mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")))
    step = mngr.latest_step()
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    mngr.close()
    return step, jax.tree.map(np.asarray, out["state"].params)


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    # Every run re-creates its jitted functions; the persistent cache reuses identical programs.
    old = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_compilation_cache_dir", old)


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("a"))
    return workdir, trainer.train_and_evaluate(_tiny(), workdir)


def test_deterministic_metrics_jsonl_and_plot(run_a, tmp_path, capsys):
    workdir, results = run_a
    config = _tiny()
    prepared = trainer.setup(config)  # a caller's own setup (the mixer benchmark's) is used
    with pytest.raises(ValueError, match="another config"):
        trainer.train_and_evaluate(_tiny(), str(tmp_path / "x"), prepared=prepared)
    assert not (tmp_path / "x").exists()
    again = trainer.train_and_evaluate(config, str(tmp_path), prepared=prepared)
    wall = lambda r: {k: v for k, v in r.items() if k != "train_seconds"}  # not deterministic
    assert wall(again) == wall(results) and results["train_seconds"] > 0
    recs = read_metrics(workdir)
    assert recs == read_metrics(str(tmp_path))
    assert {r["split"] for r in recs} == {"train", "val", "test"}
    assert [r["step"] for r in recs if r["split"] == "val"] == [12, 24]
    # The reported test metric is the one at the best validation step.
    best = max((r for r in recs if r["split"] == "val"), key=lambda r: (r["accuracy"], -r["step"]))
    test = next(r for r in recs if r["split"] == "test" and r["step"] == best["step"])
    assert results["best_step"] == best["step"]
    assert results["test_at_best_val"] == pytest.approx(test["accuracy"])
    assert json.load(open(os.path.join(workdir, "results.json")))["best_step"] == best["step"]
    out = capsys.readouterr().out
    assert "steps/s" in out and "ETA" in out and "Final: test accuracy" in out
    png = plot_run(workdir)
    assert os.path.getsize(png) > 5000 and open(png, "rb").read(4) == b"\x89PNG"


def test_nnx_resumes_a_linen_checkpoint(tmp_path):
    # Each API checkpoints its own tree; resuming with the other converts it (convert):
    # 12 linen steps + 12 nnx steps == 24 linen steps.
    # (A constant schedule: the cosine decay depends on num_steps, which differs here.)
    ref_dir, mixed_dir = str(tmp_path / "ref"), str(tmp_path / "mixed")
    common = {"model.dropout_rate": 0.0, "optimizer.schedule": "constant"}
    trainer.train_and_evaluate(_tiny(**common), ref_dir)
    trainer.train_and_evaluate(_tiny(**common, **{"train.num_steps": 12}), mixed_dir)
    trainer.train_and_evaluate(_tiny(**common, framework="nnx"), mixed_dir)
    step_a, a = _final_params(ref_dir)
    step_b, b = _final_params(mixed_dir, "nnx")
    assert step_a == step_b == 24
    # The nnx run stored nnx's tree: list items are `blocks/0`, not linen's `blocks_0`.
    assert "blocks_0" in a and 0 in b["blocks"]
    b = to_framework(b, a, "nnx", "linen")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    # And `eval` of the nnx run with the linen API (and vice versa) converts too.
    nnx_eval = trainer.evaluate(_tiny(**common, framework="nnx"), mixed_dir, which="latest")
    linen_eval = trainer.evaluate(_tiny(**common), mixed_dir, which="latest")
    assert linen_eval["test_loss"] == pytest.approx(nnx_eval["test_loss"], rel=1e-5)


def test_early_stopping_reports_test_at_best_val(tmp_path):
    config = _tiny(**{"optimizer.learning_rate": 1e-9, "train.eval_every": 4, "train.patience": 1})
    res = trainer.train_and_evaluate(config, str(tmp_path))
    assert res["stopped_early"] and res["final_step"] == 12 and res["best_step"] == 4
    test4 = next(r for r in read_metrics(str(tmp_path)) if r["split"] == "test" and r["step"] == 4)
    assert res["test_at_best_val"] == pytest.approx(test4["accuracy"])
    # Restarting a finished run does not train further.
    assert trainer.train_and_evaluate(config, str(tmp_path))["final_step"] == 12


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, tamper_train_stream):
    tamper_train_stream(nan_from(15))
    with pytest.raises(trainer.NonFiniteLossError, match=r"step 15\b.*step 12"):
        trainer.train_and_evaluate(_tiny(), str(tmp_path))
    step, params = _final_params(str(tmp_path))
    assert step == 12
    assert all(np.isfinite(p).all() for p in jax.tree.leaves(params))


def test_incompatible_workdir_is_refused_and_kept(run_a):
    workdir, _ = run_a
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    with pytest.raises(ckpt_lib.IncompatibleCheckpointError, match="hidden_size: checkpoint 8"):
        trainer.train_and_evaluate(_tiny(**{"model.hidden_size": 16}), workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_restore_into_other_device_counts(run_a):
    workdir, results = run_a
    outs = []
    for n in (1, 8, 2):
        config = _tiny(**{"parallel.num_devices": n})
        out = trainer.evaluate(config, workdir)
        outs.append(out)
    assert outs[0]["step"] == results["best_step"]
    assert outs[0]["test_accuracy"] == pytest.approx(results["test_at_best_val"])
    for o in outs[1:]:
        assert o["val_accuracy"] == pytest.approx(outs[0]["val_accuracy"])
        assert o["test_loss"] == pytest.approx(outs[0]["test_loss"], rel=1e-5)
    latest = trainer.evaluate(_tiny(**{"parallel.num_devices": 4}), workdir, which="latest")
    assert latest["step"] == 24


def test_resume_onto_another_mesh_and_eval_on_one_device(tmp_path, tamper_train_stream):
    # 8 devices (data=2, fsdp=2, model=2) -> killed at step 4 -> 2 devices data-parallel ->
    # killed at step 8 -> back to the 8-device mesh: the same run as an uninterrupted one.
    sharded = {
        "parallel.num_devices": 8,
        "parallel.fsdp_axis_size": 2,
        "parallel.model_axis_size": 2,
        "model.dropout_rate": 0.0,
        "train.num_steps": 12,
        "train.log_every": 4,
        "train.checkpoint_every": 4,
        "train.eval_every": 12,
    }
    data_only = {
        **sharded,
        "parallel.num_devices": 2,
        "parallel.fsdp_axis_size": 1,
        "parallel.model_axis_size": 1,
    }
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    trainer.train_and_evaluate(_tiny(**sharded), ref_dir)
    tamper_train_stream(kill_after(4))
    for over in (sharded, data_only):
        with pytest.raises(KeyboardInterrupt):
            trainer.train_and_evaluate(_tiny(**over), run_dir)
    tamper_train_stream.undo()
    assert trainer.train_and_evaluate(_tiny(**sharded), run_dir)["final_step"] == 12

    def final_state(workdir):
        s = trainer.setup(_tiny(**sharded))
        mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")))
        assert mngr.all_steps() == [8, 12]
        out = mngr.restore(
            12, args=ocp.args.Composite(state=ocp.args.StandardRestore(s.abstract_state))
        )
        mngr.close()
        return jax.tree.map(np.asarray, out["state"])

    ref, got = final_state(ref_dir), final_state(run_dir)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    train = lambda d: [(r["step"], r["loss"]) for r in read_metrics(d) if r["split"] == "train"]
    assert [s for s, _ in train(run_dir)] == [4, 8, 12]
    np.testing.assert_allclose(train(run_dir), train(ref_dir), rtol=1e-4)

    # `flax-linoss eval` on one device restores the sharded checkpoint (the run's saved
    # config names a mesh of 8; it is dropped to fit).
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))
    out = subprocess.run(
        [sys.executable, "-m", "flax_linoss", "eval", f"--workdir={run_dir}", "--which=latest"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "does not fit the 1 device(s) here" in out.stdout
    here = trainer.evaluate(_tiny(**sharded), run_dir, which="latest")
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("Checkpoint step 12"))
    assert line == (
        f"Checkpoint step 12: val accuracy {here['val_accuracy']:.4f} | test accuracy "
        f"{here['test_accuracy']:.4f}"
    )


def test_timestamps_reach_the_paper_model_unless_ignored(tmp_path):
    # An irregularly sampled dataset: its timestamps go to the model (and the time channel)
    # by default; model.use_timestamps=False trains the same model ignoring them.
    from flax_linoss.train import data as data_lib

    def run(use, name):
        config = _tiny(**{"model.use_timestamps": use})  # no time channel: only the steps
        config.data.name = "synthetic/irregular_oscillator"
        config.data.options = {"num_train": 64, "num_val": 32, "num_test": 32, "length": 16}
        config.train.num_steps = 8
        trainer.train_and_evaluate(config, str(tmp_path / name))
        return config

    config = run(True, "with")
    run(False, "without")
    losses = lambda name: [r["loss"] for r in read_metrics(str(tmp_path / name))]
    assert losses("with") != losses("without")
    config.data.time_channel = True
    batch = {
        "series": np.ones((2, 4, 1), np.float32),
        "label": np.zeros(2, np.int32),
        "valid": np.ones(2, bool),
        "timestamps": np.array([[0, 2, 3, 7], [1, 2, 4, 5]], np.float32),
    }
    prepared = data_lib.prepare_batch(config, batch)
    np.testing.assert_allclose(prepared["series"][..., 0], batch["timestamps"] / 4)
    np.testing.assert_array_equal(prepared["timestamps"], batch["timestamps"])
    config.model.use_timestamps = False
    ignored = data_lib.prepare_batch(config, batch)
    assert "timestamps" not in ignored
    np.testing.assert_allclose(ignored["series"][0, :, 0], np.arange(4) / 4)
