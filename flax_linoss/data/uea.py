"""TFDS builder for the UEA multivariate classification archive (no TensorFlow needed).

One builder config per line of :data:`flax_linoss.data.uea_table.UEA_DATASETS`. Features:
``series`` float32 ``[L, C]``, ``label`` ``ClassLabel`` with the archive's class names;
splits ``train`` and ``test`` are the archive's own, in its row order. The papers' 70/15/15
protocol is in :mod:`flax_linoss.data.protocol`. The builder follows the package's one
pattern (:mod:`flax_linoss.data.builders`): raw files from the manual folder or the
download, verified, parsed and checked before anything is written, their digests recorded.

Prepare one dataset (the data directory rule is in :mod:`flax_linoss.data.paths`)::

    python -m flax_linoss.data.uea --dataset SelfRegulationSCP1 --manual_dir DIR \\
        [--data_dir DIR]

then read it back without TensorFlow::

    import tensorflow_datasets as tfds
    import flax_linoss.data.uea  # registers the builder
    train = tfds.data_source("uea/SelfRegulationSCP1", split="train", data_dir=DIR)
    train[0]  # {"series": float32 [896, 6], "label": int64}

The manual folder may hold the files directly or in ``<Name>/``, ``uea/<Name>/``,
``Multivariate_arff/<Name>/`` or ``Multivariate_ts/<Name>/``; per-dimension ARFF,
relational ARFF and ``.ts`` are read (:mod:`flax_linoss.data.uea_formats`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from flax_linoss.data import builders, uea_formats
from flax_linoss.data.errors import DataError, spell_options
from flax_linoss.data.uea_table import (
    DATASET_URL,
    UEA_DATASETS,
    UEADatasetInfo,
    uea_dataset_info,
)

__all__ = ["Uea", "UeaConfig", "load", "main", "prepare", "uea_arrays"]

_HOMEPAGE = "https://www.timeseriesclassification.com/"
_CITATION = """@article{bagnall2018uea,
  title={The UEA multivariate time series classification archive, 2018},
  author={Bagnall, Anthony and Dau, Hoang Anh and Lines, Jason and Flynn, Michael and
          Large, James and Bostrom, Aaron and Southam, Paul and Keogh, Eamonn},
  journal={arXiv preprint arXiv:1811.00075},
  year={2018}
}"""


class UeaConfig(tfds.core.BuilderConfig):
    """One UEA dataset.

    Args:
        info: The dataset's table entry (name, channels, length, classes, split sizes).
        fmt: File layout to read: ``"auto"`` or one of
            :data:`~flax_linoss.data.uea_formats.LAYOUTS`.
    """

    def __init__(self, *, info: UEADatasetInfo, fmt: str = "auto", **kwargs):
        super().__init__(
            name=info.name,
            description=(
                f"UEA {info.name}: {info.num_train} train / {info.num_test} test series of "
                f"length {info.length} with {info.channels} channels, "
                f"{len(info.class_names)} classes."
            ),
            **kwargs,
        )
        self.dataset = info
        self.fmt = fmt


class Uea(builders.RawFilesBuilder):
    """UEA multivariate archive; config name = dataset name, e.g. ``uea/SelfRegulationSCP1``.

    Args:
        download: Download the dataset's zip (:data:`~flax_linoss.data.uea_table.DATASET_URL`,
            or ``download_url``) when the manual folder has no files for it.
        download_url: Another zip to download (e.g. the whole archive,
            :data:`~flax_linoss.data.uea_table.ARCHIVE_URL`).
        **kwargs: See :class:`~flax_linoss.data.builders.RawFilesBuilder`.
    """

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Initial release.",
        "1.1.0": "Raw files' SHA-256 recorded in metadata.json; short channels refused.",
    }
    BUILDER_CONFIGS: ClassVar[list[UeaConfig]] = [UeaConfig(info=i) for i in UEA_DATASETS.values()]
    MANUAL_DOWNLOAD_INSTRUCTIONS = uea_formats.manual_instructions()

    def __init__(self, *, download_url: str | None = None, **kwargs):
        self._download_url = download_url
        super().__init__(**kwargs)

    def _features(self):
        info: UEADatasetInfo = self.builder_config.dataset
        return dict(
            description=self.builder_config.description,
            features=tfds.features.FeaturesDict(
                {
                    "series": tfds.features.Tensor(
                        shape=(info.length, info.channels), dtype=np.float32
                    ),
                    "label": tfds.features.ClassLabel(names=list(info.class_names)),
                }
            ),
            supervised_keys=("series", "label"),
            homepage=_HOMEPAGE,
            citation=_CITATION,
        )

    def find_raw_files(self, folder: Path) -> list[Path]:
        return uea_formats.dataset_files(
            folder, self.builder_config.dataset.name, self.builder_config.fmt
        )

    def _download_raw(self, dl_manager) -> Path:
        url = self._download_url or DATASET_URL.format(name=self.builder_config.dataset.name)
        return self._fetch(dl_manager, url)

    def _check_raw_file(self, path: Path) -> None:
        uea_formats.check_file(path)

    def _read_raw(self, files: list[Path]) -> dict[str, uea_formats.UEASplitData]:
        info: UEADatasetInfo = self.builder_config.dataset
        return {
            split: uea_formats.read_uea_split(
                files[0].parent,
                info.name,
                split.upper(),
                fmt=self.builder_config.fmt,
                verify=False,  # verified by the base class, once
                expected=info,
                missing="nan",  # kept as NaN; get_dataset's `missing` refuses or treats them
            )
            for split in ("train", "test")
        }

    def _generate_examples(self, data: uea_formats.UEASplitData):
        for i in range(data.x.shape[0]):
            yield i, {"series": data.x[i], "label": int(data.labels[i])}


def _config(dataset: str | UEADatasetInfo, fmt: str) -> str | UeaConfig:
    info = dataset if isinstance(dataset, UEADatasetInfo) else uea_dataset_info(dataset)
    if info.name in UEA_DATASETS and UEA_DATASETS[info.name] == info and fmt == "auto":
        return info.name
    return UeaConfig(info=info, fmt=fmt)


def load(
    dataset: str | UEADatasetInfo,
    *,
    root: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    verify: bool = True,
    fmt: str = "auto",
) -> Uea:
    """The prepared ``uea/<dataset>`` builder, preparing it first if needed.

    Args:
        dataset: Archive name (a key of ``UEA_DATASETS``) or a table entry of its own.
        root: Folder of the raw files (must hold them); default
            ``<data_dir>/downloads/manual``, then the download.
        data_dir: Data directory (see :mod:`flax_linoss.data.paths`).
        download: Download the dataset's zip if no raw files are found.
        verify: Check raw files' checksums.
        fmt: File layout (``"auto"`` or one of ``uea_formats.LAYOUTS``).

    Returns:
        The builder; ``builder.as_data_source()["train"]`` gives random access.

    Raises:
        UnknownDatasetError: Unknown name (with the closest known ones).
        DataError: See :func:`flax_linoss.data.builders.load`.
    """
    return builders.load(
        Uea,
        _config(dataset, fmt),
        data_dir=data_dir,
        manual_dir=root,
        download=download,
        verify=verify,
    )


def uea_arrays(builder: Uea) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train [N1, L, C], y_train [N1], x_test [N2, L, C], y_test [N2])`` of a prepared
    builder, float32 series and int32 labels in the archive's order."""
    src = builder.as_data_source()
    out = []
    for split in ("train", "test"):
        s = src[split]
        recs = s.__getitems__(list(range(len(s))))
        out += [
            np.stack([r["series"] for r in recs]).astype(np.float32),
            np.array([r["label"] for r in recs], np.int32),
        ]
    return tuple(out)


def prepare(
    dataset: str,
    manual_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
) -> Uea:
    """Prepares ``uea/<dataset>`` as ``array_record`` (if needed) and returns the builder.

    Same as :func:`load` with ``root=manual_dir``.
    """
    return load(dataset, root=manual_dir, data_dir=data_dir, download=download)


def main(argv: list[str] | None = None) -> None:
    """``python -m flax_linoss.data.uea --dataset NAME [--manual_dir DIR] [--data_dir DIR]``."""
    p = argparse.ArgumentParser(
        description="Prepare a UEA dataset as TFDS array_record (no TensorFlow needed).",
        epilog="Data directory: --data_dir, else $FLAX_LINOSS_DATA_DIR, else TFDS's default "
        "($TFDS_DATA_DIR or ~/tensorflow_datasets). Raw files: --manual_dir, else "
        "<data_dir>/downloads/manual, else downloaded.",
    )
    p.add_argument("--dataset", required=True, help=f"one of {', '.join(UEA_DATASETS)}")
    p.add_argument("--manual_dir", default=None, help="folder with the archive's files")
    p.add_argument("--data_dir", default=None, help="data directory (prepared datasets)")
    p.add_argument(
        "--no_download", action="store_true", help="fail instead of downloading missing files"
    )
    p.add_argument("--download", action="store_true", help=argparse.SUPPRESS)  # old flag
    args = p.parse_args(argv)
    spell_options(root="--manual_dir DIR", data_dir="--data_dir DIR")
    try:
        b = prepare(args.dataset, args.manual_dir, args.data_dir, download=not args.no_download)
    except DataError as e:
        sys.exit(f"error: {e}")
    splits = {k: v.num_examples for k, v in b.info.splits.items()}
    print(f"Prepared uea/{b.builder_config.name} in {b.data_dir}: {splits}")


if __name__ == "__main__":
    main()
