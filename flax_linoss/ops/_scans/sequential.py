"""``scan="sequential"``: ``lax.scan`` of the 2x2 update over time, autodiff backward.

The plainest path: the reference-like loop, every flag, per-step coefficients, forward- and
reverse-mode AD (autodiff replays generic per-step residuals, so it is slower than
``adjoint``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flax_linoss.ops import schemes
from flax_linoss.ops._scans._common import Flags, is_time_varying, recurrence_step


def run(tr, v, z0, y0, flags: Flags | None):
    """``(ys [N, L, Q], z_L [N, Q], y_L [N, Q])`` for ``v [N, L, Q]``, ``z0, y0 [N, Q]``;
    ``tr``'s fields ``[Q]`` or per step ``[N, L, Q]``."""
    hold = reset = None
    if flags is not None:
        hold, reset = flags
    per_step = tuple(tr) if is_time_varying(tr) else None

    def body(carry, inp):
        z, y = carry
        vt, hd, rs, coeffs = inp
        if rs is not None:
            keep = jnp.logical_not(rs)[:, None].astype(z.dtype)
            z, y = z * keep, y * keep
        zn, yn = recurrence_step(tr if coeffs is None else schemes.Transition(*coeffs), z, y, vt)
        if hd is not None:
            zn = jnp.where(hd[:, None], z, zn)
            yn = jnp.where(hd[:, None], y, yn)
        return (zn, yn), yn

    def time_major(x):
        return None if x is None else jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), x)

    (z_l, y_l), ys = jax.lax.scan(
        body, (z0, y0), (time_major(v), time_major(hold), time_major(reset), time_major(per_step))
    )
    return jnp.swapaxes(ys, 0, 1), z_l, y_l
