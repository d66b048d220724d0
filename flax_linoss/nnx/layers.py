"""The LinOSS layer, the papers' block and the papers' model, written once, in Flax nnx.

This is the one source of these modules: :mod:`flax_linoss.linen` derives its classes from
these (see :mod:`flax_linoss.linen.bridge`), with the same parameter names, shapes and
results. All math is in :mod:`flax_linoss.ops`.

Shapes: ``[batch, length, features]``; ``H`` features, ``P`` oscillators.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core.spmd import get_logical_axis_rules

from flax_linoss import ops
from flax_linoss.common import (
    BATCH,
    BATCH_RUNNING,
    BN_EPSILON,
    BN_MOMENTUM,
    CLASSIFICATION,
    check_dtypes,
    check_model_options,
    check_norm,
    check_rate,
    check_sequence_input,
    check_size,
    feature_mask,
    per_shard,
    pool_or_subsample,
    renamed_arguments,
    running_batch_norm,
)
from flax_linoss.ops._checks import check_per_step
from flax_linoss.ops.params import (
    STABLE,
    check_constraint,
    default_b_init,
    default_c_init,
    default_d_init,
)

Dtype = Any
Initializer = Callable[..., jax.Array]

__all__ = ["SOFTPLUS_INV_ONE", "LinOSSBlock", "LinOSSLayer", "LinOSSModel", "RunningBatchNorm"]

#: ``softplus^-1(1)``: the selective gate's bias at initialisation (a gate of exactly 1).
SOFTPLUS_INV_ONE = math.log(math.expm1(1.0))
_ZEROS = nnx.initializers.zeros_init()
_LECUN_NORMAL = nnx.initializers.lecun_normal()
_GATE_BIAS = nnx.initializers.constant(SOFTPLUS_INV_ONE)


class LinOSSLayer(nnx.Module):
    """One LinOSS / D-LinOSS state-space layer, ``[batch, length, H] -> [batch, length, H]``.

    Parameters: ``a_raw [P]``, ``dt_raw [P]``, ``g_raw [P]`` (damped only), ``b [P, H, 2]``,
    ``c [H, P, 2]`` (complex matrices as (re, im) pairs) and ``d [H]``; with ``selective``
    also ``dt_bias [P]`` and ``dt_kernel [H, P]`` (or, with ``selective_rank=r``,
    ``dt_down [H, r]`` and ``dt_up [r, P]``).

    Step sizes. By default every step advances each oscillator by its learned ``dt [P]``
    (time-invariant). Two options make the step vary (see :mod:`flax_linoss.ops.steps`):

    * ``timestamps [..., length]`` (a call argument, irregularly sampled series): step ``t``
      advances by ``dt * gap_t``, ``gap_t`` the time since the previous observation in
      units of ``time_scale`` (the first step: 1 unit; see
      :func:`flax_linoss.ops.timestamp_gaps`), as S5 does;
    * ``selective=True`` (input-dependent, as Mamba's): ``dt_t = dt * softplus(W x_t + b)``
      per oscillator, with ``W`` zero and ``b = softplus^-1(1)`` at initialisation, so the
      layer starts as the time-invariant one.

    Both together multiply. LinOSS-IMEX (``constraint="stable"``) and D-LinOSS clamp each
    step into their stable range (:func:`flax_linoss.ops.clamp_steps`); LinOSS-IM is stable
    for every step size.

    Args:
      in_features: ``H`` (``features=`` is accepted as an older alias).
      state_size: ``P``, the number of oscillators.
      discretization: ``"im"`` (LinOSS-IM), ``"imex"`` (LinOSS-IMEX) or ``"damped"``
        (D-LinOSS).
      scan: scan path, see :func:`flax_linoss.ops.linoss_apply` (a varying step needs a
        path that takes one: ``"auto"`` picks it).
      oscillator_init: ``(key, P, dtype) -> {"a_raw", "dt_raw"[, "g_raw"]}``; default: the
        papers' (uniform for LinOSS, ring for D-LinOSS).
      constraint: ``"stable"`` (default: LinOSS-IMEX's ``a`` is kept below ``4 / dt^2``,
        where its oscillators would grow without bound) or ``"paper"`` (the papers' exact
        ``relu``/``sigmoid``; the paper configs use it). LinOSS-IM is stable either way;
        D-LinOSS is kept strictly stable under both (float32 margins, see
        :mod:`flax_linoss.ops.params`). See :func:`flax_linoss.ops.constrain`.
      b_init, c_init, d_init: initialisers of ``b``, ``c``, ``d``.
      selective: input-dependent step sizes (see above).
      selective_rank: ``None`` for a full ``[H, P]`` projection ``dt_kernel``, or ``r`` for
        a rank-``r`` one, ``dt_down [H, r] @ dt_up [r, P]``.
      time_scale: the time unit of ``timestamps``: a gap of ``time_scale`` is one step of
        the learned ``dt``.
      dt_kernel_init: initialiser of ``dt_kernel`` (and of ``dt_up``); zeros by default.
      dt_down_init: initialiser of ``dt_down`` (low rank only).
      dt_bias_init: initialiser of ``dt_bias``; ``softplus^-1(1)`` by default.
      dtype: computation dtype of the projections (default: inferred from the input). The
        recurrence always runs in float32 or wider.
      param_dtype: parameter dtype.
      param_metadata: per parameter name, metadata for its ``nnx.Param`` (e.g.
        ``{"b": {"out_sharding": (None, "model", None)}}``).
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    @renamed_arguments(features="in_features")
    def __init__(
        self,
        in_features: int,
        state_size: int,
        *,
        discretization: str = ops.IM,
        scan: str = ops.AUTO,
        oscillator_init: Callable | None = None,
        b_init: Initializer = default_b_init,
        c_init: Initializer = default_c_init,
        d_init: Initializer = default_d_init,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        constraint: str = STABLE,
        param_metadata: Mapping[str, Mapping[str, Any]] | None = None,
        selective: bool = False,
        selective_rank: int | None = None,
        time_scale: float = 1.0,
        dt_kernel_init: Initializer = _ZEROS,
        dt_down_init: Initializer = _LECUN_NORMAL,
        dt_bias_init: Initializer = _GATE_BIAS,
        rngs: nnx.Rngs,
    ):
        self.in_features = check_size("LinOSSLayer", "in_features", in_features)
        self.state_size = check_size("LinOSSLayer", "state_size", state_size)
        self.discretization = ops.schemes.check_discretization(discretization)
        self.scan = ops.table.check_scan(scan)
        self.constraint = check_constraint(constraint)
        check_dtypes("LinOSSLayer", dtype, param_dtype)
        if selective_rank is not None:
            check_size("LinOSSLayer", "selective_rank", selective_rank)
            if not selective:
                raise ValueError("LinOSSLayer: selective_rank is an option of selective=True.")
        if not (isinstance(time_scale, int | float) and time_scale > 0):
            raise ValueError(f"LinOSSLayer: time_scale must be a number > 0, got {time_scale!r}.")
        self.selective = selective
        self.selective_rank = selective_rank
        self.time_scale = float(time_scale)
        self.dtype = dtype
        self.param_dtype = param_dtype
        raw = ops.init_oscillators(
            rngs.params(), state_size, discretization, oscillator_init, param_dtype
        )
        meta = lambda name: dict((param_metadata or {}).get(name, {}))
        param = lambda name, value: nnx.Param(value, **meta(name))
        self.a_raw = param("a_raw", raw["a_raw"])
        self.dt_raw = param("dt_raw", raw["dt_raw"])
        self.g_raw = param("g_raw", raw["g_raw"]) if discretization == ops.DAMPED else None
        self.b = param("b", b_init(rngs.params(), (state_size, in_features, 2), param_dtype))
        self.c = param("c", c_init(rngs.params(), (in_features, state_size, 2), param_dtype))
        self.d = param("d", d_init(rngs.params(), (in_features,), param_dtype))
        # The selective gate (absent attributes are None, like g_raw).
        low_rank = selective and selective_rank is not None
        full, down, up = (
            (in_features, state_size),
            (in_features, selective_rank),
            (
                selective_rank,
                state_size,
            ),
        )
        new = lambda name, init, shape: param(name, init(rngs.params(), shape, param_dtype))
        self.dt_bias = new("dt_bias", dt_bias_init, (state_size,)) if selective else None
        self.dt_kernel = (
            new("dt_kernel", dt_kernel_init, full) if selective and not low_rank else None
        )
        self.dt_down = new("dt_down", dt_down_init, down) if low_rank else None
        self.dt_up = new("dt_up", dt_kernel_init, up) if low_rank else None

    @property
    def features(self) -> int:
        """Older name of :attr:`in_features`."""
        return self.in_features

    def constrained(self) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """The constrained ``(a, dt, g)``, each ``[P]`` (``g`` is ``None`` unless damped)."""
        g_raw = None if self.g_raw is None else self.g_raw[...]
        return ops.constrain(
            self.discretization,
            self.a_raw[...],
            self.dt_raw[...],
            g_raw,
            constraint=self.constraint,
        )

    def _gate_params(self) -> dict[str, jax.Array | None]:
        return {
            name: None if p is None else p[...]
            for name, p in (
                ("dt_kernel", self.dt_kernel),
                ("dt_down", self.dt_down),
                ("dt_up", self.dt_up),
                ("dt_bias", self.dt_bias),
            )
        }

    def step_sizes(
        self,
        x: jax.Array,
        *,
        timestamps: jax.Array | None = None,
        mask: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        reverse: bool = False,
        initial_timestamp: jax.Array | None = None,
    ) -> jax.Array:
        """The step sizes the layer runs with: ``dt [P]``, or per step ``[..., length, P]``
        with ``timestamps`` or ``selective`` (arguments as in :meth:`__call__`)."""
        a, dt, g = self.constrained()
        gate = self._gate_params()
        (x,) = nnx.nn.dtypes.promote_dtype((x,), dtype=self.dtype)
        return _step_sizes(
            self, x, a, dt, g, timestamps, mask, segment_ids, reverse, initial_timestamp, **gate
        )

    def __call__(
        self,
        x: jax.Array,
        *,
        initial_state: ops.LinOSSState | None = None,
        return_state: bool = False,
        reverse: bool = False,
        mask: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        timestamps: jax.Array | None = None,
        initial_timestamp: jax.Array | None = None,
    ):
        """Applies the layer.

        Args:
          x: ``[..., length, H]`` input.
          initial_state: optional :class:`~flax_linoss.ops.LinOSSState` (``[..., 2, P]``).
          return_state: also return the final state.
          reverse: run the recurrence from the last step to the first.
          mask: optional ``[..., length]`` bool, ``True`` = valid step.
          segment_ids: optional ``[..., length]`` int; the state restarts per segment.
          timestamps: optional ``[..., length]`` observation times (increasing over the
            valid steps; padded steps masked with ``mask``): each step advances by ``dt``
            times the gap to the previous observation, in units of ``time_scale``.
          initial_timestamp: optional ``[...]``, the time of the observation that produced
            ``initial_state`` (streaming with timestamps); without it the first step's gap
            is one time unit.

        Returns:
          ``[..., length, H]``, and the final state if ``return_state``.
        """
        # Shapes are checked once, at the ops boundary (values need no check: constrained).
        gate = self._gate_params()
        names = [k for k, v in gate.items() if v is not None]
        x, b, c, d, *weights = nnx.nn.dtypes.promote_dtype(
            (x, self.b[...], self.c[...], self.d[...], *(gate[k] for k in names)),
            dtype=self.dtype,
        )
        gate.update(zip(names, weights))
        a, dt, g = self.constrained()
        if timestamps is not None:
            check_per_step("timestamps", timestamps, x.shape[:-1])

        def core(
            x,
            a,
            dt,
            b,
            c,
            d,
            g=None,
            initial_state=None,
            mask=None,
            segment_ids=None,
            timestamps=None,
            initial_timestamp=None,
            dt_kernel=None,
            dt_down=None,
            dt_up=None,
            dt_bias=None,
            **axes,
        ):
            dt = _step_sizes(
                self,
                x,
                a,
                dt,
                g,
                timestamps,
                mask,
                segment_ids,
                reverse,
                initial_timestamp,
                dt_kernel=dt_kernel,
                dt_down=dt_down,
                dt_up=dt_up,
                dt_bias=dt_bias,
                sequence_axis=axes.get("sequence_axis"),
            )
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
                check="shapes",
                **axes,
            )

        # Under a mesh, the logical axis rules say how the batch, the length and the
        # oscillators are split (see flax_linoss.common.per_shard).
        return per_shard(
            core,
            x,
            {"mask": mask, "segment_ids": segment_ids, "timestamps": timestamps},
            initial_state,
            {"a": a, "dt": dt, "b": b, "c": c, "d": d, "g": g, **gate},
            get_logical_axis_rules(),
            per_row={"initial_timestamp": initial_timestamp},
        )


def _step_sizes(
    layer: LinOSSLayer,
    x,
    a,
    dt,
    g,
    timestamps,
    mask,
    segment_ids,
    reverse,
    initial_timestamp,
    dt_kernel=None,
    dt_down=None,
    dt_up=None,
    dt_bias=None,
    sequence_axis=None,
):
    """``dt [P]``, or per step ``[..., L, P]`` from timestamps and the selective gate,
    clamped into the scheme's stable range (``sequence_axis``: this shard's steps of a
    sequence split over it)."""
    if timestamps is None and not layer.selective:
        return dt
    steps = dt
    if layer.selective:
        rdt = jnp.promote_types(jnp.float32, jnp.result_type(a, dt))
        if dt_kernel is None:  # low rank
            h = jnp.matmul(x, dt_down, preferred_element_type=rdt).astype(x.dtype)
            pre = jnp.matmul(h, dt_up, preferred_element_type=rdt)
        else:
            pre = jnp.matmul(x, dt_kernel, preferred_element_type=rdt)
        steps = steps * jax.nn.softplus(pre + dt_bias.astype(rdt))
    if timestamps is not None:
        gaps = ops.timestamp_gaps(
            timestamps,
            mask=mask,
            segment_ids=segment_ids,
            reverse=reverse,
            initial_timestamp=initial_timestamp,
            time_scale=layer.time_scale,
            sequence_axis=sequence_axis,
        )
        steps = steps * jnp.broadcast_to(gaps, x.shape[:-1])[..., None].astype(steps.dtype)
    return ops.clamp_steps(layer.discretization, a, steps, g, constraint=layer.constraint)


class RunningBatchNorm(nnx.Module):
    """The reference code's batch norm (see :func:`flax_linoss.common.running_batch_norm`).

    ``[..., L, H] -> [..., L, H]``; ``nnx.BatchStat`` statistics ``mean``, ``var`` (``[H]``)
    and ``initialized`` (the equinox "first time" flag).

    Args:
      num_features: ``H``.
      axis_name: mapped axis over which the statistics are averaged (data parallelism).
      stats_dtype: the statistics' dtype (float32, or float64 with float64 parameters).
      rngs: accepted like ``nnx.BatchNorm``'s (nothing is random here).
    """

    def __init__(
        self,
        num_features: int,
        *,
        axis_name: str | None = None,
        stats_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        del rngs
        self.axis_name = axis_name
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), stats_dtype))
        self.var = nnx.BatchStat(jnp.ones((num_features,), stats_dtype))
        self.initialized = nnx.BatchStat(jnp.zeros((), bool))

    def __call__(self, x, *, use_running_average: bool, mask=None):
        train = not use_running_average
        y, stats = running_batch_norm(
            x,
            self.mean[...],
            self.var[...],
            self.initialized[...],
            train=train,
            mask=mask,
            axis_name=self.axis_name,
        )
        if train:
            self.mean[...], self.var[...], self.initialized[...] = stats
        return y


def _norm(kind, features, axis_name, dtype, param_dtype, rngs):
    stats = jnp.promote_types(jnp.float32, param_dtype)  # float32, or float64
    if kind == BATCH_RUNNING:
        return RunningBatchNorm(features, axis_name=axis_name, stats_dtype=stats)
    if kind == BATCH:
        # The papers' batch norm: per channel over batch and time, no affine part.
        norm = nnx.BatchNorm(
            features,
            momentum=BN_MOMENTUM,
            epsilon=BN_EPSILON,
            use_bias=False,
            use_scale=False,
            axis_name=axis_name,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        for stat in (norm.mean, norm.var):  # Flax makes them float32 whatever param_dtype is
            stat.set_value(stat[...].astype(stats))
        return norm
    if kind == "layer":
        return nnx.LayerNorm(
            features, epsilon=BN_EPSILON, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
    return nnx.RMSNorm(
        features, epsilon=BN_EPSILON, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )


class LinOSSBlock(nnx.Module):
    """The papers' block: norm, LinOSS, GELU, dropout, GLU, dropout, residual.

    ``[batch, length, H] -> [batch, length, H]``. Batch norms keep their running statistics
    as ``nnx.BatchStat`` (the ``"batch_stats"`` collection in linen).

    Args:
      in_features: ``H`` (``features=`` is accepted as an older alias).
      state_size: ``P``.
      discretization, scan, oscillator_init, constraint, selective, selective_rank,
        time_scale: passed to :class:`LinOSSLayer`.
      norm: ``"batch"`` (Flax's batch norm), ``"batch_running"`` (the reference code's, see
        :class:`RunningBatchNorm`), ``"layer"`` or ``"rms"``.
      dropout_rate: dropout after the GELU and after the GLU.
      norm_axis_name: mapped axis over which batch statistics are averaged (data parallel).
      deterministic: default mode (``model.eval()`` / ``model.train()`` set it too).
      dtype, param_dtype: as in Flax.
      rngs: ``nnx.Rngs`` with ``params`` (and ``dropout`` for training).
    """

    @renamed_arguments(features="in_features")
    def __init__(
        self,
        in_features: int,
        state_size: int,
        *,
        discretization: str = ops.IM,
        scan: str = ops.AUTO,
        oscillator_init: Callable | None = None,
        norm: str = BATCH,
        dropout_rate: float = 0.05,
        norm_axis_name: str | None = None,
        deterministic: bool = False,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        constraint: str = STABLE,
        selective: bool = False,
        selective_rank: int | None = None,
        time_scale: float = 1.0,
        rngs: nnx.Rngs,
    ):
        self.in_features = check_size("LinOSSBlock", "in_features", in_features)
        self.norm_kind = check_norm(norm)
        self.dropout_rate = check_rate("LinOSSBlock", "dropout_rate", dropout_rate)
        check_dtypes("LinOSSBlock", dtype, param_dtype)
        self.deterministic = deterministic
        self.norm = _norm(norm, in_features, norm_axis_name, dtype, param_dtype, rngs)
        self.ssm = LinOSSLayer(
            in_features,
            state_size,
            discretization=discretization,
            scan=scan,
            oscillator_init=oscillator_init,
            constraint=constraint,
            selective=selective,
            selective_rank=selective_rank,
            time_scale=time_scale,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        linear = lambda: nnx.Linear(
            in_features, in_features, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.glu_value = linear()
        self.glu_gate = linear()
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        *,
        deterministic: bool | None = None,
        mask: jax.Array | None = None,
        timestamps: jax.Array | None = None,
    ) -> jax.Array:
        """Applies the block to ``x [batch, length, H]``; ``mask [batch, length]`` optional
        (``True`` = valid step; padded steps never influence valid ones or the statistics);
        ``timestamps [batch, length]`` optional (irregular sampling, see
        :class:`LinOSSLayer`).
        """
        check_sequence_input(x, "LinOSSBlock", rank=3, features=self.in_features)
        return self._forward(x, deterministic=deterministic, mask=mask, timestamps=timestamps)

    def _forward(self, x, *, deterministic, mask, timestamps=None):
        """The block on an already checked input (the model checks its own input once)."""
        deterministic = self.deterministic if deterministic is None else deterministic
        skip = x
        if self.norm_kind in (BATCH, BATCH_RUNNING):
            x = self.norm(x, use_running_average=deterministic, mask=feature_mask(mask, x))
        else:
            x = self.norm(x)
        x = self.ssm(x, mask=mask, timestamps=timestamps)
        x = self.dropout(jax.nn.gelu(x, approximate=True), deterministic=deterministic)
        x = self.glu_value(x) * jax.nn.sigmoid(self.glu_gate(x))
        x = self.dropout(x, deterministic=deterministic)
        return skip + x


class LinOSSModel(nnx.Module):
    """The papers' model: linear encoder, ``num_blocks`` blocks, then a head.

    Input ``[batch, length, in_features]``. Classification: mean over (valid) time steps then
    a linear head, giving logits ``[batch, output_size]``. Regression: every
    ``output_step``-th step, a linear head and ``tanh``, giving
    ``[batch, length // output_step, output_size]``.

    Args:
      in_features: input channels.
      num_blocks: number of :class:`LinOSSBlock`.
      hidden_size: ``H``.
      state_size: ``P``.
      output_size: classes or regression targets.
      task: ``"classification"`` or ``"regression"``.
      output_step: subsampling of the regression head.
      discretization, scan, oscillator_init, constraint, norm, dropout_rate, norm_axis_name,
        selective, selective_rank, time_scale: per block (see :class:`LinOSSLayer`).
      deterministic, dtype, param_dtype: as in Flax.
      rngs: ``nnx.Rngs`` with ``params`` (and ``dropout`` for training).
    """

    def __init__(
        self,
        in_features: int,
        num_blocks: int,
        hidden_size: int,
        state_size: int,
        output_size: int,
        *,
        task: str = CLASSIFICATION,
        output_step: int = 1,
        discretization: str = ops.IM,
        scan: str = ops.AUTO,
        oscillator_init: Callable | None = None,
        norm: str = BATCH,
        dropout_rate: float = 0.05,
        norm_axis_name: str | None = None,
        deterministic: bool = False,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        constraint: str = STABLE,
        selective: bool = False,
        selective_rank: int | None = None,
        time_scale: float = 1.0,
        rngs: nnx.Rngs,
    ):
        check_model_options(task, output_step, num_blocks)
        self.in_features = check_size("LinOSSModel", "in_features", in_features)
        for name, value in (("hidden_size", hidden_size), ("state_size", state_size)):
            check_size("LinOSSModel", name, value)
        check_size("LinOSSModel", "output_size", output_size)
        check_rate("LinOSSModel", "dropout_rate", dropout_rate)
        check_dtypes("LinOSSModel", dtype, param_dtype)
        self.task = task
        self.output_step = output_step
        self.deterministic = deterministic
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = nnx.Linear(in_features, hidden_size, **kw)
        self.blocks = nnx.List(
            [
                LinOSSBlock(
                    hidden_size,
                    state_size,
                    discretization=discretization,
                    scan=scan,
                    oscillator_init=oscillator_init,
                    constraint=constraint,
                    norm=norm,
                    dropout_rate=dropout_rate,
                    norm_axis_name=norm_axis_name,
                    deterministic=deterministic,
                    selective=selective,
                    selective_rank=selective_rank,
                    time_scale=time_scale,
                    **kw,
                )
                for _ in range(num_blocks)
            ]
        )
        self.head = nnx.Linear(hidden_size, output_size, **kw)

    def __call__(
        self,
        x: jax.Array,
        *,
        deterministic: bool | None = None,
        mask: jax.Array | None = None,
        timestamps: jax.Array | None = None,
    ) -> jax.Array:
        """Applies the model to ``x [batch, length, in_features]`` (``mask [batch, length]``;
        ``timestamps [batch, length]`` for irregularly sampled series, see
        :class:`LinOSSLayer`)."""
        deterministic = self.deterministic if deterministic is None else deterministic
        check_sequence_input(x, "LinOSSModel", rank=3, features=self.in_features)
        x = self.encoder(x)
        for block in self.blocks:
            x = block._forward(x, deterministic=deterministic, mask=mask, timestamps=timestamps)
        x = self.head(pool_or_subsample(x, self.task, self.output_step, mask))
        return x if self.task == CLASSIFICATION else jnp.tanh(x)
