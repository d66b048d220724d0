"""``get_dataset(name, ...)``: one table from a dataset name to its train / val / test sources.

Each row of :data:`DATASETS` names a dataset, the function that builds it and the options it
takes. Families:

* ``synthetic/oscillator``, ``synthetic/long_range``, ``synthetic/irregular_oscillator``:
  generated series (:mod:`flax_linoss.data.synthetic`; the last irregularly sampled, with
  timestamps);
* ``synthetic/mqar``, ``synthetic/selective_copy``, ``synthetic/induction``: token tasks for
  comparing sequence mixers (:mod:`flax_linoss.data.lm_tasks`);
* ``uea/<Name>`` for every line of :data:`flax_linoss.data.uea_table.UEA_DATASETS`: read from
  the prepared TFDS copy (prepared on first use), split by the papers' protocol;
* ``ppg_dalia``: TFDS data sources of the PPG-DaLiA windows.

To add a dataset, add a row here (and, for a TFDS family, a builder following
:mod:`flax_linoss.data.builders`).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flax_linoss.data.errors import UnknownDatasetError
from flax_linoss.data.loader import ArraySource
from flax_linoss.data.uea_table import UEA_DATASETS

__all__ = ["DATASETS", "DatasetSplits", "available_datasets", "check_options", "get_dataset"]


class DatasetSplits(dict):
    """``{"train", "val", "test"} -> source``, plus ``info`` describing the task.

    ``info`` keys: ``task`` (``"classification"``, ``"regression"`` or ``"lm"``) and
    ``length`` (``L``); for classification and regression ``channels`` (``C`` of ``series
    [L, C]``); ``num_classes`` and, for UEA, ``class_names`` (classification);
    ``target_shape`` (regression: shape of one example's ``label``) and ``output_step``
    (regression: steps of input per target step, where it applies); ``vocab_size``
    (``"lm"``: every token id, padding 0 and special tokens included); ``timestamps``
    (``True`` where the sources also yield ``"timestamps" float32 [L]``, the observation
    times of irregularly sampled series; see ``LinOSSModel(timestamps=...)``).
    """

    def __init__(self, splits: dict[str, Any], info: dict[str, Any]):
        super().__init__(splits)
        self.info = info


def _suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def check_options(dataset: str, options: Mapping[str, Any], known: Iterable[str]) -> None:
    """Raises :class:`UnknownDatasetError` for an option ``dataset`` does not take."""
    known = sorted(known)
    for key in options:
        if key not in known:
            raise UnknownDatasetError(
                f"{dataset} has no option {key!r}{_suggest(key, known)}; its options: "
                f"{', '.join(known)}"
            )


_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
_COUNTS = ("num_train", "num_val", "num_test")


def _params(fn: Callable) -> list[str]:
    return [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind == p.KEYWORD_ONLY and p.name != "seed"
    ]


def _synthetic_oscillator(name, seed, num_train=1024, num_val=128, num_test=128, **kw):
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


def _generated(source: str, num_val: int = 128, num_test: int = 128, **more_info):
    """A loader of the synthetic classification task whose source is ``synthetic.<source>``."""

    def load(name, seed, num_train=1024, num_val=num_val, num_test=num_test, **kw):
        from flax_linoss.data import synthetic

        cls = getattr(synthetic, source)
        out = {
            split: cls(n, seed=(seed, _SPLIT_IDS[split]), **kw)
            for split, n in (("train", num_train), ("val", num_val), ("test", num_test))
        }
        first = out["train"][0]["series"]
        info = {
            "task": "classification",
            "channels": first.shape[1],
            "length": first.shape[0],
            "num_classes": kw.get("num_classes", 4),
        }
        return DatasetSplits(out, info | more_info)

    return load


def _token_task(name, seed, num_train=100_000, num_val=3_000, num_test=3_000, **options):
    from flax_linoss.data import lm_tasks

    task = lm_tasks.make_task(name.split("/", 1)[1], **options)
    out = {
        split: lm_tasks.TokenTaskSource(task, n, seed=(seed, _SPLIT_IDS[split]))
        for split, n in (("train", num_train), ("val", num_val), ("test", num_test))
    }
    return DatasetSplits(out, task.info)


_UEA_OPTIONS = (
    "split",
    "add_time",
    "normalise",
    "val_fraction",
    "prng",
    "root",
    "data_dir",
    "download",
    "verify",
    "missing",
    "fill_value",
    "drop_fraction",
    "drop_seed",
)


def _uea(
    name: str,
    seed: int,
    *,
    split: str = "paper",
    add_time: bool = False,
    normalise: bool = False,
    root=None,
    data_dir=None,
    download: bool = True,
    verify: bool = True,
    missing: str = "error",
    drop_fraction: float = 0.0,
    **protocol_options,
):
    from flax_linoss.data import protocol, uea

    info = UEA_DATASETS[name.split("/", 1)[1]]
    protocol.check_missing(None, missing)  # a bad choice fails before preparing
    builder = uea.load(info.name, root=root, data_dir=data_dir, download=download, verify=verify)
    arrays = uea.uea_arrays(builder)
    protocol.check_missing(arrays, missing, what=name)
    splits = protocol.uea_splits(
        arrays,
        seed=seed,
        split=split,
        add_time=add_time,
        normalise=normalise,
        missing=missing,
        drop_fraction=drop_fraction,
        **protocol_options,
    )
    # With drop_fraction, each split is (x, y, timestamps).
    out = {
        k: ArraySource(arrays[0], arrays[1], timestamps=arrays[2] if len(arrays) > 2 else None)
        for k, arrays in splits.items()
    }
    description = {
        "task": "classification",
        "channels": info.channels * (2 if missing == "mask" else 1) + int(add_time),
        "length": info.length - int(info.length * drop_fraction),
        "num_classes": len(info.class_names),
        "class_names": info.class_names,
    }
    return DatasetSplits(out, description | ({"timestamps": True} if drop_fraction else {}))


def _ppg(name, seed, **kw):
    from flax_linoss.data import ppg

    return ppg.ppg_splits(seed=seed, **kw)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One row of :data:`DATASETS`.

    Attributes:
        load: ``load(name, seed, **options) -> DatasetSplits``.
        options_from: Gives the option names ``get_dataset`` accepts for it (a callable, so
            that the family's module is imported only when it is used).
        doc: One line for listings.
    """

    load: Callable[..., DatasetSplits]
    options_from: Callable[[], Iterable[str]]
    doc: str


def _oscillator_options():
    from flax_linoss.data import synthetic

    return [*_COUNTS, *_params(synthetic.oscillator_forecasting)]


def _irregular_options():
    from flax_linoss.data import synthetic

    return [*_COUNTS, *_params(synthetic.irregular_oscillator_example)]


def _long_range_options():
    from flax_linoss.data import synthetic

    return [*_COUNTS, *_params(synthetic.long_range_example)]


def _token_options(task: str):
    def options():
        from flax_linoss.data import lm_tasks

        return [*_COUNTS, *(f.name for f in dataclasses.fields(lm_tasks.TASKS[task]))]

    return options


#: Dataset name -> :class:`Dataset`.
DATASETS: dict[str, Dataset] = {
    "synthetic/oscillator": Dataset(
        _synthetic_oscillator, _oscillator_options, "forecast pendulum positions (RK4)"
    ),
    "synthetic/long_range": Dataset(
        _generated("LongRangeSource"),
        _long_range_options,
        "a label hidden at the start of a long series",
    ),
    "synthetic/irregular_oscillator": Dataset(
        _generated("IrregularOscillatorSource", num_val=256, num_test=256, timestamps=True),
        _irregular_options,
        "an oscillation's frequency band from irregularly timed samples (with timestamps)",
    ),
    "synthetic/mqar": Dataset(
        _token_task, _token_options("mqar"), "multi-query associative recall (Zoology)"
    ),
    "synthetic/selective_copy": Dataset(
        _token_task, _token_options("selective_copy"), "selective copying (Mamba)"
    ),
    "synthetic/induction": Dataset(
        _token_task, _token_options("induction"), "induction heads (H3, Mamba)"
    ),
    **{
        f"uea/{n}": Dataset(_uea, lambda: _UEA_OPTIONS, f"UEA {n}, the papers' 70/15/15 split")
        for n in UEA_DATASETS
    },
    "ppg_dalia": Dataset(
        _ppg,
        lambda: ("data_dir", "manual_dir", "root", "config", "split_seed", "download", "verify"),
        "PPG-DaLiA heart rate from wrist signals",
    ),
}
_ALIASES = {"ppg": "ppg_dalia"}


def available_datasets() -> list[str]:
    """All names :func:`get_dataset` accepts (aliases aside)."""
    return list(DATASETS)


def get_dataset(name: str, *, seed: int = 0, **options: Any) -> DatasetSplits:
    """Train / val / test sources for a named dataset.

    Args:
        name: One of :func:`available_datasets`.
        seed: Split seed (UEA, PPG) or generation seed (synthetic; the three splits use
            seeds ``(seed, 0)``, ``(seed, 1)``, ``(seed, 2)``).
        **options: Per family (``None`` or ``""`` for a folder means the default):
            ``synthetic/oscillator``: ``num_train``, ``num_val``, ``num_test`` and the
            arguments of :func:`~flax_linoss.data.synthetic.oscillator_forecasting`.
            ``synthetic/long_range``: the same, with
            :func:`~flax_linoss.data.synthetic.long_range_classification`'s arguments.
            ``synthetic/irregular_oscillator``: the same, with
            :func:`~flax_linoss.data.synthetic.irregular_oscillator_example`'s arguments.
            ``synthetic/mqar``, ``synthetic/selective_copy``, ``synthetic/induction``:
            ``num_train``, ``num_val``, ``num_test`` (default 100,000 / 3,000 / 3,000) and
            the task's fields (:mod:`flax_linoss.data.lm_tasks`).
            ``uea/<Name>``: ``split`` (``"paper"``/``"original"``), ``add_time``,
            ``normalise``, ``val_fraction``, ``prng``, ``missing`` (``"error"``, ``"fill"``,
            ``"mask"``: missing values, ``?`` in the raw files), ``fill_value`` (see
            :func:`~flax_linoss.data.protocol.uea_splits`), ``root`` (folder of the raw
            files; default ``<data_dir>/downloads/manual``, then the download),
            ``data_dir`` (where prepared datasets live; see :mod:`flax_linoss.data.paths`),
            ``download``, ``verify``, ``drop_fraction`` and ``drop_seed`` (irregular
            sampling: remove this share of every series' steps at random, and yield the kept
            steps' ``timestamps``; see :mod:`flax_linoss.data.protocol`).
            ``ppg_dalia``: ``data_dir``, ``manual_dir`` (alias ``root``), ``config``
            (:class:`~flax_linoss.data.ppg_files.PpgConfig`), ``split_seed``,
            ``download``, ``verify``.

    Returns:
        A :class:`DatasetSplits`: ``{"train", "val", "test"} -> source`` with ``.info``.

    Raises:
        UnknownDatasetError: Unknown name or option (with the closest known ones).
        DataError: Missing or broken data (see :mod:`flax_linoss.data.errors`).
    """
    key = _ALIASES.get(name, name)
    entry = DATASETS.get(key)
    if entry is None:
        raise UnknownDatasetError(
            f"Unknown dataset {name!r}{_suggest(name, DATASETS)}. Known: {', '.join(DATASETS)}"
        )
    check_options(key, options, entry.options_from())
    return entry.load(key, seed, **options)
