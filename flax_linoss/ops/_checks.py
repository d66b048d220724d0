"""Validation of what crosses the ``ops`` boundary, done once, with messages that say what to fix.

``check`` in :func:`flax_linoss.ops.linoss_apply` / ``linoss_step`` is one of

* ``True``: shapes, dtypes and, where the parameters are concrete (not traced), their values
  (this copies ``a``, ``dt``, ``g`` to the host);
* ``"shapes"``: shapes and dtypes only (no host copy; what layers that validated their
  options at construction pass on every call);
* ``False``: nothing.

A float ``mask`` is read as ``mask != 0`` (valid where non-zero). Where it is concrete (not
traced), at either level, it is also read once on the host and a NaN in it is refused (it
would count as valid); traced (under ``jit``), a NaN counts as valid, like any non-zero.
Boolean and integer masks are never read.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flax_linoss.ops import schemes

SHAPES = "shapes"


def check_levels(check) -> tuple[bool, bool]:
    """``(shapes, values)`` for a ``check`` argument; raises on anything else."""
    if check is True:
        return True, True
    if check is False or check is None:
        return False, False
    if isinstance(check, str) and check == SHAPES:
        return True, False
    raise ValueError(f"check must be True, 'shapes' or False, got {check!r}.")


def _concrete(x) -> np.ndarray | None:
    """``x`` as numpy if its value is known now (not traced), else ``None``."""
    if x is None or isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def _real_floating(x, name: str, what: str) -> None:
    """Raises ``TypeError`` unless ``x`` is a real floating array."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"`{name}` must be a real floating array ({what}), got dtype {dtype}.")


def _complex_shape(x, name: str, shape: tuple[int, ...], origin: str) -> None:
    xs = tuple(np.shape(x))
    ok = xs == shape if jnp.iscomplexobj(x) else xs == (*shape, 2)
    if not ok:
        raise ValueError(
            f"`{name}` must be complex {list(shape)} or real (re, im) pairs {[*shape, 2]} "
            f"({origin}), got shape {list(xs)} ({jnp.result_type(x)})."
        )


def _features_from_b(b, num_osc: int) -> int:
    """``H`` from ``b`` (complex ``[P, H]`` or real ``[P, H, 2]``), checking ``b`` itself."""
    shape = tuple(np.shape(b))
    if jnp.iscomplexobj(b):
        ok = len(shape) == 2 and shape[0] == num_osc
    else:
        ok = len(shape) == 3 and shape[0] == num_osc and shape[2] == 2
    if not ok:
        raise ValueError(
            f"`b` must be complex [P, H] or real (re, im) pairs [P, H, 2] with P = {num_osc} "
            f"(from `a`), got shape {list(shape)} ({jnp.result_type(b)})."
        )
    return shape[1]


def time_varying(dt) -> bool:
    """Whether ``dt`` has more axes than ``[P]``: a step size per step (``linoss_apply``) or
    per example (``linoss_step``)."""
    return np.ndim(dt) > 1


def _check_dt(dt, num_osc: int, u_shape: tuple[int, ...], step: bool) -> None:
    shape = tuple(np.shape(dt))
    if len(shape) == 1 and shape == (num_osc,):
        return
    lead = u_shape[:-2]
    want = (*lead, num_osc) if step else (*lead, u_shape[-2], num_osc)
    form = "[..., P]" if step else "[..., L, P]"
    if len(shape) >= 2 and shape[-1] == num_osc and broadcasts_to(shape, want):
        return
    raise ValueError(
        f"`dt` must have shape [P] = [{num_osc}] (P from `a`) or, varying, {form} "
        f"broadcasting to {list(want)} (the input's batch"
        f"{'' if step else ' and length'}), got {list(shape)}."
    )


def check_inputs(
    u, a, dt, b, c, d, g, discretization: str, *, values: bool = True, step: bool = False
) -> None:
    """Raises a clear ``ValueError``/``TypeError`` for malformed inputs to ``linoss_apply``.

    Args:
      u: ``[..., L, H]`` (``[..., 1, H]`` for one step).
      a, dt, b, c, d, g, discretization: as in ``linoss_apply``.
      values: also check the values of concrete ``a``, ``dt``, ``g`` (a host copy).
      step: ``linoss_step``'s form: a varying ``dt`` is ``[..., P]`` (per example), not
        ``[..., L, P]``.
    """
    schemes.check_discretization(discretization)
    if np.ndim(u) < 2:
        raise ValueError(f"`u` must have shape [..., length, features], got shape {np.shape(u)}.")
    if np.shape(u)[-2] == 0:
        raise ValueError(f"`u` has length 0 (shape {np.shape(u)}); it needs at least one step.")
    if not jnp.issubdtype(jnp.result_type(u), jnp.floating):
        raise TypeError(f"`u` must be a real floating array, got dtype {jnp.result_type(u)}.")
    if np.ndim(a) != 1:
        raise ValueError(f"`a` must have shape [P], got {np.shape(a)}.")
    for name, x in (("a", a), ("dt", dt), ("g", g)):
        if x is not None:
            _real_floating(x, name, "an oscillator parameter")
    num_osc = np.shape(a)[0]
    if num_osc == 0:
        raise ValueError("`a` has shape (0,): the layer has no oscillators (P = 0); use P >= 1.")
    _check_dt(dt, num_osc, tuple(np.shape(u)), step)
    if g is not None and tuple(np.shape(g)) != (num_osc,):
        raise ValueError(f"`g` must have shape [P] = [{num_osc}] (P from `a`), got {np.shape(g)}.")
    if discretization == schemes.DAMPED and g is None:
        raise ValueError("discretization='damped' (D-LinOSS) needs the damping `g` [P].")
    if discretization != schemes.DAMPED and g is not None:
        raise ValueError(f"`g` (damping) is only used by 'damped', not by {discretization!r}.")
    feats = _features_from_b(b, num_osc)
    if feats == 0:
        raise ValueError(
            f"`b` has shape {np.shape(b)}: the layer has no features (H = 0); use H >= 1."
        )
    _complex_shape(c, "c", (feats, num_osc), f"H = {feats} from `b`, P = {num_osc} from `a`")
    _real_floating(d, "d", "the real feed-through; a complex `d` would lose its imaginary part")
    if tuple(np.shape(d)) != (feats,):
        raise ValueError(
            f"`d` must have shape [H] = [{feats}] (H from `b` and `c`), got {np.shape(d)}."
        )
    if np.shape(u)[-1] != feats:
        raise ValueError(
            f"`u` has {np.shape(u)[-1]} features (last axis of shape {np.shape(u)}) but the "
            f"layer was built for {feats} features (H from `d`, `b`, `c`)."
        )
    if values:
        _check_values(a, dt, g)


def _check_values(a, dt, g) -> None:
    # A constrained dt [P] is a sigmoid, in (0, 1]; a varying dt is that times a factor per
    # step (a gap between timestamps, a selective gate): any positive size.
    dt_max = None if time_varying(dt) else 1.0
    for name, x, lo, lo_open, hi in (
        ("a", a, 0.0, False, None),
        ("dt", dt, 0.0, True, dt_max),
        ("g", g, 0.0, False, None),
    ):
        xv = _concrete(x)
        if xv is None:
            continue
        if not np.all(np.isfinite(xv)):
            raise ValueError(f"`{name}` has non-finite values.")
        bad = (xv <= lo) if lo_open else (xv < lo)
        if hi is not None:
            bad |= xv > hi
        if np.any(bad):
            rng = f"({lo}, {hi}]" if hi is not None else f"> {lo}" if lo_open else f">= {lo}"
            raise ValueError(
                f"`{name}` must be {rng} (already constrained); got min {xv.min():.4g}, "
                f"max {xv.max():.4g}. Use flax_linoss.ops.constrain (or linoss_constrain / "
                "damped_constrain)."
            )


def check_state(state, num_osc: int, lead: tuple[int, ...], name: str = "state") -> None:
    """A :class:`LinOSSState` whose real ``[..., 2, P]`` leaves broadcast to the batch ``lead``."""
    if not isinstance(state, tuple) or len(state) != 2:
        got = type(state).__name__
        if hasattr(state, "shape"):
            got += f" of shape {tuple(np.shape(state))}"
        raise TypeError(
            f"`{name}` must be a LinOSSState(z, y) (two [..., 2, P] arrays), got {got}; "
            "build one with LinOSSState(z, y), LinOSSState.zeros or LinOSSState.from_complex."
        )
    for part, x in zip(("z", "y"), state):
        dtype = jnp.result_type(x)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"`{name}.{part}` has dtype {dtype}: a LinOSSState holds real arrays, the real "
                "and imaginary parts stacked on axis -2; use LinOSSState.from_complex(z, y) "
                "for complex states."
            )
        shape = tuple(np.shape(x))
        if shape[-2:] != (2, num_osc):
            raise ValueError(
                f"`{name}.{part}` has shape {shape} but the layer was built for P = {num_osc} "
                f"oscillators: expected [..., 2, {num_osc}] (real and imaginary parts). "
                f"Start from LinOSSState.zeros(batch_shape, {num_osc})."
            )
        try:
            np.broadcast_shapes(shape[:-2], lead)
        except ValueError as e:
            raise ValueError(
                f"`{name}.{part}` of shape {shape} does not broadcast to the batch shape "
                f"{lead} of the input."
            ) from e


def check_mesh_axis(name: str, axis) -> int:
    """The size of mesh axis ``axis`` (passed as argument ``name``); raises a clear
    ``ValueError`` outside ``shard_map`` over a mesh with that axis."""
    try:
        return jax.lax.axis_size(axis)
    except NameError as e:
        raise ValueError(
            f"{name}={axis!r} is not a mesh axis here: call linoss_apply inside jax.shard_map "
            "over a mesh with that axis."
        ) from e


def check_step_input(u_t) -> None:
    """``u_t`` of :func:`~flax_linoss.ops.linoss_step`: a real floating ``[..., H]``."""
    if np.ndim(u_t) < 1:
        raise ValueError(
            f"`u_t` must have shape [..., H] (one step of features), got a scalar of shape "
            f"{np.shape(u_t)}."
        )


def check_mask_values(mask) -> None:
    """Refuses a concrete float ``mask`` holding NaN (see the module docstring)."""
    if mask is None or isinstance(mask, jax.core.Tracer):
        return
    if not jnp.issubdtype(jnp.result_type(mask), jnp.floating):
        return
    bad = np.isnan(np.asarray(mask))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"`mask` has {int(bad.sum())} NaN value(s) (the first at index {where}); a NaN "
            "would count as a valid step. Use a boolean mask (True = valid) or 0/1 floats."
        )


def broadcasts_to(shape, target) -> bool:
    """``shape`` broadcasts to ``target`` without enlarging it."""
    try:
        return np.broadcast_shapes(tuple(shape), tuple(target)) == tuple(target)
    except ValueError:
        return False


def check_per_step(name: str, x, shape: tuple[int, ...], where: str = "") -> None:
    """A per-step array ``x`` (a mask, segment ids, timestamps) must broadcast to the input's
    ``[..., length]`` = ``shape`` without enlarging it; else one ``ValueError``."""
    if not broadcasts_to(np.shape(x), shape):
        prefix = f"{where}: " if where else ""
        raise ValueError(
            f"{prefix}`{name}` of shape {np.shape(x)} does not match the input's [..., length] "
            f"= {list(shape)}."
        )
