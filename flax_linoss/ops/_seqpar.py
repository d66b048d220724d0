"""Sequence parallelism: one sequence split over a ``shard_map`` mesh axis.

With a fixed ``dt`` the system is time-invariant, so by linearity a shard's true states are
its states from a zero start plus the free response of the state it receives. Each shard
therefore scans its part from zero with any path of the scan table (the fused kernels
included), the shards' end states ``e_k`` are shared (``[K, N, 2, Q]``, small), the incoming
states follow by a prefix over the shards ``h_{k+1} = M^(L_shard) h_k + e_k`` (``h_0`` the
initial state), and each shard adds the free response of ``h_k`` in closed form
(:func:`~flax_linoss.ops._scans.chunked.free_response`). Gradients are autodiff of this
combination through each path's own backward.

With per-step coefficients (a time-varying ``dt``) there is no power or closed form: each
shard reduces its steps to their affine map ``x_end = T_k x_start + e_k`` (``T_k`` the
product of the shard's transitions, by a tree of pairwise products), the maps are shared
and chained over the shards, ``h_{k+1} = T_k h_k + e_k``, and each shard runs its scan
path once, from its incoming state ``h_k``. A padding ``mask`` (held steps) is a per-step
transition too (the identity, with no forcing), handled the same way, and so are packed
sequences (``segment_ids``): a segment start is a step whose transition is zero (the state
before it dropped), found at a shard's first step by comparing with the previous shard's
last id (:func:`boundary_resets`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flax_linoss.ops import schemes
from flax_linoss.ops._project import LNQ
from flax_linoss.ops._scans import chunked
from flax_linoss.ops._scans._common import (
    affine_reduce,
    fold_flags,
    is_time_varying,
    power,
    prefix_scan,
    vary,
    varying_axes,
)


def axis_size(axis) -> int:
    try:
        return jax.lax.axis_size(axis)
    except NameError as e:
        raise ValueError(
            f"sequence_axis={axis!r} is not a mesh axis here: call linoss_apply inside "
            "jax.shard_map over a mesh with that axis (the sequence sharded over it)."
        ) from e


def run(entry, tr, v, z0, y0, axis, reverse: bool, flags=None):
    """``(ys, z_L, y_L)`` for this shard's ``v`` (in ``entry.layout``) of a sharded sequence.

    Args:
      entry: the scan table's row for the local scan.
      tr: the transition, each field ``[Q]``.
      v: this shard's forcing, ``[N, L_shard, Q]`` or ``[L_shard, N, Q]``.
      z0, y0: ``[N, Q]``, the state before the whole sequence.
      axis: the mesh axis the sequence is split over.
      reverse: the sequence runs from the last shard to the first.
      flags: optional :class:`~flax_linoss.ops._scans._common.Flags` (masked steps,
        segment starts, a shard's first step included: :func:`boundary_resets`): each
        shard's map then has per-step transitions (a held step's is the identity with no
        forcing, a segment start's transition zero), as for a time-varying ``dt``.

    Returns:
      This shard's positions (``v``'s layout) and the whole sequence's final state.
    """
    shards, position = _place(axis, reverse)
    time_major = entry.layout == LNQ
    if is_time_varying(tr) or flags is not None:
        return _run_varying(entry, tr, v, z0, y0, axis, reverse, time_major, flags)
    length = v.shape[0 if time_major else 1]
    # The local scan starts from zero typed like this shard's input (varying over the axis):
    # the loop paths' carries must keep one type.
    zero = vary(jnp.zeros_like(z0), varying_axes(v))
    ys, z_end, y_end = entry.run(tr, v, zero, zero, None)
    ends = share(jnp.stack([z_end, y_end], axis=1), axis, shards, reverse)  # [K, N, 2, Q]
    m = power(tuple(tr)[:4], length)
    b_z = jnp.moveaxis(ends[:, :, 0], 0, 1).at[:, 0].add(m[0] * z0 + m[1] * y0)  # [N, K, Q]
    b_y = jnp.moveaxis(ends[:, :, 1], 0, 1).at[:, 0].add(m[2] * z0 + m[3] * y0)
    after_z, after_y = prefix_scan(m, b_z, b_y)  # the state after shard k
    h_z = jnp.concatenate([z0[:, None], after_z[:, :-1]], axis=1)
    h_y = jnp.concatenate([y0[:, None], after_y[:, :-1]], axis=1)
    h_z = jax.lax.dynamic_index_in_dim(h_z, position, 1, keepdims=False)
    h_y = jax.lax.dynamic_index_in_dim(h_y, position, 1, keepdims=False)
    ys = ys + chunked.free_response(tr, h_z, h_y, length, time_major=time_major)
    return ys, after_z[:, -1], after_y[:, -1]


def _place(axis, reverse: bool):
    """``(the number of shards, this shard's place in processing order)``."""
    shards = axis_size(axis)
    position = jax.lax.axis_index(axis)
    return shards, (shards - 1 - position if reverse else position)


def share(mine, axis, shards: int, reverse: bool):
    """Every shard's ``mine`` on every shard, ``[K, ...]`` in processing order: a psum of
    one-hot slots (not all_gather), so that what follows is replicated over the axis (the
    final state can leave shard_map with out_specs P() under check_vma)."""
    flag = mine.dtype == jnp.bool_
    mine = mine.astype(jnp.int32) if flag else mine
    slots = jnp.zeros((shards, *mine.shape), mine.dtype)
    every = jax.lax.psum(slots.at[jax.lax.axis_index(axis)].set(mine), axis)
    every = every > 0 if flag else every
    return every[::-1] if reverse else every


def fold_shards(combine, init, mine, axis, reverse: bool = False):
    """Every shard's summary ``mine`` (arrays) shared over ``axis`` and folded in
    processing order after ``init`` by ``combine(acc, summary) -> acc``.

    Returns ``(the fold of the shards processed before this one, the fold of all of
    them)``; the second is the same on every shard (replicated over ``axis``).
    """
    shards, position = _place(axis, reverse)
    every = jax.tree.map(lambda x: share(x, axis, shards, reverse), mine)
    # The carry varies over the mesh axes the summaries do (the batch's, the oscillators').
    init = jax.tree.map(lambda x: vary(x, varying_axes(every)), init)

    def step(acc, summary):
        return combine(acc, summary), acc

    final, before = jax.lax.scan(step, init, every)
    pick = lambda x: jax.lax.dynamic_index_in_dim(x, position, 0, keepdims=False)
    return jax.tree.map(pick, before), final


def affine_chain(state, shard_map):
    """``combine`` of :func:`fold_shards` for linear recurrences: the state ``(z, y)`` after
    a shard whose map is ``((T11, T12, T21, T22), (e_z, e_y))``, ``x_out = T x_in + e``
    (``T`` broadcast over the state's trailing axes)."""
    (t11, t12, t21, t22), (e_z, e_y) = shard_map
    h_z, h_y = state
    fit = lambda t: t.reshape(t.shape + (1,) * (h_z.ndim - t.ndim))
    return (
        fit(t11) * h_z + fit(t12) * h_y + e_z,
        fit(t21) * h_z + fit(t22) * h_y + e_y,
    )


def boundary_resets(seg, resets, axis, reverse: bool):
    """``resets [N, L_shard]`` (segment starts inside this shard, in processing order) with
    this shard's first step also a start where its id differs from the last id of the shard
    processed before it. ``seg [N, L_shard]`` in processing order."""
    shards, position = _place(axis, reverse)
    last = share(seg[:, -1], axis, shards, reverse)  # [K, N], processing order
    before = jax.lax.dynamic_index_in_dim(last, jnp.maximum(position - 1, 0), 0, False)
    first = (position > 0) & (seg[:, 0] != before)
    return resets.at[:, 0].set(resets[:, 0] | first)


def _per_step_flags(tr, v, flags, time_major: bool) -> schemes.Transition:
    """Per-step coefficients shaped like ``v`` with ``flags`` folded in (see
    :func:`~flax_linoss.ops._scans._common.fold_flags`)."""
    layout = lambda f: None if f is None else (f.T if time_major else f)[..., None]
    fields = [jnp.broadcast_to(x, v.shape) for x in tr]
    return fold_flags(fields, layout(flags.hold), layout(flags.reset))


def _run_varying(entry, tr, v, z0, y0, axis, reverse, time_major, flags=None):
    """:func:`run` for per-step coefficients or held steps (see the module docstring)."""
    steps = tr if flags is None else _per_step_flags(tr, v, flags, time_major)
    transfer, end = affine_reduce(steps, v, 0 if time_major else 1)
    (h_z, h_y), (z_l, y_l) = fold_shards(affine_chain, (z0, y0), (transfer, end), axis, reverse)
    ys, _, _ = entry.run(tr, v, h_z, h_y, flags)
    return ys, z_l, y_l
