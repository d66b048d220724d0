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
    xf = x.astype(jnp.promote_types(jnp.float32, x.dtype))
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


#: Logical names of the recurrence's axes, read from the logical axis rules by
#: :func:`per_shard`: the batch, the length, and the oscillators (``P``).
BATCH_AXIS = "batch"
LENGTH_AXIS = "length"
OSCILLATOR_AXIS = "oscillator"
#: The outer-product block's heads (each its own memory): split like attention's heads.
HEADS_AXIS = "heads"


def _alternatives(rules, name):
    """The mesh-axis tuples ``rules`` offer for logical ``name``, in order (``()`` for an
    explicit ``None``, after which nothing else is offered)."""
    for logical, axes in rules or ():
        if logical != name:
            continue
        if axes is None:
            yield ()
            return
        yield (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_mesh(names, rules, mesh_shape, shape=None) -> tuple:
    """PartitionSpec entries for an array whose dimensions have logical ``names``.

    ``rules`` are flax's ``(logical name, mesh axis | tuple of axes | None)`` pairs; a name
    may appear several times: the first of its entries whose mesh axes are in
    ``mesh_shape``, not taken by an earlier dimension of this array and (given ``shape``)
    divide the dimension is used; otherwise the dimension is not sharded. Names without a
    rule (and ``None``) are not sharded.

    Args:
      names: one logical name (or ``None``) per dimension.
      rules: the logical axis rules.
      mesh_shape: mesh axis name -> size.
      shape: the array's shape, to skip entries that do not divide a dimension.

    Returns:
      One entry per dimension: ``None``, a mesh axis name or a tuple of them.
    """
    used: set[str] = set()
    out = []
    for i, name in enumerate(names):
        pick = None
        for axes in _alternatives(rules, name) if name is not None else ():
            if not axes:
                break
            if any(a not in mesh_shape or a in used for a in axes):
                continue
            if shape is not None and shape[i] % int(np.prod([mesh_shape[a] for a in axes])):
                continue
            pick = axes
            break
        if pick:
            used.update(pick)
        out.append(None if not pick else pick[0] if len(pick) == 1 else pick)
    return tuple(out)


def _axes_size(entry, sizes) -> int:
    """The number of devices a PartitionSpec entry splits a dimension over."""
    if entry is None:
        return 1
    return int(np.prod([sizes[a] for a in ((entry,) if isinstance(entry, str) else entry)]))


def explicit_spec(x: jax.Array) -> tuple:
    """``x``'s PartitionSpec entries under an explicit-axes mesh, one per dimension (the
    trailing ones a spec may leave out filled with ``None``)."""
    spec = tuple(jax.typeof(x).sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def split_axes(
    x: jax.Array, rules, oscillators: int | None = None, oscillator_name: str = OSCILLATOR_AXIS
):
    """How the mesh in context splits a recurrence's input ``x [batch..., L, H]``:
    ``(explicit, lead, seq, osc)`` (whether the mesh's axes are explicit, the batch axes'
    PartitionSpec entries, the mesh axis of the length, that of ``oscillators``), or
    ``None`` when nothing is split (no mesh, inside ``shard_map`` / ``pmap``, or every
    entry whole: a plain call, which XLA partitions under ``jit``).

    The logical ``rules`` (flax's ``(name, mesh axes)`` pairs) say which mesh axes split
    the first batch axis (``"batch"``), the length (``"length"``) and the ``oscillators``
    (logical ``oscillator_name``: ``"oscillator"``, or the outer block's ``"heads"``);
    under explicit axes the batch axes keep ``x``'s own sharding.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or jax.sharding.AxisType.Manual in tuple(mesh.axis_types):
        return None
    explicit = jax.sharding.AxisType.Explicit in tuple(mesh.axis_types)
    sizes = dict(mesh.shape)
    names = (BATCH_AXIS, LENGTH_AXIS, oscillator_name if oscillators else None)
    dims = (x.shape[0] if x.ndim > 2 else 1, x.shape[-2], oscillators or 1)
    batch, seq, osc = (
        None if _axes_size(a, sizes) == 1 else a for a in logical_to_mesh(names, rules, sizes, dims)
    )
    lead = (None,) * (x.ndim - 2)
    if explicit:
        lead = explicit_spec(x)[: x.ndim - 2]
        taken = {a for e in lead if e for a in ((e,) if isinstance(e, str) else e)}
        seq, osc = (None if a in taken else a for a in (seq, osc))
    elif x.ndim > 2:
        lead = (batch, *lead[1:])
    if not explicit and lead == (None,) * (x.ndim - 2) and seq is None and osc is None:
        return None
    return explicit, lead, seq, osc


def per_shard(
    fn, x: jax.Array, per_step: dict, state, params: dict, rules=None, per_row: dict | None = None
):
    """The recurrence ``fn`` run per device, with the sharding the mesh and rules ask for.

    ``fn(x, **per_step, **per_row, initial_state=state, **params, sequence_axis=,
    oscillator_axis=)`` is :func:`flax_linoss.ops.linoss_apply` with the layer's options
    bound; ``x [batch..., L, H]``, ``per_step`` arrays ``[batch..., L]`` (mask, segment ids,
    timestamps), ``per_row`` arrays ``[batch...]`` (an initial timestamp), ``state`` leaves
    ``[batch..., 2, P]`` (or ``None``), ``params`` ``a, dt, g [P]``, ``b [P, H, 2]``, ``c [H,
    P, 2]``, ``d [H]`` and the selective gate's ``dt_kernel [H, P]``, ``dt_down [H, r]``,
    ``dt_up [r, P]``, ``dt_bias [P]``.

    Under a mesh, the logical ``rules`` say how the batch, the length and the oscillators
    are split (:func:`split_axes`). ``fn`` then runs inside ``jax.shard_map`` on each
    device's rows, steps and oscillators: the length through ``linoss_apply(...,
    sequence_axis=)`` (per-shard scan, closed-form carry between shards), the oscillators
    through ``oscillator_axis=`` (each device runs its own; the output projection's sum over
    ``P`` is the one reduction). The parameters enter with their ``P`` axis split (whatever
    their sharding outside, e.g. over an fsdp axis: gathered as they enter) and ``H`` whole.
    A padding mask and packed segments (``segment_ids``) split with the length, and so do
    timestamps (a gap at a shard boundary reaches the last valid time before it: see
    ``ops.timestamp_gaps``).
    Without a mesh, inside ``shard_map`` / ``pmap``, or with nothing to split, this is
    ``fn(...)`` (under a plain ``jit`` XLA partitions it).

    Returns:
      ``fn``'s output ``[batch..., L, H]`` (and its final state, ``[batch..., 2, P]``).
    """
    per_row = {k: v for k, v in (per_row or {}).items() if v is not None}
    call = lambda x, per_step, per_row, state, params, **axes: fn(
        x, **per_step, **per_row, initial_state=state, **params, **axes
    )
    per_step = {k: v for k, v in per_step.items() if v is not None}
    params = {k: v for k, v in params.items() if v is not None}
    split = split_axes(x, rules, params["a"].shape[0])
    if split is None:
        return call(x, per_step, per_row, state, params)
    explicit, lead, seq, osc = split
    P = jax.sharding.PartitionSpec
    mesh = jax.sharding.get_abstract_mesh()
    row = P(*lead, seq, None)
    specs = (
        row,
        {k: P(*lead, seq) for k in per_step},
        {k: P(*lead) for k in per_row},
        None if state is None else jax.tree.map(lambda _: P(*lead, None, osc), state),
        {
            k: {
                "b": P(osc, None, None),
                "c": P(None, osc, None),
                "d": P(),
                "dt_kernel": P(None, osc),
                "dt_down": P(),
                "dt_up": P(None, osc),
            }.get(k, P(osc))
            for k in params
        },
    )
    args = (x, per_step, per_row, state, params)
    if explicit:
        args = jax.tree.map(jax.sharding.reshard, args, specs, is_leaf=lambda a: a is None)
    axes = {"sequence_axis": seq, "oscillator_axis": osc}
    plain = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    out_shape = jax.eval_shape(lambda *a: call(*a), *plain)
    out_specs = (
        (row, jax.tree.map(lambda _: P(*lead, None, osc), out_shape[1]))
        if isinstance(out_shape, tuple)
        else row
    )
    out = jax.shard_map(
        lambda *a: call(*a, **axes), mesh=mesh, in_specs=specs, out_specs=out_specs
    )(*args)
    if not explicit:
        return out
    first = jax.tree.leaves(out)[0]
    restored = jax.sharding.reshard(first, P(*(tuple(jax.typeof(x).sharding.spec))))
    return jax.tree.unflatten(jax.tree.structure(out), [restored, *jax.tree.leaves(out)[1:]])
