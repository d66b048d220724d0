"""A real install: a wheel built from this checkout, installed (not editable) into a fresh
virtual environment, used from an unrelated directory."""

import os
import pathlib
import subprocess
import sys
import sysconfig
import venv

import pytest
from conftest import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
PUBLIC = [
    "flax_linoss",
    "flax_linoss.ops",
    "flax_linoss.nnx",
    "flax_linoss.linen",
    "flax_linoss.mixers",
    "flax_linoss.mixers.linen",
    "flax_linoss.mixers.nnx",
    "flax_linoss.convert",
    "flax_linoss.variants",
    "flax_linoss.data",
    "flax_linoss.data.uea",
    "flax_linoss.data.ppg",
    "flax_linoss.data.lm_tasks",
    "flax_linoss.data.loader",
    "flax_linoss.train",
    "flax_linoss.train.trainer",
    "flax_linoss.train.reproduce",
    "flax_linoss.train.seed_parallel",
    "flax_linoss.train.plots",
    "flax_linoss.cli",
]


@pytest.mark.slow
def test_wheel_installs_and_runs_from_elsewhere(tmp_path):
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = dist.glob("flax_linoss-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # The dependencies come from this test environment's site-packages (a path entry, so its
    # own .pth files, such as an editable flax-linoss, are not run); flax-linoss itself only
    # from the wheel, installed with the line the notebooks use.
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    pathlib.Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [
            python,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            f"flax-linoss[train] @ {wheel.as_uri()}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())
    where = subprocess.run(
        [python, "-c", "import flax_linoss; print(flax_linoss.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(site), where  # the installed copy, not this checkout
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in PUBLIC)
    imports = subprocess.run(
        [python, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert imports.returncode == 0, imports.stderr[-3000:]
    cli = env_dir / "bin" / "flax-linoss"
    train = subprocess.run(
        [
            cli,
            "train",
            "--workdir=run",
            "--config.train.num_steps=20",
            "--config.train.eval_every=10",
            "--config.data.options.num_train=256",
            "--config.optimizer.warmup_steps=2",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
    assert "Final: test accuracy" in train.stdout
    ev = subprocess.run(
        [cli, "eval", "--workdir=run"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ev.returncode == 0 and "Checkpoint step" in ev.stdout, ev.stderr[-2000:]
