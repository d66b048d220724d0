"""Discretisations of the forced (damped) harmonic oscillator, one 2x2 block per oscillator.

Each oscillator ``p`` has state ``(z, y)`` (velocity, position) and obeys
``y'' = -a y - g y' + (B u)``. The three schemes of the papers advance it by

* ``"im"`` (LinOSS-IM):      ``z_n = z_{n-1} + dt (-a y_n     + Bu_n)``
* ``"imex"`` (LinOSS-IMEX):  ``z_n = z_{n-1} + dt (-a y_{n-1} + Bu_n)``
* ``"damped"`` (D-LinOSS):   ``z_n = z_{n-1} + dt (-a y_{n-1} - g z_n + Bu_n)``

and in all three ``y_n = y_{n-1} + dt z_n``.

Solving each for the new state gives a linear update (time-invariant for a fixed ``dt``, one
per step for a time-varying ``dt [..., L, P]``)
``[z_n; y_n] = M [z_{n-1}; y_{n-1}] + [f1; f2] Bu_n`` with a real ``M`` and real ``f`` per
oscillator. Everything downstream (scans, single steps, kernels) is written in terms of the
six real coefficients returned by :func:`transition`.

Legend: ``P`` oscillators.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

IM = "im"
IMEX = "imex"
DAMPED = "damped"
DISCRETIZATIONS = (IM, IMEX, DAMPED)


class Transition(NamedTuple):
    """Per-oscillator coefficients of ``x_n = M x_{n-1} + f v_n`` with ``x = [z; y]``.

    Every field has shape ``[P]``, or per step ``[..., L, P]`` for a time-varying ``dt``
    (any shape ``a``, ``dt`` and ``g`` broadcast to).
    """

    m11: jnp.ndarray
    m12: jnp.ndarray
    m21: jnp.ndarray
    m22: jnp.ndarray
    f1: jnp.ndarray
    f2: jnp.ndarray

    def tile(self, reps: int) -> Transition:
        """Repeats every coefficient ``reps`` times along the last axis (``[P] -> [reps*P]``)."""
        return Transition(*(jnp.concatenate([x] * reps, axis=-1) for x in self))

    def matrix(self) -> jnp.ndarray:
        """The transition matrices, ``[..., P, 2, 2]``."""
        return jnp.stack(
            [jnp.stack([self.m11, self.m12], -1), jnp.stack([self.m21, self.m22], -1)], -2
        )


def check_discretization(discretization: str) -> str:
    """Returns ``discretization`` if known, else raises a ``ValueError`` listing the choices."""
    if discretization not in DISCRETIZATIONS:
        raise ValueError(
            f"Unknown discretization {discretization!r}; expected one of {list(DISCRETIZATIONS)} "
            "('im' = LinOSS-IM, 'imex' = LinOSS-IMEX, 'damped' = D-LinOSS)."
        )
    return discretization


def transition(
    a: jnp.ndarray, dt: jnp.ndarray, discretization: str, g: jnp.ndarray | None = None
) -> Transition:
    """The exact one-step update of a scheme for already-constrained parameters.

    Args:
      a: ``[P]`` stiffness (diagonal of A), ``>= 0``.
      dt: ``[P]`` time steps in ``(0, 1]``, or per step ``[..., L, P]`` (``> 0``).
      discretization: ``"im"``, ``"imex"`` or ``"damped"``.
      g: ``[P]`` damping ``>= 0``; required for (and only used by) ``"damped"``.

    Returns:
      The :class:`Transition` coefficients, each shaped like ``dt`` (broadcast with ``a``).
    """
    check_discretization(discretization)
    dt2a = dt * dt * a
    if discretization == IM:
        # y_n (1 + dt^2 a) = y_{n-1} + dt z_{n-1} + dt^2 Bu_n; then z_n from y_n.
        s = 1.0 / (1.0 + dt2a)
        return Transition(m11=s, m12=-dt * a * s, m21=dt * s, m22=s, f1=dt * s, f2=dt * dt * s)
    if discretization == IMEX:
        one = jnp.ones_like(dt2a)
        return Transition(m11=one, m12=-dt * a, m21=dt, m22=1.0 - dt2a, f1=dt, f2=dt * dt)
    if g is None:
        raise ValueError("discretization='damped' (D-LinOSS) needs the damping `g`.")
    # z_n (1 + dt g) = z_{n-1} - dt a y_{n-1} + dt Bu_n; then y_n = y_{n-1} + dt z_n.
    inv = 1.0 / (1.0 + dt * g)
    return Transition(
        m11=inv,
        m12=-dt * a * inv,
        m21=dt * inv,
        m22=1.0 - dt2a * inv,
        f1=dt * inv,
        f2=dt * dt * inv,
    )


def eigenvalues(tr: Transition) -> jnp.ndarray:
    """The two (complex) eigenvalues of each 2x2 block, ``[..., P, 2]``."""
    trace = tr.m11 + tr.m22
    det = tr.m11 * tr.m22 - tr.m12 * tr.m21
    disc = jnp.sqrt((trace * trace - 4.0 * det).astype(jnp.complex64))
    return jnp.stack([(trace + disc) / 2, (trace - disc) / 2], axis=-1)


def spectral_radius(tr: Transition) -> jnp.ndarray:
    """Largest eigenvalue modulus of each 2x2 block, ``[P]``."""
    return jnp.max(jnp.abs(eigenvalues(tr)), axis=-1)
