"""``flax-linoss reproduce``: the papers' protocol over several seeds, with a results table.

Each seed trains in its own run folder ``WORKDIR/seed_<S>`` (an ordinary run: checkpoints,
``metrics.jsonl``, ``results.json``), so a rerun resumes an unfinished seed and skips a
finished one. Then ``WORKDIR/results.json`` and ``WORKDIR/results.md`` collect, per seed, the
best validation step, the validation and test metric there, the steps run and the wall time,
the mean and standard deviation over seeds (numpy's ``ddof=0``, as the papers), and the
published result beside them (:mod:`flax_linoss.train.published`).

A budget (``max_steps``, ``eval_every``) shortens the protocol; it is written into the
results, never hidden.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from flax_linoss.data.protocol import PAPER_SEEDS
from flax_linoss.train import checkpoint as ckpt_lib
from flax_linoss.train import metrics as metrics_lib
from flax_linoss.train import published
from flax_linoss.variants import by_scheme

__all__ = ["RESULTS_JSON", "RESULTS_MD", "reproduce", "seed_config", "seed_dir"]

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


def seed_dir(workdir: str, seed: int) -> str:
    """The run folder of one seed."""
    return os.path.join(workdir, f"seed_{seed}")


def seed_config(
    config: ml_collections.ConfigDict,
    seed: int,
    *,
    max_steps: int | None = None,
    eval_every: int | None = None,
) -> ml_collections.ConfigDict:
    """``config`` for one seed, with the budget applied (a copy; ``config`` is untouched)."""
    cfg = copy.deepcopy(config)
    with cfg.unlocked():
        cfg.seed = int(seed)
        if max_steps:
            cfg.train.num_steps = min(int(max_steps), cfg.train.num_steps)
        if eval_every:
            cfg.train.eval_every = int(eval_every)
            cfg.train.checkpoint_every = int(eval_every)
    return cfg


def _finished(run_dir: str, cfg: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """The run's results if it has finished under ``cfg``'s budget, else ``None``."""
    path = os.path.join(run_dir, "results.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        res = json.load(f)
    if res.get("stopped_early") or res.get("final_step", 0) >= cfg.train.num_steps:
        return res
    return None


def _val_curve(run_dir: str) -> dict[int, float]:
    """``step -> validation metric`` from the run's ``metrics.jsonl``."""
    out = {}
    for r in metrics_lib.read_metrics(run_dir):
        if r["split"] == "val":
            metric = next(k for k in r if k not in ("step", "split", "loss"))
            out[int(r["step"])] = float(r[metric])
    return out


def cpu_name() -> str:
    """The CPU model (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _stats(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
    if not len(a):
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std())


def reproduce(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    seeds: Sequence[int] = PAPER_SEEDS,
    max_steps: int | None = None,
    eval_every: int | None = None,
    seed_parallel: bool = False,
    command: str | None = None,
) -> dict[str, Any]:
    """Runs the protocol of ``config`` for every seed and writes the results files.

    Args:
        config: A paper config (e.g. ``configs/uea_scp1.py:linoss_im``); its ``seed`` is
            replaced by each of ``seeds``.
        workdir: Folder of the reproduction; one sub-folder per seed.
        seeds: The seeds (default: the papers' five).
        max_steps: Budget: at most this many steps per seed (default: the config's).
        eval_every: Budget: evaluate (and checkpoint) every this many steps.
        seed_parallel: Train all seeds as one compiled program
            (:mod:`flax_linoss.train.seed_parallel`).
        command: The command line, recorded in the results.

    Returns:
        The content of ``results.json``.
    """
    from flax_linoss.train import trainer

    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"reproduce needs distinct seeds, got {seeds}")
    os.makedirs(workdir, exist_ok=True)
    configs = {s: seed_config(config, s, max_steps=max_steps, eval_every=eval_every) for s in seeds}
    if seed_parallel:
        from flax_linoss.train import seed_parallel as sp

        sp.train_seeds(configs, {s: seed_dir(workdir, s) for s in seeds})
    else:
        for s in seeds:
            run_dir = seed_dir(workdir, s)
            if _finished(run_dir, configs[s]) is not None:
                print(f"seed {s}: finished earlier, skipped ({run_dir})", flush=True)
                continue
            print(f"seed {s}: training in {run_dir}", flush=True)
            trainer.train_and_evaluate(configs[s], run_dir)
    return write_results(config, workdir, seeds, configs, command=command)


def write_results(
    config: ml_collections.ConfigDict,
    workdir: str,
    seeds: Sequence[int],
    configs: dict[int, ml_collections.ConfigDict],
    *,
    command: str | None = None,
) -> dict[str, Any]:
    """Collects the seeds' results into ``results.json`` and ``results.md``."""
    import jax

    variant = by_scheme(config.model.discretization)
    dataset = config.data.name.split("/", 1)[-1]
    ref_seeds = published.REFERENCE_SEEDS.get((variant.label, dataset), {})
    rows = []
    for s in seeds:
        run_dir = seed_dir(workdir, s)
        res = _finished(run_dir, configs[s])
        if res is None:
            raise RuntimeError(f"seed {s} has not finished in {run_dir}")
        curve = _val_curve(run_dir)
        ref = ref_seeds.get(s)
        rows.append(
            {
                "seed": s,
                "metric": res["metric"],
                "best_step": res["best_step"],
                "best_val": res["best_val"],
                "test_at_best_val": res["test_at_best_val"],
                "val_at_1000": curve.get(1000),
                "val_curve": curve,
                "steps_run": res["final_step"],
                "stopped_early": res["stopped_early"],
                "train_seconds": res.get("train_seconds"),
                "reference": None if ref is None else ref.as_dict(),
            }
        )
    metric = rows[0]["metric"]
    scale = 100.0 if metric == "accuracy" else 1.0
    test_mean, test_std = _stats([r["test_at_best_val"] * scale for r in rows])
    val_mean, val_std = _stats([r["best_val"] * scale for r in rows])
    budget = {
        "num_steps": configs[seeds[0]].train.num_steps,
        "eval_every": configs[seeds[0]].train.eval_every,
        "patience": configs[seeds[0]].train.patience,
        "protocol_num_steps": config.train.num_steps,
        "protocol_eval_every": config.train.eval_every,
    }
    results = {
        "dataset": config.data.name,
        "model": variant.label,
        "metric": metric,
        "command": command,
        "budget": budget,
        "norm": config.model.norm,
        "dtype": config.model.dtype,
        "split_follows_seed": config.data.split_seed < 0,
        "machine": {
            "platform": platform.platform(),
            "processor": cpu_name(),
            "cpu_count": os.cpu_count(),
            "jax_backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()],
            "jax": jax.__version__,
        },
        "seeds": rows,
        "test_mean": test_mean,
        "test_std": test_std,
        "val_mean": val_mean,
        "val_std": val_std,
        "published": published.published_row(variant.label, dataset),
        "published_source": published.SOURCE,
    }
    ckpt_lib.dump_json(os.path.join(workdir, RESULTS_JSON), results)
    with open(os.path.join(workdir, RESULTS_MD), "w") as f:
        f.write(results_markdown(results))
    return results


def _fmt(x: float | None, scale: float = 100.0, digits: int = 1) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x * scale:.{digits}f}"


def results_markdown(results: dict[str, Any]) -> str:
    """``results.md``: the budget, the per-seed table beside the reference, the summary."""
    acc = results["metric"] == "accuracy"
    scale = 100.0 if acc else 1.0
    b = results["budget"]
    unit = "%" if acc else ""
    lines = [
        f"# {results['model']} on {results['dataset']}",
        "",
        f"Command: `{results['command']}`" if results["command"] else "",
        "",
        f"Budget: {b['num_steps']} steps per seed, evaluation every {b['eval_every']} steps, "
        + (
            f"early stopping after more than {b['patience']} evaluations without improvement "
            if b["patience"]
            else "no early stopping "
        )
        + f"(the protocol: up to {b['protocol_num_steps']} steps, evaluation every "
        f"{b['protocol_eval_every']}). Norm `{results['norm']}`, dtype `{results['dtype']}`; "
        f"the split {'follows each seed' if results['split_follows_seed'] else 'is fixed'}.",
        "",
        f"Machine: {results['machine']['processor']}, {results['machine']['cpu_count']} CPUs "
        f"({results['machine']['platform']}), "
        f"jax {results['machine']['jax']} on {results['machine']['jax_backend']}.",
        "",
        f"| seed | steps run | best val step | val {results['metric']} | test "
        f"{results['metric']} | val at step 1000 | wall time | reference best step | "
        "reference val | reference test | reference val at 1000 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["seeds"]:
        ref = r["reference"] or {}
        wall = r["train_seconds"]
        lines.append(
            f"| {r['seed']} | {r['steps_run']}{' (early stop)' if r['stopped_early'] else ''} "
            f"| {r['best_step']} | {_fmt(r['best_val'], scale)} "
            f"| {_fmt(r['test_at_best_val'], scale)} | {_fmt(r['val_at_1000'], scale)} "
            f"| {metrics_lib.format_duration(wall) if wall is not None else '-'} "
            f"| {ref.get('best_step', '-')} | {_fmt(ref.get('best_val'), scale)} "
            f"| {_fmt(ref.get('test_at_best'), scale)} | {_fmt(ref.get('val_at_1000'), scale)} |"
        )
    pub = results["published"]
    if isinstance(pub, list | tuple):
        pub_text = f"{pub[0]:.1f} +- {pub[1]:.1f}{unit}"
    elif pub is not None:
        pub_text = f"{pub}"
    else:
        pub_text = "not reported"
    source = f" ({results['published_source']})" if pub is not None else ""
    lines += [
        "",
        f"Mean +- std over {len(results['seeds'])} seeds (ddof=0, as the papers): test "
        f"{results['test_mean']:.1f} +- {results['test_std']:.1f}{unit}, val "
        f"{results['val_mean']:.1f} +- {results['val_std']:.1f}{unit}.",
        "",
        f"Published: {pub_text}{source}.",
        "",
    ]
    return "\n".join(lines)
