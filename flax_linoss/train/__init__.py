"""Training: config checks, one trainer for linen and nnx, Orbax checkpoints, data parallelism.

Entry points: :func:`train_and_evaluate` and :func:`evaluate` (what ``flax-linoss train`` and
``flax-linoss eval`` run), :func:`flax_linoss.train.plots.plot_run`. Submodules are imported
on first use so that importing this package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ConfigError",
    "IncompatibleCheckpointError",
    "NonFiniteLossError",
    "evaluate",
    "get_config",
    "plot_run",
    "train_and_evaluate",
    "validate",
]

_ATTRS = {
    "ConfigError": "config",
    "validate": "config",
    "get_config": "default_config",
    "IncompatibleCheckpointError": "checkpoint",
    "NonFiniteLossError": "trainer",
    "evaluate": "trainer",
    "train_and_evaluate": "trainer",
    "plot_run": "plots",
}


def __getattr__(name: str) -> Any:
    if name in _ATTRS:
        return getattr(importlib.import_module(f"{__name__}.{_ATTRS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
