"""Pure-JAX core of flax-linoss: the layer as functions, the scan table, parameterisations.

No Flax in here; the linen and nnx layers both call these functions.

* :func:`linoss_apply` (a sequence), :func:`linoss_step` (one step), :class:`LinOSSState`;
* :func:`outer_apply`, :func:`outer_step`, :class:`OuterState`: the outer-product form
  (a ``key x value`` state of oscillators per head, read by queries; :mod:`.outer`);
* :func:`causal_conv`, :func:`causal_conv_step`: the short causal depthwise convolution of
  recurrent blocks, over valid steps, per segment, with a decoding buffer (:mod:`.conv`);
* the scheme names (:data:`IM`, :data:`IMEX`, :data:`DAMPED`; their transitions,
  eigenvalues and validation are in :mod:`.schemes`);
* the scan names and table (:class:`Scan`, :data:`SCAN_TABLE`, :data:`SCANS`; validation and
  capabilities in :mod:`.table`);
* constraints and initialisers (:func:`constrain`, :data:`CONSTRAINTS`, ...; :mod:`.params`);
* per-step step sizes for a time-varying ``dt [..., L, P]``: :func:`timestamp_gaps`
  (irregular sampling), :func:`clamp_steps` / :func:`step_limit` (the stable range per
  step; :mod:`.steps`).

Everything else (the scan paths in ``_scans/``, validation, projections, ``auto``) is
private. Legend used in shapes: ``B`` batch, ``L`` length, ``H`` features, ``P`` oscillators.
"""

from flax_linoss.ops._apply import linoss_apply, linoss_step
from flax_linoss.ops._state import LinOSSState
from flax_linoss.ops.conv import causal_conv, causal_conv_step, conv_state_zeros
from flax_linoss.ops.outer import OuterState, outer_apply, outer_step
from flax_linoss.ops.params import (
    CONSTRAINTS,
    complex_uniform_init,
    constrain,
    damped_constrain,
    default_oscillator_init,
    imex_stable_constrain,
    init_oscillators,
    linoss_constrain,
    ring_init,
    stable_band,
    uniform_init,
)
from flax_linoss.ops.schemes import (
    DAMPED,
    DISCRETIZATIONS,
    IM,
    IMEX,
)
from flax_linoss.ops.steps import clamp_steps, step_limit, timestamp_gaps
from flax_linoss.ops.table import (
    ADJOINT,
    ASSOCIATIVE,
    AUTO,
    CHUNKED,
    NATIVE,
    PALLAS,
    SCAN_TABLE,
    SCANS,
    SEQUENTIAL,
    Scan,
)

__all__ = [
    "ADJOINT",
    "ASSOCIATIVE",
    "AUTO",
    "CHUNKED",
    "CONSTRAINTS",
    "DAMPED",
    "DISCRETIZATIONS",
    "IM",
    "IMEX",
    "NATIVE",
    "PALLAS",
    "SCANS",
    "SCAN_TABLE",
    "SEQUENTIAL",
    "LinOSSState",
    "OuterState",
    "Scan",
    "causal_conv",
    "causal_conv_step",
    "clamp_steps",
    "complex_uniform_init",
    "constrain",
    "conv_state_zeros",
    "damped_constrain",
    "default_oscillator_init",
    "imex_stable_constrain",
    "init_oscillators",
    "linoss_apply",
    "linoss_constrain",
    "linoss_step",
    "outer_apply",
    "outer_step",
    "ring_init",
    "stable_band",
    "step_limit",
    "timestamp_gaps",
    "uniform_init",
]
