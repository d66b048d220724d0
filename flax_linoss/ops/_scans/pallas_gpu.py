"""The GPU (Pallas on Triton) kernels of ``scan="pallas"``: chunk-parallel streaming loops.

A single streaming loop per channel would leave a GPU idle (``N * Q`` channels, a few
thousand, against the tens of thousands of loads a GPU needs in flight), so time is cut
into chunks of ``block`` steps that run in parallel, as in Mamba's selective scan:

forward
  1. per (chunk, 128 channels): the chunk's end state from a zero start (and, with flags,
     the chunk's 2x2 transfer matrix), one streaming loop;
  2. in JAX, the carries between chunks by a prefix scan over the chunks (arrays
     ``block`` times smaller than the input); they are also the checkpoints;
  3. per (chunk, channels): the chunk again from its carry, writing the positions.

backward (the exact adjoint, see :mod:`._common`)
  1. per chunk: the adjoint's chunk-start value from a zero end (and its transfer);
  2. in JAX, the adjoint carries by a prefix scan over the chunks, last to first;
  3. per chunk: the velocities before each step are recomputed from the checkpoint into
     the rows of the (not yet written) input gradient, then the adjoint runs down the
     chunk, overwriting each row with the input gradient once it is read, and the six
     per-channel parameter gradients are accumulated per chunk.

Memory traffic: about 3S forward and 6S backward for ``[L, N*Q]`` arrays of S bytes (the
fused floor is 2S and 5S with a single streaming pass). Each program handles 128
consecutive channels of the time-major layout, so every load and store is one coalesced
512-byte row. The Triton backend (compute capability >= 8.0) is selected explicitly with
``compiler_params`` (JAX otherwise prefers Mosaic GPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from flax_linoss.ops._scans._common import (
    HOLD,
    RESET,
    coded_step,
    matmul2,
    out_struct,
    power,
    transpose2,
    varying_axes,
)

LANES = 128  # channels per program


def _params():
    return plt.CompilerParams(num_warps=4, num_stages=2)


def _call(kernel, out_shape, grid, interpret, name):
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        compiler_params=_params(),
        interpret=interpret,
        name=name,
    )


def _program(block: int, length: int):
    """``(chunk k, lane slice, first step, steps in this chunk)`` of the current program."""
    k = pl.program_id(0)
    lanes = pl.ds(pl.program_id(1) * LANES, LANES)
    t0 = k * block
    return k, lanes, t0, jnp.minimum(block, length - t0)


def _codes(code_ref, t, lanes_start, per_row: int):
    """The flags of the 128 channels of this program at step ``t`` (a gather of ``[L, N]``)."""
    rows = (lanes_start + jnp.arange(LANES, dtype=jnp.int32)) // per_row
    return code_ref[t, rows]


def _coefficients(c_ref, lanes):
    return tuple(c_ref[i, lanes] for i in range(6))


def _transfer_step(m, p, code, transpose: bool):
    """``k A p`` (or ``k A^T p``) for the transfer matrix ``p`` (a 2x2 tuple of lanes)."""
    a = transpose2(m[:4]) if transpose else m[:4]
    keep = (code & RESET) == 0
    hold = (code & HOLD) != 0
    moved = matmul2(a, p)
    return tuple(jnp.where(keep, jnp.where(hold, x, y), 0.0) for x, y in zip(p, moved))


def _carries(transfer, ends, start):
    """States before each chunk: ``h_0 = start``, ``h_{k+1} = transfer_k h_k + ends_k``.

    ``transfer``: four ``[K, C]``; ``ends``: ``[K, 2, C]``; ``start``: ``[2, C]``.
    A log-depth associative scan over the ``K`` chunks (arrays ``block`` times smaller).
    """
    b = ends.at[0].add(
        jnp.stack(
            [
                transfer[0][0] * start[0] + transfer[1][0] * start[1],
                transfer[2][0] * start[0] + transfer[3][0] * start[1],
            ]
        )
    )

    def combine(earlier, later):
        a_i, b_i = earlier
        a_j, b_j = later
        a = matmul2(a_j, a_i)
        b = jnp.stack(
            [
                a_j[0] * b_i[:, 0] + a_j[1] * b_i[:, 1] + b_j[:, 0],
                a_j[2] * b_i[:, 0] + a_j[3] * b_i[:, 1] + b_j[:, 1],
            ],
            axis=1,
        )
        return a, b

    _, after = jax.lax.associative_scan(combine, (transfer, b))
    return jnp.concatenate([start[None], after[:-1]], axis=0)


def _constant_transfer(m, chunks: int, block: int, length: int, channels: int):
    """``M^block`` for every chunk but the last, ``M^(steps in the last chunk)`` for it."""
    full = power(m, block)
    last = power(m, length - (chunks - 1) * block)
    is_last = jnp.arange(chunks)[:, None] == chunks - 1
    shape = (chunks, channels)
    return tuple(
        jnp.where(is_last, jnp.broadcast_to(y, shape), jnp.broadcast_to(x, shape))
        for x, y in zip(full, last)
    )


def forward(coeffs, v, x0, code, *, block: int, interpret: bool):
    """``(ys [L, C], z_L [C], checkpoints [ceil(L / block), 2, C])``; see :mod:`.pallas`."""
    axes = varying_axes(coeffs, v, x0, code)  # the outputs' type inside shard_map
    length, channels = v.shape
    chunks = pl.cdiv(length, block)
    grid = (chunks, channels // LANES)
    flagged = code is not None
    per_row = channels // code.shape[1] if flagged else 1

    def summary_kernel(*refs):
        c_ref, v_ref = refs[:2]
        code_ref = refs[2] if flagged else None
        w_ref = refs[2 + flagged]
        k, lanes, t0, n = _program(block, length)
        m = _coefficients(c_ref, lanes)
        zero = jnp.zeros((LANES,), v.dtype)
        one = jnp.ones((LANES,), v.dtype)

        def body(s, carry):
            z, y, *p = carry
            code = None if code_ref is None else _codes(code_ref, t0 + s, lanes.start, per_row)
            z, y = coded_step(m, z, y, v_ref[t0 + s, lanes], code)
            if code is not None:
                p = _transfer_step(m, tuple(p), code, transpose=False)
            return (z, y, *p)

        init = (zero, zero) + ((one, zero, zero, one) if flagged else ())
        out = jax.lax.fori_loop(0, n, body, init)
        for i, x in enumerate(out):
            w_ref[k, i, lanes] = x

    args = (coeffs, v) + ((code,) if flagged else ())
    width = 6 if flagged else 2
    summary = _call(
        summary_kernel,
        out_struct((chunks, width, channels), v.dtype, axes),
        grid,
        interpret,
        "linoss_chunk_summary_gpu",
    )(*args)
    if flagged:
        transfer = tuple(summary[:, 2 + i] for i in range(4))
    else:
        transfer = _constant_transfer(tuple(coeffs[:4]), chunks, block, length, channels)
    carries = _carries(transfer, summary[:, :2], x0)  # [K, 2, C], also the checkpoints

    def output_kernel(*refs):
        c_ref, v_ref, h_ref = refs[:3]
        code_ref = refs[3] if flagged else None
        ys_ref, zl_ref = refs[3 + flagged :]
        k, lanes, t0, n = _program(block, length)
        m = _coefficients(c_ref, lanes)

        def body(s, zy):
            code = None if code_ref is None else _codes(code_ref, t0 + s, lanes.start, per_row)
            z, y = coded_step(m, zy[0], zy[1], v_ref[t0 + s, lanes], code)
            ys_ref[t0 + s, lanes] = y
            return z, y

        z, _ = jax.lax.fori_loop(0, n, body, (h_ref[k, 0, lanes], h_ref[k, 1, lanes]))

        @pl.when(k == chunks - 1)
        def _():
            zl_ref[lanes] = z

    ys, z_l = _call(
        output_kernel,
        (
            out_struct((length, channels), v.dtype, axes),
            out_struct((channels,), v.dtype, axes),
        ),
        grid,
        interpret,
        "linoss_chunk_output_gpu",
    )(coeffs, v, carries, *args[2:])
    return ys, z_l, carries


def backward(coeffs, v, x0, code, ys, ck, g_ys, g_zl, *, block: int, interpret: bool):
    """``(g_coeffs [6, C], g_v [L, C], g_x0 [2, C])``; see :mod:`.pallas`."""
    axes = varying_axes(coeffs, v, x0, code, ys, ck, g_ys, g_zl)
    del x0  # the checkpoints hold it
    length, channels = v.shape
    chunks = pl.cdiv(length, block)
    grid = (chunks, channels // LANES)
    flagged = code is not None
    per_row = channels // code.shape[1] if flagged else 1
    extra = (code,) if flagged else ()

    def summary_kernel(*refs):
        c_ref, g_ref = refs[:2]
        code_ref = refs[2] if flagged else None
        s_ref = refs[2 + flagged]
        k, lanes, t0, n = _program(block, length)
        m = _coefficients(c_ref, lanes)
        m11, m12, m21, m22 = m[:4]
        zero = jnp.zeros((LANES,), v.dtype)
        one = jnp.ones((LANES,), v.dtype)

        def body(i, carry):
            rz, ry, *p = carry
            t = t0 + n - 1 - i
            lz, ly = rz, ry + g_ref[t, lanes]
            rz, ry = m11 * lz + m21 * ly, m12 * lz + m22 * ly
            if code_ref is not None:
                code = _codes(code_ref, t, lanes.start, per_row)
                keep = (code & RESET) == 0
                hold = (code & HOLD) != 0
                rz, ry = jnp.where(hold, lz, rz), jnp.where(hold, ly, ry)
                rz, ry = jnp.where(keep, rz, 0.0), jnp.where(keep, ry, 0.0)
                p = _transfer_step(m, tuple(p), code, transpose=True)
            return (rz, ry, *p)

        init = (zero, zero) + ((one, zero, zero, one) if flagged else ())
        out = jax.lax.fori_loop(0, n, body, init)
        for i, x in enumerate(out):
            s_ref[k, i, lanes] = x

    summary = _call(
        summary_kernel,
        out_struct((chunks, 6 if flagged else 2, channels), v.dtype, axes),
        grid,
        interpret,
        "linoss_adjoint_summary_gpu",
    )(coeffs, g_ys, *extra)
    if flagged:
        transfer = tuple(summary[:, 2 + i] for i in range(4))
    else:
        transfer = _constant_transfer(
            transpose2(tuple(coeffs[:4])), chunks, block, length, channels
        )
    # rho at each chunk's last step, last chunk first: rho_end(K - 1) = (g_zL, 0), then
    # rho_end(k) = transfer_{k+1} rho_end(k + 1) + summary_{k+1}: the forward carries'
    # recursion on the reversed chunk sequence.
    start = jnp.stack([g_zl, jnp.zeros_like(g_zl)])
    reversed_transfer = tuple(x[::-1] for x in transfer)
    rho_end = _carries(reversed_transfer, summary[::-1, :2], start)[::-1]

    def gradient_kernel(*refs):
        c_ref, v_ref, ys_ref, ck_ref, g_ref, rho_ref = refs[:6]
        code_ref = refs[6] if flagged else None
        gv_ref, acc_ref, gx0_ref = refs[6 + flagged :]
        k, lanes, t0, n = _program(block, length)
        m = _coefficients(c_ref, lanes)
        m11, m12, m21, m22, f1, f2 = m
        y_start = ck_ref[k, 1, lanes]

        def codes(t):
            return None if code_ref is None else _codes(code_ref, t, lanes.start, per_row)

        # Velocities before each step, recomputed from the checkpoint into the rows of the
        # input gradient (each is read below before its gradient overwrites it).
        def recompute(s, zy):
            t = t0 + s
            gv_ref[t, lanes] = zy[0]
            return coded_step(m, zy[0], zy[1], v_ref[t, lanes], codes(t))

        jax.lax.fori_loop(0, n, recompute, (ck_ref[k, 0, lanes], y_start))

        def adjoint(i, carry):
            rz, ry, *acc = carry
            t = t0 + n - 1 - i
            zp = gv_ref[t, lanes]
            yp = jnp.where(t > t0, ys_ref[jnp.maximum(t - 1, 0), lanes], y_start)
            vt = v_ref[t, lanes]
            lz, ly = rz, ry + g_ref[t, lanes]
            code = codes(t)
            if code is not None:
                keep = (code & RESET) == 0
                hold = (code & HOLD) != 0
                zp, yp = jnp.where(keep, zp, 0.0), jnp.where(keep, yp, 0.0)
            gv = f1 * lz + f2 * ly
            terms = (lz * zp, lz * yp, ly * zp, ly * yp, lz * vt, ly * vt)
            rz, ry = m11 * lz + m21 * ly, m12 * lz + m22 * ly
            if code is not None:
                gv = jnp.where(hold, 0.0, gv)
                terms = tuple(jnp.where(hold, 0.0, x) for x in terms)
                rz, ry = jnp.where(hold, lz, rz), jnp.where(hold, ly, ry)
                rz, ry = jnp.where(keep, rz, 0.0), jnp.where(keep, ry, 0.0)
            gv_ref[t, lanes] = gv
            return (rz, ry, *(a + x for a, x in zip(acc, terms)))

        zero = jnp.zeros((LANES,), v.dtype)
        rz, ry, *acc = jax.lax.fori_loop(
            0, n, adjoint, (rho_ref[k, 0, lanes], rho_ref[k, 1, lanes], *(zero,) * 6)
        )
        for i, x in enumerate(acc):
            acc_ref[k, i, lanes] = x

        @pl.when(k == 0)
        def _():
            gx0_ref[0, lanes] = rz
            gx0_ref[1, lanes] = ry

    g_v, acc, g_x0 = _call(
        gradient_kernel,
        (
            out_struct((length, channels), v.dtype, axes),
            out_struct((chunks, 6, channels), v.dtype, axes),
            out_struct((2, channels), v.dtype, axes),
        ),
        grid,
        interpret,
        "linoss_adjoint_gradients_gpu",
    )(coeffs, v, ys, ck, g_ys, rho_end, *extra)
    return jnp.sum(acc, axis=0), g_v, g_x0
