"""The UEA datasets this package knows: one line each, and where the archive lives.

Add a dataset by adding a line to :data:`UEA_DATASETS` (its name, channels, length, class
names in the archive's order, and TRAIN / TEST sizes): it then has a TFDS config
(``uea/<Name>``), a ``get_dataset`` name and a ``--dataset`` choice.
"""

from __future__ import annotations

import dataclasses
import difflib

from flax_linoss.data.errors import UnknownDatasetError

__all__ = ["ARCHIVE_URL", "DATASET_URL", "UEA_DATASETS", "UEADatasetInfo", "uea_dataset_info"]

#: The whole multivariate archive as one zip of ARFF files (about 0.9 GB).
ARCHIVE_URL = (
    "https://www.timeseriesclassification.com/aeon-toolkit/Archives/Multivariate2018_arff.zip"
)
#: One dataset as a zip (ARFF and ``.ts`` files of both splits).
DATASET_URL = "https://www.timeseriesclassification.com/aeon-toolkit/{name}.zip"


@dataclasses.dataclass(frozen=True)
class UEADatasetInfo:
    """What the archive says about one dataset.

    Attributes:
        name: The archive's name, e.g. ``"SelfRegulationSCP1"``.
        channels: Number of dimensions ``C``.
        length: Series length ``L`` (the longest series if not ``equal_length``).
        class_names: Class labels in the archive's declared order; label ``k`` is
            ``class_names[k]``.
        num_train: Examples in the archive's TRAIN split.
        num_test: Examples in the archive's TEST split.
        equal_length: Every series of every channel has ``length`` values; a shorter one
            is refused. If false, shorter series are padded at the end with NaN.
    """

    name: str
    channels: int
    length: int
    class_names: tuple[str, ...]
    num_train: int
    num_test: int
    equal_length: bool = True


def _info(*args) -> tuple[str, UEADatasetInfo]:
    return args[0], UEADatasetInfo(*args)


#: Datasets with a TFDS config (those of the LinOSS and D-LinOSS papers).
UEA_DATASETS: dict[str, UEADatasetInfo] = dict(
    [
        _info("EigenWorms", 6, 17984, ("1", "2", "3", "4", "5"), 128, 131),
        _info("SelfRegulationSCP1", 6, 896, ("negativity", "positivity"), 268, 293),
        _info("SelfRegulationSCP2", 7, 1152, ("negativity", "positivity"), 200, 180),
        _info("EthanolConcentration", 3, 1751, ("E35", "E38", "E40", "E45"), 261, 263),
        _info("Heartbeat", 61, 405, ("abnormal", "normal"), 204, 205),
        _info("MotorImagery", 64, 3000, ("finger", "tongue"), 278, 100),
    ]
)


def uea_dataset_info(name: str) -> UEADatasetInfo:
    """The table entry for ``name``.

    Raises:
        UnknownDatasetError: Unknown name; suggests the closest and lists the known ones.
    """
    try:
        return UEA_DATASETS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(UEA_DATASETS), n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UnknownDatasetError(
            f"Unknown UEA dataset {name!r}{hint}. Known: {', '.join(sorted(UEA_DATASETS))}. "
            "Add a line to flax_linoss.data.uea_table.UEA_DATASETS to use another one."
        ) from None
