"""LinOSS sequence mixer as a drop-in for ``flax.linen.MultiHeadDotProductAttention``.

``LinOSSMixer`` takes the attention's constructor and call arguments, so a transformer
written against flax attention swaps it in by changing the class (or a registry name, see
:mod:`flax_linoss.mixers.registry`). What it computes, for ``x [batch..., L, E]``::

    h = x @ in_proj                       # [batch..., L, H],  H = qkv_features or E
    y = LinOSS(h)                         # P = state_size or H oscillators, causal
      (+ LinOSS_reverse(h) if bidirectional, a second layer scanning from the end)
    out = dropout(y) @ out_proj           # [batch..., L, O],  O = out_features or E

Parameters (and logical axes, see :data:`flax_linoss.mixers.base.PARAM_AXES`)::

    in_proj/kernel [E, H] (embed, kv)    in_proj/bias [H] (kv,)
    linoss/a_raw, dt_raw[, g_raw] [P] (oscillator,)
    linoss/b [P, H, 2] (oscillator, kv, None)   linoss/c [H, P, 2] (kv, oscillator, None)
    linoss/d [H] (kv,)                   linoss_reverse/... (bidirectional only, same)
    out_proj/kernel [H, O] (kv, embed)   out_proj/bias [O] (embed,)

The computation is :class:`flax_linoss.mixers.nnx.LinOSSMixer`'s (the one source; this
class maps the linen attention's fields, collections and conventions onto it through
:class:`flax_linoss.linen.bridge.NnxSkin`), so names, shapes and results are the same and
:func:`flax_linoss.convert.linen_to_nnx` / ``nnx_to_linen`` move weights between them.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
from flax import nnx
from flax.core import meta

from flax_linoss import ops
from flax_linoss.linen.bridge import NnxSkin, nnx_fields
from flax_linoss.mixers import base
from flax_linoss.mixers import nnx as nnx_mixers
from flax_linoss.mixers import state as state_lib
from flax_linoss.mixers.state import MixerState

Dtype = Any
Initializer = Callable[..., jax.Array]


def _unboxing(init: Initializer, boxes: dict[str, meta.AxisMetadata], name: str) -> Initializer:
    """``init`` with any axis metadata box (``nn.with_logical_partitioning``) taken off and
    kept in ``boxes[name]``, to put back around the stored parameter."""

    def wrapped(*args, **kwargs):
        value = init(*args, **kwargs)
        if isinstance(value, meta.AxisMetadata):
            boxes[name] = value
            return value.unbox()
        return value

    return wrapped


#: Fields of ``nn.MultiHeadDotProductAttention``, in its order (the mixer's first fields, so
#: positional construction works as for attention).
_ATTENTION_FIELDS = [
    f.name
    for f in dataclasses.fields(nn.MultiHeadDotProductAttention)
    if f.init and f.name not in ("parent", "name")
]
#: nnx-only constructor arguments: sizes read off the input, nnx's RNG and metadata
#: conventions (linen boxes initialisers instead), and options linen attention lacks.
_NNX_ONLY = (
    "in_features",
    "num_kv_heads",
    "in_kv_features",
    "qkv_promote_dtype",
    "out_promote_dtype",
    "ln_promote_dtype",
    "keep_rngs",
    "kernel_metadata",
    "out_kernel_metadata",
    "bias_metadata",
    "out_bias_metadata",
    "query_ln_scale_metadata",
    "key_ln_scale_metadata",
)
_NNX_ARGS = [
    n
    for n in inspect.signature(nnx_mixers.LinOSSMixer.__init__).parameters
    if n not in ("self", "rngs", *_NNX_ONLY)
]


def _fields() -> dict[str, Any]:
    """The linen mixer's fields: attention's (the nnx mixer's definitions where it has them,
    attention's own where they mean nothing here), then the nnx mixer's LinOSS options."""
    attention = {f.name: f for f in dataclasses.fields(nn.MultiHeadDotProductAttention)}
    shared = [n for n in _ATTENTION_FIELDS if n in _NNX_ARGS]
    own = [n for n in _NNX_ARGS if n not in _ATTENTION_FIELDS]
    namespace = nnx_fields(
        nnx_mixers.LinOSSMixer,
        shared + own,
        linen_defaults={"decode": False, "kernel_init": nn.linear.default_kernel_init},
    )
    annotations = {}
    for name in _ATTENTION_FIELDS:  # attention's order, then the LinOSS options
        if name in shared:
            annotations[name] = namespace["__annotations__"][name]
        else:  # accepted and ignored (see the class docstring)
            annotations[name] = attention[name].type
            namespace[name] = attention[name].default
    for name in own:
        annotations[name] = namespace["__annotations__"][name]
    namespace["__annotations__"] = annotations
    return namespace


class _MixerSkin(NnxSkin):
    """The linen mixer's behaviour; its fields are added by :data:`LinOSSMixer`'s
    definition below (derived from the nnx mixer's constructor)."""

    def build(
        self, inputs: jax.Array, rngs: nnx.Rngs, scratch: dict[str, Any]
    ) -> nnx_mixers.LinOSSMixer:
        boxes = scratch.setdefault("boxes", {})
        kwargs = {name: getattr(self, name) for name in _NNX_ARGS}
        kwargs.update(
            kernel_init=_unboxing(self.kernel_init, boxes, "in_proj/kernel"),
            out_kernel_init=_unboxing(
                self.out_kernel_init or self.kernel_init, boxes, "out_proj/kernel"
            ),
            bias_init=_unboxing(self.bias_init, boxes, "in_proj/bias"),
            out_bias_init=_unboxing(self.out_bias_init or self.bias_init, boxes, "out_proj/bias"),
            deterministic=None,  # linen merges it at the call
            decode=None,
        )
        return nnx_mixers.LinOSSMixer(
            in_features=self._in_features(inputs), keep_rngs=False, rngs=rngs, **kwargs
        )

    def _in_features(self, inputs=None) -> int:
        if self.is_initializing() and not self.variables:
            return inputs.shape[-1]
        return meta.unbox(self.variables["params"]["in_proj"]["kernel"]).shape[0]

    def box(
        self, path: tuple[str, ...], variable: nnx.Variable, value: Any, scratch: dict[str, Any]
    ) -> Any:
        """Parameters carry logical axis names (a user's own box wins)."""
        if not isinstance(variable, nnx.Param):
            return value
        nested = ("in_proj", "out_proj", "query", "key", "gate", "dt_proj", "heads")
        key = "/".join(path[-2:]) if path[0] in nested else path[-1]
        boxes = scratch.get("boxes", {})
        if key in boxes:
            return boxes[key].replace_boxed(value)
        return nn.LogicallyPartitioned(value, base.PARAM_AXES[key])

    def init_state(
        self,
        batch_shape: tuple[int, ...] | int,
        *,
        dtype: Dtype | None = None,
        out_sharding=None,
        timestamps: bool = False,
    ) -> MixerState:
        """The decoding state before the first step (see the nnx mixer's ``init_state``).

        The number of oscillators is ``state_size``, else ``qkv_features``, else the input
        width: with neither field set, call it on a bound module (``mixer.bind(variables)``,
        or inside ``init``/``apply``).
        """
        base.check_decode_options(type(self).__name__, self.bidirectional)
        block = base.resolve_block(self.block, self.bidirectional)
        width = self.qkv_features
        if width is None and not (block == base.PLAIN and self.state_size):
            if self.scope is None:
                raise ValueError(
                    f"{type(self).__name__}.init_state: set qkv_features, or call it on a "
                    "bound module (mixer.bind(variables).init_state(...)): the inner width "
                    "defaults to the input width."
                )
            width = self._in_features()
        return state_lib.block_state(
            batch_shape,
            outer=block == base.OUTER,
            width=width,
            num_heads=self.num_heads,
            state_size=self.state_size,
            conv_width=self.conv_width,
            dtype=base.state_dtype(self.param_dtype) if dtype is None else dtype,
            timestamps=timestamps,
            out_sharding=out_sharding,
        )

    @nn.compact
    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_k: jax.Array | None = None,
        inputs_v: jax.Array | None = None,
        *,
        inputs_kv: jax.Array | None = None,
        mask: jax.Array | None = None,
        deterministic: bool | None = None,
        dropout_rng: jax.Array | None = None,
        sow_weights: bool = False,
        segment_ids: jax.Array | None = None,
        state: MixerState | None = None,
        write_index: jax.Array | None = None,
        timestamps: jax.Array | None = None,
    ):
        """Mixes ``inputs_q`` along its length axis.

        Args:
          inputs_q: ``[batch..., L, E]``.
          inputs_k, inputs_v, inputs_kv: must be ``None`` (or ``inputs_q`` itself); a
            mixer cannot do cross-attention and raises a ``ValueError``.
          mask: ``None``, a padding mask ``[batch..., L]`` or an attention mask
            ``[batch..., L, K]`` / ``[batch..., heads, L, K]`` (``True`` = allowed), see
            :mod:`flax_linoss.mixers.masks`: padded steps never influence valid steps
            (their own outputs are unspecified), and a block-diagonal (packing) mask
            restarts the state at each segment start. Other entries, e.g. a missing
            causal triangle, do not change the (causal) computation.
          deterministic: disables dropout; merged with the attribute.
          dropout_rng: key for dropout (default ``self.make_rng("dropout")``).
          sow_weights: ignored (a mixer has no attention weights).
          segment_ids: optional ``[batch..., L]`` ints (packing without a mask); the state
            restarts wherever they change, combined with the segments of ``mask``.
          state: a :class:`~flax_linoss.mixers.state.MixerState` (:meth:`init_state`) to
            continue from (functional decoding); the call returns ``(y, new_state)``.
          write_index: see the nnx mixer (default ``state.index``).
          timestamps: ``[batch..., L]`` observation times, see the nnx mixer. To decode
            with them, make the state with ``init_state(..., timestamps=True)``, or
            (``decode=True``) pass ``timestamps`` to ``init``: the cache then carries the
            last step's time.

        Returns:
          ``[batch..., L, O]``, or ``(output, new_state)`` with ``state``.

        Decoding in the Flax attention style (``decode=True``): ``init`` on an input of the
        decoding batch shape (any length) creates the ``"cache"`` collection (the fields
        of a :class:`~flax_linoss.mixers.state.MixerState` under the names of
        :data:`flax_linoss.mixers.state.CACHE_NAMES`; its size does not depend on the
        maximum length) and returns the full forward pass. Then ``apply(...,
        mutable=["cache"])`` with ``L >= 1`` new steps (a multi-step prompt, then one token at
        a time) continues from the cached state and stores the new one.
        """
        where = type(self).__name__
        base.check_self_mixing(where, inputs_q, inputs_k, inputs_v, inputs_kv)
        call = dict(
            mask=mask,
            sow_weights=sow_weights,
            segment_ids=segment_ids,
            state=state,
            write_index=write_index,
            timestamps=timestamps,
        )
        if self.dropout_rate > 0.0:
            det = nn.merge_param("deterministic", self.deterministic, deterministic)
            call["deterministic"] = det
            if not det:
                key = self.make_rng("dropout") if dropout_rng is None else dropout_rng
                call["rngs"] = nnx.Rngs(dropout=key)
        cached = self.decode and state is None
        decoding = cached and not self.is_initializing()
        if cached:
            base.check_decode_options(where, self.bidirectional)
            self._check_cache(where)
        return self.run(
            inputs_q,
            lambda m: m(inputs_q, decode=decoding, **call),
            prepare=(lambda m, fresh: self._prepare_cache(m, fresh, inputs_q.shape, timestamps))
            if cached
            else None,
        )

    def _check_cache(self, where: str) -> None:
        if self.is_initializing():
            return
        if not self.has_variable("cache", "state_z"):
            raise ValueError(
                f"{where}(decode=True) has no 'cache' collection: create it first with "
                "`variables = model.init(key, x)` on an input of the decoding batch shape "
                "(decode=True), then call `model.apply({'params': ..., 'cache': "
                "variables['cache']}, x_new, mutable=['cache'])`."
            )
        if not self.is_mutable_collection("cache"):
            raise ValueError(
                f"{where}(decode=True): the 'cache' collection must be mutable to decode; "
                "pass `mutable=['cache']` to `apply`."
            )

    def _prepare_cache(
        self, module: nnx_mixers.LinOSSMixer, fresh: bool, shape, timestamps
    ) -> None:
        # flax convention: init creates a zero cache for the input's batch shape and runs
        # the ordinary forward pass (one with timestamps makes a cache that carries the
        # last step's time); apply continues from the stored cache.
        if fresh:
            module.init_cache(shape, timestamps=timestamps is not None)
        else:
            cache = self.variables["cache"]
            batch = cache["last_index"].shape
            timed = state_lib.CACHE_NAMES["time"] in cache
            module.init_cache((*batch, 1, module.in_features), timestamps=timed)


_DOC = """LinOSS / D-LinOSS self-mixer with the interface of ``nn.MultiHeadDotProductAttention``.

Causal by construction (unless ``bidirectional``); self-mixing only. Its fields are
attention's, in attention's order, then the LinOSS options; every one that the nnx mixer
(:class:`flax_linoss.mixers.nnx.LinOSSMixer`, the one source) takes is derived from its
constructor (same names, annotations and defaults).

Attention arguments and what they mean here:
  num_heads: the heads of the outer block (default 1; ``qkv_features`` must be a multiple
    of it, each head holding ``qkv_features / num_heads`` key and value dims); ignored by
    the plain block (one group of ``P`` diagonal oscillators over all ``H`` channels).
  dtype, param_dtype, precision: as in Flax (``precision`` applies to the two
    projections; the recurrence always runs in float32 or wider).
  qkv_features: the inner width ``H`` (default: the input width ``E``).
  out_features: the output width ``O`` (default ``E``).
  broadcast_dropout, dropout_rate: dropout on the mixed sequence ``y`` (attention drops
    attention weights; a mixer has none); ``broadcast_dropout`` shares one mask over the
    batch axes.
  deterministic: default of the call argument; needed only if ``dropout_rate > 0``.
  kernel_init, out_kernel_init, bias_init, out_bias_init, use_bias: the two projections.
    Initialisers already wrapped in ``nn.with_logical_partitioning`` keep their names.
  qkv_dot_general(_cls), out_dot_general(_cls): passed to the in/out projections.
  decode: keep the decoding state in the ``"cache"`` collection (see ``__call__``).
  attention_fn, normalize_qk, force_fp32_for_softmax, qk_attn_weights_einsum_cls,
    attn_weights_value_einsum_cls: accepted and ignored (there is no softmax, no query
    or key).

LinOSS options:
  block: ``"outer"``: queries, keys, values and a gate
    projected from the input, a short causal convolution over the last ``conv_width``
    valid steps, then per head a ``K x K`` memory of oscillators driven by ``k v^T`` and
    read by ``q`` (:func:`flax_linoss.ops.outer_apply`), an RMS norm per head, the gate and
    the output projection; it recalls in context (``benchmarks/MIXERS.md``). ``"plain"``:
    the papers' ``in_proj -> LinOSS -> out_proj``. ``None`` (default): ``"outer"``, or
    ``"plain"`` when ``bidirectional`` (the outer block is causal).
  conv_width: taps of the outer block's convolution (0: none).
  gate_activation: ``"silu"`` (default), ``"gelu"``, ``"sigmoid"`` or ``None`` (no gate).
  chunk: the chunk length of the outer block's pure-JAX form (default
    :data:`flax_linoss.ops.outer.DEFAULT_CHUNK`; the CPU kernels take none).
  selective: input-dependent step sizes ``dt_t = dt * softplus(x_t W + b)``: in the plain
    block per oscillator (see :class:`flax_linoss.nnx.LinOSSLayer`), in the outer block per
    key dim of each head (``dt_proj``, ``[E, H]``, starting at exactly ``dt``
    with ``use_bias``; without a bias at ``dt * softplus(0)``).
  selective_rank: the plain block's low-rank gate (see the layer).
  time_scale: the unit of ``timestamps`` (both blocks).
  discretization: ``"im"`` (LinOSS-IM), ``"imex"`` (LinOSS-IMEX) or ``"damped"``
    (D-LinOSS).
  state_size: oscillators ``P`` (default ``H``).
  bidirectional: add a second layer (``linoss_reverse``) scanning from the last step to
    the first and **sum** the two outputs; for encoders. Cannot decode.
  scan: scan path of the core, see :func:`flax_linoss.ops.linoss_apply`; in the outer
    block ``"auto"`` runs its memory and convolution as fused kernels on CPU per device,
    ``"native"`` always, and a pure-JAX path's name (``"chunked"``, ...) their pure-JAX
    forms (which also differentiate forward, ``jax.jvp``).
  oscillator_init: initialiser of ``(a_raw, dt_raw[, g_raw])``, see
    :class:`flax_linoss.linen.LinOSSLayer`.
  constraint: ``"stable"`` (default) or ``"paper"``, see
    :class:`flax_linoss.nnx.LinOSSLayer`.
"""

LinOSSMixer = type(
    "LinOSSMixer", (_MixerSkin,), {**_fields(), "__module__": __name__, "__doc__": _DOC}
)


class LinOSSIMEXMixer(LinOSSMixer):
    """:class:`LinOSSMixer` with ``discretization="imex"`` (LinOSS-IMEX) by default."""

    discretization: str = ops.IMEX


class DLinOSSMixer(LinOSSMixer):
    """:class:`LinOSSMixer` with ``discretization="damped"`` (D-LinOSS) by default."""

    discretization: str = ops.DAMPED


class SelectiveLinOSSMixer(LinOSSMixer):
    """:class:`LinOSSMixer` with ``selective=True`` (input-dependent step sizes) by
    default."""

    selective: bool = True


def as_self_attention(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of ``cls`` with the call signature of ``nn.SelfAttention``.

    ``nn.SelfAttention`` is called as ``(inputs_q, mask=None, deterministic=None,
    dropout_rng=None, sow_weights=False)``, so its second positional argument is the mask
    (the lm1b example calls ``nn.SelfAttention(...)(x, decoder_mask)``). Swapping it needs a
    class with that signature; the subclass keeps ``cls``'s name (and parameter names).
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"as_self_attention needs a flax.linen Module class, got {cls!r}.")

    class SelfMixer(cls):
        @nn.compact
        def __call__(
            self,
            inputs_q: jax.Array,
            mask: jax.Array | None = None,
            deterministic: bool | None = None,
            dropout_rng: jax.Array | None = None,
            sow_weights: bool = False,
        ):
            return super().__call__(
                inputs_q,
                mask=mask,
                deterministic=deterministic,
                dropout_rng=dropout_rng,
                sow_weights=sow_weights,
            )

    SelfMixer.__name__ = cls.__name__
    SelfMixer.__qualname__ = cls.__qualname__
    SelfMixer.__doc__ = f"{cls.__name__} called like ``nn.SelfAttention``.\n\n{cls.__doc__}"
    return SelfMixer
