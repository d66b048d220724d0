"""Speed and memory of every scan path against the papers' published algorithm.

Prints, for each discretisation and length, the median forward and forward+backward time
(after a warm-up call) and the peak memory of the compiled program, for every scan path of
``flax_linoss.ops.linoss_apply`` and for the baseline in ``paper_baseline.py`` (a vmapped
associative scan over per-step materialised ``[4P]`` transitions and ``[2P]`` complex
forcing), then our speed-up and memory ratio against that baseline. It also times one full
training step (Adam, batch norm, dropout) of the papers' SelfRegulationSCP1 model.

Run:  python benchmarks/bench_scan.py            (the full table: 20-30 min on 2 CPU cores)
      python benchmarks/bench_scan.py --quick    (a small smoke run)
      python benchmarks/bench_scan.py --time-varying   (the cost of a time-varying dt: each
          path with dt [P] against dt [B, L, P], and the nnx LinOSSLayer time-invariant against
          with timestamps and selective=True)

``--clock process`` times the CPU seconds the process spends (``time.process_time``) instead
of wall time: on a shared machine it is far less disturbed by other jobs. Run it single-
threaded so that it counts work, not threads waiting::

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
        taskset -c 1 python benchmarks/bench_scan.py --clock process ...

"Peak memory" is XLA's own account of the compiled program (arguments + outputs + temporaries
- aliased), the same on every run; it is what the program needs at its high-water mark.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from paper_baseline import paper_linoss_apply

from flax_linoss import ops
from flax_linoss.ops import _project

BASELINE = "paper"
# Not a scan: the layer's two projections and feed-through with the recurrence left out, i.e.
# the cost every path pays. Its six matmuls (forward + backward) bound what any scan can reach.
FLOOR = "projections-only"


def _projections_only(u, a, dt, b, c, d, g):
    """The layer's own projection code (``linoss_apply`` minus the recurrence)."""
    del a, dt, g
    v = _project.project_in(u, b, u.dtype)
    return _project.project_out(v, c, d, u, u.dtype)


def _peak_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - (m.alias_size_in_bytes)
    )


# The clock of _measure: time.perf_counter (wall) or time.process_time (--clock process).
CLOCK = {"now": time.perf_counter}


def _measure(fn, args, repeats: int) -> tuple[float, int]:
    """Median seconds of ``repeats`` calls after one warm-up, and peak bytes."""
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    now = CLOCK["now"]
    times = []
    for _ in range(repeats):
        start = now()
        jax.block_until_ready(compiled(*args))
        times.append(now() - start)
    return statistics.median(times), _peak_bytes(compiled)


def _timed(apply, args, grad, grad_args, repeats: int, label: str) -> dict:
    """Forward (``apply(*args)``) and forward+backward (``grad(*grad_args)``): median
    seconds and the larger peak; prints a progress line."""
    fwd_t, fwd_m = _measure(apply, args, repeats)
    bwd_t, bwd_m = _measure(grad, grad_args, repeats)
    print(f"  .. {label} fwd+bwd {bwd_t * 1e3:9.1f} ms", file=sys.stderr, flush=True)
    return dict(fwd=fwd_t, fwdbwd=bwd_t, mem=max(fwd_m, bwd_m))


def _problem(batch, length, features, num_osc, disc, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    a = jax.random.uniform(ks[0], (num_osc,))
    dt = jax.nn.sigmoid(jax.random.uniform(ks[1], (num_osc,)))
    g = jax.random.uniform(ks[2], (num_osc,)) * 0.2 if disc == "damped" else None
    b = ops.complex_uniform_init()(ks[3], (num_osc, features, 2))
    c = ops.complex_uniform_init()(ks[4], (features, num_osc, 2))
    d = jax.random.normal(ks[5], (features,))
    u = jax.random.normal(ks[6], (batch, length, features))
    ct = jax.random.normal(ks[7], (batch, length, features))
    return u, a, dt, b, c, d, g, ct


def bench_layer(disc, length, scans, repeats, batch=16, features=128, num_osc=128):
    u, a, dt, b, c, d, g, ct = _problem(batch, length, features, num_osc, disc)
    rows = []
    for scan in scans:
        if scan == BASELINE:
            apply = lambda u, a, dt, b, c, d, g: paper_linoss_apply(
                u, a, dt, b, c, d, g=g, discretization=disc
            )
        elif scan == FLOOR:
            apply = _projections_only
        else:
            apply = lambda u, a, dt, b, c, d, g, scan=scan: ops.linoss_apply(
                u, a, dt, b, c, d, g=g, discretization=disc, scan=scan, check=False
            )
        argnums = (0, 1, 2, 3, 4, 5) + ((6,) if g is not None else ())
        # The cotangent is an argument (a closure constant would be constant-folded).
        grad = jax.grad(lambda *p, apply=apply: jnp.sum(p[-1] * apply(*p[:-1])), argnums=argnums)
        args = (u, a, dt, b, c, d, g)
        row = _timed(apply, args, grad, (*args, ct), repeats, f"{disc:6s} L={length:6d} {scan:11s}")
        rows.append(dict(scan=scan, **row))
    return rows


def bench_time_varying(disc, length, scans, repeats, batch=16, features=128, num_osc=128):
    """Each path with ``dt [P]`` and with a per-step ``dt [B, L, P]`` (the coefficients then
    stream per step, and the backward writes each step's gradient): forward and
    forward+backward (the gradient of every input, ``d/d dt[t]`` included)."""
    u, a, dt, b, c, d, g, ct = _problem(batch, length, features, num_osc, disc)
    steps = dt * jax.random.uniform(jax.random.PRNGKey(9), (batch, length, num_osc), minval=0.5)
    steps = ops.clamp_steps(disc, a, steps, g)
    rows = []
    for scan in scans:
        if not ops.SCAN_TABLE[ops.Scan(scan)].time_varying:
            continue
        apply = lambda u, a, dt, b, c, d, g, scan=scan: ops.linoss_apply(
            u, a, dt, b, c, d, g=g, discretization=disc, scan=scan, check=False
        )
        argnums = (0, 1, 2, 3, 4, 5) + ((6,) if g is not None else ())
        grad = jax.grad(lambda *p, apply=apply: jnp.sum(p[-1] * apply(*p[:-1])), argnums=argnums)
        for kind, x in (("[P]", dt), ("[B, L, P]", steps)):
            args = (u, a, x, b, c, d, g)
            label = f"{disc:6s} L={length:6d} {scan:11s} dt {kind:9s}"
            rows.append(
                dict(scan=scan, dt=kind, **_timed(apply, args, grad, (*args, ct), repeats, label))
            )
    return rows


def bench_layers(disc, length, repeats, batch=16, features=128, num_osc=128):
    """The nnx ``LinOSSLayer`` (``scan="auto"``), time-invariant, with ``timestamps`` and
    with ``selective=True``: forward and forward+backward (the gradient of every parameter
    and of the input)."""
    from flax import nnx

    from flax_linoss.nnx import LinOSSLayer

    x = jax.random.normal(jax.random.PRNGKey(0), (batch, length, features))
    ct = jax.random.normal(jax.random.PRNGKey(1), (batch, length, features))
    gaps = jax.random.uniform(jax.random.PRNGKey(2), (batch, length), minval=0.5, maxval=1.5)
    times = jnp.cumsum(gaps, axis=1)
    rows = []
    for kind, options, t in (
        ("time-invariant", {}, None),
        ("timestamps", {}, times),
        ("selective", {"selective": True}, None),
        ("selective, rank 16", {"selective": True, "selective_rank": 16}, None),
    ):
        layer = LinOSSLayer(features, num_osc, discretization=disc, rngs=nnx.Rngs(0), **options)
        graphdef, params = nnx.split(layer)
        apply = lambda params, x, t, gd=graphdef: nnx.merge(gd, params)(x, timestamps=t)
        grad = jax.grad(
            lambda p, x, t, ct, apply=apply: jnp.sum(ct * apply(p, x, t)), argnums=(0, 1)
        )
        label = f"{disc:6s} L={length:6d} layer {kind:18s}"
        row = _timed(apply, (params, x, t), grad, (params, x, t, ct), repeats, label)
        rows.append(dict(layer=kind, **row))
    return rows


def time_varying_tables(args) -> None:
    """The ``--time-varying`` report: two tables (see :func:`bench_time_varying`,
    :func:`bench_layers`)."""
    print("| disc | L | scan | dt | fwd ms | fwd+bwd ms | peak MiB | fwd+bwd vs dt [P] |")
    print("|" + "---|" * 8)
    for disc in args.discretizations:
        for length in args.lengths:
            rows = bench_time_varying(disc, length, args.scans, args.repeats)
            for r in rows:
                base = next(x for x in rows if x["scan"] == r["scan"] and x["dt"] == "[P]")
                print(
                    f"| {disc} | {length} | {r['scan']} | {r['dt']} | {r['fwd'] * 1e3:.1f} | "
                    f"{r['fwdbwd'] * 1e3:.1f} | {r['mem'] / 2**20:.0f} | "
                    f"{r['fwdbwd'] / base['fwdbwd']:.2f}x |",
                    flush=True,
                )
    print()
    print("# nnx LinOSSLayer, scan='auto', batch=16, H=P=128")
    print("| disc | L | layer | fwd ms | fwd+bwd ms | peak MiB | fwd+bwd vs time-invariant |")
    print("|" + "---|" * 7)
    for disc in args.discretizations:
        for length in args.lengths:
            rows = bench_layers(disc, length, args.repeats)
            for r in rows:
                print(
                    f"| {disc} | {length} | {r['layer']} | {r['fwd'] * 1e3:.1f} | "
                    f"{r['fwdbwd'] * 1e3:.1f} | {r['mem'] / 2**20:.0f} | "
                    f"{r['fwdbwd'] / rows[0]['fwdbwd']:.2f}x |",
                    flush=True,
                )


@contextlib.contextmanager
def _core_replaced_by_baseline():
    """Temporarily route the layers' core call to the papers' algorithm."""
    original = ops.linoss_apply

    def baseline(u, a, dt, b, c, d, *, g=None, discretization="im", **_):
        return paper_linoss_apply(u, a, dt, b, c, d, g=g, discretization=discretization)

    ops.linoss_apply = baseline
    try:
        yield
    finally:
        ops.linoss_apply = original


def bench_scp1_step(scan, repeats, disc="im", dtype="float32"):
    """One Adam step of the papers' SCP1 model: 6 blocks, H=128, P=256, batch 32, L=896;
    ``dtype`` is the projections' computation dtype (the recurrence stays float32)."""
    import optax

    from flax_linoss.linen import LinOSSModel

    model = LinOSSModel(
        6,
        128,
        256,
        2,
        discretization=disc,
        scan="auto" if scan == BASELINE else scan,
        dtype=jnp.dtype(dtype),
    )
    x = jax.random.normal(jax.random.PRNGKey(0), (32, 896, 7))
    y = jax.random.randint(jax.random.PRNGKey(1), (32,), 0, 2)
    variables = model.init(jax.random.PRNGKey(2), x, deterministic=True)
    tx = optax.adam(1e-4)
    opt_state = tx.init(variables["params"])

    def step(params, stats, opt_state, rng):
        def loss_fn(p):
            logits, upd = model.apply(
                {"params": p, "batch_stats": stats},
                x,
                deterministic=False,
                mutable=["batch_stats"],
                rngs={"dropout": rng},
            )
            logits = logits.astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

        (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), upd["batch_stats"], opt_state, loss

    args = (variables["params"], variables["batch_stats"], opt_state, jax.random.PRNGKey(3))
    ctx = _core_replaced_by_baseline() if scan == BASELINE else contextlib.nullcontext()
    with ctx:
        return _measure(step, args, repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--discretizations", nargs="+", default=["im", "imex", "damped"])
    parser.add_argument(
        "--scans",
        nargs="+",
        default=["sequential", "associative", "adjoint", "native", "chunked", FLOOR, BASELINE],
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-scp1", action="store_true")
    parser.add_argument(
        "--scp1-dtypes",
        nargs="+",
        default=["float32"],
        help="also time the SCP1 step with these computation dtypes (e.g. bfloat16)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument(
        "--time-varying",
        action="store_true",
        help="instead: the cost of a per-step dt on each path and of the time-varying layers",
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "process"),
        default="wall",
        help="wall time, or the process's CPU time (robust on a shared machine; run it "
        "single-threaded, see the module docstring)",
    )
    args = parser.parse_args(argv)
    CLOCK["now"] = time.process_time if args.clock == "process" else time.perf_counter
    if args.quick:
        args.lengths, args.repeats = [256], 1

    device = jax.devices()[0]

    # Skip the paths that cannot run here (the native kernel is CPU-only and needs a C++
    # compiler; the Pallas kernels only run interpreted on a CPU, far too slowly to time).
    def runs_here(name):
        if name in (FLOOR, BASELINE):
            return True
        if name == "pallas" and device.platform == "cpu":
            return False
        return ops.SCAN_TABLE[ops.Scan(name)].unavailable_reason(device.platform) is None

    runnable = lambda names: [s for s in names if runs_here(s)]
    args.scans = runnable(args.scans)
    print(
        f"# flax-linoss scan benchmark: {device.platform} ({device.device_kind}), "
        f"{jax.device_count()} device(s), {platform.processor() or platform.machine()}, "
        f"jax {jax.__version__}"
    )
    print(
        f"# batch=16, H=P=128; times ({args.clock} clock) are medians after warm-up; memory "
        "is XLA's peak."
    )
    print()
    if args.time_varying:
        args.scans = [s for s in args.scans if s not in (FLOOR, BASELINE)]
        time_varying_tables(args)
        return
    header = (
        f"| disc | L | scan | fwd ms | fwd+bwd ms | peak MiB | fwd+bwd speed-up vs "
        f"{BASELINE} | peak memory vs {BASELINE} |"
    )
    print(header)
    print("|" + "---|" * 8)
    for disc in args.discretizations:
        for length in args.lengths:
            rows = bench_layer(disc, length, args.scans, args.repeats)
            base = next((r for r in rows if r["scan"] == BASELINE), None)
            for r in rows:
                speed = f"{base['fwdbwd'] / r['fwdbwd']:.1f}x" if base else "-"
                mem = f"{r['mem'] / base['mem']:.2f}" if base else "-"
                print(
                    f"| {disc} | {length} | {r['scan']} | {r['fwd'] * 1e3:.1f} | "
                    f"{r['fwdbwd'] * 1e3:.1f} | {r['mem'] / 2**20:.0f} | {speed} | {mem} |",
                    flush=True,
                )
    if args.skip_scp1:
        return
    print()
    print(
        "# SelfRegulationSCP1 model (LinOSS-IM, 6 blocks, H=128, P=256, batch 32, L=896, "
        "7 inputs): one Adam training step"
    )
    print("| core | step ms | peak MiB | speed-up vs paper |")
    print("|---|---|---|---|")
    scans = runnable(
        ["adjoint", "native", "auto", BASELINE] if not args.quick else ["auto", BASELINE]
    )
    results = {s: bench_scp1_step(s, args.repeats) for s in scans}
    for s, (t, m) in results.items():
        print(
            f"| {s} | {t * 1e3:.1f} | {m / 2**20:.0f} | {results[BASELINE][0] / t:.1f}x |",
            flush=True,
        )
    for dtype in args.scp1_dtypes:
        if dtype == "float32":
            continue
        t, m = bench_scp1_step("auto", args.repeats, dtype=dtype)
        print(
            f"| auto, {dtype} projections | {t * 1e3:.1f} | {m / 2**20:.0f} | "
            f"{results[BASELINE][0] / t:.1f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
