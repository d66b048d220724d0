"""SHA-256 checks of raw files, for every builder: known digests, ``SHA256SUMS``, verdicts.

A raw file can be checked against two references:

* :data:`KNOWN_SHA256`, digests of archive files we have seen (built in, by file name);
* a ``SHA256SUMS`` file (``sha256sum`` output) in the file's folder, written by whoever
  copied the data.

When a digest disagrees, :func:`verify_files` says which side is wrong: a file that matches
the built-in digest is intact and the list is wrong; a file that matches neither is corrupt
or changed; where only a list exists, the file is parsed (``content_check``) to tell a
broken file from a wrong line. Each of these is a :class:`ChecksumError`.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from flax_linoss.data.errors import ChecksumError, DataFormatError

__all__ = [
    "KNOWN_SHA256",
    "SUMS_FILE",
    "ChecksumError",
    "read_sha256sums",
    "sha256_file",
    "verify_files",
]

#: Name of the digest list looked for next to raw files.
SUMS_FILE = "SHA256SUMS"

#: SHA-256 of raw files whose content we have seen (file name -> hex digest). UEA files are
#: from the archive's ``Multivariate_arff`` folders. No PPG-DaLiA digests are listed: the
#: pickles have not been seen here; add ``"S1.pkl": "<digest>", ...`` once read from a
#: trusted copy, and every later copy is checked before it is unpickled.
KNOWN_SHA256: dict[str, str] = {
    "SelfRegulationSCP1Dimension1_TEST.arff": (
        "78dc0c09b85a6c0b16049da79221be7d6c2484b3db37a295c3ac2ad3310079f8"
    ),
    "SelfRegulationSCP1Dimension1_TRAIN.arff": (
        "e6e36080103b9c43c44d2303e0ff8c612cfaf918a71d84414649cd25e6aa7793"
    ),
    "SelfRegulationSCP1Dimension2_TEST.arff": (
        "bf28a6faf1e83d28b9f5ed23ac0cd696a078f2802018351d813cdaa1c5a3915e"
    ),
    "SelfRegulationSCP1Dimension2_TRAIN.arff": (
        "9cc0d8d5b4435ae5bd0ffd21070f9b33d9d5d3da88d6786755c6a4b775a1f901"
    ),
    "SelfRegulationSCP1Dimension3_TEST.arff": (
        "ce08459cf652aaa5fe8edb48f657395fa5b1eda58716da6689d9f088ce91275f"
    ),
    "SelfRegulationSCP1Dimension3_TRAIN.arff": (
        "77f16590c55e0b713b80ac0d9179e484ea01c4ae0f35ea8240d3f49acc24c0ef"
    ),
    "SelfRegulationSCP1Dimension4_TEST.arff": (
        "325ad0539051b49172dd73c62e99cd855225b88f04c44aaca84da56649d3805b"
    ),
    "SelfRegulationSCP1Dimension4_TRAIN.arff": (
        "085a7f23c0f0c18fa85025d3e05deca6d1bbccf30e78ec12d1748c3ec6bd6f08"
    ),
    "SelfRegulationSCP1Dimension5_TEST.arff": (
        "7ce6f2b07874323ad1d76bbfdcc26850fc1e7372306b52b19b679cf655d86ee3"
    ),
    "SelfRegulationSCP1Dimension5_TRAIN.arff": (
        "fd745523f43475d0bb673ed021035bcd2fa83bbb3a9e7929395e8731fbbdf32f"
    ),
    "SelfRegulationSCP1Dimension6_TEST.arff": (
        "8c3e016940fa969c3b01701720026ae66265ef3de56d703c7281d74df5ee84b9"
    ),
    "SelfRegulationSCP1Dimension6_TRAIN.arff": (
        "f0eb3ab4a6aa4ee0a313125291b919a56382a08a917e3a0499c8b0dccd6fb6c8"
    ),
}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_sums(folder: Path) -> dict[str, tuple[str, int]]:
    path = folder / SUMS_FILE
    if not path.exists():
        return {}
    sums = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([0-9a-fA-F]{64})\s+\*?(.+)", line)
        if m is None:
            raise DataFormatError(f"{path}:{lineno}: not a `sha256sum` line: {line[:80]!r}")
        sums[Path(m.group(2)).name] = (m.group(1).lower(), lineno)
    return sums


def read_sha256sums(folder: str | os.PathLike) -> dict[str, str]:
    """Parses ``folder/SHA256SUMS`` into ``{file name: digest}`` (empty if there is none).

    Raises:
        DataFormatError: A line is not ``<64 hex digits>  <name>``; names file and line.
    """
    return {k: d for k, (d, _) in _read_sums(Path(folder)).items()}


def _verdict(
    f: Path,
    got: str,
    listed: tuple[str, int] | None,
    known: str | None,
    content_check: Callable[[Path], object] | None,
) -> str | None:
    """The problem with ``f`` in one sentence, or ``None`` if every reference agrees."""
    sums = f.parent / SUMS_FILE
    if listed is not None and got != listed[0]:
        where = f"{sums}:{listed[1]}"
        if known is not None and got == known:
            return (
                f"{where} lists SHA-256 {listed[0]} for {f.name}, but the file matches the "
                f"archive's known digest {known}: the file is intact and the list is wrong; "
                f"correct or delete line {listed[1]} of {sums}"
            )
        if known is not None:
            agree = " (the list agrees with it)" if listed[0] == known else ""
            return (
                f"{f} is corrupt or changed: its SHA-256 {got} matches neither {where} "
                f"({listed[0]}) nor the archive's known digest {known}{agree}; download the "
                "file again"
            )
        try:
            if content_check is not None:
                content_check(f)
        except DataFormatError as e:
            return (
                f"{f} is corrupt: its SHA-256 {got} differs from {where} ({listed[0]}) and "
                f"the file does not read ({e}); download it again"
            )
        if content_check is None:
            return (
                f"{f}: SHA-256 {got} differs from {where} ({listed[0]}); either the file "
                "changed or the list is wrong; download the file again to be sure, or fix "
                "the line"
            )
        return (
            f"{f}: SHA-256 {got} differs from {where} ({listed[0]}), but the file reads as a "
            "complete, well-formed file, so the list is probably wrong (or the file was "
            "edited); download the file again to be sure, or correct the line"
        )
    if known is not None and got != known:
        also = f" (it matches {sums}, which was written from the changed file)" if listed else ""
        return (
            f"{f} is not the archive's file: its SHA-256 {got} differs from the known digest "
            f"{known}{also}; download it again"
        )
    return None


def verify_files(
    files: Iterable[str | os.PathLike],
    *,
    verify: bool = True,
    known: Mapping[str, str] | None = None,
    content_check: Callable[[Path], object] | None = None,
) -> dict[str, str]:
    """Hashes ``files`` and checks each against ``SHA256SUMS`` in its folder and ``known``.

    Args:
        files: Raw files (their names must be unique).
        verify: Compare with the references; ``False`` only hashes.
        known: Built-in digests by file name; defaults to :data:`KNOWN_SHA256`.
        content_check: Reads one file and raises :class:`DataFormatError` if it is broken;
            used to tell a corrupt file from a wrong ``SHA256SUMS`` line when no built-in
            digest exists.

    Returns:
        ``{file name: hex SHA-256}`` in the order given.

    Raises:
        ChecksumError: The first file whose digest disagrees, saying which side is wrong.
    """
    known = KNOWN_SHA256 if known is None else known
    out: dict[str, str] = {}
    listed_by_folder: dict[Path, dict[str, tuple[str, int]]] = {}
    for f in map(Path, files):
        if f.name in out:
            raise ValueError(f"two raw files are named {f.name}")
        got = sha256_file(f)
        out[f.name] = got
        if not verify:
            continue
        if f.parent not in listed_by_folder:
            listed_by_folder[f.parent] = _read_sums(f.parent)
        problem = _verdict(
            f, got, listed_by_folder[f.parent].get(f.name), known.get(f.name), content_check
        )
        if problem is not None:
            raise ChecksumError(problem)
    return out
