"""``scan="chunked"``: the time-invariant recurrence as chunked matmuls, pure JAX.

For any accelerator, and for a ``jit`` that partitions the batch over several devices
(every operation here is an ordinary XLA op, so the SPMD partitioner splits it like any
other). ``L`` is cut into ``C = ceil(L / T)`` chunks of ``T`` steps (the end padded with
zeros). Per channel, with ``P_j = M^j`` (built by log-doubling, never an ``L``-step loop)
and ``K_j = M^j f``:

* inside a chunk, the zero-state response is a matmul with a ``T x T`` lower-triangular
  Toeplitz table ``Ty[s, r] = (K_{s-r})_y``;
* the chunk-to-chunk carries ``h_{c+1} = P_T h_c + w_c`` (``w_c`` the chunk's zero-state
  end state, ``sum_r K_{T-1-r} v_{c,r}``) run through the parallel prefix scan over the
  ``C`` chunks, on arrays ``T`` times smaller than the input;
* every step adds its carry's response ``(P_{s+1} h_c)_y``.

Backward: the exact adjoint system (see :mod:`._common`) solved by the same chunked
solver on ``M^T`` (forcing ``M^T e_y`` over the reversed cotangent, initial state from the
final-state cotangent), then the parameter gradients as sums over the states; never
autodiff through the tables. The forward states are recomputed, not stored.

``T`` per platform: 128 on TPU (the MXU's width), 64 on GPU, 64 elsewhere, capped at the
next power of two above ``L``. The matmuls run at ``Precision.HIGHEST``: on GPU the default
float32 matmul is TF32 (about 1e-3 relative error), on TPU one bfloat16 pass;
``HIGHEST`` keeps float32 accuracy on both (about 2T multiply-adds per element, so still
memory-bound). Time-invariant by construction: flags and a per-step ``dt`` (each a
time-varying transition) break the Toeplitz structure, so ``auto`` sends such inputs
elsewhere (see :mod:`flax_linoss.ops.table`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flax_linoss.ops._scans._common import (
    Flags,
    coefficient_grads,
    is_time_varying,
    powers,
    prefix_scan,
    run_custom,
    transpose2,
    with_adjoint,
)

_CHUNK = {"tpu": 128, "gpu": 64, "cuda": 64, "rocm": 64}
_DEFAULT_CHUNK = 64
_PRECISION = jax.lax.Precision.HIGHEST


def chunk_length(length: int, platform: str | None = None) -> int:
    """``T`` for a sequence of ``length`` steps on ``platform`` (default: JAX's backend)."""
    base = _CHUNK.get(platform or jax.default_backend(), _DEFAULT_CHUNK)
    return max(1, min(base, 1 << max(0, length - 1).bit_length()))


def _toeplitz(k, shift: int):
    """``[T, T, Q]`` with ``out[s, r] = k[s - r - shift]`` where that index is ``>= 0``, else 0."""
    t = k.shape[0]
    idx = jnp.arange(t)[:, None] - jnp.arange(t)[None, :] - shift
    return jnp.where((idx >= 0)[..., None], k[jnp.clip(idx, 0)], 0.0)


def _within(table, vc):
    """``[N, C, T, Q]``: each chunk's zero-state response, ``sum_r table[s, r] v[r]``."""
    return jnp.einsum("srq,ncrq->ncsq", table, vc, precision=_PRECISION)


def _solve(m, f, v, z0, y0, chunk: int, *, pre: bool):
    """Chunked solution of ``x_t = M x_{t-1} + f v_t`` from ``x_{-1} = (z0, y0)``.

    Args:
      m: ``(m11, m12, m21, m22)``, each ``[Q]``.
      f: ``(f1, f2)``, each ``[Q]``.
      v: ``[N, L, Q]``.
      z0, y0: ``[N, Q]``.
      chunk: ``T``.
      pre: return the states *before* every step (both components) instead of the
        positions after it.

    Returns:
      ``(outputs, (z_{L-1}, y_{L-1}))`` with ``outputs`` the positions ``[N, L, Q]`` or,
      with ``pre``, the pair ``(z_{t-1}, y_{t-1})``, each ``[N, L, Q]``.
    """
    n, length, q = v.shape
    chunks = -(-length // chunk)
    vc = jnp.pad(v, ((0, 0), (0, chunks * chunk - length), (0, 0))).reshape(n, chunks, chunk, q)
    p11, p12, p21, p22 = powers(m, chunk + 1)  # [T + 1, Q]
    kz = p11[:chunk] * f[0] + p12[:chunk] * f[1]  # K_j = M^j f, [T, Q]
    ky = p21[:chunk] * f[0] + p22[:chunk] * f[1]
    # Chunk summaries from a zero state, then the carries by a prefix over the chunks.
    w_z = jnp.einsum("rq,ncrq->ncq", kz[::-1], vc, precision=_PRECISION)
    w_y = jnp.einsum("rq,ncrq->ncq", ky[::-1], vc, precision=_PRECISION)
    p_t = (p11[chunk], p12[chunk], p21[chunk], p22[chunk])
    w_z = w_z.at[:, 0].add(p_t[0] * z0 + p_t[1] * y0)
    w_y = w_y.at[:, 0].add(p_t[2] * z0 + p_t[3] * y0)
    h_z, h_y = prefix_scan(p_t, w_z, w_y)  # the state after chunk c
    h_z = jnp.concatenate([z0[:, None], h_z[:, :-1]], axis=1)[:, :, None]  # before chunk c
    h_y = jnp.concatenate([y0[:, None], h_y[:, :-1]], axis=1)[:, :, None]

    def flat(x):
        return x.reshape(n, chunks * chunk, q)[:, :length]

    # The final state, at step L-1 (inside the last chunk when L is padded).
    last = (length - 1) % chunk
    v_last = vc[:, -1]  # [N, T, Q]
    row = jnp.arange(chunk)[:, None] <= last
    kz_row = jnp.where(row, jnp.roll(kz[::-1], last + 1, axis=0), 0.0)  # K_{last - r}
    ky_row = jnp.where(row, jnp.roll(ky[::-1], last + 1, axis=0), 0.0)
    z_end = (
        jnp.einsum("rq,nrq->nq", kz_row, v_last, precision=_PRECISION)
        + p11[last + 1] * h_z[:, -1, 0]
        + p12[last + 1] * h_y[:, -1, 0]
    )
    y_end = (
        jnp.einsum("rq,nrq->nq", ky_row, v_last, precision=_PRECISION)
        + p21[last + 1] * h_z[:, -1, 0]
        + p22[last + 1] * h_y[:, -1, 0]
    )
    if not pre:
        ys = _within(_toeplitz(ky, 0), vc) + p21[1:] * h_z + p22[1:] * h_y
        return flat(ys), (z_end, y_end)
    zs = _within(_toeplitz(kz, 1), vc) + p11[:chunk] * h_z + p12[:chunk] * h_y
    ys = _within(_toeplitz(ky, 1), vc) + p21[:chunk] * h_z + p22[:chunk] * h_y
    return (flat(zs), flat(ys)), (z_end, y_end)


def _forward(coeffs, v, z0, y0, flags):
    del flags
    chunk = chunk_length(v.shape[1])
    ys, (z_end, _) = _solve(coeffs[:4], coeffs[4:], v, z0, y0, chunk, pre=False)
    return ys, z_end, None


def _backward(res, cts):
    coeffs, v, z0, y0, _, _, _ = res
    g_ys, g_zl = cts
    g_ys = g_ys.astype(v.dtype)
    _, _, m21, m22, f1, f2 = coeffs
    chunk = chunk_length(v.shape[1])
    # rho_{t-1} = M^T (rho_t + e_y g_t) is x = M^T x + (M^T e_y) g in reversed time, from
    # rho_{L-1} = (g_zL, 0); its states before each step are rho_t, its final state dx0.
    (rz, ry), (g_z0, g_y0) = _solve(
        transpose2(coeffs[:4]),
        (m21, m22),
        g_ys[:, ::-1],
        g_zl.astype(v.dtype),
        jnp.zeros_like(z0),
        chunk,
        pre=True,
    )
    lz, ly = rz[:, ::-1], ry[:, ::-1] + g_ys
    (z_prev, y_prev), _ = _solve(coeffs[:4], coeffs[4:], v, z0, y0, chunk, pre=True)
    g_coeffs = coefficient_grads(lz, ly, z_prev, y_prev, v)
    return g_coeffs, f1 * lz + f2 * ly, g_z0, g_y0


_recurrence = with_adjoint(_forward, _backward)


def run(tr, v, z0, y0, flags: Flags | None):
    """``(ys [N, L, Q], z_L [N, Q], y_L [N, Q])`` for ``v [N, L, Q]``, ``z0, y0 [N, Q]``."""
    if flags is not None:
        raise ValueError("scan='chunked' takes no mask or segment_ids (no per-step flags).")
    if is_time_varying(tr):
        raise ValueError("scan='chunked' is time-invariant: it takes no `dt` with a time axis.")
    return run_custom(_recurrence, tr, v, z0, y0, None)


def free_response(tr, z0, y0, length: int, *, time_major: bool = False):
    """The positions of the unforced system from the state ``(z0, y0)``, each ``[N, Q]``.

    ``(M^(t+1) x0)_y`` for ``t < L`` in closed form: ``M^(cT)`` per chunk (log-doubling over
    the ``C`` chunks) times ``M^(s+1)`` within a chunk, so no ``[L, Q]`` power table.
    Differentiable by autodiff (used by the sequence-parallel combination).

    Returns:
      ``[N, L, Q]``, or ``[L, N, Q]`` with ``time_major``.
    """
    n, q = z0.shape
    chunk = chunk_length(length)
    chunks = -(-length // chunk)
    p11, p12, p21, p22 = powers(tuple(tr)[:4], chunk + 1)
    c11, c12, c21, c22 = powers((p11[chunk], p12[chunk], p21[chunk], p22[chunk]), chunks)
    h_z = c11[:, None] * z0 + c12[:, None] * y0  # [C, N, Q]: the state before chunk c
    h_y = c21[:, None] * z0 + c22[:, None] * y0
    if time_major:  # [C, T, N, Q]
        ys = p21[1:, None] * h_z[:, None] + p22[1:, None] * h_y[:, None]
        return ys.reshape(chunks * chunk, n, q)[:length]
    h_z, h_y = jnp.moveaxis(h_z, 0, 1)[:, :, None], jnp.moveaxis(h_y, 0, 1)[:, :, None]
    ys = p21[1:] * h_z + p22[1:] * h_y  # [N, C, T, Q]
    return ys.reshape(n, chunks * chunk, q)[:, :length]
