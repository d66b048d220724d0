"""LinOSS sequence mixer as a drop-in for ``flax.nnx.MultiHeadAttention``.

The same computation, parameter names, shapes and logical axes as
:class:`flax_linoss.mixers.linen.LinOSSMixer` (see there)::

    in_proj (nnx.Linear E -> H), linoss (LinOSSLayer), [linoss_reverse], out_proj (H -> O)

Sharding, as ``nnx.MultiHeadAttention`` does it:

* By default no parameter carries mesh-axis names (they are replicated), whatever mesh is set.
  Every parameter records its logical axis names (:data:`flax_linoss.mixers.base.PARAM_AXES`:
  ``embed``, ``kv``, ``oscillator``) as ``logical_axes`` metadata, which no mesh reads.
* ``kernel_metadata``, ``bias_metadata``, ``out_kernel_metadata``, ``out_bias_metadata``
  are honoured as for attention. Their ``out_sharding`` (or ``sharding_names``) is written
  for attention's shapes, and is mapped onto ours like this: the input kernel
  ``(E, heads, head_dim)`` -> ``in_proj/kernel [E, H]`` takes ``(E's axis, heads' axis)``;
  the input bias ``(heads, head_dim)`` -> ``in_proj/bias [H]`` takes ``(heads' axis,)``;
  the output kernel ``(heads, head_dim, O)`` -> ``out_proj/kernel [H, O]`` takes ``(heads'
  axis, O's axis)``; the output bias is used as it is. Specs already of our rank are used as
  they are; where the heads entry is ``None`` the ``head_dim`` entry is used. The inner width
  ``H`` then has one mesh axis, and the LinOSS layers shard every ``H`` axis the same way:
  ``b [P, H, 2]`` as ``(None, h, None)``, ``c [H, P, 2]`` as ``(h, None, None)``, ``d [H]``
  as ``(h,)``; the oscillator parameters ``[P]`` are replicated. Other metadata keys go to
  the projections unchanged.
* Logical axis names become ``out_sharding`` only when you ask for them: build the mixer
  inside ``flax.linen.logical_axis_rules(rules)`` under a mesh (``jax.set_mesh``); flax maps
  them through the rules and shards the parameters at creation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core.spmd import get_logical_axis_rules
from flax.nnx.nn import dtypes
from jax import lax

from flax_linoss import ops
from flax_linoss.mixers import base, masks
from flax_linoss.nnx.layers import LinOSSLayer
from flax_linoss.ops.params import STABLE

Dtype = Any
Initializer = Callable[..., jax.Array]
_EMPTY: Mapping[str, Any] = MappingProxyType({})
_DEFAULT_KERNEL_INIT = nnx.initializers.lecun_normal()  # nnx.MultiHeadAttention's default
_ZEROS = nnx.initializers.zeros_init()


def _dot_general(dot_general, dot_general_cls):
    if dot_general is not None:
        return dot_general
    return dot_general_cls() if dot_general_cls is not None else lax.dot_general


_SHARDING_KEYS = ("out_sharding", "sharding_names")


def _remap(metadata: Mapping[str, Any], rank: int, pick) -> dict[str, Any]:
    """``metadata`` with its sharding spec (written for attention's shapes) re-cut for a
    parameter of ``rank`` dimensions by ``pick(spec) -> spec`` (see the module docstring)."""
    out = dict(metadata)
    for key in _SHARDING_KEYS:
        spec = out.get(key)
        if spec is not None and len(tuple(spec)) != rank:
            out[key] = tuple(pick(tuple(spec)))
    return out


def _heads(spec: tuple, i: int):
    """The mesh axis of attention's ``heads`` entry ``i`` (or of ``head_dim`` after it)."""
    return spec[i] if spec[i] is not None else spec[i + 1]


def _sharding(metadata: Mapping[str, Any]) -> tuple | None:
    for key in _SHARDING_KEYS:
        if metadata.get(key) is not None:
            return tuple(metadata[key])
    return None


def _inner_axis(in_kernel: Mapping[str, Any], out_kernel: Mapping[str, Any]):
    """The mesh axis of the inner width ``H`` given by the user's metadata, or ``None``."""
    spec = _sharding(in_kernel)
    if spec is not None:
        return spec[1]
    spec = _sharding(out_kernel)
    return None if spec is None else spec[0]


def _logical(metadata: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """``metadata`` with the logical names of ``key`` as its sharding, unless it has one."""
    if _sharding(metadata) is not None:
        return metadata
    return {**metadata, "out_sharding": base.PARAM_AXES[key]}


def _layer_metadata(h_axis) -> dict[str, dict[str, Any]]:
    """``out_sharding`` of a LinOSS layer's parameters whose ``H`` axis is ``h_axis``."""
    if h_axis is None:
        return {}
    return {
        "b": {"out_sharding": (None, h_axis, None)},
        "c": {"out_sharding": (h_axis, None, None)},
        "d": {"out_sharding": (h_axis,)},
    }


class LinOSSMixer(nnx.Module):
    """LinOSS / D-LinOSS self-mixer with the interface of ``nnx.MultiHeadAttention``.

    Causal by construction (unless ``bidirectional``); self-mixing only. The arguments
    mean what they mean for :class:`flax_linoss.mixers.linen.LinOSSMixer`; in addition:

    Args:
      num_heads: accepted and ignored (default 1), see the linen mixer.
      in_features: the input width ``E`` (required).
      qkv_features: inner width ``H`` (default ``E``).
      out_features: output width ``O`` (default ``E``).
      num_kv_heads, in_kv_features: accepted and ignored (no keys or values).
      dtype, param_dtype, precision, kernel_init, out_kernel_init, bias_init,
        out_bias_init, use_bias, qkv_dot_general(_cls), out_dot_general(_cls): the two
        projections (``nnx.Linear``).
      qkv_promote_dtype, out_promote_dtype: ``promote_dtype`` of the in and out projection.
      broadcast_dropout, dropout_rate, deterministic: dropout on the mixed sequence.
      attention_fn, normalize_qk, ln_promote_dtype, query_ln_scale_metadata,
        key_ln_scale_metadata: accepted and ignored.
      decode: default of the call argument (``None`` = ``False``).
      rngs: ``nnx.Rngs`` with ``params`` (and ``dropout`` if ``dropout_rate > 0``).
      keep_rngs: store a forked ``dropout`` stream for calls without ``rngs``.
      kernel_metadata, out_kernel_metadata, bias_metadata, out_bias_metadata: metadata of
        the projections' parameters (as in ``nnx.MultiHeadAttention``).
      discretization, state_size, bidirectional, scan, oscillator_init, constraint: the
        LinOSS options (see :class:`flax_linoss.nnx.LinOSSLayer`).
    """

    def __init__(
        self,
        num_heads: int = 1,
        in_features: int | None = None,
        qkv_features: int | None = None,
        out_features: int | None = None,
        num_kv_heads: int | None = None,
        in_kv_features: int | None = None,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        broadcast_dropout: bool = True,
        dropout_rate: float = 0.0,
        deterministic: bool | None = None,
        precision: Any = None,
        kernel_init: Initializer = _DEFAULT_KERNEL_INIT,
        out_kernel_init: Initializer | None = None,
        bias_init: Initializer = _ZEROS,
        out_bias_init: Initializer | None = None,
        use_bias: bool = True,
        attention_fn: Callable[..., Any] | None = None,
        decode: bool | None = None,
        normalize_qk: bool = False,
        qkv_promote_dtype: Callable = dtypes.promote_dtype,
        out_promote_dtype: Callable = dtypes.promote_dtype,
        ln_promote_dtype: Callable | None = None,
        qkv_dot_general: Any = None,
        out_dot_general: Any = None,
        qkv_dot_general_cls: Any = None,
        out_dot_general_cls: Any = None,
        rngs: nnx.Rngs,
        keep_rngs: bool = True,
        kernel_metadata: Mapping[str, Any] = _EMPTY,
        out_kernel_metadata: Mapping[str, Any] = _EMPTY,
        bias_metadata: Mapping[str, Any] = _EMPTY,
        out_bias_metadata: Mapping[str, Any] = _EMPTY,
        query_ln_scale_metadata: Mapping[str, Any] = _EMPTY,
        key_ln_scale_metadata: Mapping[str, Any] = _EMPTY,
        discretization: str = ops.IM,
        state_size: int | None = None,
        bidirectional: bool = False,
        scan: str = ops.AUTO,
        oscillator_init: Callable | None = None,
        constraint: str = STABLE,
    ):
        where = type(self).__name__
        del num_kv_heads, in_kv_features, attention_fn, normalize_qk, ln_promote_dtype
        del query_ln_scale_metadata, key_ln_scale_metadata
        if in_features is None:
            raise TypeError(f"{where} needs `in_features` (the input width).")
        base.check_options(where, discretization, scan, state_size)
        base.check_mixer_arguments(
            where, in_features, qkv_features, out_features, dropout_rate, dtype, param_dtype
        )
        self.num_heads = num_heads
        self.in_features = in_features
        self.qkv_features = qkv_features or in_features
        self.out_features = out_features or in_features
        self.state_size = state_size or self.qkv_features
        self.discretization = discretization
        self.bidirectional = bidirectional
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.broadcast_dropout = broadcast_dropout
        self.dropout_rate = dropout_rate
        self.deterministic = deterministic
        self.decode = decode

        def linear(n_in, n_out, kinit, binit, promote, dg, dgc, kmeta, bmeta):
            return nnx.Linear(
                n_in,
                n_out,
                use_bias=use_bias,
                dtype=dtype,
                param_dtype=param_dtype,
                precision=precision,
                kernel_init=kinit,
                bias_init=binit,
                promote_dtype=promote,
                dot_general=_dot_general(dg, dgc),
                kernel_metadata=kmeta,
                bias_metadata=bmeta,
                rngs=rngs,
            )

        kernel_metadata = _remap(kernel_metadata, 2, lambda s: (s[0], _heads(s, 1)))
        bias_metadata = _remap(bias_metadata, 1, lambda s: (_heads(s, 0),))
        out_kernel_metadata = _remap(out_kernel_metadata, 2, lambda s: (_heads(s, 0), s[-1]))
        param_metadata = _layer_metadata(_inner_axis(kernel_metadata, out_kernel_metadata))
        # Under logical axis rules (and a mesh: flax's eager sharding needs one), parameters
        # without a sharding of their own are created with their logical names as
        # `out_sharding`; flax maps them through the rules and shards them at creation.
        mesh = not jax.sharding.get_abstract_mesh().empty or not nnx.using_eager_sharding()
        if get_logical_axis_rules() and mesh:
            kernel_metadata = _logical(kernel_metadata, "in_proj/kernel")
            bias_metadata = _logical(bias_metadata, "in_proj/bias")
            out_kernel_metadata = _logical(out_kernel_metadata, "out_proj/kernel")
            out_bias_metadata = _logical(out_bias_metadata, "out_proj/bias")
            if not param_metadata:
                param_metadata = {  # the layer's own parameters (no projection prefix)
                    n: {"out_sharding": axes} for n, axes in base.PARAM_AXES.items() if "/" not in n
                }

        def layer():
            return LinOSSLayer(
                self.qkv_features,
                self.state_size,
                discretization=discretization,
                scan=scan,
                oscillator_init=oscillator_init,
                constraint=constraint,
                dtype=dtype,
                param_dtype=param_dtype,
                param_metadata=param_metadata,
                rngs=rngs,
            )

        self.in_proj = linear(
            in_features,
            self.qkv_features,
            kernel_init,
            bias_init,
            qkv_promote_dtype,
            qkv_dot_general,
            qkv_dot_general_cls,
            kernel_metadata,
            bias_metadata,
        )
        self.linoss = layer()
        self.linoss_reverse = layer() if bidirectional else None
        self.out_proj = linear(
            self.qkv_features,
            self.out_features,
            out_kernel_init or kernel_init,
            out_bias_init or bias_init,
            out_promote_dtype,
            out_dot_general,
            out_dot_general_cls,
            out_kernel_metadata,
            out_bias_metadata,
        )
        # Logical names are recorded always (no mesh reads this key).
        for path, var in nnx.to_flat_state(nnx.state(self, nnx.Param)):
            key = "/".join(map(str, path[-2:])) if "proj" in str(path[0]) else str(path[-1])
            var.set_metadata(logical_axes=base.PARAM_AXES[key])
        self.rngs = rngs.dropout.fork() if keep_rngs and dropout_rate > 0 else None
        self.state_z: nnx.Cache | None = nnx.data(None)
        self.state_y: nnx.Cache | None = nnx.data(None)
        self.cache_index: nnx.Cache | None = nnx.data(None)

    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_k: jax.Array | None = None,
        inputs_v: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | None = None,
        sow_weights: bool = False,
        decode: bool | None = None,
        is_causal: bool = False,
        out_sharding=None,
        qkv_sharding=None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Mixes ``inputs_q [batch..., L, E]`` along its length axis -> ``[batch..., L, O]``.

        Args:
          inputs_q, inputs_k, inputs_v, mask, segment_ids: as in the linen mixer
            (``inputs_k``/``inputs_v`` other than ``None`` or ``inputs_q`` raise).
          deterministic: disables dropout (default: the attribute).
          rngs: dropout randomness (default: the stored stream).
          sow_weights: ignored (no attention weights).
          decode: continue from the cache made by :meth:`init_cache` (default: the
            attribute). Any number ``L >= 1`` of new steps per call.
          is_causal: ignored by the causal mixer (it is causal anyway); ``True`` on a
            bidirectional mixer raises.
          out_sharding: passed to the output projection; ``qkv_sharding`` to the input one.
        """
        where = type(self).__name__
        del sow_weights
        base.check_self_mixing(where, inputs_q, inputs_k, inputs_v)
        base.check_input(where, inputs_q)
        if inputs_q.shape[-1] != self.in_features:
            raise ValueError(
                f"{where} was built for in_features={self.in_features} but got input of shape "
                f"{inputs_q.shape}."
            )
        if is_causal and self.bidirectional:
            raise ValueError(f"{where}: is_causal=True contradicts bidirectional=True.")
        lead = inputs_q.shape[:-1]
        valid, seg = masks.reduce_mask(mask, lead, where=where)
        seg = masks.combine_segment_ids(
            seg, masks.check_segment_ids(segment_ids, lead, where=where)
        )
        h = self.in_proj(inputs_q, out_sharding=qkv_sharding)
        decode = self.decode if decode is None else decode
        if decode:
            base.check_decode_options(where, self.bidirectional)
            y = self._decode(h, valid, seg)
        else:
            y = self.linoss(h, mask=valid, segment_ids=seg)
        if self.linoss_reverse is not None:
            y = y + self.linoss_reverse(h, reverse=True, mask=valid, segment_ids=seg)
        if self.dropout_rate > 0.0:
            deterministic = self.deterministic if deterministic is None else deterministic
            if deterministic is None:
                raise ValueError(
                    f"{where}(dropout_rate={self.dropout_rate}) needs `deterministic` as a "
                    "call argument, a constructor argument or through nnx.view."
                )
            if not deterministic:
                stream = self.rngs if rngs is None else rngs
                if isinstance(stream, nnx.Rngs):
                    stream = stream.dropout
                if stream is None:
                    raise ValueError(
                        f"{where}: dropout needs `rngs` (the mixer was built with keep_rngs=False)."
                    )
                y = base.dropout(y, self.dropout_rate, stream(), self.broadcast_dropout)
        return self.out_proj(y, out_sharding=out_sharding)

    def _decode(self, h, valid, seg):
        where = type(self).__name__
        if self.state_z is None or self.state_y is None or self.cache_index is None:
            raise ValueError(
                f"{where}: decoding cache not initialised; call `init_cache(input_shape)` "
                "(or nnx.view(model, decode=True, batch_size=...)) before decoding."
            )
        base.check_cache_batch(where, self.state_z.shape[:-2], h.shape[:-2])
        state = ops.LinOSSState(self.state_z[...], self.state_y[...])
        y, state = self.linoss(
            h, initial_state=state, return_state=True, mask=valid, segment_ids=seg
        )
        self.state_z[...] = state.z.astype(self.state_z.dtype)
        self.state_y[...] = state.y.astype(self.state_y.dtype)
        self.cache_index[...] += h.shape[-2]
        return y

    def init_cache(self, input_shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> None:
        """Creates a zero decoding state for inputs of shape ``[batch..., length, E]``.

        Only the batch shape matters (the state is ``[batch..., 2, P]`` whatever the maximum
        length); ``dtype`` is accepted for compatibility: the state is kept in the
        recurrence dtype (float32, or float64 with float64 parameters).
        """
        del dtype
        if len(input_shape) < 2:
            raise ValueError(
                f"init_cache expects an input shape [batch..., length, features], got "
                f"{tuple(input_shape)}."
            )
        self._make_cache(tuple(input_shape[:-2]))

    def _make_cache(self, batch: tuple[int, ...]) -> None:
        shape = (*batch, 2, self.state_size)
        sdtype = base.state_dtype(self.param_dtype)
        self.state_z = nnx.Cache(jnp.zeros(shape, sdtype))
        self.state_y = nnx.Cache(jnp.zeros(shape, sdtype))
        self.cache_index = nnx.Cache(jnp.array(0, jnp.int32))

    def set_view(
        self,
        deterministic: bool | None = None,
        decode: bool | None = None,
        batch_size: int | tuple[int, ...] | None = None,
        max_length: int | None = None,
    ):
        """Used by ``nnx.view``: sets ``deterministic``/``decode``; with ``decode=True`` and
        a ``batch_size`` it creates the cache if there is none (``max_length`` is accepted
        and not needed: the state does not grow with the length)."""
        del max_length
        if deterministic is not None:
            self.deterministic = deterministic
        if decode is not None:
            self.decode = decode
            if decode and self.state_z is None and batch_size is not None:
                batch = (batch_size,) if isinstance(batch_size, int) else tuple(batch_size)
                self._make_cache(batch)


class LinOSSIMEXMixer(LinOSSMixer):
    """:class:`LinOSSMixer` with ``discretization="imex"`` (LinOSS-IMEX) by default."""

    def __init__(self, *args, discretization: str = ops.IMEX, **kwargs):
        super().__init__(*args, discretization=discretization, **kwargs)


class DLinOSSMixer(LinOSSMixer):
    """:class:`LinOSSMixer` with ``discretization="damped"`` (D-LinOSS) by default."""

    def __init__(self, *args, discretization: str = ops.DAMPED, **kwargs):
        super().__init__(*args, discretization=discretization, **kwargs)
