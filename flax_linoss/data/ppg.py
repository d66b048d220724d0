"""PPG-DaLiA heart-rate regression: the papers' preprocessing and a TFDS builder (no TF needed).

Preprocessing (as the reference code, but with a seeded split order), per subject:

1. Wrist signals to 64 Hz: ACC (32 Hz, 3 axes) repeats each sample twice, BVP (64 Hz) as is,
   EDA and TEMP (4 Hz) repeat each sample 16 times: 6 channels ``[T, 6]``.
2. Min-max scale each signal to ``[-1, 1]`` over the subject's recording (ACC over its three
   axes together, as the reference does). The heart-rate labels (one per 2 s = 128 steps,
   first label repeated 3 times in front so label ``j`` covers steps ``[128 j, 128 (j+1))``)
   are scaled the same way.
3. Chronological 70/15/15 blocks. Which block is train / val / test is one of six orders
   (val-test after train, test-val after train, val first, test first, ...), picked by
   ``numpy.random.default_rng([split_seed, subject]).integers(6)`` instead of the
   reference's unseeded ``random.randint``. Block bounds are ``int(0.15 T)``, ``int(0.3 T)``,
   ``int(0.7 T)``, ``int(0.85 T)`` as in the reference.
4. Windows of 49,920 steps with stride 4,992 inside each block, each with the 390 labels
   (one per 128 steps) of its span.

Prepare (the raw data is the ``PPG_FieldStudy`` folder with ``S1/S1.pkl`` ... ``S15/S15.pkl``
from https://archive.ics.uci.edu/dataset/495/ppg+dalia)::

    python -m flax_linoss.data.ppg --manual_dir /path/containing/PPG_FieldStudy \\
        --data_dir ~/tensorflow_datasets

The ``.pkl`` files are Python pickles: only read files from a source you trust.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "PPG_URL",
    "PpgConfig",
    "find_subject_file",
    "make_ppg_builder",
    "ppg_splits",
    "preprocess_subject",
    "split_blocks",
    "subject_windows",
    "windows",
]

PPG_URL = "https://archive.ics.uci.edu/static/public/495/ppg+dalia.zip"
SUBJECTS = tuple(range(1, 16))


@dataclasses.dataclass(frozen=True)
class PpgConfig:
    """Window and split settings (the defaults are the papers').

    Attributes:
        window: Steps per window (64 Hz).
        stride: Steps between window starts.
        label_step: Steps per heart-rate label.
        split_seed: Seed of the per-subject block order.
        subjects: Subject numbers to read (``S{k}``).
    """

    window: int = 49920
    stride: int = 4992
    label_step: int = 128
    split_seed: int = 0
    subjects: tuple[int, ...] = SUBJECTS

    def __post_init__(self):
        if self.window % self.label_step or self.stride % self.label_step:
            raise ValueError(
                f"window ({self.window}) and stride ({self.stride}) must be multiples of "
                f"label_step ({self.label_step})"
            )


def _minmax(a: np.ndarray, what: str) -> np.ndarray:
    lo, hi = np.min(a), np.max(a)
    if not hi > lo:
        raise ValueError(f"{what} is constant ({lo}); cannot min-max scale it")
    return 2.0 * (a - lo) / (hi - lo) - 1.0


def preprocess_subject(data: dict[str, Any], *, where: str = "subject") -> tuple[np.ndarray, ...]:
    """Steps 1-2 of the module docstring for one subject's pickle contents.

    Args:
        data: ``{"signal": {"wrist": {"ACC": [T/2, 3], "BVP": [T, 1], "EDA": [T/16, 1],
            "TEMP": [T/16, 1]}}, "label": [n]}`` as in ``S{k}.pkl``.
        where: Name used in error messages (e.g. the file).

    Returns:
        ``(x float32 [T, 6], labels float32 [T / 128])``, both scaled to ``[-1, 1]``.

    Raises:
        ValueError: Missing keys, or signals whose lengths disagree by more than one second.
    """
    try:
        wrist = data["signal"]["wrist"]
        acc, bvp, eda, temp = (
            np.asarray(wrist[k], np.float64) for k in ("ACC", "BVP", "EDA", "TEMP")
        )
        label = np.asarray(data["label"], np.float64).reshape(-1)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{where}: not a PPG-DaLiA subject record (missing {e})") from None
    sigs = {
        "ACC": np.repeat(acc.reshape(len(acc), -1), 2, axis=0),
        "BVP": bvp.reshape(len(bvp), -1),
        "EDA": np.repeat(eda.reshape(len(eda), -1), 16, axis=0),
        "TEMP": np.repeat(temp.reshape(len(temp), -1), 16, axis=0),
    }
    if sigs["ACC"].shape[1] != 3 or any(sigs[k].shape[1] != 1 for k in ("BVP", "EDA", "TEMP")):
        raise ValueError(f"{where}: expected ACC [n, 3] and BVP/EDA/TEMP [n, 1]")
    lengths = {k: len(v) for k, v in sigs.items()}
    t = min(lengths.values())
    if max(lengths.values()) - t > 64:
        raise ValueError(f"{where}: signal lengths at 64 Hz disagree by over 1 s: {lengths}")
    x = np.concatenate([_minmax(v[:t], f"{where} {k}") for k, v in sigs.items()], axis=1)
    labels = np.concatenate([np.repeat(label[:1], 3), label])
    labels = _minmax(labels, f"{where} label")
    return x.astype(np.float32), labels.astype(np.float32)


def split_blocks(length: int, variant: int) -> dict[str, tuple[int, int]]:
    """Chronological ``[start, stop)`` of train / val / test for one of the six block orders."""
    a, b, c, d = (int(f * length) for f in (0.15, 0.3, 0.7, 0.85))
    orders = {
        0: {"train": (0, c), "val": (c, d), "test": (d, length)},
        1: {"train": (0, c), "val": (d, length), "test": (c, d)},
        2: {"train": (a, d), "val": (0, a), "test": (d, length)},
        3: {"train": (a, d), "val": (d, length), "test": (0, a)},
        4: {"train": (b, length), "val": (0, a), "test": (a, b)},
        5: {"train": (b, length), "val": (a, b), "test": (0, a)},
    }
    if variant not in orders:
        raise ValueError(f"variant must be in 0..5, got {variant}")
    return orders[variant]


def split_variant(split_seed: int, subject: int) -> int:
    """The block order of ``subject``: ``default_rng([split_seed, subject]).integers(6)``."""
    return int(np.random.default_rng([int(split_seed), int(subject)]).integers(6))


def windows(x: np.ndarray, labels: np.ndarray, cfg: PpgConfig) -> tuple[np.ndarray, np.ndarray]:
    """Windows of one block: ``x [T, 6]``, ``labels [T / label_step]`` ->
    ``([n, window, 6], [n, window / label_step])`` (views, no copy).

    ``n`` is the number of full windows both inputs and labels cover; a trailing part shorter
    than a window is not used (as in the reference).
    """
    from numpy.lib.stride_tricks import sliding_window_view as swv

    lw, ls = cfg.window // cfg.label_step, cfg.stride // cfg.label_step
    if len(x) < cfg.window or len(labels) < lw:
        return (np.zeros((0, cfg.window, x.shape[1]), x.dtype), np.zeros((0, lw), labels.dtype))
    xw = swv(x, cfg.window, axis=0)[:: cfg.stride]  # [n, 6, window]
    yw = swv(labels, lw, axis=0)[::ls]
    n = min(len(xw), len(yw))
    return np.swapaxes(xw[:n], 1, 2), yw[:n]


def subject_windows(
    data: dict[str, Any], subject: int, cfg: PpgConfig, *, where: str = "subject"
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """All steps for one subject: ``{"train", "val", "test"} -> (x [n, W, 6], y [n, W/128])``."""
    x, labels = preprocess_subject(data, where=where)
    blocks = split_blocks(len(x), split_variant(cfg.split_seed, subject))
    out = {}
    step = cfg.label_step
    for split, (s, e) in blocks.items():
        # Start each block on a label boundary (label j covers steps [128 j, 128 (j + 1))),
        # rounding up so that no step is shared with the block before.
        ls, le = -(-s // step), e // step
        out[split] = windows(x[ls * step : e], labels[ls:le], cfg)
    return out


def find_subject_file(root: str | os.PathLike, subject: int) -> Path:
    """``S{k}.pkl`` under ``root`` (``PPG_FieldStudy/S{k}/``, ``S{k}/`` or ``root`` itself).

    Raises:
        FileNotFoundError: Says where to put which files and where to get them.
    """
    root = Path(root)
    name = f"S{subject}.pkl"
    for c in (
        root / "PPG_FieldStudy" / f"S{subject}" / name,
        root / f"S{subject}" / name,
        root / name,
    ):
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"PPG-DaLiA file {name} not found under {root}. Put the PPG_FieldStudy folder (with "
        f"S1/S1.pkl ... S15/S15.pkl) in the manual folder; get it from {PPG_URL} "
        "(https://archive.ics.uci.edu/dataset/495/ppg+dalia) and unzip it (it contains "
        "PPG_FieldStudy.zip, unzip that too)."
    )


def load_subject(path: Path) -> dict[str, Any]:
    """Unpickles ``S{k}.pkl`` (Python 2 pickle, hence ``latin1``), naming the file on error."""
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as e:
        raise ValueError(f"{path}: corrupt or truncated pickle ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------- TFDS


def make_ppg_builder():
    """Defines (once) and returns the TFDS builder class ``PpgDalia`` (imports TFDS)."""
    global _BUILDER
    if _BUILDER is not None:
        return _BUILDER
    import tensorflow_datasets as tfds
    from etils import epath

    class PpgDaliaConfig(tfds.core.BuilderConfig):
        """A :class:`PpgConfig` as a TFDS config."""

        def __init__(self, *, name: str, ppg: PpgConfig, **kwargs):
            super().__init__(
                name=name,
                description=(
                    f"windows {ppg.window}, stride {ppg.stride}, label every {ppg.label_step} "
                    f"steps, split seed {ppg.split_seed}, subjects {list(ppg.subjects)}"
                ),
                **kwargs,
            )
            self.ppg = ppg

    class PpgDalia(tfds.core.GeneratorBasedBuilder):
        """PPG-DaLiA windows: ``series`` float32 ``[49920, 6]``, ``label`` float32 ``[390]``."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
        BUILDER_CONFIGS: ClassVar[list] = [PpgDaliaConfig(name="default", ppg=PpgConfig())]
        MANUAL_DOWNLOAD_INSTRUCTIONS = (
            f"Put PPG_FieldStudy/S1/S1.pkl ... S15/S15.pkl in the manual folder (from {PPG_URL})."
        )

        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls) -> epath.Path:
            # TFDS 4.9.10's own lookup needs the `importlib_resources` backport.
            return epath.Path(inspect.getfile(make_ppg_builder))

        def __init__(self, *, download: bool = False, **kwargs):
            kwargs.setdefault("file_format", "array_record")
            self._download = download
            super().__init__(**kwargs)

        def _info(self):
            c: PpgConfig = self.builder_config.ppg
            return tfds.core.DatasetInfo(
                builder=self,
                description="PPG-DaLiA wrist signals (64 Hz) to heart rate, papers' windows.",
                features=tfds.features.FeaturesDict(
                    {
                        "series": tfds.features.Tensor(shape=(c.window, 6), dtype=np.float32),
                        "label": tfds.features.Tensor(
                            shape=(c.window // c.label_step,), dtype=np.float32
                        ),
                        "subject": tfds.features.Scalar(dtype=np.int32),
                    }
                ),
                supervised_keys=("series", "label"),
                disable_shuffling=True,
                homepage="https://archive.ics.uci.edu/dataset/495/ppg+dalia",
            )

        def _split_generators(self, dl_manager):
            c: PpgConfig = self.builder_config.ppg
            manual = getattr(dl_manager, "_manual_dir", None)
            root = Path(manual) if manual is not None else None
            if (root is None or not root.is_dir()) and self._download:
                root = Path(dl_manager.download_and_extract(PPG_URL))
                inner = list(root.rglob("PPG_FieldStudy.zip"))
                if inner:
                    root = Path(dl_manager.extract(inner[0]))
            if root is None:
                raise FileNotFoundError(
                    "No manual folder for ppg_dalia: pass download_config=tfds.download."
                    "DownloadConfig(manual_dir=...) pointing at the folder that contains "
                    f"PPG_FieldStudy/S1/S1.pkl ... S15/S15.pkl (from {PPG_URL})."
                )
            # Locate and check every file before writing anything.
            files = {s: find_subject_file(root, s) for s in c.subjects}
            return {
                split: self._generate_examples(files, split)
                for split in ("train", "validation", "test")
            }

        def _generate_examples(self, files, split):
            c: PpgConfig = self.builder_config.ppg
            key = "val" if split == "validation" else split
            for s, path in files.items():
                xw, yw = subject_windows(load_subject(path), s, c, where=str(path))[key]
                for i in range(len(xw)):
                    yield (
                        f"S{s}_{i:05d}",
                        {
                            "series": np.ascontiguousarray(xw[i]),
                            "label": np.ascontiguousarray(yw[i]),
                            "subject": np.int32(s),
                        },
                    )

    PpgDalia.Config = PpgDaliaConfig
    _BUILDER = PpgDalia
    return PpgDalia


_BUILDER = None


def __getattr__(name: str):
    if name in ("PpgDalia", "PpgDaliaConfig"):
        b = make_ppg_builder()
        return b if name == "PpgDalia" else b.Config
    raise AttributeError(name)


def builder(config: PpgConfig | None = None, data_dir: str | os.PathLike | None = None, **kwargs):
    """A ``PpgDalia`` builder for ``config`` (default: the papers' settings, split seed 0)."""
    cls = make_ppg_builder()
    if config is None or config == PpgConfig():
        cfg: Any = "default"
    else:
        name = f"w{config.window}_s{config.stride}_seed{config.split_seed}"
        if config.subjects != SUBJECTS:
            name += "_S" + "-".join(map(str, config.subjects))
        cfg = cls.Config(name=name, ppg=config)
    return cls(config=cfg, data_dir=None if data_dir is None else os.fspath(data_dir), **kwargs)


def prepare(
    manual_dir: str | os.PathLike | None,
    data_dir: str | os.PathLike | None = None,
    config: PpgConfig | None = None,
    *,
    download: bool = False,
):
    """Builds PPG-DaLiA windows as ``array_record`` and returns the prepared builder."""
    import tensorflow_datasets as tfds

    b = builder(config, data_dir, download=download)
    b.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=None if manual_dir is None else os.fspath(manual_dir)
        )
    )
    return b


def ppg_splits(
    *,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    config: PpgConfig | None = None,
    split_seed: int | None = None,
):
    """Train / val / test TFDS data sources, preparing from ``manual_dir`` if needed.

    The split order is fixed by ``config.split_seed`` (or ``split_seed``), not by ``seed``:
    like the papers, every training seed sees the same windows.

    Returns:
        A :class:`~flax_linoss.data.registry.DatasetSplits` of data sources giving
        ``{"series": float32 [49920, 6], "label": float32 [390], "subject": int32}``.
    """
    from flax_linoss.data.registry import DatasetSplits

    del seed
    config = config or PpgConfig()
    if split_seed is not None:
        config = dataclasses.replace(config, split_seed=split_seed)
    b = builder(config, data_dir)
    if not b.is_prepared():
        if manual_dir is None:
            raise FileNotFoundError(
                f"PPG-DaLiA is not prepared in {b.data_dir}; pass manual_dir= (the folder "
                f"containing PPG_FieldStudy/, from {PPG_URL})"
            )
        b = prepare(manual_dir, data_dir, config)
    src = b.as_data_source()
    splits = {"train": src["train"], "val": src["validation"], "test": src["test"]}
    info = {
        "task": "regression",
        "channels": 6,
        "length": config.window,
        "target_shape": (config.window // config.label_step,),
        "output_step": config.label_step,
    }
    return DatasetSplits(splits, info)


def main(argv: list[str] | None = None) -> None:
    """``python -m flax_linoss.data.ppg --manual_dir DIR [--data_dir DIR] [--split_seed S]``."""
    p = argparse.ArgumentParser(description="Prepare PPG-DaLiA windows as TFDS array_record.")
    p.add_argument("--manual_dir", default=None)
    p.add_argument("--data_dir", default=None)
    p.add_argument("--split_seed", type=int, default=0)
    p.add_argument("--download", action="store_true")
    a = p.parse_args(argv)
    b = prepare(a.manual_dir, a.data_dir, PpgConfig(split_seed=a.split_seed), download=a.download)
    print(
        f"Prepared {b.info.full_name}: { ({k: v.num_examples for k, v in b.info.splits.items()}) }"
    )


if __name__ == "__main__":
    main()
