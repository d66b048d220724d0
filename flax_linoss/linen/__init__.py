"""Flax linen modules of flax-linoss, derived from the nnx ones (same parameter trees)."""

from flax_linoss.linen.layers import LinOSSBlock, LinOSSLayer, LinOSSModel, RunningBatchNorm

__all__ = ["LinOSSBlock", "LinOSSLayer", "LinOSSModel", "RunningBatchNorm"]
