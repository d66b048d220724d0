"""Orbax checkpoints of a training run: the last K full states, and the best model apart.

Layout in the workdir::

    checkpoints/<step>/state   params, batch_stats, opt_state, step, rng (Orbax StandardSave)
    checkpoints/<step>/data    the Grain iterator state, one file per process
    checkpoints/<step>/meta    JSON: model signature, early-stopping state, best so far
    best/<step>/model          params, batch_stats of the best validation evaluation
    best/<step>/meta           JSON: its step and val / test metrics

Arrays are saved as they are sharded: each process writes its own devices' shards, nothing
is gathered; a restore reads them into the shardings of the target (another mesh, another
device count). Saves are asynchronous where Orbax supports it; a save interrupted by a kill
leaves only a temporary directory, which Orbax ignores and cleans up, so a restart resumes
from the last complete checkpoint. All processes call save and restore (Orbax writes collectively).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = [
    "IncompatibleCheckpointError",
    "RunCheckpoints",
    "abstract_like",
    "checkpoint_meta",
    "restore_model",
]


class IncompatibleCheckpointError(RuntimeError):
    """The workdir holds a checkpoint of a different model or optimiser."""


def abstract_like(tree: Any, sharding: Any = None) -> Any:
    """``ShapeDtypeStruct`` leaves to restore ``tree``'s structure into, with ``sharding``:
    one sharding for every leaf, a tree of them shaped like ``tree``, or ``None`` (each
    leaf's own). Orbax restores each array straight into its sharding, whatever mesh or
    device count wrote it."""
    if sharding is None or isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(
                a.shape, a.dtype, sharding=sharding or getattr(a, "sharding", None)
            ),
            tree,
        )
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sharding
    )


def _manager(directory: str, keep: int, async_save: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True,
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def check_signature(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """Raises :class:`IncompatibleCheckpointError` listing the fields that differ."""
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}"
        for k in sorted(set(saved) | set(current))
        if saved.get(k) != current.get(k)
    ]
    if diffs:
        raise IncompatibleCheckpointError(
            f"{where} holds a checkpoint of an incompatible model or optimiser ("
            + "; ".join(diffs)
            + "). Use a new --workdir, or delete the old one to start over; it is not "
            "overwritten."
        )


class RunCheckpoints:
    """The two checkpoint managers of a run.

    Args:
        workdir: Run directory.
        keep: Recent full checkpoints kept.
        async_save: Save in the background.
    """

    def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
        self.workdir = workdir
        self.latest = _manager(os.path.join(workdir, "checkpoints"), keep, async_save)
        self.best = _manager(os.path.join(workdir, "best"), 1, async_save)

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def saved_meta(self, step: int) -> dict[str, Any]:
        out = self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def save(self, step: int, state: Any, data_iter: Any, meta: dict[str, Any]) -> None:
        """Saves the full state, the data iterator state and ``meta`` at ``step``."""
        import grain

        self.latest.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iter.snapshot()),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any, data_iter: Any) -> tuple[Any, dict]:
        """Restores the state into ``abstract_state``'s shardings and sets ``data_iter``."""
        import grain

        out = self.latest.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(data_iter),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return out["state"], dict(out["meta"])

    def save_best(self, step: int, model: Any, meta: dict[str, Any]) -> None:
        """Saves the model variables of a new best evaluation (replacing the previous one)."""
        for s in self.best.all_steps():
            if s >= step:  # left by a run that was killed after it; replayed identically
                self.best.delete(s)
        self.best.save(
            step,
            args=ocp.args.Composite(
                model=ocp.args.StandardSave(model), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def drop_after(self, step: int) -> None:
        """Deletes the full checkpoints newer than ``step`` (committed saves only)."""
        self.latest.wait_until_finished()
        for s in self.latest.all_steps():
            if s > step:
                self.latest.delete(s)

    def drop_best_after(self, step: int) -> None:
        """Deletes best checkpoints newer than ``step`` (a resumed run recreates them)."""
        self.best.wait_until_finished()
        for s in self.best.all_steps():
            if s > step:
                self.best.delete(s)

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.latest.close()
        self.best.close()


def checkpoint_meta(workdir: str, *, which: str = "best") -> tuple[dict[str, Any], int]:
    """``(meta, step)`` of the checkpoint :func:`restore_model` would restore, read before
    anything else (to check the model signature first).

    Raises:
        FileNotFoundError: ``workdir`` holds no complete checkpoint.
    """
    if which not in ("best", "latest"):
        raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
    for sub in ("best", "checkpoints") if which == "best" else ("checkpoints",):
        directory = os.path.join(workdir, sub)
        if not os.path.isdir(directory):
            continue
        mngr = ocp.CheckpointManager(os.path.abspath(directory))
        step = mngr.latest_step()
        if step is not None:
            out = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            mngr.close()
            return dict(out["meta"]), step
        mngr.close()
    raise FileNotFoundError(
        f"{workdir!r} holds no checkpoint (is it the --workdir of a `flax-linoss train` run?)"
    )


def restore_model(
    workdir: str,
    abstract_model: Any,
    *,
    which: str = "best",
) -> tuple[Any, dict[str, Any], int]:
    """Restores ``{"params", "batch_stats"}`` from a run into new shardings or device counts.

    Args:
        workdir: Run directory.
        abstract_model: ``{"params", "batch_stats"}`` of ``jax.ShapeDtypeStruct`` with the
            target shardings (see :func:`abstract_like`).
        which: ``"best"`` (best validation evaluation; falls back to the latest) or
            ``"latest"``.

    Returns:
        ``(model_variables, meta, step)``.
    """
    if which not in ("best", "latest"):
        raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
    best_dir = os.path.join(workdir, "best")
    if which == "best" and os.path.isdir(best_dir):
        mngr = ocp.CheckpointManager(os.path.abspath(best_dir))
        step = mngr.latest_step()
        if step is not None:
            out = mngr.restore(
                step,
                args=ocp.args.Composite(
                    model=ocp.args.StandardRestore(abstract_model), meta=ocp.args.JsonRestore()
                ),
            )
            mngr.close()
            return out["model"], dict(out["meta"]), step
        mngr.close()
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"No checkpoints in {workdir!r}")
    mngr = ocp.CheckpointManager(os.path.abspath(ckpt_dir))
    step = mngr.latest_step()
    if step is None:
        raise FileNotFoundError(f"No complete checkpoint in {ckpt_dir!r}")
    # Restore only the model part of the full state, with the stored structure elsewhere.
    meta = dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
    full = mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item={k: abstract_model[k] for k in ("params", "batch_stats")},
                restore_args=jax.tree.map(
                    lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding),
                    {k: abstract_model[k] for k in ("params", "batch_stats")},
                ),
                partial_restore=True,
            )
        ),
    )
    mngr.close()
    return full["state"], meta, step


def dump_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as JSON atomically."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
