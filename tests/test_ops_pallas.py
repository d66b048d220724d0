"""scan="pallas": both kernels (run by the Pallas interpreter on this CPU) against the float64
step-by-step reference, and their lowering for TPU and CUDA (no device needed)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oscillator_reference import random_problem, random_steps, reference_grads, rel_err

from flax_linoss import ops
from flax_linoss.ops._auto import resolve_scan
from flax_linoss.ops._scans import pallas

# (scheme, batch, length, P, flags, reverse, per-step dt). Lengths 1, 37 (one partial block
# of 128), 150, 200 and 300 (whole blocks and a partial one); the 200 case has 12 sequences
# x P = 64, so the channels are padded (Q' = 256, N Q' = 24 rows of 128 lanes) and split over
# 3 row blocks (TPU) and 24 programs per chunk (GPU). The 150 case streams a dt per step.
CASES = [
    ("im", 2, 1, 4, False, False, False),
    ("imex", 2, 37, 4, False, True, False),
    ("damped", 3, 300, 5, True, False, False),
    ("im", 12, 200, 64, True, True, False),
    ("damped", 2, 150, 4, True, True, True),
]
# The same under jax_enable_x64 with float32 parameters (the kernels still run float32).
X64_CASE = ("damped", 2, 140, 4, True, True, True)


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
@pytest.mark.parametrize(
    ("case", "x64"),
    [(c, False) for c in CASES] + [(X64_CASE, True)],
    ids=lambda c: (
        (f"{c[0]}-N{c[1]}-L{c[2]}-P{c[3]}" + "-dt(t)" * c[6])
        if isinstance(c, tuple)
        else ("x64" * c)
    ),
)
def test_kernels_match_float64_reference_values_and_gradients(kernel, case, x64):
    disc, batch, length, num_osc, flagged, reverse, varying = case
    u, a, dt, b, c, d, g = random_problem(length, batch, length, 3, num_osc, disc)
    if varying:  # d/d dt[t] for every step, through the per-step coefficient streams
        dt = random_steps(length, (batch, length, num_osc), disc, a, g)
    rng = np.random.default_rng(length)
    ct = rng.normal(size=u.shape).astype(np.float32)
    ct_z = rng.normal(size=(batch, 2, num_osc)).astype(np.float32)
    z0, y0 = rng.normal(size=(2, batch, num_osc)) + 1j * rng.normal(size=(2, batch, num_osc))
    valid = seg = None
    if flagged:
        valid = rng.uniform(size=(batch, length)) > 0.2
        seg = np.cumsum(rng.uniform(size=(batch, length)) < 0.02, axis=1)
        valid[0, 120:136] = False  # held steps across a block boundary
        seg[-1, 128:] += 7  # a segment starting at a block boundary
    nargs = 7 if disc == "damped" else 6
    args = (u, a, dt, b, c, d, g)[:nargs]

    ref_grads, ref_out, _ = reference_grads(
        args, disc, ct, ct_z=ct_z, z0=z0, y0=y0, valid=valid, segment_ids=seg, reverse=reverse
    )

    def loss(*p):
        out, state = ops.linoss_apply(
            *p[:6],
            g=p[6] if disc == "damped" else None,
            discretization=disc,
            scan="pallas",
            initial_state=ops.LinOSSState.from_complex(z0, y0),
            return_state=True,
            reverse=reverse,
            mask=valid,
            segment_ids=seg,
        )
        return jnp.sum(ct * out) + jnp.sum(ct_z * state.z), out

    with pallas.use_interpret_kernel(kernel), jax.enable_x64(x64):
        grads, out = jax.jit(jax.grad(loss, argnums=tuple(range(nargs)), has_aux=True))(*args)
    assert out.dtype == jnp.float32
    assert rel_err(out, ref_out) < 2e-5, ("output", rel_err(out, ref_out))
    for name, gr, rg in zip("u a dt b c d g".split(), grads, ref_grads):
        assert rel_err(gr, rg) < 2e-5, (f"d/d{name}", rel_err(gr, rg))


def test_bfloat16_activations_keep_a_float32_state():
    u, a, dt, b, c, d, _ = random_problem(11, 2, 40, 8, 16, "imex")
    ub = jnp.asarray(u, jnp.bfloat16)
    kw = dict(discretization="imex", return_state=True)
    out, state = ops.linoss_apply(ub, a, dt, b, c, d, scan="pallas", **kw)
    want, want_state = ops.linoss_apply(ub, a, dt, b, c, d, scan="adjoint", **kw)
    assert out.dtype == jnp.bfloat16 and state.z.dtype == jnp.float32
    # The same bf16 projections around the same float32 recurrence.
    assert rel_err(state.z, want_state.z) < 1e-5
    assert rel_err(out, want) < 1e-2


def _lower(fn, platform, *args):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _big_transposes_feed_or_come_from_dots(text: str, size: int) -> list[str]:
    """S-sized transposes in a StableHLO module whose operand is not a dot_general result and
    whose result feeds no dot_general: the ones XLA cannot fold into a matmul's layout."""
    defs = {}
    for line in text.splitlines():
        m = re.match(r"\s*(%\S+) = (\S+)", line)
        if m:
            defs[m.group(1)] = (m.group(2), line)
    bad = []
    for name, (op, line) in defs.items():
        if op != "stablehlo.transpose":
            continue
        shape = re.search(r"-> tensor<([0-9x]+)x[a-z0-9]+>", line).group(1)
        if np.prod([int(s) for s in shape.split("x")]) < size:
            continue
        operand = re.search(r"stablehlo.transpose (%\S+),", line).group(1)
        from_dot = defs.get(operand, ("",))[0] == "stablehlo.dot_general"
        to_dot = any(
            o == "stablehlo.dot_general" and re.search(rf"{re.escape(name)}\b", ln)
            for o, ln in defs.values()
        )
        if not (from_dot or to_dot):
            bad.append(line.strip())
    return bad


# x64: with jax_enable_x64 on and float32 parameters (scientific users enable it), loop
# indices are int64 in the jaxpr; Mosaic's verifier rejected the TPU backward's `n - 1 - i`.
# The context manager confines x64 to this test.
@pytest.mark.parametrize("x64", [False, True], ids=["x32", "x64"])
@pytest.mark.parametrize(("flagged", "varying"), [(False, False), (True, False), (True, True)])
def test_lowering_for_tpu_and_cuda_picks_each_platforms_kernel(flagged, varying, x64):
    with jax.enable_x64(x64):
        _check_lowering(flagged, varying)
    assert not jax.config.x64_enabled


def _check_lowering(flagged, varying):
    # No device here: lowering runs the Mosaic and Triton lowerings, which reject what the
    # kernels cannot compile to (unsupported ops, block shapes, layouts).
    batch, length, feats, num_osc = 16, 300, 128, 128
    u, a, dt, b, c, d, _ = random_problem(0, batch, length, feats, num_osc, "im")
    if varying:
        dt = random_steps(0, (batch, length, num_osc), "im", a)
    flags = {}
    if flagged:
        flags = dict(
            mask=np.arange(length)[None].repeat(batch, 0) < length - 3,
            segment_ids=np.repeat(np.arange(3), 100)[None].repeat(batch, 0),
        )

    def loss(u, a, dt, b, c, d):
        out = ops.linoss_apply(u, a, dt, b, c, d, scan="pallas", check="shapes", **flags)
        return jnp.sum(out**2)

    grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))
    s_size = batch * length * 2 * num_osc
    for fn, kernels in ((loss, 1), (grad, 2)):
        tpu = _lower(fn, "tpu", u, a, dt, b, c, d)
        assert tpu.count("stablehlo.custom_call @tpu_custom_call") == kernels
        assert "triton" not in tpu
        # The time-major layout is made and consumed inside the projection matmuls.
        assert _big_transposes_feed_or_come_from_dots(tpu, s_size) == []
        cuda = _lower(fn, "cuda", u, a, dt, b, c, d)
        assert cuda.count("__gpu$xla.gpu.triton") == 2 * kernels  # two passes each way
        assert "tpu_custom_call" not in cuda


def test_channels_make_whole_lanes_and_tiles():
    for n in (1, 2, 3, 5, 8, 16, 20, 33):
        for q in (2, 8, 32, 100, 128, 256):
            padded = pallas.channels(n, q)
            rows = n * padded // 128
            assert padded >= q and (n * padded) % 128 == 0
            assert rows <= 8 or rows % 8 == 0
            assert padded < q + 8 * 128  # never more than a tile row of padding per sequence
    assert pallas.channels(16, 256) == 256  # the benchmark's shape needs none


class _FakeGpu:
    platform = "cuda"
    device_kind = "Tesla T4"
    compute_capability = "7.5"


def test_auto_takes_the_kernels_per_device_and_never_on_old_gpus(monkeypatch):
    monkeypatch.setattr(jax, "device_count", lambda: 1)  # per device, as in shard_map / pmap
    assert resolve_scan("auto", platform="tpu") == "pallas"
    assert resolve_scan("auto", platform="gpu", flags=True) == "pallas"
    real_devices = jax.devices
    monkeypatch.setattr(
        jax, "devices", lambda kind=None: [_FakeGpu()] if kind == "gpu" else real_devices()
    )
    assert resolve_scan("auto", platform="gpu") == "chunked"
    with pytest.raises(RuntimeError, match=r"compute capability >= 8\.0.*7\.5"):
        resolve_scan("pallas", platform="gpu")
    with pytest.raises(RuntimeError, match="float32"):
        resolve_scan("pallas", platform="tpu", dtype=jnp.float64)
