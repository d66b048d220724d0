"""Flax nnx modules of flax-linoss: the one source of every layer (linen derives from them)."""

from flax_linoss.nnx.layers import LinOSSBlock, LinOSSLayer, LinOSSModel, RunningBatchNorm

__all__ = ["LinOSSBlock", "LinOSSLayer", "LinOSSModel", "RunningBatchNorm"]
