"""Input pipelines: UEA and PPG-DaLiA (TFDS, no TensorFlow), the papers' protocol, Grain loaders,
and built-in synthetic tasks (series and token tasks).

Importing this package is cheap: TFDS, Grain and JAX are imported by the submodules that need
them. Shapes: ``N`` examples, ``L`` steps, ``C`` channels, ``B`` batch.

Stable interface for training code:

* ``get_dataset(name, *, seed=0, **options) -> DatasetSplits`` (``{"train", "val", "test"}
  -> source``, with ``.info``; :mod:`~flax_linoss.data.registry`). Names: ``available_datasets()``:
  ``"synthetic/oscillator"``, ``"synthetic/long_range"``, ``"synthetic/mqar"``,
  ``"synthetic/selective_copy"``, ``"synthetic/induction"``, ``"uea/<Name>"`` (e.g.
  ``"uea/SelfRegulationSCP1"``) and ``"ppg_dalia"``. A *source* has ``__len__`` and
  ``__getitem__(i) -> dict``: ``{"series": float32 [L, C], "label": ...}`` for series,
  ``{"inputs": int32 [L], "targets": int32 [L], "weights": float32 [L]}`` for token tasks.
* ``make_loader(source, *, batch_size, seed=0, shuffle=True, drop_remainder=True,
  num_epochs=1, shard_index=None, shard_count=None, worker_count=0)``
  (:mod:`~flax_linoss.data.loader`): a Grain iterator of batches (every field with a
  leading ``[B]``, plus ``"valid"`` bool ``[B]`` and ``"index"`` int64 ``[B]``) with
  ``get_state()`` / ``set_state()``; ``drop_remainder=False`` pads the last batch with zero
  rows (``valid`` marks real rows). ``ArraySource(series, label, **fields)`` wraps arrays.
* ``DataError`` (:mod:`~flax_linoss.data.errors`): every data problem a user causes (a
  missing folder, an unknown name or option, a broken or changed file, a wrong checksum);
  its message is one line naming the problem.
* ``data_dir()`` (:mod:`~flax_linoss.data.paths`): the data directory: ``data_dir=``, else
  ``$FLAX_LINOSS_DATA_DIR``, else TFDS's default (``$TFDS_DATA_DIR`` or
  ``~/tensorflow_datasets``). Prepared datasets live there in TFDS's layout; raw files are
  read from ``root=`` / ``--manual_dir``, else ``<data_dir>/downloads/manual``, else
  downloaded.
* ``protocol.uea_splits(name_or_arrays, *, seed, split="paper", add_time=False,
  normalise=False) -> {"train", "val", "test"} -> (x float32 [N, L, C], y int32 [N])``
  (:mod:`~flax_linoss.data.protocol`): the papers' UEA protocol; ``protocol.PAPER_SEEDS``.
* ``synthetic.oscillator_forecasting``, ``synthetic.long_range_classification`` and the
  token tasks ``lm_tasks.MQAR``, ``lm_tasks.SelectiveCopy``, ``lm_tasks.Induction``.
* TFDS builders ``uea.Uea`` (``uea/<Name>``) and ``ppg.PpgDalia`` (``ppg_dalia``), both
  following :mod:`~flax_linoss.data.builders`; prepare with ``python -m
  flax_linoss.data.uea --dataset NAME [--manual_dir DIR] [--data_dir DIR]`` (or
  ``python -m flax_linoss.data.ppg``).

Modules: ``paths`` (where data lives), ``errors``, ``checksums`` (every builder's digest
checks), ``uea_table`` (the UEA dataset table), ``uea_formats`` (ARFF and ``.ts`` parsing),
``builders`` (the TFDS builder pattern), ``uea`` and ``ppg`` (the builders), ``ppg_files``
(PPG-DaLiA raw files and preprocessing), ``protocol``, ``registry``, ``loader``,
``synthetic``, ``lm_tasks``.
"""

from __future__ import annotations

import importlib
from typing import Any

from flax_linoss.data.errors import (
    ChecksumError,
    DataError,
    DataFormatError,
    DataNotFoundError,
    UnknownDatasetError,
    UnsafePickleError,
)

__all__ = [
    "ArraySource",
    "ChecksumError",
    "DataError",
    "DataFormatError",
    "DataNotFoundError",
    "DatasetSplits",
    "UnknownDatasetError",
    "UnsafePickleError",
    "available_datasets",
    "builders",
    "checksums",
    "data_dir",
    "errors",
    "get_dataset",
    "lm_tasks",
    "loader",
    "make_loader",
    "paths",
    "ppg",
    "ppg_files",
    "protocol",
    "registry",
    "synthetic",
    "uea",
    "uea_formats",
    "uea_table",
]

_ATTRS = {
    "ArraySource": "loader",
    "make_loader": "loader",
    "get_dataset": "registry",
    "available_datasets": "registry",
    "DatasetSplits": "registry",
    "data_dir": "paths",
}
# Every lower-case public name that is not an attribute above is a submodule.
_SUBMODULES = frozenset(n for n in __all__ if n.islower()) - _ATTRS.keys()


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _ATTRS:
        return getattr(importlib.import_module(f"{__name__}.{_ATTRS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
