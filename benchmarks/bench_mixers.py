"""Sequence mixers compared on the tasks the field uses: attention, the LinOSS mixers' blocks
(outer-product, the papers' plain block, the selective plain block), LinOSS-IMEX, D-LinOSS
and a hybrid, inside the same small transformer, on MQAR, selective copying and induction
heads at a short and a long sequence length.

A mixer is a ``model.mixer`` value, optionally with ``:block`` (``model.mixer_block``:
``outer``, ``plain`` or ``selective``), e.g. ``linoss-im:plain``. Every run uses
``configs/mixers.py:<task>`` with only the mixer, the length, the batch (it keeps the tokens
per step fixed) and the seed changed, equal width and depth, and the same step budget per
length. Writes ``benchmarks/MIXERS.md`` (and ``mixers.jsonl`` in the work folder, a
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

from flax_linoss.train.reproduce import cpu_name

REPO = pathlib.Path(__file__).resolve().parents[1]
MIXERS = (
    "attention",
    "linoss-im",
    "linoss-im:plain",
    "linoss-im:selective",
    "linoss-im:outer_selective",
    "linoss-imex",
    "d-linoss",
    "linoss-im,attention",
)
#: The rows that choose the registered default block (run with every seed of ``--seeds``).
DECIDING = ("linoss-im", "linoss-im:plain", "linoss-im:outer_selective")
TASKS = ("mqar", "selective_copy", "induction")
TOKENS_PER_STEP = 2048


def _load_config(task: str):
    spec = importlib.util.spec_from_file_location("mixers_config", REPO / "configs" / "mixers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(task)


class _CompiledStep:
    """A setup's compiled train step with its state and a batch, timed call by call."""

    def __init__(self, s, state):
        import jax
        import numpy as np

        from flax_linoss.train import data as data_lib

        it = data_lib.train_iterator(s.config, s.splits["train"])
        self.batch = s.parallel.put_batch(data_lib.prepare_batch(s.config, next(it)))
        self.state = s.parallel.put_state(state)
        self.compiled = s.parallel.lower(self.state, self.batch).compile()
        mem = self.compiled.memory_analysis()
        self.peak = None
        if mem is not None:
            self.peak = sum(
                getattr(mem, k, 0) or 0
                for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
            )
        self.params = int(np.sum([x.size for x in jax.tree.leaves(state.params)]))
        self.times: list[float] = []
        self.call()  # warm-up, not counted
        self.times.clear()

    def call(self, calls: int = 1) -> None:
        import jax

        for _ in range(calls):
            t = time.perf_counter()
            # The state is donated: keep the one the step returns.
            self.state, _ = jax.block_until_ready(self.compiled(self.state, self.batch))
            self.times.append(time.perf_counter() - t)


def _step_profile(s, state):
    """Median seconds of the train step over a few calls, and XLA's peak bytes."""
    step = _CompiledStep(s, state)
    step.call(5)
    return statistics.median(step.times), step.peak, step.params


def row_seeds(mixer: str, first_length: bool, seeds: list[int]) -> list[int]:
    """The seeds a row runs: all of them for the mixers that decide the defaults
    (``DECIDING``) at the first length, the first one otherwise."""
    return list(seeds) if (first_length and mixer in DECIDING) else list(seeds[:1])


def split_mixer(mixer: str) -> tuple[str, str]:
    """``"name[:block]"`` -> ``(model.mixer, model.mixer_block)`` (default ``outer``)."""
    name, _, block = mixer.partition(":")
    return name, block or "outer"


def _row_config(task: str, mixer: str, length: int):
    """The task's config with ``mixer`` at ``length`` and ``TOKENS_PER_STEP`` per step."""
    config = _load_config(task)
    config.model.mixer, config.model.mixer_block = split_mixer(mixer)
    config.data.options.seq_len = length
    config.data.batch_size = max(1, TOKENS_PER_STEP // length)
    return config


def run_one(task, mixer, length, steps, workdir, seed=0):
    from flax_linoss.train import trainer

    config = _row_config(task, mixer, length)
    config.seed = seed
    config.data.eval_batch_size = 64
    config.train.num_steps = steps
    config.train.eval_every = steps
    config.train.checkpoint_every = steps
    config.train.log_every = max(1, steps // 4)
    config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, steps // 10)
    config.train.tensorboard = False
    name = mixer.replace(",", "+").replace(":", "-")
    run_dir = os.path.join(workdir, f"{task}-L{length}-{name}-s{seed}")
    s = trainer.setup(config)
    res = trainer.train_and_evaluate(config, run_dir, prepared=s)
    step_s, peak, params = _step_profile(s, trainer.create_train_state(s))  # the same program
    test = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    final = [r for r in test if r["split"] == "test" and r["step"] == steps][-1]
    return {
        "task": task,
        "length": length,
        "mixer": mixer,
        "seed": seed,
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


#: The cost table's timing: rounds over the mixers, calls of each step per round.
COST_ROUNDS, COST_CALLS = 8, 3


def step_costs(
    mixers, length: int, task: str = "mqar", rounds: int = COST_ROUNDS, calls: int = COST_CALLS
):
    """The compiled train step of each of ``mixers`` at ``length`` (same tokens per step, no
    training): median milliseconds and XLA's peak MiB. Every step is compiled first, then
    timed in ``rounds`` rounds of ``calls`` calls each, the mixers in turn, so that a slower
    spell of a shared machine falls on all of them rather than on one."""
    from flax_linoss.train import trainer

    steps = {}
    for mixer in mixers:
        config = _row_config(task, mixer, length)
        config.data.options.num_train = 4 * config.data.batch_size
        s = trainer.setup(config)
        steps[mixer] = _CompiledStep(s, trainer.create_train_state(s))
    for _ in range(rounds):
        for step in steps.values():
            step.call(calls)
    rows = []
    for mixer, step in steps.items():
        row = {"mixer": mixer, "length": length, "params": step.params}
        row["step_ms"] = 1000 * statistics.median(step.times)
        row["peak_mib"] = None if step.peak is None else step.peak / 2**20
        print(f"cost {mixer:22s} L={length}: {row['step_ms']:.1f} ms/step", flush=True)
        rows.append(row)
    return rows


def _cost_markdown(rows) -> list[str]:
    if not rows:
        return []
    plain = {r["length"]: r["step_ms"] for r in rows if r["mixer"] == "linoss-im:plain"}
    lines = [
        f"## Train-step cost at length {rows[0]['length']}",
        "",
        "The compiled train step alone (same model, batch and tokens per step as the tables "
        "above; every step compiled and warmed up first, then the median of "
        f"{COST_ROUNDS * COST_CALLS} calls each, taken in {COST_ROUNDS} rounds of {COST_CALLS} "
        "calls over the mixers in turn, on the machine to itself), and its cost relative to "
        "the papers' plain block.",
        "",
        "| mixer | step ms | x plain | peak MiB | parameters |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        rel = plain.get(r["length"])
        ratio = "-" if not rel else f"{r['step_ms'] / rel:.2f}"
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(f"| {r['mixer']} | {r['step_ms']:.1f} | {ratio} | {peak} | {r['params']:,} |")
    return [*lines, ""]


def decode_speed(mixer: str, context: int, *, width=64, layers=2, batch=1, tokens=32):
    """Generation cost of ``mixer`` in the benchmark's transformer (random weights) with
    ``context`` tokens already in the caches: median seconds per generated token through the
    decoding path the trainer's ``decode`` uses (``TransformerLM(token, decode=True)`` with
    ``init_cache``), and the bytes of the decoding caches. Attention's cost is set by its
    cache's size (flax's decoding attends over every slot, masking the empty ones), so the
    caches are made for ``context + tokens`` steps and the position is set to ``context``."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from flax_linoss.mixers.base import BLOCK_CHOICES
    from flax_linoss.models import TransformerLM

    name, block = split_mixer(mixer)
    options = {"state_size": width, **BLOCK_CHOICES[block]}
    model = TransformerLM(
        256,
        layers,
        width,
        mixer=name,
        num_heads=4,
        positional="none",
        max_len=context + tokens,
        mixer_options=options,
        rngs=nnx.Rngs(0),
    )
    model.init_cache(batch, context + tokens)
    for name, var in nnx.to_flat_state(nnx.state(model, nnx.Cache)):
        if name[-1] == "cache_index" or name[-1] == "position":
            var[...] = jnp.full_like(var[...], context)
    cache_bytes = sum(
        x.size * x.dtype.itemsize
        for x in jax.tree.leaves(nnx.state(model, nnx.Cache))
        if x.ndim > 1  # the state or the keys and values (not counters)
    )
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, token):
        m = nnx.merge(graphdef, state)
        logits = m(token, decode=True, deterministic=True)
        return nnx.state(m), logits

    token = jnp.ones((batch, 1), jnp.int32)
    state, logits = jax.block_until_ready(step(state, token))  # compile
    times = []
    for _ in range(tokens - 1):
        t = time.perf_counter()
        state, logits = jax.block_until_ready(step(state, token))
        times.append(time.perf_counter() - t)
    assert np.isfinite(np.asarray(logits)).all()
    return statistics.median(times), cache_bytes


def decode_table(mixers, contexts) -> list[dict]:
    rows = []
    for context in contexts:
        for mixer in mixers:
            seconds, nbytes = decode_speed(mixer, context)
            rows.append(
                {
                    "mixer": mixer,
                    "context": context,
                    "ms_per_token": 1000 * seconds,
                    "cache_mib": nbytes / 2**20,
                }
            )
            print(
                f"decode {mixer:24s} context {context:6d}: {1000 * seconds:7.2f} ms/token, "
                f"cache {nbytes / 2**20:8.3f} MiB",
                flush=True,
            )
    return rows


def _decode_markdown(rows) -> list[str]:
    if not rows:
        return []
    lines = [
        "## Generation cost: time per token and decoding-cache memory",
        "",
        "The same transformer (width 64, 2 blocks, batch 1, random weights), generating one "
        "token at a time through the caches (`init_cache`, then `model(token, decode=True)`, "
        "the path the trainer's decode accuracy uses) with `context` tokens already cached. "
        "A LinOSS mixer keeps a fixed-size state; attention keeps keys and values for every "
        "cached position and attends over all of them.",
        "",
        "| mixer | context | ms per token | decoding cache MiB |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mixer']} | {r['context']:,} | {r['ms_per_token']:.2f} | {r['cache_mib']:.3f} |"
        )
    return [*lines, ""]


#: The hand-written reading of the tables; a rerun keeps it (see :func:`kept_analysis`).
ANALYSIS = "## What the numbers say"


def kept_analysis(path) -> list[str]:
    """The ``ANALYSIS`` section of the file at ``path`` (its lines up to the next ``## ``
    heading), or none: the tables are regenerated, the reading of them is written by hand."""
    p = pathlib.Path(path)
    if not p.exists():
        return []
    lines = p.read_text().splitlines()
    if ANALYSIS not in lines:
        return []
    start = lines.index(ANALYSIS)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


def write_markdown(rows, path, command, tasks, lengths, decode_rows=(), cost_rows=()):
    analysis = kept_analysis(path)
    lines = [
        "# Sequence mixers compared",
        "",
        f"Measured with `{command}` on {time.strftime('%Y-%m-%d')}.",
        "",
        f"**Machine:** {cpu_name()}, {os.cpu_count()} CPUs, {platform.platform()}, jax "
        f"{__import__('jax').__version__} on CPU.",
        "",
        "Model: `configs/mixers.py` (a pre-norm decoder-only transformer, width 64, 2 blocks, "
        "MLP 256, learned positions, tied embeddings; LinOSS mixers: `name` is the outer "
        "block (4 heads of 16 x 16 oscillators, convolution width 4, SiLU gate), `:plain` "
        "the papers' block and `:selective` the plain block with input-dependent step sizes, "
        "each with P = 64 oscillators, `:outer_selective` the outer block with input-dependent "
        "step sizes; "
        f"AdamW, warmup and cosine decay); every run the same number of steps and "
        f"{TOKENS_PER_STEP} tokens per step (batch = {TOKENS_PER_STEP} / length). Accuracy is "
        "on the scored positions of the test split (chance: MQAR 1/128 of the values, "
        "selective copying 1/14, induction 1/15); `decode` is the same through the decoding "
        "caches, one token at a time, on one batch; step time is the median of the compiled "
        "train step; peak memory is XLA's account of it (arguments + outputs + temporaries).",
        "",
        *analysis,
    ]
    for task in tasks:
        for length in lengths:
            sel = [r for r in rows if r["task"] == task and r["length"] == length]
            if not sel:
                continue
            lines += [
                f"## {task}, length {length} (batch {sel[0]['batch']}, {sel[0]['steps']} steps)",
                "",
                "| mixer | test accuracy (per seed) | decode | parameters | step ms | peak MiB |",
                "|---|---|---|---|---|---|",
            ]
            for mixer in dict.fromkeys(r["mixer"] for r in sel):
                runs = [r for r in sel if r["mixer"] == mixer]
                acc = " / ".join(f"{r['test_accuracy']:.3f}" for r in runs)
                dec = " / ".join(
                    "-" if r["decode_accuracy"] is None else f"{r['decode_accuracy']:.3f}"
                    for r in runs
                )
                r = runs[0]
                peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
                lines.append(
                    f"| {mixer} | {acc} | {dec} | {r['params']:,} | "
                    f"{statistics.median(x['step_ms'] for x in runs):.1f} | {peak} |"
                )
            lines.append("")
    lines += _cost_markdown(list(cost_rows))
    lines += _decode_markdown(list(decode_rows))
    pathlib.Path(path).write_text("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--mixers", nargs="+", default=list(MIXERS))
    parser.add_argument("--lengths", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--steps", type=int, default=800, help="budget at the first length")
    parser.add_argument("--long-steps", type=int, default=1200, help="budget at the other lengths")
    parser.add_argument(
        "--long-mixers",
        nargs="+",
        default=[
            "attention",
            "linoss-im",
            "linoss-im:plain",
            "linoss-im:outer_selective",
            "linoss-im,attention",
        ],
        help="the mixers run at the other lengths",
    )
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[0, 1], help="seeds of the deciding rows"
    )
    parser.add_argument("--workdir", default="runs/bench_mixers")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "MIXERS.md"))
    parser.add_argument(
        "--decode-contexts",
        nargs="*",
        type=int,
        default=[1024, 8192],
        help="context lengths of the generation-cost table (none: skip it)",
    )
    parser.add_argument(
        "--cost-length",
        type=int,
        default=512,
        help="length of the train-step cost table (0: skip it)",
    )
    args = parser.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    log = os.path.join(args.workdir, "mixers.jsonl")
    done = {}
    if os.path.exists(log):
        for line in open(log):
            r = json.loads(line)
            done[(r["task"], r["length"], r["mixer"], r["steps"], r.get("seed", 0))] = r
    rows = []
    for task in args.tasks:
        for i, length in enumerate(args.lengths):
            steps = args.steps if i == 0 else args.long_steps
            for mixer in args.mixers if i == 0 else args.long_mixers:
                seeds = row_seeds(mixer, i == 0, args.seeds)
                for seed in seeds:
                    key = (task, length, mixer, steps, seed)
                    if key not in done:
                        done[key] = run_one(task, mixer, length, steps, args.workdir, seed)
                        with open(log, "a") as f:
                            f.write(json.dumps(done[key]) + "\n")
                    r = done[key]
                    rows.append(r)
                    print(
                        f"{task:15s} L={length:<5d} {mixer:22s} seed {seed} test acc "
                        f"{r['test_accuracy']:.3f} | {r['step_ms']:.1f} ms/step",
                        flush=True,
                    )
    command = "python benchmarks/bench_mixers.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    decode_rows = decode_table(
        [m for m in ("attention", "linoss-im", "linoss-im:plain") if m in args.mixers],
        args.decode_contexts,
    )
    cost_rows = []
    if args.cost_length:
        blocks = (
            "attention",
            "linoss-im:plain",
            "linoss-im",
            "linoss-im:selective",
            "linoss-im:outer_selective",
        )
        cost_rows = step_costs([m for m in blocks if m in args.mixers], args.cost_length)
    write_markdown(
        rows, args.out, command.strip(), args.tasks, args.lengths, decode_rows, cost_rows
    )
    print(f"wrote {args.out}")
    return {"rows": rows, "decode": decode_rows, "cost": cost_rows}


if __name__ == "__main__":
    main()
