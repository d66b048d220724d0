"""``scan="native"``: fused C++ kernels on CPU, as XLA FFI custom calls: the LinOSS
recurrence's, the outer-product recurrence's (:mod:`flax_linoss.ops.outer`, see
:func:`outer_run`) and the short causal convolution's (:mod:`flax_linoss.ops.conv`, see
:func:`conv_run`). The kernel sources (``csrc/lti_recurrence.cc``,
``csrc/outer_recurrence.cc``, ``csrc/causal_conv.cc`` and their shared ``csrc/ffi_util.h``)
ship with the
package and are compiled, into one library, on first use with the machine's C++ compiler
(``$CXX``, else ``c++``/``g++``/``clang++``) against the XLA FFI headers that jaxlib
ships, then cached (``$FLAX_LINOSS_CACHE_DIR``, else ``$XDG_CACHE_HOME/flax_linoss``, else
``~/.cache/flax_linoss``), keyed by the sources, the flags, the compiler, jaxlib and the
CPU. Compiling takes about ten seconds (the sources side by side), once per machine.

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

The outer-product recurrence's kernels (:func:`outer_run`) work the same way on (batch row,
head) items: the forward pass writes the outputs, the final state and a checkpoint of the
``[K, V]`` state every :data:`OUTER_CHUNK` steps; the backward pass recomputes each chunk's
states from its checkpoint and runs the exact adjoint back through it, its state
transposed (``[V, K]``) so that the sums over the value dims run across vectors. The
convolution's kernels (:func:`conv_run`) keep each batch row's buffer of the last ``W - 1``
valid inputs; backwards, the buffer's cotangent shifts back to the inputs it held. Both
take the same flags, float32 and float64, and the same fallback: where the library cannot
be built, ``"auto"`` runs their pure-JAX forms.
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

from flax_linoss.ops._scans._common import (
    Flags,
    is_time_varying,
    run_custom,
    typed_vjp,
    with_adjoint,
)

logger = logging.getLogger(__name__)

# Steps between velocity checkpoints: the backward pass keeps CHUNK x Q velocities in cache.
CHUNK = 64
_SOURCES = ("lti_recurrence.cc", "outer_recurrence.cc", "causal_conv.cc")
_HEADERS = ("ffi_util.h",)
# FFI target name -> the library's handler symbol.
_TARGETS = {
    "flax_linoss_lti_forward": "FlaxLinossLtiForward",
    "flax_linoss_lti_backward": "FlaxLinossLtiBackward",
    "flax_linoss_outer_forward": "FlaxLinossOuterForward",
    "flax_linoss_outer_backward": "FlaxLinossOuterBackward",
    "flax_linoss_conv_forward": "FlaxLinossConvForward",
    "flax_linoss_conv_backward": "FlaxLinossConvBackward",
}
(
    _FORWARD_TARGET,
    _BACKWARD_TARGET,
    _OUTER_FORWARD,
    _OUTER_BACKWARD,
    _CONV_FORWARD,
    _CONV_BACKWARD,
) = _TARGETS
_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-w")
# Tuned for this CPU where the compiler can (the cache key includes the CPU), else generic.
_ARCH_FLAGS = (("-march=native",), ())

_lock = threading.Lock()
_state: dict[str, object] = {}


def _source_texts() -> dict[str, str]:
    """Every file the library is built from, by name."""
    csrc = resources.files("flax_linoss.ops").joinpath("csrc")
    return {name: csrc.joinpath(name).read_text() for name in (*_SOURCES, *_HEADERS)}


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

    sources = _source_texts()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False
    ).stdout
    key = hashlib.sha256(
        "\0".join(
            [*sources.values(), " ".join(_FLAGS), version, jaxlib.__version__, _cpu_signature()]
        ).encode()
    ).hexdigest()[:20]
    out = cache_dir() / f"kernels-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        for name, text in sources.items():
            (Path(tmp) / name).write_text(text)
        lib = Path(tmp) / out.name
        for arch in _ARCH_FLAGS:
            # The sources compile side by side (one process each), then link into one library.
            include = f"-I{jax.ffi.include_dir()}"
            cmds = [
                [compiler, *_FLAGS, *arch, include, "-c", str(Path(tmp) / n), "-o", f"{tmp}/{n}.o"]
                for n in _SOURCES
            ]
            cmds.append([compiler, "-shared", *[c[-1] for c in cmds], "-o", str(lib)])
            failed = _run_all(cmds[:-1]) or _run_all(cmds[-1:])
            if failed is None:
                os.replace(lib, out)  # atomic: concurrent builders leave one complete file
                return out
            errors.append(failed)
    raise RuntimeError("\n".join(errors))


def _run_all(cmds) -> str | None:
    """Runs the commands concurrently; ``None``, or what the first that failed said."""
    procs = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds
    ]
    failed = None
    for cmd, proc in zip(cmds, procs):
        _, err = proc.communicate()
        if proc.returncode != 0 and failed is None:
            failed = f"`{' '.join(cmd)}` failed:\n{err[-2000:]}"
    return failed


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
    for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
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


# ----------------------------------------------------------------------------------------
# The outer-product recurrence (flax_linoss.ops.outer).

#: Steps between the outer kernel's state checkpoints: its backward pass keeps
#: ``OUTER_CHUNK + 1`` states of ``2 K V`` values per (batch row, head) in cache.
OUTER_CHUNK = 32


def _outer_attrs(q, v):
    n, length, heads, key_dim = q.shape
    sizes = (n, length, heads, key_dim, v.shape[-1])
    attrs = dict(length=np.int64(length), heads=np.int64(heads), chunk=np.int64(OUTER_CHUNK))
    return sizes, attrs


def _outer_forward(coeffs, q, k, v, z0, y0, codes):
    (n, length, heads, key_dim, value_dim), attrs = _outer_attrs(q, v)
    chunks = -(-length // OUTER_CHUNK)
    state = _shape((n, heads, key_dim, value_dim), q.dtype)
    call = jax.ffi.ffi_call(
        _OUTER_FORWARD,
        (
            _shape((n * length, heads * value_dim), q.dtype),
            state,
            state,
            _shape((n, heads, chunks, 2, key_dim, value_dim), q.dtype),
        ),
        vmap_method="sequential",
    )
    rows = lambda x: x.reshape(n * length, -1)
    o, z_l, y_l, checkpoints = call(*coeffs, rows(q), rows(k), rows(v), codes, z0, y0, **attrs)
    return (o.reshape(v.shape), z_l, y_l), checkpoints


def _outer_backward(res, cts):
    (coeffs, q, k, v, _, _, codes), checkpoints = res
    (n, length, heads, key_dim, value_dim), attrs = _outer_attrs(q, v)
    g_o, g_zl, g_yl = (x.astype(q.dtype) for x in cts)
    state = _shape((n, heads, key_dim, value_dim), q.dtype)
    call = jax.ffi.ffi_call(
        _OUTER_BACKWARD,
        (
            _shape((n * length, heads * key_dim), q.dtype),
            _shape((n * length, heads * key_dim), q.dtype),
            _shape((n * length, heads * value_dim), q.dtype),
            _shape((n, 8, heads * key_dim), q.dtype),
            state,
            state,
        ),
        vmap_method="sequential",
    )
    rows = lambda x: x.reshape(n * length, -1)
    g_q, g_k, g_v, g_c, g_z0, g_y0 = call(
        *coeffs, rows(q), rows(k), rows(v), codes, checkpoints, rows(g_o), g_zl, g_yl, **attrs
    )
    g_c = jnp.sum(g_c, axis=0)
    g_coeffs = tuple(g_c[i] for i in range(len(coeffs)))
    return g_coeffs, g_q.reshape(q.shape), g_k.reshape(k.shape), g_v.reshape(v.shape), g_z0, g_y0


_outer = typed_vjp(_outer_forward, _outer_backward)


def outer_run(coeffs, q, k, v, z0, y0, flags: Flags | None):
    """The outer-product recurrence by the fused kernels (time-invariant coefficients).

    Args:
      coeffs: eight ``[H * K]`` arrays: the transition ``(m11, m12, m21, m22, f1, f2)`` and
        the readout ``(c_z, c_y)`` of every (head, key dim).
      q, k: ``[N, L, H, K]``; v: ``[N, L, H, V]``; all in the recurrence dtype.
      z0, y0: ``[N, H, K, V]`` the state before the first step.
      flags: a :class:`~._common.Flags` of ``[N, L]`` bools (hold = masked, reset = a
        segment start), or ``None``.

    Returns:
      ``(o [N, L, H, V], z_L, y_L)``; differentiable once (reverse mode), like
      :func:`forward`.
    """
    if not available():
        raise RuntimeError(f"The native kernel is unavailable: {unavailable_reason()}")
    n, length = q.shape[:2]
    return _outer(tuple(coeffs), q, k, v, z0, y0, _flag_codes(flags, n, length))


# ----------------------------------------------------------------------------------------
# The short causal convolution (flax_linoss.ops.conv).


def _conv_forward(xs, w, buf0, codes):
    out = (_shape(buf0.shape, w.dtype), *(_shape(x.shape, w.dtype) for x in xs))
    call = jax.ffi.ffi_call(_CONV_FORWARD, out, vmap_method="sequential")
    last, *ys = call(w, codes, buf0, *xs)
    return tuple(ys), last


def _conv_backward(res, cts):
    (xs, w, buf0, codes), _ = res
    g_ys, g_last = cts
    g_ys = tuple(g.astype(w.dtype) for g in g_ys)
    out = (
        _shape((buf0.shape[0], *w.shape), w.dtype),
        _shape(buf0.shape, w.dtype),
        *(_shape(x.shape, w.dtype) for x in xs),
    )
    call = jax.ffi.ffi_call(_CONV_BACKWARD, out, vmap_method="sequential")
    g_w, g_buf0, *g_xs = call(w, codes, buf0, g_last.astype(w.dtype), *xs, *g_ys)
    return tuple(g_xs), jnp.sum(g_w, axis=0), g_buf0


_conv = typed_vjp(lambda *args: (_conv_forward(*args), None), _conv_backward)


def conv_run(xs, w, buf0, flags: Flags | None):
    """The short causal convolution by the fused kernels (no bias).

    Args:
      xs: the streams, a tuple of ``[N, L, D_s]``, side by side in the channels of ``w`` and
        the buffers (``D`` in all).
      w: ``[W, D]`` taps (``w[W - 1]`` the current step's); buf0: ``[N, W - 1, D]`` the
        buffer before the first step (oldest first); all in one dtype.
      flags: a :class:`~._common.Flags` of ``[N, L]`` bools (hold = masked, reset = a
        segment start), or ``None``.

    Returns:
      ``(the streams' y, each [N, L, D_s]; the buffer after the last step [N, W - 1,
      D])``; differentiable once (reverse mode).
    """
    if not available():
        raise RuntimeError(f"The native kernel is unavailable: {unavailable_reason()}")
    n, length = xs[0].shape[:2]
    return _conv(tuple(xs), w, buf0, _flag_codes(flags, n, length))
