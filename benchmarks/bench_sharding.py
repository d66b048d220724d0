"""Whole-run agreement of a sharded run with one device: the logged training losses of the
issue's runs (the mixers' MQAR task on 8 fake CPU devices with fsdp=2, model=2, data=2; the
built-in default with the length split over 2 devices) against the same runs on one device,
in float32 and in float64, step window by step window.

Writes ``benchmarks/SHARDING.md`` (and keeps each run's folder under ``--workdir``; a rerun
reuses finished runs)::

    python benchmarks/bench_sharding.py                    # about 25 minutes on 2 CPUs
    python benchmarks/bench_sharding.py --cases mqar-linoss --steps 300 --out /tmp/s.md

The two runs of a case start from the same parameters and see the same batches; they differ
only in the order of float additions (the partial sums of the sharded matmuls and of the
gradient's batch reduction). The table shows how far that rounding difference grows.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import time
from typing import NamedTuple

from flax_linoss.train.metrics import read_metrics
from flax_linoss.train.reproduce import cpu_name

REPO = pathlib.Path(__file__).resolve().parents[1]


class Case(NamedTuple):
    """A run compared on one device and sharded."""

    label: str  # the table's name for it
    flags: tuple[str, ...]  # ``flax-linoss train`` flags of both runs
    sharding: tuple[str, ...]  # the sharded run's flags
    devices: int  # fake CPU devices of the sharded run


_MQAR = "--config=configs/mixers.py:mqar"
_FSDP_MODEL = ("--config.parallel.fsdp_axis_size=2", "--config.parallel.model_axis_size=2")
CASES = {
    "mqar-hybrid": Case(
        "mqar, `linoss-im,attention`",
        (_MQAR, "--config.model.mixer=linoss-im,attention"),
        _FSDP_MODEL,
        8,
    ),
    "mqar-linoss": Case(
        "mqar, `linoss-im`", (_MQAR, "--config.model.mixer=linoss-im"), _FSDP_MODEL, 8
    ),
    "default-seq": Case(
        "built-in default",
        (),
        ("--config.parallel.num_devices=2", "--config.parallel.sequence_axis_size=2"),
        2,
    ),
}
PRECISIONS = ("float32", "float64")
FLOAT64 = ("--config.model.dtype=float64", "--config.model.param_dtype=float64", "--jax_enable_x64")
#: Step windows of the table: (first, last) logged step, inclusive.
WINDOWS = ((1, 100), (101, 200), (201, 300), (301, 500), (501, 1000), (1001, 10**9))
#: The issue's tolerance on the logged losses.
TOLERANCE = 1e-3
MEMORY = re.compile(r"memory: params\+optimizer ([\d.]+) MiB per device of ([\d.]+) MiB total")


def command(case: Case, precision: str, steps: int | None, sharded: bool, workdir: str):
    """The ``flax-linoss train`` command line of one run (``steps``: the config's budget if
    ``None``)."""
    cmd = [sys.executable, "-m", "flax_linoss", "train", *case.flags]
    cmd += ["--config.train.log_every=10", "--config.train.eval_every=0"]
    cmd += ["--config.train.checkpoint_every=0", f"--workdir={workdir}"]
    if steps is not None:
        cmd.append(f"--config.train.num_steps={steps}")
    if precision == "float64":
        cmd += FLOAT64
    return cmd + list(case.sharding if sharded else ())


def run(name: str, precision: str, steps: int | None, sharded: bool, workdir: str) -> dict:
    """Trains one run of case ``name`` (or reads it back, finished by an earlier call): its
    logged losses, its memory line, its test metric."""
    case = CASES[name]
    budget = "" if steps is None else f"-{steps}"
    folder = os.path.join(workdir, f"{name}-{precision}{budget}-{'sharded' if sharded else 'one'}")
    summary = pathlib.Path(folder, "bench_sharding.json")
    if summary.exists():
        out = json.loads(summary.read_text())
        return {**out, "losses": {int(k): v for k, v in out["losses"].items()}}
    env = dict(os.environ)
    if sharded:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={case.devices}"
    t0 = time.perf_counter()
    proc = subprocess.run(
        command(case, precision, steps, sharded, folder),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise RuntimeError(f"{' '.join(proc.args)} failed:\n{proc.stderr[-3000:]}")
    memory = MEMORY.search(proc.stdout + proc.stderr)
    losses = {
        int(r["step"]): float(r["loss"])
        for r in read_metrics(folder)
        if r["split"] == "train" and "loss" in r
    }
    results = json.loads(pathlib.Path(folder, "results.json").read_text())
    out = {
        "losses": losses,
        "memory": None if memory is None else (float(memory[1]), float(memory[2])),
        "test": results["test_at_best_val"],
        "seconds": time.perf_counter() - t0,
    }
    summary.write_text(json.dumps(out))
    return out


def agreement(a: dict[int, float], b: dict[int, float], windows=WINDOWS) -> list[float | None]:
    """The largest relative difference ``|a - b| / |b|`` of the losses logged at the same
    steps, in each window (``None``: no step logged in it).

    Raises:
        ValueError: ``a`` and ``b`` were logged at different steps.
    """
    if a.keys() != b.keys():
        raise ValueError(f"the runs logged different steps: {sorted(a.keys() ^ b.keys())[:5]}")
    out = []
    for first, last in windows:
        rel = [abs(a[s] - b[s]) / abs(b[s]) for s in a if first <= s <= last]
        out.append(max(rel) if rel else None)
    return out


def held_through(a: dict[int, float], b: dict[int, float], tolerance=TOLERANCE) -> int:
    """The last logged step up to which every logged loss agreed within ``tolerance``."""
    last = 0
    for step in sorted(b):
        if abs(a[step] - b[step]) > tolerance * abs(b[step]):
            break
        last = step
    return last


def markdown(rows: list[dict], cmd: str) -> str:
    """The page: one row per (case, precision)."""
    steps = max(r["steps"] for r in rows)
    windows = [w for w in WINDOWS if w[0] <= steps]
    head = " | ".join(f"steps {first}-{min(last, steps)}" for first, last in windows)
    lines = [
        "# A sharded run against one device, over a whole run",
        "",
        f"Measured with `{cmd}` on {time.strftime('%Y-%m-%d')}.",
        "",
        f"**Machine:** {cpu_name()}, {os.cpu_count()} CPUs, {platform.platform()}, jax "
        f"{__import__('jax').__version__} on CPU; the sharded runs on fake CPU devices "
        "(`XLA_FLAGS=--xla_force_host_platform_device_count=N`).",
        "",
        "Each case is `flax-linoss train` with its flags, the loss logged every 10 steps, once "
        "on one device and once sharded:",
        "",
    ]
    for name in dict.fromkeys(r["case"] for r in rows):
        case = CASES[name]
        flags = " ".join(case.flags) or "(no flags)"
        lines.append(
            f"- **{case.label}**: `{flags}`, sharded with `{' '.join(case.sharding)}` on "
            f"{case.devices} devices."
        )
    lines += [
        "",
        "Each window's cell is the largest relative difference of the two runs' logged "
        f"training losses in it; *within {TOLERANCE:g} through* is the last logged step up to "
        f"which every logged loss agreed to relative {TOLERANCE:g}. float64: `{' '.join(FLOAT64)}` "
        "(Flax's attention still takes its softmax in float32).",
        "",
        f"| case | dtype | {head} | whole run | within {TOLERANCE:g} through | "
        "test metric (one / sharded) | memory line X/Y |",
        "|---|---|" + "---|" * (len(windows) + 4),
    ]
    for r in rows:
        cells = ["-" if x is None else f"{x:.1e}" for x in r["windows"][: len(windows)]]
        worst = max(x for x in r["windows"] if x is not None)
        mem = r["memory"]
        ratio = "-" if mem is None else f"{mem[0] / mem[1]:.3f} ({mem[0]:.3f} / {mem[1]:.3f} MiB)"
        lines.append(
            f"| {CASES[r['case']].label} | {r['precision']} | {' | '.join(cells)} | "
            f"{worst:.1e} | step {r['held']} of {r['steps']} | "
            f"{r['test'][0]:.3f} / {r['test'][1]:.3f} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--steps", type=int, default=None, help="default: each config's budget")
    parser.add_argument("--workdir", default="runs/bench_sharding")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "SHARDING.md"))
    args = parser.parse_args(argv)
    workdir = os.path.abspath(args.workdir)
    rows = []
    for name in args.cases:
        for precision in args.precisions:
            one, sharded = (run(name, precision, args.steps, s, workdir) for s in (False, True))
            row = {
                "case": name,
                "precision": precision,
                "windows": agreement(sharded["losses"], one["losses"]),
                "held": held_through(sharded["losses"], one["losses"]),
                "steps": max(one["losses"]),
                "memory": sharded["memory"],
                "test": (one["test"], sharded["test"]),
            }
            rows.append(row)
            print(
                f"{name:12s} {precision}: largest relative loss difference by window "
                + " ".join("-" if x is None else f"{x:.1e}" for x in row["windows"])
                + f"; within {TOLERANCE:g} through step {row['held']}",
                flush=True,
            )
    cmd = "python benchmarks/bench_sharding.py " + " ".join(sys.argv[1:] if argv is None else argv)
    pathlib.Path(args.out).write_text(markdown(rows, cmd.strip()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
