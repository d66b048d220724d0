"""Shared test set-up: 8 fake CPU devices (for the data-parallel tests) and a compile cache.

XLA_FLAGS must be set before JAX is imported anywhere, so this runs first.
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(
    os.environ.get("FLAX_LINOSS_DATA_DIR", REPO.parent / "shared" / "data")
).resolve()


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
    """``../shared/data`` beside the repository (or ``$FLAX_LINOSS_DATA_DIR``)."""
    return SHARED_DATA
