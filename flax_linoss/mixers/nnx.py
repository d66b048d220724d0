"""LinOSS sequence mixer as a drop-in for ``flax.nnx.MultiHeadAttention``.

The same computation, parameter names, shapes and logical axes as
:class:`flax_linoss.mixers.linen.LinOSSMixer` (see there)::

    in_proj (nnx.Linear E -> H), linoss (LinOSSLayer), [linoss_reverse], out_proj (H -> O)

Sharding, as ``nnx.MultiHeadAttention`` does it:

* By default no parameter carries mesh-axis names (they are replicated), whatever mesh is set.
  Every parameter records its logical axis names (:data:`flax_linoss.mixers.base.PARAM_AXES`:
  ``embed``, ``kv``, ``oscillator``) as ``logical_axes`` metadata, which no mesh reads.
* ``kernel_metadata``, ``bias_metadata``, ``out_kernel_metadata``, ``out_bias_metadata``
  are honoured as for attention (the output projection uses ``out_kernel_metadata or
  kernel_metadata`` and ``out_bias_metadata or bias_metadata``, as flax does). Their
  ``out_sharding`` (or ``sharding_names``) is written for attention's shapes, and is
  mapped onto ours like this: the input kernel ``(E, heads, head_dim)`` ->
  ``in_proj/kernel [E, H]`` takes ``(E's axis, heads' axis)``; the input bias ``(heads,
  head_dim)`` -> ``in_proj/bias [H]`` takes ``(heads' axis,)``; the output kernel ``(heads,
  head_dim, O)`` -> ``out_proj/kernel [H, O]`` takes ``(heads' axis, O's axis)``; the output
  bias is used as it is. Specs already of our rank are used as they are; where the heads
  entry is ``None`` the ``head_dim`` entry is used. The inner width ``H`` then has one mesh
  axis, and the LinOSS layers shard every ``H`` axis the same way: ``b [P, H, 2]`` as
  ``(None, h, None)``, ``c [H, P, 2]`` as ``(h, None, None)``, ``d [H]`` as ``(h,)``; the
  oscillator parameters ``[P]`` are replicated. Other metadata keys go to the projections
  unchanged. Every parameter is created with its logical names (``logical_axes``).
* Logical axis names become ``out_sharding`` only when you ask for them: build the mixer
  inside ``flax.linen.logical_axis_rules(rules)`` under a mesh (``jax.set_mesh``); flax maps
  them through the rules and shards the parameters at creation.
* Activations under an explicit mesh: when the input kernel carries a sharding, the inner
  activations ``[batch..., L, H]`` take the input's batch and length shardings and the
  kernel's ``H`` axis, and the output takes the input's sharding, unless the call passes
  ``qkv_sharding`` / ``out_sharding`` (so code written for attention needs no extra
  argument).

Decoding, two ways (the same computation):

* functional: ``state = mixer.init_state((batch,))``, then ``y, state = mixer(x, state=state)``
  (any number of new steps; a :class:`~flax_linoss.mixers.state.MixerState` of fixed type,
  a valid ``lax.scan`` / ``lax.while_loop`` carry);
* Flax attention style: ``init_cache`` (or ``nnx.view(..., decode=True, batch_size=...)``)
  makes ``nnx.Cache`` variables, and ``mixer(x, decode=True)`` reads and writes them.
"""

from __future__ import annotations

import functools
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
from flax_linoss.common import HEADS_AXIS, explicit_spec, split_axes
from flax_linoss.mixers import base, masks
from flax_linoss.mixers import state as state_lib
from flax_linoss.mixers.state import MixerState
from flax_linoss.nnx.layers import SOFTPLUS_INV_ONE, LinOSSLayer
from flax_linoss.ops._checks import check_per_step
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


def _with_axes(metadata: Mapping[str, Any], key: str, logical_sharding: bool) -> dict[str, Any]:
    """``metadata`` for the parameter ``key`` (a :data:`~flax_linoss.mixers.base.PARAM_AXES`
    name) as it is created: its logical axis names recorded (``logical_axes``, which no mesh
    reads), and, when ``logical_sharding``, used as its sharding unless it has one."""
    out = {"logical_axes": base.PARAM_AXES[key], **metadata}
    if logical_sharding and _sharding(out) is None:
        out["out_sharding"] = base.PARAM_AXES[key]
    return out


def _layer_metadata(h_axis, logical_sharding: bool) -> dict[str, dict[str, Any]]:
    """Metadata of a LinOSS layer's parameters whose ``H`` axis has mesh axis ``h_axis``."""
    by_h = {
        "b": (None, h_axis, None),
        "c": (h_axis, None, None),
        "d": (h_axis,),
        "dt_kernel": (h_axis, None),
        "dt_down": (h_axis, None),
    }
    out = {}
    names = ("a_raw", "dt_raw", "g_raw", "b", "c", "d", "dt_kernel", "dt_down", "dt_up", "dt_bias")
    for name in names:
        meta = {"out_sharding": by_h[name]} if h_axis is not None and name in by_h else {}
        out[name] = _with_axes(meta, name, logical_sharding)
    return out


# The arguments of _outer_core whose last axis is the heads' features (q, k, v and the
# selective gate), and which of its parameters have a heads axis (at which position).
_HEAD_STREAMS = (1, 2, 3, 10)
_HEAD_PARAMS = {"a_raw": 0, "dt_raw": 0, "g_raw": 0, "scale": 0, "conv_kernel": 2, "conv_bias": 1}


def _core_per_shard(core, args, explicit: bool, lead: tuple, seq=None, heads=None):
    """``core(*args)`` per device on its rows (``lead``, the batch axes' PartitionSpec
    entries), with ``seq`` its steps (the length split over that mesh axis; a whole
    sequence, no decoding state: the recurrence, the convolution and the timestamps' gaps
    then pass state between the shards, ``sequence_axis``) and with ``heads`` its heads
    (that mesh axis splits the heads, each device running its own heads' convolution,
    memory and norm: nothing passes between them). Parameters are gathered whole, or split
    with the heads; under explicit axes the output keeps the first activation's sharding."""
    P = jax.sharding.PartitionSpec
    params = args[0]
    batch_ndim = len(lead)

    def spec(a, split_features=False):  # [batch..., L, H] streams, [batch..., L], [batch...]
        if a is None:
            return None
        steps = (seq,) if a.ndim > batch_ndim else ()
        tail = [None] * (a.ndim - batch_ndim - len(steps))
        if split_features:
            tail[-1] = heads
        return P(*lead, *steps, *tail)

    def param_spec(name, a):
        if a is None:
            return None
        axis = _HEAD_PARAMS[name] if heads is not None else None
        return P(*(heads if i == axis else None for i in range(a.ndim)))

    in_specs = (
        {n: param_spec(n, a) for n, a in params.items()},
        *(spec(a, heads is not None and i in _HEAD_STREAMS) for i, a in enumerate(args) if i),
    )
    given = jax.typeof(args[1]).sharding.spec if explicit else None
    if explicit:
        args = jax.tree.map(jax.sharding.reshard, args, in_specs, is_leaf=lambda a: a is None)
    plain = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    out_shape = jax.eval_shape(core, *plain)
    out_specs = jax.tree.map(spec, out_shape)
    if heads is not None:  # a whole sequence: the output, no state or buffers
        out_specs = (spec(out_shape[0], True), *out_specs[1:])
    mesh = jax.sharding.get_abstract_mesh()
    run = functools.partial(core, sequence_axis=seq)
    out = jax.shard_map(run, mesh=mesh, in_specs=in_specs, out_specs=out_specs)(*args)
    if explicit:
        out = (jax.sharding.reshard(out[0], given), *out[1:])
    return out


def _zero_where(restart, s):
    """``s [batch..., ...]`` with the rows where ``restart [batch...]`` set to zero."""
    return jnp.where(restart.reshape(restart.shape + (1,) * (s.ndim - restart.ndim)), 0, s)


def _check_state_times(where: str, state: MixerState, timestamps, cached: bool) -> None:
    """Decoding with ``timestamps`` needs a state that carries the last step's time, and a
    state that carries it needs them."""
    made = (
        "init_cache(input_shape, timestamps=True)"
        if cached
        else "init_state(batch_shape, timestamps=True)"
    )
    if timestamps is not None and state.time is None:
        raise ValueError(
            f"{where}: decoding with timestamps needs a state that carries the last step's "
            f"time: make it with `{made}`."
        )
    if timestamps is None and state.time is not None:
        raise ValueError(
            f"{where}: this decoding state was made for timestamps ({made}); pass the new "
            "steps' `timestamps` with every call."
        )


def _time_before(state: MixerState, restart) -> jax.Array:
    """``[batch...]`` the time of the step before a decoding call's first (``NaN`` where
    there is none: nothing seen yet, or a restart)."""
    return jnp.where(restart | (state.last < 0), jnp.nan, state.time)


def _time_after(state: MixerState | None, timestamps, valid) -> dict[str, jax.Array]:
    """The ``time`` field of the state after a call with ``timestamps`` (else nothing)."""
    if state is None or timestamps is None:
        return {}
    return {"time": masks.last_value(jnp.asarray(timestamps), valid, state.time)}


class _OuterHeads(nnx.Module):
    """The outer block's oscillators, ``[heads, K]`` (``a_raw``, ``dt_raw``, ``g_raw`` for
    D-LinOSS), and the scale ``[heads, V]`` of its per-head output norm."""

    def __init__(self, heads, head_dim, discretization, constraint, param_dtype, logical, rngs):
        self.discretization = discretization
        self.constraint = constraint
        a, dt, g = base.slow_oscillators(
            rngs.params(), (heads, head_dim), discretization, param_dtype
        )
        meta = lambda name: _with_axes({}, f"heads/{name}", logical)
        self.a_raw = nnx.Param(a, **meta("a_raw"))
        self.dt_raw = nnx.Param(dt, **meta("dt_raw"))
        self.g_raw = None if g is None else nnx.Param(g, **meta("g_raw"))
        self.scale = nnx.Param(jnp.ones((heads, head_dim), param_dtype), **meta("scale"))

    def values(self) -> dict[str, jax.Array]:
        return {
            "a_raw": self.a_raw[...],
            "dt_raw": self.dt_raw[...],
            "g_raw": None if self.g_raw is None else self.g_raw[...],
            "scale": self.scale[...],
        }


def _outer_core(
    params,
    q,
    k,
    v,
    valid,
    seg,
    restart,
    conv_state,
    z,
    y,
    gate=None,
    timestamps=None,
    t0=None,
    *,
    discretization,
    constraint,
    chunk,
    time_scale=1.0,
    sequence_axis=None,
    paths=("auto", "auto"),
):
    """The outer block between its projections, a pure function (run per shard under an
    explicit mesh, or with the length split over ``sequence_axis``): ``q, k, v [batch...,
    L, H]`` -> ``(o [batch..., L, H], final OuterState or None, convolution buffers
    [batch..., W - 1, 3, H] or None)``.

    The short causal convolution of each stream (over the valid steps, restarting at segment
    starts; from ``conv_state`` when decoding), then per head the oscillator memory read by
    the queries (their velocity, see :mod:`flax_linoss.ops.outer`) and an RMS norm.
    ``restart [batch...]`` drops the state carried in (decoding), ``z, y`` the oscillator
    state (``None``: a whole sequence from zero). Each step's ``dt`` is multiplied by the
    selective ``gate [batch..., L, H]`` and by the gaps of ``timestamps [batch..., L]`` (in
    units of ``time_scale``; the first one to ``t0 [batch...]``, the time before a decoding
    call), then clamped into the scheme's stable range. ``paths``: the ``scan`` of the
    memory and of the convolution (:func:`flax_linoss.mixers.base.outer_paths`)."""
    decoding = z is not None
    buffers = None
    if params["conv_kernel"] is not None:  # the three streams side by side, one convolution
        width, _, features = params["conv_kernel"].shape
        buf = None
        if decoding:
            buf = _zero_where(restart, conv_state).reshape(*conv_state.shape[:-2], -1)
        out = ops.causal_conv(
            (q, k, v),
            params["conv_kernel"].reshape(width, 3 * features),
            params["conv_bias"].reshape(3 * features),
            mask=valid,
            segment_ids=seg,
            initial_state=buf,
            return_state=decoding,
            sequence_axis=sequence_axis,
            scan=paths[1],
        )
        if decoding:
            out, buffers = out
            buffers = buffers.reshape(*buffers.shape[:-1], 3, features)
        q, k, v = (x.astype(t.dtype) for x, t in zip(out, (q, k, v)))
    a, dt, g = ops.constrain(
        discretization, params["a_raw"], params["dt_raw"], params["g_raw"], constraint=constraint
    )
    heads, dim = a.shape
    split = lambda t: t.reshape(*t.shape[:-1], heads, t.shape[-1] // heads)
    scale = gate
    if timestamps is not None:
        gaps = ops.timestamp_gaps(
            timestamps,
            mask=valid,
            segment_ids=seg,
            initial_timestamp=t0,
            time_scale=time_scale,
            sequence_axis=sequence_axis,
        )[..., None]
        scale = gaps if scale is None else scale * gaps.astype(scale.dtype)
    if scale is not None:  # per step: [batch..., L, heads, K]
        scale = jnp.broadcast_to(scale, q.shape)
        dt = ops.clamp_steps(discretization, a, dt * split(scale), g, constraint=constraint)
    # The velocity, read by the queries; the keys' 1 / sqrt(K) scaling is applied here, to
    # the readout (the same outputs as scaling the keys, on [H, K] instead of every step).
    read = jnp.asarray([1.0 / dim**0.5, 0.0], a.dtype)
    readout = jnp.broadcast_to(read, (heads, dim, 2))
    initial = None
    if decoding:
        initial = ops.OuterState(_zero_where(restart, z), _zero_where(restart, y))
    o, final = ops.outer_apply(
        split(q),
        split(k),
        split(v),
        a,
        dt,
        g=g,
        discretization=discretization,
        readout=readout,
        initial_state=initial,
        return_state=True,
        mask=valid,
        segment_ids=seg,
        chunk=chunk,
        check="shapes",
        sequence_axis=sequence_axis,
        scan=paths[0],
    )
    of = o.astype(jnp.promote_types(jnp.float32, o.dtype))  # float32, or float64
    of = of * jax.lax.rsqrt(jnp.mean(of * of, -1, keepdims=True) + 1e-6) * params["scale"]
    return of.astype(o.dtype).reshape(q.shape), (final if decoding else None), buffers


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
        block: str | None = None,
        conv_width: int = 4,
        gate_activation: str | None = "silu",
        chunk: int | None = None,
        selective: bool = False,
        selective_rank: int | None = None,
        time_scale: float = 1.0,
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
        block = base.resolve_block(block, bidirectional)
        base.check_block(
            where,
            block,
            num_heads,
            qkv_features or in_features,
            conv_width,
            gate_activation,
            {
                "bidirectional": bidirectional,
                "selective_rank": selective_rank is not None,
                "oscillator_init": oscillator_init,
            },
        )
        self.block = block
        self.conv_width = conv_width if block == base.OUTER else 0
        self.gate_activation = gate_activation
        self.chunk = chunk
        self.outer_paths = base.outer_paths(scan)
        self.time_scale = time_scale
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

        # As nnx.MultiHeadAttention: the output projection falls back to the input's metadata.
        out_kernel_metadata = out_kernel_metadata or kernel_metadata
        out_bias_metadata = out_bias_metadata or bias_metadata
        kernel_metadata = _remap(kernel_metadata, 2, lambda s: (s[0], _heads(s, 1)))
        bias_metadata = _remap(bias_metadata, 1, lambda s: (_heads(s, 0),))
        out_kernel_metadata = _remap(out_kernel_metadata, 2, lambda s: (_heads(s, 0), s[-1]))
        self._inner_axis = _inner_axis(kernel_metadata, out_kernel_metadata)
        self._sharded_kernels = (
            _sharding(kernel_metadata) is not None or _sharding(out_kernel_metadata) is not None
        )
        # Under logical axis rules (and a mesh: flax's eager sharding needs one), parameters
        # without a sharding of their own are created with their logical names as
        # `out_sharding`; flax maps them through the rules and shards them at creation.
        mesh = not jax.sharding.get_abstract_mesh().empty or not nnx.using_eager_sharding()
        logical = bool(get_logical_axis_rules()) and mesh
        kernel_metadata = _with_axes(kernel_metadata, "in_proj/kernel", logical)
        bias_metadata = _with_axes(bias_metadata, "in_proj/bias", logical)
        out_kernel_metadata = _with_axes(out_kernel_metadata, "out_proj/kernel", logical)
        out_bias_metadata = _with_axes(out_bias_metadata, "out_proj/bias", logical)
        # The layer's own parameters follow the user's H axis if there is one, else the rules.
        param_metadata = _layer_metadata(self._inner_axis, logical and self._inner_axis is None)

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
                selective=selective,
                selective_rank=selective_rank,
                time_scale=time_scale,
                rngs=rngs,
            )

        def projection(name):
            # Each input projection is sharded like attention's (E, H) kernel; its logical
            # names are those of `name` (the same axes as in_proj's).
            return linear(
                in_features,
                self.qkv_features,
                kernel_init,
                bias_init,
                qkv_promote_dtype,
                qkv_dot_general,
                qkv_dot_general_cls,
                {**kernel_metadata, "logical_axes": base.PARAM_AXES[f"{name}/kernel"]},
                {**bias_metadata, "logical_axes": base.PARAM_AXES[f"{name}/bias"]},
            )

        self.in_proj = projection("in_proj")
        if block == base.OUTER:
            self.query = projection("query")
            self.key = projection("key")
            # The keys start as the queries (q . k is then large where two tokens match).
            self.key.kernel[...] = self.query.kernel[...]
            self.gate = nnx.data(projection("gate") if gate_activation is not None else None)
            # Selective: per-step sizes dt * softplus(x W + b), starting at exactly dt.
            self.dt_proj = nnx.data(None)
            if selective:
                self.dt_proj = projection("dt_proj")
                self.dt_proj.kernel[...] = jnp.zeros_like(self.dt_proj.kernel[...])
                if self.dt_proj.bias is not None:
                    self.dt_proj.bias[...] = jnp.full_like(self.dt_proj.bias[...], SOFTPLUS_INV_ONE)
            self.heads = _OuterHeads(
                num_heads,
                self.qkv_features // num_heads,
                discretization,
                constraint,
                param_dtype,
                logical,
                rngs,
            )
            self.linoss = self.linoss_reverse = None
            self.conv_kernel = self.conv_bias = nnx.data(None)
            if conv_width:
                self.conv_kernel = nnx.Param(
                    base.conv_taps(rngs.params(), conv_width, self.qkv_features, param_dtype),
                    **_with_axes({}, "conv_kernel", logical),
                )
                self.conv_bias = nnx.Param(
                    jnp.zeros((3, self.qkv_features), param_dtype),
                    **_with_axes({}, "conv_bias", logical),
                )
        else:
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
        self.rngs = rngs.dropout.fork() if keep_rngs and dropout_rate > 0 else None
        for name in state_lib.CACHE_NAMES.values():  # decode=True's nnx.Cache variables
            setattr(self, name, nnx.data(None))

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
        state: MixerState | None = None,
        write_index: jax.Array | None = None,
        timestamps: jax.Array | None = None,
    ):
        """Mixes ``inputs_q [batch..., L, E]`` along its length axis -> ``[batch..., L, O]``.

        Args:
          inputs_q, inputs_k, inputs_v, segment_ids: as in the linen mixer
            (``inputs_k``/``inputs_v`` other than ``None`` or ``inputs_q`` raise).
          mask: ``None``, ``[batch..., L]`` validity, or an attention mask ``[batch..., L, K]``
            / ``[batch..., heads, L, K]`` (``K = L``; when decoding, ``K`` may be a cache
            size: step ``i`` is then read at column ``(write_index + i) % K``), see
            :mod:`flax_linoss.mixers.masks`.
          deterministic: disables dropout (default: the attribute).
          rngs: dropout randomness (default: the stored stream).
          sow_weights: ignored (no attention weights).
          decode: continue from the ``nnx.Cache`` variables made by :meth:`init_cache`
            (default: the attribute). Any number ``L >= 1`` of new steps per call.
          is_causal: ignored by the causal mixer (it is causal anyway); ``True`` on a
            bidirectional mixer raises.
          out_sharding, qkv_sharding: the output's and the inner activations' sharding
            (explicit meshes); default: see the module doc.
          state: a :class:`~flax_linoss.mixers.state.MixerState` (from :meth:`init_state`
            or an earlier call) to continue from; the call then returns ``(y, new_state)``.
            Masked steps leave the state unchanged.
          write_index: ``[batch...]`` int, the position of the first new step (the cache
            slot a cache-sized mask describes); default: ``state.index``.
          timestamps: ``[batch..., L]`` observation times of an irregularly sampled
            sequence (the plain block: each step's size is the learned ``dt`` times the gap
            to the previous valid observation, in units of ``time_scale``; see
            :class:`flax_linoss.nnx.LinOSSLayer`). Decoding with them needs a state made
            with ``timestamps=True`` (:meth:`init_state`, :meth:`init_cache`): the first
            new step's gap is then to the last step the state saw.

        Returns:
          ``[batch..., L, O]``; with ``state``, ``(output, new_state)``.
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
        decode = self.decode if decode is None else decode
        cached = state is None and bool(decode)
        if state is not None or cached:
            base.check_decode_options(where, self.bidirectional)
        if cached:
            state = self._cached_state(where)
        if state is not None:
            base.check_cache_batch(where, state.batch_shape, inputs_q.shape[:-2])
            _check_state_times(where, state, timestamps, cached)
        qkv_sharding, out_sharding = self._activation_shardings(
            inputs_q, qkv_sharding, out_sharding
        )
        if self.block == base.OUTER:
            y, new_state = self._mix_outer(
                where, inputs_q, qkv_sharding, mask, segment_ids, state, write_index, timestamps
            )
        else:
            h = self.in_proj(inputs_q, out_sharding=qkv_sharding)
            y, new_state = self._mix(where, h, mask, segment_ids, state, write_index, timestamps)
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
        out = self.out_proj(y, out_sharding=out_sharding)
        if cached:
            for name, value in new_state.cache_variables().items():
                getattr(self, name)[...] = value
            return out
        return out if new_state is None else (out, new_state)

    def _activation_shardings(self, x, qkv_sharding, out_sharding):
        """The defaults of ``qkv_sharding`` / ``out_sharding`` (see the module doc)."""
        if not self._sharded_kernels or not state_lib._explicit_mesh():
            return qkv_sharding, out_sharding
        spec = explicit_spec(x)
        P = jax.sharding.PartitionSpec
        if qkv_sharding is None:
            qkv_sharding = P(*spec[:-1], self._inner_axis)
        if out_sharding is None:
            out_sharding = P(*spec)
        return qkv_sharding, out_sharding

    def _steps(self, where, lead, mask, segment_ids, state, write_index):
        """What the mask and segment ids say about the steps ``lead = (batch..., L)``:
        ``(valid, segment ids for the recurrence, the user's segment ids, restart)``;
        ``restart [batch...]`` (decoding only) says where the state carried in is dropped."""
        user_seg = masks.check_segment_ids(segment_ids, lead, where=where)
        if state is None:
            steps = masks.read_mask(mask, lead, where=where)
        else:
            start = state.index if write_index is None else jnp.asarray(write_index)
            steps = masks.read_mask(mask, lead, where=where, write_index=start, last=state.last)
        valid = steps.valid
        seg = masks.combine_segment_ids(steps.segment_ids, user_seg)
        restart = None if state is None else masks.restarts(steps, user_seg, valid, state)
        return steps, valid, seg, user_seg, restart

    def _next_state(self, state, steps, user_seg, valid, length, **fields):
        new_state = state.replace(
            index=state.index + length,
            last=steps.last,
            segment=masks.last_segment(user_seg, valid, state.segment),
            **fields,
        )
        return state_lib.like(new_state, state)

    def _mix(self, where, h, mask, segment_ids, state, write_index, timestamps=None):
        """The recurrence on the inner activations ``h [batch..., L, H]``: ``(y, new_state)``
        (``new_state`` is ``None`` without ``state``)."""
        steps, valid, seg, user_seg, restart = self._steps(
            where, h.shape[:-1], mask, segment_ids, state, write_index
        )
        if state is None:
            kw = dict(mask=valid, segment_ids=seg, timestamps=timestamps)
            y = self.linoss(h, **kw)
            if self.linoss_reverse is not None:
                y = y + self.linoss_reverse(h, reverse=True, **kw)
            return y, None
        initial = jax.tree.map(lambda s: _zero_where(restart, s), state.oscillators)
        times = {}
        if timestamps is not None:
            times = dict(timestamps=timestamps, initial_timestamp=_time_before(state, restart))
        y, final = self.linoss(
            h, initial_state=initial, return_state=True, mask=valid, segment_ids=seg, **times
        )
        return y, self._next_state(
            state,
            steps,
            user_seg,
            valid,
            h.shape[-2],
            z=final.z,
            y=final.y,
            **_time_after(state, timestamps, valid),
        )

    def _mix_outer(
        self, where, x, qkv_sharding, mask, segment_ids, state, write_index, timestamps=None
    ):
        """The outer block on ``x [batch..., L, E]``: ``(y [batch..., L, H], new_state)``."""
        q, k, v = (m(x, out_sharding=qkv_sharding) for m in (self.query, self.key, self.in_proj))
        lead = q.shape[:-1]
        steps, valid, seg, user_seg, restart = self._steps(
            where, lead, mask, segment_ids, state, write_index
        )
        # Per-step sizes (in the core): dt times the selective gate and the timestamps' gaps.
        gate = t0 = None
        if self.dt_proj is not None:
            pre = self.dt_proj(x, out_sharding=qkv_sharding)
            gate = jax.nn.softplus(pre.astype(jnp.promote_types(jnp.float32, pre.dtype)))
        if timestamps is not None:
            check_per_step("timestamps", timestamps, lead)
            timestamps = jnp.asarray(timestamps)
            t0 = None if state is None else _time_before(state, restart)
        params = {
            **self.heads.values(),
            "conv_kernel": None if self.conv_kernel is None else self.conv_kernel[...],
            "conv_bias": None if self.conv_bias is None else self.conv_bias[...],
        }
        core = functools.partial(
            _outer_core,
            discretization=self.heads.discretization,
            constraint=self.heads.constraint,
            chunk=self.chunk,
            time_scale=self.time_scale,
            paths=self.outer_paths,
        )
        carried = (None, None, None) if state is None else (state.conv, state.z, state.y)
        args = (params, q, k, v, valid, seg, restart, *carried, gate, timestamps, t0)
        split = None
        if state is None:  # the length (rules "length") and the heads ("heads") split
            split = split_axes(q, get_logical_axis_rules(), self.num_heads, HEADS_AXIS)
        if split is not None and (split[2] is not None or split[3] is not None):
            o, final, conv = _core_per_shard(core, args, *split[:3], heads=split[3])
        elif state_lib._explicit_mesh():  # per device on its rows of the batch
            o, final, conv = _core_per_shard(core, args, True, explicit_spec(q)[: q.ndim - 2])
        else:
            o, final, conv = core(*args)
        if self.gate is not None:
            act = base.GATE_ACTIVATIONS[self.gate_activation]
            o = o * act(self.gate(x, out_sharding=qkv_sharding))
        if state is None:
            return o, None
        new = self._next_state(
            state,
            steps,
            user_seg,
            valid,
            lead[-1],
            z=final.z,
            y=final.y,
            conv=conv,
            **_time_after(state, timestamps, valid),
        )
        return o, new

    def init_state(
        self,
        batch_shape: tuple[int, ...] | int,
        *,
        dtype: Dtype | None = None,
        out_sharding=None,
        timestamps: bool = False,
    ) -> MixerState:
        """The decoding state before the first step, for inputs ``[*batch_shape, L, E]``.

        Args:
          batch_shape: the batch axes (an int for one).
          dtype: the oscillators' dtype; default float32 (float64 with float64 parameters),
            whatever the activations' dtype.
          timestamps: decode an irregularly sampled sequence: the state carries the last
            valid step's time, and every call then takes ``timestamps``.
          out_sharding: a ``PartitionSpec`` (under ``jax.set_mesh``) or ``NamedSharding`` of
            the batch axes; every leaf is created with it (a loop carry of one type).

        Returns:
          A :class:`~flax_linoss.mixers.state.MixerState` with ``[*batch_shape, 2, P]``
          oscillators.
        """
        base.check_decode_options(type(self).__name__, self.bidirectional)
        return state_lib.block_state(
            batch_shape,
            outer=self.block == base.OUTER,
            width=self.qkv_features,
            num_heads=self.num_heads,
            state_size=self.state_size,
            conv_width=self.conv_width,
            dtype=base.state_dtype(self.param_dtype) if dtype is None else dtype,
            timestamps=timestamps,
            out_sharding=out_sharding,
        )

    def _cached_state(self, where: str) -> MixerState:
        if self.state_z is None:
            raise ValueError(
                f"{where}: decoding cache not initialised; call `init_cache(input_shape)` "
                "(or nnx.view(model, decode=True, batch_size=...)) before decoding, or pass "
                "`state=mixer.init_state(batch_shape)`."
            )
        return MixerState.from_cache_variables(
            {
                n: getattr(self, n)[...]
                for n in state_lib.CACHE_NAMES.values()
                if getattr(self, n) is not None
            }
        )

    def init_cache(
        self, input_shape: tuple[int, ...], dtype: Dtype = jnp.float32, *, timestamps: bool = False
    ) -> None:
        """Creates a zero decoding state as ``nnx.Cache`` variables, for ``decode=True``
        calls on inputs of shape ``[batch..., length, E]`` (the Flax attention style; see
        :meth:`init_state` for the functional one).

        Only the batch shape matters (the state does not grow with the length); ``dtype``
        is accepted for compatibility: the state is kept in the recurrence dtype (float32,
        or float64 with float64 parameters). ``timestamps``: as in :meth:`init_state`.
        """
        del dtype
        if len(input_shape) < 2:
            raise ValueError(
                f"init_cache expects an input shape [batch..., length, features], got "
                f"{tuple(input_shape)}."
            )
        self._make_cache(tuple(input_shape[:-2]), timestamps)

    def _make_cache(self, batch: tuple[int, ...], timestamps: bool = False) -> None:
        state = self.init_state(batch, timestamps=timestamps)
        for name, value in state.cache_variables().items():
            setattr(self, name, nnx.Cache(value))

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


class SelectiveLinOSSMixer(LinOSSMixer):
    """:class:`LinOSSMixer` with ``selective=True`` by default: input-dependent step sizes
    (in the outer block, ``dt_t = dt * softplus(x_t W + b)`` per key dim of each head; see
    ``benchmarks/MIXERS.md`` for what it does better and worse than the default)."""

    def __init__(self, *args, selective: bool = True, **kwargs):
        super().__init__(*args, selective=selective, **kwargs)
