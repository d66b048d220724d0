"""Where every array of a run lives: logical axis names, the rules, the mesh shardings.

The way MaxText does it. Every parameter (and batch statistic) dimension has a *logical*
name (``embed``, ``oscillator``, ``vocab``, ...); the run's *logical axis rules*
(``config.parallel.logical_axis_rules``) map each name onto mesh axes (``data``, ``fsdp``,
``model``, ``seq``); :func:`state_shardings` turns the two into a ``NamedSharding`` for
every leaf of the train state (parameters, batch statistics, and the optimiser state,
whose moments follow their parameters). The train state is created inside ``jit`` with
those ``out_shardings``, so it is born sharded.

Where the names come from: a module that records them on its parameters (the LinOSS
mixers' ``logical_axes`` metadata, :data:`flax_linoss.mixers.base.PARAM_AXES`) is read;
the other modules' parameters are named here by the end of their path
(:data:`PAPER_AXES`, :data:`TRANSFORMER_AXES`). A parameter with no name is replicated.

Rule semantics (as flax's ``logical_to_mesh_axes``): a name may have several entries; the
first whose mesh axes are free in that array (not taken by an earlier dimension) and divide
the dimension is used; otherwise the dimension is not split.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flax_linoss.common import BATCH_AXIS, OSCILLATOR_AXIS, logical_to_mesh
from flax_linoss.convert import path_names
from flax_linoss.mixers.base import EMBED, KV

__all__ = [
    "MESH_AXES",
    "PAPER_AXES",
    "TRANSFORMER_AXES",
    "memory_line",
    "memory_per_device",
    "model_logical_axes",
    "parse_rules",
    "state_shardings",
]

#: The mesh axes, outermost first: ``data`` (replicas), ``fsdp`` (parameters and optimiser
#: state sharded, the batch split too), ``seq`` (the length split), ``model`` (widths and
#: oscillators split; innermost, on the fastest links).
DATA, FSDP, SEQ, MODEL = "data", "fsdp", "seq", "model"
MESH_AXES = (DATA, FSDP, SEQ, MODEL)

MLP, HEADS, VOCAB = "mlp", "heads", "vocab"
OSC = OSCILLATOR_AXIS

_NORM = {("norm", leaf): (EMBED,) for leaf in ("scale", "bias", "mean", "var")}

#: The papers' model: parameter / batch statistic (the end of its path) -> logical axes.
PAPER_AXES: dict[tuple[str, ...], tuple[str | None, ...]] = {
    ("encoder", "kernel"): (None, EMBED),
    ("encoder", "bias"): (EMBED,),
    **{("ssm", n): (OSC,) for n in ("a_raw", "dt_raw", "g_raw")},
    ("ssm", "b"): (OSC, EMBED, None),
    ("ssm", "c"): (EMBED, OSC, None),
    ("ssm", "d"): (EMBED,),
    **{(glu, "kernel"): (EMBED, MLP) for glu in ("glu_value", "glu_gate")},
    **{(glu, "bias"): (MLP,) for glu in ("glu_value", "glu_gate")},
    **_NORM,
    ("head", "kernel"): (EMBED, None),
    ("head", "bias"): (None,),
}

#: The transformer language model (the LinOSS mixers name their own parameters;
#: ``query`` ... ``out`` are ``nnx.MultiHeadAttention``'s).
TRANSFORMER_AXES: dict[tuple[str, ...], tuple[str | None, ...]] = {
    ("embed", "embedding"): (VOCAB, EMBED),
    ("pos_embed", "embedding"): (None, EMBED),
    **{(norm, leaf): (EMBED,) for norm in ("norm_mixer", "norm_mlp") for leaf in ("scale", "bias")},
    **_NORM,
    ("mlp_in", "kernel"): (EMBED, MLP),
    ("mlp_in", "bias"): (MLP,),
    ("mlp_out", "kernel"): (MLP, EMBED),
    ("mlp_out", "bias"): (EMBED,),
    **{(qkv, "kernel"): (EMBED, HEADS, KV) for qkv in ("query", "key", "value")},
    **{(qkv, "bias"): (HEADS, KV) for qkv in ("query", "key", "value")},
    ("out", "kernel"): (HEADS, KV, EMBED),
    ("out", "bias"): (EMBED,),
    ("head", "kernel"): (EMBED, VOCAB),
    ("head", "bias"): (VOCAB,),
}


def parse_rules(rules: Mapping[str, str] | ml_collections.ConfigDict) -> tuple:
    """``config.parallel.logical_axis_rules`` -> flax's ``((name, mesh axes), ...)``.

    Each value is ``""`` (never split), a mesh axis (``"fsdp"``), several axes that split
    the dimension together (``"data+fsdp"``), or alternatives tried in order
    (``"fsdp|model"``).

    Raises:
        ValueError: a value names something other than a mesh axis.
    """
    out = []
    for name, value in dict(rules).items():
        if not isinstance(value, str):
            raise ValueError(
                f"parallel.logical_axis_rules.{name} must be a string of mesh axes, got {value!r}"
            )
        if not value.strip():
            out.append((name, None))
            continue
        for alternative in value.split("|"):
            axes = tuple(a.strip() for a in alternative.split("+"))
            bad = [a for a in axes if a not in MESH_AXES]
            if bad:
                raise ValueError(
                    f"parallel.logical_axis_rules.{name}={value!r} names {bad[0]!r}, not a mesh "
                    f"axis ({', '.join(MESH_AXES)}); join axes with '+' (split over both) "
                    "or '|' (the first one free)"
                )
            out.append((name, axes[0] if len(axes) == 1 else axes))
    return tuple(out)


def model_logical_axes(spec) -> dict[tuple[str, ...], tuple[str | None, ...]]:
    """Linen path -> logical axes of every parameter and batch statistic of ``spec``'s
    model (a :class:`~flax_linoss.train.model.ModelSpec`) that has names: its own
    ``logical_axes`` metadata, else the table of its kind matched on the path's end."""
    from flax import nnx

    from flax_linoss.linen.bridge import linen_path

    table = TRANSFORMER_AXES if spec.kind == "transformer" else PAPER_AXES
    module = nnx.eval_shape(lambda: spec.nnx_module(nnx.Rngs(0)))
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat))):
        key = linen_path(path)
        names = var.get_metadata("logical_axes", None) or table.get(key[-2:])
        if names is not None and len(names) == len(var.shape):
            out[key] = tuple(names)
    return out


def _names_of(path, logical: dict) -> tuple | None:
    """The logical axes of the leaf at ``path``: those of the longest path end that is a
    model variable (an optimiser moment ``opt_state/0/mu/<param path>`` is its parameter)."""
    key = path_names(path)
    for i in range(len(key)):
        if key[i:] in logical:
            return logical[key[i:]]
    return None


def state_shardings(tree: Any, logical: dict, rules, mesh: jax.sharding.Mesh) -> Any:
    """A ``NamedSharding`` for every leaf of ``tree`` (arrays or ``ShapeDtypeStruct``):
    split by the rules where the leaf is a named model variable (or follows one), else
    replicated."""
    sizes = dict(mesh.shape)

    def one(path, leaf):
        names = _names_of(path, logical)
        shape = np.shape(leaf)
        if names is None or len(names) != len(shape):
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, P(*logical_to_mesh(names, rules, sizes, shape)))

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_spec(rules, mesh: jax.sharding.Mesh) -> P:
    """The PartitionSpec of a batch's leading axis (the ``batch`` rule)."""
    return P(*logical_to_mesh((BATCH_AXIS,), rules, dict(mesh.shape)))


def memory_per_device(tree: Any, shardings: Any) -> tuple[int, int]:
    """``(largest device's bytes, total bytes)`` of ``tree``'s leaves placed by
    ``shardings`` (the total counts each array once, as if on one device)."""
    per_device: dict[Any, int] = {}
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
        shape, itemsize = np.shape(leaf), np.dtype(leaf.dtype).itemsize
        total += int(np.prod(shape)) * itemsize
        for device, index in sharding.devices_indices_map(shape).items():
            size = int(np.prod([len(range(*s.indices(n))) for s, n in zip(index, shape)]))
            per_device[device] = per_device.get(device, 0) + size * itemsize
    return max(per_device.values(), default=0), total


def memory_line(state: Any, shardings: Any) -> str:
    """``memory: params+optimizer X MiB per device of Y MiB total`` for a train state
    (abstract or not) and its shardings; ``X`` is the largest device's share."""
    tree = (state.params, state.opt_state)
    placed = (shardings.params, shardings.opt_state)
    largest, total = memory_per_device(tree, placed)
    mib = 2.0**20
    return (
        f"memory: params+optimizer {largest / mib:.3f} MiB per device of {total / mib:.3f} "
        "MiB total"
    )
