"""Configuration of the Gemma-protocol test decoder: attention types, sharding, model.

The field and constructor names are those of flax's ``examples/gemma/transformer_cfg.py``
(what a swap adapter reads); the values and code are this fixture's own.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

DEFAULT_ROPE_BASE_FREQUENCY = 10_000
DEFAULT_ROPE_SCALE_FACTOR = 1.0


class AttentionType(enum.Enum):
    """Global (causal over the whole cache) or local sliding-window attention."""

    GLOBAL = 1
    LOCAL_SLIDING = 2


@dataclasses.dataclass(frozen=True, slots=True)
class ShardingConfig:
    """Partition specs of the kernels (``*_weight_*``) and activations (``act_*``).

    Axis letters: b batch, t time, d model width, f hidden width, n query heads, k / c
    the key-value heads / the stacked q-k-v axis, h head width, v vocabulary, s the stacked
    axis of a fused projection's output. ``None`` everywhere means unsharded.
    """

    emb_vd: P | None = None
    q_weight_ndh: P | None = None
    kv_weight_cndh: P | None = None
    qkv_weight_cndh: P | None = None
    o_weight_nhd: P | None = None
    ffw_weight_df: P | None = None
    ffw_weight_fd: P | None = None
    rms_norm_weight: P | None = None
    act_btd: P | None = None
    act_btf: P | None = None
    act_btnh: P | None = None
    act_sbtnh: P | None = None
    fsdp_axis_name: str = "fsdp"
    tensor_parallel_axis_name: str = "tensor"

    @staticmethod
    def no_sharding() -> ShardingConfig:
        return ShardingConfig()

    @staticmethod
    def fsdp_tp_sharding(
        is_sampling: bool = False,
        fsdp_axis_name: str = "fsdp",
        tensor_parallel_axis_name: str = "tp",
    ) -> ShardingConfig:
        """Weights split over both axes; heads and hidden widths over the tensor axis,
        the batch over the fsdp axis (not while sampling)."""
        fsdp = None if is_sampling else fsdp_axis_name
        tp = tensor_parallel_axis_name
        return ShardingConfig(
            emb_vd=P(tp, fsdp),
            q_weight_ndh=P(tp, fsdp, None),
            kv_weight_cndh=P(None, tp, fsdp, None),
            qkv_weight_cndh=P(None, tp, fsdp, None),
            o_weight_nhd=P(tp, None, fsdp),
            ffw_weight_df=P(fsdp, tp),
            ffw_weight_fd=P(tp, fsdp),
            rms_norm_weight=P(tp),
            act_btd=P(fsdp, None, None if is_sampling else tp),
            act_btf=P(fsdp, None, tp),
            act_btnh=P(fsdp, None, tp, None),
            act_sbtnh=P(None, fsdp, None, tp, None),
            fsdp_axis_name=fsdp_axis_name,
            tensor_parallel_axis_name=tensor_parallel_axis_name,
        )


_NO_SHARDING = ShardingConfig.no_sharding()


@dataclasses.dataclass(frozen=True, slots=True)
class TransformerConfig:
    """Hyperparameters of the decoder (gemma's field names)."""

    num_layers: int
    num_embed: int
    embed_dim: int
    hidden_dim: int
    num_heads: int
    head_dim: int
    num_kv_heads: int
    final_logit_softcap: float | None
    use_post_attn_norm: bool
    use_post_ffw_norm: bool
    attention_types: Sequence[AttentionType]
    attn_logits_soft_cap: float | None = None
    local_base_frequency: int = DEFAULT_ROPE_BASE_FREQUENCY
    global_base_frequency: int = DEFAULT_ROPE_BASE_FREQUENCY
    local_scale_factor: float = DEFAULT_ROPE_SCALE_FACTOR
    global_scale_factor: float = DEFAULT_ROPE_SCALE_FACTOR
    use_qk_norm: bool = False
    sliding_window_size: int | None = None
    dtype: Any = jnp.float32
    weight_dtype: Any = jnp.float32
    dropout_rate: float = 0.0
    shd_config: ShardingConfig = _NO_SHARDING

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})."
            )
        if not self.attention_types:
            raise ValueError("attention_types must name at least one AttentionType.")

    def query_pre_attn_scalar(self) -> float:
        """The factor queries are multiplied by before the dot product."""
        return self.head_dim**-0.5

    def attention_type(self, layer: int) -> AttentionType:
        """Layer ``layer``'s attention type (``attention_types`` repeats as a pattern)."""
        return self.attention_types[layer % len(self.attention_types)]

    @classmethod
    def tiny(cls, **override) -> TransformerConfig:
        """A three-layer test model (local sliding, global, global attention), using every
        option of the protocol: grouped-query heads, qk norm, soft caps, post norms,
        dropout. Any field can be overridden."""
        config = {
            "num_layers": 3,
            "num_embed": 32,
            "embed_dim": 16,
            "hidden_dim": 32,
            "num_heads": 4,
            "head_dim": 8,
            "num_kv_heads": 2,
            "final_logit_softcap": 30.0,
            "use_post_attn_norm": True,
            "use_post_ffw_norm": True,
            "attention_types": (
                AttentionType.LOCAL_SLIDING,
                AttentionType.GLOBAL,
                AttentionType.GLOBAL,
            ),
            "attn_logits_soft_cap": 50.0,
            "use_qk_norm": True,
            "sliding_window_size": 4,
            "local_base_frequency": 100,
            "dropout_rate": 0.1,
        }
        config.update(override)
        return cls(**config)
