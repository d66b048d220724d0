"""Data parallelism: a device mesh and three interchangeable train-step implementations.

The mesh has a ``data`` axis (the batch is split over it) and a ``model`` axis (room for model
parallelism; parameters are replicated over it for now). The implementations take the same
*global-view* step function semantics and give the same parameters to float tolerance:

* ``"jit"``: ``jax.jit`` with ``NamedSharding`` in/out shardings; the state is replicated and
  the batch is sharded over ``data``. XLA inserts the gradient all-reduce, and batch-norm
  statistics are over the global batch by construction (the model uses no axis name).
* ``"shard_map"``: ``jax.shard_map`` over the mesh; each device computes the loss of its slice,
  gradients and metrics are averaged with an explicit ``lax.pmean`` over ``data``, and the
  model's batch norm averages its statistics over ``data`` (``norm_axis_name="data"``).
* ``"pmap"``: ``jax.pmap`` over the local devices with ``axis_name="data"``; the state carries
  a leading device axis. Multi-host pmap spans every process's devices.

Dropout: ``jit`` draws one mask for the global batch (the same for any device count, JAX's
threefry being partitionable); ``shard_map`` and ``pmap`` fold the device index into the key, so
their masks differ from ``jit``'s (same distribution). With ``dropout_rate=0`` all three agree.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "DATA_AXIS",
    "MODEL_AXIS",
    "Parallel",
    "make_mesh",
    "pmap_available",
    "to_host",
]

DATA_AXIS = "data"
MODEL_AXIS = "model"


def pmap_available() -> tuple[bool, str]:
    """Whether the installed JAX provides ``jax.pmap``, and a note when it warns or lacks it."""
    if not hasattr(jax, "pmap"):
        return False, (
            f"jax {jax.__version__} has no jax.pmap; use parallel.implementation='jit' or "
            "'shard_map' (same results)."
        )
    return True, ""


def make_mesh(num_devices: int = 0, model_axis_size: int = 1) -> jax.sharding.Mesh:
    """A ``(data, model)`` mesh over all devices (or the first ``num_devices`` local ones).

    Both axes are ``Auto`` so ``jit`` propagates shardings and ``shard_map`` accepts inputs.
    Devices are ordered by process, so each process's batch shard lands on its own devices.
    """
    devices = jax.devices()
    if num_devices:
        if jax.process_count() > 1:
            raise ValueError("parallel.num_devices must be 0 (all devices) with several processes")
        if num_devices > len(devices):
            raise ValueError(f"parallel.num_devices={num_devices} but only {len(devices)} exist")
        devices = devices[:num_devices]
    n = len(devices)
    if n % model_axis_size:
        raise ValueError(
            f"{n} devices cannot form a mesh with parallel.model_axis_size={model_axis_size}"
        )
    return jax.make_mesh(
        (n // model_axis_size, model_axis_size),
        (DATA_AXIS, MODEL_AXIS),
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=devices,
    )


def to_host(x: Any) -> np.ndarray:
    """A numpy copy of a (possibly not fully addressable, replicated) array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


# A step function: (state, batch, axis_name | None) -> (state, metrics). ``axis_name`` is None
# for the global-view (jit) form, "data" inside shard_map / pmap.
StepFn = Callable[[Any, Any, str | None], tuple[Any, Any]]


class Parallel:
    """Places states and batches, and runs the train step with one implementation.

    Args:
        implementation: ``"jit"``, ``"shard_map"`` or ``"pmap"``.
        mesh: From :func:`make_mesh`.
        step_fn: ``(state, batch, axis_name) -> (state, metrics)``; with an axis name it must
            average gradients and metrics over it.
    """

    def __init__(self, implementation: str, mesh: jax.sharding.Mesh, step_fn: StepFn):
        self.implementation = implementation
        self.mesh = mesh
        self.replicated = NamedSharding(mesh, P())
        self.batch_sharding = NamedSharding(mesh, P(DATA_AXIS))
        self.data_size = mesh.shape[DATA_AXIS]
        if implementation == "jit":
            self._step = jax.jit(
                lambda s, b: step_fn(s, b, None),
                in_shardings=(self.replicated, self.batch_sharding),
                out_shardings=(self.replicated, self.replicated),
            )
        elif implementation == "shard_map":
            mapped = jax.shard_map(
                lambda s, b: step_fn(s, b, DATA_AXIS),
                mesh=mesh,
                in_specs=(P(), P(DATA_AXIS)),
                out_specs=(P(), P()),
                check_vma=False,
            )
            self._step = jax.jit(
                mapped,
                in_shardings=(self.replicated, self.batch_sharding),
                out_shardings=(self.replicated, self.replicated),
            )
        elif implementation == "pmap":
            ok, why = pmap_available()
            if not ok:
                raise RuntimeError(why)
            if mesh.shape[MODEL_AXIS] != 1:
                raise ValueError("pmap cannot use a model axis (parallel.model_axis_size=1)")
            local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
            self.local_devices = local
            with warnings.catch_warnings():
                warnings.simplefilter("error", DeprecationWarning)
                try:
                    self._step = jax.pmap(
                        lambda s, b: step_fn(s, b, DATA_AXIS), axis_name=DATA_AXIS, devices=local
                    )
                except DeprecationWarning as e:  # pragma: no cover - depends on the JAX version
                    raise RuntimeError(
                        f"jax {jax.__version__} deprecates jax.pmap ({e}); use "
                        "parallel.implementation='jit' or 'shard_map'."
                    ) from e
        else:
            raise ValueError(f"Unknown parallel implementation {implementation!r}")

    # ---- states -------------------------------------------------------------------------
    def replicate(self, tree: Any) -> Any:
        """Canonical tree -> replicated over the mesh (``NamedSharding(mesh, P())``)."""
        return jax.tree.map(lambda a: jax.device_put(to_host(a), self.replicated), tree)

    def put_state(self, state: Any) -> Any:
        """Canonical (replicated) state -> the layout the step takes."""
        if self.implementation == "pmap":
            n = len(self.local_devices)
            return jax.tree.map(lambda a: np.broadcast_to(to_host(a), (n, *np.shape(a))), state)
        return self.replicate(state)

    def canonical_state(self, state: Any) -> Any:
        """The step's layout -> a state replicated over the mesh (for eval and checkpoints)."""
        if self.implementation == "pmap":
            return jax.tree.map(
                lambda a: (
                    jax.device_put(
                        np.asarray(a.addressable_data(0)).reshape(a.shape[1:]), self.replicated
                    )
                    if isinstance(a, jax.Array)
                    else jax.device_put(np.asarray(a)[0], self.replicated)
                ),
                state,
            )
        return state

    # ---- batches ------------------------------------------------------------------------
    def put_batch(self, batch: dict[str, np.ndarray], *, for_step: bool = True) -> Any:
        """This process's rows ``[B_local, ...]`` -> the global batch the step (or eval) takes.

        ``for_step=False`` always gives the mesh-sharded global array (evaluation uses ``jit``).
        """
        if for_step and self.implementation == "pmap":
            n = len(self.local_devices)
            return jax.tree.map(lambda a: a.reshape(n, a.shape[0] // n, *a.shape[1:]), batch)
        return jax.tree.map(
            lambda a: jax.make_array_from_process_local_data(self.batch_sharding, a), batch
        )

    def lower(self, state: Any, batch: Any):
        """The step lowered for ``state`` and ``batch`` (``.compile()``, memory analysis)."""
        return self._step.lower(state, batch)

    def step(self, state: Any, batch: Any) -> tuple[Any, Any]:
        """One train step; metrics come back replicated (pmap: the first device's copy)."""
        state, metrics = self._step(state, batch)
        if self.implementation == "pmap":
            metrics = jax.tree.map(lambda a: a[0], metrics)
        return state, metrics


def check_batch(global_batch: int, parallel: Parallel) -> None:
    """Raises ``ValueError`` unless the global batch splits evenly over the data axis."""
    n = parallel.data_size
    if global_batch % n:
        raise ValueError(
            f"batch size {global_batch} does not split over {n} data-parallel devices; use a "
            f"multiple of {n}"
        )
    per_process = global_batch // jax.process_count()
    if parallel.implementation == "pmap" and per_process % len(parallel.local_devices):
        raise ValueError(
            f"pmap needs the per-process batch {per_process} to split over "
            f"{len(parallel.local_devices)} local devices"
        )


def pmean(tree: Any, axis_name: str | None) -> Any:
    """``lax.pmean`` over ``axis_name`` (identity when ``None``)."""
    if axis_name is None:
        return tree
    return jax.tree.map(lambda a: jax.lax.pmean(a, axis_name), tree)


def device_fold(key: jax.Array, axis_name: str | None) -> jax.Array:
    """Folds the device index along ``axis_name`` into ``key`` (unchanged when ``None``)."""
    if axis_name is None:
        return key
    return jax.random.fold_in(key, jax.lax.axis_index(axis_name))
