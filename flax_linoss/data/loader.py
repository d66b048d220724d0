"""Grain loaders over random-access sources: seeded per-epoch shuffles, sharding, resumable state.

A *source* is anything with ``__len__`` and ``__getitem__(i) -> dict`` of arrays with the
same keys and shapes for every ``i``: ``{"series": float32 [L, C], "label": ...}`` for the
series datasets, ``{"inputs": int32 [L], "targets": int32 [L], "weights": float32 [L]}`` for
the token tasks, or any other fields. :class:`ArraySource` wraps numpy arrays; ``tfds`` data
sources (``builder.as_data_source()[split]``) and the synthetic sources are sources too.

How an epoch is formed, on each of ``K`` shards (hosts):

1. The shard owns the source indices ``shard_index, shard_index + K, ...`` (disjoint across
   shards, together covering the source).
2. Every epoch ``e`` has its own order: ``numpy.random.default_rng([seed, e]).permutation``
   of the shard's indices (or the identity if ``shuffle=False``).
3. ``drop_remainder=True``: each epoch uses ``floor(min_shard / B) * B`` examples (the same
   count on every shard, so hosts stay in step); the dropped tail differs per epoch.
   ``drop_remainder=False``: each epoch is padded to ``ceil(max_shard / B) * B`` with zero
   records whose ``valid`` is False and ``index`` is -1; every real example appears once.
4. Batches never straddle epochs. ``num_epochs=None`` repeats forever.

Batches are dicts of stacked arrays: the source's fields with a leading ``[B]`` axis, plus
``"valid"`` bool ``[B]`` and ``"index"`` int64 ``[B]`` (the source index, -1 for padding).
Padding rows are zeros in every field (token id 0 is padding, weight 0 scores nothing).

The iterator is Grain's: ``state = it.get_state()`` and later ``it.set_state(state)`` on a
fresh iterator from the same arguments resumes with exactly the batches that would have come
next (also with ``worker_count > 0``). With Orbax, save it with
``grain.checkpoint.CheckpointSave(it)`` / ``CheckpointRestore(it)``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["ArraySource", "EpochView", "make_loader", "steps_per_epoch"]


class ArraySource:
    """Random-access source over numpy arrays with a common first axis ``N``.

    Args:
        series: ``[N, L, C]`` inputs (optional).
        label: ``[N]`` class labels or ``[N, ...]`` regression targets (optional).
        **fields: More ``[N, ...]`` fields, e.g. ``inputs``, ``targets``, ``weights``.

    ``source[i]`` is ``{"series": series[i], "label": label[i], **{k: v[i]}}`` (fields
    given as ``None`` are left out).
    """

    def __init__(self, series: np.ndarray | None = None, label: np.ndarray | None = None, **fields):
        named = {"series": series, "label": label, **fields}
        self._fields = {k: np.asarray(v) for k, v in named.items() if v is not None}
        if not self._fields:
            raise ValueError("ArraySource needs at least one field")
        n = {k: len(v) for k, v in self._fields.items()}
        if len(set(n.values())) != 1:
            raise ValueError(f"all fields need the same first dimension, got {n}")
        self._n = next(iter(n.values()))

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        i = int(i)
        if not -self._n <= i < self._n:
            raise IndexError(f"index {i} out of range for {self._n} examples")
        return {k: v[i] for k, v in self._fields.items()}

    @property
    def arrays(self) -> Mapping[str, np.ndarray]:
        """The underlying arrays."""
        return self._fields

    def __repr__(self) -> str:
        shapes = {k: tuple(v.shape) for k, v in self._fields.items()}
        return f"ArraySource({shapes})"


def _shard_sizes(n: int, count: int) -> tuple[int, int]:
    return n // count, -(-n // count)


def steps_per_epoch(
    num_examples: int, batch_size: int, *, drop_remainder: bool = True, shard_count: int = 1
) -> int:
    """Batches per epoch on each shard for :func:`make_loader` with the same arguments."""
    lo, hi = _shard_sizes(num_examples, shard_count)
    return lo // batch_size if drop_remainder else -(-hi // batch_size)


class EpochView:
    """Flat random-access view of epochs ``0, 1, ...`` of one shard (see the module docstring).

    ``view[e * per_epoch + j]`` is the ``j``-th record of epoch ``e``, with ``"valid"`` and
    ``"index"`` added. Picklable, so Grain worker processes can use it.
    """

    def __init__(
        self,
        source: Any,
        *,
        batch_size: int,
        seed: int,
        shuffle: bool,
        drop_remainder: bool,
        num_epochs: int | None,
        shard_index: int,
        shard_count: int,
    ):
        n = len(source)
        self.source = source
        self.seed = int(seed)
        self.shuffle = shuffle
        self.indices = np.arange(shard_index, n, shard_count, dtype=np.int64)
        self.per_epoch = batch_size * steps_per_epoch(
            n, batch_size, drop_remainder=drop_remainder, shard_count=shard_count
        )
        self.num_epochs = num_epochs
        if num_epochs is None:
            self._len = self.per_epoch * max(1, (sys.maxsize // 2) // max(self.per_epoch, 1))
        else:
            self._len = self.per_epoch * num_epochs
        self._template = None
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self._len

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.indices
        cache = self._orders
        order = cache.get(epoch)
        if order is None:
            rng = np.random.default_rng([self.seed, epoch])
            order = self.indices[rng.permutation(len(self.indices))]
            if len(cache) >= 3:  # readers are at most an epoch apart
                cache.pop(min(cache))
            cache[epoch] = order
        return order

    def _pad_record(self) -> dict[str, Any]:
        if self._template is None:
            rec = self.source[int(self.indices[0])] if len(self.indices) else self.source[0]
            self._template = {k: np.zeros_like(np.asarray(v)) for k, v in rec.items()}
        return dict(self._template)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if not 0 <= i < self._len:
            raise IndexError(i)
        epoch, j = divmod(i, self.per_epoch)
        order = self._order(epoch)
        if j < len(order):
            idx = int(order[j])
            rec = dict(self.source[idx])
            rec["valid"] = np.bool_(True)
        else:
            idx = -1
            rec = self._pad_record()
            rec["valid"] = np.bool_(False)
        rec["index"] = np.int64(idx)
        return rec

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_template"] = None
        d["_orders"] = {}
        return d


def make_loader(
    source: Any,
    *,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = True,
    num_epochs: int | None = 1,
    shard_index: int | None = None,
    shard_count: int | None = None,
    worker_count: int = 0,
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    read_threads: int = 4,
    prefetch: int = 8,
):
    """A Grain iterator of batches from a random-access ``source``.

    Args:
        source: ``__len__`` and ``__getitem__(i) -> dict`` of arrays (same keys and shapes
            for every ``i``), e.g. ``{"series": [L, C], "label": ...}`` or ``{"inputs": [L],
            "targets": [L], "weights": [L]}``.
        batch_size: ``B``, per shard (host).
        seed: Shuffle seed; epoch ``e`` uses ``default_rng([seed, e])``.
        shuffle: Shuffle each epoch (a different order every epoch).
        drop_remainder: Drop the examples that do not fill a batch (``True``) or pad the last
            batch with ``valid=False`` rows (``False``, for evaluation).
        num_epochs: Epochs to run; ``None`` repeats forever (step-based training).
        shard_index: This shard; defaults to ``jax.process_index()``.
        shard_count: Number of shards; defaults to ``jax.process_count()``.
        worker_count: Grain worker processes (``0``: read in this process with threads).
            Scripts using workers need an ``if __name__ == "__main__":`` guard.
        transform: Optional per-record function applied before batching (picklable when
            ``worker_count > 0``).
        read_threads: Threads reading records in each process.
        prefetch: Batches buffered ahead.

    Returns:
        A ``grain`` ``DatasetIterator`` yielding the source's fields batched (e.g.
        ``{"series": [B, L, C], "label": [B, ...]}`` or ``{"inputs": [B, L], "targets":
        [B, L], "weights": [B, L]}``) plus ``"valid"`` bool ``[B]`` and ``"index"`` int64
        ``[B]``, with ``get_state()`` / ``set_state()``.
    """
    import grain

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
    if (shard_index is None) != (shard_count is None):
        raise ValueError("give both shard_index and shard_count, or neither")
    if shard_index is None:
        import jax

        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    if len(source) == 0:
        raise ValueError("source is empty")
    view = EpochView(
        source,
        batch_size=batch_size,
        seed=seed,
        shuffle=shuffle,
        drop_remainder=drop_remainder,
        num_epochs=num_epochs,
        shard_index=shard_index,
        shard_count=shard_count,
    )
    if view.per_epoch == 0:
        raise ValueError(
            f"batch_size {batch_size} is larger than the {len(view.indices)} examples of shard "
            f"{shard_index}/{shard_count}, and drop_remainder=True would drop them all; use a "
            "smaller batch or drop_remainder=False"
        )
    ds = grain.MapDataset.source(view)
    if transform is not None:
        ds = ds.map(transform)
    ds = ds.batch(batch_size, drop_remainder=True)
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
    )
    if worker_count > 0:
        from absl import flags

        # grain 0.2.18 reads absl flags in workers (grain issue 1355); unparsed flags would
        # raise UnparsedFlagAccessError there.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(it_ds)


def batches_to_arrays(batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenates batches along axis 0 and drops padded rows (``valid`` False)."""
    out = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    keep = out["valid"]
    return {k: v[keep] for k, v in out.items()}
