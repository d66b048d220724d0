"""Curves of a run (or of a reproduction's seeds), drawn from ``metrics.jsonl``."""

from __future__ import annotations

import glob
import os
from collections import defaultdict

from flax_linoss.train.metrics import METRICS_FILE, read_metrics

__all__ = ["SPLIT_STYLES", "plot_run"]

#: Line style and colour of each split, the same in every panel (a panel without a train
#: curve, such as decode accuracy, still draws validation in the validation colour).
SPLIT_STYLES = {"train": ("-", "C0"), "val": ("o-", "C1"), "test": ("s--", "C2")}


def _seed_dirs(workdir: str) -> list[str]:
    return sorted(
        d
        for d in glob.glob(os.path.join(workdir, "seed_*"))
        if os.path.isfile(os.path.join(d, METRICS_FILE))
    )


def _best(points, higher: bool, run_dir: str):
    """The best ``(step, value)``: the run's own choice (``results.json``, which follows
    ``train.best_ties``) where it has finished, else the first best."""
    path = os.path.join(run_dir, "results.json")
    if os.path.isfile(path):
        import json

        with open(path) as f:
            step = json.load(f).get("best_step")
        match = [p for p in points if p[0] == step]
        if match:
            return match[0]
    return max(points, key=lambda p: (p[1] if higher else -p[1], -p[0]))


def plot_run(workdir: str, out: str | None = None) -> str:
    """Draws the curves of the run in ``workdir`` to a PNG and returns its path.

    A run folder (``metrics.jsonl``) gets loss and metric panels (train, val, test) with the
    best validation step marked, and the learning rate. A ``flax-linoss reproduce`` folder
    (``seed_*/`` runs) gets each seed's validation curve with its best step marked.

    Args:
        workdir: Run or reproduction directory.
        out: PNG path; default ``workdir/curves.png``.

    Raises:
        FileNotFoundError: ``workdir`` holds neither a run's metrics nor seed runs.
        ValueError: the metrics file is empty.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"{workdir!r} does not exist")
    seeds = _seed_dirs(workdir)
    if not os.path.isfile(os.path.join(workdir, METRICS_FILE)) and not seeds:
        raise FileNotFoundError(
            f"{workdir!r} holds no {METRICS_FILE} (nor seed_* runs): is it the --workdir of a "
            "`flax-linoss train` or `reproduce` run?"
        )
    fig = _plot_seeds(plt, seeds) if seeds else _plot_one(plt, workdir)
    fig.suptitle(os.path.basename(os.path.abspath(workdir)))
    fig.tight_layout()
    out = out or os.path.join(workdir, "curves.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _series(records):
    series: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for r in records:
        for k, v in r.items():
            if k not in ("step", "split"):
                series[(r["split"], k)].append((r["step"], v))
    return {k: sorted(v) for k, v in series.items()}


def _plot_one(plt, workdir):
    records = read_metrics(workdir)
    if not records:
        raise ValueError(f"{workdir} has no metric records to plot")
    series = _series(records)
    names = sorted({k for _, k in series} - {"learning_rate"})
    metric_names = [n for n in names if n != "loss"]
    panels = ["loss", *metric_names] + (
        ["learning_rate"] if ("train", "learning_rate") in series else []
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, name in zip(axes[0], panels, strict=True):
        for split, (style, color) in SPLIT_STYLES.items():
            pts = series.get((split, name), [])
            if pts:
                ax.plot(
                    [p[0] for p in pts], [p[1] for p in pts], style, color=color, label=split, ms=3
                )
        val = series.get(("val", name))
        if val and name != "loss" and name != "learning_rate":
            step, value = _best(val, name != "mse", workdir)
            ax.axvline(step, color="gray", ls=":", lw=1)
            ax.plot([step], [value], "*", color="red", ms=12, label=f"best val (step {step})")
        ax.set_xlabel("step")
        ax.set_title(name)
        if name in ("loss", "mse"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def _plot_seeds(plt, seed_dirs):
    fig, ax = plt.subplots(1, 1, figsize=(7, 4))
    metric = None
    for d in seed_dirs:
        val = _series(read_metrics(d))
        keys = [k for (split, k) in val if split == "val" and k != "loss"]
        if not keys:
            continue
        metric = keys[0]
        pts = val[("val", metric)]
        (line,) = ax.plot(
            [p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label=os.path.basename(d)
        )
        step, value = _best(pts, metric != "mse", d)
        ax.plot([step], [value], "*", color=line.get_color(), ms=14)
    ax.set_xlabel("step")
    ax.set_title(f"validation {metric} per seed (star: best step)")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig
