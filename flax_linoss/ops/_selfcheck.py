"""A one-time self-check of the Pallas kernels per device kind, before ``auto`` uses them.

The Pallas kernels were written and tested without a GPU or TPU (the CPU runs them in the
Pallas interpreter; their lowering for TPU and CUDA is tested). A kernel that fails to
compile, or computes wrong values, on real hardware would break every default run on that
platform. So before ``scan="auto"`` first picks ``pallas`` on a device kind, it compiles and
runs one small call, values and gradients (without and with flags), and compares it with
the pure-JAX paths (``chunked``; ``associative`` with flags). Any exception, a non-finite
value or a norm-relative difference above :data:`TOLERANCE` fails the check; ``auto`` then
uses ``chunked`` (``associative`` with flags) on that platform and logs one warning that
says how to report it.

The verdict is kept in memory and on disk, per platform, device kind, jax/jaxlib version and
kernel source (``<cache>/selfcheck/*.json``, the cache directory of the native kernel:
``$FLAX_LINOSS_CACHE_DIR``, else ``$XDG_CACHE_HOME/flax_linoss``, else
``~/.cache/flax_linoss``), so each machine pays the check (a few seconds of compiling) once.
It runs in a worker thread, so that it sees no trace or mesh of the caller (``auto`` is
resolved while a ``jit`` or ``shard_map`` is being traced). ``FLAX_LINOSS_SELFCHECK=0``
skips it (the kernels are then trusted). Where the process has no device of the platform
(lowering for TPU from a CPU host), there is nothing to check and nothing is cached.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)

#: Largest accepted ``max |pallas - reference| / max |reference|`` (values and each
#: gradient). The two float32 paths agree to about 1e-6 here; a broken kernel is off by O(1).
TOLERANCE = 1e-3
REPORT = (
    "please report it (with the output of `flax-linoss doctor`) in the flax-linoss issue tracker"
)
_SOURCES = ("pallas.py", "pallas_tpu.py", "pallas_gpu.py", "_common.py")

_lock = threading.Lock()
_verdicts: dict[tuple, Verdict] = {}
_warned: set[tuple] = set()


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The outcome of a self-check.

    Attributes:
      ok: the kernels compiled, ran and matched.
      platform: ``"tpu"``, ``"gpu"`` (or ``"cpu"``: the interpreter, for tests).
      device_kind: the device it ran on (``jax.Device.device_kind``).
      detail: the largest error per quantity, or the failure.
      seconds: how long the check took.
      cached: read from the disk cache rather than run in this process.
    """

    ok: bool
    platform: str
    device_kind: str
    detail: str
    seconds: float = 0.0
    cached: bool = False

    def line(self) -> str:
        """One line for logs and ``flax-linoss doctor``."""
        state = "passed" if self.ok else "FAILED"
        where = "cached" if self.cached else f"{self.seconds:.1f} s"
        return f"self-check on {self.device_kind} {state} ({where}): {self.detail}"


def switched_off() -> bool:
    """``FLAX_LINOSS_SELFCHECK=0``: trust the kernels without checking."""
    value = os.environ.get("FLAX_LINOSS_SELFCHECK", "1").strip().lower()
    return value in ("0", "false", "no", "off")


def device_for(platform: str):
    """The first device of ``platform`` in this process, or ``None``."""
    name = "gpu" if platform in ("gpu", "cuda", "rocm") else platform
    try:
        return jax.devices(name)[0]
    except RuntimeError:
        return None


def _source_hash() -> str:
    digest = hashlib.sha256()
    for name in _SOURCES:
        digest.update(resources.files("flax_linoss.ops._scans").joinpath(name).read_bytes())
    return digest.hexdigest()[:12]


def _key(platform: str, kind: str) -> tuple:
    import jaxlib

    return (platform, kind, jax.__version__, jaxlib.__version__, _source_hash())


def cache_file(key: tuple) -> Path:
    """Where the verdict of ``key`` is kept."""
    from flax_linoss.ops._scans.native import cache_dir

    platform, kind, jax_version, jaxlib_version, source = key
    kind = "".join(c if c.isalnum() or c in "-._" else "_" for c in kind)
    name = f"pallas-{platform}-{kind}-jax{jax_version}-jaxlib{jaxlib_version}-{source}.json"
    return cache_dir() / "selfcheck" / name


def _read(key: tuple) -> Verdict | None:
    try:
        data = json.loads(cache_file(key).read_text())
        return Verdict(**{**data, "cached": True})
    except (OSError, ValueError, TypeError):
        return None


def _write(key: tuple, verdict: Verdict) -> None:
    path = cache_file(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(verdict) | {"cached": False}))
        os.replace(tmp, path)  # atomic: concurrent processes leave one complete file
    except OSError as e:  # a read-only cache costs a re-check per process, nothing else
        logger.info("flax_linoss: cannot cache the pallas self-check in %s: %s", path, e)


def _problem():
    rng = np.random.default_rng(0)
    batch, length, feats, num_osc = 2, 300, 4, 8  # 300: two whole blocks of 128 and a part
    f32 = lambda x: np.asarray(x, np.float32)
    a = f32(rng.uniform(0.0, 1.0, num_osc))
    dt = f32(1 / (1 + np.exp(-rng.uniform(0.0, 1.0, num_osc))))
    b = f32(rng.uniform(-1, 1, (num_osc, feats, 2)) / 2)
    c = f32(rng.uniform(-1, 1, (feats, num_osc, 2)) / 3)
    d = f32(rng.normal(size=feats))
    u = f32(rng.normal(size=(batch, length, feats)))
    ct = f32(rng.normal(size=u.shape))
    mask = rng.uniform(size=(batch, length)) > 0.1
    segments = np.cumsum(rng.uniform(size=(batch, length)) < 0.02, axis=1)
    return u, a, dt, b, c, d, ct, mask, segments


def _values_and_grads(scan, args, ct, flags):
    from flax_linoss.ops._apply import linoss_apply

    def loss(u, a, dt, b, c, d):
        out = linoss_apply(u, a, dt, b, c, d, discretization="im", scan=scan, **flags)
        return jnp.sum(ct * out), out

    grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5), has_aux=True))(*args)
    names = ("y", "d/du", "d/da", "d/ddt", "d/db", "d/dc", "d/dd")
    return dict(zip(names, [np.asarray(x, np.float64) for x in (out, *grads)]))


def _run_check(platform: str, device, kernel: str | None) -> Verdict:
    from flax_linoss.ops._scans import pallas

    kind = device.device_kind
    start = time.perf_counter()
    worst = 0.0
    try:
        u, a, dt, b, c, d, ct, mask, segments = _problem()
        args = (u, a, dt, b, c, d)
        with jax.default_device(device), pallas.use_interpret_kernel(kernel or "tpu"):
            for flags, reference in (
                ({}, "chunked"),
                ({"mask": mask, "segment_ids": segments}, "associative"),
            ):
                got = _values_and_grads("pallas", args, ct, flags)
                want = _values_and_grads(reference, args, ct, flags)
                for name, ref in want.items():
                    x = got[name]
                    if not np.all(np.isfinite(x)):
                        raise ValueError(f"{name} has non-finite values")
                    err = float(np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-30))
                    worst = max(worst, err)
                    if err > TOLERANCE:
                        raise ValueError(
                            f"{name} differs from scan={reference!r} by {err:.2g} of its scale "
                            f"(flags: {bool(flags)})"
                        )
    except Exception as e:  # any failure of the kernels means: do not use them here
        message = (str(e).strip().splitlines() or [""])[0][:300]
        detail = f"{type(e).__name__}: {message}"
        return Verdict(False, platform, kind, detail, time.perf_counter() - start)
    detail = f"largest difference from the pure-JAX paths {worst:.1e} of scale"
    return Verdict(True, platform, kind, detail, time.perf_counter() - start)


def verdict(platform: str, *, device=None, kernel: str | None = None, cache: bool = True):
    """The self-check's :class:`Verdict` for ``platform`` (run once, then remembered).

    Args:
      platform: ``"tpu"`` or ``"gpu"`` (``"cpu"`` runs the interpreter: for tests).
      device: the device to check on (default: the platform's first).
      kernel: off TPU/GPU, which kernel the interpreter runs (``"tpu"``/``"gpu"``).
      cache: read and write the verdict in memory and on disk.

    Returns:
      The :class:`Verdict`, or ``None`` where the process has no device of ``platform``.
    """
    device = device or device_for(platform)
    if device is None:
        return None
    key = (*_key(platform, device.device_kind), kernel)
    with _lock:
        if cache and key in _verdicts:
            return _verdicts[key]
        found = _read(key[:5]) if cache and kernel is None else None
        if found is None:
            # A fresh thread: no trace, mesh or default-device context of the caller.
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                found = pool.submit(_run_check, platform, device, kernel).result()
            if cache and kernel is None:
                _write(key[:5], found)
        if cache:
            _verdicts[key] = found
        return found


def status(platform: str) -> str:
    """The self-check's state on ``platform``, in a line (runs it if it has not run)."""
    if switched_off():
        return "self-check skipped (FLAX_LINOSS_SELFCHECK=0)"
    result = verdict(platform)
    if result is None:
        return f"no {platform} device in this process to self-check"
    return result.line()


def pallas_ok(platform: str) -> bool:
    """Whether ``auto`` may use the Pallas kernels on ``platform`` (see the module doc)."""
    if switched_off():
        return True
    result = verdict(platform)
    if result is None or result.ok:
        return True
    key = (platform, result.device_kind)
    if key not in _warned:
        _warned.add(key)
        logger.warning(
            "flax_linoss: the Pallas kernels failed their self-check on %s (%s), so scan='auto' "
            "uses the pure-JAX 'chunked' path there (slower, correct); %s.",
            result.device_kind,
            result.detail,
            REPORT,
        )
    return False
