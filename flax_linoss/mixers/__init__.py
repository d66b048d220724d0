"""Sequence mixers: LinOSS / D-LinOSS as drop-in replacements for Flax self-attention.

* :mod:`flax_linoss.mixers.linen`: ``LinOSSMixer`` (and IMEX / D-LinOSS defaults) for
  ``flax.linen.MultiHeadDotProductAttention``.
* :mod:`flax_linoss.mixers.nnx`: the same for ``flax.nnx.MultiHeadAttention``.
* :mod:`flax_linoss.mixers.state`: the functional decoding state (:class:`MixerState`).
* :mod:`flax_linoss.mixers.masks`: how attention masks become step validity and segments.
* :mod:`flax_linoss.mixers.base`: logical axis names (``PARAM_AXES``) and shared checks.

The two API modules are imported on first use (``flax_linoss.mixers.linen``), so importing
this package does not import Flax.
"""

from flax_linoss.mixers.base import EMBED, KV, OSCILLATOR, PARAM_AXES
from flax_linoss.mixers.state import MixerState

__all__ = ["EMBED", "KV", "OSCILLATOR", "PARAM_AXES", "MixerState"]
