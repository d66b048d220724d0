"""Where data lives: one data directory for every dataset.

The data directory is, in this order:

1. the ``data_dir`` argument (``get_dataset(..., data_dir=DIR)``, ``--data_dir DIR``);
2. ``$FLAX_LINOSS_DATA_DIR``;
3. TFDS's own default: ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``.

Inside it, TFDS's layout:

* ``<data_dir>/<builder>/<config>/<version>/``: a prepared dataset (``array_record`` files,
  ``dataset_info.json`` and ``metadata.json``, which records the SHA-256 of every raw file
  it was prepared from), e.g. ``uea/SelfRegulationSCP1/1.1.0/``;
* ``<data_dir>/downloads/manual/``: the default folder of raw files that you put there by
  hand (TFDS's manual folder), e.g. ``downloads/manual/SelfRegulationSCP1/*.arff`` or
  ``downloads/manual/uea/SelfRegulationSCP1/*.arff``;
* ``<data_dir>/downloads/``: what the download code fetched.

An empty string counts as "not given" everywhere (configs use ``""`` for the default).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ENV_VAR", "data_dir", "download_dir", "given", "manual_dir"]

#: Environment variable naming the data directory.
ENV_VAR = "FLAX_LINOSS_DATA_DIR"


def given(value: str | os.PathLike | None) -> bool:
    """Whether an optional path argument was given (``None`` and ``""`` mean "default")."""
    return value is not None and os.fspath(value) != ""


def data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory (see the module docstring); not created here.

    Args:
        data_dir: An explicit choice; ``None`` or ``""`` for the default.

    Returns:
        An absolute path with ``~`` expanded.
    """
    if given(data_dir):
        path = Path(data_dir)
    elif os.environ.get(ENV_VAR):
        path = Path(os.environ[ENV_VAR])
    else:  # the rule of tensorflow_datasets.core.constants.get_default_data_dir
        default = os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
        path = Path(os.environ.get("TFDS_DATA_DIR", default))
    return path.expanduser().absolute()


def download_dir(data_dir_: str | os.PathLike | None = None) -> Path:
    """``<data_dir>/downloads``: where downloaded archives go."""
    return data_dir(data_dir_) / "downloads"


def manual_dir(data_dir_: str | os.PathLike | None = None) -> Path:
    """``<data_dir>/downloads/manual``: the default folder of raw files put there by hand."""
    return download_dir(data_dir_) / "manual"
