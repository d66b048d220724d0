"""The data package's exceptions: one class a command line can print as one line.

Every problem a user causes on the data side (a missing folder, an unknown dataset name or
option, a corrupt or changed file, a wrong checksum, an unsafe pickle) raises a
:class:`DataError` whose message names the problem, the file or name involved, and what to
do. Programming errors (wrong types inside the library) stay ordinary exceptions.
"""

from __future__ import annotations

__all__ = [
    "ChecksumError",
    "DataError",
    "DataFormatError",
    "DataNotFoundError",
    "UnknownDatasetError",
    "UnsafePickleError",
]


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
