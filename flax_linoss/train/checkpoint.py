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

A checkpoint damaged on disk (a truncated file; a flipped bit, which OCDBT's checksums report
as ``DATA_LOSS``) is skipped with one warning line naming it: resuming and evaluating use the
newest intact one (:func:`newest_intact`), and a resumed run moves the damaged ones to
``WORKDIR/damaged/`` so that it can save those steps again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import orbax.checkpoint as ocp

from flax_linoss.train.workdir import exception_chain

__all__ = [
    "DamagedCheckpointError",
    "IncompatibleCheckpointError",
    "RunCheckpoints",
    "abstract_like",
    "checkpoint_meta",
    "is_damage",
    "newest_intact",
    "restore_model",
]


class IncompatibleCheckpointError(RuntimeError):
    """The workdir holds a checkpoint of a different model or optimiser."""


class DamagedCheckpointError(RuntimeError):
    """Every checkpoint of a run is damaged on disk; the message names each and why."""


# What reading a damaged checkpoint raises: tensorstore's status codes for bad or missing
# bytes (a flipped bit is DATA_LOSS, a truncated file OUT_OF_RANGE), or an undecodable
# JSON / msgpack part. Other errors (a wrong tree, a bug) are raised as they are.
_DAMAGE = re.compile(
    r"DATA_LOSS|OUT_OF_RANGE|NOT_FOUND|Error reading|Error decoding|[Cc]orrupt|[Tt]runcated"
)


def is_damage(e: BaseException) -> bool:
    """Whether ``e`` (or an exception in its chain) says a checkpoint's bytes are bad."""
    return any(
        isinstance(x, json.JSONDecodeError | UnicodeDecodeError | FileNotFoundError | EOFError)
        or (isinstance(x, ValueError) and _DAMAGE.search(str(x)) is not None)
        for x in exception_chain(e)
    )


def _first_readable(candidates: Iterable[Any], load: Callable[[Any], Any]):
    """``(candidate, load(candidate))`` for the first candidate that reads, skipping damaged
    ones quietly (a first look; :func:`newest_intact` reports them); ``None`` if none."""
    for c in candidates:
        try:
            return c, load(c)
        except Exception as e:
            if not is_damage(e):
                raise
    return None


def _reason(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text[:160]}"


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def newest_intact(
    candidates: Iterable[Any],
    load: Callable[[Any], Any],
    name: Callable[[Any], str],
    *,
    on_damaged: Callable[[Any], str] | None = None,
) -> tuple[Any, Any] | None:
    """``(candidate, load(candidate))`` for the first candidate (newest first) that reads.

    A checkpoint whose reading fails with damaged bytes (:func:`is_damage`) is skipped with
    one warning line naming it (``name(candidate)``, e.g. ``"at step 120 in runs/x"``), the
    reason and the checkpoint used instead; ``on_damaged(candidate)`` (e.g. moving it aside)
    returns words added to that line. Other errors are raised as they are.

    Returns:
        ``None`` if there are no candidates.

    Raises:
        DamagedCheckpointError: Every candidate is damaged.
    """
    damaged = []
    for c in candidates:
        try:
            out = load(c)
        except Exception as e:
            if not is_damage(e):
                raise
            damaged.append((c, _reason(e)))
            continue
        for bad, why in damaged:
            extra = on_damaged(bad) if on_damaged is not None else ""
            _warn(f"the checkpoint {name(bad)} is damaged ({why}); using the one {name(c)}{extra}")
        return c, out
    if damaged:
        raise DamagedCheckpointError(
            "every checkpoint is damaged ("
            + "; ".join(f"{name(c)}: {why}" for c, why in damaged)
            + "); move the run folder away to start over"
        )
    return None


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


def _saving(directory: str) -> bool:
    """A save is in flight in ``directory``: Orbax's temporary folder of a step (the
    managers clean those of earlier runs when they start)."""
    try:
        return any(".orbax-checkpoint-tmp" in name for name in os.listdir(directory))
    except OSError:
        return False


def _manager(directory: str, keep: int, async_save: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True,
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


#: Signature fields added after checkpoints were first written: what the older ones had.
SIGNATURE_DEFAULTS = {"param_dtype": "float32"}


def check_signature(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """Raises :class:`IncompatibleCheckpointError` listing the fields that differ."""
    older = {k: v for k, v in SIGNATURE_DEFAULTS.items() if k in current}
    saved = {**older, **saved}
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

    def committed_step(self, timeout: float = 300.0) -> int | None:
        """The newest checkpoint on disk once the saves in flight are done (Orbax forgets a
        step whose wait or save call was interrupted, though its save completes in the
        background: its temporary folder is awaited too, up to ``timeout`` seconds)."""
        self.wait()
        directory = os.path.join(self.workdir, "checkpoints")
        deadline = time.monotonic() + timeout
        while _saving(directory) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.latest.reload()
        return self.latest.latest_step()

    def saved_meta(self, step: int) -> dict[str, Any]:
        out = self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def newest_meta(self) -> dict[str, Any] | None:
        """The meta of the newest checkpoint whose meta reads (damaged ones are reported by
        :meth:`restore_newest`), or ``None`` without checkpoints."""
        found = _first_readable(sorted(self.latest.all_steps(), reverse=True), self.saved_meta)
        return None if found is None else found[1]

    def restore_newest(self, restore: Callable[[int], Any]) -> tuple[int, Any] | None:
        """``(step, restore(step))`` for the newest intact checkpoint (:func:`newest_intact`);
        damaged newer ones move to ``WORKDIR/damaged/checkpoint_<step>`` (so the run can
        save those steps again)."""

        def move_aside(step: int) -> str:
            target = os.path.join(self.workdir, "damaged", f"checkpoint_{step}")
            if jax.process_index() == 0:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.rmtree(target, ignore_errors=True)
                os.replace(os.path.join(self.workdir, "checkpoints", str(step)), target)
            return f" (moved to {target})"

        where = os.path.join(self.workdir, "checkpoints")
        found = newest_intact(
            sorted(self.latest.all_steps(), reverse=True),
            restore,
            lambda step: f"at step {step} in {where}",
            on_damaged=move_aside,
        )
        self.latest.reload()
        return found

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


def _candidates(workdir: str, which: str) -> list[tuple[str, int]]:
    """``(directory, step)`` to read for ``which``, in order: the best checkpoint (``best``),
    then the full checkpoints, newest first."""
    if which not in ("best", "latest"):
        raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
    out = []
    for sub in ("best", "checkpoints") if which == "best" else ("checkpoints",):
        directory = os.path.abspath(os.path.join(workdir, sub))
        if os.path.isdir(directory):
            mngr = ocp.CheckpointManager(directory)
            out += [(directory, step) for step in sorted(mngr.all_steps(), reverse=True)]
            mngr.close()
    return out


def _read(directory: str, step: int, args: ocp.args.Composite) -> Any:
    mngr = ocp.CheckpointManager(directory)
    try:
        return mngr.restore(step, args=args)
    finally:
        mngr.close()


def _newest(workdir: str, which: str, load: Callable[[str, int], Any], *, warn: bool):
    """``((directory, step), load(directory, step))`` for the first candidate that reads;
    with ``warn``, each damaged one skipped is reported (:func:`newest_intact`)."""
    candidates = _candidates(workdir, which)
    if not candidates:
        raise FileNotFoundError(
            f"{workdir!r} holds no checkpoint (is it the --workdir of a `flax-linoss train` run?)"
        )
    if warn:
        return newest_intact(candidates, lambda c: load(*c), lambda c: f"at step {c[1]} in {c[0]}")
    found = _first_readable(candidates, lambda c: load(*c))  # a first look (the signature)
    if found is None:
        raise DamagedCheckpointError(f"every checkpoint in {workdir} is damaged")
    return found


def checkpoint_meta(workdir: str, *, which: str = "best") -> tuple[dict[str, Any], int]:
    """``(meta, step)`` of the checkpoint :func:`restore_model` would restore, read before
    anything else (to check the model signature first; damaged checkpoints are skipped).

    Raises:
        FileNotFoundError: ``workdir`` holds no complete checkpoint.
    """
    (_, step), out = _newest(
        workdir,
        which,
        lambda d, s: _read(d, s, ocp.args.Composite(meta=ocp.args.JsonRestore())),
        warn=False,
    )
    return dict(out["meta"]), step


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
            ``"latest"``. A damaged checkpoint is skipped with a warning line for the next
            newest intact one.

    Returns:
        ``(model_variables, meta, step)``.
    """
    model = {k: abstract_model[k] for k in ("params", "batch_stats")}

    def load(directory: str, step: int):
        if os.path.basename(directory) == "best":
            args = ocp.args.Composite(
                model=ocp.args.StandardRestore(abstract_model), meta=ocp.args.JsonRestore()
            )
            out = _read(directory, step, args)
            return out["model"], dict(out["meta"])
        meta = _read(directory, step, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        # Restore only the model part of the full state, with the stored structure elsewhere.
        state = ocp.args.PyTreeRestore(
            item=model,
            restore_args=jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), model),
            partial_restore=True,
        )
        return _read(directory, step, ocp.args.Composite(state=state))["state"], dict(meta)

    (_, step), (variables, meta) = _newest(workdir, which, load, warn=True)
    return variables, meta, step


def dump_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as JSON atomically."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
