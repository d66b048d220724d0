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

Per-step coefficients (a time-varying ``dt``) arrive as ``[6, L, C]`` and are read per step
like the forcing; the chunk transfer matrices are then accumulated in the summary passes
(as with flags), and the gradient pass writes each step's six coefficient gradients
(``[6, L, C]``) instead of per-chunk sums.

Memory traffic: about 3S forward and 6S backward for ``[L, N*Q]`` arrays of S bytes (the
fused floor is 2S and 5S with a single streaming pass). Each program handles 128
consecutive channels of the time-major layout, so every load and store is one coalesced
512-byte row. The Triton backend (compute capability >= 8.0) is selected explicitly with
``compiler_params`` (JAX otherwise prefers Mosaic GPU).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from flax_linoss.ops._scans._common import (
    HOLD,
    RESET,
    coded_step,
    matmul2,
    named_kernel,
    out_struct,
    power,
    transpose2,
    varying_axes,
)

LANES = 128  # channels per program


def _params():
    return plt.CompilerParams(num_warps=4, num_stages=2)


class _Grid(NamedTuple):
    """The sizes every pass shares, computed once per call by :func:`_grid`.

    Attributes:
      length: ``L``.
      channels: ``C``.
      block: steps per chunk.
      chunks: ``ceil(L / block)``.
      per_row: channels per sequence (to find a channel's flags), 1 without flags.
      varying: per-step coefficients.
      flagged: per-step flags.
    """

    length: int
    channels: int
    block: int
    chunks: int
    per_row: int
    varying: bool
    flagged: bool

    @property
    def grid(self) -> tuple[int, int]:
        return (self.chunks, self.channels // LANES)

    @property
    def per_step(self) -> bool:
        """Whether the chunk transfer matrices vary (flags or per-step coefficients)."""
        return self.varying or self.flagged


def _grid(v, coeffs, code, block: int) -> _Grid:
    length, channels = v.shape
    flagged = code is not None
    per_row = channels // code.shape[1] if flagged else 1
    return _Grid(
        length, channels, block, pl.cdiv(length, block), per_row, coeffs.ndim == 3, flagged
    )


def _call(kernel, names, out_shape, g: _Grid, interpret, name):
    return pl.pallas_call(
        named_kernel(kernel, names),
        out_shape=out_shape,
        grid=g.grid,
        compiler_params=_params(),
        interpret=interpret,
        name=name,
    )


def _program(g: _Grid):
    """``(chunk k, lane slice, first step, steps in this chunk)`` of the current program."""
    k = pl.program_id(0)
    lanes = pl.ds(pl.program_id(1) * LANES, LANES)
    t0 = k * g.block
    return k, lanes, t0, jnp.minimum(g.block, g.length - t0)


def _flags(g: _Grid, code_ref, lanes):
    """``t -> `` the flags of the program's 128 channels at step ``t`` (a gather of
    ``[L, N]``), or ``None`` without flags."""
    if code_ref is None:
        return lambda t: None
    rows = (lanes.start + jnp.arange(LANES, dtype=jnp.int32)) // g.per_row
    return lambda t: code_ref[t, rows]


def _coefficients(g: _Grid, c_ref, lanes):
    """``t -> (m11, m12, m21, m22, f1, f2)`` of the program's lanes at step ``t`` (loaded
    once when time-invariant)."""
    if g.varying:
        return lambda t: tuple(c_ref[i, t, lanes] for i in range(6))
    fixed = tuple(c_ref[i, lanes] for i in range(6))
    return lambda t: fixed


def _transfer_step(m, p, code, transpose: bool):
    """``k A p`` (or ``k A^T p``) for the transfer matrix ``p`` (a 2x2 tuple of lanes);
    ``A = M`` (this step's) unless the flags hold the step, ``k = 0`` where they reset."""
    a = transpose2(m[:4]) if transpose else m[:4]
    moved = matmul2(a, p)
    if code is None:
        return moved
    keep = (code & RESET) == 0
    hold = (code & HOLD) != 0
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


def _constant_transfer(m, g: _Grid):
    """``M^block`` for every chunk but the last, ``M^(steps in the last chunk)`` for it."""
    full = power(m, g.block)
    last = power(m, g.length - (g.chunks - 1) * g.block)
    is_last = jnp.arange(g.chunks)[:, None] == g.chunks - 1
    shape = (g.chunks, g.channels)
    return tuple(
        jnp.where(is_last, jnp.broadcast_to(y, shape), jnp.broadcast_to(x, shape))
        for x, y in zip(full, last)
    )


def _inputs(g: _Grid, code, **arrays):
    """The named inputs of a kernel, the flags last where there are any."""
    return arrays | ({"code_ref": code} if g.flagged else {})


def forward(coeffs, v, x0, code, *, block: int, interpret: bool):
    """``(ys [L, C], z_L [C], checkpoints [ceil(L / block), 2, C])``; see :mod:`.pallas`.

    ``coeffs``: ``[6, C]``, or per step ``[6, L, C]``.
    """
    axes = varying_axes(coeffs, v, x0, code)  # the outputs' type inside shard_map
    g = _grid(v, coeffs, code, block)

    def summary_kernel(c_ref, v_ref, w_ref, code_ref=None):
        k, lanes, t0, n = _program(g)
        coefficients = _coefficients(g, c_ref, lanes)
        flags = _flags(g, code_ref, lanes)
        zero = jnp.zeros((LANES,), v.dtype)
        one = jnp.ones((LANES,), v.dtype)

        def body(s, carry):
            z, y, *p = carry
            m, code = coefficients(t0 + s), flags(t0 + s)
            z, y = coded_step(m, z, y, v_ref[t0 + s, lanes], code)
            if g.per_step:
                p = _transfer_step(m, tuple(p), code, transpose=False)
            return (z, y, *p)

        init = (zero, zero) + ((one, zero, zero, one) if g.per_step else ())
        out = jax.lax.fori_loop(0, n, body, init)
        for i, x in enumerate(out):
            w_ref[k, i, lanes] = x

    inputs = _inputs(g, code, c_ref=coeffs, v_ref=v)
    summary = _call(
        summary_kernel,
        (*inputs, "w_ref"),
        out_struct((g.chunks, 6 if g.per_step else 2, g.channels), v.dtype, axes),
        g,
        interpret,
        "linoss_chunk_summary_gpu",
    )(*inputs.values())
    if g.per_step:
        transfer = tuple(summary[:, 2 + i] for i in range(4))
    else:
        transfer = _constant_transfer(tuple(coeffs[:4]), g)
    carries = _carries(transfer, summary[:, :2], x0)  # [K, 2, C], also the checkpoints

    def output_kernel(c_ref, v_ref, h_ref, ys_ref, zl_ref, code_ref=None):
        k, lanes, t0, n = _program(g)
        coefficients = _coefficients(g, c_ref, lanes)
        flags = _flags(g, code_ref, lanes)

        def body(s, zy):
            t = t0 + s
            z, y = coded_step(coefficients(t), zy[0], zy[1], v_ref[t, lanes], flags(t))
            ys_ref[t, lanes] = y
            return z, y

        z, _ = jax.lax.fori_loop(0, n, body, (h_ref[k, 0, lanes], h_ref[k, 1, lanes]))

        @pl.when(k == g.chunks - 1)
        def _():
            zl_ref[lanes] = z

    inputs = _inputs(g, code, c_ref=coeffs, v_ref=v, h_ref=carries)
    ys, z_l = _call(
        output_kernel,
        (*inputs, "ys_ref", "zl_ref"),
        (
            out_struct((g.length, g.channels), v.dtype, axes),
            out_struct((g.channels,), v.dtype, axes),
        ),
        g,
        interpret,
        "linoss_chunk_output_gpu",
    )(*inputs.values())
    return ys, z_l, carries


def backward(coeffs, v, x0, code, ys, ck, g_ys, g_zl, *, block: int, interpret: bool):
    """``(g_coeffs (coeffs' shape), g_v [L, C], g_x0 [2, C])``; see :mod:`.pallas`."""
    axes = varying_axes(coeffs, v, x0, code, ys, ck, g_ys, g_zl)
    del x0  # the checkpoints hold it
    g = _grid(v, coeffs, code, block)

    def summary_kernel(c_ref, g_ref, s_ref, code_ref=None):
        k, lanes, t0, n = _program(g)
        coefficients = _coefficients(g, c_ref, lanes)
        flags = _flags(g, code_ref, lanes)
        zero = jnp.zeros((LANES,), v.dtype)
        one = jnp.ones((LANES,), v.dtype)

        def body(i, carry):
            rz, ry, *p = carry
            t = t0 + n - 1 - i
            m, code = coefficients(t), flags(t)
            m11, m12, m21, m22 = m[:4]
            lz, ly = rz, ry + g_ref[t, lanes]
            rz, ry = m11 * lz + m21 * ly, m12 * lz + m22 * ly
            if code is not None:
                keep = (code & RESET) == 0
                hold = (code & HOLD) != 0
                rz, ry = jnp.where(hold, lz, rz), jnp.where(hold, ly, ry)
                rz, ry = jnp.where(keep, rz, 0.0), jnp.where(keep, ry, 0.0)
            if g.per_step:
                p = _transfer_step(m, tuple(p), code, transpose=True)
            return (rz, ry, *p)

        init = (zero, zero) + ((one, zero, zero, one) if g.per_step else ())
        out = jax.lax.fori_loop(0, n, body, init)
        for i, x in enumerate(out):
            s_ref[k, i, lanes] = x

    inputs = _inputs(g, code, c_ref=coeffs, g_ref=g_ys)
    summary = _call(
        summary_kernel,
        (*inputs, "s_ref"),
        out_struct((g.chunks, 6 if g.per_step else 2, g.channels), v.dtype, axes),
        g,
        interpret,
        "linoss_adjoint_summary_gpu",
    )(*inputs.values())
    if g.per_step:
        transfer = tuple(summary[:, 2 + i] for i in range(4))
    else:
        transfer = _constant_transfer(transpose2(tuple(coeffs[:4])), g)
    # rho at each chunk's last step, last chunk first: rho_end(K - 1) = (g_zL, 0), then
    # rho_end(k) = transfer_{k+1} rho_end(k + 1) + summary_{k+1}: the forward carries'
    # recursion on the reversed chunk sequence.
    start = jnp.stack([g_zl, jnp.zeros_like(g_zl)])
    reversed_transfer = tuple(x[::-1] for x in transfer)
    rho_end = _carries(reversed_transfer, summary[::-1, :2], start)[::-1]

    def gradient_kernel(
        c_ref, v_ref, ys_ref, ck_ref, g_ref, rho_ref, gv_ref, gc_ref, gx0_ref, code_ref=None
    ):
        k, lanes, t0, n = _program(g)
        coefficients = _coefficients(g, c_ref, lanes)
        flags = _flags(g, code_ref, lanes)
        y_start = ck_ref[k, 1, lanes]

        # Velocities before each step, recomputed from the checkpoint into the rows of the
        # input gradient (each is read below before its gradient overwrites it).
        def recompute(s, zy):
            t = t0 + s
            gv_ref[t, lanes] = zy[0]
            return coded_step(coefficients(t), zy[0], zy[1], v_ref[t, lanes], flags(t))

        jax.lax.fori_loop(0, n, recompute, (ck_ref[k, 0, lanes], y_start))

        def adjoint(i, carry):
            rz, ry, *acc = carry
            t = t0 + n - 1 - i
            m11, m12, m21, m22, f1, f2 = coefficients(t)
            zp = gv_ref[t, lanes]
            yp = jnp.where(t > t0, ys_ref[jnp.maximum(t - 1, 0), lanes], y_start)
            vt = v_ref[t, lanes]
            lz, ly = rz, ry + g_ref[t, lanes]
            code = flags(t)
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
            if g.varying:  # each step's own coefficients: its terms are their gradient
                for j, x in enumerate(terms):
                    gc_ref[j, t, lanes] = x
                return (rz, ry)
            return (rz, ry, *(a + x for a, x in zip(acc, terms)))

        zero = jnp.zeros((LANES,), v.dtype)
        init = (rho_ref[k, 0, lanes], rho_ref[k, 1, lanes]) + (() if g.varying else (zero,) * 6)
        rz, ry, *acc = jax.lax.fori_loop(0, n, adjoint, init)
        for j, x in enumerate(acc):
            gc_ref[k, j, lanes] = x

        @pl.when(k == 0)
        def _():
            gx0_ref[0, lanes] = rz
            gx0_ref[1, lanes] = ry

    inputs = _inputs(
        g, code, c_ref=coeffs, v_ref=v, ys_ref=ys, ck_ref=ck, g_ref=g_ys, rho_ref=rho_end
    )
    gc_shape = (6, g.length, g.channels) if g.varying else (g.chunks, 6, g.channels)
    g_v, g_c, g_x0 = _call(
        gradient_kernel,
        (*inputs, "gv_ref", "gc_ref", "gx0_ref"),
        (
            out_struct((g.length, g.channels), v.dtype, axes),
            out_struct(gc_shape, v.dtype, axes),
            out_struct((2, g.channels), v.dtype, axes),
        ),
        g,
        interpret,
        "linoss_adjoint_gradients_gpu",
    )(*inputs.values())
    return (g_c if g.varying else jnp.sum(g_c, axis=0)), g_v, g_x0
