"""Sequence mixers compared on the tasks the field uses: attention, LinOSS-IM, LinOSS-IMEX,
D-LinOSS and a hybrid, inside the same small transformer, on MQAR, selective copying and
induction heads at a short and a long sequence length.

Every run uses ``configs/mixers.py:<task>`` with only the mixer, the length and the batch
changed (the batch keeps the tokens per step fixed), equal width and depth, and the same
step budget. Writes ``benchmarks/MIXERS.md`` (and ``mixers.jsonl`` in the work folder, a
row per run as soon as it finishes; a rerun skips finished rows)::

    python benchmarks/bench_mixers.py                      # the table (under an hour, 2 CPUs)
    python benchmarks/bench_mixers.py --steps 40 --tasks mqar --lengths 32 --out /tmp/m.md

Columns: final test accuracy on the scored positions (and the same through cached decoding
on one batch), parameters, median step time, XLA's peak memory of the compiled train step.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
MIXERS = ("attention", "linoss-im", "linoss-imex", "d-linoss", "linoss-im,attention")
TASKS = ("mqar", "selective_copy", "induction")
TOKENS_PER_STEP = 2048


def _load_config(task: str):
    spec = importlib.util.spec_from_file_location("mixers_config", REPO / "configs" / "mixers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(task)


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _step_profile(s, state):
    """Median seconds of the train step over a few calls, and XLA's peak bytes."""
    import jax
    import numpy as np

    from flax_linoss.train import data as data_lib

    it = data_lib.train_iterator(s.config, s.splits["train"])
    batch = s.parallel.put_batch(data_lib.prepare_batch(s.config, next(it)))
    dstate = s.parallel.put_state(state)
    compiled = s.parallel.lower(dstate, batch).compile()
    mem = compiled.memory_analysis()
    peak = None
    if mem is not None:
        peak = sum(
            getattr(mem, k, 0) or 0
            for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
        )
    params = int(np.sum([x.size for x in jax.tree.leaves(state.params)]))
    times = []
    for _ in range(6):
        t = time.perf_counter()
        dstate, _ = jax.block_until_ready(compiled(dstate, batch))  # the state is donated
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:]), peak, params


def run_one(task, mixer, length, steps, workdir):
    from flax_linoss.train import trainer

    config = _load_config(task)
    config.model.mixer = mixer
    config.data.options.seq_len = length
    config.data.batch_size = max(1, TOKENS_PER_STEP // length)
    config.data.eval_batch_size = 64
    config.train.num_steps = steps
    config.train.eval_every = steps
    config.train.checkpoint_every = steps
    config.train.log_every = max(1, steps // 4)
    config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, steps // 10)
    config.train.tensorboard = False
    run_dir = os.path.join(workdir, f"{task}-L{length}-{mixer.replace(',', '+')}")
    res = trainer.train_and_evaluate(config, run_dir)
    s = trainer.setup(config)
    step_s, peak, params = _step_profile(s, trainer.create_train_state(s))
    test = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    final = [r for r in test if r["split"] == "test" and r["step"] == steps][-1]
    return {
        "task": task,
        "length": length,
        "mixer": mixer,
        "steps": steps,
        "batch": config.data.batch_size,
        "test_accuracy": final["accuracy"],
        "decode_accuracy": final.get("decode_accuracy"),
        "best_val": res["best_val"],
        "params": params,
        "step_ms": 1000 * step_s,
        "peak_mib": None if peak is None else peak / 2**20,
        "train_seconds": res["train_seconds"],
    }


def write_markdown(rows, path, command, tasks, lengths):
    lines = [
        "# Sequence mixers compared",
        "",
        f"Measured with `{command}` on {time.strftime('%Y-%m-%d')}.",
        "",
        f"**Machine:** {_cpu()}, {os.cpu_count()} CPUs, {platform.platform()}, jax "
        f"{__import__('jax').__version__} on CPU.",
        "",
        "Model: `configs/mixers.py` (a pre-norm decoder-only transformer, width 64, 2 blocks, "
        "MLP 256, learned positions, tied embeddings; LinOSS mixers with P = 64 oscillators; "
        f"AdamW, warmup and cosine decay); every run the same number of steps and "
        f"{TOKENS_PER_STEP} tokens per step (batch = {TOKENS_PER_STEP} / length). Accuracy is "
        "on the scored positions of the test split (chance: MQAR 1/128 of the values, "
        "selective copying 1/14, induction 1/15); `decode` is the same through the decoding "
        "caches, one token at a time, on one batch; step time is the median of the compiled "
        "train step; peak memory is XLA's account of it (arguments + outputs + temporaries).",
        "",
    ]
    for task in tasks:
        for length in lengths:
            sel = [r for r in rows if r["task"] == task and r["length"] == length]
            if not sel:
                continue
            lines += [
                f"## {task}, length {length} (batch {sel[0]['batch']}, {sel[0]['steps']} steps)",
                "",
                "| mixer | test accuracy | decode | parameters | step ms | peak MiB |",
                "|---|---|---|---|---|---|",
            ]
            for r in sel:
                dec = "-" if r["decode_accuracy"] is None else f"{r['decode_accuracy']:.3f}"
                peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
                lines.append(
                    f"| {r['mixer']} | {r['test_accuracy']:.3f} | {dec} | {r['params']:,} | "
                    f"{r['step_ms']:.1f} | {peak} |"
                )
            lines.append("")
    pathlib.Path(path).write_text("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--mixers", nargs="+", default=list(MIXERS))
    parser.add_argument("--lengths", nargs="+", type=int, default=[64, 512])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--workdir", default="runs/bench_mixers")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "MIXERS.md"))
    args = parser.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    log = os.path.join(args.workdir, "mixers.jsonl")
    done = {}
    if os.path.exists(log):
        for line in open(log):
            r = json.loads(line)
            done[(r["task"], r["length"], r["mixer"], r["steps"])] = r
    rows = []
    for task in args.tasks:
        for length in args.lengths:
            for mixer in args.mixers:
                key = (task, length, mixer, args.steps)
                if key not in done:
                    done[key] = run_one(task, mixer, length, args.steps, args.workdir)
                    with open(log, "a") as f:
                        f.write(json.dumps(done[key]) + "\n")
                r = done[key]
                rows.append(r)
                print(
                    f"{task:15s} L={length:<5d} {mixer:20s} test acc {r['test_accuracy']:.3f} "
                    f"| {r['step_ms']:.1f} ms/step",
                    flush=True,
                )
    command = "python benchmarks/bench_mixers.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    write_markdown(rows, args.out, command.strip(), args.tasks, args.lengths)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
