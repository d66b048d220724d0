"""A sharded run (4 devices: fsdp=2 x model=2) killed with SIGKILL (once during a checkpoint
save, once at a random moment) and restarted ends with parameters bit-identical to an
uninterrupted run (real subprocesses)."""

import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import xla_flags

from flax_linoss.train.metrics import read_metrics

STEPS = 120
TINY = """
from flax_linoss.train.default_config import get_tiny_config


def get_config():
    config = get_tiny_config()
    config.train.num_steps = {steps}
    config.train.checkpoint_every = 10
    config.train.keep_checkpoints = 2
    config.train.eval_every = 30
    config.train.log_every = 10
    config.model.dropout_rate = 0.1  # dropout keys must resume exactly too
    config.parallel.fsdp_axis_size = 2  # parameters and optimiser state sharded, 2 x 2
    config.parallel.model_axis_size = 2
    return config
"""


def _env(tmp_path):
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = xla_flags(4)
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax_cache")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _cmd(config_file, workdir):
    return [
        sys.executable,
        "-m",
        "flax_linoss",
        "train",
        f"--config={config_file}",
        f"--workdir={workdir}",
    ]


def _run_to_end(config_file, workdir, env):
    out = subprocess.run(
        _cmd(config_file, workdir), env=env, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def _start_and_kill(config_file, workdir, env, *, after_line=None, after_seconds=None):
    """Starts a run and SIGKILLs it right after ``after_line`` appears (or after a delay)."""
    proc = subprocess.Popen(
        _cmd(config_file, workdir),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = []
    deadline = time.monotonic() + 180
    try:
        if after_line is not None:
            for line in proc.stdout:
                seen.append(line)
                if line.startswith(after_line):
                    break
                assert time.monotonic() < deadline, "".join(seen)
            else:
                pytest.fail("run ended before the kill point:\n" + "".join(seen))
        else:
            t0 = None
            for line in proc.stdout:
                seen.append(line)
                if t0 is None and line.startswith("step"):
                    t0 = time.monotonic()  # training is under way
                if t0 is not None and time.monotonic() - t0 > after_seconds:
                    break
                assert time.monotonic() < deadline, "".join(seen)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return "".join(seen)


def _final_state(workdir):
    mngr = ocp.CheckpointManager(os.path.abspath(pathlib.Path(workdir) / "checkpoints"))
    step = mngr.latest_step()
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    mngr.close()
    return step, jax.tree.map(np.asarray, state["state"])


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_identical(tmp_path):
    config_file = tmp_path / "tiny.py"
    config_file.write_text(TINY.format(steps=STEPS))
    env = _env(tmp_path)

    ref_dir = tmp_path / "reference"
    _run_to_end(config_file, ref_dir, env)

    rng = random.Random()
    kill_save = rng.choice([20, 30, 40, 50])
    run_dir = tmp_path / "killed"
    log1 = _start_and_kill(
        config_file, run_dir, env, after_line=f"checkpoint: saving step {kill_save}"
    )
    assert f"saving step {kill_save}" in log1
    delay = rng.uniform(0.2, 1.0)
    log2 = _start_and_kill(config_file, run_dir, env, after_seconds=delay)
    assert "Resumed from" in log2, log2[-2000:]
    log3 = _run_to_end(config_file, run_dir, env)
    assert "Resumed from" in log3
    info = f"(killed at save {kill_save}, then {delay:.2f}s into the second run)"

    ref_step, ref = _final_state(ref_dir)
    got_step, got = _final_state(run_dir)
    assert ref_step == got_step == STEPS, info
    assert jax.tree.structure(ref) == jax.tree.structure(got)
    for path, a in jax.tree_util.tree_leaves_with_path(ref):
        b = got
        for k in path:
            b = b[k.key] if hasattr(k, "key") else b[k.idx]
        assert a.dtype == b.dtype and np.array_equal(a, b), f"{path} differs {info}"

    # The metric log (train means, val and test) reads as if the run had never stopped.
    assert read_metrics(str(run_dir)) == read_metrics(str(ref_dir)), info
