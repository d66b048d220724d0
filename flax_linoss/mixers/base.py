"""Pieces shared by the linen and nnx mixers: checks, logical axis names, dropout.

No Flax modules here. Legend: ``E`` model width (input features), ``H`` the mixer's inner
width (``qkv_features``), ``O`` output width (``out_features``), ``P`` oscillators.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_linoss import ops
from flax_linoss.common import check_dtypes, check_rate, check_size

#: Logical axis names of the mixer's parameters (linen ``nn.LogicallyPartitioned`` boxes,
#: nnx ``out_sharding`` metadata). ``embed`` and ``kv`` are the names the lm1b / wmt
#: examples use for attention (model width and the attention's inner width), so their
#: rules apply unchanged; ``oscillator`` is new: map it to a model-parallel mesh axis to
#: shard the (independent) oscillators, or to ``None`` to replicate them.
EMBED = "embed"
KV = "kv"
OSCILLATOR = "oscillator"

#: Parameter name -> logical axes, for every parameter a mixer can have.
PARAM_AXES: dict[str, tuple[str | None, ...]] = {
    "in_proj/kernel": (EMBED, KV),
    "in_proj/bias": (KV,),
    "a_raw": (OSCILLATOR,),
    "dt_raw": (OSCILLATOR,),
    "g_raw": (OSCILLATOR,),
    "b": (OSCILLATOR, KV, None),
    "c": (KV, OSCILLATOR, None),
    "d": (KV,),
    # The plain block's selective step sizes (selective=True): full or low rank.
    "dt_kernel": (KV, OSCILLATOR),
    "dt_down": (KV, None),
    "dt_up": (None, OSCILLATOR),
    "dt_bias": (OSCILLATOR,),
    "out_proj/kernel": (KV, EMBED),
    "out_proj/bias": (EMBED,),
    # The outer-product block (block="outer"): the value projection is in_proj; queries,
    # keys and the gate are projected like it; the short convolution's taps over the three
    # streams [W, 3, H]; per head, oscillators [heads, K] and the output norm's scale.
    "query/kernel": (EMBED, KV),
    "query/bias": (KV,),
    "key/kernel": (EMBED, KV),
    "key/bias": (KV,),
    "gate/kernel": (EMBED, KV),
    "gate/bias": (KV,),
    "conv_kernel": (None, None, KV),
    "conv_bias": (None, KV),
    "heads/a_raw": (None, None),
    "heads/dt_raw": (None, None),
    "heads/g_raw": (None, None),
    "heads/scale": (None, None),
    # The outer block's selective step sizes (selective=True): a gate per key dim, from x.
    "dt_proj/kernel": (EMBED, KV),
    "dt_proj/bias": (KV,),
}

#: The mixer's blocks: ``"outer"`` (the default: projections to queries, keys, values and
#: a gate, a short causal convolution, a multi-head outer-product oscillator memory read by
#: the queries, a per-head norm, the gate, the output projection) and ``"plain"`` (the
#: papers' ``in_proj -> LinOSS -> out_proj``). See ``benchmarks/MIXERS.md`` for the choice.
OUTER = "outer"
PLAIN = "plain"
BLOCKS = (OUTER, PLAIN)
#: The trainer's ``model.mixer_block`` names -> the mixer's ``block`` and ``selective``
#: options ("selective": input-dependent step sizes; otherwise the mixer class's default).
BLOCK_CHOICES: dict[str, dict[str, Any]] = {
    "outer": {"block": OUTER},
    "plain": {"block": PLAIN},
    "selective": {"block": PLAIN, "selective": True},
    "outer_selective": {"block": OUTER, "selective": True},
}
#: Activations of the outer block's gate (``None``: no gate).
GATE_ACTIVATIONS = {"silu": jax.nn.silu, "gelu": jax.nn.gelu, "sigmoid": jax.nn.sigmoid}


def resolve_block(block: str | None, bidirectional: bool) -> str:
    """``block``, or its default: ``"outer"``, ``"plain"`` for a bidirectional mixer (the
    outer block is causal)."""
    if block is None:
        return PLAIN if bidirectional else OUTER
    return block


def check_block(where: str, block: str, num_heads, qkv_features: int, conv_width, gate, options):
    """Validates the block options once, at construction."""
    if block not in BLOCKS:
        raise ValueError(f"{where}: block must be one of {BLOCKS}, got {block!r}.")
    if not isinstance(conv_width, int | np.integer) or conv_width < 0:
        raise ValueError(f"{where}: conv_width must be an int >= 0 (0: none), got {conv_width!r}.")
    if gate is not None and gate not in GATE_ACTIVATIONS:
        raise ValueError(
            f"{where}: gate_activation must be None or one of {sorted(GATE_ACTIVATIONS)}, got "
            f"{gate!r}."
        )
    if block == OUTER:
        check_size(where, "num_heads", num_heads)
        if qkv_features % num_heads:
            raise ValueError(
                f"{where}(block='outer'): qkv_features={qkv_features} must be a multiple of "
                f"num_heads={num_heads} (each head holds qkv_features / num_heads key and "
                "value dims)."
            )
        given = [name for name, value in options.items() if value]
        if given:
            raise ValueError(
                f"{where}(block='outer') does not take {', '.join(given)}: they are options "
                "of block='plain'."
            )


def slow_oscillators(key, shape, discretization: str, dtype=jnp.float32):
    """Raw ``(a, dt, g)`` of the outer block's oscillators (``[heads, K]``): ``dt`` in
    ``(0.5, 0.73)`` and ``a dt^2`` log-uniform in ``[1e-4, 1]``, so the oscillators' periods
    (and, damped, their memories) spread from a few steps to about 600; ``g`` starts at 0."""
    ka, kd = jax.random.split(key)
    dt_raw = jax.random.uniform(kd, shape, dtype)
    dt = jax.nn.sigmoid(dt_raw)
    x = jnp.exp(jax.random.uniform(ka, shape, dtype, minval=np.log(1e-4), maxval=0.0))
    g_raw = jnp.zeros(shape, dtype) if discretization == ops.DAMPED else None
    return x / dt**2, dt_raw, g_raw


def conv_taps(key, width: int, features: int, dtype=jnp.float32):
    """The outer block's convolution taps ``[W, 3, H]`` over (queries, keys, values): the
    queries and values start passing the current step, the keys the previous one (so a
    query meets the key of the token before a match: the induction pattern), plus noise."""
    w = jnp.zeros((width, 3, features), dtype)
    w = w.at[-1, 0].set(1.0).at[-1, 2].set(1.0)
    w = w.at[-2 if width > 1 else -1, 1].set(1.0)
    return w + 0.1 * jax.random.normal(key, w.shape, dtype) / np.sqrt(width)


def linoss_param_axes(name: str) -> tuple[str | None, ...]:
    """Logical axes of a LinOSS layer parameter (``a_raw``, ``b``, ...)."""
    return PARAM_AXES[name]


def check_options(where: str, discretization: str, scan: str, state_size) -> None:
    """Validates the LinOSS-specific options once, at the edge."""
    ops.schemes.check_discretization(discretization)
    ops.table.check_scan(scan)
    if state_size is not None and (not isinstance(state_size, int | np.integer) or state_size < 1):
        raise ValueError(f"{where}: state_size must be a positive int or None, got {state_size!r}.")


def outer_paths(scan: str) -> tuple[str, str]:
    """The outer block's paths ``(ops.outer_apply scan, ops.causal_conv scan)`` for a
    mixer's ``scan``: ``"auto"`` (the fused CPU kernels per device), ``"native"`` (the
    kernels), any pure-JAX path of ``linoss_apply`` (``"sequential"``, ``"associative"``,
    ``"adjoint"``, ``"chunked"``: for forward-mode differentiation, say) the pure-JAX forms,
    and ``"pallas"`` (an accelerator's kernels, which the outer block has not) ``"auto"``."""
    if scan == ops.NATIVE:
        return "native", "native"
    if scan in (ops.AUTO, ops.PALLAS):
        return "auto", "auto"
    return "chunked", "jax"


def check_mixer_arguments(
    where: str, in_features, qkv_features, out_features, dropout_rate, dtype, param_dtype
) -> None:
    """Validates the attention-style arguments once, at construction: positive widths
    (``None`` = the default width, never ``0``), a dropout rate in ``[0, 1)`` and real
    floating dtypes."""
    check_size(where, "in_features", in_features)
    for name, value in (("qkv_features", qkv_features), ("out_features", out_features)):
        if value is not None:
            check_size(where, name, value)
    check_rate(where, "dropout_rate", dropout_rate)
    check_dtypes(where, dtype, param_dtype)


def check_self_mixing(where: str, inputs_q, inputs_k=None, inputs_v=None, inputs_kv=None):
    """Raises unless keys/values are absent or are ``inputs_q`` itself (self-mixing)."""
    for name, x in (("inputs_k", inputs_k), ("inputs_v", inputs_v), ("inputs_kv", inputs_kv)):
        if x is not None and x is not inputs_q:
            raise ValueError(
                f"{where} is a sequence mixer and cannot do cross-attention: got a separate "
                f"`{name}`. A mixer only mixes `inputs_q` along its own length axis; pass "
                "`inputs_k`, `inputs_v` and `inputs_kv` as None (or as `inputs_q` itself), "
                "and keep flax attention for cross-attention layers."
            )


def check_input(where: str, x) -> None:
    if np.ndim(x) < 2:
        raise ValueError(f"{where} expects [batch..., length, features], got shape {np.shape(x)}.")
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"{where} expects a floating input, got dtype {jnp.result_type(x)}.")


def state_dtype(param_dtype) -> jnp.dtype:
    """The dtype of the decoding state: the recurrence's (float32, or float64)."""
    return jnp.promote_types(jnp.float32, param_dtype)


def dropout(x: jax.Array, rate: float, key: jax.Array, broadcast: bool) -> jax.Array:
    """Inverted dropout of ``x [batch..., L, H]``; one mask for all batch entries if
    ``broadcast`` (the attention's ``broadcast_dropout``)."""
    keep = 1.0 - rate
    shape = (*([1] * (x.ndim - 2)), *x.shape[-2:]) if broadcast else x.shape
    keep_mask = jax.random.bernoulli(key, keep, shape)
    return jnp.where(keep_mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


def broadcast_dims(ndim: int, broadcast: bool) -> tuple[int, ...]:
    """Batch axes of a ``[batch..., L, H]`` array, for ``nn.Dropout(broadcast_dims=...)``."""
    return tuple(range(ndim - 2)) if broadcast else ()


def check_cache_batch(where: str, cache_batch, batch) -> None:
    if tuple(cache_batch) != tuple(batch):
        raise ValueError(
            f"{where}: the decoding cache was made for batch shape {list(cache_batch)} but the "
            f"input has batch shape {list(batch)}; re-create the cache for this batch."
        )


def check_decode_options(where: str, bidirectional: bool) -> None:
    if bidirectional:
        raise ValueError(
            f"{where}(bidirectional=True) cannot decode: its reverse scan reads the future. "
            "Use a causal mixer (bidirectional=False) for autoregressive decoding."
        )
