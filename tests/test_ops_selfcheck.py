"""The Pallas kernels' one-time self-check before ``auto`` uses them, and ``flax-linoss
doctor``. On this CPU the check runs the kernels in the Pallas interpreter (a real device
kind runs them compiled); a failing kernel is injected by changing what the kernel returns."""

import logging
import os
import subprocess
import sys

import jax
import pytest
from conftest import xla_flags

from flax_linoss.ops import _auto, _selfcheck
from flax_linoss.ops._auto import resolve_scan
from flax_linoss.ops._scans import pallas


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty verdict cache (memory and disk) and one device, as in shard_map / pmap."""
    monkeypatch.setenv("FLAX_LINOSS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FLAX_LINOSS_SELFCHECK", raising=False)
    monkeypatch.setattr(_selfcheck, "_verdicts", {})
    monkeypatch.setattr(_selfcheck, "_warned", set())
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    return tmp_path


@pytest.fixture
def cpu_as_tpu(monkeypatch):
    """Makes "tpu" resolve to this CPU for the self-check (the interpreter runs the kernel),
    and counts the checks that really run."""
    runs = []
    real_run = _selfcheck._run_check

    def run(platform, device, kernel):
        runs.append(platform)
        return real_run(platform, device, kernel)

    monkeypatch.setattr(_selfcheck, "device_for", lambda platform: jax.devices("cpu")[0])
    monkeypatch.setattr(_selfcheck, "_run_check", run)
    return runs


@pytest.fixture
def inject(monkeypatch):
    """``inject(run)`` replaces the Pallas path's ``run``; the traces cached with the real
    one are dropped before and after."""
    from flax_linoss.ops import _apply

    def replace(run):
        monkeypatch.setattr(pallas, "run", run)
        _apply._apply.clear_cache()

    yield replace
    _apply._apply.clear_cache()


def _off_by_one_percent(tr, v, z0, y0, flags, real=pallas.run):
    ys, z_l, y_l = real(tr, v, z0, y0, flags)
    return ys * 1.01, z_l, y_l  # a kernel that compiles and runs, 1% off


def test_a_passing_kernel_is_used_and_its_verdict_is_cached(fresh, cpu_as_tpu):
    assert resolve_scan("auto", platform="tpu") == "pallas"
    assert resolve_scan("auto", platform="tpu", flags=True) == "pallas"
    assert cpu_as_tpu == ["tpu"]  # checked once, then remembered
    (cached,) = (fresh / "selfcheck").glob("pallas-tpu-cpu-*.json")
    assert jax.__version__ in cached.name
    # A new process (an empty memory) reads the disk instead of checking again.
    _selfcheck._verdicts.clear()
    verdict = _selfcheck.verdict("tpu")
    assert verdict.ok and verdict.cached and cpu_as_tpu == ["tpu"]
    assert "passed" in _selfcheck.status("tpu")


def test_a_failing_kernel_falls_back_with_one_warning(fresh, cpu_as_tpu, inject, caplog):
    inject(_off_by_one_percent)
    with caplog.at_level(logging.WARNING, logger=_selfcheck.__name__):
        assert resolve_scan("auto", platform="tpu") == "chunked"
        assert resolve_scan("auto", platform="tpu", flags=True) == "associative"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "failed their self-check" in warnings[0] and "flax-linoss doctor" in warnings[0]
    assert "differs from scan='chunked'" in warnings[0]
    assert cpu_as_tpu == ["tpu"]
    assert not _selfcheck.verdict("tpu").ok
    # The explanation says why; an explicit scan="pallas" is still honoured.
    (row,) = [r for r in _auto.explain("tpu") if r[0] == "per device" and not r[1]]
    assert row[2] == "chunked" and "failed its self-check" in row[3]
    assert resolve_scan("pallas", platform="tpu") == "pallas"


def test_a_kernel_that_raises_fails_the_check(fresh, inject):
    def boom(*args):
        raise RuntimeError("Mosaic failed to compile\nsecond line")

    inject(boom)
    verdict = _selfcheck.verdict("cpu")
    assert not verdict.ok and verdict.detail == "RuntimeError: Mosaic failed to compile"


def test_switched_off_or_no_device_means_no_check(fresh, monkeypatch):
    ran = []
    monkeypatch.setattr(_selfcheck, "_run_check", lambda *a: ran.append(a))
    assert resolve_scan("auto", platform="tpu") == "pallas"  # no TPU here: nothing to check
    monkeypatch.setattr(_selfcheck, "device_for", lambda platform: jax.devices("cpu")[0])
    monkeypatch.setenv("FLAX_LINOSS_SELFCHECK", "0")
    assert resolve_scan("auto", platform="tpu") == "pallas"
    assert ran == []


def test_doctor_from_the_command_line():
    env = {**os.environ, "XLA_FLAGS": xla_flags(), "FLAX_LINOSS_KERNELS": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "flax_linoss", "doctor"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for text in ("jax 0.", "flax ", "orbax ", "grain ", "tfds ", "python ", "data dir"):
        assert text in out, (text, out)
    assert "platform      cpu" in out and "1 device(s)" in out
    # auto's choices with the scan table's reasons: kernels off here, so adjoint per device.
    assert "per device        no mask/segments    -> adjoint" in out
    assert "disabled by FLAX_LINOSS_KERNELS=0" in out
    assert "multi-device jit" in out and "FLAX_LINOSS_KERNELS=0" in out
