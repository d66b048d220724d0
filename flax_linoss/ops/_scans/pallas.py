"""``scan="pallas"``: fused streaming kernels for TPU (Mosaic) and GPU (Triton).

One custom-VJP recurrence on the time-major layout ``[L, C]`` (``C = N * Q'`` channels,
every real channel of every sequence side by side; see :mod:`flax_linoss.ops._project`),
with the checkpoint spacing :data:`BLOCK` shared by both kernels so that their residuals
have one shape. The kernel is chosen by ``jax.lax.platform_dependent`` at lowering time:
lowering for TPU emits the Mosaic kernel (``pallas_tpu.py``), for CUDA the Triton kernel
(``pallas_gpu.py``), anywhere else the Pallas interpreter runs one of them (the TPU kernel
unless :func:`use_interpret_kernel` says otherwise: slow, for tests).

The recurrence is float32 (bfloat16 activations are projected into float32 forcing); the
flags (hold, reset) arrive as one int32 code per sequence and step; per-step coefficients
(a time-varying ``dt``) as a ``[6, L, C]`` stream beside the forcing (``[6, C]`` otherwise).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import jax
import jax.numpy as jnp

from flax_linoss.ops._scans._common import (
    Flags,
    is_time_varying,
    match_vma,
    vary,
    varying_axes,
)

# Steps per time block (TPU) and per chunk (GPU); one checkpoint per block.
BLOCK = 128
LANES = 128

_import_errors: dict[str, str] = {}
try:
    from flax_linoss.ops._scans import pallas_tpu
except Exception as e:  # Pallas moves between JAX versions: report, never break the import
    pallas_tpu = None
    _import_errors["tpu"] = f"{type(e).__name__}: {e}"
try:
    from flax_linoss.ops._scans import pallas_gpu
except Exception as e:
    pallas_gpu = None
    _import_errors["gpu"] = f"{type(e).__name__}: {e}"

_INTERPRET = {"kernel": "tpu"}


def interpret_kernel() -> str:
    """Which kernel the Pallas interpreter runs off TPU/GPU: ``"tpu"`` or ``"gpu"``."""
    return _INTERPRET["kernel"]


@contextlib.contextmanager
def use_interpret_kernel(kernel: str):
    """Within the block, the interpreter (CPU) runs the ``"tpu"`` or ``"gpu"`` kernel."""
    if kernel not in ("tpu", "gpu"):
        raise ValueError(f"kernel must be 'tpu' or 'gpu', got {kernel!r}.")
    old = _INTERPRET["kernel"]
    _INTERPRET["kernel"] = kernel
    try:
        yield
    finally:
        _INTERPRET["kernel"] = old


def channels(n: int, q: int) -> int:
    """``Q' >= Q`` with ``N * Q'`` a multiple of 128 (whole lanes) and ``R = N Q' / 128`` rows
    either at most 8 or a multiple of 8 (whole ``(8, 128)`` tiles per block)."""
    step = LANES // math.gcd(n, LANES)
    padded = -(-q // step) * step
    rows = n * padded // LANES
    if rows > 8 and rows % 8:
        step = 8 * LANES // math.gcd(n, 8 * LANES)
        padded = -(-q // step) * step
    return padded


def _kernels_switched_off() -> bool:
    return os.environ.get("FLAX_LINOSS_KERNELS", "1").strip().lower() in ("0", "false", "no", "off")


def unavailable_reason(platform: str, dtype) -> str | None:
    """Why the kernels cannot run on ``platform`` for a ``dtype`` recurrence, or ``None``."""
    if _kernels_switched_off():
        return "disabled by FLAX_LINOSS_KERNELS=0"
    if jnp.dtype(dtype) != jnp.float32:
        return f"the kernels run a float32 recurrence, and these parameters make it {dtype}"
    if platform == "tpu" and pallas_tpu is None:
        return f"Pallas TPU is not importable ({_import_errors['tpu']})"
    if platform == "gpu":
        if pallas_gpu is None:
            return f"Pallas Triton is not importable ({_import_errors['gpu']})"
        try:
            device = jax.devices("gpu")[0]
        except RuntimeError:
            return None  # lowering for a GPU from another host: nothing to check here
        if device.platform != "cuda":
            return f"the Triton kernel is built for CUDA GPUs, not {device.platform!r}"
        capability = getattr(device, "compute_capability", None)
        if capability is not None and float(capability) < 8.0:
            return (
                f"Pallas on Triton needs compute capability >= 8.0; this GPU "
                f"({device.device_kind}) has {capability}"
            )
    if platform == "cpu" and (pallas_tpu is None or pallas_gpu is None):
        return f"Pallas is not importable ({_import_errors})"
    return None


def _on_platform(name: str, kernel: str, *args):
    """``name`` (``"forward"``/``"backward"``) of the kernel for the platform lowered for."""
    branches = {}
    if pallas_tpu is not None:
        branches["tpu"] = functools.partial(getattr(pallas_tpu, name), block=BLOCK, interpret=False)
    if pallas_gpu is not None:
        branches["cuda"] = functools.partial(
            getattr(pallas_gpu, name), block=BLOCK, interpret=False
        )
    module = pallas_tpu if kernel == "tpu" else pallas_gpu
    module = module or pallas_tpu or pallas_gpu  # whichever imported (see unavailable_reason)
    default = functools.partial(getattr(module, name), block=BLOCK, interpret=True)
    return jax.lax.platform_dependent(*args, default=default, **branches)


def _forward(coeffs, v, x0, code, kernel):
    ys, z_l, ck = _on_platform("forward", kernel, coeffs, v, x0, code)
    axes = varying_axes(coeffs, v, x0, code)  # kernel outputs carry no shard_map type
    return vary(ys, axes), vary(z_l, axes), ck


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _recurrence(coeffs, v, x0, code, kernel):
    ys, z_l, _ = _forward(coeffs, v, x0, code, kernel)
    return ys, z_l


def _recurrence_fwd(coeffs, v, x0, code, kernel):
    ys, z_l, ck = _forward(coeffs, v, x0, code, kernel)
    return (ys, z_l), (coeffs, v, x0, code, ys, ck)


def _recurrence_bwd(kernel, res, cts):
    coeffs, v, x0, code, ys, ck = res
    g_ys, g_zl = cts
    g_c, g_v, g_x0 = _on_platform(
        "backward", kernel, coeffs, v, x0, code, ys, ck, g_ys.astype(v.dtype), g_zl.astype(v.dtype)
    )
    axes = varying_axes(coeffs, v, x0, cts)
    return match_vma(g_c, coeffs, axes), match_vma(g_v, v, axes), match_vma(g_x0, x0, axes), None


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def run(tr, v, z0, y0, flags: Flags | None):
    """``(ys [L, N, Q], z_L [N, Q], y_L [N, Q])`` for time-major ``v [L, N, Q]``; ``tr``'s
    fields ``[Q]`` or per step ``[L, N, Q]``.

    ``Q`` must satisfy :func:`channels` (the layer's projections pad it).
    """
    length, n, q = v.shape
    if (n * q) % LANES:
        raise ValueError(f"N * Q = {n} * {q} must be a multiple of {LANES} (see channels()).")
    c = n * q
    if is_time_varying(tr):
        coeffs = jnp.stack(tuple(tr)).reshape(6, length, c)
    else:
        coeffs = jnp.broadcast_to(jnp.stack(tuple(tr))[:, None, :], (6, n, q)).reshape(6, c)
    x0 = jnp.stack([z0, y0]).reshape(2, c)
    code = None if flags is None else flags.code((n, length)).T  # [L, N]
    ys, z_l = _recurrence(coeffs, v.reshape(length, c), x0, code, interpret_kernel())
    ys = ys.reshape(length, n, q)
    return ys, z_l.reshape(n, q), ys[-1]
