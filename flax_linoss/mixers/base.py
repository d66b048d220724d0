"""Pieces shared by the linen and nnx mixers: checks, logical axis names, dropout.

No Flax modules here. Legend: ``E`` model width (input features), ``H`` the mixer's inner
width (``qkv_features``), ``O`` output width (``out_features``), ``P`` oscillators.
"""

from __future__ import annotations

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
    "out_proj/kernel": (KV, EMBED),
    "out_proj/bias": (EMBED,),
}


def linoss_param_axes(name: str) -> tuple[str | None, ...]:
    """Logical axes of a LinOSS layer parameter (``a_raw``, ``b``, ...)."""
    return PARAM_AXES[name]


def check_options(where: str, discretization: str, scan: str, state_size) -> None:
    """Validates the LinOSS-specific options once, at the edge."""
    ops.schemes.check_discretization(discretization)
    ops.table.check_scan(scan)
    if state_size is not None and (not isinstance(state_size, int | np.integer) or state_size < 1):
        raise ValueError(f"{where}: state_size must be a positive int or None, got {state_size!r}.")


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
