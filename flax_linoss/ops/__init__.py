"""Pure-JAX core of flax-linoss: discretisations, scans, single steps, parameterisations.

No Flax in here; the linen and nnx layers both call these functions.

Legend used in shapes: ``B`` batch, ``L`` length, ``H`` features, ``P`` oscillators.
"""

from flax_linoss.ops import native
from flax_linoss.ops.params import (
    complex_uniform_init,
    constrain,
    damped_constrain,
    default_oscillator_init,
    init_oscillators,
    linoss_constrain,
    ring_init,
    stable_band,
    uniform_init,
)
from flax_linoss.ops.scan import (
    ADJOINT,
    ASSOCIATIVE,
    AUTO,
    FFT,
    NATIVE,
    SCANS,
    SEQUENTIAL,
    LinOSSState,
    check_inputs,
    check_scan,
    linoss_apply,
    linoss_step,
    matrix_powers,
    oscillator_recurrence,
    resolve_scan,
)
from flax_linoss.ops.schemes import (
    DAMPED,
    DISCRETIZATIONS,
    IM,
    IMEX,
    Transition,
    check_discretization,
    eigenvalues,
    spectral_radius,
    transition,
)

__all__ = [
    "ADJOINT",
    "ASSOCIATIVE",
    "AUTO",
    "DAMPED",
    "DISCRETIZATIONS",
    "FFT",
    "IM",
    "IMEX",
    "NATIVE",
    "SCANS",
    "SEQUENTIAL",
    "LinOSSState",
    "Transition",
    "check_discretization",
    "check_inputs",
    "check_scan",
    "complex_uniform_init",
    "constrain",
    "damped_constrain",
    "default_oscillator_init",
    "eigenvalues",
    "init_oscillators",
    "linoss_apply",
    "linoss_constrain",
    "linoss_step",
    "matrix_powers",
    "native",
    "oscillator_recurrence",
    "resolve_scan",
    "ring_init",
    "spectral_radius",
    "stable_band",
    "transition",
    "uniform_init",
]
