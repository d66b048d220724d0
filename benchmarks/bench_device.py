"""Every scan path on one accelerator: time, bandwidth, accuracy; a row per measurement.

For B=16, L=16384, H=P=128 (LinOSS-IM; S = one [N, L, Q] float32 array = 268 MB) it
measures, per scan path of ``flax_linoss.ops.SCAN_TABLE`` that runs on the device:

* the recurrence alone, forward and forward+backward (the path's own input layout);
* the whole layer (``linoss_apply``: projections + recurrence) forward+backward;
* the projections alone, forward+backward (what every path pays);

with the median time after a warm-up, the compile time, the achieved bandwidth (the fused
floor's bytes / time: 2S forward, 5S forward+backward for the recurrence) as a percentage
of the measured copy bandwidth, and the relative error against the ``adjoint`` path. Each
row is appended to a JSONL file as soon as it is measured (a timeout keeps what was done);
the summary table at the end lists the fastest paths first. Paths still to run when the
time budget (default 7 minutes) is spent are recorded as skipped.

Run:  python benchmarks/bench_device.py                 (on a GPU or TPU: < 8 minutes)
      python benchmarks/bench_device.py --small         (tiny sizes, any machine, ~30 s)
      options: --out FILE.jsonl --repeats N --budget SECONDS --paths pallas chunked ...

Targets on a GPU (issue 13): the fused recurrence at >= 60% of copy bandwidth
forward+backward; the layer forward+backward within 1.5x of the projections alone;
``auto`` never more than 10% behind the fastest path.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from flax_linoss import ops
from flax_linoss.ops import _project
from flax_linoss.ops._auto import per_device, platform_name, resolve_scan

# Fastest expected first, so a timeout loses the slow, least interesting rows.
ORDER = ["pallas", "chunked", "native", "adjoint", "associative", "sequential"]
PROJECTIONS = "projections-only"


def _now():
    return time.perf_counter()


def _timed(fn, args, repeats: int):
    """``(median s, all s, compile s, outputs)`` of a jitted ``fn``."""
    start = _now()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = _now() - start
    out = jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        start = _now()
        jax.block_until_ready(compiled(*args))
        times.append(_now() - start)
    return statistics.median(times), times, compile_s, out


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    """Bytes/s of a large elementwise op (read one array, write another)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    median, _, _, _ = _timed(lambda x: x * 1.5 + 1.0, (x,), repeats)
    return 2 * nbytes / median


def _rel_err(x, ref) -> float:
    errs = []
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(ref)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        errs.append(float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)))
    return max(errs) if errs else 0.0


class Writer:
    """Appends rows to a JSONL file (flushed at once) and keeps them for the summary."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a")

    def write(self, row: dict) -> None:
        self.rows.append(row)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if row.get("kind") == "row":
            err = row.get("error")
            pct = f"{row['pct_copy']:5.1f}% copy" if "pct_copy" in row else " " * 10
            shown = (
                f"{row['ms']:9.3f} ms  {pct}  err {row['rel_err_vs_adjoint']:.1e}  "
                f"compile {row['compile_s']:.1f}s"
                if err is None
                else f"{err[:120]}"
            )
            print(f"  {row['path']:12s} {row['what']:22s} {shown}", flush=True)


def _problem(batch, length, feats, num_osc):
    ks = jax.random.split(jax.random.PRNGKey(0), 8)
    a = jax.random.uniform(ks[0], (num_osc,))
    dt = jax.nn.sigmoid(jax.random.uniform(ks[1], (num_osc,)))
    b = ops.complex_uniform_init()(ks[2], (num_osc, feats, 2))
    c = ops.complex_uniform_init()(ks[3], (feats, num_osc, 2))
    d = jax.random.normal(ks[4], (feats,))
    u = jax.random.normal(ks[5], (batch, length, feats))
    ct = jax.random.normal(ks[6], (batch, length, feats))
    return u, a, dt, b, c, d, ct


def _recurrence_inputs(entry, u, a, dt, b):
    """The forcing in the path's layout (made outside the timed program) and its state."""
    n = u.shape[0]
    q = 2 * a.shape[0]
    channels = entry.channels(n, q) if entry.channels is not None else q
    tr, rdt = _project.real_transition(a, dt, None, "im")
    tr = ops.schemes.Transition(*(_project.pad_channels(x, channels) for x in tr))
    v = jax.jit(lambda u, b: _project.project_in(u, b, rdt, entry.layout, channels))(u, b)
    zero = jnp.zeros((n, channels), rdt)
    # The same cotangent for every path, in the path's layout (zero on padded channels).
    ct = jax.random.normal(jax.random.PRNGKey(1), (n, u.shape[1], q), rdt)
    ct = _project.pad_channels(ct, channels)
    ct = jnp.swapaxes(ct, 0, 1) if entry.layout == "lnq" else ct
    return tr, v, zero, ct


def _to_nlq(entry, ys, q):
    ys = jnp.swapaxes(ys, 0, 1) if entry.layout == "lnq" else ys
    return ys[..., :q]


def bench_path(name, problem, writer, repeats, copy_bps, reference, deadline):
    """The three rows of one path; fills ``reference`` when ``name`` is adjoint."""
    u, a, dt, b, c, d, ct_u = problem
    entry = ops.SCAN_TABLE[ops.Scan(name)]
    q = 2 * a.shape[0]
    s_bytes = u.shape[0] * u.shape[1] * q * 4
    tr, v, zero, ct = _recurrence_inputs(entry, u, a, dt, b)

    def fwd(coeffs, v):
        return entry.run(ops.schemes.Transition(*coeffs), v, zero, zero, None)[0]

    def fwd_bwd(coeffs, v, ct):
        ys, vjp = jax.vjp(fwd, coeffs, v)
        return ys, vjp(ct)

    def layer(u, a, dt, b, c, d, ct_u):
        def f(*p):
            return ops.linoss_apply(*p, scan=name, check=False)

        out, vjp = jax.vjp(f, u, a, dt, b, c, d)
        return out, vjp(ct_u)

    cases = [
        ("recurrence fwd", fwd, (tuple(tr), v), 2 * s_bytes),
        ("recurrence fwd+bwd", fwd_bwd, (tuple(tr), v, ct), 5 * s_bytes),
        ("layer fwd+bwd", layer, (u, a, dt, b, c, d, ct_u), None),
    ]
    for what, fn, args, floor in cases:
        row = dict(kind="row", path=name, what=what, floor_bytes=floor)
        if _now() > deadline:
            writer.write({**row, "ms": float("nan"), "compile_s": 0.0, "error": "skipped: budget"})
            continue
        try:
            median, times, compile_s, out = _timed(fn, args, repeats)
        except Exception as e:  # a path that fails on this device is a result too
            writer.write(
                {**row, "ms": float("nan"), "compile_s": 0.0, "error": f"{type(e).__name__}: {e}"}
            )
            continue
        if what.startswith("recurrence"):
            ys = _to_nlq(entry, out[0] if what.endswith("bwd") else out, q)
            comparable = ys if what.endswith("fwd") else (ys, _to_nlq(entry, out[1][1], q))
        else:
            comparable = out
        key = what
        if name == "adjoint":
            reference[key] = comparable
        err = _rel_err(comparable, reference[key]) if key in reference else float("nan")
        row.update(
            ms=median * 1e3,
            ms_all=[t * 1e3 for t in times],
            compile_s=compile_s,
            rel_err_vs_adjoint=err,
            error=None,
        )
        if floor is not None:
            row["gbps"] = floor / median / 1e9
            row["pct_copy"] = 100 * floor / median / copy_bps
        writer.write(row)


def bench_projections(problem, writer, repeats):
    u, a, _, b, c, d, ct_u = problem

    def proj(u, b, c, d, ct_u):
        def f(u, b, c, d):
            v = _project.project_in(u, b, u.dtype)
            return _project.project_out(v[..., : 2 * a.shape[0]], c, d, u, u.dtype)

        out, vjp = jax.vjp(f, u, b, c, d)
        return out, vjp(ct_u)

    median, times, compile_s, _ = _timed(proj, (u, b, c, d, ct_u), repeats)
    row = dict(kind="row", path=PROJECTIONS, what="projections fwd+bwd", floor_bytes=None)
    row.update(ms=median * 1e3, ms_all=[t * 1e3 for t in times], compile_s=compile_s)
    row.update(rel_err_vs_adjoint=float("nan"), error=None)
    writer.write(row)
    return median


def summary(rows, auto_path, projections_ms) -> str:
    """A Markdown table, fastest layer first (paths that failed or were skipped last)."""
    by_path: dict[str, dict] = {}
    for r in rows:
        if r.get("kind") == "row" and r["path"] != PROJECTIONS:
            by_path.setdefault(r["path"], {})[r["what"]] = r

    def key(item):
        layer = item[1].get("layer fwd+bwd", {})
        return (layer.get("error") is not None, layer.get("ms", float("inf")))

    lines = [
        "| scan | rec fwd ms | rec fwd+bwd ms | rec fwd+bwd % copy | layer fwd+bwd ms | "
        "layer / projections | rel err vs adjoint | compile s (layer) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path, cases in sorted(by_path.items(), key=key):
        f, fb, la = (
            cases.get(w, {}) for w in ("recurrence fwd", "recurrence fwd+bwd", "layer fwd+bwd")
        )
        if la.get("error"):
            lines.append(f"| {path} | - | - | - | {la['error'][:60]} | - | - | - |")
            continue
        label = f"{path} (auto)" if path == auto_path else path
        lines.append(
            f"| {label} | {f.get('ms', float('nan')):.3f} | {fb.get('ms', float('nan')):.3f} | "
            f"{fb.get('pct_copy', float('nan')):.0f}% | {la['ms']:.3f} | "
            f"{la['ms'] / projections_ms:.2f}x | "
            f"{max(fb.get('rel_err_vs_adjoint', 0), la.get('rel_err_vs_adjoint', 0)):.1e} | "
            f"{la['compile_s']:.1f} |"
        )
    lines.append(f"| projections only | - | - | - | {projections_ms:.3f} | 1.00x | - | - |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes: runs anywhere")
    parser.add_argument("--out", type=Path, default=None, help="JSONL file (appended)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--budget", type=float, default=420.0, help="seconds before skipping")
    parser.add_argument("--paths", nargs="+", default=None, help="scan paths to run")
    args = parser.parse_args(argv)
    start = _now()
    deadline = start + args.budget
    if args.small:
        batch, length, feats, num_osc, copy_bytes = 2, 256, 8, 8, 1 << 24
        repeats = args.repeats or 2
    else:
        batch, length, feats, num_osc, copy_bytes = 16, 16384, 128, 128, 1 << 30
        repeats = args.repeats or 5
    device = jax.devices()[0]
    plat = platform_name(device.platform)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or Path(__file__).resolve().parent / "results" / f"device-{plat}-{stamp}.jsonl"
    writer = Writer(out)

    import jaxlib

    copy_bps = copy_bandwidth(copy_bytes, repeats)
    auto_path = resolve_scan("auto", platform=plat).value
    meta = dict(
        kind="meta",
        device=f"{device.platform} ({device.device_kind})",
        devices=jax.device_count(),
        compute_capability=getattr(device, "compute_capability", None),
        jax=jax.__version__,
        jaxlib=jaxlib.__version__,
        python=platform.python_version(),
        host=platform.node(),
        copy_gbps=copy_bps / 1e9,
        shape=dict(batch=batch, length=length, features=feats, oscillators=num_osc),
        discretization="im",
        auto=auto_path,
        per_device=per_device(),
        small=args.small,
    )
    writer.write(meta)
    print(
        f"# {meta['device']}, jax {meta['jax']}, jaxlib {meta['jaxlib']}; copy bandwidth "
        f"{meta['copy_gbps']:.1f} GB/s; B={batch} L={length} H={feats} P={num_osc} (im); "
        f"auto = {auto_path}; rows -> {out}",
        flush=True,
    )
    problem = _problem(batch, length, feats, num_osc)
    projections_s = bench_projections(problem, writer, repeats)
    paths = args.paths or ORDER
    runnable = []
    for name in paths:
        reason = ops.SCAN_TABLE[ops.Scan(name)].unavailable_reason(plat)
        if reason is not None:
            writer.write(dict(kind="skip", path=name, reason=reason))
            print(f"  {name:12s} skipped: {reason}", flush=True)
        else:
            runnable.append(name)
    # The reference first (errors are relative to it), then fastest to slowest.
    runnable = sorted(runnable, key=lambda p: (p != "adjoint", ORDER.index(p)))
    reference: dict = {}
    for name in runnable:
        bench_path(name, problem, writer, repeats, copy_bps, reference, deadline)
    table = summary(writer.rows, auto_path, projections_s * 1e3)
    print()
    print(table)
    writer.write(dict(kind="summary", markdown=table, seconds=_now() - start))
    print(f"\n# {(_now() - start):.0f} s; rows in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
