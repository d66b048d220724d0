"""What ``scan="auto"`` runs, and the checks on an explicit ``scan``.

The rule (evidence: ``benchmarks/RESULTS.md``; the accelerator half follows the memory-
traffic model there until ``benchmarks/bench_device.py`` has run on a device):

* CPU: ``native`` (the fused C++ kernel, measured fastest) where code runs per device; else
  ``adjoint`` (under a multi-device ``jit``, or where the kernel cannot be built).
* TPU, and GPU with compute capability >= 8.0: ``pallas`` (the fused kernels: about 2S
  bytes forward and 5S forward+backward for an ``[N, L, Q]`` array of S bytes, the floor)
  where code runs per device and the recurrence is float32; else ``chunked`` (partitions
  under a multi-device ``jit``; about 8S / 23S), or ``associative`` for flagged or
  time-varying inputs there (``chunked`` takes neither).
* Other platforms: ``chunked`` (``associative`` with flags or a time-varying ``dt``).

"Per device" means a single-device process, or inside ``shard_map``/``pmap`` (every mesh
axis manual): elsewhere XLA's SPMD partitioner may split the batch over devices, and it
cannot split a custom call (it would gather the inputs onto every device).

``FLAX_LINOSS_KERNELS=0`` turns both kernels (``native``, ``pallas``) off: ``auto`` then
takes the pure-JAX path of the platform, and asking for a kernel explicitly is an error.
``FLAX_LINOSS_NATIVE=0`` turns off the CPU kernel alone.

Before ``auto`` first picks ``pallas`` on a device kind, the kernels pass a one-time
self-check there (:mod:`flax_linoss.ops._selfcheck`); if they fail it, ``auto`` takes the
pure-JAX path instead and says so once. :func:`explain` lists the choices and their reasons
(``flax-linoss doctor`` prints them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flax_linoss.ops import table
from flax_linoss.ops.table import SCAN_TABLE, Scan


def platform_name(platform: str | None = None) -> str:
    """``"cpu"``, ``"gpu"`` or ``"tpu"`` (``"cuda"``/``"rocm"`` count as GPU)."""
    platform = platform or jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


def per_device() -> bool:
    """Whether traced code works on one device's data: a single-device process, or inside
    ``shard_map``/``pmap`` (every mesh axis manual)."""
    if jax.device_count() == 1:
        return True
    get_mesh = getattr(jax.sharding, "get_abstract_mesh", None)
    if get_mesh is None:
        return False
    mesh = get_mesh()
    manual = jax.sharding.AxisType.Manual
    return bool(mesh.axis_names) and all(t == manual for t in mesh.axis_types)


def resolve_scan(
    scan: str,
    *,
    flags: bool = False,
    time_varying: bool = False,
    platform: str | None = None,
    dtype=jnp.float32,
) -> Scan:
    """The path to run for ``scan`` (``"auto"`` resolved by the rule in this module's doc).

    Args:
      scan: a name in :data:`flax_linoss.ops.SCANS`.
      flags: whether the input has a ``mask`` or ``segment_ids``.
      time_varying: whether ``dt`` has a time axis (a transition per step).
      platform: ``"cpu"``, ``"gpu"``/``"cuda"``/``"rocm"`` or ``"tpu"`` (default: JAX's
        default backend).
      dtype: the recurrence dtype (float32, or float64 with float64 parameters).

    Raises:
      ValueError: an unknown or removed name, flags or a time-varying ``dt`` on a path
        without them, a path that does not run on ``platform`` (e.g. ``"native"`` off the
        CPU).
      RuntimeError: a kernel asked for where it cannot run (the message says why).
    """
    scan = Scan(table.check_scan(scan))
    platform = platform_name(platform)
    entry = SCAN_TABLE[scan]
    if flags and not entry.flags:
        takes = [s.value for s, p in SCAN_TABLE.items() if p.flags and s != Scan.AUTO]
        raise ValueError(
            f"scan={scan.value!r} needs a time-invariant transition and cannot apply `mask` or "
            f"`segment_ids`; use one of {takes} or 'auto'."
        )
    if time_varying and not entry.time_varying:
        takes = [s.value for s, p in SCAN_TABLE.items() if p.time_varying and s != Scan.AUTO]
        raise ValueError(
            f"scan={scan.value!r} is time-invariant by construction and cannot take a `dt` "
            f"with a time axis (a transition per step); use one of {takes} or 'auto'."
        )
    if scan == Scan.NATIVE and platform != "cpu":
        raise ValueError(
            f"scan='native' is a CPU kernel; the platform here is {platform!r}. Use 'auto' "
            "(or 'pallas' / 'chunked') on accelerators."
        )
    if scan != Scan.AUTO:
        reason = entry.unavailable_reason(platform, dtype)
        if reason is not None:
            raise RuntimeError(
                f"scan={scan.value!r} is unavailable: {reason}. Use 'auto' (it falls back)."
            )
        return scan
    return _auto(platform, flags or time_varying, dtype)


def _auto(platform: str, per_step: bool, dtype) -> Scan:
    """``per_step``: flags or a time-varying ``dt`` (which ``chunked`` cannot take)."""
    return _choose(platform, per_step, dtype, per_device())[0]


def _choose(platform: str, per_step: bool, dtype, device_local: bool) -> tuple[Scan, str]:
    """``auto``'s path and why, for a platform, per-step inputs (flags or a time-varying
    ``dt``), dtype and device context."""
    if platform == "cpu":
        if not device_local:
            return Scan.ADJOINT, (
                "fastest pure-JAX path on CPU; the native kernel is a custom call, which XLA "
                "cannot split over devices"
            )
        reason = SCAN_TABLE[Scan.NATIVE].unavailable_reason(platform, dtype)
        if reason is None:
            return Scan.NATIVE, "the fused C++ kernel, measured fastest on CPU"
        return Scan.ADJOINT, f"native unavailable: {reason}"
    fallback = Scan.ASSOCIATIVE if per_step else Scan.CHUNKED
    if platform not in ("tpu", "gpu"):
        return fallback, f"no fused kernel for {platform!r}"
    if not device_local:
        return fallback, "partitions under a multi-device jit (a custom call cannot be split)"
    reason = SCAN_TABLE[Scan.PALLAS].unavailable_reason(platform, dtype)
    if reason is not None:
        return fallback, f"pallas unavailable: {reason}"
    from flax_linoss.ops import _selfcheck

    if not _selfcheck.pallas_ok(platform):
        return fallback, f"pallas failed its self-check: {_selfcheck.status(platform)}"
    return Scan.PALLAS, (
        f"the fused Pallas kernels (by the memory-traffic model); {_selfcheck.status(platform)}"
    )


def native_or(where: str, scan: str, fallback: str, obstacle: str | None = None) -> str:
    """The path of an op with one fused CPU kernel (``"native"``) and one pure-JAX form
    (``fallback``): ``scan`` is ``"native"``, ``fallback`` or ``"auto"``, which takes the
    kernel where it can run and code runs per device (XLA cannot split a custom call over
    devices). ``obstacle``: why this call cannot take the kernel (``None``: it can).

    Raises:
      ValueError: an unknown ``scan``, or ``"native"`` where the kernel cannot run (saying
        why).
    """
    choices = ("auto", fallback, "native")
    if scan not in choices:
        raise ValueError(f"Unknown scan {scan!r} for {where}; expected one of {choices}.")
    if scan == fallback:
        return scan
    from flax_linoss.ops._scans import native

    why = obstacle
    if why is None and platform_name() != "cpu":
        why = f"it is a CPU kernel (the platform is {platform_name()!r})"
    if why is None and not native.available():
        why = f"the kernel is unavailable ({native.unavailable_reason()})"
    if scan == "native":
        if why is not None:
            raise ValueError(f"{where}: scan='native' cannot run here: {why}. Use 'auto'.")
        return scan
    return "native" if why is None and per_device() else fallback


def explain(platform: str | None = None, dtype=jnp.float32) -> list[tuple[str, bool, Scan, str]]:
    """``auto``'s choices on ``platform``: ``(context, flags, path, reason)`` for code per
    device and under a multi-device ``jit``, without and with ``mask``/``segment_ids``.

    On TPU/GPU this runs the kernels' self-check if it has not run yet.
    """
    platform = platform_name(platform)
    rows = []
    for context, local in (("per device", True), ("multi-device jit", False)):
        for flags in (False, True):
            rows.append((context, flags, *_choose(platform, flags, dtype, local)))
    return rows
