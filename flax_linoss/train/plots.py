"""Training and validation curves of a run, drawn from its ``metrics.jsonl``."""

from __future__ import annotations

import os
from collections import defaultdict

from flax_linoss.train.metrics import read_metrics

__all__ = ["plot_run"]


def plot_run(workdir: str, out: str | None = None) -> str:
    """Draws loss and metric curves (train, val, test) of the run in ``workdir`` to a PNG.

    Args:
        workdir: Run directory holding ``metrics.jsonl``.
        out: PNG path; default ``workdir/curves.png``.

    Returns:
        The PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    if not records:
        raise ValueError(f"{workdir} has no metric records to plot")
    series: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for r in records:
        for k, v in r.items():
            if k not in ("step", "split"):
                series[(r["split"], k)].append((r["step"], v))
    names = sorted({k for _, k in series})
    metric_names = [n for n in names if n != "loss"]
    panels = ["loss", *metric_names]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, name in zip(axes[0], panels, strict=True):
        for split, style in (("train", "-"), ("val", "o-"), ("test", "s--")):
            pts = sorted(series.get((split, name), []))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=split, ms=3)
        ax.set_xlabel("step")
        ax.set_title(name)
        if name in ("loss", "mse"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(os.path.basename(os.path.abspath(workdir)))
    fig.tight_layout()
    out = out or os.path.join(workdir, "curves.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
