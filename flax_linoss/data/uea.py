"""TFDS builder for the UEA multivariate classification archive (no TensorFlow needed).

One builder config per dataset in :data:`flax_linoss.data.uea_files.UEA_DATASETS` (add a line
there to cover more of the archive). Features: ``series`` float32 ``[L, C]``, ``label``
``ClassLabel`` with the archive's class names; splits ``train`` and ``test`` are the archive's
own. The paper's 70/15/15 protocol is in :mod:`flax_linoss.data.protocol`.

Prepare one dataset from a local folder (writes ``array_record``, readable without TF)::

    python -m flax_linoss.data.uea --dataset SelfRegulationSCP1 \\
        --manual_dir ../shared/data/uea --data_dir ~/tensorflow_datasets

then read it back::

    import tensorflow_datasets as tfds
from etils import epath
    import flax_linoss.data.uea  # registers the builder
    train = tfds.data_source("uea/SelfRegulationSCP1", split="train",
                             data_dir="~/tensorflow_datasets")
    train[0]  # {"series": float32 [896, 6], "label": int64}

The manual folder may hold the files directly or in ``<Name>/``, ``Multivariate_arff/<Name>/``
or ``Multivariate_ts/<Name>/``; both per-dimension ARFF, relational ARFF and ``.ts`` are read,
and ``SHA256SUMS`` / known digests are verified. Preparation is atomic: TFDS writes into a
temporary folder and renames it only after every split was written, and both splits are fully
parsed and checked before anything is written.
"""

from __future__ import annotations

import argparse
import inspect
import os
from pathlib import Path
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from flax_linoss.data import uea_files
from flax_linoss.data.uea_files import UEA_DATASETS, UEADatasetInfo

__all__ = ["Uea", "UeaConfig", "prepare"]

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
        fmt: File layout to read: ``"auto"``, ``"arff"``, ``"arff_dims"`` or ``"ts"``.
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


class Uea(tfds.core.GeneratorBasedBuilder):
    """UEA multivariate archive; config name = dataset name, e.g. ``uea/SelfRegulationSCP1``.

    Args:
        download: If true and the manual folder has no files for the dataset, download the
            dataset's zip from the archive (:data:`~flax_linoss.data.uea_files.DATASET_URL`,
            or ``download_url``). Off by default: without files, preparation fails with
            instructions.
        download_url: Another zip to download (e.g. the whole archive,
            :data:`~flax_linoss.data.uea_files.ARCHIVE_URL`).
        **kwargs: Passed to ``tfds.core.GeneratorBasedBuilder`` (``config``, ``data_dir``,
            ``file_format``, which defaults to ``"array_record"``).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS: ClassVar[list[UeaConfig]] = [UeaConfig(info=i) for i in UEA_DATASETS.values()]
    MANUAL_DOWNLOAD_INSTRUCTIONS = uea_files.manual_instructions()

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS 4.9.10's own lookup needs the `importlib_resources` backport on Python >= 3.9.
        return epath.Path(inspect.getfile(cls))

    def __init__(self, *, download: bool = False, download_url: str | None = None, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        self._download = download
        self._download_url = download_url
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        info: UEADatasetInfo = self.builder_config.dataset
        return tfds.core.DatasetInfo(
            builder=self,
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
            # Keep the archive's row order (TFDS would otherwise shuffle by key).
            disable_shuffling=True,
            homepage=_HOMEPAGE,
            citation=_CITATION,
        )

    def _locate(self, dl_manager) -> Path:
        name = self.builder_config.name
        manual = getattr(dl_manager, "_manual_dir", None)
        if manual is not None and Path(manual).is_dir():
            try:
                return uea_files.find_dataset_folder(Path(manual), name)
            except FileNotFoundError:
                if not self._download:
                    raise
        if self._download:
            url = self._download_url or uea_files.DATASET_URL.format(name=name)
            extracted = Path(dl_manager.download_and_extract(url))
            return uea_files.find_dataset_folder(extracted, name)
        raise FileNotFoundError(
            f"The manual folder {manual} for uea/{name} does not exist. Pass "
            "download_config=tfds.download.DownloadConfig(manual_dir=...) (or --manual_dir).\n"
            + uea_files.manual_instructions(name)
        )

    def _split_generators(self, dl_manager):
        folder = self._locate(dl_manager)
        info: UEADatasetInfo = self.builder_config.dataset
        # Read and check both splits before writing anything.
        data = {
            split: uea_files.read_uea_split(
                folder, info.name, split.upper(), fmt=self.builder_config.fmt, expected=info
            )
            for split in ("train", "test")
        }
        return {split: self._generate_examples(d) for split, d in data.items()}

    def _generate_examples(self, data: uea_files.UEASplitData):
        for i in range(data.x.shape[0]):
            yield i, {"series": data.x[i], "label": int(data.labels[i])}


def prepare(
    dataset: str,
    manual_dir: str | os.PathLike | None,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = False,
) -> Uea:
    """Builds ``uea/<dataset>`` as ``array_record`` and returns the prepared builder.

    Args:
        dataset: Archive name, e.g. ``"SelfRegulationSCP1"``.
        manual_dir: Folder with the archive's files (see the module docstring).
        data_dir: TFDS data folder (default ``~/tensorflow_datasets``).
        download: Download the dataset's zip if the files are not in ``manual_dir``.

    Returns:
        The builder; ``builder.as_data_source()["train"]`` gives random access.
    """
    uea_files.uea_dataset_info(dataset)  # unknown names list the known ones
    builder = Uea(
        config=dataset,
        data_dir=None if data_dir is None else os.fspath(data_dir),
        download=download,
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=None if manual_dir is None else os.fspath(manual_dir)
        ),
    )
    return builder


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m flax_linoss.data.uea --dataset NAME --manual_dir DIR``."""
    p = argparse.ArgumentParser(description="Prepare a UEA dataset as TFDS array_record.")
    p.add_argument("--dataset", required=True, help=f"one of {', '.join(UEA_DATASETS)}")
    p.add_argument("--manual_dir", default=None, help="folder with the archive's files")
    p.add_argument("--data_dir", default=None, help="TFDS data folder")
    p.add_argument("--download", action="store_true", help="download if files are missing")
    args = p.parse_args(argv)
    b = prepare(args.dataset, args.manual_dir, args.data_dir, download=args.download)
    splits = {k: v.num_examples for k, v in b.info.splits.items()}
    print(f"Prepared uea/{args.dataset} in {b.data_dir}: {splits}")


if __name__ == "__main__":
    main()
