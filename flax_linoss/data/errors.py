"""The data package's exceptions: one class a command line can print as one line.

Every problem a user causes on the data side (a missing folder, an unknown dataset name or
option, a corrupt or changed file, a wrong checksum, an unsafe pickle) raises a
:class:`DataError` whose message names the problem, the file or name involved, and what to
do. Programming errors (wrong types inside the library) stay ordinary exceptions.

Where a message tells the user which option to set (the folder of raw files, the data
directory), it names the option as the running program takes it: ``root=DIR`` from Python,
``--config.data.options.root=DIR`` / ``--data_dir=DIR`` under ``flax-linoss``, ``--manual_dir
DIR`` under ``python -m flax_linoss.data.uea``. Each command line says how with
:func:`spell_options`; :func:`option` gives the spelling.
"""

from __future__ import annotations

__all__ = [
    "ChecksumError",
    "DataError",
    "DataFormatError",
    "DataNotFoundError",
    "UnknownDatasetError",
    "UnsafePickleError",
    "option",
    "spell_options",
]

_SPELLING: dict[str, str] = {}


def spell_options(**spelling: str) -> None:
    """Makes data messages name options as this program's users set them.

    Example: ``spell_options(root="--config.data.options.root=DIR", data_dir="--data_dir=DIR")``
    (a command line calls it once, at start). Options not named keep the Python spelling.
    """
    _SPELLING.clear()
    _SPELLING.update(spelling)


def option(name: str) -> str:
    """How a user of the running program sets the data option ``name`` (``name=DIR`` from
    Python; see :func:`spell_options`)."""
    return _SPELLING.get(name, f"{name}=DIR")


class DataError(ValueError):
    """A data problem the user can fix; ``str(e)`` says what and where."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A data folder or raw file is missing (also a :class:`FileNotFoundError`)."""


class UnknownDatasetError(DataError):
    """An unknown dataset name or option; the message suggests the closest known ones."""


class DataFormatError(DataError):
    """A raw file is truncated, corrupt or inconsistent; the message names file and line."""


class ChecksumError(DataError):
    """A file's SHA-256 disagrees with a listed or known digest; says which one is wrong."""


class UnsafePickleError(DataFormatError):
    """A pickle asks for a callable or class outside the allowed list; nothing was run."""
