"""Models built from the mixers: a decoder-only transformer language model whose sequence
mixer in each block is any registered mixer (attention, LinOSS, D-LinOSS, hybrids).

* :class:`flax_linoss.models.transformer.TransformerLM` (nnx, the one source);
* :class:`flax_linoss.models.linen.TransformerLM` (linen, derived: same arguments less
  ``rngs``, same parameters).

The papers' classification/regression model is a layer-level model and lives with the layers
(:class:`flax_linoss.nnx.LinOSSModel`, :class:`flax_linoss.linen.LinOSSModel`).
"""

from flax_linoss.models.transformer import (
    POSITIONAL,
    TransformerBlock,
    TransformerLM,
    mixer_pattern,
)

__all__ = ["POSITIONAL", "TransformerBlock", "TransformerLM", "mixer_pattern"]
