"""The functional decoding state of a mixer: a small pytree a decoding loop carries.

Pure JAX (no Flax). A recurrent mixer's whole memory of the past is a fixed-size state, so a
decoding loop (``lax.scan``, ``lax.while_loop``, a sampler's carry) threads it like an
attention KV cache, except that its size does not grow with the length::

    state = mixer.init_state((batch,))               # before the loop
    y, state = mixer(x_new, state=state)             # any number of new steps per call

Every call returns a state of exactly the same shapes, dtypes and (under an explicit mesh)
shardings as the one it was given, so it is a valid loop carry from the first step on.

Legend: ``P`` oscillators, ``H`` the mixer's inner width, ``W`` a convolution's width.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from flax_linoss.ops import LinOSSState

__all__ = ["MixerState", "like", "zero_state"]

#: Names under which :class:`MixerState` fields live as ``nnx.Cache`` variables (the linen
#: ``"cache"`` collection), for the Flax-attention style of decoding (``decode=True``).
CACHE_NAMES = {
    "z": "state_z",
    "y": "state_y",
    "index": "cache_index",
    "last": "last_index",
    "segment": "segment_id",
    "conv": "conv_buffer",
    "time": "last_time",
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MixerState:
    """A mixer's decoding state (a pytree; every leaf has the batch axes in front).

    Attributes:
      z, y: the oscillators' velocity and position, float32 (float64 with float64
        parameters) whatever the activations' dtype: ``[batch..., 2, P]`` (re, im) pairs
        for the plain block (a :class:`flax_linoss.ops.LinOSSState`'s leaves),
        ``[batch..., heads, K, V]`` for the outer block (an :class:`~flax_linoss.ops.OuterState`'s).
      index: ``[batch...]`` int32, the steps consumed so far: the next step's position (its
        cache slot, modulo the cache size, when masks are cache-sized).
      last: ``[batch...]`` int32, the absolute index of the last valid step (``-1``: none);
        an attention-style mask says through it whether a new step continues that one's
        sequence (packing).
      segment: ``[batch...]`` int32, the ``segment_ids`` entry of the last valid step.
      conv: ``[batch..., W - 1, 3, H]`` the last valid inputs of the outer block's short
        causal convolution (queries, keys, values), or ``None`` for a block without one.
      time: ``[batch...]`` the timestamp of the last valid step (``NaN``: none since the
        sequence began), for decoding an irregularly sampled sequence (a state made with
        ``timestamps=True``); ``None`` for regularly sampled decoding.
    """

    z: jax.Array
    y: jax.Array
    index: jax.Array
    last: jax.Array
    segment: jax.Array
    conv: jax.Array | None = None
    time: jax.Array | None = None

    @property
    def oscillators(self) -> LinOSSState:
        """The recurrence's part, as :func:`flax_linoss.ops.linoss_apply` takes it."""
        return LinOSSState(self.z, self.y)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.index.shape)

    def replace(self, **changes: Any) -> MixerState:
        return dataclasses.replace(self, **changes)

    def cache_variables(self) -> dict[str, jax.Array]:
        """``{cache name: leaf}`` of the fields that are set (see :data:`CACHE_NAMES`).

        ``cache_index`` is a scalar, as Flax attention's (every row of a cache-style state
        advances together)."""
        out = {
            CACHE_NAMES[f.name]: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }
        out[CACHE_NAMES["index"]] = jnp.max(self.index)
        return out

    @classmethod
    def from_cache_variables(cls, values: dict[str, jax.Array]) -> MixerState:
        fields = {f: values[name] for f, name in CACHE_NAMES.items() if name in values}
        fields["index"] = jnp.broadcast_to(fields["index"], fields["last"].shape)
        return cls(**fields)


def _sharding_for(out_sharding, batch_ndim: int, ndim: int):
    """``out_sharding`` (a spec or ``NamedSharding`` for the batch axes, or for all axes)
    extended to an array of ``ndim`` axes whose first ``batch_ndim`` are the batch axes."""
    if out_sharding is None:
        return None
    named = isinstance(out_sharding, jax.sharding.NamedSharding)
    spec = tuple(out_sharding.spec if named else out_sharding)[:batch_ndim]
    spec = jax.sharding.PartitionSpec(*spec, *([None] * (ndim - len(spec))))
    if named:
        return jax.sharding.NamedSharding(out_sharding.mesh, spec)
    return spec


def zero_state(
    batch_shape: tuple[int, ...] | int,
    num_oscillators: int,
    *,
    dtype=jnp.float32,
    oscillator_shape: tuple[int, ...] | None = None,
    conv_shape: tuple[int, ...] | None = None,
    conv_dtype=None,
    timestamps: bool = False,
    out_sharding=None,
) -> MixerState:
    """The state before the first step: zero oscillators, no step seen.

    Args:
      batch_shape: the batch axes (an int for one).
      num_oscillators: ``P``.
      dtype: the oscillators' dtype (float32, or float64).
      oscillator_shape: the shape of ``z`` and ``y`` after the batch axes; default ``(2,
        P)`` (the plain block's (re, im) pairs); the outer block's ``(heads, K, V)``.
      conv_shape: ``(W - 1, ...)`` for a block with a short convolution (the outer block's
        ``(W - 1, 3, H)``: queries, keys, values), else ``None``.
      conv_dtype: the convolution buffer's dtype (the activations'; default ``dtype``).
      timestamps: carry the last valid step's timestamp (``time``, ``NaN`` at first) in
        ``dtype``, for decoding with ``timestamps``.
      out_sharding: a ``PartitionSpec`` (under ``jax.set_mesh``) or ``NamedSharding`` of
        the batch axes (e.g. ``P("fsdp")``); every leaf gets it on its batch axes.
    """
    batch = (batch_shape,) if isinstance(batch_shape, int) else tuple(batch_shape)
    nb = len(batch)

    def zeros(shape, dt, fill=0):
        sharding = _sharding_for(out_sharding, nb, nb + len(shape))
        return jnp.full((*batch, *shape), fill, dt, out_sharding=sharding)

    conv = None
    if conv_shape is not None and conv_shape[0] > 0:
        conv = zeros(tuple(conv_shape), conv_dtype or dtype)
    osc = (2, num_oscillators) if oscillator_shape is None else tuple(oscillator_shape)
    return MixerState(
        z=zeros(osc, dtype),
        y=zeros(osc, dtype),
        index=zeros((), jnp.int32),
        last=zeros((), jnp.int32, -1),
        segment=zeros((), jnp.int32),
        conv=conv,
        time=zeros((), dtype, jnp.nan) if timestamps else None,
    )


def block_state(
    batch_shape: tuple[int, ...] | int,
    *,
    outer: bool,
    width: int,
    num_heads: int,
    state_size: int | None,
    conv_width: int,
    dtype=jnp.float32,
    timestamps: bool = False,
    out_sharding=None,
) -> MixerState:
    """A mixer's zero state: the plain block's ``[batch..., 2, P]`` oscillators (``P`` =
    ``state_size or width``), or the outer block's ``[batch..., heads, K, K]`` (``K = width
    / heads``) with its convolution buffer ``[batch..., W - 1, 3, width]``; with
    ``timestamps``, the last step's time too."""
    if not outer:
        return zero_state(
            batch_shape,
            state_size or width,
            dtype=dtype,
            timestamps=timestamps,
            out_sharding=out_sharding,
        )
    dim = width // num_heads
    return zero_state(
        batch_shape,
        width,
        dtype=dtype,
        oscillator_shape=(num_heads, dim, dim),
        conv_shape=(conv_width - 1, 3, width) if conv_width else None,
        timestamps=timestamps,
        out_sharding=out_sharding,
    )


def _explicit_mesh() -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and jax.sharding.AxisType.Explicit in tuple(mesh.axis_types)


def like(new: MixerState, old: MixerState) -> MixerState:
    """``new`` with ``old``'s dtypes and, under an explicit mesh, shardings, leaf by leaf:
    a loop carry keeps one type."""
    explicit = _explicit_mesh()

    def match(n, o):
        n = n.astype(o.dtype)
        if explicit:
            n = jax.sharding.reshard(n, jax.typeof(o).sharding.spec)
        return n

    return jax.tree.map(match, new, old)
