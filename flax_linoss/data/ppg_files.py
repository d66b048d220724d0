"""PPG-DaLiA raw files: finding them, unpickling them safely, and the papers' preprocessing.

Pure numpy: no TFDS. The TFDS builder is :mod:`flax_linoss.data.ppg`.

The dataset ships as Python 2 pickles (``PPG_FieldStudy/S{k}/S{k}.pkl``). Unpickling can run
arbitrary code, so :func:`load_subject` uses a restricted unpickler that builds only dicts,
lists, strings, numbers, numpy arrays, dtypes and scalars (:data:`ALLOWED_GLOBALS`); a
pickle that names anything else (a function such as ``os.system``, a class of another
library) is refused with :class:`~flax_linoss.data.errors.UnsafePickleError` before
anything is called. Where a digest is known (``SHA256SUMS`` next to the file, or
:data:`~flax_linoss.data.checksums.KNOWN_SHA256`) the file is verified before unpickling.

Preprocessing (as the reference code, but with a seeded split order), per subject:

1. Wrist signals to 64 Hz: ACC (32 Hz, 3 axes) repeats each sample twice, BVP (64 Hz) as is,
   EDA and TEMP (4 Hz) repeat each sample 16 times: 6 channels ``[T, 6]``.
2. Min-max scale each signal to ``[-1, 1]`` over the subject's recording (ACC over its three
   axes together, as the reference does). The heart-rate labels (one per 2 s = 128 steps,
   first label repeated 3 times in front so label ``j`` covers steps ``[128 j, 128 (j+1))``)
   are scaled the same way.
3. Chronological 70/15/15 blocks. Which block is train / val / test is one of six orders
   (val-test after train, test-val after train, val first, test first, ...), picked by
   ``numpy.random.default_rng([split_seed, subject]).integers(6)`` instead of the
   reference's unseeded ``random.randint``. Block bounds are ``int(0.15 T)``, ``int(0.3 T)``,
   ``int(0.7 T)``, ``int(0.85 T)`` as in the reference.
4. Windows of 49,920 steps with stride 4,992 inside each block, each with the 390 labels
   (one per 128 steps) of its span.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from flax_linoss.data import checksums
from flax_linoss.data.errors import (
    DataFormatError,
    DataNotFoundError,
    UnsafePickleError,
    option,
)

__all__ = [
    "ALLOWED_GLOBALS",
    "PPG_URL",
    "SUBJECTS",
    "PpgConfig",
    "find_subject_file",
    "load_subject",
    "preprocess_subject",
    "split_blocks",
    "split_variant",
    "subject_files",
    "subject_windows",
    "windows",
]

PPG_URL = "https://archive.ics.uci.edu/static/public/495/ppg+dalia.zip"
SUBJECTS = tuple(range(1, 16))


@dataclasses.dataclass(frozen=True)
class PpgConfig:
    """Window and split settings (the defaults are the papers').

    Attributes:
        window: Steps per window (64 Hz).
        stride: Steps between window starts.
        label_step: Steps per heart-rate label.
        split_seed: Seed of the per-subject block order.
        subjects: Subject numbers to read (``S{k}``).
    """

    window: int = 49920
    stride: int = 4992
    label_step: int = 128
    split_seed: int = 0
    subjects: tuple[int, ...] = SUBJECTS

    def __post_init__(self):
        if self.window % self.label_step or self.stride % self.label_step:
            raise ValueError(
                f"window ({self.window}) and stride ({self.stride}) must be multiples of "
                f"label_step ({self.label_step})"
            )


# ----------------------------------------------------------------------------- files


def find_subject_file(root: str | os.PathLike, subject: int) -> Path:
    """``S{k}.pkl`` under ``root`` (``PPG_FieldStudy/S{k}/``, ``S{k}/`` or ``root`` itself).

    Raises:
        DataNotFoundError: Says where to put which files and where to get them.
    """
    root = Path(root)
    name = f"S{subject}.pkl"
    for c in (
        root / "PPG_FieldStudy" / f"S{subject}" / name,
        root / f"S{subject}" / name,
        root / name,
    ):
        if c.is_file():
            return c
    where = "does not exist" if not root.is_dir() else "has no such file"
    raise DataNotFoundError(
        f"PPG-DaLiA file {name} not found under {root} (the folder {where}). Put the "
        "PPG_FieldStudy folder (with S1/S1.pkl ... S15/S15.pkl) there, or pass its parent "
        f"with {option('manual_dir')}; get it from {PPG_URL} "
        "(https://archive.ics.uci.edu/dataset/495/ppg+dalia) and unzip it (it contains "
        "PPG_FieldStudy.zip, unzip that too)."
    )


def subject_files(root: str | os.PathLike, subjects: tuple[int, ...] = SUBJECTS) -> list[Path]:
    """``[S{k}.pkl for k in subjects]`` under ``root`` (see :func:`find_subject_file`)."""
    return [find_subject_file(root, s) for s in subjects]


def _latin1_encode(text, encoding="latin1"):
    # Python 3 protocol-2 pickles write bytes as _codecs.encode(str, "latin1"); allow only that.
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:  # numpy >= 2
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric
    out: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for pkg in ("numpy.core", "numpy._core"):  # pickles name either, whatever numpy wrote them
        out[(f"{pkg}.multiarray", "_reconstruct")] = multiarray._reconstruct
        out[(f"{pkg}.multiarray", "scalar")] = multiarray.scalar
        out[(f"{pkg}.numeric", "_frombuffer")] = numeric._frombuffer
    return out


#: ``(module, name) -> object`` the PPG-DaLiA unpickler may build; everything else is
#: refused. Dicts, lists, tuples, strings, numbers and booleans need no entry.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **_numpy_globals(),
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")  # Python 2 pickles
        self._path = path

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._path}: refused to unpickle {module}.{name}: a PPG-DaLiA file holds "
                "only dicts, strings, numbers and numpy arrays, so this file is not one (or "
                "was tampered with); nothing from it was run"
            ) from None

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self._path}: refused a persistent id in the pickle")


def load_subject(path: str | os.PathLike, *, verify: bool = True) -> dict[str, Any]:
    """Unpickles ``S{k}.pkl`` with the restricted unpickler (see the module docstring).

    Args:
        path: The file.
        verify: First check its SHA-256 where a digest is known.

    Returns:
        The subject record (a dict of dicts of numpy arrays).

    Raises:
        ChecksumError: The digest disagrees with ``SHA256SUMS`` or a known digest.
        UnsafePickleError: The pickle names a global outside :data:`ALLOWED_GLOBALS`.
        DataFormatError: The pickle is corrupt or truncated.
    """
    path = Path(path)
    if verify:
        checksums.verify_files([path], content_check=check_subject_file)
    return _unpickle(path)


def _unpickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, path).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DataFormatError(
            f"{path}: corrupt or truncated pickle ({type(e).__name__}: {e})"
        ) from None


def check_subject_file(path: Path) -> None:
    """Unpickles one file safely and checks its keys (for checksum verdicts)."""
    preprocess_subject(_unpickle(path), where=str(path))


# ----------------------------------------------------------------------------- preprocessing


def _minmax(a: np.ndarray, what: str) -> np.ndarray:
    lo, hi = np.min(a), np.max(a)
    if not hi > lo:
        raise DataFormatError(f"{what} is constant ({lo}); cannot min-max scale it")
    return 2.0 * (a - lo) / (hi - lo) - 1.0


def preprocess_subject(data: dict[str, Any], *, where: str = "subject") -> tuple[np.ndarray, ...]:
    """Steps 1-2 of the module docstring for one subject's pickle contents.

    Args:
        data: ``{"signal": {"wrist": {"ACC": [T/2, 3], "BVP": [T, 1], "EDA": [T/16, 1],
            "TEMP": [T/16, 1]}}, "label": [n]}`` as in ``S{k}.pkl``.
        where: Name used in error messages (e.g. the file).

    Returns:
        ``(x float32 [T, 6], labels float32 [T / 128])``, both scaled to ``[-1, 1]``.

    Raises:
        DataFormatError: Missing keys, or signals whose lengths disagree by more than 1 s.
    """
    try:
        wrist = data["signal"]["wrist"]
        acc, bvp, eda, temp = (
            np.asarray(wrist[k], np.float64) for k in ("ACC", "BVP", "EDA", "TEMP")
        )
        label = np.asarray(data["label"], np.float64).reshape(-1)
    except (KeyError, TypeError) as e:
        raise DataFormatError(f"{where}: not a PPG-DaLiA subject record (missing {e})") from None
    sigs = {
        "ACC": np.repeat(acc.reshape(len(acc), -1), 2, axis=0),
        "BVP": bvp.reshape(len(bvp), -1),
        "EDA": np.repeat(eda.reshape(len(eda), -1), 16, axis=0),
        "TEMP": np.repeat(temp.reshape(len(temp), -1), 16, axis=0),
    }
    if sigs["ACC"].shape[1] != 3 or any(sigs[k].shape[1] != 1 for k in ("BVP", "EDA", "TEMP")):
        raise DataFormatError(f"{where}: expected ACC [n, 3] and BVP/EDA/TEMP [n, 1]")
    lengths = {k: len(v) for k, v in sigs.items()}
    t = min(lengths.values())
    if max(lengths.values()) - t > 64:
        raise DataFormatError(f"{where}: signal lengths at 64 Hz disagree by over 1 s: {lengths}")
    x = np.concatenate([_minmax(v[:t], f"{where} {k}") for k, v in sigs.items()], axis=1)
    labels = np.concatenate([np.repeat(label[:1], 3), label])
    labels = _minmax(labels, f"{where} label")
    return x.astype(np.float32), labels.astype(np.float32)


def split_blocks(length: int, variant: int) -> dict[str, tuple[int, int]]:
    """Chronological ``[start, stop)`` of train / val / test for one of the six block orders."""
    a, b, c, d = (int(f * length) for f in (0.15, 0.3, 0.7, 0.85))
    orders = {
        0: {"train": (0, c), "val": (c, d), "test": (d, length)},
        1: {"train": (0, c), "val": (d, length), "test": (c, d)},
        2: {"train": (a, d), "val": (0, a), "test": (d, length)},
        3: {"train": (a, d), "val": (d, length), "test": (0, a)},
        4: {"train": (b, length), "val": (0, a), "test": (a, b)},
        5: {"train": (b, length), "val": (a, b), "test": (0, a)},
    }
    if variant not in orders:
        raise ValueError(f"variant must be in 0..5, got {variant}")
    return orders[variant]


def split_variant(split_seed: int, subject: int) -> int:
    """The block order of ``subject``: ``default_rng([split_seed, subject]).integers(6)``."""
    return int(np.random.default_rng([int(split_seed), int(subject)]).integers(6))


def windows(x: np.ndarray, labels: np.ndarray, cfg: PpgConfig) -> tuple[np.ndarray, np.ndarray]:
    """Windows of one block: ``x [T, 6]``, ``labels [T / label_step]`` ->
    ``([n, window, 6], [n, window / label_step])`` (views, no copy).

    ``n`` is the number of full windows both inputs and labels cover; a trailing part shorter
    than a window is not used (as in the reference).
    """
    from numpy.lib.stride_tricks import sliding_window_view as swv

    lw, ls = cfg.window // cfg.label_step, cfg.stride // cfg.label_step
    if len(x) < cfg.window or len(labels) < lw:
        return (np.zeros((0, cfg.window, x.shape[1]), x.dtype), np.zeros((0, lw), labels.dtype))
    xw = swv(x, cfg.window, axis=0)[:: cfg.stride]  # [n, 6, window]
    yw = swv(labels, lw, axis=0)[::ls]
    n = min(len(xw), len(yw))
    return np.swapaxes(xw[:n], 1, 2), yw[:n]


def subject_windows(
    data: dict[str, Any], subject: int, cfg: PpgConfig, *, where: str = "subject"
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """All steps for one subject: ``{"train", "val", "test"} -> (x [n, W, 6], y [n, W/128])``."""
    x, labels = preprocess_subject(data, where=where)
    blocks = split_blocks(len(x), split_variant(cfg.split_seed, subject))
    out = {}
    step = cfg.label_step
    for split, (s, e) in blocks.items():
        # Start each block on a label boundary (label j covers steps [128 j, 128 (j + 1))),
        # rounding up so that no step is shared with the block before.
        ls, le = -(-s // step), e // step
        out[split] = windows(x[ls * step : e], labels[ls:le], cfg)
    return out
