"""The layer's two projections, in the layout the chosen scan path streams.

Because ``M`` and ``f`` are real (and the same for both parts, per step if ``dt`` varies),
the complex state of each oscillator splits into two real 2-vectors driven by ``Re(Bu)`` and
``Im(Bu)``. The recurrence therefore runs on ``Q = 2P`` real channels (no complex dtypes,
which TPUs support poorly), and the output ``Re(C y)`` becomes one real matmul with
``[Re(C), -Im(C)]``.

Layouts (see :class:`flax_linoss.ops.table.ScanPath`): ``"nlq"`` is ``[N, L, Q]``, the
projection's natural output; ``"lnq"`` is time-major ``[L, N, Q]``, where one time step of
every channel is contiguous (a whole ``(8, 128)`` tile for the TPU kernel). The time-major
layout is produced and consumed inside the projection einsums, where XLA folds the
transposition into the matmul's output (input) layout instead of copying ``[N, L, Q]``.
Paths may also ask for extra zero channels (``Q' >= Q``): zero columns of ``B`` and zero rows
of ``C`` make them for free.

Legend: ``N`` rows (flattened batch), ``L`` length, ``H`` features, ``P`` oscillators.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flax_linoss.ops import schemes

NLQ = "nlq"
LNQ = "lnq"


def _split_complex(x) -> tuple[jnp.ndarray, jnp.ndarray]:
    if jnp.iscomplexobj(x):
        return jnp.real(x), jnp.imag(x)
    return x[..., 0], x[..., 1]


def input_weights(b, channels: int | None = None) -> jnp.ndarray:
    """``[H, Q']`` with ``u @ W = [Re(Bu) | Im(Bu) | 0]`` for ``b`` complex ``[P, H]``."""
    b_re, b_im = _split_complex(b)
    w = jnp.concatenate([b_re, b_im], axis=0).T
    return _pad_axis(w, 1, channels)


def output_weights(c, channels: int | None = None) -> jnp.ndarray:
    """``[Q', H]`` with ``[y_re | y_im | *] @ W = Re(C y)`` for ``c`` complex ``[H, P]``."""
    c_re, c_im = _split_complex(c)
    w = jnp.concatenate([c_re, -c_im], axis=1).T
    return _pad_axis(w, 0, channels)


def _pad_axis(x, axis: int, size: int | None):
    if size is None or size == x.shape[axis]:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def pad_channels(x, channels: int):
    """Zero-pads the last axis of ``x`` to ``channels``."""
    return _pad_axis(x, x.ndim - 1, channels)


def recurrence_dtype(*params) -> jnp.dtype:
    """float32, or float64 when the oscillator parameters are float64."""
    return jnp.promote_types(jnp.float32, jnp.result_type(*[p for p in params if p is not None]))


def real_transition(a, dt, g, discretization: str):
    """The transition on the ``Q = 2P`` real channels, in the recurrence dtype."""
    rdt = recurrence_dtype(a, dt, g)
    g = None if g is None else g.astype(rdt)
    return schemes.transition(a.astype(rdt), dt.astype(rdt), discretization, g).tile(2), rdt


def _rows(x):
    """``[..., F] -> [M, F]``. The ``nlq`` projections run as 2-D matmuls: XLA's CPU backend
    then uses the operands as they are in the backward pass, where with batch dimensions it
    first copies large transposes (measured: ~20% of the projections' cost)."""
    return x.reshape(-1, x.shape[-1])


def _cpu_safe(x, w, rdt):
    """XLA's CPU runtime has no bfloat16 x bfloat16 -> float32 3-D dot: there (only the Pallas
    interpreter uses this layout on CPU) upcast first, which gives the same exact products."""
    if jax.default_backend() == "cpu" and x.dtype != rdt:
        return x.astype(rdt), w.astype(rdt)
    return x, w


def project_in(u, b, rdt, layout: str = NLQ, channels: int | None = None):
    """``u [..., L, H]`` (``[N, L, H]`` for ``lnq``) -> ``[Re(Bu) | Im(Bu)]`` in ``layout``.

    In ``u``'s dtype, accumulated in ``rdt``.
    """
    w = input_weights(b, channels).astype(u.dtype)
    if layout == LNQ:
        u, w = _cpu_safe(u, w, rdt)
        return jnp.einsum("nlh,hq->lnq", u, w, preferred_element_type=rdt)
    v = jnp.matmul(_rows(u), w, preferred_element_type=rdt)
    return v.reshape(*u.shape[:-1], w.shape[1])


def project_out(
    ys, c, d, u, rdt, layout: str = NLQ, channels: int | None = None, oscillator_axis=None
):
    """``Re(C y) + d * u`` in ``u``'s dtype; ``ys`` in ``layout``, ``u [..., H]``.

    ``oscillator_axis``: the mesh axis the oscillators are split over (inside ``shard_map``):
    ``Re(C y)`` is then this device's part of the sum over ``P``, added up across the axis.
    """
    w = output_weights(c, channels).astype(u.dtype)
    if layout == LNQ:
        y, w_ = _cpu_safe(ys.astype(u.dtype), w, rdt)
        out = jnp.einsum("lnq,qh->nlh", y, w_, preferred_element_type=rdt)
    else:
        out = jnp.matmul(_rows(ys.astype(u.dtype)), w, preferred_element_type=rdt)
    if oscillator_axis is not None:
        out = jax.lax.psum(out, oscillator_axis)
    return (out.reshape(u.shape) + d.astype(rdt) * u).astype(u.dtype)
