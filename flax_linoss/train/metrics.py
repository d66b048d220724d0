"""Metric sinks: a JSONL file in the workdir, TensorBoard event files, a progress line.

Each JSONL line is one record ``{"step": int, "split": "train"|"val"|"test", <name>: float}``.
On resume, :meth:`MetricWriter.truncate` drops the records written after the restored step so
the file matches an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from typing import Any

__all__ = [
    "METRICS_FILE",
    "MetricWriter",
    "Progress",
    "StepCost",
    "format_duration",
    "read_metrics",
]

METRICS_FILE = "metrics.jsonl"


def _tensorboard_writer(logdir: str):
    """A TensorBoard event writer (``tensorboardX``, installed by the ``train`` extra; no
    TensorFlow), or ``None`` where it is not installed."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(logdir)


class MetricWriter:
    """Appends metric records to ``workdir/metrics.jsonl`` and writes TensorBoard events.

    Args:
        workdir: Run directory.
        enabled: Write at all (only process 0 writes in a multi-process run).
        tensorboard: Also write TensorBoard event files under ``workdir/tensorboard``
            (``tensorboard --logdir WORKDIR/tensorboard``).
        hparams: Hyperparameters to record once (TensorBoard's hparams and text views), as
            flax's lm1b example does.
    """

    def __init__(
        self,
        workdir: str,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        hparams: Mapping[str, Any] | None = None,
    ):
        self.path = os.path.join(workdir, METRICS_FILE)
        self.enabled = enabled
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            if tensorboard:
                self._tb = _tensorboard_writer(os.path.join(workdir, "tensorboard"))
                if self._tb is None:
                    logging.warning(
                        "train.tensorboard is on but tensorboardX is not installed "
                        "(pip install 'flax-linoss[train]'); writing metrics.jsonl only."
                    )
            if self._tb is not None and hparams:
                self._write_hparams(hparams)

    def _write_hparams(self, hparams: Mapping[str, Any]) -> None:
        flat = {
            k: v if isinstance(v, int | float | str | bool) else json.dumps(v, default=str)
            for k, v in hparams.items()
        }
        from tensorboardX.summary import hparams as hparams_summaries

        self._tb.add_text("hparams", json.dumps(flat, indent=1, default=str), 0)
        # In this run's own event file (SummaryWriter.add_hparams would start a sub-run).
        for summary in hparams_summaries(flat, {}):
            self._tb.file_writer.add_summary(summary)
        self._tb.flush()

    def truncate(self, step: int) -> None:
        """Keeps only the records with ``record["step"] <= step`` (resume)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        keep = [r for r in read_metrics(self.path) if r["step"] <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for r in keep:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)

    def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        """Appends one record."""
        if not self.enabled:
            return
        rec = {"step": int(step), "split": split}
        rec.update({k: float(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"{split}/{k}", float(v), int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file (or of ``DIR/metrics.jsonl`` for a directory).

    A truncated last line (a run killed while writing) is skipped.
    """
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def format_duration(seconds: float) -> str:
    """``"1h02m"``, ``"3m05s"`` or ``"12s"``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Progress:
    """Steps/s and ETA for the periodic progress line.

    The rate is measured over the steps since the previous line, so compilation (in the first
    interval) does not distort later lines.
    """

    def __init__(self, start_step: int, total_steps: int):
        self.total = total_steps
        self._last_step = start_step
        self._last_time = time.perf_counter()

    def restart(self, step: int) -> None:
        """Starts a new interval at ``step`` (after an evaluation or a save)."""
        self._last_step = step
        self._last_time = time.perf_counter()

    def line(self, step: int, metrics: Mapping[str, float]) -> str:
        now = time.perf_counter()
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        width = len(str(self.total))
        parts = [f"step {step:>{width}}/{self.total}"]
        parts += [f"{k} {v:.4g}" for k, v in metrics.items()]
        if rate >= 1 or rate <= 0:
            speed = f"{rate:.1f} steps/s"
        else:  # slow steps: "0.1 steps/s" would hide the rate
            speed = f"{1 / rate:.2f} s/step"
        parts += [speed, f"ETA {format_duration(eta)}"]
        return " | ".join(parts)


class StepCost:
    """What a training step costs here, said once early in a long run.

    The first step of a session compiles, so the cost is measured over the next ``steps``
    steps (from the host's view: each step's metrics are read when it is done). If the steps
    left would take longer than ``long_after`` seconds, :meth:`observe` returns one line
    with the cost and the time left, and on a CPU that the papers' protocol wants an
    accelerator and how to cut the budget; else ``None``.
    """

    def __init__(
        self,
        start_step: int,
        total_steps: int,
        *,
        platform: str = "cpu",
        steps: int = 3,
        long_after: float = 600.0,
    ):
        self.total, self.platform, self.steps, self.long_after = (
            total_steps,
            platform,
            steps,
            long_after,
        )
        self._first = start_step + 1  # the step that compiles
        self._start: tuple[int, float] | None = None
        self.seconds_per_step: float | None = None

    def observe(self, step: int) -> str | None:
        """Call when ``step``'s metrics are on the host; returns the line to print, once."""
        if self.seconds_per_step is not None or step < self._first:
            return None
        now = time.perf_counter()
        if self._start is None:
            self._start = (step, now)
            return None
        first, t0 = self._start
        if step - first < self.steps:
            return None
        self.seconds_per_step = (now - t0) / (step - first)
        left = (self.total - step) * self.seconds_per_step
        if left < self.long_after:
            return None
        line = (
            f"a step takes {self.seconds_per_step:.2f} s here ({self.platform}, steps "
            f"{first + 1}-{step}): the {self.total - step:,} steps left would take "
            f"{format_duration(left)}"
        )
        if self.platform == "cpu":
            line += (
                "; the papers' protocol (up to 100,000 steps) wants an accelerator. To try it "
                "here, cut the budget: --config.train.num_steps=N (reproduce: --max_steps=N "
                "--eval_every=N)"
            )
        return line
