"""Flax linen modules of flax-linoss."""

from flax_linoss.linen.layers import LinOSSBlock, LinOSSLayer, LinOSSModel

__all__ = ["LinOSSBlock", "LinOSSLayer", "LinOSSModel"]
