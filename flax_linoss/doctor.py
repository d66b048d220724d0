"""``flax-linoss doctor``: what this installation runs on and what it would run.

For bug reports and for Colab users: the Python and package versions, the platform and its
devices, the CPU kernel's state, what ``scan="auto"`` picks here and why (the scan table's
reasons, per device and under a multi-device ``jit``, without and with ``mask`` /
``segment_ids``), the Pallas kernels' self-check on a GPU/TPU (run now if it has not run on
this device kind; see :mod:`flax_linoss.ops._selfcheck`), and the data and cache
directories.
"""

from __future__ import annotations

import collections
import importlib.metadata
import os
import platform
import sys

#: Distributions whose versions are reported (name in the report, distribution name).
PACKAGES = (
    ("flax-linoss", "flax-linoss"),
    ("jax", "jax"),
    ("jaxlib", "jaxlib"),
    ("flax", "flax"),
    ("optax", "optax"),
    ("orbax", "orbax-checkpoint"),
    ("grain", "grain"),
    ("tfds", "tensorflow-datasets"),
    ("numpy", "numpy"),
    ("ml_collections", "ml_collections"),
)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> list[str]:
    """The report, line by line."""
    import jax

    from flax_linoss.data import paths
    from flax_linoss.ops import _auto, _selfcheck
    from flax_linoss.ops._scans import native

    lines = ["flax-linoss doctor", ""]
    lines.append(f"python        {sys.version.split()[0]} ({platform.platform()})")
    lines.append(
        "versions      " + ", ".join(f"{name} {_version(dist)}" for name, dist in PACKAGES)
    )
    backend = _auto.platform_name()
    devices = jax.devices()
    kinds = collections.Counter(d.device_kind for d in devices)
    lines.append(
        f"platform      {backend} ({jax.default_backend()}): {len(devices)} device(s) in "
        f"{jax.process_count()} process(es): "
        + ", ".join(f"{n} x {kind}" for kind, n in kinds.items())
    )
    if backend == "cpu":
        ok = native.available()
        lines.append(f"native kernel {'available' if ok else native.unavailable_reason()}")
    lines.append("")
    lines.append(f"scan='auto' on {backend} (see flax_linoss.ops.SCAN_TABLE):")
    for context, flags, path, reason in _auto.explain(backend):
        flagged = "with mask/segments" if flags else "no mask/segments  "
        lines.append(f"  {context:<16}  {flagged}  -> {path.value:<11}  {reason}")
    lines.append("")
    if backend in ("tpu", "gpu"):
        lines.append(f"pallas        {_selfcheck.status(backend)}")
    else:
        lines.append(f"pallas        not used by 'auto' on {backend} (no self-check needed)")
    checked = sorted((native.cache_dir() / "selfcheck").glob("*.json"))
    for path in checked:
        lines.append(f"              cached verdict: {path.name}")
    lines.append(f"cache dir     {native.cache_dir()}")
    data = paths.data_dir()
    lines.append(f"data dir      {data}{'' if data.is_dir() else ' (does not exist yet)'}")
    env = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("FLAX_LINOSS_")]
    env += [f"{k}={v}" for k, v in sorted(os.environ.items()) if k in ("JAX_PLATFORMS",)]
    lines.append("environment   " + (" ".join(env) if env else "(no FLAX_LINOSS_* variables)"))
    return lines


def main() -> None:
    """Prints the report."""
    print("\n".join(report()))
