"""Flax linen skin of the LinOSS layer, the papers' block and the papers' model.

The parameter names and shapes equal those of :mod:`flax_linoss.nnx` (see
:mod:`flax_linoss.convert`). All math is in :mod:`flax_linoss.ops`.

Shapes: ``[batch, length, features]``; ``H`` features, ``P`` oscillators.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_linoss import ops
from flax_linoss.common import (
    BATCH,
    BATCH_RUNNING,
    BN_EPSILON,
    BN_MOMENTUM,
    CLASSIFICATION,
    check_features,
    check_model_options,
    check_norm,
    check_sequence_input,
    feature_mask,
    pool_or_subsample,
    running_batch_norm,
)
from flax_linoss.ops.params import default_b_init, default_c_init, default_d_init

Dtype = Any
Initializer = Callable[..., jax.Array]


class LinOSSLayer(nn.Module):
    """One LinOSS / D-LinOSS state-space layer, ``[batch, length, H] -> [batch, length, H]``.

    Parameters: ``a_raw [P]``, ``dt_raw [P]``, ``g_raw [P]`` (damped only), ``b [P, H, 2]``,
    ``c [H, P, 2]`` (complex matrices as (re, im) pairs) and ``d [H]``.

    Attributes:
      state_size: number of oscillators ``P``.
      discretization: ``"im"`` (LinOSS-IM), ``"imex"`` (LinOSS-IMEX) or ``"damped"`` (D-LinOSS).
      scan: scan path, see :func:`flax_linoss.ops.linoss_apply`.
      oscillator_init: ``(key, P, dtype) -> {"a_raw", "dt_raw"[, "g_raw"]}``; default: the
        papers' (uniform for LinOSS, ring for D-LinOSS).
      b_init, c_init, d_init: initialisers for ``b``, ``c``, ``d``.
      dtype: computation dtype of the projections (default: inferred from the input). The
        recurrence always runs in float32 or wider.
      param_dtype: parameter dtype.
    """

    state_size: int
    discretization: str = ops.IM
    scan: str = ops.AUTO
    oscillator_init: Callable | None = None
    b_init: Initializer = default_b_init
    c_init: Initializer = default_c_init
    d_init: Initializer = default_d_init
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        initial_state: ops.LinOSSState | None = None,
        return_state: bool = False,
        reverse: bool = False,
        mask: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ):
        """Applies the layer.

        Args:
          x: ``[..., length, H]`` input.
          initial_state: optional :class:`~flax_linoss.ops.LinOSSState` (``[..., 2, P]``).
          return_state: also return the final state.
          reverse: run the recurrence from the last step to the first.
          mask: optional ``[..., length]`` bool, ``True`` = valid step.
          segment_ids: optional ``[..., length]`` int; the state restarts per segment.

        Returns:
          ``[..., length, H]``, and the final state if ``return_state``.
        """
        ops.check_discretization(self.discretization)
        ops.check_scan(self.scan)
        check_sequence_input(x, "LinOSSLayer")
        if self.has_variable("params", "d"):
            d_param = nn.meta.unbox(self.get_variable("params", "d"))  # may be partitioned
            check_features(x, d_param.shape[0], "LinOSSLayer")
        feats, num_osc = x.shape[-1], self.state_size
        # (a, dt, g) are drawn jointly (the ring init couples them), so every one of them is
        # initialised from one shared key. Flax also calls these functions under eval_shape
        # at apply time (to check shapes), where any key will do.
        shared_key = None
        if not self.has_variable("params", "a_raw"):
            shared_key = self.make_rng("params")

        drawn = {}

        def osc_init(name):
            def init(key, *_):
                draw = lambda k: ops.init_oscillators(
                    k, num_osc, self.discretization, self.oscillator_init, self.param_dtype
                )
                if shared_key is None:  # Flax's shape check at apply time
                    return draw(key)[name]
                if not drawn:
                    drawn.update(draw(shared_key))
                return drawn[name]

            return init

        a_raw = self.param("a_raw", osc_init("a_raw"))
        dt_raw = self.param("dt_raw", osc_init("dt_raw"))
        g_raw = None
        if self.discretization == ops.DAMPED:
            g_raw = self.param("g_raw", osc_init("g_raw"))
        b = self.param("b", self.b_init, (num_osc, feats, 2), self.param_dtype)
        c = self.param("c", self.c_init, (feats, num_osc, 2), self.param_dtype)
        d = self.param("d", self.d_init, (feats,), self.param_dtype)
        x, b, c, d = nn.dtypes.promote_dtype(x, b, c, d, dtype=self.dtype)
        a, dt, g = ops.constrain(self.discretization, a_raw, dt_raw, g_raw)
        return ops.linoss_apply(
            x,
            a,
            dt,
            b,
            c,
            d,
            g=g,
            discretization=self.discretization,
            scan=self.scan,
            initial_state=initial_state,
            return_state=return_state,
            reverse=reverse,
            mask=mask,
            segment_ids=segment_ids,
        )


class RunningBatchNorm(nn.Module):
    """The reference code's batch norm (see :func:`flax_linoss.common.running_batch_norm`).

    ``[..., L, H] -> [..., L, H]``; statistics ``mean``, ``var`` (``[H]``) and
    ``initialized`` in the ``"batch_stats"`` collection.
    """

    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, *, use_running_average: bool, mask=None):
        feats = x.shape[-1]
        mean = self.variable("batch_stats", "mean", jnp.zeros, (feats,), jnp.float32)
        var = self.variable("batch_stats", "var", jnp.ones, (feats,), jnp.float32)
        done = self.variable("batch_stats", "initialized", lambda: jnp.zeros((), bool))
        train = not use_running_average and not self.is_initializing()
        y, stats = running_batch_norm(
            x,
            mean.value,
            var.value,
            done.value,
            train=train,
            mask=mask,
            axis_name=self.axis_name,
        )
        if train:
            mean.value, var.value, done.value = stats
        return y


def _norm(kind: str, axis_name, dtype, param_dtype, name: str) -> nn.Module:
    check_norm(kind)
    if kind == BATCH_RUNNING:
        return RunningBatchNorm(axis_name=axis_name, name=name)
    if kind == BATCH:
        # The papers' batch norm: per channel over batch and time, no affine part.
        return nn.BatchNorm(
            momentum=BN_MOMENTUM,
            epsilon=BN_EPSILON,
            use_bias=False,
            use_scale=False,
            axis_name=axis_name,
            dtype=dtype,
            param_dtype=param_dtype,
            name=name,
        )
    if kind == "layer":
        return nn.LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, name=name)
    return nn.RMSNorm(epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, name=name)


class LinOSSBlock(nn.Module):
    """The papers' block: norm, LinOSS, GELU, dropout, GLU, dropout, residual.

    ``[batch, length, H] -> [batch, length, H]``. Batch norm keeps running statistics in the
    ``"batch_stats"`` collection (make it mutable when training).

    Attributes:
      state_size: oscillators ``P`` of the LinOSS layer.
      discretization, scan, oscillator_init: passed to :class:`LinOSSLayer`.
      norm: ``"batch"`` (Flax's batch norm), ``"batch_running"`` (the reference code's,
        see :class:`RunningBatchNorm`), ``"layer"`` or ``"rms"``.
      dropout_rate: dropout after the GELU and after the GLU.
      norm_axis_name: mapped axis over which batch statistics are averaged (data parallel).
      deterministic: default for the call argument (no dropout, running statistics).
      dtype, param_dtype: as in Flax.
    """

    state_size: int
    discretization: str = ops.IM
    scan: str = ops.AUTO
    oscillator_init: Callable | None = None
    norm: str = "batch"
    dropout_rate: float = 0.05
    norm_axis_name: str | None = None
    deterministic: bool | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, *, deterministic: bool | None = None, mask: jax.Array | None = None
    ) -> jax.Array:
        """Applies the block to ``x [batch, length, H]``; ``mask [batch, length]`` optional."""
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        check_sequence_input(x, "LinOSSBlock", rank=3)
        feats = x.shape[-1]
        skip = x
        norm = _norm(self.norm, self.norm_axis_name, self.dtype, self.param_dtype, "norm")
        if self.norm in (BATCH, BATCH_RUNNING):
            x = norm(x, use_running_average=deterministic, mask=feature_mask(mask, x))
        else:
            x = norm(x)
        x = LinOSSLayer(
            self.state_size,
            discretization=self.discretization,
            scan=self.scan,
            oscillator_init=self.oscillator_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="ssm",
        )(x, mask=mask)
        x = nn.Dropout(self.dropout_rate)(nn.gelu(x, approximate=True), deterministic)
        dense = lambda name: nn.Dense(
            feats, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        x = dense("glu_value")(x) * nn.sigmoid(dense("glu_gate")(x))
        x = nn.Dropout(self.dropout_rate)(x, deterministic)
        return skip + x


class LinOSSModel(nn.Module):
    """The papers' model: linear encoder, ``num_blocks`` blocks, then a head.

    Input ``[batch, length, in_features]``. Classification: mean over (valid) time steps then
    a linear head, giving logits ``[batch, output_size]``. Regression: every
    ``output_step``-th step, a linear head and ``tanh``, giving
    ``[batch, length // output_step, output_size]``.

    Attributes:
      num_blocks: number of :class:`LinOSSBlock`.
      hidden_size: ``H``.
      state_size: ``P``.
      output_size: classes or regression targets.
      task: ``"classification"`` or ``"regression"``.
      output_step: subsampling of the regression head.
      discretization, scan, oscillator_init, norm, dropout_rate, norm_axis_name: per block.
      deterministic, dtype, param_dtype: as in Flax.
    """

    num_blocks: int
    hidden_size: int
    state_size: int
    output_size: int
    task: str = CLASSIFICATION
    output_step: int = 1
    discretization: str = ops.IM
    scan: str = ops.AUTO
    oscillator_init: Callable | None = None
    norm: str = "batch"
    dropout_rate: float = 0.05
    norm_axis_name: str | None = None
    deterministic: bool | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, *, deterministic: bool | None = None, mask: jax.Array | None = None
    ) -> jax.Array:
        """Applies the model to ``x [batch, length, in_features]`` (``mask [batch, length]``)."""
        check_model_options(self.task, self.output_step, self.num_blocks)
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        check_sequence_input(x, "LinOSSModel", rank=3)
        dense = lambda n, name: nn.Dense(
            n, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        x = dense(self.hidden_size, "encoder")(x)
        for i in range(self.num_blocks):
            x = LinOSSBlock(
                self.state_size,
                discretization=self.discretization,
                scan=self.scan,
                oscillator_init=self.oscillator_init,
                norm=self.norm,
                dropout_rate=self.dropout_rate,
                norm_axis_name=self.norm_axis_name,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"blocks_{i}",
            )(x, deterministic=deterministic, mask=mask)
        x = pool_or_subsample(x, self.task, self.output_step, mask)
        x = dense(self.output_size, "head")(x)
        return x if self.task == CLASSIFICATION else jnp.tanh(x)
