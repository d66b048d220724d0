"""Flax linen form of :class:`flax_linoss.models.transformer.TransformerLM` (derived from it,
see :mod:`flax_linoss.linen.bridge`): the same arguments less ``rngs``, the same call,
parameters and logits. Decoding with caches is done on the nnx module (linen variables move
there with :func:`flax_linoss.convert.map_tree`)."""

from __future__ import annotations

from flax_linoss.linen.bridge import derive
from flax_linoss.models import transformer as _nnx

__all__ = ["TransformerLM"]

TransformerLM = derive(
    _nnx.TransformerLM, inferred={}, module=__name__, linen_defaults={"deterministic": None}
)
