"""PPG-DaLiA heart-rate regression: the TFDS builder (no TensorFlow needed) and the splits.

The builder follows the package's one pattern (:mod:`flax_linoss.data.builders`), like
:mod:`flax_linoss.data.uea`: raw files (``PPG_FieldStudy/S{k}/S{k}.pkl``) from the manual
folder or the download, verified, read safely and preprocessed
(:mod:`flax_linoss.data.ppg_files`, which documents the papers' preprocessing) before
anything is written, their digests recorded.

Prepare (the raw data is the ``PPG_FieldStudy`` folder with ``S1/S1.pkl`` ... ``S15/S15.pkl``
from https://archive.ics.uci.edu/dataset/495/ppg+dalia; the data directory rule is in
:mod:`flax_linoss.data.paths`)::

    python -m flax_linoss.data.ppg --manual_dir /path/containing/PPG_FieldStudy \\
        [--data_dir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from flax_linoss.data import builders, paths, ppg_files
from flax_linoss.data.errors import DataError, spell_options
from flax_linoss.data.ppg_files import (
    PPG_URL,
    SUBJECTS,
    PpgConfig,
    find_subject_file,
    load_subject,
    preprocess_subject,
    split_blocks,
    split_variant,
    subject_windows,
    windows,
)

__all__ = [
    "PPG_URL",
    "SUBJECTS",
    "PpgConfig",
    "PpgDalia",
    "PpgDaliaConfig",
    "builder",
    "find_subject_file",
    "load",
    "load_subject",
    "main",
    "make_ppg_builder",
    "ppg_splits",
    "prepare",
    "preprocess_subject",
    "split_blocks",
    "split_variant",
    "subject_windows",
    "windows",
]


class PpgDaliaConfig(tfds.core.BuilderConfig):
    """A :class:`~flax_linoss.data.ppg_files.PpgConfig` as a TFDS config."""

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


class PpgDalia(builders.RawFilesBuilder):
    """PPG-DaLiA windows: ``series`` float32 ``[49920, 6]``, ``label`` float32 ``[390]``.

    Args:
        download: Download the UCI zip (:data:`PPG_URL`) when the manual folder has no files.
        **kwargs: See :class:`~flax_linoss.data.builders.RawFilesBuilder`.
    """

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Initial release.",
        "1.1.0": "Raw files' SHA-256 recorded in metadata.json; restricted unpickling.",
    }
    BUILDER_CONFIGS: ClassVar[list] = [PpgDaliaConfig(name="default", ppg=PpgConfig())]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Put PPG_FieldStudy/S1/S1.pkl ... S15/S15.pkl in the manual folder (from {PPG_URL})."
    )
    Config = PpgDaliaConfig
    RAW_FILES_OPTION = "manual_dir"

    def _features(self):
        c: PpgConfig = self.builder_config.ppg
        return dict(
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
            homepage="https://archive.ics.uci.edu/dataset/495/ppg+dalia",
        )

    def find_raw_files(self, folder: Path) -> list[Path]:
        return ppg_files.subject_files(folder, self.builder_config.ppg.subjects)

    def _download_raw(self, dl_manager) -> Path:
        root = self._fetch(dl_manager, PPG_URL)
        inner = sorted(root.rglob("PPG_FieldStudy.zip"))
        return Path(dl_manager.extract(inner[0])) if inner else root

    def _check_raw_file(self, path: Path) -> None:
        ppg_files.check_subject_file(path)

    def _read_raw(self, files: list[Path]) -> dict[str, Any]:
        # Subjects are read one at a time while writing (each is large); the files were
        # verified, and are unpickled with the restricted unpickler.
        subjects = dict(zip(self.builder_config.ppg.subjects, files))
        return {split: (subjects, split) for split in ("train", "validation", "test")}

    def _generate_examples(self, data):
        files, split = data
        c: PpgConfig = self.builder_config.ppg
        key = "val" if split == "validation" else split
        for s, path in files.items():
            record = load_subject(path, verify=False)  # verified by the base class
            xw, yw = subject_windows(record, s, c, where=str(path))[key]
            for i in range(len(xw)):
                yield (
                    f"S{s}_{i:05d}",
                    {
                        "series": np.ascontiguousarray(xw[i]),
                        "label": np.ascontiguousarray(yw[i]),
                        "subject": np.int32(s),
                    },
                )


def make_ppg_builder() -> type[PpgDalia]:
    """The builder class (kept for older code; ``PpgDalia`` itself is importable)."""
    return PpgDalia


def _config(config: PpgConfig | None) -> str | PpgDaliaConfig:
    if config is None or config == PpgConfig():
        return "default"
    name = f"w{config.window}_s{config.stride}_seed{config.split_seed}"
    if config.subjects != SUBJECTS:
        name += "_S" + "-".join(map(str, config.subjects))
    return PpgDaliaConfig(name=name, ppg=config)


def builder(config: PpgConfig | None = None, data_dir: str | os.PathLike | None = None, **kwargs):
    """A ``PpgDalia`` builder for ``config`` (default: the papers' settings, split seed 0)
    in the data directory (see :mod:`flax_linoss.data.paths`); not prepared here."""
    return PpgDalia(config=_config(config), data_dir=os.fspath(paths.data_dir(data_dir)), **kwargs)


def load(
    config: PpgConfig | None = None,
    *,
    manual_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    verify: bool = True,
) -> PpgDalia:
    """The prepared builder, preparing it first if needed
    (see :func:`flax_linoss.data.builders.load`)."""
    return builders.load(
        PpgDalia,
        _config(config),
        data_dir=data_dir,
        manual_dir=manual_dir,
        download=download,
        verify=verify,
    )


def prepare(
    manual_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    config: PpgConfig | None = None,
    *,
    download: bool = True,
) -> PpgDalia:
    """Builds PPG-DaLiA windows as ``array_record`` (if needed) and returns the builder."""
    return load(config, manual_dir=manual_dir, data_dir=data_dir, download=download)


def ppg_splits(
    *,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    config: PpgConfig | None = None,
    split_seed: int | None = None,
    download: bool = True,
    verify: bool = True,
):
    """Train / val / test TFDS data sources, preparing them on first use.

    The split order is fixed by ``config.split_seed`` (or ``split_seed``), not by ``seed``:
    like the papers, every training seed sees the same windows.

    Args:
        seed: Unused (accepted so that every dataset takes a seed).
        data_dir: Data directory (see :mod:`flax_linoss.data.paths`).
        manual_dir: Folder containing ``PPG_FieldStudy/`` (default
            ``<data_dir>/downloads/manual``); ``root`` is the same option under the name
            every dataset uses.
        root: See ``manual_dir``.
        config: Window and split settings.
        split_seed: Overrides ``config.split_seed``.
        download: Download the raw files if they are not found.
        verify: Check raw files' checksums.

    Returns:
        A :class:`~flax_linoss.data.registry.DatasetSplits` of data sources giving
        ``{"series": float32 [49920, 6], "label": float32 [390], "subject": int32}``.
    """
    from flax_linoss.data.registry import DatasetSplits

    del seed
    if paths.given(root) and paths.given(manual_dir) and Path(root) != Path(manual_dir):
        raise DataError(f"root={root} and manual_dir={manual_dir} disagree; give one of them")
    manual_dir = manual_dir if paths.given(manual_dir) else root
    config = config or PpgConfig()
    if split_seed is not None:
        config = dataclasses.replace(config, split_seed=split_seed)
    b = load(config, manual_dir=manual_dir, data_dir=data_dir, download=download, verify=verify)
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
    """``python -m flax_linoss.data.ppg [--manual_dir DIR] [--data_dir DIR] [--split_seed S]``."""
    p = argparse.ArgumentParser(description="Prepare PPG-DaLiA windows as TFDS array_record.")
    p.add_argument("--manual_dir", default=None, help="folder containing PPG_FieldStudy/")
    p.add_argument("--data_dir", default=None, help="data directory (prepared datasets)")
    p.add_argument("--split_seed", type=int, default=0)
    p.add_argument(
        "--no_download", action="store_true", help="fail instead of downloading missing files"
    )
    p.add_argument("--download", action="store_true", help=argparse.SUPPRESS)  # old flag
    a = p.parse_args(argv)
    spell_options(manual_dir="--manual_dir DIR", data_dir="--data_dir DIR")
    try:
        b = prepare(
            a.manual_dir,
            a.data_dir,
            PpgConfig(split_seed=a.split_seed),
            download=not a.no_download,
        )
    except DataError as e:
        sys.exit(f"error: {e}")
    splits = {k: v.num_examples for k, v in b.info.splits.items()}
    print(f"Prepared {b.info.full_name} in {b.data_dir}: {splits}")


if __name__ == "__main__":
    main()
