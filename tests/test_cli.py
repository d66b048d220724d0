"""The ``flax-linoss`` command line as a user runs it (subprocesses)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import xla_flags

TINY = """
from flax_linoss.train.default_config import get_tiny_config as get_config
"""


def _run(*args, cwd=None, timeout=180):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())
    return subprocess.run(
        [sys.executable, "-m", "flax_linoss", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    cfg = tmp / "tiny.py"
    cfg.write_text(TINY)
    workdir = tmp / "run"
    out = _run("train", f"--config={cfg}", f"--workdir={workdir}")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return cfg, workdir, out.stdout


def test_train_prints_progress_and_final_metric(trained):
    _, workdir, stdout = trained
    assert "steps/s" in stdout and "ETA" in stdout
    assert "Final: test accuracy" in stdout
    assert (workdir / "metrics.jsonl").exists() and (workdir / "config.json").exists()


def test_eval_and_plot(trained):
    _, workdir, _ = trained
    # A run saved before a config field existed: eval gives the field its default.
    saved = json.loads((workdir / "config.json").read_text())
    del saved["model"]["param_dtype"]
    (workdir / "config.json").write_text(json.dumps(saved))
    out = _run("eval", f"--workdir={workdir}", "--config.parallel.num_devices=1")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Checkpoint step 24" in out.stdout or "Checkpoint step 12" in out.stdout
    out = _run("plot", str(workdir))
    assert out.returncode == 0, out.stderr[-2000:]
    assert (workdir / "curves.png").stat().st_size > 5000


def test_unknown_override_lists_close_matches(tmp_path):
    out = _run("train", f"--workdir={tmp_path}", "--config.model.hiden_size=3")
    assert out.returncode != 0
    assert "Unknown config key 'model.hiden_size'" in out.stderr
    assert "model.hidden_size" in out.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_bad_values_are_rejected_before_compiling(tmp_path):
    out = _run(
        "train",
        f"--workdir={tmp_path}",
        "--config.parallel.implementation=pmap",
        "--config.parallel.model_axis_size=2",
    )
    assert out.returncode != 0 and "pmap' is data-parallel only" in out.stderr
    out = _run("train", f"--workdir={tmp_path}", "--config.train.num_steps=many")
    assert out.returncode != 0 and "num_steps" in out.stderr
    out = _run("train", f"--workdir={tmp_path}", "--config.model.discretization=imx")
    assert out.returncode != 0 and "did you mean imex" in out.stderr
    out = _run("train", f"--workdir={tmp_path}", "--config.train.num_steps=50")  # warmup 100
    assert out.returncode != 0 and "--config.optimizer.warmup_steps=5," in out.stderr


def test_incompatible_workdir_is_refused(trained):
    cfg, workdir, _ = trained
    before = sorted(os.listdir(workdir / "checkpoints"))
    out = _run("train", f"--config={cfg}", f"--workdir={workdir}", "--config.model.state_size=4")
    assert out.returncode != 0
    assert "incompatible" in out.stderr and "state_size" in out.stderr
    assert sorted(os.listdir(workdir / "checkpoints")) == before


def test_usage_without_command():
    out = _run()
    assert out.returncode != 0 and "train" in out.stderr
