"""scan="native": the fused CPU kernel, its build, its fallback and its edges.

Its accuracy against the float64 step-by-step reference (outputs and every gradient, all
schemes, lengths 1 to 3000, with and without flags) is tested with every other scan in
test_ops_scan.py.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import xla_flags
from oscillator_reference import (
    assert_rel_close,
    random_problem,
    reference_apply,
    reference_grads,
)

from flax_linoss import ops
from flax_linoss.ops._auto import resolve_scan
from flax_linoss.ops._scans import native

pytestmark = pytest.mark.skipif(
    not native.available(), reason=f"native kernel unavailable: {native.unavailable_reason()}"
)


def _flags(flags):
    """``linoss_apply``'s flag arguments as the reference's."""
    return {"valid": flags.get("mask"), "segment_ids": flags.get("segment_ids")}


def _loss_and_grads(scan, u, a, dt, b, c, d, g, disc, ct, **flags):
    def loss(u, a, dt, b, c, d, g):
        out = ops.linoss_apply(u, a, dt, b, c, d, g=g, discretization=disc, scan=scan, **flags)
        return jnp.sum(ct * out), out

    argnums = (0, 1, 2, 3, 4, 5) + ((6,) if g is not None else ())
    return jax.jit(jax.grad(loss, argnums=argnums, has_aux=True))(u, a, dt, b, c, d, g)


@pytest.mark.parametrize("flagged", [False, True])
@pytest.mark.parametrize("length", [63, 64, 65, 129])
def test_chunk_boundaries_match_the_adjoint_path(length, flagged):
    # The backward pass recomputes states per chunk of native.CHUNK steps from checkpoints:
    # lengths just under, at and over chunk multiples; with flags, resets and held steps
    # right at the chunk boundaries too.
    assert native.CHUNK == 64
    u, a, dt, b, c, d, g = random_problem(length, 3, length, 5, 7, "damped")
    rng = np.random.default_rng(length)
    ct = rng.normal(size=u.shape).astype(np.float32)
    flags = {}
    if flagged:
        valid = rng.uniform(size=(3, length)) > 0.3
        seg = np.cumsum(rng.uniform(size=(3, length)) < 0.1, axis=1)
        valid[0, 63:65], valid[1, 62:64] = False, True
        seg[1, 63:] += 10  # a segment starts at the first step of the second chunk
        seg[2, 64:] += 10
        flags = dict(mask=valid, segment_ids=seg)
    # Each path against the float64 reference, norm-relative (the kernel's float32 rounding
    # depends on the CPU it was compiled for: never compare it with adjoint element-wise).
    grads, out, _ = reference_grads((u, a, dt, b, c, d, g), "damped", ct, **_flags(flags))
    want = (grads, out)
    for scan in ("native", "adjoint"):
        got = _loss_and_grads(scan, u, a, dt, b, c, d, g, "damped", ct, **flags)
        assert_rel_close(got, want, 2e-5, scan)


def test_more_channels_than_one_block_and_odd_sizes():
    # 300 oscillators = 600 real channels: two channel blocks of the kernel, the second ragged.
    u, a, dt, b, c, d, _ = random_problem(1, 3, 70, 3, 300, "im")
    ct = np.random.default_rng(0).normal(size=u.shape).astype(np.float32)
    got = _loss_and_grads("native", u, a, dt, b, c, d, None, "im", ct)
    grads, out, _ = reference_grads((u, a, dt, b, c, d), "im", ct)
    assert_rel_close(got, (grads, out), 2e-5)


@pytest.mark.parametrize("disc", ["im", "imex", "damped"])
def test_float64_kernel_matches_the_reference_to_float64_precision(disc):
    u, a, dt, b, c, d, g = random_problem(3, 2, 150, 4, 5, disc)
    ct = np.random.default_rng(1).normal(size=u.shape)
    with jax.enable_x64(True):
        f64 = lambda x: None if x is None else jnp.asarray(x, jnp.float64)
        args = [f64(x) for x in (u, a, dt, b, c, d, g)]
        grads, out = _loss_and_grads("native", *args, disc, f64(ct))
        assert out.dtype == jnp.float64

        def ref_loss(u, a, dt, b, c, d, g):
            out = reference_apply(u, a, dt, b, c, d, g, discretization=disc)[0]
            return jnp.sum(f64(ct) * out), out

        argnums = tuple(range(7 if g is not None else 6))
        ref_grads, ref_out = jax.grad(ref_loss, argnums=argnums, has_aux=True)(*args)
    assert_rel_close((out, grads), (ref_out, ref_grads), 1e-10)


def test_vmap_over_parameters_and_batch_dims():
    u, a, dt, b, c, d, _ = random_problem(4, 2, 40, 3, 4, "imex")
    a2 = np.stack([a, a * 0.5])
    got = jax.vmap(
        lambda a: ops.linoss_apply(u, a, dt, b, c, d, discretization="imex", scan="native")
    )(a2)
    with jax.enable_x64(True):
        want = [reference_apply(u, x, dt, b, c, d, discretization="imex")[0] for x in a2]
    assert_rel_close(got, np.stack(want), 1e-5)


def test_input_cotangent_reused_elsewhere_is_not_clobbered():
    # The backward kernel writes the input gradient over the output cotangent buffer; XLA must
    # copy first when that cotangent is still needed, as here (it also feeds d and C).
    u, a, dt, b, c, d, _ = random_problem(5, 2, 90, 3, 4, "im")

    def loss(u, c, d, apply):
        out = apply(u, c, d)
        return jnp.sum(jnp.sin(out) * out) + jnp.sum(out[:, ::3] ** 2)

    native = lambda u, c, d: ops.linoss_apply(u, a, dt, b, c, d, scan="native")
    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(u, c, d, native)
    with jax.enable_x64(True):
        reference = lambda u, c, d: reference_apply(u, a, dt, b, c, d, discretization="im")[0]
        f64 = [jnp.asarray(x, jnp.float64) for x in (u, c, d)]
        want = jax.grad(loss, argnums=(0, 1, 2))(*f64, reference)
    assert_rel_close(got, want, 2e-5)


def test_auto_takes_the_kernel_per_device_and_the_partitionable_path_under_spmd():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    seen = []

    def probe(x):
        seen.append(resolve_scan("auto", platform="cpu"))
        return x

    x = jax.device_put(np.ones(8, np.float32), NamedSharding(mesh, P("data")))
    jax.jit(probe)(x)
    jax.shard_map(probe, mesh=mesh, in_specs=P("data"), out_specs=P("data"))(x)
    jax.pmap(probe)(np.ones(8, np.float32))
    assert seen == ["adjoint", "native", "native"]

    # And per device the kernel gives what one device gives.
    u, a, dt, b, c, d, _ = random_problem(6, 8, 50, 3, 4, "im")
    sharded = jax.shard_map(
        lambda u: ops.linoss_apply(u, a, dt, b, c, d, scan="auto"),
        mesh=mesh,
        in_specs=P("data"),
        out_specs=P("data"),
    )(jax.device_put(u, NamedSharding(mesh, P("data"))))
    with jax.enable_x64(True):
        whole = reference_apply(u, a, dt, b, c, d, discretization="im")[0]
    assert_rel_close(sharded, whole, 1e-5)


def test_native_off_the_cpu_is_refused():
    with pytest.raises(ValueError, match="CPU kernel"):
        resolve_scan("native", platform="gpu")


def test_unavailable_kernel_falls_back_and_explains(monkeypatch):
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    assert resolve_scan("auto", platform="cpu") == "native"
    assert resolve_scan("auto", platform="cpu", flags=True) == "native"
    monkeypatch.setitem(native._state, "ok", False)
    monkeypatch.setitem(native._state, "reason", "RuntimeError: no C++ compiler found")
    assert resolve_scan("auto", platform="cpu") == "adjoint"
    assert ops.SCAN_TABLE[ops.NATIVE].unavailable_reason("cpu").endswith("compiler found")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler found"):
        resolve_scan("native", platform="cpu")


def _fresh_processes(code, *envs):
    """Runs ``code`` in one fresh interpreter per environment, side by side; their
    ``CompletedProcess``-like results (``returncode``, ``stdout``, ``stderr``) in order."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )
        for env in envs
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def test_build_into_a_fresh_cache_and_failures_fall_back(tmp_path):
    code = """
        import jax.numpy as jnp
        from flax_linoss.ops._auto import resolve_scan
        from flax_linoss.ops._scans import native
        print(native.available(), resolve_scan("auto", platform="cpu").value)
        print(native.unavailable_reason())
        print(sorted(p.name for p in native.cache_dir().glob("*.so")))
    """
    # One CPU device (this session's 8 fake devices make "auto" avoid the kernel under jit).
    one = dict(XLA_FLAGS=xla_flags())
    # The build into a fresh cache; a compiler that fails (`false`); the kernel switched off,
    # alone and with every kernel: side by side (the build takes the longest).
    ok, broken, off, all_off = _fresh_processes(
        code,
        dict(FLAX_LINOSS_CACHE_DIR=str(tmp_path / "ok"), **one),
        dict(FLAX_LINOSS_CACHE_DIR=str(tmp_path / "bad"), CXX="false", **one),
        dict(FLAX_LINOSS_NATIVE="0", **one),
        dict(FLAX_LINOSS_KERNELS="0", **one),
    )
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.splitlines()
    assert lines[0] == "True native" and lines[1] == "None"
    assert lines[2].startswith("['kernels-") and lines[2].endswith(".so']")

    # The failing compiler and the switches: all fall back.
    assert all_off.stdout.splitlines()[:1] == ["False adjoint"], all_off.stderr
    assert "FLAX_LINOSS_KERNELS=0" in all_off.stdout
    assert off.returncode == 0, off.stderr
    assert off.stdout.splitlines()[0] == "False adjoint"
    assert "FLAX_LINOSS_NATIVE=0" in off.stdout.splitlines()[1]
    assert "unavailable" in off.stderr  # logged once, with the reason
    assert broken.returncode == 0, broken.stderr
    assert broken.stdout.splitlines()[0] == "False adjoint"
    assert "failed" in broken.stdout.splitlines()[1]
