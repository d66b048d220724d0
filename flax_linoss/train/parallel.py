"""The device mesh and three train-step implementations.

The mesh has four axes, outermost first: ``data`` (replicas), ``fsdp`` (fully sharded data
parallelism), ``seq`` (the length split) and ``model`` (tensor parallelism), sized by
``config.parallel.{fsdp,sequence,model}_axis_size`` with ``data`` taking the remaining
devices. Where each array lives is said by logical axis rules
(:mod:`flax_linoss.train.sharding`). The implementations give the same parameters to float
tolerance:

* ``"jit"`` (the main one): ``jax.jit`` with ``NamedSharding`` in/out shardings on every
  axis. The train state is sharded by the rules (parameters and optimiser state over
  ``fsdp`` and, where a width splits, ``model``), donated to the step and kept on device;
  the batch is split over ``(data, fsdp)``. XLA inserts the collectives, and batch-norm
  statistics are over the global batch by construction. The step is traced under the mesh
  and the rules, so each LinOSS layer runs its recurrence in ``shard_map`` with the length
  and the oscillators split as the rules say (:func:`flax_linoss.common.per_shard`).
* ``"shard_map"``: ``jax.shard_map`` over the batch axes; each device computes the loss of
  its slice, gradients and metrics are averaged with an explicit ``lax.pmean`` over
  ``(data, fsdp)``, and the model's batch norm averages its statistics over them. The state
  is stored sharded (over ``fsdp``) and gathered as it enters. No ``model`` / ``seq`` axis.
* ``"pmap"``: ``jax.pmap`` over the local devices with ``axis_name="data"``; the state
  carries a leading device axis. Data parallelism only (``fsdp``, ``model``, ``seq`` must be
  1). Multi-host pmap spans every process's devices.

Dropout: ``jit`` draws one mask for the global batch (the same for any device count, JAX's
threefry being partitionable); ``shard_map`` and ``pmap`` fold the device index into the key, so
their masks differ from ``jit``'s (same distribution). With ``dropout_rate=0`` all three agree.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from flax_linoss.train import sharding as sharding_lib

__all__ = [
    "DATA_AXIS",
    "FSDP_AXIS",
    "MODEL_AXIS",
    "SEQ_AXIS",
    "Parallel",
    "make_mesh",
    "pmap_available",
    "to_host",
]

DATA_AXIS = sharding_lib.DATA
FSDP_AXIS = sharding_lib.FSDP
SEQ_AXIS = sharding_lib.SEQ
MODEL_AXIS = sharding_lib.MODEL


def pmap_available() -> tuple[bool, str]:
    """Whether the installed JAX provides ``jax.pmap``, and a note when it warns or lacks it."""
    if not hasattr(jax, "pmap"):
        return False, (
            f"jax {jax.__version__} has no jax.pmap; use parallel.implementation='jit' or "
            "'shard_map' (same results)."
        )
    return True, ""


def make_mesh(
    num_devices: int = 0,
    model_axis_size: int = 1,
    *,
    fsdp_axis_size: int = 1,
    sequence_axis_size: int = 1,
) -> jax.sharding.Mesh:
    """A ``(data, fsdp, seq, model)`` mesh over all devices (or the first ``num_devices``).

    ``data`` takes the devices the other three leave. Every axis is ``Auto`` so ``jit``
    propagates shardings and ``shard_map`` accepts inputs. Devices are ordered by process,
    so the outer axes span processes first (each process's batch rows on its own devices).
    """
    devices = jax.devices()
    if num_devices:
        if jax.process_count() > 1:
            raise ValueError("parallel.num_devices must be 0 (all devices) with several processes")
        if num_devices > len(devices):
            raise ValueError(f"parallel.num_devices={num_devices} but only {len(devices)} exist")
        devices = devices[:num_devices]
    n = len(devices)
    inner = fsdp_axis_size * sequence_axis_size * model_axis_size
    if n % inner:
        raise ValueError(
            f"{n} devices cannot form a mesh with parallel.fsdp_axis_size={fsdp_axis_size}, "
            f"sequence_axis_size={sequence_axis_size}, model_axis_size={model_axis_size} "
            f"(their product {inner} must divide the device count)"
        )
    return jax.make_mesh(
        (n // inner, fsdp_axis_size, sequence_axis_size, model_axis_size),
        sharding_lib.MESH_AXES,
        axis_types=(AxisType.Auto,) * 4,
        devices=devices,
    )


def to_host(x: Any) -> np.ndarray:
    """A numpy copy of a (possibly not fully addressable, replicated) array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


def batch_axes(rules, mesh: jax.sharding.Mesh) -> tuple[str, ...]:
    """The mesh axes the batch is split over (the ``batch`` rule)."""
    entry = sharding_lib.batch_spec(rules, mesh)[0]
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def step_axis_name(implementation: str, rules, mesh: jax.sharding.Mesh):
    """The mapped axes the step function (and batch norm) average over: ``None`` for
    ``jit`` (global view), ``"data"`` for ``pmap``, the batch axes for ``shard_map``."""
    if implementation == "jit":
        return None
    if implementation == "pmap":
        return DATA_AXIS
    return batch_axes(rules, mesh) or (DATA_AXIS,)


# A step function: (state, batch, axis_name | None) -> (state, metrics). ``axis_name`` is None
# for the global-view (jit) form, the batch axes inside shard_map / pmap.
StepFn = Callable[[Any, Any, Any], tuple[Any, Any]]


class Parallel:
    """Places states and batches, and runs the train step with one implementation.

    Args:
        implementation: ``"jit"``, ``"shard_map"`` or ``"pmap"``.
        mesh: From :func:`make_mesh`.
        step_fn: ``(state, batch, axis_name) -> (state, metrics)``; with an axis name it must
            average gradients and metrics over it.
        state_shardings: A ``NamedSharding`` per leaf of the train state
            (:func:`flax_linoss.train.sharding.state_shardings`).
        rules: The logical axis rules (flax's ``(name, mesh axes)`` pairs).
    """

    def __init__(
        self,
        implementation: str,
        mesh: jax.sharding.Mesh,
        step_fn: StepFn,
        state_shardings: Any,
        rules: tuple = (),
    ):
        self.implementation = implementation
        self.mesh = mesh
        self.rules = tuple(rules)
        self.state_shardings = state_shardings
        self.replicated = NamedSharding(mesh, P())
        self.batch_sharding = NamedSharding(mesh, sharding_lib.batch_spec(self.rules, mesh))
        self.batch_axes = batch_axes(self.rules, mesh)
        self.data_size = math.prod(mesh.shape[a] for a in self.batch_axes)
        donate = {"donate_argnums": 0}
        if implementation == "jit":
            self._step = jax.jit(
                lambda s, b: step_fn(s, b, None),
                in_shardings=(state_shardings, self.batch_sharding),
                out_shardings=(state_shardings, self.replicated),
                **donate,
            )
        elif implementation == "shard_map":
            axes = step_axis_name(implementation, self.rules, mesh)
            mapped = jax.shard_map(
                lambda s, b: step_fn(s, b, axes),
                mesh=mesh,
                in_specs=(P(), P(axes)),
                out_specs=(P(), P()),
                check_vma=False,
            )
            self._step = jax.jit(
                mapped,
                in_shardings=(state_shardings, self.batch_sharding),
                out_shardings=(state_shardings, self.replicated),
                **donate,
            )
        elif implementation == "pmap":
            ok, why = pmap_available()
            if not ok:
                raise RuntimeError(why)
            others = [a for a in sharding_lib.MESH_AXES if a != DATA_AXIS and mesh.shape[a] > 1]
            if others:
                raise ValueError(f"pmap is data-parallel only; the mesh has a {others[0]!r} axis")
            local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
            self.local_devices = local
            with warnings.catch_warnings():
                warnings.simplefilter("error", DeprecationWarning)
                try:
                    self._step = jax.pmap(
                        lambda s, b: step_fn(s, b, DATA_AXIS),
                        axis_name=DATA_AXIS,
                        devices=local,
                        **donate,
                    )
                except DeprecationWarning as e:  # pragma: no cover - depends on the JAX version
                    raise RuntimeError(
                        f"jax {jax.__version__} deprecates jax.pmap ({e}); use "
                        "parallel.implementation='jit' or 'shard_map'."
                    ) from e
        else:
            raise ValueError(f"Unknown parallel implementation {implementation!r}")

    @contextlib.contextmanager
    def context(self):
        """The mesh and the logical axis rules, for tracing the model (the LinOSS layers
        read them to split their recurrence); pmap takes its own devices."""
        if self.implementation == "pmap":
            yield
            return
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    # ---- states -------------------------------------------------------------------------
    def place(self, tree: Any, shardings: Any = None) -> Any:
        """``tree`` (a train state, or any tree shaped like ``shardings``) moved onto the
        mesh as the step takes it (device to device; a no-op where it already is)."""
        return jax.device_put(tree, self.state_shardings if shardings is None else shardings)

    def gather(self, tree: Any) -> Any:
        """A copy of ``tree`` replicated on every device (for host-side use)."""
        return jax.jit(lambda t: t, out_shardings=self.replicated)(tree)

    def put_state(self, state: Any) -> Any:
        """The (sharded) train state -> the layout the step takes (pmap: a leading device
        axis; else the state itself)."""
        if self.implementation == "pmap":
            n = len(self.local_devices)
            return jax.tree.map(lambda a: np.broadcast_to(to_host(a), (n, *np.shape(a))), state)
        return state

    def canonical_state(self, state: Any) -> Any:
        """The step's layout -> the sharded train state (for eval and checkpoints)."""
        if self.implementation != "pmap":
            return state
        first = jax.tree.map(
            lambda a: (
                np.asarray(a.addressable_data(0)).reshape(a.shape[1:])
                if isinstance(a, jax.Array)
                else np.asarray(a)[0]
            ),
            state,
        )
        return self.place(first)

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
        with self.context():
            return self._step.lower(state, batch)

    def step(self, state: Any, batch: Any) -> tuple[Any, Any]:
        """One train step (``state`` is donated); metrics come back replicated (pmap: the
        first device's copy)."""
        with self.context():
            state, metrics = self._step(state, batch)
        if self.implementation == "pmap":
            metrics = jax.tree.map(lambda a: a[0], metrics)
        return state, metrics


def check_batch(global_batch: int, parallel: Parallel) -> None:
    """Raises ``ValueError`` unless the global batch splits evenly over the batch axes."""
    n = parallel.data_size
    if global_batch % n:
        raise ValueError(
            f"batch size {global_batch} does not split over {n} data-parallel devices "
            f"(mesh axes {' x '.join(parallel.batch_axes)}); use a multiple of {n}"
        )
    per_process = global_batch // jax.process_count()
    if parallel.implementation == "pmap" and per_process % len(parallel.local_devices):
        raise ValueError(
            f"pmap needs the per-process batch {per_process} to split over "
            f"{len(parallel.local_devices)} local devices"
        )


def pmean(tree: Any, axis_name) -> Any:
    """``lax.pmean`` over ``axis_name`` (identity when ``None``)."""
    if axis_name is None:
        return tree
    return jax.tree.map(lambda a: jax.lax.pmean(a, axis_name), tree)


def device_fold(key: jax.Array, axis_name) -> jax.Array:
    """Folds the device index along ``axis_name`` into ``key`` (unchanged when ``None``)."""
    if axis_name is None:
        return key
    return jax.random.fold_in(key, jax.lax.axis_index(axis_name))
