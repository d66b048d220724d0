"""Small pieces shared by the linen and nnx skins (validation, pooling). No Flax here."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

CLASSIFICATION = "classification"
REGRESSION = "regression"
TASKS = (CLASSIFICATION, REGRESSION)
#: Block normalisations. ``"batch"``: Flax's ``BatchNorm`` (training normalises with the batch's
#: statistics); ``"batch_running"``: the reference code's (equinox 0.11) batch norm, which in
#: training normalises with the running statistics after updating them with the batch's;
#: ``"layer"``, ``"rms"``.
BATCH = "batch"
BATCH_RUNNING = "batch_running"
NORMS = (BATCH, BATCH_RUNNING, "layer", "rms")
#: Momentum and epsilon of both batch norms (the papers').
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-5


def check_sequence_input(
    x, where: str, rank: int | None = None, features: int | None = None
) -> None:
    """Raises if ``x`` is not a real floating ``[..., length, features]`` array (of ``rank``
    dimensions and ``features`` features, where given)."""
    ndim = np.ndim(x)
    if rank is not None and ndim != rank:
        raise ValueError(
            f"{where} expects input of rank {rank} ([batch, length, features]), "
            f"got shape {np.shape(x)}."
        )
    if ndim < 2:
        raise ValueError(f"{where} expects [..., length, features], got shape {np.shape(x)}.")
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"{where} expects a floating input, got dtype {jnp.result_type(x)}.")
    if features is not None and np.shape(x)[-1] != features:
        raise ValueError(
            f"{where} was built for {features} features but got input of shape "
            f"{np.shape(x)} ({np.shape(x)[-1]} features)."
        )


def check_size(where: str, name: str, value) -> int:
    """Returns ``value`` if it is a positive int, else raises a clear ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{where}: {name} must be a positive int, got {value!r}.")
    return int(value)


def check_rate(where: str, name: str, value) -> float:
    """Returns ``value`` if it is a real number in ``[0, 1)`` (a dropout rate), else raises."""
    ok = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
    if not ok or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{where}: {name} must be a number in [0, 1), got {value!r}.")
    return float(value)


def check_dtypes(where: str, dtype, param_dtype) -> None:
    """Raises unless ``dtype`` (``None`` allowed) and ``param_dtype`` are real floating."""
    for name, value in (("dtype", dtype), ("param_dtype", param_dtype)):
        if value is None and name == "dtype":
            continue
        try:
            ok = jnp.issubdtype(jnp.dtype(value), jnp.floating)
        except TypeError:
            ok = False
        if not ok:
            raise TypeError(
                f"{where}: {name} must be a real floating dtype (float32, bfloat16, "
                f"float64, ...), got {value!r}."
            )


def renamed_arguments(**renames: str):
    """Accepts older keyword names: ``@renamed_arguments(features="in_features")`` lets
    callers pass ``features=`` for ``in_features`` (both at once is an error). The wrapped
    function keeps its signature (``inspect.signature`` follows ``__wrapped__``)."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"pass {new}= or its older name {old}=, not both")
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper

    return decorate


def check_norm(kind: str) -> str:
    if kind not in NORMS:
        raise ValueError(f"Unknown norm {kind!r}; expected one of {list(NORMS)}.")
    return kind


def check_model_options(task: str, output_step: int, num_blocks: int) -> None:
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; expected one of {list(TASKS)}.")
    if output_step < 1:
        raise ValueError(f"output_step must be >= 1, got {output_step}.")
    check_size("LinOSSModel", "num_blocks", num_blocks)


def feature_mask(mask, x):
    """A per-step ``[..., L]`` mask broadcast to ``x [..., L, H]`` (for batch norm), or None."""
    return None if mask is None else jnp.broadcast_to(mask[..., None], x.shape)


def pool_or_subsample(x: jax.Array, task: str, output_step: int, mask=None) -> jax.Array:
    """Classification: mean over valid steps ``[B, L, H] -> [B, H]``; regression: every
    ``output_step``-th step ``[B, L, H] -> [B, L // output_step, H]``."""
    if task == CLASSIFICATION:
        if mask is None:
            return jnp.mean(x, axis=-2)
        w = mask.astype(x.dtype)[..., None]
        return jnp.sum(x * w, axis=-2) / jnp.maximum(jnp.sum(w, axis=-2), 1)
    return x[..., output_step - 1 :: output_step, :]


def running_batch_norm(
    x: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    initialized: jax.Array,
    *,
    train: bool,
    mask: jax.Array | None = None,
    axis_name: str | None = None,
    momentum: float = BN_MOMENTUM,
    epsilon: float = BN_EPSILON,
):
    """The reference code's batch norm (equinox 0.11.4 ``BatchNorm``, no affine part).

    Statistics are per channel over batch and time (and over ``axis_name``, for data
    parallelism). In training the running statistics are first updated with the batch's,
    ``r = momentum * r + (1 - momentum) * batch`` (the first call sets ``r = batch``), and
    ``x`` is normalised with the **updated running** statistics; gradients flow through the
    batch statistics. In inference ``x`` is normalised with the stored running statistics.
    The variance is the two-pass ``mean((x - mean)^2)``, as in equinox.

    Args:
      x: ``[..., L, H]``.
      mean, var: ``[H]`` running statistics.
      initialized: scalar bool, whether a training call has set the statistics.
      train: update and use the statistics as in training.
      mask: optional ``[..., L, H]`` (or broadcastable) bool; statistics over valid entries.
      axis_name: mapped axis to average the statistics over.
      momentum, epsilon: as in equinox (0.99, 1e-5).

    Returns:
      ``(y [..., L, H], (mean, var, initialized))`` with the new statistics.
    """
    xf = x.astype(jnp.float32)
    if train:
        axes = tuple(range(x.ndim - 1))
        w = jnp.ones_like(xf) if mask is None else jnp.broadcast_to(mask, x.shape).astype(xf.dtype)

        def total(a):
            s = jnp.sum(a, axis=axes)
            return s if axis_name is None else jax.lax.psum(s, axis_name)

        count = jnp.maximum(total(w), 1.0)
        batch_mean = total(xf * w) / count
        batch_var = total(jnp.square(xf - batch_mean) * w) / count
        mean = jnp.where(initialized, momentum * mean + (1 - momentum) * batch_mean, batch_mean)
        var = jnp.where(initialized, momentum * var + (1 - momentum) * batch_var, batch_var)
        initialized = jnp.ones_like(initialized)
    y = (xf - mean) * jax.lax.rsqrt(var + epsilon)
    return y.astype(x.dtype), (mean, var, initialized)


def per_shard(fn, x: jax.Array, per_example: dict, replicated: dict):
    """``fn(x, **per_example, **replicated)``, run per device under a mesh with explicit axes.

    ``x [batch..., L, H]`` and every ``per_example`` array (leading axes ``batch...``) keep
    the sharding of ``x``'s batch axes; the length and feature axes are gathered and the
    ``replicated`` arrays (parameters) replicated, and ``fn`` runs inside ``shard_map`` on
    each device's rows, as on one device. The output ``[batch..., L, H]`` (and any other
    output with the batch axes in front) gets ``x``'s sharding back. Elsewhere (no mesh, or
    automatic axes) this is just ``fn(...)``.

    Why: explicit sharding refuses the recurrence's input projection when ``H`` is sharded
    (tensor-parallel metadata shards it) and needs carry shardings the scans do not know;
    per device the layer is an ordinary data-parallel computation.
    """
    mesh = jax.sharding.get_abstract_mesh()
    explicit = jax.sharding.AxisType.Explicit
    if mesh.empty or explicit not in tuple(mesh.axis_types):
        return fn(x, **per_example, **replicated)
    P = jax.sharding.PartitionSpec
    spec = tuple(jax.typeof(x).sharding.spec)
    spec = spec + (None,) * (x.ndim - len(spec))
    lead = spec[:-2]

    def rows(a):
        return P(*lead, *([None] * (a.ndim - len(lead))))

    per_example = {k: v for k, v in per_example.items() if v is not None}
    replicated = {k: v for k, v in replicated.items() if v is not None}
    args = (x, per_example, replicated)
    specs = (rows(x), jax.tree.map(rows, per_example), jax.tree.map(lambda _: P(), replicated))
    args = jax.tree.map(jax.sharding.reshard, args, specs)
    plain = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    out_shape = jax.eval_shape(lambda a, e, r: fn(a, **e, **r), *plain)
    mapped = jax.shard_map(
        lambda a, e, r: fn(a, **e, **r),
        mesh=mesh,
        in_specs=specs,
        out_specs=jax.tree.map(rows, out_shape),
        check_vma=False,
    )
    out = mapped(*args)
    first = jax.tree.leaves(out)[0]
    restored = jax.sharding.reshard(first, P(*spec))
    return jax.tree.unflatten(jax.tree.structure(out), [restored, *jax.tree.leaves(out)[1:]])
