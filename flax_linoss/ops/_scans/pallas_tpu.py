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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from flax_linoss.ops._scans._common import HOLD, RESET, coded_step, out_struct, varying_axes

LANES = 128
# Two double-buffered [block, rb, 128] streams in and one out, plus two [block, rb, 128]
# scratch buffers in the backward: about 10 MiB at block 128, rb 16; leave headroom.
_VMEM_LIMIT = 48 * 2**20
# Unrolled time loops let Mosaic interleave steps; the interpreter gains nothing from it and
# compiles far longer, so it runs them rolled.
_UNROLL = 8


def _unroll(n: int, interpret: bool) -> int:
    return 1 if interpret else min(n, _UNROLL)


def _rows_per_block(rows: int) -> int:
    for rb in (16, 8):
        if rows % rb == 0:
            return rb
    return rows  # a full dimension is always a legal block (pallas.channels keeps it <= 8)


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


def forward(coeffs, v, x0, code, *, block: int, interpret: bool):
    """``(ys [L, C], z_L [C], checkpoints [ceil(L / block), 2, C])``; see :mod:`.pallas`."""
    axes = varying_axes(coeffs, v, x0, code)  # the outputs' type inside shard_map
    length, channels = v.shape
    rows = channels // LANES
    rb = _rows_per_block(rows)
    blocks = pl.cdiv(length, block)
    last = length - (blocks - 1) * block
    flagged = code is not None
    tile = pl.BlockSpec((block, rb, LANES), lambda c, t: (t, c, 0))
    args = [coeffs.reshape(6, rows, LANES), x0.reshape(2, rows, LANES), v.reshape(-1, rows, LANES)]
    in_specs = [
        pl.BlockSpec((6, rb, LANES), lambda c, t: (0, c, 0)),
        pl.BlockSpec((2, rb, LANES), lambda c, t: (0, c, 0)),
        tile,
    ]
    if flagged:
        args.append(_flag_tiles(code, rows))
        in_specs.append(tile)

    def kernel(*refs):
        c_ref, x0_ref, v_ref = refs[:3]
        f_ref = refs[3] if flagged else None
        ys_ref, ck_ref, zl_ref, carry = refs[3 + flagged :]
        t = pl.program_id(1)

        @pl.when(t == 0)
        def _():
            carry[...] = x0_ref[...]

        ck_ref[0] = carry[...]
        m = tuple(c_ref[i] for i in range(6))

        def steps(n):
            def body(s, zy):
                code = None if f_ref is None else f_ref[s]
                z, y = coded_step(m, zy[0], zy[1], v_ref[s], code)
                ys_ref[s] = y
                return z, y

            z, y = jax.lax.fori_loop(0, n, body, (carry[0], carry[1]), unroll=_unroll(n, interpret))
            carry[0] = z
            carry[1] = y

            @pl.when(t == blocks - 1)
            def _():
                zl_ref[...] = z

        _for_block_lengths(t == blocks - 1, block, last, steps)

    ys, ck, z_l = pl.pallas_call(
        kernel,
        out_shape=(
            out_struct((length, rows, LANES), v.dtype, axes),
            out_struct((blocks, 2, rows, LANES), v.dtype, axes),
            out_struct((rows, LANES), v.dtype, axes),
        ),
        grid=(rows // rb, blocks),
        in_specs=in_specs,
        out_specs=(
            tile,
            pl.BlockSpec((1, 2, rb, LANES), lambda c, t: (t, 0, c, 0)),
            pl.BlockSpec((rb, LANES), lambda c, t: (c, 0)),
        ),
        scratch_shapes=[pltpu.VMEM((2, rb, LANES), v.dtype)],
        compiler_params=_params(),
        interpret=interpret,
        name="linoss_recurrence_fwd_tpu",
    )(*args)
    return ys.reshape(length, channels), z_l.reshape(channels), ck.reshape(blocks, 2, channels)


def backward(coeffs, v, x0, code, ys, ck, g_ys, g_zl, *, block: int, interpret: bool):
    """``(g_coeffs [6, C], g_v [L, C], g_x0 [2, C])``; see :mod:`.pallas`."""
    axes = varying_axes(coeffs, v, x0, code, ck, g_ys, g_zl)
    del x0, ys  # the checkpoints and recomputation replace them
    length, channels = v.shape
    rows = channels // LANES
    rb = _rows_per_block(rows)
    blocks = pl.cdiv(length, block)
    last = length - (blocks - 1) * block
    flagged = code is not None
    # Time blocks in reverse: grid step t works on block blocks - 1 - t.
    tile = pl.BlockSpec((block, rb, LANES), lambda c, t: (blocks - 1 - t, c, 0))
    lanes = pl.BlockSpec((rb, LANES), lambda c, t: (c, 0))
    args = [
        coeffs.reshape(6, rows, LANES),
        ck.reshape(blocks, 2, rows, LANES),
        g_zl.reshape(rows, LANES),
        v.reshape(-1, rows, LANES),
        g_ys.reshape(-1, rows, LANES),
    ]
    in_specs = [
        pl.BlockSpec((6, rb, LANES), lambda c, t: (0, c, 0)),
        pl.BlockSpec((1, 2, rb, LANES), lambda c, t: (blocks - 1 - t, 0, c, 0)),
        lanes,
        tile,
        tile,
    ]
    if flagged:
        args.append(_flag_tiles(code, rows))
        in_specs.append(tile)

    def kernel(*refs):
        c_ref, ck_ref, gzl_ref, v_ref, g_ref = refs[:5]
        f_ref = refs[5] if flagged else None
        gv_ref, gc_ref, gx0_ref, rho, zbuf, ybuf = refs[5 + flagged :]
        t = pl.program_id(1)

        @pl.when(t == 0)
        def _():
            rho[0] = gzl_ref[...]
            rho[1] = jnp.zeros_like(rho[1])
            gc_ref[...] = jnp.zeros_like(gc_ref)

        m = tuple(c_ref[i] for i in range(6))
        m11, m12, m21, m22, f1, f2 = m

        def steps(n):
            # The states before each step of the block, from its checkpoint.
            def recompute(s, zy):
                zbuf[s] = zy[0]
                ybuf[s] = zy[1]
                code = None if f_ref is None else f_ref[s]
                return coded_step(m, zy[0], zy[1], v_ref[s], code)

            jax.lax.fori_loop(
                0, n, recompute, (ck_ref[0, 0], ck_ref[0, 1]), unroll=_unroll(n, interpret)
            )

            # The step counts down in the carry (int32): under jax_enable_x64 the loop index
            # is int64 in the jaxpr but i32 in Mosaic, and `n - 1 - i` failed verification.
            def adjoint(_, carry):
                s, rz, ry, *acc = carry
                zp, yp = zbuf[s], ybuf[s]
                lz = rz
                ly = ry + g_ref[s]
                if f_ref is not None:
                    code = f_ref[s]
                    keep = (code & RESET) == 0
                    hold = (code & HOLD) != 0
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
                return (s - 1, rz, ry, *(a + x for a, x in zip(acc, terms)))

            zero = jnp.zeros_like(rho[0])
            init = (jnp.int32(n - 1), rho[0], rho[1], *(zero,) * 6)
            _, rz, ry, *acc = jax.lax.fori_loop(0, n, adjoint, init, unroll=_unroll(n, interpret))
            rho[0] = rz
            rho[1] = ry
            for i in range(6):
                gc_ref[i] += acc[i]

            @pl.when(t == blocks - 1)
            def _():
                gx0_ref[0] = rz
                gx0_ref[1] = ry

        _for_block_lengths(t == 0, block, last, steps)

    g_v, g_c, g_x0 = pl.pallas_call(
        kernel,
        out_shape=(
            out_struct((length, rows, LANES), v.dtype, axes),
            out_struct((6, rows, LANES), v.dtype, axes),
            out_struct((2, rows, LANES), v.dtype, axes),
        ),
        grid=(rows // rb, blocks),
        in_specs=in_specs,
        out_specs=(
            tile,
            pl.BlockSpec((6, rb, LANES), lambda c, t: (0, c, 0)),
            pl.BlockSpec((2, rb, LANES), lambda c, t: (0, c, 0)),
        ),
        scratch_shapes=[
            pltpu.VMEM((2, rb, LANES), v.dtype),
            pltpu.VMEM((block, rb, LANES), v.dtype),
            pltpu.VMEM((block, rb, LANES), v.dtype),
        ],
        input_output_aliases={4: 0},  # the input gradient overwrites the output cotangent
        compiler_params=_params(),
        interpret=interpret,
        name="linoss_recurrence_bwd_tpu",
    )(*args)
    return g_c.reshape(6, channels), g_v.reshape(length, channels), g_x0.reshape(2, channels)
