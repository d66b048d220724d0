"""The trainer's view of the input pipeline: datasets from a config, sharded train streams.

The train stream is cut into ``S`` shards (``data.num_shards``, default one per process);
process ``p`` of ``N`` reads shards ``p S/N, ..., (p+1) S/N - 1`` through Grain's per-shard
loaders and concatenates their batches. With ``S`` fixed, the global batch at every step is the
same for any process count, which is what makes a 2-process run match a 1-process one.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
import numpy as np

__all__ = [
    "ShardedIterator",
    "eval_batches",
    "load_dataset",
    "model_shape",
    "prepare_batch",
    "train_iterator",
]


def split_seed(config: ml_collections.ConfigDict) -> int:
    """The split (or generation) seed: ``data.split_seed``, or ``seed`` when it is -1."""
    return config.seed if config.data.split_seed < 0 else config.data.split_seed


def load_dataset(config: ml_collections.ConfigDict):
    """``get_dataset`` for ``config.data`` (name, split seed, options)."""
    from flax_linoss.data import get_dataset

    options = config.data.options
    options = dict(options.to_dict() if hasattr(options, "to_dict") else options)
    options = {k: v for k, v in options.items() if v != ""}  # "" = the default location
    return get_dataset(config.data.name, seed=split_seed(config), **options)


def prepare_batch(config: ml_collections.ConfigDict, batch: dict[str, Any]) -> dict[str, Any]:
    """The model input ``series``, the ``label`` and the row mask ``valid`` (plus the scored
    positions ``weight`` of token tasks, and the ``timestamps`` of irregularly sampled
    series unless ``model.use_timestamps`` is off); adds the time channel if configured
    (from the timestamps where they are used)."""
    if "inputs" in batch:  # token task: inputs [B, L] int, next-token targets, weights
        out = {
            "series": np.asarray(batch["inputs"], np.int32),
            "label": np.asarray(batch["targets"], np.int32),
            "weight": np.asarray(batch["weights"], np.float32),
            "valid": batch["valid"],
        }
        # Packed sequences: each attends to / carries state within its own segment.
        for key in ("segment_ids", "positions"):
            if key in batch:
                out[key] = np.asarray(batch[key], np.int32)
        return out
    series = np.asarray(batch["series"], np.float32)
    times = batch.get("timestamps") if config.model.use_timestamps else None
    if config.data.time_channel:
        from flax_linoss.data.protocol import add_time_channel

        series = add_time_channel(series, timestamps=times)
    out = {"series": series, "label": batch["label"], "valid": batch["valid"]}
    if times is not None:
        out["timestamps"] = np.asarray(times, np.float32)
    return out


def model_shape(info: dict[str, Any], time_channel: bool = False) -> dict[str, Any]:
    """``in_features``, ``output_size``, ``task``, ``output_step`` from a dataset's info."""
    task = info["task"]
    if task == "lm":
        return {"task": task, "vocab_size": int(info["vocab_size"]), "length": int(info["length"])}
    channels = int(info["channels"]) + int(time_channel)
    if task == "classification":
        return {
            "in_features": channels,
            "output_size": int(info["num_classes"]),
            "task": task,
            "output_step": 1,
        }
    target = tuple(info["target_shape"])
    step = info.get("output_step")
    if step is None:
        if len(target) != 2 or info["length"] % target[0]:
            raise ValueError(
                f"cannot fit a regression head of target shape {target} to inputs of length "
                f"{info['length']}: need [T, D] targets with length divisible by T"
            )
        step = info["length"] // target[0]
    return {
        "in_features": channels,
        "output_size": int(target[-1]),
        "task": task,
        "output_step": int(step),
    }


class ShardedIterator:
    """Concatenates the batches of several Grain shard loaders; resumable.

    ``get_state()`` / ``set_state()`` work with JSON bytes (the form Grain's Orbax handler
    stores for non-Grain iterators).
    """

    def __init__(self, iterators: list[Any]):
        self.iterators = iterators

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self.iterators]
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self) -> bytes:
        return json.dumps({"shards": [it.get_state() for it in self.iterators]}).encode()

    def set_state(self, state: bytes) -> None:
        shards = json.loads(state)["shards"]
        if len(shards) != len(self.iterators):
            raise ValueError(
                f"data state has {len(shards)} shards but this process reads "
                f"{len(self.iterators)}; resume with the same data.num_shards and process count"
            )
        for it, s in zip(self.iterators, shards, strict=True):
            it.set_state(s)

    def start_prefetch(self) -> None:
        pass

    def snapshot(self) -> _Frozen:
        """The state now, for a checkpoint written later in the background."""
        return _Frozen(self.get_state())


class _Frozen:
    def __init__(self, state: bytes):
        self._state = state

    def get_state(self) -> bytes:
        return self._state


def train_iterator(config: ml_collections.ConfigDict, source: Any) -> ShardedIterator:
    """This process's share of the global train stream (see the module docstring)."""
    from flax_linoss.data import make_loader

    nproc, pid = jax.process_count(), jax.process_index()
    shards = config.data.num_shards or nproc
    if shards % nproc:
        raise ValueError(f"data.num_shards={shards} must be a multiple of {nproc} processes")
    per = shards // nproc
    batch = config.data.batch_size // shards
    its = [
        make_loader(
            source,
            batch_size=batch,
            seed=config.seed,
            shuffle=True,
            drop_remainder=True,
            num_epochs=None,
            shard_index=k,
            shard_count=shards,
            worker_count=config.data.worker_count,
        )
        for k in range(pid * per, (pid + 1) * per)
    ]
    return ShardedIterator(its)


def eval_batches(config: ml_collections.ConfigDict, source: Any):
    """One padded pass over ``source`` (this process's share), ``valid`` marking real rows."""
    from flax_linoss.data import make_loader

    nproc, pid = jax.process_count(), jax.process_index()
    return make_loader(
        source,
        batch_size=config.data.eval_batch_size // nproc,
        seed=0,
        shuffle=False,
        drop_remainder=False,
        num_epochs=1,
        shard_index=pid,
        shard_count=nproc,
    )
