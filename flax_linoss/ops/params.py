"""Parameterisations (raw -> constrained) and initialisations of the papers.

Raw parameters are what an optimiser sees; :func:`constrain` (or :func:`linoss_constrain`,
:func:`imex_stable_constrain`, :func:`damped_constrain`) maps them to the constrained
``(a, dt, g)`` that :func:`flax_linoss.ops.linoss_apply` expects. Initialisers return raw
parameters.

Two constraints (:data:`CONSTRAINTS`):

* ``"paper"``: the papers' parameterisations. LinOSS: ``a = relu(a_raw)``,
  ``dt = sigmoid(dt_raw)``; D-LinOSS: ``a`` projected into the stable band (with the float32
  margins below).
* ``"stable"``: the same, except that LinOSS-IMEX's ``a`` is also clamped strictly inside its
  stability range. IMEX's transition has determinant 1 and trace ``2 - dt^2 a``: for
  ``0 < dt^2 a < 4`` its eigenvalues are ``e^(+-i theta)`` (modulus exactly 1), at
  ``dt^2 a = 4`` they meet at ``-1`` (a Jordan block: linear growth) and beyond it one has
  modulus > 1 (exponential blow-up; the papers' relu/sigmoid allows it, e.g. ``a > 4`` with
  ``dt`` near 1). "stable" clamps ``dt^2 a <= 4 - IMEX_MARGIN`` (``IMEX_MARGIN = 0.04``:
  the trace stays at least 0.02 inside the edge at -2, far beyond float32 rounding of the
  coefficients, so the eigenvalues stay distinct and on the unit circle, and the transient
  amplification ``~1/sin(theta)`` stays below about 10). IM is stable by construction
  (eigenvalue modulus ``1/sqrt(1 + dt^2 a)``), so for it "stable" equals "paper". At
  ``a = 0`` LinOSS is a free particle (a Jordan block at 1, polynomial growth under
  forcing), as in the papers.

D-LinOSS (both constraints) keeps its transition strictly inside the stable region *after
float32 rounding*. Its exact eigenvalues are ``r e^(+-i theta)`` with ``r^2 = 1/(1 + dt g)``
and ``theta`` running from 0 to pi across the band of ``a``; the papers' band edges are
double eigenvalues (a Jordan block), and ``g = 0`` puts them on the unit circle. Rounding
the coefficients to float32 moves a double eigenvalue by ``~sqrt(eps)`` (``eps = 2^-23``),
which measured up to 6e-4 (spectral radius 1.0006 at ``g = 0``; 1.00000002 for raw
``a = 50, dt = 20, g = -10``, and associative scans overflowing at 10^5 steps). Both
margins are :data:`DAMPED_MARGIN` ``= 64 eps`` (about 7.6e-6):

* the damping floor ``dt g >= DAMPED_MARGIN``, so ``1 - r^2 >= ~64 eps``;
* the band is shrunk to ``sin^2(theta) >= DAMPED_MARGIN`` (``theta`` at least 2.8e-3 from 0
  and pi), so the discriminant ``(trace/2)^2 - det = -r^2 sin^2(theta)`` is at most
  ``-64 eps r^2``.

Why 64: rounding the six coefficients (each within 3 ulps) and the clamped ``a`` moves the
discriminant by at most about ``16 eps r^2`` and the determinant by about ``8 eps r^2``. The
perturbed eigenvalues therefore stay complex, and for a real 2x2 matrix with complex
eigenvalues ``|lambda|^2 = det``, so the computed spectral radius is at most
``sqrt(r^2 (1 + 8 eps)) < 1``: a factor of 4-8 to spare on each bound. What it costs: the
slowest decay is ``1 - r <= ~3.8e-6`` per step (a memory of ~2.6e5 steps), and
``a`` is kept ``~2.8e-3`` in phase away from the critically damped edges (``a >=
DAMPED_MARGIN / dt^2`` more than the papers' lower edge: negligible unless ``dt`` is far
below the papers' range).

Legend: ``P`` oscillators, ``H`` features.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# The reference code guards the band edges against dt -> 0 with this floor on dt^2.
_DT2_FLOOR = 1e-6
PAPER = "paper"
STABLE = "stable"
CONSTRAINTS = (PAPER, STABLE)
#: "stable" keeps LinOSS-IMEX at dt^2 a <= 4 - IMEX_MARGIN (see the module docstring).
IMEX_MARGIN = 0.04
#: D-LinOSS's float32 margins (both constraints): dt g >= DAMPED_MARGIN and
#: sin^2(theta) >= DAMPED_MARGIN; 64 float32 machine epsilons (see the module docstring).
DAMPED_MARGIN = 64 * 2.0**-23


def linoss_constrain(a_raw: jnp.ndarray, dt_raw: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """LinOSS: ``a = relu(a_raw)``, ``dt = sigmoid(dt_raw)``; returns ``(a, dt)``, each ``[P]``."""
    return jax.nn.relu(a_raw), jax.nn.sigmoid(dt_raw)


def stable_band(
    dt: jnp.ndarray, g: jnp.ndarray, margin: float = 0.0
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """D-LinOSS band of ``a`` with complex eigenvalues of modulus ``1/sqrt(1 + dt g)``.

    ``[(2 + dt g - 2 c sqrt(1 + dt g)) / dt^2, (2 + dt g + 2 c sqrt(1 + dt g)) / dt^2]``
    with ``c = sqrt(1 - margin)``: ``margin = 0`` gives the papers' band (its edges are
    double eigenvalues), ``margin > 0`` the band where ``sin^2(theta) >= margin`` (what
    :func:`damped_constrain` uses, with :data:`DAMPED_MARGIN`). The lower edge is computed
    without cancellation, as ``((sqrt(1 + dt g) - 1)^2 + 2 (1 - c) sqrt(1 + dt g)) / dt^2``.
    """
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"stable_band needs 0 <= margin < 1, got {margin}.")
    dtg = dt * g
    root = jnp.sqrt(1.0 + dtg)
    c = math.sqrt(1.0 - margin)
    one_minus_c = margin / (1.0 + c)
    dt2 = jnp.maximum(dt * dt, _DT2_FLOOR)
    lo = ((dtg / (root + 1.0)) ** 2 + 2.0 * one_minus_c * root) / dt2
    return lo, (2.0 + dtg + 2.0 * c * root) / dt2


def imex_stable_constrain(
    a_raw: jnp.ndarray, dt_raw: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """LinOSS-IMEX kept stable: :func:`linoss_constrain`, then ``a <= (4 - IMEX_MARGIN) / dt^2``.

    The clamp is ``min(a, hi)``: zero gradient for ``a_raw`` above the edge, and the edge
    itself moves with ``dt`` (the gradient of ``a - relu(a - hi)``, without its rounding).

    Returns:
      ``(a, dt)``, each ``[P]``.
    """
    a, dt = linoss_constrain(a_raw, dt_raw)
    hi = (4.0 - IMEX_MARGIN) / jnp.maximum(dt * dt, _DT2_FLOOR)
    return jnp.minimum(a, hi), dt


def damped_constrain(
    a_raw: jnp.ndarray, *, dt_raw: jnp.ndarray, g_raw: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """D-LinOSS: ``dt = sigmoid(dt_raw)``, ``g = relu(g_raw)``, ``a`` projected into the band.

    The projection is the reference's clamp (gradient zero outside the band; computed as
    ``clip(a_raw, lo, hi)``, exact, where the reference's ``lo + relu(a - lo) - relu(a - hi)``
    rounds large ``a_raw`` past ``hi``). Unlike the reference, the damping has a floor,
    ``g >= DAMPED_MARGIN / dt``, and the band is :func:`stable_band` with
    ``margin=DAMPED_MARGIN``: the float32 transition then stays strictly stable (see the
    module docstring). ``dt_raw`` and ``g_raw`` are keyword-only, so the argument order of
    older versions (``a_raw, g_raw, dt_raw``) fails loudly.

    Returns:
      ``(a, dt, g)``, each ``[P]`` (the order of :func:`constrain`).
    """
    dt = jax.nn.sigmoid(dt_raw)
    g = jnp.maximum(jax.nn.relu(g_raw), DAMPED_MARGIN / dt)
    lo, hi = stable_band(dt, g, DAMPED_MARGIN)
    # A clamp, not the reference's lo + relu(a - lo) - relu(a - hi): the same value and
    # gradients, without the cancellation that put a above hi for large a_raw (by
    # ~ulp(a_raw): 5e-4 at a_raw = 5000, far beyond the margin).
    a = jnp.clip(a_raw, lo, hi)
    return a, dt, g


def uniform_init(key: jax.Array, num_oscillators: int, dtype=jnp.float32) -> dict[str, jnp.ndarray]:
    """LinOSS initialisation: ``a_raw ~ U[0, 1)`` and ``dt_raw ~ U[0, 1)``.

    Returns:
      ``{"a_raw": [P], "dt_raw": [P]}``.
    """
    ka, kdt = jax.random.split(key)
    return {
        "a_raw": jax.random.uniform(ka, (num_oscillators,), dtype),
        "dt_raw": jax.random.uniform(kdt, (num_oscillators,), dtype),
    }


def ring_init(
    key: jax.Array,
    num_oscillators: int,
    dtype=jnp.float32,
    *,
    r_min: float = 0.9,
    r_max: float = 1.0,
    theta_min: float = 0.0,
    theta_max: float = math.pi,
    dt_std: float = 0.5,
) -> dict[str, jnp.ndarray]:
    """D-LinOSS "ring" initialisation of ``(a, g, dt)`` in closed form.

    Draws ``dt_raw ~ N(0, dt_std^2)``, eigenvalue moduli ``r`` uniformly on the annulus
    ``r_min <= r <= r_max`` (``r = sqrt(U (r_max^2 - r_min^2) + r_min^2)``) and phases
    ``theta ~ U[theta_min, theta_max]``, then solves the damped scheme's characteristic
    polynomial for ``g = (1/r^2 - 1) / dt`` and ``a = (1 + 1/r^2 - 2 cos(theta) / r) / dt^2``.
    With ``0 < r <= 1`` these lie in the stable band, so :func:`damped_constrain` returns them
    unchanged and the transition has the drawn eigenvalues ``r e^{+-i theta}`` (up to its
    float32 margins: ``r`` at most ``~1 - 3.8e-6``, ``theta`` at least ``~2.8e-3`` from 0 and
    pi).

    Returns:
      ``{"a_raw": [P], "g_raw": [P], "dt_raw": [P]}``.
    """
    if not 0.0 < r_min <= r_max <= 1.0:
        raise ValueError(f"ring_init needs 0 < r_min <= r_max <= 1, got {r_min=}, {r_max=}.")
    if not 0.0 <= theta_min <= theta_max <= math.pi:
        raise ValueError(
            f"ring_init needs 0 <= theta_min <= theta_max <= pi, got {theta_min=}, {theta_max=}."
        )
    kdt, kr, kth = jax.random.split(key, 3)
    shape = (num_oscillators,)
    dt_raw = dt_std * jax.random.normal(kdt, shape, jnp.float32)
    dt = jax.nn.sigmoid(dt_raw)
    u = jax.random.uniform(kr, shape, jnp.float32)
    r = jnp.sqrt(u * (r_max**2 - r_min**2) + r_min**2)
    theta = jax.random.uniform(kth, shape, jnp.float32, theta_min, theta_max)
    g = (1.0 / r**2 - 1.0) / dt
    a = (1.0 + 1.0 / r**2 - 2.0 * jnp.cos(theta) / r) / dt**2
    return {"a_raw": a.astype(dtype), "g_raw": g.astype(dtype), "dt_raw": dt_raw.astype(dtype)}


def complex_uniform_init(scale_axis: int = -1):
    """Initialiser for complex matrices stored as real ``[..., 2]`` pairs (the papers' B and C).

    Real and imaginary parts are ``U(-1/sqrt(n), 1/sqrt(n))`` with ``n = shape[scale_axis]``
    (``H`` for ``B [P, H, 2]``, ``P`` for ``C [H, P, 2]``).
    """

    def init(key, shape, dtype=jnp.float32):
        if len(shape) < 2 or shape[-1] != 2:
            raise ValueError(f"complex_uniform_init expects a [..., 2] shape, got {shape}.")
        if 0 in shape:
            raise ValueError(
                f"complex_uniform_init got the empty shape {tuple(shape)}: a layer needs at "
                "least one feature (H >= 1) and one oscillator (P >= 1)."
            )
        bound = 1.0 / math.sqrt(shape[:-1][scale_axis])
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def check_constraint(constraint: str) -> str:
    """Returns ``constraint`` if it is in :data:`CONSTRAINTS`, else raises ``ValueError``."""
    if constraint not in CONSTRAINTS:
        raise ValueError(f"Unknown constraint {constraint!r}; expected one of {list(CONSTRAINTS)}.")
    return constraint


def constrain(
    discretization: str,
    a_raw: jnp.ndarray,
    dt_raw: jnp.ndarray,
    g_raw: jnp.ndarray | None = None,
    *,
    constraint: str = PAPER,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray | None]:
    """Raw -> constrained ``(a, dt, g)`` for a scheme (``g`` is ``None`` unless damped).

    Args:
      discretization: ``"im"``, ``"imex"`` or ``"damped"``.
      a_raw, dt_raw: ``[P]``.
      g_raw: ``[P]``, for ``"damped"`` only.
      constraint: ``"paper"`` (the papers' parameterisations) or ``"stable"`` (also keeps
        LinOSS-IMEX strictly stable; the same as "paper" for IM and D-LinOSS, whose
        float32 margins apply under both). See the
        module docstring.
    """
    check_constraint(constraint)
    if discretization == "damped":
        if g_raw is None:
            raise ValueError("discretization='damped' (D-LinOSS) needs `g_raw`.")
        return damped_constrain(a_raw, dt_raw=dt_raw, g_raw=g_raw)
    if discretization == "imex" and constraint == STABLE:
        a, dt = imex_stable_constrain(a_raw, dt_raw)
        return a, dt, None
    a, dt = linoss_constrain(a_raw, dt_raw)
    return a, dt, None


def default_oscillator_init(discretization: str):
    """The papers' defaults: :func:`uniform_init` for LinOSS, :func:`ring_init` for D-LinOSS."""
    return ring_init if discretization == "damped" else uniform_init


def init_oscillators(
    key: jax.Array, num_oscillators: int, discretization: str, init=None, dtype=jnp.float32
) -> dict[str, jnp.ndarray]:
    """Raw oscillator parameters ``{"a_raw", "dt_raw"[, "g_raw"]}``, each ``[P]``.

    ``init`` is a callable ``(key, P, dtype) -> dict`` (default: the paper's for the scheme).
    For ``"damped"`` a ``g_raw`` is required; an init without one starts with ``g_raw = 0``.
    """
    if num_oscillators < 1:
        raise ValueError(
            f"A layer needs at least one oscillator (P >= 1), got P = {num_oscillators}."
        )
    init = init or default_oscillator_init(discretization)
    raw = dict(init(key, num_oscillators, dtype))
    missing = {"a_raw", "dt_raw"} - set(raw)
    if missing:
        raise ValueError(f"oscillator init returned {sorted(raw)}; it lacks {sorted(missing)}.")
    if discretization == "damped":
        raw.setdefault("g_raw", jnp.zeros((num_oscillators,), dtype))
    else:
        raw.pop("g_raw", None)
    for name, x in raw.items():
        if x.shape != (num_oscillators,):
            raise ValueError(f"oscillator init gave {name} of shape {x.shape}, expected [P].")
    return raw


# Defaults of the layers (the papers'): B, C uniform in +-1/sqrt(fan-in) per part, D ~ N(0, 1).
default_b_init = complex_uniform_init()
default_c_init = complex_uniform_init()
default_d_init = jax.nn.initializers.normal(1.0)
