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
        apply: ``(variables, x, train: bool, rng, **packing) -> (out, batch_stats)``; ``out``
            is logits ``[B, K]``, regression outputs ``[B, T, D]`` or next-token logits
            ``[B, L, V]``; ``packing`` (token tasks): ``segment_ids`` / ``positions``
            ``[B, L]`` of packed sequences, when the data has them.
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
        constraint=m.constraint,
        norm=m.norm,
        dropout_rate=m.dropout_rate,
        dtype=jnp.dtype(m.dtype),
    )


def transformer_kwargs(config: ml_collections.ConfigDict, shape: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments of the transformer language model (both APIs) from a config."""
    m = config.model
    return dict(
        vocab_size=shape["vocab_size"],
        num_layers=m.num_blocks,
        width=m.hidden_size,
        mlp_dim=m.mlp_dim or None,
        mixer=m.mixer,
        num_heads=m.num_heads,
        positional=m.positional,
        max_len=shape["length"],
        tie_embeddings=m.tie_embeddings,
        dropout_rate=m.dropout_rate,
        mixer_options={"state_size": m.state_size, "scan": m.scan, "constraint": m.constraint},
        dtype=jnp.dtype(m.dtype),
    )


def _classes(config: ml_collections.ConfigDict, framework: str):
    """``(model class, constructor arguments -> kwargs)`` for the config's model kind."""
    if config.model.kind == "transformer":
        if framework == LINEN:
            from flax_linoss.models.linen import TransformerLM
        else:
            from flax_linoss.models import TransformerLM
        return TransformerLM, transformer_kwargs
    if framework == LINEN:
        from flax_linoss.linen import LinOSSModel
    else:
        from flax_linoss.nnx import LinOSSModel
    return LinOSSModel, model_kwargs


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
    cls, kwargs_of = _classes(config, framework)
    kw = kwargs_of(config, shape)
    lm = config.model.kind == "transformer"
    axis = {} if lm else {"norm_axis_name": axis_name}
    if framework == LINEN:
        LinOSSModel = cls
        module = LinOSSModel(**kw, **axis)

        def init(key, x):
            v = LinOSSModel(**kw).init({"params": key}, x, deterministic=True)
            return {"params": v["params"], "batch_stats": v.get("batch_stats", {})}

        def apply(variables, x, train, rng, **packing):
            if not train:
                out = module.apply(variables, x, deterministic=True, **packing)
                return out, variables["batch_stats"]
            out, mut = module.apply(
                variables,
                x,
                deterministic=False,
                rngs={"dropout": rng},
                mutable=["batch_stats"],
                **packing,
            )
            return out, mut.get("batch_stats", {})

        return ModelFns(init, apply, shape["task"], framework)

    from flax import nnx

    def build(key, axis):
        rngs = nnx.Rngs(params=key, dropout=0)
        if lm:
            return cls(**kw, rngs=rngs)
        return cls(shape["in_features"], **kw, norm_axis_name=axis, rngs=rngs)

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

    def apply(variables, x, train, rng, **packing):
        model = nnx.merge(
            graphdef, variables["params"], variables["batch_stats"], rng_state, copy=True
        )
        if train:
            nnx.reseed(model, dropout=rng)
        out = model(x, deterministic=not train, **packing)
        return out, nnx.state(model, nnx.BatchStat)

    return ModelFns(init, apply, shape["task"], framework)


def abstract_variables(fns: ModelFns, example) -> dict[str, Any]:
    """The variables' structure (``ShapeDtypeStruct`` leaves), without initialising."""
    return jax.eval_shape(fns.init, jax.random.PRNGKey(0), jnp.asarray(example))


def model_signature(config: ml_collections.ConfigDict, shape: dict[str, Any]) -> dict[str, Any]:
    """The fields that fix the checkpoint's tree structure and shapes."""
    m, o = config.model, config.optimizer
    signature = {
        "num_blocks": m.num_blocks,
        "hidden_size": m.hidden_size,
        "state_size": m.state_size,
        "task": shape["task"],
        "optimizer": o.name,
        "schedule": "constant" if (o.schedule == "constant" and not o.warmup_steps) else "sched",
        "grad_clip": bool(o.grad_clip_norm),
    }
    if m.kind == "transformer":
        return signature | {
            "kind": m.kind,
            "mixer": m.mixer,
            "mlp_dim": m.mlp_dim,
            "positional": m.positional,
            "tie_embeddings": m.tie_embeddings,
            "vocab_size": shape["vocab_size"],
            "length": shape["length"],
        }
    return signature | {
        "discretization": m.discretization,
        "norm": m.norm,
        "in_features": shape["in_features"],
        "output_size": shape["output_size"],
        "output_step": shape["output_step"],
    }


def make_decoder(config: ml_collections.ConfigDict, shape: dict[str, Any]):
    """``decode(nnx_params, tokens [B, L]) -> logits [B, L, V]``: the transformer run one
    token at a time through its decoding caches (what generation does), jitted. Linen
    parameters are moved to the nnx form first (:func:`to_framework`)."""
    from flax import nnx

    from flax_linoss.models import TransformerLM

    kw = transformer_kwargs(config, shape)
    abstract = nnx.eval_shape(lambda: TransformerLM(**kw, rngs=nnx.Rngs(0)))

    @jax.jit
    def decode(params, tokens):
        model = nnx.merge(*nnx.split(abstract), copy=True)
        nnx.update(model, params)
        model.init_cache(tokens.shape[0], tokens.shape[1])
        graphdef, state = nnx.split(model)

        def step(state, token):
            m = nnx.merge(graphdef, state)
            logits = m(token[:, None], decode=True, deterministic=True)
            return nnx.state(m), logits[:, 0]

        _, logits = jax.lax.scan(step, state, tokens.T)
        return jnp.swapaxes(logits, 0, 1)

    return decode


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
