"""Seed-parallel training: several seeds of one experiment as one compiled program.

Parameters, optimiser state, batch statistics and dropout keys carry a leading seed axis,
and one ``jax.vmap`` of the ordinary train step updates every seed at once. Each seed reads
its own split and data order (its own :class:`~flax_linoss.train.trainer.Run`: the same
workdir layout, checkpoints, metrics and results as a sequential run of that seed, so a
sequential ``reproduce`` can resume or skip it and vice versa). Early stopping is per seed:
a stopped seed's updates are masked out while the others go on.

On an accelerator a small model (SCP1's batch of 32) uses a sliver of the chip, so several
seeds cost about as much as one. On a CPU the step is compute-bound and there is no gain.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flax_linoss.train import config as config_lib
from flax_linoss.train import parallel as par_lib
from flax_linoss.train import trainer

__all__ = ["train_seeds"]


def _stack(trees):
    return jax.tree.map(
        lambda *xs: jnp.stack([jnp.asarray(par_lib.to_host(x)) for x in xs]), *trees
    )


def _row(tree, i: int):
    return jax.tree.map(lambda x: x[i], tree)


def _check(configs: dict[int, ml_collections.ConfigDict]) -> None:
    first = next(iter(configs.values()))
    for seed, cfg in configs.items():
        a, b = cfg.to_dict(), first.to_dict()
        a.pop("seed"), b.pop("seed")
        if a != b:
            raise config_lib.ConfigError(
                f"seed_parallel needs configs that differ only in `seed`; seed {seed}'s differs"
            )
    if first.parallel.implementation != "jit":
        raise config_lib.ConfigError(
            "seed_parallel runs the vmapped step with parallel.implementation='jit'"
        )


def train_seeds(
    configs: dict[int, ml_collections.ConfigDict], workdirs: dict[int, str]
) -> dict[int, dict[str, Any]]:
    """Trains every ``configs[seed]`` in ``workdirs[seed]`` as one program.

    Args:
        configs: seed -> config (they may differ only in ``seed``).
        workdirs: seed -> run folder (resumed if it holds checkpoints; a finished run is
            left as it is).

    Returns:
        seed -> the results of :func:`flax_linoss.train.trainer.train_and_evaluate`.
    """
    _check(configs)
    setups = {seed: trainer.setup(cfg) for seed, cfg in configs.items()}
    runs = {seed: trainer.Run(setups[seed], workdirs[seed]) for seed in configs}
    active = [seed for seed, run in runs.items() if not run.finished]
    if active:
        # Seeds resume together from the oldest step any of them has.
        step = min(runs[seed].step for seed in active)
        for seed in active:
            if runs[seed].step != step:
                _rewind(runs[seed], step)
        with contextlib.ExitStack() as stack:
            for seed in active:
                stack.enter_context(runs[seed].saving())
            _train(setups[active[0]], {seed: runs[seed] for seed in active}, step)
    return {seed: run.close() for seed, run in runs.items()}


def _rewind(run: trainer.Run, step: int) -> None:
    """Puts ``run`` back to its checkpoint at ``step`` (another seed is behind)."""
    state, meta = trainer.restore_state(run.s, run.ckpts, step, run.train_it)
    run.state, run.meta, run.step = state, meta, step
    run.ckpts.drop_after(step)
    run.ckpts.drop_best_after(step)
    run.writer.truncate(step)


def _train(s: trainer.Setup, runs: dict[int, trainer.Run], step: int) -> None:
    step_fn = trainer.make_step_fn(s.fns, s.tx)

    def one(state, batch, active):
        new, metrics = step_fn(state, batch, None)
        new = jax.tree.map(lambda n, o: jnp.where(active, n, o), new, state)
        return new, metrics

    vstep = jax.jit(jax.vmap(one))
    seeds = list(runs)
    total = s.config.train.num_steps
    for run in runs.values():
        run.announce()
    state = _stack([runs[seed].state for seed in seeds])
    active = np.ones(len(seeds), bool)
    pending = None
    while step < total and active.any():
        batches = _stack_batches([runs[seed].next_batch() for seed in seeds])
        state, metrics = vstep(state, batches, jnp.asarray(active))
        step += 1
        for run in runs.values():
            run.step = step
        if pending is not None:
            _record(runs, seeds, active, *pending)
        pending = (metrics, step)
        if not runs[seeds[0]].at_boundary():
            continue
        _record(runs, seeds, active, *pending)
        pending = None
        for i, seed in enumerate(seeds):
            if active[i] and runs[seed].boundary(s.parallel.place(_row(state, i))):
                active[i] = False
    for i, seed in enumerate(seeds):
        runs[seed].step = int(np.asarray(state.step[i]))


def _stack_batches(batches):
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def _record(runs, seeds, active, metrics, step):
    for i, seed in enumerate(seeds):
        if active[i]:
            runs[seed].record(_row(metrics, i), step)
