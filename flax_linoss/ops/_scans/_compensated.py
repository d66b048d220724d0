"""Compensated (double-word) 2x2 products, for the powers ``M^j`` of the parallel paths.

The parallel paths (``associative``, ``chunked``, the sequence-parallel combination, the GPU
kernel's carries) apply powers ``M^(2^k)`` or tables ``M^j`` built by repeated squaring. In
plain float32 each squaring doubles the relative error it inherits: the computed
``M^(2^k)`` is the power of a transition whose phase is off by about ``2^k eps``, so the
parallel paths drift from the loop linearly in ``L`` (measured on LinOSS-IMEX at
``a dt^2 = 3.96``: 3x the loop's error at ``L = 10^5``, 7x at ``10^6``; see
``benchmarks/RESULTS.md``), and near a double eigenvalue the computed power's spectral
radius can pass 1 (an overflow at ``L = 10^5`` where the loop stays finite). Here every
power is computed in double-word arithmetic (each number a float pair ``hi + lo``, about
48 significant bits for float32) and only the finished power is rounded to the working
precision, so each power the scans apply is the float32 transition's exact power to within
one rounding, whatever ``L``. The arrays involved are per channel (``[Q]`` or
``[T + 1, Q]``): the extra work is negligible against the ``[N, L, Q]`` streams.

Robust to compilers: XLA contracts ``a * b + c`` into a fused multiply-add (on CPU it does,
and it duplicates a product into each consumer), which breaks the textbook error-free
product (``p = a*b`` then ``a*b - p``). So numbers are split by masking significand bits
(no arithmetic), every product that feeds a sum is exact (halves of at most 12 bits for
float32), and the only inexact products go into the low-order part, where a contraction
changes nothing that matters.

A 2x2 matrix is a tuple ``(11, 12, 21, 22)``; a double-word matrix is a tuple of four
``(hi, lo)`` pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Bits of the significand kept in the high half of a split: products of halves are then
# exact (float32: 12 + 12 <= 24 bits; float64: the lo x lo product rounds, at 2^-104).
_SPLIT = {
    jnp.dtype(jnp.float32): (jnp.uint32, np.uint32(0xFFFFF000)),
    jnp.dtype(jnp.float64): (jnp.uint64, np.uint64(0xFFFFFFFFF8000000)),
}


def _split(a):
    """``(hi, lo)`` with ``hi + lo == a`` exactly, each with half the significand."""
    utype, mask = _SPLIT[jnp.dtype(a.dtype)]
    hi = jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(a, utype) & jnp.asarray(mask, utype), a.dtype
    )
    return hi, a - hi


def _two_sum(a, b):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _fast_two_sum(a, b):
    s = a + b
    return s, b - (s - a)


def _two_prod(a, b):
    """``(p, e)`` with ``p + e == a * b`` to about ``2^-48`` relative (float32)."""
    ah, al = _split(a)
    bh, bl = _split(b)
    p, e1 = _two_sum(ah * bh, ah * bl)
    p, e2 = _two_sum(p, al * bh)
    return p, e1 + e2 + al * bl


def _mul(x, y):
    p, e = _two_prod(x[0], y[0])
    return _fast_two_sum(p, e + (x[0] * y[1] + x[1] * y[0]))


def _add(x, y):
    s, e = _two_sum(x[0], y[0])
    return _fast_two_sum(s, e + (x[1] + y[1]))


def exact(m):
    """A working-precision 2x2 matrix as a double-word one (zero low parts)."""
    return tuple((x, jnp.zeros_like(x)) for x in m)


def rounded(m):
    """A double-word 2x2 matrix rounded to the working precision (its high parts)."""
    return tuple(x[0] for x in m)


def matmul2(a, b):
    """The double-word 2x2 product ``a b`` (broadcasting)."""
    return (
        _add(_mul(a[0], b[0]), _mul(a[1], b[2])),
        _add(_mul(a[0], b[1]), _mul(a[1], b[3])),
        _add(_mul(a[2], b[0]), _mul(a[3], b[2])),
        _add(_mul(a[2], b[1]), _mul(a[3], b[3])),
    )


def flatten(m):
    """A double-word matrix as a flat tuple of eight arrays (for loop carries)."""
    return tuple(part for pair in m for part in pair)


def unflatten(parts):
    """The inverse of :func:`flatten`."""
    return tuple((parts[2 * i], parts[2 * i + 1]) for i in range(4))


def _identity(like):
    one, zero = jnp.ones_like(like), jnp.zeros_like(like)
    return exact((one, zero, zero, one))


def power(m, n: int):
    """``m^n`` (four arrays shaped like ``m``'s) by binary exponentiation, rounded once.

    One ``fori_loop`` over the bits of ``n`` (a small program whatever ``n``).
    """
    if n == 0:
        return rounded(_identity(m[0]))
    bits = jnp.asarray([(n >> i) & 1 for i in range(n.bit_length())], bool)

    def body(i, carry):
        result, base = unflatten(carry[:8]), unflatten(carry[8:])
        taken = matmul2(base, result)
        result = jax.tree.map(lambda t, r: jnp.where(bits[i], t, r), taken, result)
        return (*flatten(result), *flatten(matmul2(base, base)))

    init = (*flatten(_identity(m[0])), *flatten(exact(m)))
    out = jax.lax.fori_loop(0, n.bit_length(), body, init)
    return rounded(unflatten(out[:8]))


def powers(m, n: int):
    """``m^j`` for ``j = 0 .. n-1`` (four ``[n, *shape]`` arrays), each rounded once.

    Log-doubling in one ``fori_loop``: at level ``i`` the rows ``j`` in ``[2^i, 2^(i+1))``
    become ``m^(2^i) m^(j - 2^i)``.
    """
    rows = jnp.arange(n).reshape((n,) + (1,) * jnp.ndim(m[0]))
    table = tuple(
        (jnp.broadcast_to(x, (n, *jnp.shape(x))), jnp.broadcast_to(y, (n, *jnp.shape(y))))
        for x, y in _identity(m[0])
    )

    def body(i, carry):
        table, base = unflatten(carry[:8]), unflatten(carry[8:])
        shift = jnp.left_shift(1, i)
        moved = tuple((jnp.roll(x, shift, 0), jnp.roll(y, shift, 0)) for x, y in table)
        new = matmul2(tuple((x[None], y[None]) for x, y in base), moved)
        grow = (rows >= shift) & (rows < 2 * shift)
        table = jax.tree.map(lambda t, r: jnp.where(grow, t, r), new, table)
        return (*flatten(table), *flatten(matmul2(base, base)))

    levels = max(0, (n - 1).bit_length())
    out = jax.lax.fori_loop(0, levels, body, (*flatten(table), *flatten(exact(m))))
    return rounded(unflatten(out[:8]))
