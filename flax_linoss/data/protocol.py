"""The LinOSS / D-LinOSS papers' UEA protocol: deduplicate, seeded 70/15/15 split, time channel.

How the ``"paper"`` split is derived (identical to the reference code):

1. Concatenate the archive's TRAIN and TEST examples (TRAIN first).
2. Drop duplicate series with ``numpy.unique(x, axis=0, return_index=True)`` on the float32
   data; this keeps the first occurrence of each series and **sorts** the rows
   lexicographically, and the labels follow their rows. For SelfRegulationSCP1 all
   ``N = 561`` series are unique.
3. ``key = jax.random.PRNGKey(seed)``; ``datasetkey = jax.random.split(key, 4)[0]``;
   ``permkey = jax.random.split(datasetkey)[0]``; ``perm = jax.random.permutation(permkey, N)``.
4. ``train = perm[:int(0.7 N)]``, ``val = perm[int(0.7 N):int(0.85 N)]``,
   ``test = perm[int(0.85 N):]`` (SCP1: 392 / 84 / 85).

Irregular sampling (the Neural-CDE protocol of Kidger et al., 2020, which the LinOSS papers'
baselines follow): ``drop_fraction=f`` removes ``int(f L)`` time steps of every series at
random (all channels of a step together; each series its own steps, from
``numpy.random.default_rng([drop_seed, split, row])``), after the split, so the split is the
same; the kept steps stay in order and their original indices ``0 <= k < L`` are returned as
the series' timestamps (in units of the original sampling interval). The papers' 30%, 50%
and 70% are ``drop_fraction`` 0.3, 0.5, 0.7.

JAX 0.5 switched ``jax_threefry_partitionable`` on, which changes every random bit and so
the split. The LinOSS runs (2024) predate that; ``prng="legacy"`` (the default) turns the flag
off for the split only, so a seed gives the same split on any JAX. ``prng="current"`` uses
the running JAX's default, which is what code on JAX >= 0.5 (e.g. the D-LinOSS repository,
which requires JAX >= 0.6.2) gets from the same key derivation.

Shapes: ``N`` examples, ``L`` steps, ``C`` channels (``C + 1`` with the time channel).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from flax_linoss.data import paths, uea_formats
from flax_linoss.data.errors import DataError
from flax_linoss.data.uea_table import UEA_DATASETS

__all__ = [
    "MISSING",
    "PAPER_SEEDS",
    "add_time_channel",
    "check_missing",
    "deduplicate",
    "drop_time_steps",
    "load_uea_arrays",
    "paper_split_indices",
    "uea_splits",
]

#: The five seeds of the papers' tables.
PAPER_SEEDS = (2345, 3456, 4567, 5678, 6789)

Splits = dict[str, tuple[np.ndarray, np.ndarray]]

#: Treatments of missing values (``?`` in the raw files) that :func:`uea_splits` offers.
MISSING = ("error", "fill", "mask")


def deduplicate(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drops repeated series as the reference does, returning them in sorted order.

    Args:
        x: ``[N, L, C]`` series.
        y: ``[N]`` labels (or ``[N, ...]`` targets).

    Returns:
        ``(x_unique [M, L, C], y_unique [M])``: rows sorted as ``numpy.unique(axis=0)`` sorts
        them; each kept row is the first occurrence, with its label.
    """
    x = np.asarray(x)
    _, first = np.unique(x, axis=0, return_index=True)
    return x[first], np.asarray(y)[first]


def paper_split_indices(n: int, seed: int, *, prng: str = "legacy") -> dict[str, np.ndarray]:
    """The papers' 70/15/15 split of ``n`` examples (see the module docstring).

    Args:
        n: Number of (deduplicated) examples.
        seed: Integer seed, e.g. one of :data:`PAPER_SEEDS`.
        prng: ``"legacy"`` (``jax_threefry_partitionable`` off, as the published runs) or
            ``"current"`` (this JAX's default).

    Returns:
        ``{"train", "val", "test"}`` -> int64 index arrays into the deduplicated rows;
        disjoint, covering ``range(n)``.
    """
    import jax

    if prng not in ("legacy", "current"):
        raise DataError(f"prng must be 'legacy' or 'current', got {prng!r}")

    def perm() -> np.ndarray:
        key = jax.random.PRNGKey(seed)
        datasetkey = jax.random.split(key, 4)[0]
        permkey = jax.random.split(datasetkey)[0]
        return np.asarray(jax.random.permutation(permkey, n)).astype(np.int64)

    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        if prng == "legacy":
            with jax.threefry_partitionable(False):
                p = perm()
        else:
            p = perm()
    a, b = int(0.7 * n), int(0.85 * n)
    return {"train": p[:a], "val": p[a:b], "test": p[b:]}


def add_time_channel(
    x: np.ndarray, duration: float = 1.0, timestamps: np.ndarray | None = None
) -> np.ndarray:
    """Prepends ``t_k = duration * k / L`` as channel 0.

    Args:
        x: ``[N, L, C]``.
        duration: ``T`` in ``t_k = T k / L`` (the papers use 1).
        timestamps: optional ``[N, L]`` observation times of irregularly sampled series:
            ``t_k = duration * timestamps_k / L`` (on the full grid, ``timestamps_k = k``, the
            same channel).

    Returns:
        ``[N, L, C + 1]`` float32.
    """
    n, length, _ = x.shape
    if timestamps is None:
        t = np.arange(length, dtype=np.float64)[None]
    else:
        t = np.asarray(timestamps, np.float64)
    t = np.broadcast_to((duration * t / length).astype(np.float32)[..., None], (n, length, 1))
    return np.concatenate([t, x.astype(np.float32)], axis=-1)


def drop_time_steps(
    x: np.ndarray, fraction: float, *, seed: int | tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Removes ``int(fraction * L)`` random time steps of every series (Neural-CDE protocol).

    Args:
        x: ``[N, L, C]`` series.
        fraction: in ``[0, 1)``, the share of steps removed from each series.
        seed: an int or a tuple of ints; row ``i`` draws its steps from
            ``numpy.random.default_rng([*seed, i])``.

    Returns:
        ``(x_kept [N, L', C], timestamps float32 [N, L'])`` with ``L' = L - int(fraction L)``:
        the kept steps in their original order and their original indices.
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"drop_fraction must be in [0, 1), got {fraction}")
    n, length, _ = x.shape
    removed = int(length * fraction)
    seed = (int(seed),) if np.isscalar(seed) else tuple(int(s) for s in seed)
    keep = np.empty((n, length - removed), np.int64)
    for i in range(n):
        gone = np.random.default_rng([*seed, i]).permutation(length)[:removed]
        keep[i] = np.setdiff1d(np.arange(length), gone)
    kept = np.take_along_axis(x, keep[:, :, None], axis=1)
    return kept, keep.astype(np.float32)


def load_uea_arrays(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    verify: bool = True,
    missing: str = "error",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    """Reads the archive's TRAIN and TEST splits of ``name`` from a folder of raw files.

    This reads the raw files directly (no TFDS); ``get_dataset`` reads the prepared TFDS copy.

    Args:
        name: Archive name (see :data:`flax_linoss.data.uea_table.UEA_DATASETS`).
        root: Folder with the files (or a ``name/`` sub-folder); defaults to the manual
            folder ``<data_dir>/downloads/manual`` (see :mod:`flax_linoss.data.paths`).
        verify: Check SHA-256 digests where known.
        missing: ``"error"`` (refuse missing values, ``?``) or ``"nan"`` (read them as NaN).

    Returns:
        ``(x_train [N1, L, C], y_train [N1], x_test [N2, L, C], y_test [N2], class_names)``,
        float32 series and int32 labels.

    Raises:
        DataError: Missing, corrupt or inconsistent files (see
            :func:`flax_linoss.data.uea_formats.read_uea_split`).
    """
    info = UEA_DATASETS.get(name)
    root = paths.manual_dir() if not paths.given(root) else root
    tr, te = (
        uea_formats.read_uea_split(root, name, split, verify=verify, expected=info, missing=missing)
        for split in ("TRAIN", "TEST")
    )
    if tr.class_names != te.class_names:
        raise uea_formats.UEAFormatError(
            f"{name}: TRAIN declares classes {tr.class_names}, TEST {te.class_names}"
        )
    return tr.x, tr.labels, te.x, te.labels, tr.class_names


def _normalise(splits: Splits, skip_first: bool) -> Splits:
    x_train = splits["train"][0]
    start = 1 if skip_first else 0
    mean = np.nanmean(x_train[..., start:], axis=(0, 1), keepdims=True)
    std = np.nanstd(x_train[..., start:], axis=(0, 1), keepdims=True)
    std = np.where(std > 0, std, 1.0)
    out = {}
    for k, (x, y) in splits.items():
        x = x.copy()
        x[..., start:] = (x[..., start:] - mean) / std
        out[k] = (x.astype(np.float32), y)
    return out


def check_missing(
    arrays: tuple[np.ndarray, ...] | None, missing: str, *, what: str = "the dataset"
) -> None:
    """Refuses NaN (missing values) in ``(x_train, y_train, x_test, y_test)`` when
    ``missing="error"``, saying how many there are and where the first is (``arrays=None``
    checks ``missing`` alone).

    Raises:
        DataError: ``missing`` is not one of :data:`MISSING`, or it is ``"error"`` and the
            series hold NaN.
    """
    if missing not in MISSING:
        raise DataError(f"missing must be one of {MISSING}, got {missing!r}")
    if missing != "error" or arrays is None:
        return
    for split, x in (("TRAIN", arrays[0]), ("TEST", arrays[2])):
        holes = np.isnan(x)
        if holes.any():
            n, (i, t, c) = int(holes.sum()), np.argwhere(holes)[0]
            count = int(np.isnan(arrays[0]).sum() + np.isnan(arrays[2]).sum())
            raise DataError(
                f"{what} has {count} missing value{'s' if count > 1 else ''} ('?' in the raw "
                f"files; {n} in {split}, the first at {split} series {i + 1}, step {t + 1}, "
                f"channel {c + 1}): choose a treatment with missing='fill' (fill_value, after "
                "normalising) or 'mask' (a fill and one 0/1 observed channel per channel), "
                "e.g. --config.data.options.missing=fill"
            )


def _treat_missing(splits: Splits, missing: str, fill_value: float, skip_first: bool) -> Splits:
    """Fills NaN with ``fill_value``; ``"mask"`` also appends a 0/1 observed channel per data
    channel (not the time channel, ``skip_first``)."""
    out = {}
    for k, (x, y) in splits.items():
        holes = np.isnan(x)
        filled = np.where(holes, np.float32(fill_value), x)
        if missing == "mask":
            observed = (~holes[..., int(skip_first) :]).astype(np.float32)
            filled = np.concatenate([filled, observed], axis=-1)
        out[k] = (filled, y)
    return out


def uea_splits(
    data: str | tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    *,
    seed: int,
    split: str = "paper",
    add_time: bool = False,
    normalise: bool = False,
    val_fraction: float = 0.15,
    root: str | os.PathLike | None = None,
    prng: str = "legacy",
    verify: bool = True,
    missing: str = "error",
    fill_value: float = 0.0,
    drop_fraction: float = 0.0,
    drop_seed: int = 0,
) -> Splits:
    """Train / val / test arrays for one UEA dataset under the papers' protocol.

    Args:
        data: An archive name such as ``"SelfRegulationSCP1"`` (read from ``root``), or
            arrays ``(x_train [N1, L, C], y_train [N1], x_test [N2, L, C], y_test [N2])``.
        seed: Split seed (the papers use :data:`PAPER_SEEDS`).
        split: ``"paper"``: TRAIN + TEST, deduplicated and sorted, seeded 70/15/15 (see the
            module docstring). ``"original"``: the archive's TEST as test, untouched; ``val``
            is the last ``val_fraction`` of a seeded permutation (``numpy.random.default_rng
            (seed)``) of TRAIN and ``train`` the rest, in archive order.
        add_time: Prepend the time channel ``t_k = k / L`` as feature 0.
        normalise: Standardise each channel (not time) with the train split's mean and std.
            Off by default, as in the papers.
        val_fraction: Validation share of TRAIN for ``split="original"``; may be 0.
        root: Folder of the raw files when ``data`` is a name (default: the manual folder
            ``<data_dir>/downloads/manual``).
        prng: See :func:`paper_split_indices`.
        verify: Check SHA-256 digests where known, when reading files.
        missing: What to do with missing values (``?`` in the raw files, NaN in arrays):
            ``"error"`` (the default) refuses them, saying how many there are and where;
            ``"fill"`` replaces each with ``fill_value`` (after normalising, so with
            ``normalise`` 0 is the channel's train mean); ``"mask"`` fills them likewise
            and appends one channel per data channel, 1 where the value was observed and 0
            where it was missing.
        fill_value: The value ``"fill"`` and ``"mask"`` put in place of a missing one.
        drop_fraction: Irregular sampling: remove this share of every series' time steps at
            random after the split (see the module docstring and :func:`drop_time_steps`);
            the time channel then holds the kept steps' times.
        drop_seed: Seed of the dropped steps (the same for every split seed, as in the
            Neural-CDE experiments).

    Returns:
        ``{"train", "val", "test"}`` -> ``(x float32 [n, L, C'], y int32 [n])`` with
        ``C' = C + 1`` if ``add_time`` else ``C``, plus ``C`` with ``missing="mask"``; with
        ``drop_fraction > 0`` the triples ``(x float32 [n, L', C'], y, timestamps float32
        [n, L'])``, ``L' = L - int(f L)``.

    Raises:
        DataError: Missing values with ``missing="error"``; bad options.
    """
    if missing not in MISSING:
        raise DataError(f"missing must be one of {MISSING}, got {missing!r}")
    if isinstance(data, str):
        x_tr, y_tr, x_te, y_te, _ = load_uea_arrays(
            data, root, verify=verify, missing="error" if missing == "error" else "nan"
        )
    else:
        if len(data) != 4:
            raise ValueError("data must be a name or (x_train, y_train, x_test, y_test)")
        x_tr, y_tr, x_te, y_te = (np.asarray(a) for a in data)
    x_tr, x_te = x_tr.astype(np.float32), x_te.astype(np.float32)
    y_tr, y_te = y_tr.astype(np.int32), y_te.astype(np.int32)
    if x_tr.ndim != 3 or x_te.ndim != 3 or x_tr.shape[1:] != x_te.shape[1:]:
        raise ValueError(
            f"x_train and x_test must be [N, L, C] with equal L and C, got {x_tr.shape} "
            f"and {x_te.shape}"
        )
    if len(x_tr) != len(y_tr) or len(x_te) != len(y_te):
        raise ValueError("x and y must have the same number of examples")
    check_missing((x_tr, y_tr, x_te, y_te), missing)

    if split == "paper":
        x, y = deduplicate(np.concatenate([x_tr, x_te]), np.concatenate([y_tr, y_te]))
        idx = paper_split_indices(len(x), seed, prng=prng)
        out: Splits = {k: (x[v], y[v]) for k, v in idx.items()}
    elif split == "original":
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
        perm = np.random.default_rng(seed).permutation(len(x_tr))
        n_val = round(val_fraction * len(x_tr))
        val_idx = np.sort(perm[len(perm) - n_val :])
        train_idx = np.sort(perm[: len(perm) - n_val])
        out = {
            "train": (x_tr[train_idx], y_tr[train_idx]),
            "val": (x_tr[val_idx], y_tr[val_idx]),
            "test": (x_te, y_te),
        }
    else:
        raise DataError(f"split must be 'paper' or 'original', got {split!r}")

    times: dict[str, np.ndarray | None] = dict.fromkeys(out)
    if drop_fraction:  # each split its own seed (train, val, test: 0, 1, 2)
        kept = {
            k: drop_time_steps(x, drop_fraction, seed=(drop_seed, i))
            for i, (k, (x, _)) in enumerate(out.items())
        }
        times = {k: t for k, (_, t) in kept.items()}
        out = {k: (kept[k][0], y) for k, (_, y) in out.items()}
    if add_time:
        out = {k: (add_time_channel(x, timestamps=times[k]), y) for k, (x, y) in out.items()}
    if normalise:
        out = _normalise(out, skip_first=add_time)
    if missing != "error":
        out = _treat_missing(out, missing, fill_value, skip_first=add_time)
    out = {
        k: (np.ascontiguousarray(x, np.float32), y.astype(np.int32)) for k, (x, y) in out.items()
    }
    if drop_fraction:
        return {k: (*v, times[k]) for k, v in out.items()}
    return out


def as_mapping(splits: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, dict]:
    """``{split: (x, y)}`` -> ``{split: {"series": x, "label": y}}``."""
    return {k: {"series": x, "label": y} for k, (x, y) in splits.items()}
