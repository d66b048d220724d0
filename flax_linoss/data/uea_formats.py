"""Reading the UEA archive's files: ARFF and ``.ts`` parsers, folder layouts, one split.

Pure numpy: no TFDS, no TensorFlow. The TFDS builder (:mod:`flax_linoss.data.uea`) and the
papers' protocol (:mod:`flax_linoss.data.protocol`) read the archive through
:func:`read_uea_split`.

Supported layouts, for a dataset ``Name`` and a split ``TRAIN`` / ``TEST``:

* ``Name_TRAIN.arff``: one relational ARFF file holding every dimension (the archive's
  ``Multivariate_arff`` zip);
* ``NameDimension1_TRAIN.arff`` ... ``NameDimensionC_TRAIN.arff``: one plain ARFF file per
  dimension (as shipped inside each dataset folder);
* ``Name_TRAIN.ts``: the sktime ``.ts`` format (the ``Multivariate_ts`` zip).

Equal-length datasets (every entry of :data:`~flax_linoss.data.uea_table.UEA_DATASETS`)
must have every channel of every series at full length: a shorter one is refused, naming
file, line and dimension. Only a dataset declared variable-length (``equal_length=False``,
or ``@equalLength false`` in a ``.ts`` header) is padded at the end with NaN.

Values must be finite numbers in float32's range: ``NaN``, ``inf`` or ``1e39`` are refused,
naming file and line. The archive writes a missing value as ``?``; a file holding any is
refused with how many there are and where (the papers' datasets have none), unless the caller
opts in with ``missing="nan"``, which reads them as NaN for a treatment chosen downstream
(:func:`flax_linoss.data.protocol.uea_splits`' ``missing``: a fill or a mask).

Shapes: ``N`` examples, ``L`` time steps, ``C`` channels (dimensions).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import numpy as np

from flax_linoss.data import checksums
from flax_linoss.data.errors import DataFormatError, DataNotFoundError, option
from flax_linoss.data.uea_table import ARCHIVE_URL, DATASET_URL, UEADatasetInfo

__all__ = [
    "LAYOUTS",
    "MISSING",
    "UEAFormatError",
    "UEASplitData",
    "check_file",
    "dataset_files",
    "find_dataset_folder",
    "manual_instructions",
    "read_arff",
    "read_ts",
    "read_uea_split",
    "split_files",
]

#: File layouts :func:`read_uea_split` reads (``fmt=``), besides ``"auto"``.
LAYOUTS = ("arff", "arff_dims", "ts")
#: What the readers do with missing values (``?``): refuse them, or read them as NaN.
MISSING = ("error", "nan")
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class UEAFormatError(DataFormatError):
    """A UEA file is truncated, corrupt or inconsistent; the message names file and line."""


@dataclasses.dataclass
class UEASplitData:
    """One split of one dataset as read from disk.

    Attributes:
        x: float32 ``[N, L, C]``; missing values (``?``, read with ``missing="nan"``) are
            NaN, and in a variable-length dataset shorter series are padded at the end with
            NaN.
        labels: int32 ``[N]``, indices into ``class_names``.
        class_names: Declared class labels, in the file's order.
        files: The files read, in channel order.
    """

    x: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    files: tuple[Path, ...]


def manual_instructions(name: str = "<Name>") -> str:
    """Where to put which files for dataset ``name``, and where to get them (several lines)."""
    return (
        f"Put the UEA archive files of {name} in the manual folder, either directly or in a "
        f"sub-folder named {name}/ (uea/{name}/, Multivariate_arff/{name}/ and "
        f"Multivariate_ts/{name}/ also work). Any one of these layouts is read:\n"
        f"  {name}_TRAIN.arff and {name}_TEST.arff (one relational ARFF per split),\n"
        f"  {name}Dimension1_TRAIN.arff ... {name}DimensionC_TEST.arff (one ARFF per "
        "dimension),\n"
        f"  {name}_TRAIN.ts and {name}_TEST.ts.\n"
        "A SHA256SUMS file (as written by `sha256sum`) next to them is verified if present.\n"
        f"Get them from {DATASET_URL.format(name=name)} (one dataset) or {ARCHIVE_URL} (the "
        "whole archive), and unzip."
    )


def _where_to_put(name: str) -> str:
    """:func:`manual_instructions` in one line."""
    return (
        f"Put {name}_TRAIN.arff and {name}_TEST.arff, or {name}Dimension1_TRAIN.arff ... "
        f"{name}DimensionC_TEST.arff, or {name}_TRAIN.ts and {name}_TEST.ts there or in a "
        f"{name}/ sub-folder (from {DATASET_URL.format(name=name)}, unzipped), or name the "
        f"folder that holds them with {option('root')} (or a data directory whose "
        f"downloads/manual/ holds them with {option('data_dir')})."
    )


# ----------------------------------------------------------------------------- parsing


@dataclasses.dataclass
class _Parsed:
    path: Path
    rows: list[list[np.ndarray]]  # [N][C], each float64 [length]
    linenos: list[int]
    labels: list[str]
    class_names: tuple[str, ...]
    declared_equal: bool | None  # what the header declares (.ts), None if nothing

    def add(self, dims: list[np.ndarray], label: str, lineno: int) -> None:
        """Appends one data row after checking its label against the declared classes."""
        if label not in self.class_names:
            raise UEAFormatError(
                f"{self.path}:{lineno}: label {label[:40]!r} is not one of the declared "
                f"classes {list(self.class_names)} (row truncated or corrupt?)"
            )
        self.rows.append(dims)
        self.linenos.append(lineno)
        self.labels.append(label)

    def finish(self, in_data: bool) -> _Parsed:
        """Checks that the file reached its data and held at least one row."""
        if not in_data:
            raise UEAFormatError(f"{self.path}: no @data section (file truncated?)")
        if not self.rows:
            raise UEAFormatError(f"{self.path}: no data rows after @data (file truncated?)")
        return self


def _parse_floats(text: str, path: Path, lineno: int) -> np.ndarray:
    """The comma-separated numbers of one series; ``?`` (missing) reads as NaN.

    Raises:
        UEAFormatError: A token that is not a number, not finite (``NaN``, ``inf``) or
            outside float32's range, naming file, line and token.
    """
    parts = text.split(",")
    missing = None
    if "?" in text:
        missing = np.array([p.strip() == "?" for p in parts])
        parts = ["nan" if m else p for p, m in zip(parts, missing)]
    try:
        values = np.array(parts, dtype=np.float64)
    except ValueError as e:
        raise UEAFormatError(f"{path}:{lineno}: cannot parse numbers ({e})") from None
    bad = ~np.isfinite(values) | (np.abs(values) > _FLOAT32_MAX)
    if missing is not None:
        bad &= ~missing
    if bad.any():
        k = int(np.argmax(bad))
        token = parts[k].strip()
        why = (
            "is not a finite number (missing values are written '?')"
            if not np.isfinite(values[k])
            else f"is outside float32's range (+-{_FLOAT32_MAX:.4g})"
        )
        raise UEAFormatError(f"{path}:{lineno}: value {k + 1} {token[:40]!r} {why}")
    return values


_TS_KEYS = {"dimensions": "dimensions", "serieslength": "seriesLength"}  # lower -> as written


def _header_int(header: dict[str, str], key: str, path: Path, lineno: int) -> int | None:
    """A ``.ts`` header number (``@dimensions``, ``@seriesLength``), if declared."""
    if key not in header:
        return None
    value = header[key]
    if not value.isdigit() or int(value) < 1:
        raise UEAFormatError(
            f"{path}:{lineno}: @{_TS_KEYS[key]} must be a positive whole number, got {value[:40]!r}"
        )
    return int(value)


def _check_missing(p: _Parsed, equal_length: bool, missing: str) -> None:
    """Refuses missing values (NaN read from ``?``) unless ``missing="nan"``; in a
    variable-length dataset a series' trailing ``?`` are its padding, not missing."""
    if missing not in MISSING:
        raise ValueError(f"missing must be one of {MISSING}, got {missing!r}")
    if missing == "nan":
        return
    count, rows, first = 0, 0, None
    for lineno, dims in zip(p.linenos, p.rows):
        in_row = 0
        for j, d in enumerate(dims):
            holes = np.isnan(d)
            if not equal_length and holes.any():
                observed = np.flatnonzero(~holes)
                holes[observed[-1] + 1 if observed.size else 0 :] = False
            if holes.any():
                in_row += int(holes.sum())
                if first is None:
                    first = (lineno, j, int(np.argmax(holes)))
        count += in_row
        rows += bool(in_row)
    if count:
        lineno, j, t = first
        dim = f"dimension {j + 1}, " if len(p.rows[0]) > 1 else ""
        raise UEAFormatError(
            f"{p.path}: {count} missing value{'s' if count > 1 else ''} ('?') in {rows} "
            f"series, the first at line {lineno} ({dim}step {t + 1}); the papers' datasets "
            "have none. Read them as NaN with missing='nan' and choose a treatment: "
            "get_dataset's missing='fill' or 'mask' (--config.data.options.missing=fill)"
        )


def _split_class_list(spec: str) -> tuple[str, ...]:
    spec = spec.strip()
    if not (spec.startswith("{") and spec.endswith("}")):
        raise ValueError(spec)
    return tuple(s.strip().strip("'\"") for s in spec[1:-1].split(",") if s.strip())


def _lines(path: Path, what: str) -> list[str]:
    if not path.exists():
        raise DataNotFoundError(f"UEA file not found: {path}")
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            return f.read().splitlines()
        except UnicodeDecodeError as e:
            raise UEAFormatError(f"{path}: not a text {what} file ({e})") from None


def _parse_arff(path: Path) -> _Parsed:
    attrs: list[str] = []  # top-level attribute kinds
    class_names: tuple[str, ...] | None = None
    relational = in_relational = in_data = False
    n_numeric = 0
    out = _Parsed(path, [], [], [], (), None)
    for lineno, raw in enumerate(_lines(path, "ARFF"), 1):
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
                out.class_names = class_names
                continue
            raise UEAFormatError(f"{path}:{lineno}: unexpected header line {line[:80]!r}")
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
        out.add(dims, label, lineno)
    return out.finish(in_data)


def _parse_ts(path: Path) -> _Parsed:
    header: dict[str, str] = {}
    header_line: dict[str, int] = dict.fromkeys(_TS_KEYS, 0)
    in_data = False
    n_dims = length = None
    out = _Parsed(path, [], [], [], (), None)
    for lineno, raw in enumerate(_lines(path, ".ts"), 1):
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
                out.class_names = tuple(cl[1:])
                n_dims = _header_int(header, "dimensions", path, header_line["dimensions"])
                length = _header_int(header, "serieslength", path, header_line["serieslength"])
                if "equallength" in header:
                    out.declared_equal = header["equallength"].lower() == "true"
                continue
            header[key] = value.strip()
            header_line[key] = lineno
            continue
        parts = line.split(":")
        if len(parts) < 2:
            raise UEAFormatError(f"{path}:{lineno}: row has no label (truncated?)")
        label = parts[-1].strip()
        dims = [_parse_floats(d, path, lineno) for d in parts[:-1]]
        if n_dims is not None and len(dims) != n_dims:
            raise UEAFormatError(
                f"{path}:{lineno}: row has {len(dims)} dimensions, the header declares "
                f"{n_dims} (row truncated?)"
            )
        if length is not None and out.declared_equal is not False:
            bad = [(j, len(d)) for j, d in enumerate(dims) if len(d) != length]
            if bad:
                raise UEAFormatError(
                    f"{path}:{lineno}: dimension {bad[0][0] + 1} has {bad[0][1]} values, "
                    f"@seriesLength is {length} (row truncated?)"
                )
        out.add(dims, label, lineno)
    return out.finish(in_data)


def _stack(p: _Parsed, equal_length: bool) -> np.ndarray:
    """``[N, L, C]`` float64 from parsed rows; refuses short channels if ``equal_length``."""
    channels = {len(r) for r in p.rows}
    if len(channels) != 1:
        raise UEAFormatError(f"{p.path}: rows have different numbers of dimensions {channels}")
    c = channels.pop()
    length = max(len(d) for r in p.rows for d in r)
    if equal_length:
        for lineno, r in zip(p.linenos, p.rows):
            short = [(j, len(d)) for j, d in enumerate(r) if len(d) != length]
            if short:
                j, n = short[0]
                what = f"dimension {j + 1} has" if c > 1 else "the series has"
                raise UEAFormatError(
                    f"{p.path}:{lineno}: {what} {n} values where the longest series has "
                    f"{length}: a channel is shorter than the others in an equal-length "
                    "dataset (file truncated or edited?)"
                )
        return np.array(p.rows, dtype=np.float64).transpose(0, 2, 1)
    x = np.full((len(p.rows), length, c), np.nan, dtype=np.float64)
    for i, r in enumerate(p.rows):
        for j, d in enumerate(r):
            x[i, : len(d), j] = d
    return x


def read_arff(
    path: str | os.PathLike, *, equal_length: bool = True, missing: str = "error"
) -> tuple[np.ndarray, list[str], tuple[str, ...]]:
    """Reads one UEA ARFF file (plain numeric or relational multivariate).

    Args:
        path: The ``.arff`` file.
        equal_length: Refuse a series or channel shorter than the longest (``True``), or
            pad it at the end with NaN (``False``, variable-length datasets).
        missing: ``"error"``: refuse missing values (``?``), saying how many and where;
            ``"nan"``: read them as NaN.

    Returns:
        ``(x, labels, class_names)``: ``x`` float64 ``[N, L, C]`` (``C = 1`` for a plain
        file); ``labels`` the ``N`` class strings; ``class_names`` as declared by the last
        attribute.

    Raises:
        DataNotFoundError: ``path`` does not exist (also a ``FileNotFoundError``).
        UEAFormatError: A truncated, corrupt or short file, a value that is not a finite
            float32 number, or missing values (``missing="error"``), naming file and line.
    """
    p = _parse_arff(Path(path))
    _check_missing(p, equal_length, missing)
    return _stack(p, equal_length), p.labels, p.class_names


def read_ts(
    path: str | os.PathLike, *, equal_length: bool | None = None, missing: str = "error"
) -> tuple[np.ndarray, list[str], tuple[str, ...]]:
    """Reads one UEA ``.ts`` file (``@timeStamps false``, with class labels).

    Args:
        path: The ``.ts`` file.
        equal_length: As :func:`read_arff`; ``None`` follows the header's ``@equalLength``
            (equal if absent).
        missing: As :func:`read_arff`.

    Returns:
        ``(x, labels, class_names)`` as :func:`read_arff`.

    Raises:
        DataNotFoundError: ``path`` does not exist.
        UEAFormatError: As :func:`read_arff`; also a header number that does not read.
    """
    p = _parse_ts(Path(path))
    if equal_length is None:
        equal_length = p.declared_equal is not False
    _check_missing(p, equal_length, missing)
    return _stack(p, equal_length), p.labels, p.class_names


# ----------------------------------------------------------------------------- layouts


def _layout(folder: Path, name: str) -> str | None:
    if (folder / f"{name}_TRAIN.arff").exists() and (folder / f"{name}_TEST.arff").exists():
        return "arff"
    if (folder / f"{name}Dimension1_TRAIN.arff").exists():
        return "arff_dims"
    if (folder / f"{name}_TRAIN.ts").exists() and (folder / f"{name}_TEST.ts").exists():
        return "ts"
    return None


def find_dataset_folder(root: str | os.PathLike, name: str) -> Path:
    """Finds the folder holding ``name``'s files under ``root``.

    Looks in ``root/name``, ``root``, ``root/uea/name``, ``root/Multivariate_arff/name``,
    ``root/Multivariate_ts/name``, then anywhere up to three levels down.

    Raises:
        DataNotFoundError: ``root`` does not exist, or holds no files of ``name``; says
            where to put which files.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataNotFoundError(f"UEA data folder {root} does not exist. " + _where_to_put(name))
    candidates = [
        root / name,
        root,
        root / "uea" / name,
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
    raise DataNotFoundError(
        f"No files for UEA dataset {name!r} under {root}. " + _where_to_put(name)
    )


def split_files(folder: Path, name: str, split: str, fmt: str = "auto") -> tuple[str, list[Path]]:
    """The files of one split (``"TRAIN"`` or ``"TEST"``) in ``folder`` and their layout.

    Raises:
        DataNotFoundError: A file of the layout is missing, or the per-dimension files of
            TRAIN and TEST do not match.
    """
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
            raise DataNotFoundError(
                f"{folder}: per-dimension ARFF files are incomplete ({train_dims} TRAIN and "
                f"{test_dims} TEST files; dimensions must be numbered 1..C in both). "
                + _where_to_put(name)
            )
    elif layout == "ts":
        files = [folder / f"{name}_{split}.ts"]
    else:
        raise DataNotFoundError(
            f"No files for UEA dataset {name!r} in {folder} (format {fmt!r}). "
            + _where_to_put(name)
        )
    for f in files:
        if not f.exists():
            raise DataNotFoundError(f"Missing UEA file {f}. " + _where_to_put(name))
    return layout, files


def dataset_files(root: str | os.PathLike, name: str, fmt: str = "auto") -> list[Path]:
    """Every raw file of ``name`` under ``root``: TRAIN's, then TEST's, in channel order."""
    folder = find_dataset_folder(root, name)
    return [f for s in ("TRAIN", "TEST") for f in split_files(folder, name, s, fmt)[1]]


def check_file(path: Path) -> None:
    """Parses one UEA file fully (for checksum verdicts); raises :class:`UEAFormatError`."""
    if path.suffix == ".ts":
        read_ts(path, equal_length=False, missing="nan")
    else:
        read_arff(path, equal_length=False, missing="nan")


# ----------------------------------------------------------------------------- one split


def read_uea_split(
    root: str | os.PathLike,
    name: str,
    split: str,
    *,
    fmt: str = "auto",
    verify: bool = True,
    expected: UEADatasetInfo | None = None,
    equal_length: bool | None = None,
    missing: str = "error",
) -> UEASplitData:
    """Reads one split of a UEA dataset from a local folder.

    Args:
        root: A folder containing the dataset's files (see :func:`find_dataset_folder`).
        name: Archive name, e.g. ``"SelfRegulationSCP1"``.
        split: ``"TRAIN"`` or ``"TEST"`` (case-insensitive).
        fmt: ``"auto"`` or one of :data:`LAYOUTS`: ``"arff"`` (relational), ``"arff_dims"``
            (per dimension) or ``"ts"``.
        verify: Check SHA-256 digests (``SHA256SUMS`` next to the files and
            :data:`~flax_linoss.data.checksums.KNOWN_SHA256`).
        expected: If given, the result must match its channels, length, classes and count.
        equal_length: Refuse series or channels shorter than the longest; ``None`` takes
            ``expected.equal_length``, else the ``.ts`` header, else ``True``.
        missing: ``"error"`` (refuse missing values, ``?``, saying how many and where) or
            ``"nan"`` (read them as NaN).

    Returns:
        A :class:`UEASplitData` with ``x`` float32 ``[N, L, C]`` and ``labels`` int32 ``[N]``.

    Raises:
        DataNotFoundError: Files are missing; says where to put which files.
        ChecksumError: A digest does not match; says whether the file or the list is wrong.
        UEAFormatError: A file is truncated, corrupt, short or inconsistent, holds a value
            that is not a finite float32 number, or missing values (``missing="error"``);
            names file and line.
    """
    split = split.upper()
    if split not in ("TRAIN", "TEST"):
        raise ValueError(f"split must be 'TRAIN' or 'TEST', got {split!r}")
    if fmt != "auto" and fmt not in LAYOUTS:
        raise ValueError(f"fmt must be 'auto' or one of {LAYOUTS}, got {fmt!r}")
    if missing not in MISSING:
        raise ValueError(f"missing must be one of {MISSING}, got {missing!r}")
    folder = find_dataset_folder(root, name)
    layout, files = split_files(folder, name, split, fmt)
    if verify:
        checksums.verify_files(files, content_check=check_file)
    if equal_length is None and expected is not None:
        equal_length = expected.equal_length
    parts = [_parse_ts(f) if layout == "ts" else _parse_arff(f) for f in files]
    if equal_length is None:
        equal_length = parts[0].declared_equal is not False
    first = parts[0]
    for p in parts[1:]:
        if p.class_names != first.class_names:
            raise UEAFormatError(
                f"{p.path}: declares classes {p.class_names}, {first.path.name} has "
                f"{first.class_names}"
            )
        if len(p.rows) != len(first.rows):
            raise UEAFormatError(
                f"{p.path}: has {len(p.rows)} rows, {first.path.name} has {len(first.rows)} "
                "(file truncated?)"
            )
        if p.labels != first.labels:
            i = next(i for i, (a, b) in enumerate(zip(p.labels, first.labels)) if a != b)
            raise UEAFormatError(
                f"{p.path}: row {i} label {p.labels[i]!r} differs from {first.path.name}"
            )
    for p in parts:
        _check_missing(p, equal_length, missing)
    xs = [_stack(p, equal_length) for p in parts]
    if len(xs) == 1:
        x = xs[0]
    else:
        lengths = [a.shape[1] for a in xs]
        if equal_length and len(set(lengths)) > 1:
            j, longest = int(np.argmin(lengths)), files[int(np.argmax(lengths))]
            raise UEAFormatError(
                f"{files[j]}: series have {lengths[j]} values, {longest.name} "
                f"has {max(lengths)}: a channel is shorter than the others in an equal-length "
                "dataset (file truncated or edited?)"
            )
        x = np.full((xs[0].shape[0], max(lengths), len(xs)), np.nan)
        for j, a in enumerate(xs):
            x[:, : a.shape[1], j] = a[:, :, 0]
    index = {c: i for i, c in enumerate(first.class_names)}
    y = np.array([index[s] for s in first.labels], dtype=np.int32)
    out = UEASplitData(x.astype(np.float32), y, tuple(first.class_names), tuple(files))
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
