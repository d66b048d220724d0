"""Flax linen forms of the LinOSS layer, the papers' block and the papers' model.

Derived from :mod:`flax_linoss.nnx.layers` (the one source, see
:mod:`flax_linoss.linen.bridge`): the same arguments, less ``rngs`` and the input width,
which linen reads off the input; the same parameters (``a_raw``, ``dt_raw``, ``g_raw``,
``b``, ``c``, ``d``, ...) and results. Batch statistics live in the ``"batch_stats"``
collection (make it mutable when training); dropout draws from the ``"dropout"`` stream.

Shapes: ``[batch, length, features]``; ``H`` features, ``P`` oscillators.
"""

from __future__ import annotations

from flax_linoss.linen.bridge import Size, derive
from flax_linoss.nnx import layers as _nnx

__all__ = ["LinOSSBlock", "LinOSSLayer", "LinOSSModel", "RunningBatchNorm"]


def _width(x):
    return x.shape[-1]


# At apply, each width is that of the variables (a wrong input then gets the module's own
# "built for H features" error).
_LAYER = Size(_width, lambda v: v["params"]["d"].shape[0])
_BLOCK = Size(_width, lambda v: v["params"]["glu_value"]["kernel"].shape[0])
_MODEL = Size(_width, lambda v: v["params"]["encoder"]["kernel"].shape[0])
_NORM = Size(_width, lambda v: v["batch_stats"]["mean"].shape[0])

LinOSSLayer = derive(_nnx.LinOSSLayer, inferred={"in_features": _LAYER}, module=__name__)
LinOSSBlock = derive(
    _nnx.LinOSSBlock,
    inferred={"in_features": _BLOCK},
    module=__name__,
    linen_defaults={"deterministic": None},
)
LinOSSModel = derive(
    _nnx.LinOSSModel,
    inferred={"in_features": _MODEL},
    module=__name__,
    linen_defaults={"deterministic": None},
)
RunningBatchNorm = derive(_nnx.RunningBatchNorm, inferred={"num_features": _NORM}, module=__name__)
