"""The TPU (Mosaic) kernels of ``scan="pallas"``.

Layout: time-major ``[L, R, 128]`` with ``R * 128 = N * Q'`` (every real channel of every
sequence side by side), so one time step of ``8 x 128`` channels is one full register tile;
with ``[N, L, Q]`` blocks a step would be one sublane (8x fewer useful lanes per issue).

Forward: grid (channel blocks: parallel) x (time blocks of ``block`` steps: sequential).
The state is carried across time blocks in VMEM scratch; each grid step streams its
``[block, rb, 128]`` forcing tile once, writes the positions and one checkpoint (the state
before the block), and the final velocity at the end.

Backward: the same grid with the time blocks walked in reverse. A block's states are
recomputed from its checkpoint into VMEM scratch, then the adjoint recurrence (see
:mod:`._common`) runs down through the block, writing the input gradient over the output
cotangent (aliased buffers) and accumulating the six per-channel parameter gradients in a
resident output block. Per-step flags arrive as an int32 tile stream like the forcing.

Per-step coefficients (a time-varying ``dt``) arrive as a ``[6, block, rb, 128]`` tile
stream beside the forcing (instead of a resident ``[6, rb, 128]`` block), and the backward
pass writes each step's six coefficient gradients as a stream of the same shape (instead of
accumulating them). Their channel blocks are 8 rows (not 16), so the 6 + 6 extra streams
stay within the VMEM budget.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from flax_linoss.ops._scans._common import (
    HOLD,
    RESET,
    coded_step,
    named_kernel,
    out_struct,
    varying_axes,
)

LANES = 128
# Two double-buffered [block, rb, 128] streams in and one out, plus two [block, rb, 128]
# scratch buffers in the backward: about 10 MiB at block 128, rb 16; per-step coefficients
# add 6 streams each way (at rb 8: about 17 MiB). Leave headroom.
_VMEM_LIMIT = 48 * 2**20
# Unrolled time loops let Mosaic interleave steps; the interpreter gains nothing from it and
# compiles far longer, so it runs them rolled.
_UNROLL = 8


def _unroll(n: int, interpret: bool) -> int:
    return 1 if interpret else min(n, _UNROLL)


class _Grid(NamedTuple):
    """The sizes both passes share, computed once per call by :func:`_grid`.

    Attributes:
      length: ``L``.
      rows: ``R`` rows of 128 lanes.
      rb: rows per channel block.
      blocks: time blocks, ``ceil(L / block)``.
      block: steps per time block.
      last: steps in the last time block.
      varying: per-step coefficients.
    """

    length: int
    rows: int
    rb: int
    blocks: int
    block: int
    last: int
    varying: bool

    @property
    def grid(self) -> tuple[int, int]:
        return (self.rows // self.rb, self.blocks)


def _grid(v, coeffs, block: int) -> _Grid:
    length, channels = v.shape
    rows = channels // LANES
    varying = coeffs.ndim == 3
    rb = rows  # a full dimension is always a legal block (pallas.channels keeps it <= 8)
    for size in (8,) if varying else (16, 8):
        if rows % size == 0:
            rb = size
            break
    blocks = pl.cdiv(length, block)
    return _Grid(length, rows, rb, blocks, block, length - (blocks - 1) * block, varying)


def _flag_tiles(code, rows: int):
    """``[L, N]`` int32 codes -> ``[L, R, 128]``, one per channel (the tile layout)."""
    length, n = code.shape
    q = rows * LANES // n
    return jnp.broadcast_to(code[:, :, None], (length, n, q)).reshape(length, rows, LANES)


def _params():
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "arbitrary"), vmem_limit_bytes=_VMEM_LIMIT
    )


def _for_block_lengths(is_last, block: int, last: int, fn) -> None:
    """Calls ``fn(n)`` with the block's static step count: ``last`` in the final block."""
    if last == block:
        fn(block)
        return
    pl.when(jnp.logical_not(is_last))(lambda: fn(block))
    pl.when(is_last)(lambda: fn(last))


def _coefficient_spec(g: _Grid, time_block):
    """The coefficients' block: resident ``[6, rb, 128]``, or a ``[6, block, rb, 128]`` tile
    stream (``time_block(t)`` the block of grid step ``t``) when they vary per step."""
    if g.varying:
        return pl.BlockSpec((6, g.block, g.rb, LANES), lambda c, t: (0, time_block(t), c, 0))
    return pl.BlockSpec((6, g.rb, LANES), lambda c, t: (0, c, 0))


def _coefficients(c_ref, varying: bool):
    """``s -> (m11, m12, m21, m22, f1, f2)`` of step ``s`` of the block (loaded once when
    time-invariant)."""
    if varying:
        return lambda s: tuple(c_ref[i, s] for i in range(6))
    fixed = tuple(c_ref[i] for i in range(6))
    return lambda s: fixed


def _coefficient_array(coeffs, g: _Grid):
    if g.varying:
        return coeffs.reshape(6, g.length, g.rows, LANES)
    return coeffs.reshape(6, g.rows, LANES)


def forward(coeffs, v, x0, code, *, block: int, interpret: bool):
    """``(ys [L, C], z_L [C], checkpoints [ceil(L / block), 2, C])``; see :mod:`.pallas`.

    ``coeffs``: ``[6, C]``, or per step ``[6, L, C]``.
    """
    axes = varying_axes(coeffs, v, x0, code)  # the outputs' type inside shard_map
    g = _grid(v, coeffs, block)
    tile = pl.BlockSpec((block, g.rb, LANES), lambda c, t: (t, c, 0))
    inputs = {
        "c_ref": (_coefficient_array(coeffs, g), _coefficient_spec(g, lambda t: t)),
        "x0_ref": (
            x0.reshape(2, g.rows, LANES),
            pl.BlockSpec((2, g.rb, LANES), lambda c, t: (0, c, 0)),
        ),
        "v_ref": (v.reshape(-1, g.rows, LANES), tile),
    }
    if code is not None:
        inputs["f_ref"] = (_flag_tiles(code, g.rows), tile)

    def kernel(c_ref, x0_ref, v_ref, ys_ref, ck_ref, zl_ref, carry, f_ref=None):
        t = pl.program_id(1)

        @pl.when(t == 0)
        def _():
            carry[...] = x0_ref[...]

        ck_ref[0] = carry[...]
        coefficients = _coefficients(c_ref, g.varying)

        def steps(n):
            def body(s, zy):
                flags = None if f_ref is None else f_ref[s]
                z, y = coded_step(coefficients(s), zy[0], zy[1], v_ref[s], flags)
                ys_ref[s] = y
                return z, y

            z, y = jax.lax.fori_loop(0, n, body, (carry[0], carry[1]), unroll=_unroll(n, interpret))
            carry[0] = z
            carry[1] = y

            @pl.when(t == g.blocks - 1)
            def _():
                zl_ref[...] = z

        _for_block_lengths(t == g.blocks - 1, block, g.last, steps)

    names = (*inputs, "ys_ref", "ck_ref", "zl_ref", "carry")
    ys, ck, z_l = pl.pallas_call(
        named_kernel(kernel, names),
        out_shape=(
            out_struct((g.length, g.rows, LANES), v.dtype, axes),
            out_struct((g.blocks, 2, g.rows, LANES), v.dtype, axes),
            out_struct((g.rows, LANES), v.dtype, axes),
        ),
        grid=g.grid,
        in_specs=[spec for _, spec in inputs.values()],
        out_specs=(
            tile,
            pl.BlockSpec((1, 2, g.rb, LANES), lambda c, t: (t, 0, c, 0)),
            pl.BlockSpec((g.rb, LANES), lambda c, t: (c, 0)),
        ),
        scratch_shapes=[pltpu.VMEM((2, g.rb, LANES), v.dtype)],
        compiler_params=_params(),
        interpret=interpret,
        name="linoss_recurrence_fwd_tpu",
    )(*(x for x, _ in inputs.values()))
    channels = v.shape[1]
    return ys.reshape(g.length, channels), z_l.reshape(channels), ck.reshape(g.blocks, 2, channels)


def backward(coeffs, v, x0, code, ys, ck, g_ys, g_zl, *, block: int, interpret: bool):
    """``(g_coeffs (coeffs' shape), g_v [L, C], g_x0 [2, C])``; see :mod:`.pallas`."""
    axes = varying_axes(coeffs, v, x0, code, ck, g_ys, g_zl)
    del x0, ys  # the checkpoints and recomputation replace them
    g = _grid(v, coeffs, block)
    # Time blocks in reverse: grid step t works on block blocks - 1 - t.
    rev = lambda t: g.blocks - 1 - t
    tile = pl.BlockSpec((block, g.rb, LANES), lambda c, t: (rev(t), c, 0))
    lanes = pl.BlockSpec((g.rb, LANES), lambda c, t: (c, 0))
    inputs = {
        "c_ref": (_coefficient_array(coeffs, g), _coefficient_spec(g, rev)),
        "ck_ref": (
            ck.reshape(g.blocks, 2, g.rows, LANES),
            pl.BlockSpec((1, 2, g.rb, LANES), lambda c, t: (rev(t), 0, c, 0)),
        ),
        "gzl_ref": (g_zl.reshape(g.rows, LANES), lanes),
        "v_ref": (v.reshape(-1, g.rows, LANES), tile),
        "g_ref": (g_ys.reshape(-1, g.rows, LANES), tile),
    }
    if code is not None:
        inputs["f_ref"] = (_flag_tiles(code, g.rows), tile)

    def kernel(
        c_ref, ck_ref, gzl_ref, v_ref, g_ref, gv_ref, gc_ref, gx0_ref, rho, zbuf, ybuf, f_ref=None
    ):
        t = pl.program_id(1)

        @pl.when(t == 0)
        def _():
            rho[0] = gzl_ref[...]
            rho[1] = jnp.zeros_like(rho[1])
            if not g.varying:
                gc_ref[...] = jnp.zeros_like(gc_ref)

        coefficients = _coefficients(c_ref, g.varying)

        def steps(n):
            # The states before each step of the block, from its checkpoint.
            def recompute(s, zy):
                zbuf[s] = zy[0]
                ybuf[s] = zy[1]
                flags = None if f_ref is None else f_ref[s]
                return coded_step(coefficients(s), zy[0], zy[1], v_ref[s], flags)

            jax.lax.fori_loop(
                0, n, recompute, (ck_ref[0, 0], ck_ref[0, 1]), unroll=_unroll(n, interpret)
            )

            # The step counts down in the carry (int32): under jax_enable_x64 the loop index
            # is int64 in the jaxpr but i32 in Mosaic, and `n - 1 - i` failed verification.
            def adjoint(_, carry):
                s, rz, ry, *acc = carry
                m11, m12, m21, m22, f1, f2 = coefficients(s)
                zp, yp = zbuf[s], ybuf[s]
                lz = rz
                ly = ry + g_ref[s]
                if f_ref is not None:
                    flags = f_ref[s]
                    keep = (flags & RESET) == 0
                    hold = (flags & HOLD) != 0
                    zp, yp = jnp.where(keep, zp, 0.0), jnp.where(keep, yp, 0.0)
                gv = f1 * lz + f2 * ly
                terms = (lz * zp, lz * yp, ly * zp, ly * yp, lz * v_ref[s], ly * v_ref[s])
                rz, ry = m11 * lz + m21 * ly, m12 * lz + m22 * ly
                if f_ref is not None:
                    # A held step: identity transition, no forcing, no parameter gradient.
                    gv = jnp.where(hold, 0.0, gv)
                    terms = tuple(jnp.where(hold, 0.0, x) for x in terms)
                    rz, ry = jnp.where(hold, lz, rz), jnp.where(hold, ly, ry)
                    rz, ry = jnp.where(keep, rz, 0.0), jnp.where(keep, ry, 0.0)
                gv_ref[s] = gv
                if g.varying:  # each step's own coefficients: its terms are their gradient
                    for k, x in enumerate(terms):
                        gc_ref[k, s] = x
                    return (s - 1, rz, ry)
                return (s - 1, rz, ry, *(a + x for a, x in zip(acc, terms)))

            zero = jnp.zeros_like(rho[0])
            init = (jnp.int32(n - 1), rho[0], rho[1]) + (() if g.varying else (zero,) * 6)
            _, rz, ry, *acc = jax.lax.fori_loop(0, n, adjoint, init, unroll=_unroll(n, interpret))
            rho[0] = rz
            rho[1] = ry
            for k, x in enumerate(acc):
                gc_ref[k] += x

            @pl.when(t == g.blocks - 1)
            def _():
                gx0_ref[0] = rz
                gx0_ref[1] = ry

        _for_block_lengths(t == 0, block, g.last, steps)

    if g.varying:
        gc_shape = (6, g.length, g.rows, LANES)
        gc_spec = _coefficient_spec(g, rev)
    else:
        gc_shape = (6, g.rows, LANES)
        gc_spec = pl.BlockSpec((6, g.rb, LANES), lambda c, t: (0, c, 0))
    names = (*inputs, "gv_ref", "gc_ref", "gx0_ref", "rho", "zbuf", "ybuf")
    g_v, g_c, g_x0 = pl.pallas_call(
        named_kernel(kernel, names),
        out_shape=(
            out_struct((g.length, g.rows, LANES), v.dtype, axes),
            out_struct(gc_shape, v.dtype, axes),
            out_struct((2, g.rows, LANES), v.dtype, axes),
        ),
        grid=g.grid,
        in_specs=[spec for _, spec in inputs.values()],
        out_specs=(tile, gc_spec, pl.BlockSpec((2, g.rb, LANES), lambda c, t: (0, c, 0))),
        scratch_shapes=[
            pltpu.VMEM((2, g.rb, LANES), v.dtype),
            pltpu.VMEM((block, g.rb, LANES), v.dtype),
            pltpu.VMEM((block, g.rb, LANES), v.dtype),
        ],
        # The input gradient overwrites the output cotangent.
        input_output_aliases={list(inputs).index("g_ref"): 0},
        compiler_params=_params(),
        interpret=interpret,
        name="linoss_recurrence_bwd_tpu",
    )(*(x for x, _ in inputs.values()))
    channels = v.shape[1]
    return g_c.reshape(coeffs.shape), g_v.reshape(g.length, channels), g_x0.reshape(2, channels)
