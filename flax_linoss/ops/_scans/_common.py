"""What every scan path shares: the step, the per-step flags, the custom-VJP builder, powers.

Every path solves the same problem on ``Q`` real channels (see :mod:`flax_linoss.ops.schemes`)::

    x_t = k_t A_t x_{t-1} + (1 - h_t) f v_t,    A_t = h_t I + (1 - h_t) M,    x_{-1} = x0

with ``x = (z, y)``, a 2x2 ``M`` and 2-vector ``f`` per channel, either time-invariant (each
coefficient ``[Q]``) or given per step (``M_t``, ``f_t``: each coefficient ``[N, L, Q]`` in the
path's layout, see :func:`is_time_varying`), and two optional per-step flags per sequence:
``h_t`` *hold* (a masked step leaves the state as it is) and ``k_t = 1 - reset_t`` (a packed
segment starts: the state restarts from zero before the step). Without flags this is
``x_t = M x_{t-1} + f v_t``.

The exact adjoint (reverse-mode) recurrence, with ``g_t`` the cotangent of ``y_t`` and
``g_zL`` that of the final velocity, is::

    lambda_t = rho_t + e_y g_t,    rho_{L-1} = (g_zL, 0),
    rho_{t-1} = k_t A_t^T lambda_t,
    dv_t = (1 - h_t) f . lambda_t,    dM += (1 - h_t) lambda_t (k_t x_{t-1})^T,
    df += (1 - h_t) lambda_t v_t,     dx0 = rho_{-1}.

With per-step coefficients ``M_t``, ``f_t`` replace ``M``, ``f`` at step ``t``, and the sums
``dM``, ``df`` are not taken: each step's term is the gradient of that step's coefficients
(from which autodiff of the scheme gives the gradient of every ``dt[t]``).

Legend: ``N`` rows (flattened batch), ``L`` length, ``Q`` real channels.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from flax_linoss.ops import schemes
from flax_linoss.ops._scans import _compensated as _cp


class Flags(NamedTuple):
    """Per-step flags, each ``[N, L]`` bool or ``None`` (absent = all ``False``).

    Attributes:
      hold: the step is masked: the state is left unchanged (the forcing is ignored).
      reset: a segment starts here: the state restarts from zero before the step.
    """

    hold: jnp.ndarray | None
    reset: jnp.ndarray | None

    @staticmethod
    def of(hold, reset) -> Flags | None:
        """``Flags(hold, reset)``, or ``None`` when both are absent."""
        if hold is None and reset is None:
            return None
        return Flags(hold, reset)

    @staticmethod
    def of_valid(valid, starts) -> Flags | None:
        """The flags of a validity mask ``valid`` (``True`` = a step; a masked step holds)
        and the segment starts ``starts`` (either ``None``)."""
        hold = None if valid is None else jnp.logical_not(valid.astype(bool))
        return Flags.of(hold, starts)

    def code(self, shape) -> jnp.ndarray:
        """``[N, L]`` int32 ``hold + 2 * reset``: the one array the kernels read."""
        code = jnp.zeros(shape, jnp.int32)
        if self.hold is not None:
            code = code + self.hold.astype(jnp.int32)
        if self.reset is not None:
            code = code + 2 * self.reset.astype(jnp.int32)
        return code


HOLD, RESET = 1, 2  # bits of Flags.code


def is_time_varying(coeffs) -> bool:
    """Whether coefficients (a ``Transition`` or its tuple) are per step (``[N, L, Q]`` or
    time-major ``[L, N, Q]``) rather than time-invariant (``[Q]``)."""
    return jnp.ndim(coeffs[0]) > 1


def coefficients_at(coeffs, t, axis: int = 1) -> tuple:
    """The coefficients of step ``t``: the ``[N, Q]`` slices of per-step coefficients
    (time on ``axis``), or time-invariant ``[Q]`` coefficients as they are."""
    if not is_time_varying(coeffs):
        return tuple(coeffs)
    return tuple(jax.lax.dynamic_index_in_dim(c, t, axis, keepdims=False) for c in coeffs)


def resets_from_segments(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """``[N, L]`` bool: the state restarts from zero before step t (the id changed)."""
    first = jnp.zeros_like(segment_ids[:, :1], dtype=bool)
    return jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def fold_flags(tr, hold=None, reset=None) -> schemes.Transition:
    """Per-step coefficients ``tr`` with the flags folded in (each broadcast against the
    fields): a held step is the identity with no forcing, a segment start drops the state
    before it (a zero transition; held too, the state is then zero)."""
    fields = list(tr)
    if hold is not None:
        fills = (1.0, 0.0, 0.0, 1.0, 0.0, 0.0)
        fields = [jnp.where(hold, jnp.asarray(f, x.dtype), x) for x, f in zip(fields, fills)]
    if reset is not None:
        fields[:4] = [jnp.where(reset, jnp.zeros((), x.dtype), x) for x in fields[:4]]
    return schemes.Transition(*fields)


def recurrence_step(tr: schemes.Transition, z, y, v):
    """One step of the 2x2 update; shared by the sequential scan and ``linoss_step``."""
    z_new = tr.m11 * z + tr.m12 * y + tr.f1 * v
    y_new = tr.m21 * z + tr.m22 * y + tr.f2 * v
    return z_new, y_new


def coefficient_grads(lz, ly, z_prev, y_prev, v):
    """Gradients of the six coefficients ``(m11, m12, m21, m22, f1, f2)`` from the adjoint
    states ``lz, ly`` and the states before each step, all ``[N, L, P]``, summed over
    batch and time; shared by the associative and chunked backward passes."""
    total = lambda x: jnp.sum(x, axis=(0, 1))
    return (
        total(lz * z_prev),
        total(lz * y_prev),
        total(ly * z_prev),
        total(ly * y_prev),
        total(lz * v),
        total(ly * v),
    )


def coded_step(m, z, y, v, code):
    """One step of the 2x2 update inside a kernel, with per-step flag bits ``code`` (or
    ``None``): ``RESET`` zeroes the state before the step, ``HOLD`` keeps the (reset) state.
    ``m`` is the six coefficients ``(m11, m12, m21, m22, f1, f2)``; the two Pallas kernels
    share it."""
    m11, m12, m21, m22, f1, f2 = m
    if code is not None:
        keep = (code & RESET) == 0
        z, y = jnp.where(keep, z, 0.0), jnp.where(keep, y, 0.0)
    zn = m11 * z + m12 * y + f1 * v
    yn = m21 * z + m22 * y + f2 * v
    if code is not None:
        hold = (code & HOLD) != 0
        zn, yn = jnp.where(hold, z, zn), jnp.where(hold, y, yn)
    return zn, yn


def named_kernel(body, names):
    """A Pallas kernel that hands its refs to ``body`` by name.

    ``pallas_call`` passes the refs positionally (inputs, outputs, scratch); ``names`` lists
    them in that order, so the kernel body reads ``body(v=..., ys=..., carry=...)`` rather
    than unpacking by offset. Optional inputs are simply left out of ``names`` and default
    to ``None`` in ``body``.
    """

    def kernel(*refs):
        return body(**dict(zip(names, refs, strict=True)))

    return kernel


def typed_vjp(forward, backward):
    """A custom-VJP function ``f(*args, flags) -> outputs`` whose last argument (integer or
    boolean flags, or ``None``) gets no cotangent.

    Args:
      forward: ``(*args, flags) -> (outputs, aux)``; ``aux`` is what the backward pass needs
        besides the arguments (e.g. every velocity, or a kernel's checkpoints).
      backward: ``(((*args, flags), aux), cotangents of outputs) -> the gradients of args``
        (a tuple shaped like ``args``).

    Inside ``shard_map`` the outputs and gradients are typed over the manual axes like the
    arrays they come from (see :func:`match_vma`), which custom calls do not do by
    themselves.
    """

    def fwd(*args):
        outputs, aux = forward(*args)
        axes = varying_axes(*args[:-1])
        return jax.tree.map(lambda x: vary(x, axes), outputs), (args, aux)

    @jax.custom_vjp
    def f(*args):
        return fwd(*args)[0]

    def bwd(res, cts):
        args = res[0]
        axes = varying_axes(*args[:-1], cts)
        grads = tuple(backward(res, cts))
        return (*jax.tree.map(lambda g, x: match_vma(g, x, axes), grads, args[:-1]), None)

    f.defvjp(fwd, bwd)
    return f


def with_adjoint(forward, backward):
    """A custom-VJP recurrence ``(coeffs, v, z0, y0, flags) -> (ys, z_L)`` (by
    :func:`typed_vjp`).

    Args:
      forward: ``(coeffs, v, z0, y0, flags) -> (ys, z_L, aux)``; ``coeffs`` is the
        :class:`~flax_linoss.ops.schemes.Transition` as a tuple of ``[Q]`` arrays.
      backward: ``(residuals, (g_ys, g_zL)) -> (g_coeffs, g_v, g_z0, g_y0)`` with
        residuals ``(coeffs, v, z0, y0, flags, ys, aux)`` (``aux``: whatever the forward
        pass keeps, e.g. every velocity or a kernel's checkpoints).
    """

    def fwd(*args):
        ys, z_l, aux = forward(*args)
        return (ys, z_l), (ys, aux)

    def bwd(res, cts):
        args, (ys, aux) = res
        return backward((*args, ys, aux), cts)

    return typed_vjp(fwd, bwd)


# ----------------------------------------------------------------------------------------
# Typing over shard_map's manual axes (check_vma). A custom call's outputs vary over no
# axis, whatever its inputs; these helpers give them the type of the data they hold.


def _vma(x) -> frozenset:
    typeof = getattr(jax, "typeof", None)
    if typeof is None:
        return frozenset()
    aval = typeof(x)
    mat = getattr(aval, "mat", None)  # jax >= 0.9: aval.mat.varying; before: aval.vma
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def varying_axes(*trees) -> frozenset:
    """The manual mesh axes any array in ``trees`` varies over."""
    axes = frozenset()
    for x in jax.tree.leaves(trees):
        axes |= _vma(x)
    return axes


def vary(x, axes):
    """``x`` typed as varying over ``axes`` as well."""
    missing = set(axes) - _vma(x)
    if not missing:
        return x
    names = jax.sharding.get_abstract_mesh().axis_names
    missing = tuple(a for a in names if a in missing) or tuple(sorted(missing))
    # An exact no-op that carries the type, with public APIs only (jax.lax.pcast would be
    # cheaper but is skipped inside backward passes).
    zero = sum(jax.lax.axis_index(a) for a in missing) * 0
    return x + zero.astype(x.dtype)


def out_struct(shape, dtype, axes) -> jax.ShapeDtypeStruct:
    """A kernel's output type, varying over the manual mesh axes ``axes`` (``shard_map``)."""
    manual = getattr(jax.sharding, "ManualAxisType", None)
    if manual is not None:
        try:
            return jax.ShapeDtypeStruct(
                shape, dtype, manual_axis_type=manual(varying=frozenset(axes))
            )
        except TypeError:  # pragma: no cover - JAX versions without the argument
            pass
    return jax.ShapeDtypeStruct(shape, dtype)


def match_vma(grad, primal, axes):
    """A gradient typed like its ``primal`` input over ``shard_map``'s manual axes.

    ``grad`` first gets the type of what it was computed from (``axes``: the axes the
    inputs and cotangents vary over). Where it varies but its input is replicated over an
    axis (the same parameters used by every shard), it is summed over that axis, the total
    derivative; where its input varies, it is typed as varying.
    """
    grad = vary(grad, axes)
    extra = tuple(sorted(_vma(grad) - _vma(primal)))
    if extra:
        grad = jax.lax.psum(grad, extra)
    return vary(grad, _vma(primal))


def run_custom(recurrence, tr: schemes.Transition, v, z0, y0, flags):
    """``(ys, z_L, y_L)`` from a :func:`with_adjoint` recurrence (``y_L`` is ``ys[:, -1]``)."""
    ys, z_l = recurrence(tuple(tr), v, z0, y0, flags)
    return ys, z_l, ys[:, -1]


def flags_at(flags: Flags | None, t, dtype):
    """``(hold, keep)`` at step ``t``: ``[N, 1]`` bool and ``[N, 1]`` 0/1 in ``dtype``.

    Either is ``None`` when that flag is absent.
    """
    if flags is None:
        return None, None
    hold = keep = None
    if flags.hold is not None:
        hold = jax.lax.dynamic_index_in_dim(flags.hold, t, 1, keepdims=True)
    if flags.reset is not None:
        reset = jax.lax.dynamic_index_in_dim(flags.reset, t, 1, keepdims=True)
        keep = jnp.logical_not(reset).astype(dtype)
    return hold, keep


# ----------------------------------------------------------------------------------------
# Powers of the 2x2 blocks, by log-doubling (never an n-step loop).


def matmul2(a, b):
    """The 2x2 product ``a b`` of ``(11, 12, 21, 22)`` coefficient tuples (broadcasting)."""
    return (
        a[0] * b[0] + a[1] * b[2],
        a[0] * b[1] + a[1] * b[3],
        a[2] * b[0] + a[3] * b[2],
        a[2] * b[1] + a[3] * b[3],
    )


def powers(m, n: int):
    """``m^j`` for ``j = 0 .. n-1``: a tuple of four ``[n, Q]`` arrays (11, 12, 21, 22).

    Log-doubling (``ceil(log2 n)`` batched 2x2 products in one loop, a small program
    whatever ``n``), in double-word arithmetic rounded once (see :mod:`._compensated`).
    """
    return _cp.powers(m, n)


def power(m, n: int):
    """``m^n`` (a tuple of four ``[Q]`` arrays) by binary exponentiation, in double-word
    arithmetic rounded once (see :mod:`._compensated`)."""
    return _cp.power(m, n)


def affine_reduce(tr, v, axis: int):
    """The map of a whole stretch of steps: ``x_end = T x_start + e``.

    ``T = M_{L-1} ... M_0`` (the product of the per-step transitions) and ``e`` the end state
    from a zero start, by a tree of pairwise products over the time ``axis`` (``ceil(log2
    L)`` levels of 2x2 products on halving arrays: ``O(L)`` work, differentiable by
    autodiff).

    Args:
      tr: per-step coefficients, each shaped like ``v``.
      v: the forcing, ``[N, L, Q]`` (``axis=1``) or ``[L, N, Q]`` (``axis=0``).
      axis: the time axis.

    Returns:
      ``(T, e)``: four and two ``[N, Q]`` arrays.
    """
    m = tuple(tr)[:4]
    b = (tr.f1 * v, tr.f2 * v)

    def take(x, start):
        return jax.lax.slice_in_dim(x, start, None, 2, axis)

    def pad(x, fill):
        step = jnp.full_like(jax.lax.slice_in_dim(x, 0, 1, axis=axis), fill)
        return jnp.concatenate([x, step], axis)

    while m[0].shape[axis] > 1:
        if m[0].shape[axis] % 2:  # an identity step with no forcing at the end
            m = tuple(pad(x, fill) for x, fill in zip(m, (1.0, 0.0, 0.0, 1.0)))
            b = tuple(pad(x, 0.0) for x in b)
        first, second = tuple(take(x, 0) for x in m), tuple(take(x, 1) for x in m)
        b_first, b_second = tuple(take(x, 0) for x in b), tuple(take(x, 1) for x in b)
        b = (
            second[0] * b_first[0] + second[1] * b_first[1] + b_second[0],
            second[2] * b_first[0] + second[3] * b_first[1] + b_second[1],
        )
        m = matmul2(second, first)
    squeeze = lambda x: jnp.squeeze(x, axis)
    return tuple(map(squeeze, m)), tuple(map(squeeze, b))


def transpose2(m):
    """The transposed 2x2 blocks."""
    return (m[0], m[2], m[1], m[3])


def prefix_scan(m, b1, b2):
    """Parallel prefix scan of ``x_k = M x_{k-1} + b_k`` (``x_{-1} = 0``), Hillis-Steele form.

    After level ``i`` every ``x_k`` holds ``sum_{j < 2^(i+1)} M^j b_{k-j}``; the combine is
    the associative ``(M, b)`` product with ``M`` time-invariant, so each level needs only
    ``M^(2^i)`` (``[Q]`` coefficients) and one shift of the sequence. ``ceil(log2 L)``
    levels run in a ``fori_loop``, so the program is small whatever ``L``. The squarings
    run in double-word arithmetic (see :mod:`._compensated`): each level applies
    ``M^(2^i)`` to within one rounding.

    Args:
      m: ``(m11, m12, m21, m22)``, each ``[Q]``.
      b1, b2: ``[N, L, Q]`` forcing of the two state components.

    Returns:
      ``(x1, x2)``, each ``[N, L, Q]``.
    """
    length = b1.shape[1]
    position = jnp.arange(length)[None, :, None]

    def level(i, carry):
        x1, x2, *parts = carry
        p = _cp.unflatten(parts)
        p11, p12, p21, p22 = _cp.rounded(p)
        shift = jnp.left_shift(1, i)

        def shifted(x):
            return jnp.where(position >= shift, jnp.roll(x, shift, axis=1), 0.0)

        s1, s2 = shifted(x1), shifted(x2)
        x1, x2 = x1 + p11 * s1 + p12 * s2, x2 + p21 * s1 + p22 * s2
        return (x1, x2, *_cp.flatten(_cp.matmul2(p, p)))

    levels = max(0, (length - 1).bit_length())
    x1, x2, *_ = jax.lax.fori_loop(0, levels, level, (b1, b2, *_cp.flatten(_cp.exact(m))))
    return x1, x2
