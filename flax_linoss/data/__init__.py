"""Input pipelines: UEA and PPG-DaLiA (TFDS, no TensorFlow), the papers' protocol, Grain loaders,
and built-in synthetic tasks.

Importing this package is cheap: TFDS, Grain and JAX are imported by the submodules that need
them. Shapes: ``N`` examples, ``L`` steps, ``C`` channels, ``B`` batch.

Stable interface for training code:

* ``get_dataset(name, *, seed=0, **options) -> {"train", "val", "test"} -> source``
  (:mod:`flax_linoss.data.registry`). Names: ``"synthetic/oscillator"``,
  ``"synthetic/long_range"``, ``"uea/<Name>"`` (e.g. ``"uea/SelfRegulationSCP1"``) and
  ``"ppg_dalia"``; unknown names list the known ones. A *source* has ``__len__`` and
  ``__getitem__(i) -> {"series": float32 [L, C], "label": ...}``.
* ``make_loader(source, *, batch_size, seed=0, shuffle=True, drop_remainder=True,
  num_epochs=1, shard_index=None, shard_count=None, worker_count=0)``
  (:mod:`flax_linoss.data.loader`): a Grain iterator of batches
  ``{"series": [B, L, C], "label": [B, ...], "valid": bool [B], "index": int64 [B]}`` with
  ``get_state()`` / ``set_state()``; ``drop_remainder=False`` pads the last batch
  (``valid`` marks real rows). ``ArraySource(x, y)`` wraps numpy arrays as a source.
* ``protocol.uea_splits(name_or_arrays, *, seed, split="paper", add_time=False,
  normalise=False) -> {"train", "val", "test"} -> (x float32 [N, L, C], y int32 [N])``
  (:mod:`flax_linoss.data.protocol`): the papers' UEA protocol.
* ``synthetic.oscillator_forecasting(num_examples, *, seed, ...) -> (x float32
  [N, L_in, 2], y float32 [N, L_out, 2])`` and ``synthetic.long_range_classification(
  num_examples, *, seed, length, ...) -> (x float32 [N, L, 1], y int32 [N])``.
* TFDS builders ``uea.Uea`` (``uea/<Name>``) and ``ppg.PpgDalia`` (``ppg_dalia``); prepare
  with ``python -m flax_linoss.data.uea --dataset NAME --manual_dir DIR``.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ArraySource",
    "available_datasets",
    "get_dataset",
    "loader",
    "make_loader",
    "ppg",
    "protocol",
    "registry",
    "synthetic",
    "uea",
    "uea_files",
]

_SUBMODULES = {"loader", "ppg", "protocol", "registry", "synthetic", "uea", "uea_files"}
_ATTRS = {
    "ArraySource": "loader",
    "make_loader": "loader",
    "get_dataset": "registry",
    "available_datasets": "registry",
}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _ATTRS:
        return getattr(importlib.import_module(f"{__name__}.{_ATTRS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
