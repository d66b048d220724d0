"""The scan table: every way to run the recurrence, what it supports, where it runs.

One entry per :class:`Scan` name. Validation (:func:`check_scan`), the ``"auto"`` choice
(:mod:`flax_linoss.ops._auto`) and the dispatch in ``linoss_apply`` all read
:data:`SCAN_TABLE`; adding a path is one module in ``flax_linoss/ops/_scans/`` (a
``run(tr, v, z0, y0, flags) -> (ys, z_L, y_L)``, the :class:`ScanRun` contract) and one
entry here.

============= ===== ===== ====== ========= ===== =============================================
scan          flags dt(t) fwd AD platforms SPMD  what it is for
============= ===== ===== ====== ========= ===== =============================================
sequential    yes   yes   yes    any       yes   the reference (``lax.scan``, autodiff); ``jvp``
associative   yes   yes   flags  any       yes   log-depth prefix scan; flagged or time-varying
                                                 inputs under a multi-device ``jit`` on
                                                 accelerators
adjoint       yes   yes   no     any       yes   one loop + hand-written adjoint backward; the
                                                 fastest pure-JAX path on CPU
native        yes   yes   no     cpu       no    ``adjoint`` as a fused C++ kernel; fastest on
                                                 CPU
chunked       no    no    no     any       yes   chunked matmuls + a prefix over chunks; for
                                                 accelerators under a multi-device ``jit``
pallas        yes   yes   no     tpu, gpu  no    fused streaming kernels (Mosaic TPU, Triton
                                 (cpu:           GPU with compute capability >= 8.0);
                                 interp.)        accelerators per device; the CPU runs them
                                                 interpreted (slow)
============= ===== ===== ====== ========= ===== =============================================

*flags*: takes ``mask`` / ``segment_ids`` (per-step hold and reset). *dt(t)*: takes a
time-varying ``dt [..., L, P]`` (a transition and forcing per step; ``chunked`` is
time-invariant by construction, and ``auto`` routes such inputs around it). *fwd AD*: forward-mode
autodiff (``jvp``); every path has reverse mode. *SPMD*: XLA's SPMD partitioner can
split it over devices under a plain ``jit``; a custom call cannot be split (XLA gathers its
inputs onto every device: correct, not parallel), so ``auto`` uses kernels only where code
runs per device (a single-device process, ``shard_map``, ``pmap``).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import jax
import jax.numpy as jnp

from flax_linoss.ops._project import LNQ, NLQ

if TYPE_CHECKING:
    from flax_linoss.ops._scans._common import Flags
    from flax_linoss.ops.schemes import Transition


class Scan(str, enum.Enum):
    """Names of the scan paths (each member is also its plain string, e.g. ``"auto"``)."""

    AUTO = "auto"
    SEQUENTIAL = "sequential"
    ASSOCIATIVE = "associative"
    ADJOINT = "adjoint"
    NATIVE = "native"
    CHUNKED = "chunked"
    PALLAS = "pallas"

    def __str__(self) -> str:
        return self.value

    # Hash like the plain string it equals, so either spelling finds the same dict entry.
    __hash__ = str.__hash__


AUTO = Scan.AUTO
SEQUENTIAL = Scan.SEQUENTIAL
ASSOCIATIVE = Scan.ASSOCIATIVE
ADJOINT = Scan.ADJOINT
NATIVE = Scan.NATIVE
CHUNKED = Scan.CHUNKED
PALLAS = Scan.PALLAS
#: Every valid ``scan=`` value, as plain strings (for config validation).
SCANS: tuple[str, ...] = tuple(s.value for s in Scan)

_REMOVED = {
    "fft": (
        "it was removed: it never measured fastest anywhere (slower than 'adjoint' on CPU, an "
        "L-step loop in its power table on accelerators) and a NaN at one step spread to "
        "earlier steps through the FFT. Use 'chunked' (matmul-based, for accelerators) or "
        "'auto'"
    ),
}


class ScanRun(Protocol):
    """What every scan path's ``run`` is: ``(tr, v, z0, y0, flags) -> (ys, z_L, y_L)``.

    Args:
      tr: the transition on ``Q`` real channels: each field ``[Q]`` (time-invariant) or,
        for a path with :attr:`ScanPath.time_varying`, per step in the path's layout
        (``[N, L, Q]``, or ``[L, N, Q]`` for ``"lnq"``).
      v: the forcing in the path's layout.
      z0, y0: ``[N, Q]`` the state before the first step.
      flags: per-step hold / reset, or ``None``.

    Returns:
      ``ys`` (the positions, in the layout), ``z_L`` and ``y_L`` (``[N, Q]``, the final state).
    """

    def __call__(
        self,
        tr: Transition,
        v: jax.Array,
        z0: jax.Array,
        y0: jax.Array,
        flags: Flags | None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]: ...


@dataclasses.dataclass(frozen=True)
class ScanPath:
    """One row of the scan table.

    Attributes:
      scan: the name.
      summary: what it is, in a line.
      use: what it is for (where ``auto`` picks it, or why one would ask for it).
      run: a :class:`ScanRun`; ``None`` for ``auto``.
      flags: takes per-step flags (``mask``, ``segment_ids``).
      time_varying: takes per-step coefficients (a time-varying ``dt``).
      forward_ad: supports forward-mode autodiff (``jax.jvp``) without flags.
      platforms: where it runs (``"cpu"``, ``"gpu"``, ``"tpu"``).
      partitions: XLA's SPMD partitioner can split it over devices under a plain ``jit``.
      layout: ``"nlq"`` (``[N, L, Q]``) or ``"lnq"`` (time-major ``[L, N, Q]``).
      channels: ``(N, Q) -> Q'``, the channel count it needs (zero channels are added in
        the projections, for free), or ``None`` for ``Q``.
      unavailable: ``(platform, dtype) -> reason or None``.
    """

    scan: Scan
    summary: str
    use: str
    run: ScanRun | None
    flags: bool
    time_varying: bool
    forward_ad: bool
    platforms: tuple[str, ...]
    partitions: bool
    layout: str = NLQ
    channels: Callable[[int, int], int] | None = None
    unavailable: Callable[[str, jnp.dtype], str | None] | None = None

    def unavailable_reason(self, platform: str, dtype=jnp.float32) -> str | None:
        """Why this path cannot run on ``platform`` for a ``dtype`` recurrence, or ``None``."""
        if self.scan != AUTO and platform not in self.platforms:
            return f"it runs on {', '.join(self.platforms)}, not on {platform!r}"
        return None if self.unavailable is None else self.unavailable(platform, dtype)


def _run_sequential(*args):
    from flax_linoss.ops._scans import sequential

    return sequential.run(*args)


def _run_associative(*args):
    from flax_linoss.ops._scans import associative

    return associative.run(*args)


def _run_adjoint(*args):
    from flax_linoss.ops._scans import adjoint

    return adjoint.run(*args)


def _run_native(*args):
    from flax_linoss.ops._scans import native

    return native.run(*args)


def _native_unavailable(platform, dtype):
    from flax_linoss.ops._scans import native

    return None if native.available() else native.unavailable_reason()


def _run_chunked(*args):
    from flax_linoss.ops._scans import chunked

    return chunked.run(*args)


def _run_pallas(*args):
    from flax_linoss.ops._scans import pallas

    return pallas.run(*args)


def _pallas_channels(n, q):
    from flax_linoss.ops._scans import pallas

    return pallas.channels(n, q)


def _pallas_unavailable(platform, dtype):
    from flax_linoss.ops._scans import pallas

    return pallas.unavailable_reason(platform, dtype)


_ALL = ("cpu", "gpu", "tpu")
SCAN_TABLE: dict[Scan, ScanPath] = {
    p.scan: p
    for p in (
        ScanPath(
            AUTO,
            "picks a path per platform, device context and input (see flax_linoss.ops._auto)",
            "the default",
            None,
            flags=True,
            time_varying=True,
            forward_ad=False,
            platforms=_ALL,
            partitions=True,
        ),
        ScanPath(
            SEQUENTIAL,
            "lax.scan of the 2x2 update, autodiff backward",
            "the reference; forward-mode autodiff (jvp)",
            _run_sequential,
            flags=True,
            time_varying=True,
            forward_ad=True,
            platforms=_ALL,
            partitions=True,
        ),
        ScanPath(
            ASSOCIATIVE,
            "parallel prefix scan, O(log L) depth (Hillis-Steele with M^(2^i) per level and an "
            "adjoint backward; lax.associative_scan over per-step (A, b) with flags)",
            "auto's choice for flagged or time-varying inputs under a multi-device jit on "
            "accelerators",
            _run_associative,
            flags=True,
            time_varying=True,
            forward_ad=False,
            platforms=_ALL,
            partitions=True,
        ),
        ScanPath(
            ADJOINT,
            "one loop over time, hand-written adjoint backward in one more loop",
            "fastest pure-JAX path on CPU; auto's CPU choice where the native kernel cannot run",
            _run_adjoint,
            flags=True,
            time_varying=True,
            forward_ad=False,
            platforms=_ALL,
            partitions=True,
        ),
        ScanPath(
            NATIVE,
            "the adjoint algorithm as a fused C++ kernel (XLA FFI), compiled on first use",
            "fastest on CPU; auto's CPU choice per device",
            _run_native,
            flags=True,
            time_varying=True,
            forward_ad=False,
            platforms=("cpu",),
            partitions=False,
            unavailable=_native_unavailable,
        ),
        ScanPath(
            CHUNKED,
            "chunked Toeplitz matmuls from M^j, a prefix over chunks, the carries' response "
            "in closed form; adjoint backward by the same solver",
            "accelerators under a multi-device jit, GPUs older than compute capability 8.0",
            _run_chunked,
            flags=False,
            time_varying=False,
            forward_ad=False,
            platforms=_ALL,
            partitions=True,
        ),
        ScanPath(
            PALLAS,
            "fused streaming kernels: Mosaic on TPU (time-major (8, 128) tiles, VMEM carry), "
            "Triton on GPU (chunk-parallel); one checkpoint per 128 steps, recomputing backward",
            "auto's choice on TPU and GPU (compute capability >= 8.0) per device; on CPU it "
            "runs in the Pallas interpreter (slow: for tests)",
            _run_pallas,
            flags=True,
            time_varying=True,
            forward_ad=False,
            platforms=_ALL,
            partitions=False,
            layout=LNQ,
            channels=_pallas_channels,
            unavailable=_pallas_unavailable,
        ),
    )
}


def check_scan(scan: str) -> str:
    """Returns ``scan`` if it names a path in :data:`SCAN_TABLE`, else raises ``ValueError``."""
    if isinstance(scan, str) and scan in _REMOVED:
        raise ValueError(f"Unknown scan {scan!r}: {_REMOVED[scan]}. Choices: {list(SCANS)}.")
    if not isinstance(scan, str) or scan not in SCANS:
        raise ValueError(f"Unknown scan {scan!r}; expected one of {list(SCANS)}.")
    return scan
