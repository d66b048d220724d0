"""The configured model as pure functions, in each API's own form.

:class:`ModelFns` reduces a linen or an nnx model to ``init(key, x) -> variables`` and
``apply(variables, x, train, rng) -> (out, new_batch_stats)``, so one train step serves both.
The variables are each API's own tree:

* linen: ``{"params": dict, "batch_stats": dict}`` as ``Module.init`` returns them;
* nnx: ``{"params": nnx.State, "batch_stats": nnx.State}`` from ``nnx.split`` (the
  functional nnx style: ``apply`` merges the graph with the states, runs the module and
  returns its new ``nnx.BatchStat`` state; no conversion through linen variables).

:func:`to_framework` moves variables (or an optimiser state shaped like them) from one API's
tree to the other's through :mod:`flax_linoss.convert`'s path mapping.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from flax_linoss.train import config as config_lib

__all__ = [
    "LINEN",
    "NNX",
    "ModelFns",
    "abstract_variables",
    "make_model",
    "model_kwargs",
    "model_signature",
    "to_framework",
]

LINEN = "linen"
NNX = "nnx"


@dataclasses.dataclass(frozen=True)
class ModelFns:
    """A model as pure functions.

    Attributes:
        init: ``(key, x [B, L, C]) -> {"params", "batch_stats"}`` in the API's own form.
        apply: ``(variables, x, train: bool, rng) -> (out, batch_stats)``; ``out`` is logits
            ``[B, K]`` or regression outputs ``[B, T, D]``.
        task: ``"classification"`` or ``"regression"``.
        framework: ``"linen"`` or ``"nnx"``.
    """

    init: Callable[[jax.Array, jax.Array], dict[str, Any]]
    apply: Callable[[dict[str, Any], jax.Array, bool, jax.Array], tuple[jax.Array, Any]]
    task: str
    framework: str


def model_kwargs(config: ml_collections.ConfigDict, shape: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments of the papers' model (both APIs) from a config."""
    m = config.model
    return dict(
        num_blocks=m.num_blocks,
        hidden_size=m.hidden_size,
        state_size=m.state_size,
        output_size=shape["output_size"],
        task=shape["task"],
        output_step=shape["output_step"],
        discretization=m.discretization,
        scan=m.scan,
        norm=m.norm,
        dropout_rate=m.dropout_rate,
        dtype=jnp.dtype(m.dtype),
    )


def make_model(
    config: ml_collections.ConfigDict,
    shape: dict[str, Any],
    *,
    axis_name: str | None = None,
    framework: str | None = None,
) -> ModelFns:
    """The configured model (``config.framework`` unless ``framework``) as :class:`ModelFns`.

    Args:
        config: A validated config.
        shape: From :func:`flax_linoss.train.data.model_shape`.
        axis_name: Mapped axis for batch-norm statistics (``"data"`` under shard_map / pmap).
        framework: Override ``config.framework``.
    """
    framework = framework or config.framework
    kw = model_kwargs(config, shape)
    if framework == LINEN:
        from flax_linoss.linen import LinOSSModel

        module = LinOSSModel(**kw, norm_axis_name=axis_name)

        def init(key, x):
            v = LinOSSModel(**kw).init({"params": key}, x, deterministic=True)
            return {"params": v["params"], "batch_stats": v.get("batch_stats", {})}

        def apply(variables, x, train, rng):
            if not train:
                return module.apply(variables, x, deterministic=True), variables["batch_stats"]
            out, mut = module.apply(
                variables, x, deterministic=False, rngs={"dropout": rng}, mutable=["batch_stats"]
            )
            return out, mut.get("batch_stats", {})

        return ModelFns(init, apply, shape["task"], framework)

    from flax import nnx

    from flax_linoss.nnx import LinOSSModel as NnxModel

    def build(key, axis):
        return NnxModel(
            shape["in_features"], **kw, norm_axis_name=axis, rngs=nnx.Rngs(params=key, dropout=0)
        )

    graphdef, _, _, rng_state = nnx.split(
        nnx.eval_shape(lambda: build(jax.random.key(0), axis_name)),
        nnx.Param,
        nnx.BatchStat,
        ...,
    )

    def init(key, x):
        del x
        _, params, stats, _ = nnx.split(build(key, None), nnx.Param, nnx.BatchStat, ...)
        return {"params": params, "batch_stats": stats}

    def apply(variables, x, train, rng):
        model = nnx.merge(
            graphdef, variables["params"], variables["batch_stats"], rng_state, copy=True
        )
        if train:
            nnx.reseed(model, dropout=rng)
        out = model(x, deterministic=not train)
        return out, nnx.state(model, nnx.BatchStat)

    return ModelFns(init, apply, shape["task"], framework)


def abstract_variables(fns: ModelFns, example) -> dict[str, Any]:
    """The variables' structure (``ShapeDtypeStruct`` leaves), without initialising."""
    return jax.eval_shape(fns.init, jax.random.PRNGKey(0), jnp.asarray(example))


def model_signature(config: ml_collections.ConfigDict, shape: dict[str, Any]) -> dict[str, Any]:
    """The fields that fix the checkpoint's tree structure and shapes."""
    m, o = config.model, config.optimizer
    return {
        "discretization": m.discretization,
        "num_blocks": m.num_blocks,
        "hidden_size": m.hidden_size,
        "state_size": m.state_size,
        "norm": m.norm,
        "in_features": shape["in_features"],
        "output_size": shape["output_size"],
        "task": shape["task"],
        "output_step": shape["output_step"],
        "optimizer": o.name,
        "schedule": "constant" if (o.schedule == "constant" and not o.warmup_steps) else "sched",
        "grad_clip": bool(o.grad_clip_norm),
    }


def to_framework(tree: Any, template: Any, source: str, target: str) -> Any:
    """``tree`` (variables, or an optimiser state holding variable-shaped trees) written by
    ``source`` in ``target``'s form; ``template`` is the same thing in ``target``'s form
    (e.g. abstract). Every subtree shaped like the model's variables is mapped by path.
    """
    if source == target:
        return tree
    if {source, target} != {LINEN, NNX}:
        raise config_lib.ConfigError(f"Unknown framework {source!r} or {target!r}.")
    from flax_linoss import convert

    return convert.map_tree(tree, template, to_nnx=target == NNX)
