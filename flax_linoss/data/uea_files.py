"""Readers for the UEA multivariate archive's files (ARFF and ``.ts``), with checksums.

Pure numpy: no TFDS, no TensorFlow. The TFDS builder (:mod:`flax_linoss.data.uea`) and the
paper protocol (:mod:`flax_linoss.data.protocol`) both read the archive through
:func:`read_uea_split`.

Supported layouts, for a dataset ``Name`` and a split ``TRAIN`` / ``TEST``:

* ``Name_TRAIN.arff``: one relational ARFF file holding every dimension (the archive's
  ``Multivariate_arff`` zip);
* ``NameDimension1_TRAIN.arff`` ... ``NameDimensionC_TRAIN.arff``: one plain ARFF file per
  dimension (as shipped inside each dataset folder);
* ``Name_TRAIN.ts``: the sktime ``.ts`` format (the ``Multivariate_ts`` zip).

Shapes: ``N`` examples, ``L`` time steps, ``C`` channels (dimensions).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

__all__ = [
    "ARCHIVE_URL",
    "KNOWN_SHA256",
    "UEA_DATASETS",
    "ChecksumError",
    "UEADatasetInfo",
    "UEAFormatError",
    "UEASplitData",
    "find_dataset_folder",
    "manual_instructions",
    "read_arff",
    "read_sha256sums",
    "read_ts",
    "read_uea_split",
    "sha256_file",
    "uea_dataset_info",
]

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
        length: Series length ``L`` (equal-length datasets only).
        class_names: Class labels in the archive's declared order; label ``k`` is
            ``class_names[k]``.
        num_train: Examples in the archive's TRAIN split.
        num_test: Examples in the archive's TEST split.
    """

    name: str
    channels: int
    length: int
    class_names: tuple[str, ...]
    num_train: int
    num_test: int


def _info(*args) -> tuple[str, UEADatasetInfo]:
    return args[0], UEADatasetInfo(*args)


#: Datasets with a TFDS config. Extend this table (one line each) to cover more of the archive.
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

#: SHA-256 of archive files whose content we have seen (file name -> hex digest). A
#: ``SHA256SUMS`` file next to the data is checked as well.
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


class UEAFormatError(ValueError):
    """A UEA file is truncated, corrupt or inconsistent; the message names file and line."""


class ChecksumError(ValueError):
    """A file's SHA-256 does not match the known or listed digest."""


@dataclasses.dataclass
class UEASplitData:
    """One split of one dataset as read from disk.

    Attributes:
        x: float32 ``[N, L, C]``; missing values (``?``) are NaN, and shorter series in a
            variable-length dataset are padded at the end with NaN.
        labels: int32 ``[N]``, indices into ``class_names``.
        class_names: Declared class labels, in the file's order.
        files: The files read, in channel order.
    """

    x: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    files: tuple[Path, ...]


def uea_dataset_info(name: str) -> UEADatasetInfo:
    """Returns the table entry for ``name``; unknown names list the known ones."""
    try:
        return UEA_DATASETS[name]
    except KeyError:
        raise ValueError(
            f"Unknown UEA dataset {name!r}. Known: {', '.join(sorted(UEA_DATASETS))}. "
            "Add an entry to flax_linoss.data.uea_files.UEA_DATASETS to use another one."
        ) from None


def manual_instructions(name: str = "<Name>") -> str:
    """Where to put which files for dataset ``name``, and where to get them."""
    return (
        f"Put the UEA archive files of {name} in the manual folder, either directly or in a "
        f"sub-folder named {name}/ (Multivariate_arff/{name}/ and Multivariate_ts/{name}/ "
        "also work). Any one of these layouts is read:\n"
        f"  {name}_TRAIN.arff and {name}_TEST.arff (one relational ARFF per split),\n"
        f"  {name}Dimension1_TRAIN.arff ... {name}DimensionC_TEST.arff (one ARFF per "
        "dimension),\n"
        f"  {name}_TRAIN.ts and {name}_TEST.ts.\n"
        "A SHA256SUMS file (as written by `sha256sum`) next to them is verified if present.\n"
        f"Get them from {DATASET_URL.format(name=name)} (one dataset) or {ARCHIVE_URL} (the "
        "whole archive), and unzip."
    )


# ----------------------------------------------------------------------------- checksums


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_sha256sums(folder: str | os.PathLike) -> dict[str, str]:
    """Parses ``folder/SHA256SUMS`` (``sha256sum`` output) into ``{file name: digest}``.

    Returns an empty dict when there is no such file.
    """
    path = Path(folder) / "SHA256SUMS"
    if not path.exists():
        return {}
    sums = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([0-9a-fA-F]{64})\s+\*?(.+)", line)
        if m is None:
            raise UEAFormatError(f"{path}:{lineno}: not a `sha256sum` line: {line[:80]!r}")
        sums[Path(m.group(2)).name] = m.group(1).lower()
    return sums


def verify_checksums(files: Iterable[Path], extra: Mapping[str, str] | None = None) -> int:
    """Checks each file against ``SHA256SUMS`` in its folder, ``extra`` and :data:`KNOWN_SHA256`.

    Returns:
        How many files had a known digest (and matched).

    Raises:
        ChecksumError: naming the first file whose digest differs.
    """
    checked = 0
    listed_cache: dict[Path, dict[str, str]] = {}
    for f in files:
        f = Path(f)
        if f.parent not in listed_cache:
            listed_cache[f.parent] = read_sha256sums(f.parent)
        expected = {
            d
            for d in (
                listed_cache[f.parent].get(f.name),
                (extra or {}).get(f.name),
                KNOWN_SHA256.get(f.name),
            )
            if d is not None
        }
        if not expected:
            continue
        got = sha256_file(f)
        if got not in expected:
            raise ChecksumError(
                f"Checksum mismatch for {f}: SHA-256 is {got}, expected {sorted(expected)[0]}. "
                "The file is corrupt or truncated; download it again."
            )
        checked += 1
    return checked


# ----------------------------------------------------------------------------- parsing


def _parse_floats(text: str, path: Path, lineno: int) -> np.ndarray:
    parts = text.split(",")
    if "?" in text:
        parts = ["nan" if p.strip() == "?" else p for p in parts]
    try:
        return np.array(parts, dtype=np.float64)
    except ValueError as e:
        raise UEAFormatError(f"{path}:{lineno}: cannot parse numbers ({e})") from None


def _split_class_list(spec: str) -> tuple[str, ...]:
    spec = spec.strip()
    if not (spec.startswith("{") and spec.endswith("}")):
        raise ValueError(spec)
    return tuple(s.strip().strip("'\"") for s in spec[1:-1].split(",") if s.strip())


def read_arff(path: str | os.PathLike) -> tuple[np.ndarray, list[str], tuple[str, ...]]:
    """Reads one UEA ARFF file (plain numeric or relational multivariate).

    Args:
        path: The ``.arff`` file.

    Returns:
        ``(x, labels, class_names)``: ``x`` float64 ``[N, L, C]`` (``C = 1`` for a plain
        file), NaN-padded at the end when series differ in length; ``labels`` the ``N``
        class strings; ``class_names`` as declared by the last attribute.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        UEAFormatError: On a truncated or corrupt file, naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"UEA file not found: {path}")
    attrs: list[str] = []  # top-level attribute kinds
    class_names: tuple[str, ...] | None = None
    relational = False
    in_relational = False
    rows: list[list[np.ndarray]] = []
    labels: list[str] = []
    in_data = False
    n_numeric = 0
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = f.read().splitlines()
        except UnicodeDecodeError as e:
            raise UEAFormatError(f"{path}: not a text ARFF file ({e})") from None
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("%"):
            continue
        if not in_data:
            low = line.lower()
            if low.startswith("@relation"):
                continue
            if low.startswith("@attribute"):
                parts = line.split(None, 2)
                if len(parts) < 3:
                    raise UEAFormatError(f"{path}:{lineno}: malformed @attribute line")
                kind = parts[2].strip()
                if in_relational:
                    n_numeric += 1
                    continue
                if kind.lower().startswith("relational"):
                    relational = in_relational = True
                    attrs.append("relational")
                elif kind.startswith("{"):
                    try:
                        class_names = _split_class_list(kind)
                    except ValueError:
                        raise UEAFormatError(
                            f"{path}:{lineno}: malformed class list {kind[:80]!r}"
                        ) from None
                    attrs.append("class")
                else:
                    attrs.append("numeric")
                    n_numeric += 1
                continue
            if low.startswith("@end"):
                in_relational = False
                continue
            if low.startswith("@data"):
                in_data = True
                if not attrs or attrs[-1] != "class" or class_names is None:
                    raise UEAFormatError(
                        f"{path}:{lineno}: the last attribute before @data must be the class "
                        "attribute {a,b,...}"
                    )
                continue
            raise UEAFormatError(f"{path}:{lineno}: unexpected header line {line[:80]!r}")
        # ---- data rows
        if relational:
            m = re.fullmatch(r"(['\"])(.*)\1\s*,\s*(.+)", line)
            if m is None:
                raise UEAFormatError(
                    f"{path}:{lineno}: expected 'v,v,...\\nv,v,...',label (row truncated?)"
                )
            dims = [_parse_floats(d, path, lineno) for d in m.group(2).split("\\n")]
            label = m.group(3)
        else:
            body, sep, label = line.rpartition(",")
            if not sep:
                raise UEAFormatError(f"{path}:{lineno}: row has no label (truncated?)")
            vals = _parse_floats(body, path, lineno)
            if vals.shape[0] != n_numeric:
                raise UEAFormatError(
                    f"{path}:{lineno}: row has {vals.shape[0]} values, the header declares "
                    f"{n_numeric} (row truncated?)"
                )
            dims = [vals]
        label = label.strip().strip("'\"")
        if label not in class_names:
            raise UEAFormatError(
                f"{path}:{lineno}: label {label[:40]!r} is not one of the declared classes "
                f"{list(class_names)} (row truncated or corrupt?)"
            )
        rows.append(dims)
        labels.append(label)
    if not in_data:
        raise UEAFormatError(f"{path}: no @data section (file truncated?)")
    if not rows:
        raise UEAFormatError(f"{path}: no data rows after @data (file truncated?)")
    return _stack(rows, path), labels, class_names


def _stack(rows: list[list[np.ndarray]], path: Path) -> np.ndarray:
    channels = {len(r) for r in rows}
    if len(channels) != 1:
        raise UEAFormatError(f"{path}: rows have different numbers of dimensions {channels}")
    c = channels.pop()
    length = max(len(d) for r in rows for d in r)
    x = np.full((len(rows), length, c), np.nan, dtype=np.float64)
    for i, r in enumerate(rows):
        for j, d in enumerate(r):
            x[i, : len(d), j] = d
    return x


def read_ts(path: str | os.PathLike) -> tuple[np.ndarray, list[str], tuple[str, ...]]:
    """Reads one UEA ``.ts`` file (``@timeStamps false``, with class labels).

    Returns:
        ``(x, labels, class_names)`` as :func:`read_arff`.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        UEAFormatError: On a truncated or corrupt file, naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"UEA file not found: {path}")
    header: dict[str, str] = {}
    rows: list[list[np.ndarray]] = []
    labels: list[str] = []
    in_data = False
    class_names: tuple[str, ...] = ()
    n_dims = None
    with open(path, encoding="utf-8") as f:
        try:
            lines = f.read().splitlines()
        except UnicodeDecodeError as e:
            raise UEAFormatError(f"{path}: not a text .ts file ({e})") from None
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            if not line.startswith("@"):
                raise UEAFormatError(f"{path}:{lineno}: unexpected header line {line[:80]!r}")
            key, _, value = line[1:].partition(" ")
            key = key.lower()
            if key == "data":
                in_data = True
                if header.get("timestamps", "false").lower() == "true":
                    raise UEAFormatError(f"{path}: @timeStamps true is not supported")
                cl = header.get("classlabel", "false").split()
                if not cl or cl[0].lower() != "true" or len(cl) < 2:
                    raise UEAFormatError(
                        f"{path}: '@classLabel true <names...>' is required before @data"
                    )
                class_names = tuple(cl[1:])
                if "dimensions" in header:
                    n_dims = int(header["dimensions"])
                continue
            header[key] = value.strip()
            continue
        parts = line.split(":")
        if len(parts) < 2:
            raise UEAFormatError(f"{path}:{lineno}: row has no label (truncated?)")
        label = parts[-1].strip()
        dims = [_parse_floats(d.replace("NaN", "nan"), path, lineno) for d in parts[:-1]]
        if n_dims is not None and len(dims) != n_dims:
            raise UEAFormatError(
                f"{path}:{lineno}: row has {len(dims)} dimensions, the header declares "
                f"{n_dims} (row truncated?)"
            )
        if "serieslength" in header and header.get("equallength", "true").lower() == "true":
            want = int(header["serieslength"])
            bad = [len(d) for d in dims if len(d) != want]
            if bad:
                raise UEAFormatError(
                    f"{path}:{lineno}: a dimension has {bad[0]} values, @seriesLength is "
                    f"{want} (row truncated?)"
                )
        if label not in class_names:
            raise UEAFormatError(
                f"{path}:{lineno}: label {label[:40]!r} is not one of the declared classes "
                f"{list(class_names)} (row truncated or corrupt?)"
            )
        rows.append(dims)
        labels.append(label)
    if not in_data:
        raise UEAFormatError(f"{path}: no @data section (file truncated?)")
    if not rows:
        raise UEAFormatError(f"{path}: no data rows after @data (file truncated?)")
    return _stack(rows, path), labels, class_names


# ----------------------------------------------------------------------------- dataset level


def find_dataset_folder(root: str | os.PathLike, name: str) -> Path:
    """Finds the folder holding ``name``'s files under ``root``.

    Looks in ``root/name``, ``root``, ``root/Multivariate_arff/name``,
    ``root/Multivariate_ts/name``, then anywhere up to three levels down.

    Raises:
        FileNotFoundError: With :func:`manual_instructions` when nothing is found.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"UEA data folder {root} does not exist.\n" + manual_instructions(name)
        )
    candidates = [
        root / name,
        root,
        root / "Multivariate_arff" / name,
        root / "Multivariate_ts" / name,
    ]
    for c in candidates:
        if c.is_dir() and _layout(c, name) is not None:
            return c
    for depth in ("*", "*/*", "*/*/*"):
        for c in sorted(root.glob(f"{depth}/{name}")):
            if c.is_dir() and _layout(c, name) is not None:
                return c
    raise FileNotFoundError(
        f"No files for UEA dataset {name!r} under {root}.\n" + manual_instructions(name)
    )


def _layout(folder: Path, name: str) -> str | None:
    if (folder / f"{name}_TRAIN.arff").exists() and (folder / f"{name}_TEST.arff").exists():
        return "arff"
    if (folder / f"{name}Dimension1_TRAIN.arff").exists():
        return "arff_dims"
    if (folder / f"{name}_TRAIN.ts").exists() and (folder / f"{name}_TEST.ts").exists():
        return "ts"
    return None


def split_files(folder: Path, name: str, split: str, fmt: str = "auto") -> tuple[str, list[Path]]:
    """The files of one split (``"TRAIN"`` or ``"TEST"``) and their layout."""
    folder = Path(folder)
    layout = _layout(folder, name) if fmt == "auto" else fmt
    if layout == "arff":
        files = [folder / f"{name}_{split}.arff"]
    elif layout == "arff_dims":
        files = []
        k = 1
        while (folder / f"{name}Dimension{k}_{split}.arff").exists():
            files.append(folder / f"{name}Dimension{k}_{split}.arff")
            k += 1
        train_dims = len(list(folder.glob(f"{name}Dimension*_TRAIN.arff")))
        test_dims = len(list(folder.glob(f"{name}Dimension*_TEST.arff")))
        if train_dims != test_dims or len(files) != max(train_dims, test_dims):
            raise FileNotFoundError(
                f"{folder}: per-dimension ARFF files are incomplete ({train_dims} TRAIN and "
                f"{test_dims} TEST files; dimensions must be numbered 1..C in both).\n"
                + manual_instructions(name)
            )
    elif layout == "ts":
        files = [folder / f"{name}_{split}.ts"]
    else:
        raise FileNotFoundError(
            f"No files for UEA dataset {name!r} in {folder} (format {fmt!r}).\n"
            + manual_instructions(name)
        )
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"Missing UEA file {f}.\n" + manual_instructions(name))
    return layout, files


def read_uea_split(
    root: str | os.PathLike,
    name: str,
    split: str,
    *,
    fmt: str = "auto",
    verify: bool = True,
    expected: UEADatasetInfo | None = None,
) -> UEASplitData:
    """Reads one split of a UEA dataset from a local folder.

    Args:
        root: A folder containing the dataset's files (see :func:`find_dataset_folder`).
        name: Archive name, e.g. ``"SelfRegulationSCP1"``.
        split: ``"TRAIN"`` or ``"TEST"`` (case-insensitive).
        fmt: ``"auto"``, ``"arff"`` (relational), ``"arff_dims"`` (per dimension) or ``"ts"``.
        verify: Check SHA-256 digests where known (``SHA256SUMS`` or :data:`KNOWN_SHA256`).
        expected: If given, the result must match its channels, length, classes and count.

    Returns:
        A :class:`UEASplitData` with ``x`` float32 ``[N, L, C]`` and ``labels`` int32 ``[N]``.

    Raises:
        FileNotFoundError: Files are missing; says where to put which files.
        ChecksumError: A digest does not match; names the file.
        UEAFormatError: A file is truncated, corrupt or inconsistent; names file and line.
    """
    split = split.upper()
    if split not in ("TRAIN", "TEST"):
        raise ValueError(f"split must be 'TRAIN' or 'TEST', got {split!r}")
    folder = find_dataset_folder(root, name)
    layout, files = split_files(folder, name, split, fmt)
    if verify:
        verify_checksums(files)
    reader = read_ts if layout == "ts" else read_arff
    parts = [reader(f) for f in files]
    class_names = parts[0][2]
    labels = parts[0][1]
    for f, (x, lab, cn) in zip(files[1:], parts[1:]):
        if cn != class_names:
            raise UEAFormatError(f"{f}: declares classes {cn}, {files[0].name} has {class_names}")
        if x.shape[0] != parts[0][0].shape[0]:
            raise UEAFormatError(
                f"{f}: has {x.shape[0]} rows, {files[0].name} has {parts[0][0].shape[0]} "
                "(file truncated?)"
            )
        if lab != labels:
            i = next(i for i, (a, b) in enumerate(zip(lab, labels)) if a != b)
            raise UEAFormatError(f"{f}: row {i} label {lab[i]!r} differs from {files[0].name}")
    if len(parts) == 1:
        x = parts[0][0]
    else:
        length = max(p[0].shape[1] for p in parts)
        x = np.full((parts[0][0].shape[0], length, len(parts)), np.nan)
        for j, p in enumerate(parts):
            x[:, : p[0].shape[1], j] = p[0][:, :, 0]
    index = {c: i for i, c in enumerate(class_names)}
    y = np.array([index[s] for s in labels], dtype=np.int32)
    out = UEASplitData(x.astype(np.float32), y, tuple(class_names), tuple(files))
    if expected is not None:
        _check_expected(out, expected, split)
    return out


def _check_expected(d: UEASplitData, info: UEADatasetInfo, split: str) -> None:
    n_expected = info.num_train if split == "TRAIN" else info.num_test
    where = ", ".join(str(f) for f in d.files[:2]) + (" ..." if len(d.files) > 2 else "")
    problems = []
    if d.x.shape[0] != n_expected:
        problems.append(f"{d.x.shape[0]} examples, expected {n_expected}")
    if d.x.shape[1:] != (info.length, info.channels):
        problems.append(
            f"[length, channels] = {list(d.x.shape[1:])}, expected {[info.length, info.channels]}"
        )
    if d.class_names != info.class_names:
        problems.append(f"classes {list(d.class_names)}, expected {list(info.class_names)}")
    if problems:
        raise UEAFormatError(
            f"{info.name} {split} ({where}): "
            + "; ".join(problems)
            + " (truncated or wrong files?)"
        )
