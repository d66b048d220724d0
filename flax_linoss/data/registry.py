"""``get_dataset(name, ...)``: one entry point from a name to train / val / test sources.

Names: ``"synthetic/oscillator"``, ``"synthetic/long_range"``, ``"uea/<Name>"`` for every
entry of :data:`flax_linoss.data.uea_files.UEA_DATASETS`, and ``"ppg_dalia"``.
"""

from __future__ import annotations

import os
from typing import Any

from flax_linoss.data import uea_files
from flax_linoss.data.loader import ArraySource

__all__ = ["DatasetSplits", "available_datasets", "get_dataset"]


class DatasetSplits(dict):
    """``{"train", "val", "test"} -> source``, plus ``info`` describing the task.

    ``info`` keys: ``task`` (``"classification"`` or ``"regression"``), ``channels`` (``C`` of
    ``series [L, C]``), ``length`` (``L``), ``num_classes`` (classification), ``class_names``
    (UEA), ``target_shape`` (regression: shape of one example's ``label``), ``output_step``
    (regression: steps of input per target step, where it applies).
    """

    def __init__(self, splits: dict[str, Any], info: dict[str, Any]):
        super().__init__(splits)
        self.info = info


def available_datasets() -> list[str]:
    """All names :func:`get_dataset` accepts."""
    return [
        "synthetic/oscillator",
        "synthetic/long_range",
        *(f"uea/{n}" for n in uea_files.UEA_DATASETS),
        "ppg_dalia",
    ]


_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def _synthetic_oscillator(seed, num_train=1024, num_val=128, num_test=128, **kw):
    from flax_linoss.data import synthetic

    out = {}
    for split, n in (("train", num_train), ("val", num_val), ("test", num_test)):
        x, y = synthetic.oscillator_forecasting(n, seed=(seed, _SPLIT_IDS[split]), **kw)
        out[split] = ArraySource(x, y)
    x, y = out["train"].arrays["series"], out["train"].arrays["label"]
    info = {
        "task": "regression",
        "channels": x.shape[2],
        "length": x.shape[1],
        "target_shape": tuple(y.shape[1:]),
    }
    return DatasetSplits(out, info)


def _synthetic_long_range(seed, num_train=1024, num_val=128, num_test=128, **kw):
    from flax_linoss.data import synthetic

    out = {
        split: synthetic.LongRangeSource(n, seed=(seed, _SPLIT_IDS[split]), **kw)
        for split, n in (("train", num_train), ("val", num_val), ("test", num_test))
    }
    first = out["train"][0]["series"]
    info = {
        "task": "classification",
        "channels": first.shape[1],
        "length": first.shape[0],
        "num_classes": kw.get("num_classes", 4),
    }
    return DatasetSplits(out, info)


def _uea(
    name: str,
    seed: int,
    *,
    split: str = "paper",
    add_time: bool = False,
    normalise: bool = False,
    root: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    **kw,
):
    from flax_linoss.data import protocol

    info_entry = uea_files.uea_dataset_info(name)
    if data_dir is not None:
        # Read the archive's splits from a prepared TFDS dataset (prepare it if needed).
        import numpy as np

        from flax_linoss.data import uea

        builder = uea.Uea(config=name, data_dir=os.fspath(data_dir))
        if not builder.is_prepared():
            builder = uea.prepare(name, root, data_dir)
        src = builder.as_data_source()
        arrays = []
        for s in ("train", "test"):
            recs = src[s].__getitems__(list(range(len(src[s]))))
            arrays += [
                np.stack([r["series"] for r in recs]),
                np.array([r["label"] for r in recs], np.int32),
            ]
        data: Any = tuple(arrays)
    else:
        data = name
    splits = protocol.uea_splits(
        data, seed=seed, split=split, add_time=add_time, normalise=normalise, root=root, **kw
    )
    out = {k: ArraySource(x, y) for k, (x, y) in splits.items()}
    info = {
        "task": "classification",
        "channels": info_entry.channels + int(add_time),
        "length": info_entry.length,
        "num_classes": len(info_entry.class_names),
        "class_names": info_entry.class_names,
    }
    return DatasetSplits(out, info)


def _ppg(seed, *, data_dir=None, manual_dir=None, config: str | None = None, **kw):
    from flax_linoss.data import ppg

    return ppg.ppg_splits(seed=seed, data_dir=data_dir, manual_dir=manual_dir, config=config, **kw)


def get_dataset(name: str, *, seed: int = 0, **options: Any) -> DatasetSplits:
    """Train / val / test sources for a named dataset.

    Args:
        name: One of :func:`available_datasets`.
        seed: Split seed (UEA, PPG) or generation seed (synthetic; the three splits use
            seeds ``(seed, 0)``, ``(seed, 1)``, ``(seed, 2)``).
        **options: Per family:
            ``synthetic/oscillator``: ``num_train``, ``num_val``, ``num_test`` and the
            arguments of :func:`~flax_linoss.data.synthetic.oscillator_forecasting`.
            ``synthetic/long_range``: the same, with
            :func:`~flax_linoss.data.synthetic.long_range_classification`'s arguments.
            ``uea/<Name>``: ``split`` (``"paper"``/``"original"``), ``add_time``,
            ``normalise``, ``root`` (raw files; default ``$FLAX_LINOSS_DATA_DIR/uea`` or
            ``<repo>/../shared/data/uea``), ``data_dir`` (read a TFDS-prepared copy there,
            preparing it from ``root`` if needed), ``prng``, ``verify``.
            ``ppg_dalia``: ``data_dir``, ``manual_dir``, ``config``.

    Returns:
        A :class:`DatasetSplits`: ``{"train", "val", "test"} -> source`` with ``.info``.

    Raises:
        ValueError: Unknown name (the message lists the known ones).
    """
    if name == "synthetic/oscillator":
        return _synthetic_oscillator(seed, **options)
    if name == "synthetic/long_range":
        return _synthetic_long_range(seed, **options)
    if name.startswith("uea/") and name[4:] in uea_files.UEA_DATASETS:
        return _uea(name[4:], seed, **options)
    if name in ("ppg_dalia", "ppg"):
        return _ppg(seed, **options)
    raise ValueError(f"Unknown dataset {name!r}. Known: {', '.join(available_datasets())}")
