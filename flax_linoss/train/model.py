"""The configured model: its description, and pure functions in each API's own form.

:class:`ModelSpec` is the model a config describes, read once from the config and the data;
the constructor arguments and the checkpoint signature derive from it. :class:`ModelFns`
reduces a linen or an nnx model to ``init(key, x) -> variables`` and
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

from flax_linoss.mixers.base import BLOCK_CHOICES
from flax_linoss.train import config as config_lib

__all__ = [
    "LINEN",
    "NNX",
    "ModelFns",
    "ModelSpec",
    "make_model",
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


PAPER = "paper"
TRANSFORMER = "transformer"


def _field(*, signature: tuple[str, ...] = (PAPER, TRANSFORMER), kind_only: bool = False):
    """A :class:`ModelSpec` field; ``signature``: the model kinds whose checkpoint signature
    holds it (the fields that fix the tree's structure and shapes); ``kind_only``: only one
    kind of model has it (``None`` for the other)."""
    extra = {"default": None} if kind_only else {}
    return dataclasses.field(metadata={"signature": signature}, **extra)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The model a config describes, fixed once (:meth:`from_config`).

    Everything about the model is read from the config and the data here and nowhere else:
    the constructor arguments of either API (:meth:`kwargs`) and the checkpoint signature
    (:meth:`signature`) are derived from these fields. Fields the other kind of model does
    not have are ``None``.
    """

    kind: str = _field(signature=(TRANSFORMER,))  # "paper" | "transformer"
    task: str = _field()  # "classification" | "regression" | "lm"
    num_blocks: int = _field()
    hidden_size: int = _field()
    state_size: int = _field()
    dropout_rate: float = _field(signature=())
    scan: str = _field(signature=())
    constraint: str = _field(signature=())
    dtype: str = _field(signature=())
    param_dtype: str = _field()  # (checkpoints from before it existed: float32)
    # The papers' model.
    in_features: int | None = _field(signature=(PAPER,), kind_only=True)
    output_size: int | None = _field(signature=(PAPER,), kind_only=True)
    output_step: int | None = _field(signature=(PAPER,), kind_only=True)
    discretization: str | None = _field(signature=(PAPER,), kind_only=True)
    norm: str | None = _field(signature=(PAPER,), kind_only=True)
    # The transformer language model.
    vocab_size: int | None = _field(signature=(TRANSFORMER,), kind_only=True)
    length: int | None = _field(signature=(TRANSFORMER,), kind_only=True)
    mixer: str | None = _field(signature=(TRANSFORMER,), kind_only=True)
    mixer_block: str | None = _field(signature=(TRANSFORMER,), kind_only=True)
    num_heads: int | None = _field(signature=(TRANSFORMER,), kind_only=True)
    mlp_dim: int | None = _field(signature=(TRANSFORMER,), kind_only=True)
    positional: str | None = _field(signature=(TRANSFORMER,), kind_only=True)
    tie_embeddings: bool | None = _field(signature=(TRANSFORMER,), kind_only=True)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, shape: dict[str, Any]) -> ModelSpec:
        """The spec of ``config.model`` for data of ``shape``
        (:func:`flax_linoss.train.data.model_shape`)."""
        m = config.model
        common = dict(
            kind=m.kind,
            task=shape["task"],
            num_blocks=m.num_blocks,
            hidden_size=m.hidden_size,
            state_size=m.state_size,
            dropout_rate=m.dropout_rate,
            scan=m.scan,
            constraint=m.constraint,
            dtype=m.dtype,
            param_dtype=m.param_dtype,
        )
        if m.kind == TRANSFORMER:
            return cls(
                **common,
                vocab_size=shape["vocab_size"],
                length=shape["length"],
                mixer=m.mixer,
                mixer_block=m.get("mixer_block", "outer"),
                num_heads=m.num_heads,
                mlp_dim=m.mlp_dim,
                positional=m.positional,
                tie_embeddings=m.tie_embeddings,
            )
        return cls(
            **common,
            in_features=shape["in_features"],
            output_size=shape["output_size"],
            output_step=shape["output_step"],
            discretization=m.discretization,
            norm=m.norm,
        )

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the model's constructor (both APIs; the nnx paper model also
        takes ``in_features`` first, which linen reads off the input)."""
        dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
        if self.kind == TRANSFORMER:
            return dict(
                vocab_size=self.vocab_size,
                num_layers=self.num_blocks,
                width=self.hidden_size,
                mlp_dim=self.mlp_dim or None,
                mixer=self.mixer,
                num_heads=self.num_heads,
                positional=self.positional,
                max_len=self.length,
                tie_embeddings=self.tie_embeddings,
                dropout_rate=self.dropout_rate,
                mixer_options={
                    **BLOCK_CHOICES[self.mixer_block],  # block and selective
                    "state_size": self.state_size,
                    "scan": self.scan,
                    "constraint": self.constraint,
                },
                dtype=dtype,
                param_dtype=param_dtype,
            )
        return dict(
            num_blocks=self.num_blocks,
            hidden_size=self.hidden_size,
            state_size=self.state_size,
            output_size=self.output_size,
            task=self.task,
            output_step=self.output_step,
            discretization=self.discretization,
            scan=self.scan,
            constraint=self.constraint,
            norm=self.norm,
            dropout_rate=self.dropout_rate,
            dtype=dtype,
            param_dtype=param_dtype,
        )

    def signature(self) -> dict[str, Any]:
        """The fields that fix the checkpoint's tree structure and shapes."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if self.kind in f.metadata["signature"]
        }

    def nnx_module(self, rngs, norm_axis_name: str | None = None):
        """The nnx model (for ``nnx.eval_shape``, or initialised from ``rngs``)."""
        if self.kind == TRANSFORMER:
            from flax_linoss.models import TransformerLM

            return TransformerLM(**self.kwargs(), rngs=rngs)
        from flax_linoss.nnx import LinOSSModel

        return LinOSSModel(
            self.in_features, **self.kwargs(), norm_axis_name=norm_axis_name, rngs=rngs
        )


def make_model(
    config: ml_collections.ConfigDict,
    shape: dict[str, Any] | ModelSpec,
    *,
    axis_name: str | tuple[str, ...] | None = None,
    framework: str | None = None,
) -> ModelFns:
    """The configured model (``config.framework`` unless ``framework``) as :class:`ModelFns`.

    Args:
        config: A validated config.
        shape: From :func:`flax_linoss.train.data.model_shape`, or the :class:`ModelSpec`.
        axis_name: Mapped axes for batch-norm statistics (the batch axes under shard_map /
            pmap).
        framework: Override ``config.framework``.
    """
    framework = framework or config.framework
    spec = shape if isinstance(shape, ModelSpec) else ModelSpec.from_config(config, shape)
    kw = spec.kwargs()
    axis = {} if spec.kind == TRANSFORMER else {"norm_axis_name": axis_name}
    if framework == LINEN:
        if spec.kind == TRANSFORMER:
            from flax_linoss.models.linen import TransformerLM as cls
        else:
            from flax_linoss.linen import LinOSSModel as cls
        module = cls(**kw, **axis)

        def init(key, x):
            v = cls(**kw).init({"params": key}, x, deterministic=True)
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

        return ModelFns(init, apply, spec.task, framework)

    from flax import nnx

    def build(key, axis):
        return spec.nnx_module(nnx.Rngs(params=key, dropout=0), norm_axis_name=axis)

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

    return ModelFns(init, apply, spec.task, framework)


def model_signature(config: ml_collections.ConfigDict, shape: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint signature: :meth:`ModelSpec.signature` and the optimiser's structure."""
    o = config.optimizer
    return ModelSpec.from_config(config, shape).signature() | {
        "optimizer": o.name,
        "schedule": "constant" if (o.schedule == "constant" and not o.warmup_steps) else "sched",
        "grad_clip": bool(o.grad_clip_norm),
    }


def make_decoder(config: ml_collections.ConfigDict, shape: dict[str, Any]):
    """``decode(nnx_params, tokens [B, L]) -> logits [B, L, V]``: the transformer run one
    token at a time through its decoding caches (what generation does), jitted. Linen
    parameters are moved to the nnx form first (:func:`to_framework`)."""
    from flax import nnx

    spec = ModelSpec.from_config(config, shape)
    abstract = nnx.eval_shape(lambda: spec.nnx_module(nnx.Rngs(0)))

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
