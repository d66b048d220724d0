"""Accuracy of every scan path against a float64 step-by-step reference at long lengths.

For each case and length, runs ``linoss_apply`` with float32 parameters on every path and
prints the norm-relative error ``max |x - ref| / max |ref|`` of the output and of the
gradients of ``sum(ct * y)`` with respect to ``a``, ``dt`` and the input ``u``, against
``tests/oscillator_reference.py`` (complex float64 arithmetic from the papers' equations,
sharing no code with the library) run on the same float32 parameter values.

Cases:

* ``imex-edge``: LinOSS-IMEX with ``a dt^2 = 3.96`` (where ``constraint="stable"`` clamps:
  eigenvalues on the unit circle, phase near pi);
* ``im``, ``imex``, ``damped``: the papers' initialisations (``uniform_init`` for LinOSS,
  ``ring_init`` for D-LinOSS, ``constraint="paper"``).

Paths: ``sequential``, ``adjoint``, ``native`` (the loop and its two fused forms),
``associative``, ``associative+flags`` (the per-step ``lax.associative_scan``, taken with a
mask; here an all-valid mask, so the reference is unchanged) and ``chunked``; ``--pallas``
adds both Pallas kernels in the CPU interpreter (slow).

Run:  python benchmarks/bench_accuracy.py                     (1e5 and 1e6: ~20 min, 2 cores)
      python benchmarks/bench_accuracy.py --lengths 1000 --cases imex-edge   (a smoke run)
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from oscillator_reference import reference_apply

from flax_linoss import ops

CASES = ("imex-edge", "im", "imex", "damped")
PATHS = ("sequential", "adjoint", "native", "associative", "associative+flags", "chunked")
PALLAS = ("pallas-tpu", "pallas-gpu")
QUANTITIES = ("y", "d/da", "d/ddt", "d/du")


def problem(case: str, length: int, num_osc: int, features: int, seed: int = 0):
    """Float32 ``(disc, u, a, dt, b, c, d, g, ct)`` for a case (batch 1)."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    if case == "imex-edge":
        disc, g = "imex", None
        dt = jax.nn.sigmoid(jax.random.uniform(ks[0], (num_osc,)))
        a = 3.96 / dt**2
    else:
        disc = case
        raw = ops.init_oscillators(ks[0], num_osc, disc)
        a, dt, g = ops.constrain(disc, raw["a_raw"], raw["dt_raw"], raw.get("g_raw"))
    b = ops.complex_uniform_init()(ks[1], (num_osc, features, 2))
    c = ops.complex_uniform_init()(ks[2], (features, num_osc, 2))
    d = jnp.zeros((features,))
    u = jax.random.normal(ks[3], (1, length, features))
    ct = jax.random.normal(ks[4], (1, length, features))
    return disc, u, a, dt, b, c, d, g, ct


def _grads(apply, u, a, dt, rest, ct):
    """Values and gradients; every array is an argument (a closed-over one would be a
    constant that XLA folds at compile time, for minutes at these lengths)."""

    def loss(u, a, dt, rest, ct):
        out = apply(u, a, dt, *rest)
        return jnp.sum(ct * out), out

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
    (g_u, g_a, g_dt), out = step(u, a, dt, rest, ct)
    return {"y": out, "d/da": g_a, "d/ddt": g_dt, "d/du": g_u}


def reference(disc, u, a, dt, b, c, d, g, ct):
    with jax.enable_x64(True):
        f64 = lambda x: None if x is None else jnp.asarray(x, jnp.float64)
        apply = lambda u, a, dt, b, c, d, g: reference_apply(
            u, a, dt, b, c, d, g, discretization=disc
        )[0]
        rest = tuple(f64(x) for x in (b, c, d, g))
        got = _grads(apply, f64(u), f64(a), f64(dt), rest, f64(ct))
        return {k: np.asarray(v) for k, v in got.items()}


def run_path(path, disc, u, a, dt, b, c, d, g, ct):
    scan = "associative" if path == "associative+flags" else path.split("-")[0]
    mask = jnp.ones(u.shape[:2], bool) if path == "associative+flags" else None

    def apply(u, a, dt, b, c, d, g, mask):
        return ops.linoss_apply(
            u, a, dt, b, c, d, g=g, discretization=disc, scan=scan, mask=mask, check="shapes"
        )

    if path.startswith("pallas"):
        from flax_linoss.ops._scans import pallas

        with pallas.use_interpret_kernel(path.split("-")[1]):
            got = _grads(apply, u, a, dt, (b, c, d, g, mask), ct)
    else:
        got = _grads(apply, u, a, dt, (b, c, d, g, mask), ct)
    return {k: np.asarray(v, np.float64) for k, v in got.items()}


def rel_err(x, ref) -> float:
    return float(np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-300))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="100000,1000000")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--pallas", action="store_true", help="also the interpreted kernels")
    parser.add_argument("--oscillators", type=int, default=8)
    parser.add_argument("--features", type=int, default=2)
    args = parser.parse_args(argv)
    paths = args.paths.split(",") + (list(PALLAS) if args.pallas else [])
    print(
        f"# {platform.node()} | {platform.processor() or platform.machine()} | "
        f"jax {jax.__version__} | {jax.default_backend()} | P={args.oscillators} "
        f"H={args.features} batch 1 | error = max|x - ref| / max|ref| vs float64"
    )
    print("| case | L | scan | " + " | ".join(QUANTITIES) + " | s |")
    print("|---|---|---|" + "---|" * (len(QUANTITIES) + 1))
    for case in args.cases.split(","):
        for length in (int(x) for x in args.lengths.split(",")):
            prob = problem(case, length, args.oscillators, args.features)
            start = time.perf_counter()
            ref = reference(*prob)
            print(
                f"| {case} | {length} | float64 reference | "
                + " | ".join("-" for _ in QUANTITIES)
                + f" | {time.perf_counter() - start:.0f} |",
                flush=True,
            )
            for path in paths:
                start = time.perf_counter()
                got = run_path(path, *prob)
                errs = " | ".join(f"{rel_err(got[q], ref[q]):.1e}" for q in QUANTITIES)
                secs = time.perf_counter() - start
                print(f"| {case} | {length} | {path} | {errs} | {secs:.0f} |", flush=True)


if __name__ == "__main__":
    main()
