"""Shared test set-up, run before JAX is imported anywhere.

- 8 fake CPU devices, for the data-parallel tests; XLA's backend optimisation off and its
  elemental emitters (faster compiles).
- A persistent XLA compilation cache for this session (inherited by the subprocesses that
  the CLI, resume, multi-process and notebook tests start), so the same program is compiled
  once; removed when the session ends.
"""

import os
import pathlib
import shutil
import tempfile

import pytest

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# The suite is dominated by compiling small programs: skip LLVM's costly optimisations
# (about 15% of the suite's time) and use XLA CPU's older elemental emitters instead of its
# MLIR fusion emitters (at this optimisation level they compile a typical train step 2.4x
# faster, and it runs no slower): the same programs, equal up to float rounding.
# FLAX_LINOSS_TEST_XLA_OPT=1 keeps XLA's defaults.
_QUICK = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    " --xla_cpu_use_fusion_emitters=false"
)
# A pytest-xdist worker inherits the flags its controller added: still the suite's quick
# flags (and still passed on to the processes the tests start), not a user's own level.
QUICK_COMPILE = (
    _QUICK
    if os.environ.get("FLAX_LINOSS_TEST_XLA_OPT") != "1"
    and (
        _QUICK in os.environ["XLA_FLAGS"]
        or "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]
    )
    else ""
)
if QUICK_COMPILE and QUICK_COMPILE not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + QUICK_COMPILE


def xla_flags(devices: int | None = None) -> str:
    """``XLA_FLAGS`` for a process a test starts: the suite's quick-compile flags, with
    ``devices`` fake CPU devices (``None``: one, XLA's default)."""
    count = "" if devices is None else f"--xla_force_host_platform_device_count={devices} "
    return (count + QUICK_COMPILE).strip()


os.environ.setdefault("JAX_PLATFORMS", "cpu")
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="flax-linoss-xla-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

REPO = pathlib.Path(__file__).resolve().parents[1]
# Raw test data (read only): $FLAX_LINOSS_TEST_DATA, else ../shared/data beside the checkout.
SHARED_DATA = pathlib.Path(
    os.environ.get("FLAX_LINOSS_TEST_DATA", REPO.parent / "shared" / "data")
).resolve()
# Prepared datasets go to a fresh data directory, never ~/tensorflow_datasets or ../shared
# (inherited by the subprocesses the tests start); removed when the session ends.
_DATA_DIR = tempfile.mkdtemp(prefix="flax-linoss-data-")
os.environ["FLAX_LINOSS_DATA_DIR"] = _DATA_DIR


_SLOW = {
    line.strip()
    for line in (REPO / "tests" / "slow_tests.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
}


def pytest_collection_modifyitems(config, items):
    """Marks ``slow`` the tests listed in ``tests/slow_tests.txt`` (measured at 2.2 s or more;
    see ``tests/list_slow_tests.py``): ``-m "not slow"`` is the fast subset."""
    for item in items:
        if item.nodeid in _SLOW:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
    """``../shared/data`` beside the repository (or ``$FLAX_LINOSS_TEST_DATA``)."""
    return SHARED_DATA


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_DATA_DIR, ignore_errors=True)
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture
def tamper_train_stream(monkeypatch):
    """``tamper(edit, when=...)`` makes the trainer's train stream pass its ``n``-th batch
    (from 1) through ``edit(n, batch)``, which may change it (a NaN) or raise (a simulated
    kill), for the runs whose config satisfies ``when``; ``tamper.undo()`` restores it."""
    from flax_linoss.train import data as data_lib

    real = data_lib.train_iterator

    def tamper(edit, when=lambda config: True):
        def train_iterator(config, source):
            it = real(config, source)
            if not when(config):
                return it

            class Tampered:
                n = 0

                def __next__(self):
                    self.n += 1
                    return edit(self.n, next(it))

                def __getattr__(self, name):
                    return getattr(it, name)

            return Tampered()

        monkeypatch.setattr(data_lib, "train_iterator", train_iterator)

    tamper.undo = lambda: monkeypatch.setattr(data_lib, "train_iterator", real)
    return tamper


def nan_from(step):
    """An ``edit`` for :func:`tamper_train_stream`: NaN inputs from batch ``step`` on."""
    import numpy as np

    return lambda n, batch: dict(batch, series=batch["series"] * np.nan) if n >= step else batch


def kill_after(step):
    """An ``edit`` for :func:`tamper_train_stream`: a ``KeyboardInterrupt`` instead of batch
    ``step + 1`` (a run killed there)."""

    def edit(n, batch):
        if n > step:
            raise KeyboardInterrupt("simulated kill")
        return batch

    return edit


def optimized_jit(fn, **kwargs):
    """``jax.jit`` with XLA's default optimisation (the suite compiles without it): for the
    few tests whose time goes into running long programs rather than compiling them."""
    import jax

    options = {
        "xla_backend_optimization_level": 3,
        "xla_llvm_disable_expensive_passes": False,
        "xla_cpu_use_fusion_emitters": True,
    }
    return jax.jit(fn, compiler_options=options, **kwargs)


def tiny_config(**over):
    """The tiny training config on one device, with ``{"train.num_steps": 36, ...}``
    overrides (dotted keys)."""
    from flax_linoss.train import default_config

    config = default_config.get_tiny_config()
    config.parallel.num_devices = 1
    for key, value in over.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config
