"""``scan="native"``: a fused C++ kernel for the recurrence on CPU, as an XLA FFI custom call.
 The kernel source (``csrc/lti_recurrence.cc``) ships with the
package and is compiled on first use with the machine's C++ compiler (``$CXX``, else
``c++``/``g++``/``clang++``) against the XLA FFI headers that jaxlib ships, then cached
(``$FLAX_LINOSS_CACHE_DIR``, else ``$XDG_CACHE_HOME/flax_linoss``, else
``~/.cache/flax_linoss``), keyed by the source, the flags, the compiler, jaxlib and the
CPU. Compiling takes a few seconds, once per machine.

Where there is no compiler, or on any other failure, :func:`available` is ``False`` (the
reason is in :func:`unavailable_reason` and logged once) and ``scan="auto"`` falls back to
the pure-JAX ``"adjoint"`` path. ``FLAX_LINOSS_NATIVE=0`` (or ``FLAX_LINOSS_KERNELS=0``,
which turns every kernel off) disables it.

What it computes is exactly the ``"adjoint"`` path (same recurrence, same hand-written
adjoint backward pass), organised for the memory system:

* forward: one pass over ``v [N, L, Q]`` that writes only the positions ``y`` (the output
  projection needs them) plus, every :data:`CHUNK` steps, a checkpoint of the velocities;
* backward: per chunk, from last to first, the chunk's velocities are recomputed from its
  checkpoint into a cache-resident buffer, then the adjoint recurrence runs backwards
  through the chunk, accumulating every gradient in the same pass. The input gradient is
  written over the incoming output cotangent (no new ``[N, L, Q]`` buffer);
* work is split over (batch row, channel block) items on XLA's intra-op thread pool;
* the per-step flags (hold, reset; see :mod:`._common`) arrive as one int8 per batch row
  and step; the kernels are compiled with and without them;
* per-step coefficients (a time-varying ``dt``) arrive as six ``[N * L, Q]`` streams read
  with ``v``; the backward pass then writes each step's six coefficient gradients
  (``[6, N * L, Q]``) instead of summing them. The kernels are compiled for both kinds.

It is differentiable once (reverse mode: ``grad``, ``vjp``); like the ``"adjoint"`` path it
has no forward-mode (``jvp``) rule. Float32 and float64. XLA's SPMD partitioner cannot split
a custom call: under a ``jit`` that shards the batch over several devices it gathers the
inputs and every device runs the whole batch (correct, not parallel), which is why
``scan="auto"`` uses it only per device (see :mod:`flax_linoss.ops._auto`).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from flax_linoss.ops._scans._common import Flags, is_time_varying, run_custom, with_adjoint

logger = logging.getLogger(__name__)

# Steps between velocity checkpoints: the backward pass keeps CHUNK x Q velocities in cache.
CHUNK = 64
_SOURCE = "lti_recurrence.cc"
_FORWARD_TARGET = "flax_linoss_lti_forward"
_BACKWARD_TARGET = "flax_linoss_lti_backward"
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w")
# Tuned for this CPU where the compiler can (the cache key includes the CPU), else generic.
_ARCH_FLAGS = (("-march=native",), ())

_lock = threading.Lock()
_state: dict[str, object] = {}


def _source_text() -> str:
    return resources.files("flax_linoss.ops").joinpath("csrc", _SOURCE).read_text()


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU model and flags (Linux), else platform."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    if os.environ.get("FLAX_LINOSS_CACHE_DIR"):
        return Path(os.environ["FLAX_LINOSS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flax_linoss"


def _build(compiler: str) -> Path:
    """Compiles the kernel into the cache (atomically) unless it is there; returns its path."""
    import jaxlib

    source = _source_text()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False
    ).stdout
    key = hashlib.sha256(
        "\0".join(
            [source, " ".join(_FLAGS), version, jaxlib.__version__, _cpu_signature()]
        ).encode()
    ).hexdigest()[:20]
    out = cache_dir() / f"lti_recurrence-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / _SOURCE
        src.write_text(source)
        lib = Path(tmp) / out.name
        for arch in _ARCH_FLAGS:
            cmd = [compiler, *_FLAGS, *arch, f"-I{jax.ffi.include_dir()}", str(src), "-o", str(lib)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode == 0:
                os.replace(lib, out)  # atomic: concurrent builders leave one complete file
                return out
            errors.append(f"`{' '.join(cmd)}` failed:\n{proc.stderr[-2000:]}")
    raise RuntimeError("\n".join(errors))


def _switched_off(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() in ("0", "false", "no", "off")


def _switch_reason() -> str | None:
    """Why the environment turns the kernel off now, or ``None`` (read on every call)."""
    for name in ("FLAX_LINOSS_NATIVE", "FLAX_LINOSS_KERNELS"):
        if _switched_off(name):
            return f"disabled by {name}=0"
    return None


def _load() -> None:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set $CXX, or install g++ or clang++)")
    lib = ctypes.cdll.LoadLibrary(str(_build(compiler)))
    jax.ffi.register_ffi_target(
        _FORWARD_TARGET, jax.ffi.pycapsule(lib.FlaxLinossLtiForward), platform="cpu"
    )
    jax.ffi.register_ffi_target(
        _BACKWARD_TARGET, jax.ffi.pycapsule(lib.FlaxLinossLtiBackward), platform="cpu"
    )
    _state["lib"] = lib


def _warn_unavailable(reason: str) -> None:
    logger.warning(
        "flax_linoss: the native CPU recurrence kernel is unavailable (%s); "
        "scan='auto' uses the pure-JAX 'adjoint' path instead.",
        reason,
    )


def available() -> bool:
    """Whether the kernel is compiled and registered (building it on the first call), and
    not switched off by the environment (read on every call, so a test or a session can
    turn it off after it was built)."""
    off = _switch_reason()
    with _lock:
        if off is not None:
            if _state.get("off") != off:  # logged once per reason
                _state["off"] = off
                _warn_unavailable(off)
            return False
        if "ok" not in _state:
            try:
                _load()
                _state["ok"] = True
            except Exception as e:  # any failure means: use the pure-JAX path
                _state["ok"] = False
                _state["reason"] = f"{type(e).__name__}: {e}"
                _warn_unavailable(_state["reason"])
        return bool(_state["ok"])


def unavailable_reason() -> str | None:
    """Why :func:`available` is ``False`` (``None`` if it is available or not yet tried)."""
    return _switch_reason() or _state.get("reason")  # type: ignore[return-value]


def _shape(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def _sizes(v):
    n, length, q = v.shape
    return n, length, q, dict(length=np.int64(length), chunk=np.int64(CHUNK))


def _coefficient_rows(coeffs, n, length, q):
    """The six coefficient buffers the kernels read: ``[Q]``, or per step ``[N * L, Q]``
    (six arguments, not one stacked array: stacking would copy six ``[N, L, Q]`` arrays)."""
    if is_time_varying(coeffs):
        return tuple(c.reshape(n * length, q) for c in coeffs)
    return tuple(coeffs)


def _flag_codes(flags, n, length):
    """``[N * L]`` int8 codes (hold + 2 * reset), or an empty array meaning "no flags"."""
    if flags is None:
        return jnp.zeros((0,), jnp.int8)
    return flags.code((n, length)).astype(jnp.int8).reshape(n * length)


def forward(coeffs, v, z0, y0, flags):
    """The forward kernel: ``x_t = M x_{t-1} + f v_t`` on real channels, with flags.

    Args:
      coeffs: ``(m11, m12, m21, m22, f1, f2)``, each ``[Q]`` or per step ``[N, L, Q]``.
      v: ``[N, L, Q]`` forcing.
      z0, y0: ``[N, Q]`` initial state.
      flags: a :class:`~._common.Flags` of ``[N, L]`` bools, or ``None``.

    Returns:
      ``(ys [N, L, Q], z_L [N, Q], checkpoints [N, ceil(L / CHUNK), Q])``: every position,
      the final velocity, and the velocity before every chunk (for :func:`backward`).
    """
    if not available():
        raise RuntimeError(f"The native kernel is unavailable: {unavailable_reason()}")
    # The kernels take [N * L, Q] rows: the projection's matmul output as it is.
    n, length, q, attrs = _sizes(v)
    chunks = -(-length // CHUNK)
    call = jax.ffi.ffi_call(
        _FORWARD_TARGET,
        (
            _shape((n * length, q), v.dtype),
            _shape((n, q), v.dtype),
            _shape((n, chunks, q), v.dtype),
        ),
        vmap_method="sequential",
    )
    ys, z_last, checkpoints = call(
        *_coefficient_rows(coeffs, n, length, q),
        v.reshape(n * length, q),
        _flag_codes(flags, n, length),
        z0,
        y0,
        **attrs,
    )
    return ys.reshape(v.shape), z_last, checkpoints


def backward(res, cts):
    """The backward kernel, a custom-VJP rule for :func:`forward`.

    Args:
      res: ``(coeffs, v, z0, y0, flags, ys, checkpoints)``.
      cts: cotangents ``(g_ys [N, L, Q], g_z_L [N, Q])``.

    Returns:
      Gradients of ``(coeffs, v, z0, y0)``.
    """
    coeffs, v, z0, y0, flags, ys, checkpoints = res
    g_ys, g_zl = cts
    n, length, q, attrs = _sizes(v)
    varying = is_time_varying(coeffs)
    call = jax.ffi.ffi_call(
        _BACKWARD_TARGET,
        (
            _shape((n * length, q), v.dtype),
            _shape((6, n * length, q) if varying else (n, 6, q), v.dtype),
            _shape((n, q), v.dtype),
            _shape((n, q), v.dtype),
        ),
        vmap_method="sequential",
        input_output_aliases={12: 0},  # the input gradient overwrites g_ys
    )
    g_v, g_coeffs, g_z0, g_y0 = call(
        *_coefficient_rows(coeffs, n, length, q),
        v.reshape(n * length, q),
        _flag_codes(flags, n, length),
        z0,
        y0,
        ys.reshape(n * length, q),
        checkpoints,
        g_ys.astype(v.dtype).reshape(n * length, q),
        g_zl.astype(v.dtype),
        **attrs,
    )
    g_v = g_v.reshape(v.shape)
    if varying:
        return tuple(g_coeffs[i].reshape(v.shape) for i in range(6)), g_v, g_z0, g_y0
    g_coeffs = jnp.sum(g_coeffs, axis=0)
    return tuple(g_coeffs[i] for i in range(6)), g_v, g_z0, g_y0


_recurrence = with_adjoint(forward, backward)


def run(tr, v, z0, y0, flags: Flags | None):
    """``(ys [N, L, Q], z_L [N, Q], y_L [N, Q])`` for ``v [N, L, Q]``, ``z0, y0 [N, Q]``."""
    return run_custom(_recurrence, tr, v, z0, y0, flags)
