"""Flax nnx modules of flax-linoss (same names and parameter trees as the linen ones)."""

from flax_linoss.nnx.layers import LinOSSBlock, LinOSSLayer, LinOSSModel

__all__ = ["LinOSSBlock", "LinOSSLayer", "LinOSSModel"]
