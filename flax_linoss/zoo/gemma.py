"""The Gemma attention protocol (flax's ``examples/gemma`` in nnx, Google DeepMind's ``gemma``
in linen) as a mixer adapter: ``adapter="gemma"``.

The protocol::

    attn = Attention(num_heads, num_kv_heads, features, head_dim, query_pre_attn_scalar,
                     attn_type, *, rngs, shd_config, dtype, weight_dtype, dropout_rate, ...)
    new_cache, out = attn(x, segment_pos, cache, attn_mask)     # x [B, L, features]
    cache = attn.init_cache(cache_size, batch_size, dtype)      # nnx: a method
    cache = Attention.init_cache(cache_size, num_heads, head_dim, batch_size, dtype)  # linen

What the mixer takes from it:

* widths: the outer block (the default) has ``num_kv_heads`` heads of ``head_dim`` key and
  value dims (a ``head_dim x head_dim`` memory of oscillators per key/value head: its state
  is the shape a key/value head fixes, which is all DeepMind gemma's class-method
  ``init_cache`` is told), so its inner width is ``num_kv_heads * head_dim``. The plain
  block (``options={"block": "plain"}``) has inner width ``num_heads * head_dim`` (what
  attention's query projection makes) and ``num_kv_heads * head_dim`` oscillators (as many
  numbers as one token's keys; ``options={"state_size": ...}`` overrides it). The
  projections have no biases, as Gemma's einsums.
* ``attn_mask [B, L, L']`` (no heads axis): padding and packing, as for any mixer; while
  decoding, ``L'`` is the cache size and step ``i`` is read at column ``end_index + i``.
* the cache: ``{"state": MixerState, "end_index": int32 [B]}`` whatever ``cache_size`` is
  (the O(1) state of a recurrence); its leaves keep their shapes, dtypes and shardings from
  step to step, so Gemma's sampler threads it through ``lax.while_loop`` unchanged. The
  state stays float32 whatever the cache ``dtype`` (bfloat16 activations included).
* ``ShardingConfig`` (nnx): the query kernel's spec (``q_weight_ndh``, or
  ``qkv_weight_cndh`` when every head has its own keys) shards the input projection
  ``[features, heads * head_dim]`` as ``(features' axis, heads' axis)``, ``o_weight_nhd``
  the output projection as ``(heads' axis, features' axis)``; the oscillator layer follows
  the heads' axis on its ``heads * head_dim`` side. Activations: the inner ones follow
  ``act_btnh`` (or ``act_sbtnh``), the output ``act_btd``; the state's batch axis follows
  ``act_btd``'s.
* dropout (nnx): ``dropout_rate`` drops the mixed sequence; like Gemma's modules the
  randomness comes from the call's ``rngs`` and ``model.eval()`` / ``nnx.view(...,
  deterministic=True)`` turns it off.

Ignored, because a causal recurrence has no use for them: ``segment_pos`` and the RoPE
settings (the recurrence knows the order of its inputs), ``query_pre_attn_scalar`` and
``attn_logits_soft_cap`` (there are no attention logits), ``attn_type`` and
``sliding_window_size`` (a recurrence has no window: it sees the whole past through its
state, fading at the oscillators' own time scales), ``use_qk_norm`` (no queries or keys) and
``sow_config`` (no attention weights to record).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_linoss.mixers import base
from flax_linoss.zoo.adapters import LinenAdapter, NnxAdapter

__all__ = ["GemmaLinen", "GemmaNnx"]

P = jax.sharding.PartitionSpec


def _spec(config, name: str) -> tuple | None:
    spec = getattr(config, name, None)
    return None if spec is None else tuple(spec)


def _heads_axis(spec: tuple, i: int):
    return spec[i] if spec[i] is not None else spec[i + 1]  # heads, else head_dim


def _shardings(config, shared_kv: bool) -> dict[str, Any]:
    """The mixer's kernel metadata and activation shardings from a Gemma ``ShardingConfig``
    (any object with its field names; ``None`` gives none)."""
    out: dict[str, Any] = {
        "kernel": {},
        "out_kernel": {},
        "inner": None,
        "out": None,
        "batch": None,
    }
    if config is None:
        return out
    qkv = _spec(config, "qkv_weight_cndh") if shared_kv else None
    q = _spec(config, "q_weight_ndh")
    if qkv is not None:  # [3, heads, features, head_dim]
        out["kernel"] = {"out_sharding": (qkv[2], _heads_axis(qkv, 1))}
    elif q is not None:  # [heads, features, head_dim]
        out["kernel"] = {"out_sharding": (q[1], q[0] if q[0] is not None else q[2])}
    o = _spec(config, "o_weight_nhd")  # [heads, head_dim, features]
    if o is not None:
        out["out_kernel"] = {"out_sharding": (_heads_axis(o, 0), o[2])}
    btnh, sbtnh = _spec(config, "act_btnh"), _spec(config, "act_sbtnh")
    if btnh is not None:
        out["inner"] = P(btnh[0], btnh[1], _heads_axis(btnh, 2))
    elif sbtnh is not None:
        out["inner"] = P(sbtnh[1], sbtnh[2], _heads_axis(sbtnh, 3))
    btd = _spec(config, "act_btd")
    if btd is not None:
        out["out"] = P(*btd)
        out["batch"] = P(btd[0])
    return out


def _widths(num_heads: int, num_kv_heads: int, head_dim: int, options) -> dict[str, int]:
    """The mixer's heads and widths for Gemma's attention sizes (see the module doc)."""
    if base.resolve_block(options.get("block"), options.get("bidirectional", False)) == base.OUTER:
        return dict(num_heads=num_kv_heads, qkv_features=num_kv_heads * head_dim)
    return dict(
        num_heads=num_heads,
        qkv_features=num_heads * head_dim,
        state_size=num_kv_heads * head_dim,
    )


def _decode(mix, x, cache, attn_mask, **kwargs):
    """One call with Gemma's cache: ``(new_cache, out)``."""
    if cache is None:
        return None, mix(x, mask=attn_mask, **kwargs)
    out, state = mix(
        x, mask=attn_mask, state=cache["state"], write_index=cache["end_index"], **kwargs
    )
    return {"state": state, "end_index": cache["end_index"] + x.shape[1]}, out


def _cache(state, batch_size: int, out_sharding) -> dict[str, Any]:
    end = jnp.zeros((batch_size,), jnp.int32, out_sharding=out_sharding)
    return {"state": state, "end_index": end}


class GemmaNnx(NnxAdapter):
    """flax ``examples/gemma``'s ``modules.Attention`` protocol (nnx); see the module doc."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        features: int,
        head_dim: int,
        query_pre_attn_scalar: float,
        attn_type: Any,
        *,
        rngs,
        rope_base_frequency: int | None = None,
        rope_scale_factor: float | None = None,
        attn_logits_soft_cap: float | None = None,
        sliding_window_size: int | None = None,
        use_qk_norm: bool = False,
        sow_config: Any = None,
        shd_config: Any = None,
        dtype=jnp.float32,
        weight_dtype=jnp.float32,
        dropout_rate: float = 0.0,
    ):
        del query_pre_attn_scalar, attn_type, rope_base_frequency, rope_scale_factor
        del attn_logits_soft_cap, sliding_window_size, use_qk_norm, sow_config
        shardings = _shardings(shd_config, num_heads == num_kv_heads)
        self.init_mixer(
            **_widths(num_heads, num_kv_heads, head_dim, self._mixer_options),
            in_features=features,
            out_features=features,
            dtype=dtype,
            param_dtype=weight_dtype,
            dropout_rate=dropout_rate,
            deterministic=False,
            use_bias=False,
            kernel_metadata=shardings["kernel"],
            out_kernel_metadata=shardings["out_kernel"],
            keep_rngs=False,
            rngs=rngs,
        )
        self.inner_sharding = shardings["inner"]
        self.out_sharding = shardings["out"]
        self.batch_sharding = shardings["batch"]

    def __call__(self, x, segment_pos, cache, attn_mask, rngs=None):
        """``(new_cache, out [B, L, features])``; ``segment_pos`` is not needed."""
        del segment_pos
        return _decode(
            self.mix,
            x,
            cache,
            attn_mask,
            rngs=rngs,
            qkv_sharding=self.inner_sharding,
            out_sharding=self.out_sharding,
        )

    def init_cache(self, cache_size: int, batch_size: int, dtype=jnp.float32) -> dict[str, Any]:
        """The O(1) decoding state (``cache_size`` and ``dtype`` do not change it)."""
        del cache_size, dtype
        state = self.init_state((batch_size,), out_sharding=self.batch_sharding)
        return _cache(state, batch_size, self.batch_sharding)


class _ClassOrInstance:
    """A method that is a class method when looked up on the class and an instance method
    when looked up on an instance (each delegating to a named method)."""

    def __init__(self, on_class: str, on_instance: str):
        self.on_class, self.on_instance = on_class, on_instance

    def __get__(self, obj, objtype=None):
        if obj is None:
            return getattr(objtype, self.on_class)
        return getattr(obj, self.on_instance)


class GemmaLinen(LinenAdapter):
    """Google DeepMind ``gemma``'s linen ``Attention`` protocol; its fields are copied from
    the attention class it replaces (``num_heads``, ``num_kv_heads``, ``features``,
    ``head_dim``, ...); see the module doc."""

    def mixer_kwargs(self) -> dict[str, Any]:
        return dict(
            **_widths(self.num_heads, self.num_kv_heads, self.head_dim, self._mixer_options),
            out_features=self.features,
            use_bias=False,
        )

    @nn.compact
    def __call__(self, x, segment_pos, cache, attn_mask):
        """``(new_cache, out [B, L, features])``; ``segment_pos`` is not needed."""
        del segment_pos
        return _decode(self.mixer(), x, cache, attn_mask)

    def _init_cache_of_layer(self, cache_size: int, batch_size: int, dtype=jnp.float32):
        """``layer.init_cache(cache_size, batch_size, dtype)`` (flax's example's form)."""
        del cache_size, dtype
        mixer = self.mixer_from(**self.mixer_kwargs())
        return _cache(mixer.init_state((batch_size,)), batch_size, None)

    @classmethod
    def _init_cache_of_class(
        cls, cache_size: int, num_heads: int, head_dim: int, batch_size: int, dtype=jnp.bfloat16
    ):
        """``Attention.init_cache(cache_size, num_heads, head_dim, batch_size, dtype)``
        (DeepMind gemma's class method); Gemma passes the key/value heads as
        ``num_heads``, which fixes the state of the layers this adapter builds (the outer
        block's ``num_kv_heads`` heads of ``head_dim x head_dim``, or the plain block's
        ``num_kv_heads * head_dim`` oscillators)."""
        del cache_size, dtype
        size = num_heads * head_dim
        kw = dict(num_heads=num_heads, qkv_features=size)
        if base.resolve_block(cls._mixer_options.get("block"), False) != base.OUTER:
            kw["state_size"] = size
        mixer = cls.mixer_from(**kw)
        return _cache(mixer.init_state((batch_size,)), batch_size, None)

    #: The O(1) decoding state (``cache_size`` and ``dtype`` do not change it), called on a
    #: layer ``(cache_size, batch_size, dtype)`` or on the class ``(cache_size, num_heads,
    #: head_dim, batch_size, dtype)``, as the two Gemma codebases do.
    init_cache = _ClassOrInstance("_init_cache_of_class", "_init_cache_of_layer")
