"""One trainer for the linen and the nnx models, in small named steps.

Reads like flax's lm1b ``train.py``: :func:`setup` (config checks, devices, data, model,
optimiser), :func:`create_train_state`, one training step (:func:`make_step_fn`, run by
:class:`~flax_linoss.train.parallel.Parallel`), periodic evaluation (:func:`evaluate_model`),
checkpoints (:mod:`flax_linoss.train.checkpoint`) and early stopping
(:class:`EarlyStopping`), tied together by :func:`train_and_evaluate`.

Each API trains in its own form (:mod:`flax_linoss.train.model`): linen variables for
linen, ``nnx.State`` for nnx. The train state is a :class:`TrainState` (step, parameters,
batch statistics, optimiser state, dropout key), created inside ``jit`` already sharded as
the logical axis rules say (:mod:`flax_linoss.train.sharding`), donated to every step and
kept on device. Checkpoints store it as it is (Orbax writes each device's shards) and
record the API; a run restores onto whatever mesh it has, and a run restored with the other
API is converted through :func:`flax_linoss.train.model.to_framework`.

The dropout key of step ``s`` is ``fold_in(rng, s)`` and the data order is a function of the
seed and the Grain iterator position, so a resumed run continues bit for bit (same devices).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from flax_linoss.train import checkpoint as ckpt_lib
from flax_linoss.train import config as config_lib
from flax_linoss.train import data as data_lib
from flax_linoss.train import metrics as metrics_lib
from flax_linoss.train import parallel as par_lib
from flax_linoss.train import sharding as sharding_lib
from flax_linoss.train import workdir as workdir_lib
from flax_linoss.train.model import (
    ModelFns,
    ModelSpec,
    make_model,
    model_signature,
    to_framework,
)

__all__ = [
    "EarlyStopping",
    "ModelFns",
    "NonFiniteLossError",
    "Run",
    "Setup",
    "TrainState",
    "create_train_state",
    "evaluate",
    "evaluate_model",
    "make_model",
    "make_optimizer",
    "make_step_fn",
    "model_signature",
    "restore_state",
    "setup",
    "setup_distributed",
    "train_and_evaluate",
]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


# ----------------------------------------------------------------------------------------
# Set-up.


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam/AdamW with optional warmup + cosine schedule and gradient clipping."""
    o = config.optimizer
    tx = (optax.adamw if o.name == "adamw" else optax.adam)(**_optimizer_args(config))
    if o.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
    return tx


def learning_rate(config: ml_collections.ConfigDict) -> optax.Schedule:
    """The learning rate as a function of the step (also logged to TensorBoard)."""
    o = config.optimizer
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=o.learning_rate,
            warmup_steps=o.warmup_steps,
            decay_steps=config.train.num_steps,
            end_value=o.learning_rate * o.end_lr_factor,
        )
    if o.warmup_steps:
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps),
                optax.constant_schedule(o.learning_rate),
            ],
            [o.warmup_steps],
        )
    return optax.constant_schedule(o.learning_rate)


def _optimizer_args(config: ml_collections.ConfigDict) -> dict[str, Any]:
    o = config.optimizer
    schedule = o.schedule == "cosine" or o.warmup_steps
    args: dict[str, Any] = {"learning_rate": learning_rate(config) if schedule else o.learning_rate}
    if o.name == "adamw":
        args["weight_decay"] = o.weight_decay
    return args


def setup_distributed(config: ml_collections.ConfigDict) -> None:
    """``jax.distributed.initialize`` when ``parallel.distributed`` (once per process)."""
    p = config.parallel
    if not p.distributed or jax.distributed.is_initialized():
        return
    kwargs = {}
    if p.coordinator_address:
        kwargs["coordinator_address"] = p.coordinator_address
    if p.num_processes:
        kwargs["num_processes"] = p.num_processes
    if p.process_id >= 0:
        kwargs["process_id"] = p.process_id
    if jax.config.jax_platforms == "cpu" or os.environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes, one pytree (checkpointed as it is).

    Attributes:
        step: Steps taken (int32 scalar).
        params: The model's parameters in its API's form (linen dict or ``nnx.State``).
        batch_stats: Its batch-norm statistics (same form; empty without batch norm).
        opt_state: The optax state of ``params``.
        rng: The run's dropout key; step ``s`` uses ``fold_in(rng, s)``.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array

    @property
    def variables(self) -> dict[str, Any]:
        """``{"params", "batch_stats"}``: what the model applies."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def init_state(fns: ModelFns, tx: optax.GradientTransformation, seed, example) -> TrainState:
    """A fresh train state from ``seed`` (an int, or the key ``jax.random.PRNGKey(seed)``;
    pure: call it inside ``jit``)."""
    key = jax.random.PRNGKey(seed) if isinstance(seed, int | np.integer) else seed
    init_key, dropout_key = jax.random.split(key)
    variables = fns.init(init_key, jnp.asarray(example))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
        rng=dropout_key,
    )


@dataclasses.dataclass
class Setup:
    """Everything a run needs, built from a config before anything is compiled."""

    config: ml_collections.ConfigDict
    splits: Any
    shape: dict[str, Any]
    mesh: jax.sharding.Mesh
    parallel: par_lib.Parallel
    fns: ModelFns  # global-view model (evaluation)
    tx: optax.GradientTransformation
    example: np.ndarray
    signature: dict[str, Any]
    spec: ModelSpec
    logical: dict  # linen path -> logical axes of the model's variables
    abstract_state: TrainState  # ShapeDtypeStruct leaves carrying their shardings
    decoder: Any = None  # token tasks: the cached-decoding function, made on first use

    @property
    def metric(self) -> str:
        return metric_name(self.shape["task"])

    def abstract_state_of(self, fns: ModelFns) -> TrainState:
        """The train state of ``fns`` (this model in either API) as ``ShapeDtypeStruct``
        leaves with the shardings the rules give it on this mesh (a restore target)."""
        abstract = jax.eval_shape(lambda: init_state(fns, self.tx, self.config.seed, self.example))
        shardings = sharding_lib.state_shardings(
            abstract, self.logical, self.parallel.rules, self.mesh
        )
        return ckpt_lib.abstract_like(abstract, shardings)


def setup(config: ml_collections.ConfigDict) -> Setup:
    """Checks the config, then builds devices, data, model, optimiser and the step."""
    config_lib.validate(config)
    p = config.parallel
    impl = p.implementation
    if impl == "pmap":
        ok, why = par_lib.pmap_available()
        if not ok:
            raise config_lib.ConfigError(why)
    setup_distributed(config)
    try:
        mesh = par_lib.make_mesh(
            p.num_devices,
            p.model_axis_size,
            fsdp_axis_size=p.fsdp_axis_size,
            sequence_axis_size=p.sequence_axis_size,
        )
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None
    m = config.model
    if (
        m.dtype == "float16"
        and m.kind == "transformer"
        and "attention" in m.mixer.split(",")
        and mesh.devices.flat[0].platform == "cpu"
    ):
        raise config_lib.ConfigError(
            "model.dtype='float16' with attention needs a GPU or TPU: Flax's attention asks "
            "for float16 products summed in float32, which XLA's CPU backend lacks; use "
            "bfloat16 on CPU."
        )
    splits = data_lib.load_dataset(config)
    shape = data_lib.model_shape(splits.info, config.data.time_channel)
    if (shape["task"] == "lm") != (config.model.kind == "transformer"):
        raise config_lib.ConfigError(
            f"model.kind={config.model.kind!r} cannot train on {config.data.name!r} (a "
            f"{shape['task']} task): token tasks need model.kind='transformer', series tasks "
            "model.kind='paper'."
        )
    first = {k: np.asarray(v)[None] for k, v in splits["train"][0].items()}
    first["valid"] = np.ones((1,), bool)
    example = data_lib.prepare_batch(config, first)["series"]
    if example.shape[1] % p.sequence_axis_size:
        raise config_lib.ConfigError(
            f"parallel.sequence_axis_size={p.sequence_axis_size} must divide the sequence "
            f"length {example.shape[1]}."
        )
    spec = ModelSpec.from_config(config, shape)
    rules = sharding_lib.parse_rules(p.logical_axis_rules)
    fns = make_model(config, spec)
    tx = make_optimizer(config)
    logical = sharding_lib.model_logical_axes(spec)
    abstract = jax.eval_shape(lambda: init_state(fns, tx, config.seed, example))
    shardings = sharding_lib.state_shardings(abstract, logical, rules, mesh)
    axis_name = par_lib.step_axis_name(impl, rules, mesh)
    step_fns = fns if axis_name is None else make_model(config, spec, axis_name=axis_name)
    parallel = par_lib.Parallel(impl, mesh, make_step_fn(step_fns, tx), shardings, rules)
    par_lib.check_batch(config.data.batch_size, parallel)
    if config.data.eval_batch_size % (parallel.data_size * jax.process_count()):
        raise config_lib.ConfigError(
            f"data.eval_batch_size {config.data.eval_batch_size} must be a multiple of "
            f"{parallel.data_size * jax.process_count()}"
        )
    return Setup(
        config,
        splits,
        shape,
        mesh,
        parallel,
        fns,
        tx,
        example,
        model_signature(config, shape),
        spec,
        logical,
        ckpt_lib.abstract_like(abstract, shardings),
    )


def create_train_state(s: Setup) -> TrainState:
    """A fresh train state from ``config.seed``, created inside ``jit`` with the state's
    shardings as ``out_shardings``: each device computes only its own shards (nothing is
    materialised whole on one device)."""
    # The key and the example are arguments, not constants: one program for every seed (a
    # second seed's run, reproduce's seeds, a resumed run reuse the compiled one).
    create = jax.jit(
        lambda key, example: init_state(s.fns, s.tx, key, example),
        out_shardings=s.parallel.state_shardings,
    )
    return create(jax.random.PRNGKey(s.config.seed), np.asarray(s.example))


# ----------------------------------------------------------------------------------------
# One training step.


def task_loss(task: str, out: jax.Array, batch: dict[str, jax.Array]):
    """Per-example loss ``[B]`` and per-example metric ``[B]`` (correct or squared error;
    for token tasks the mean over the example's scored positions)."""
    label, valid = batch["label"], batch["valid"]
    out = out.astype(jnp.promote_types(jnp.float32, out.dtype))  # float32, or float64
    if task == "lm":
        w = batch["weight"]
        xent = optax.softmax_cross_entropy_with_integer_labels(out, label)
        correct = (jnp.argmax(out, -1) == label).astype(jnp.float32)
        n = jnp.maximum(w.sum(-1), 1.0)
        loss, metric = (xent * w).sum(-1) / n, (correct * w).sum(-1) / n
    elif task == "classification":
        loss = optax.softmax_cross_entropy_with_integer_labels(out, label)
        metric = (jnp.argmax(out, -1) == label).astype(jnp.float32)
    else:
        err = jnp.square(out - label.astype(out.dtype))
        loss = err.reshape(err.shape[0], -1).mean(-1)
        metric = loss
    w = valid.astype(jnp.float32)
    return loss * w, metric * w


def packing(batch) -> dict[str, Any]:
    """The per-step fields a batch has besides the input: the packing of a token batch
    (``segment_ids``, ``positions``), the ``timestamps`` of irregularly sampled series."""
    return {k: batch[k] for k in ("segment_ids", "positions", "timestamps") if k in batch}


def metric_name(task: str) -> str:
    return "mse" if task == "regression" else "accuracy"


def make_step_fn(fns: ModelFns, tx: optax.GradientTransformation):
    """``(state, batch, axis_name) -> (state, metrics)`` for :class:`~.parallel.Parallel`.

    The loss is the mean over the (local) batch; with an axis name, gradients and metrics are
    averaged over it (equal local batches make that the global mean).
    """
    name = metric_name(fns.task)

    def step_fn(state: TrainState, batch, axis_name):
        rng = jax.random.fold_in(state.rng, state.step)
        rng = par_lib.device_fold(rng, axis_name)

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            out, stats = fns.apply(variables, batch["series"], True, rng, **packing(batch))
            loss, metric = task_loss(fns.task, out, batch)
            n = batch["series"].shape[0]
            return loss.sum() / n, (stats, metric.sum() / n)

        (loss, (stats, metric)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grads = par_lib.pmean(grads, axis_name)
        loss, metric = par_lib.pmean((loss, metric), axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=stats,
            opt_state=opt_state,
        )
        return new, {"loss": loss, name: metric}

    return step_fn


# ----------------------------------------------------------------------------------------
# Evaluation.


def make_eval_fn(fns: ModelFns, parallel: par_lib.Parallel):
    """jit ``(variables, batch) -> {"loss", "metric", "count"}`` sums over valid rows; the
    variables stay where the train state keeps them (run it under ``parallel.context()``)."""

    def eval_fn(variables, batch):
        out, _ = fns.apply(variables, batch["series"], False, None, **packing(batch))
        loss, metric = task_loss(fns.task, out, batch)
        return {
            "loss": loss.sum(),
            "metric": metric.sum(),
            "count": batch["valid"].astype(jnp.float32).sum(),
        }

    shardings = parallel.state_shardings
    return jax.jit(
        eval_fn,
        in_shardings=(
            {"params": shardings.params, "batch_stats": shardings.batch_stats},
            parallel.batch_sharding,
        ),
        out_shardings=parallel.replicated,
    )


def evaluate_split(s: Setup, eval_fn, variables, split: str) -> dict[str, float]:
    """Mean loss and metric of ``variables`` on one split (padded last batch masked)."""
    sums = {"loss": 0.0, "metric": 0.0, "count": 0.0}
    for batch in data_lib.eval_batches(s.config, s.splits[split]):
        batch = data_lib.prepare_batch(s.config, batch)
        with s.parallel.context():
            out = eval_fn(variables, s.parallel.put_batch(batch, for_step=False))
        for k in sums:
            sums[k] += float(par_lib.to_host(out[k]))
    n = max(sums["count"], 1.0)
    return {"loss": sums["loss"] / n, "metric": sums["metric"] / n}


def evaluate_model(s: Setup, eval_fn, variables) -> dict[str, dict[str, float]]:
    """``{"val": ..., "test": ...}``, each ``{"loss", "metric"}`` (token tasks add
    ``decode_metric``: see :func:`decode_accuracy`)."""
    out = {split: evaluate_split(s, eval_fn, variables, split) for split in ("val", "test")}
    if s.shape["task"] == "lm":
        for split in ("val", "test"):
            out[split]["decode_metric"] = decode_accuracy(s, variables, split)
    return out


def decode_accuracy(s: Setup, variables, split: str) -> float:
    """Accuracy on the scored positions of the split's first eval batch when the model runs
    as in generation: one token at a time through its decoding caches (equal to the full
    pass up to float rounding, which the tests check; here it shows the path works)."""
    from flax_linoss.train.model import NNX, make_decoder

    if s.decoder is None:
        s.decoder = make_decoder(s.config, s.shape)
    params = s.parallel.gather(variables["params"])  # whole, on every device
    if s.config.framework != NNX:
        from flax import nnx

        template = nnx.state(nnx.eval_shape(lambda: s.spec.nnx_module(nnx.Rngs(0))), nnx.Param)
        params = to_framework(params, template, s.config.framework, NNX)
    batch = next(iter(data_lib.eval_batches(s.config, s.splits[split])))
    batch = data_lib.prepare_batch(s.config, batch)
    logits = s.decoder(jax.tree.map(par_lib.to_host, params), jnp.asarray(batch["series"]))
    w = batch["weight"] * batch["valid"][:, None]
    correct = np.asarray(jnp.argmax(logits, -1)) == batch["label"]
    return float((correct * w).sum() / max(w.sum(), 1.0))


@dataclasses.dataclass
class EarlyStopping:
    """The best validation evaluation so far and the patience count.

    ``ties="first"``: only a strictly better validation metric becomes the best. ``"last"``
    (the reference LinOSS code): an equal one also replaces the best (its step and test
    metric) but, as it is no improvement, does not reset the patience.
    """

    higher_is_better: bool
    patience: int
    ties: str = "first"

    def update(self, meta: dict[str, Any], step: int, val: float, test: float) -> bool:
        """Records an evaluation in ``meta``; returns whether it became the best."""
        best = meta["best"]
        if best is None:
            improved = tie = False
        else:
            improved = val > best["val"] if self.higher_is_better else val < best["val"]
            tie = val == best["val"]
        new_best = best is None or improved or (tie and self.ties == "last")
        meta["bad_evals"] = 0 if (best is None or improved) else meta["bad_evals"] + 1
        if new_best:
            meta["best"] = {"step": step, "val": val, "test": test}
        return new_best

    def should_stop(self, meta: dict[str, Any]) -> bool:
        return bool(self.patience) and meta["bad_evals"] > self.patience


# ----------------------------------------------------------------------------------------
# The run.


def mesh_summary(mesh: jax.sharding.Mesh) -> str:
    """``data=2 fsdp=2 seq=1 model=2``."""
    return " ".join(f"{name}={size}" for name, size in mesh.shape.items())


def _say(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def _new_meta(s: Setup) -> dict[str, Any]:
    return {
        "signature": s.signature,
        "framework": s.config.framework,
        "best": None,  # {"step", "val", "test"}
        "bad_evals": 0,
        "done": False,
        "stopped_early": False,
        "train_seconds": 0.0,  # wall time of the training loop, summed over resumes
    }


def restore_state(s: Setup, ckpts: ckpt_lib.RunCheckpoints, step: int, train_it):
    """The checkpoint at ``step``, restored straight onto this run's mesh and shardings
    (whatever mesh wrote it), in this run's API form (converted if another API wrote it)."""
    saved = ckpts.saved_meta(step).get("framework", "linen")  # older runs: linen form
    if saved == s.config.framework:
        return ckpts.restore(step, s.abstract_state, train_it)
    other = s.abstract_state_of(make_model(s.config, s.spec, framework=saved))
    restored, meta = ckpts.restore(step, other, train_it)
    state = to_framework(restored, s.abstract_state, saved, s.config.framework)
    _say(f"Converted the {saved} checkpoint at step {step} to {s.config.framework}.")
    return s.parallel.place(state), {**meta, "framework": s.config.framework}


def _check_loss(metrics, step: int, ckpts: ckpt_lib.RunCheckpoints, workdir: str):
    """Host values of a step's metrics; a non-finite loss stops the run.

    The loss of step ``s`` comes from the parameters of step ``s - 1``, so the checkpoint of
    step ``s - 1`` (if any) is deleted and the one named is older: its parameters gave a
    finite loss.
    """
    loss = float(par_lib.to_host(metrics["loss"]))
    if math.isfinite(loss):
        return {k: float(par_lib.to_host(v)) for k, v in metrics.items()}
    ckpts.wait()
    ckpts.drop_after(step - 2)
    good = ckpts.latest_step()
    where = (
        f"the last checkpoint whose parameters gave a finite loss (step {good}) is kept in "
        f"{workdir}"
        if good is not None
        else "no checkpoint was saved before it"
    )
    raise NonFiniteLossError(f"Training loss is {loss} at step {step}; stopping; {where}.")


class Run:
    """One run's bookkeeping, shared by the sequential loop and the seed-parallel one
    (:mod:`flax_linoss.train.seed_parallel`): the workdir, its checkpoints and metrics, the
    train stream, the early-stopping state, and what happens at a step boundary (progress
    line, evaluation, best checkpoint, periodic checkpoint).

    Building it checks and locks the workdir (:class:`~.workdir.RunFolder`), refuses an
    incompatible checkpoint before anything in the workdir changes, then restores the newest
    intact checkpoint (converting another API's) or starts afresh.
    """

    def __init__(self, s: Setup, workdir: str):
        self.folder = workdir_lib.RunFolder(workdir, primary=jax.process_index() == 0)
        try:
            self._open(s, workdir)
        except BaseException:
            self.folder.release()
            raise

    def _open(self, s: Setup, workdir: str) -> None:
        self.s, self.workdir = s, workdir
        cfg, tcfg = s.config, s.config.train
        self.ckpts = ckpt_lib.RunCheckpoints(
            workdir, keep=tcfg.keep_checkpoints, async_save=tcfg.async_checkpointing
        )
        latest = self.ckpts.latest_step()
        if latest is not None:  # refuse another model before touching the workdir
            saved = self.ckpts.newest_meta()["signature"]
            ckpt_lib.check_signature(saved, s.signature, workdir)
        if jax.process_index() == 0:
            ckpt_lib.dump_json(os.path.join(workdir, "config.json"), cfg.to_dict())
        self.writer = metrics_lib.MetricWriter(
            workdir,
            enabled=jax.process_index() == 0,
            tensorboard=tcfg.tensorboard,
            hparams=config_lib.flat_keys(cfg),
        )
        self.train_it = data_lib.train_iterator(cfg, s.splits["train"])
        self.meta = _new_meta(s)
        if latest is not None:
            latest, (self.state, self.meta) = self.ckpts.restore_newest(
                lambda step: restore_state(s, self.ckpts, step, self.train_it)
            )
            self.meta.setdefault("train_seconds", 0.0)
            self.ckpts.drop_best_after(latest)
            _say(f"Resumed from {workdir} at step {latest}.")
        else:
            self.state = create_train_state(s)
        # The metrics file matches the checkpoint it resumes from (nothing after it).
        self.writer.truncate(latest or 0)
        self.step = int(par_lib.to_host(self.state.step))
        self.stopping = EarlyStopping(s.metric == "accuracy", tcfg.patience, tcfg.best_ties)
        self.lr = learning_rate(cfg)
        self.progress = metrics_lib.Progress(self.step, tcfg.num_steps)
        self.cost = metrics_lib.StepCost(self.step, tcfg.num_steps, platform=jax.default_backend())
        self._acc: dict[str, float] = {}
        self._acc_n = 0
        self._eval_fn = None
        self._t0, self._seconds_before = time.perf_counter(), self.meta["train_seconds"]
        self._first_step = self.step

    @property
    def finished(self) -> bool:
        return self.meta["stopped_early"] or self.step >= self.s.config.train.num_steps

    def announce(self) -> None:
        cfg = self.s.config
        what = (
            f"transformer ({cfg.model.mixer})"
            if cfg.model.kind == "transformer"
            else f"LinOSS-{cfg.model.discretization}"
        )
        devices, processes = self.s.mesh.size, jax.process_count()
        _say(
            f"Training {cfg.framework} {what} on {cfg.data.name} for {cfg.train.num_steps} "
            f"steps ({self.s.parallel.implementation} over {devices} "
            f"device{'s' if devices != 1 else ''}, {processes} "
            f"process{'es' if processes != 1 else ''}); workdir {self.workdir}"
        )
        _say(f"mesh: {mesh_summary(self.s.mesh)}")
        _say(sharding_lib.memory_line(self.s.abstract_state, self.s.parallel.state_shardings))

    def next_batch(self) -> dict[str, np.ndarray]:
        return data_lib.prepare_batch(self.s.config, next(self.train_it))

    def record(self, metrics, step: int) -> None:
        """Adds a step's metrics to the running means (stops on a non-finite loss)."""
        for k, v in _check_loss(metrics, step, self.ckpts, self.workdir).items():
            self._acc[k] = self._acc.get(k, 0.0) + v
        self._acc_n += 1
        cost = self.cost.observe(step)
        if cost:
            _say(cost)

    def _every(self, n: int) -> bool:
        return bool(n) and self.step % n == 0

    def at_boundary(self) -> bool:
        """Whether this step logs, evaluates or checkpoints."""
        t = self.s.config.train
        last = self.step == t.num_steps
        return last or any(map(self._every, (t.log_every, t.eval_every, t.checkpoint_every)))

    def boundary(self, state) -> bool:
        """Logs, evaluates and checkpoints at ``self.step`` as configured; ``state`` is the
        run's (sharded) train state. Returns whether the run stops here."""
        tcfg, step = self.s.config.train, self.step
        last = step == tcfg.num_steps
        if self._every(tcfg.log_every) or last:
            means = {k: v / max(self._acc_n, 1) for k, v in self._acc.items()}
            self.writer.write(step, "train", {**means, "learning_rate": float(self.lr(step - 1))})
            _say(self.progress.line(step, means))
            self._acc, self._acc_n = {}, 0
            self._record_session()
        stop = False
        if self._every(tcfg.eval_every) or last:
            stop = self._evaluate(state)
        self.meta["done"] = last or stop
        if self._every(tcfg.checkpoint_every) or last or stop:
            # The previous save is committed before this one starts (Orbax would wait for it
            # too), so a run killed after this line resumes from it at the latest.
            self.ckpts.wait()
            _say(f"checkpoint: saving step {step}")
            self.meta["train_seconds"] = self._seconds_before + time.perf_counter() - self._t0
            self.ckpts.save(step, state, self.train_it, self.meta)
        self.progress.restart(step)
        return stop

    def _evaluate(self, state) -> bool:
        s, name, step, meta = self.s, self.s.metric, self.step, self.meta
        if self._eval_fn is None:
            self._eval_fn = make_eval_fn(s.fns, s.parallel)
        variables = state.variables
        res = evaluate_model(s, self._eval_fn, variables)
        for split in ("val", "test"):
            record = {"loss": res[split]["loss"], name: res[split]["metric"]}
            if "decode_metric" in res[split]:
                record[f"decode_{name}"] = res[split]["decode_metric"]
            self.writer.write(step, split, record)
        if self.stopping.update(meta, step, res["val"]["metric"], res["test"]["metric"]):
            best_meta = {"signature": s.signature, "framework": s.config.framework}
            self.ckpts.save_best(step, variables, {**best_meta, **meta["best"]})
        best = meta["best"]
        _say(
            f"eval step {step}: {_eval_text(res, name)} | best val {best['val']:.4f} at step "
            f"{best['step']}"
        )
        stop = self.stopping.should_stop(meta)
        if stop:
            meta["stopped_early"] = True
            _say(
                f"Early stop at step {step}: no val improvement in {meta['bad_evals']} evaluations."
            )
        return stop

    def _record_session(self) -> None:
        """This session's training time so far, in the workdir's ``sessions.json``."""
        if self.step > self._first_step:
            self.folder.record(self._first_step, self.step, time.perf_counter() - self._t0)

    @contextlib.contextmanager
    def saving(self):
        """Around the training loop: an exception (an interrupt, a NaN stop) first lets the
        checkpoint being written in the background commit, so the workdir stays resumable;
        Ctrl-C becomes :class:`~.workdir.Interrupted` (the step reached and the step a rerun
        resumes from)."""
        try:
            yield
        except BaseException as e:
            try:
                self.ckpts.wait()
                self._record_session()
            finally:
                self.folder.release()
            if isinstance(e, KeyboardInterrupt) and not isinstance(e, workdir_lib.Interrupted):
                resume = self.ckpts.committed_step() or 0
                raise workdir_lib.Interrupted(self.step, resume) from e
            raise

    def close(self) -> dict[str, Any]:
        """Waits for the checkpoints, writes ``results.json`` and returns the results."""
        self.ckpts.close()
        self.writer.close()
        self._record_session()
        best = self.meta["best"] or {"step": None, "val": float("nan"), "test": float("nan")}
        name = self.s.metric
        results = {
            "metric": name,
            "best_step": best["step"],
            "best_val": best["val"],
            "test_at_best_val": best["test"],
            "final_step": self.step,
            "stopped_early": self.meta["stopped_early"],
            # every session's training loop, those killed before a checkpoint included
            "train_seconds": self.folder.total_seconds() or self.meta["train_seconds"],
        }
        if jax.process_index() == 0:
            ckpt_lib.dump_json(os.path.join(self.workdir, "results.json"), results)
        self.folder.release()
        _say(
            f"Final: test {name} {best['test']:.4f} at the best validation step "
            f"{best['step']} (val {name} {best['val']:.4f})."
        )
        return results


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, prepared: Setup | None = None
) -> dict[str, Any]:
    """Trains (or resumes) in ``workdir``; returns the final results.

    Evaluates on val and test every ``train.eval_every`` steps; the reported test metric is
    the one at the best validation evaluation. Resumes from the latest checkpoint in
    ``workdir`` if there is one (refusing a checkpoint of another model before anything in
    the workdir changes).

    Args:
        config: The run's config.
        workdir: The run's folder.
        prepared: ``setup(config)`` if the caller built it already (a benchmark that then
            times the same compiled step); built here if ``None``.

    Returns:
        ``{"metric", "best_step", "best_val", "test_at_best_val", "final_step",
        "stopped_early", "train_seconds"}``.

    Raises:
        ConfigError: A bad config (before anything is compiled).
        IncompatibleCheckpointError: ``workdir`` holds a checkpoint of another model.
        NonFiniteLossError: The loss became NaN/inf (names the step and the checkpoint kept).
        ValueError: ``prepared`` was built from another config.
    """
    if prepared is not None and prepared.config is not config:
        raise ValueError("train_and_evaluate: `prepared` was built from another config")
    s = setup(config) if prepared is None else prepared
    run = Run(s, workdir)
    if run.finished:
        _say(f"The run in {workdir} has already finished (step {run.step}).")
        return run.close()
    run.announce()
    t0 = time.perf_counter()
    with run.saving(), workdir_lib.stop_requests() as stop_requested:
        dstate = s.parallel.put_state(run.state)
        run.state = None  # donated to the first step
        pending = None  # (metrics, step) of the previous step, checked one step late
        while run.step < config.train.num_steps:
            if stop_requested():  # Ctrl-C, taken here between steps
                raise KeyboardInterrupt
            dstate, m = s.parallel.step(dstate, s.parallel.put_batch(run.next_batch()))
            run.step += 1
            if pending is not None:
                run.record(*pending)
            pending = (m, run.step)
            if not run.at_boundary():
                continue
            run.record(*pending)
            pending = None
            if run.boundary(s.parallel.canonical_state(dstate)):
                break
    _say(f"Trained to step {run.step} in {metrics_lib.format_duration(time.perf_counter() - t0)}.")
    return run.close()


def evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, which: str = "best"
) -> dict[str, Any]:
    """Evaluates a run's best (or latest) checkpoint on val and test with this process's mesh.

    The checkpoint's model signature is checked before anything is restored; the parameters
    are restored into the current mesh, whatever device count (or API) wrote them.
    """
    s = setup(config)
    saved_meta, step = ckpt_lib.checkpoint_meta(workdir, which=which)
    if "signature" in saved_meta:
        ckpt_lib.check_signature(saved_meta["signature"], s.signature, workdir)
    saved = saved_meta.get("framework", "linen")
    writer = s.abstract_state
    if saved != config.framework:
        writer = s.abstract_state_of(make_model(config, s.spec, framework=saved))
    variables, _, step = ckpt_lib.restore_model(workdir, writer.variables, which=which)
    if saved != config.framework:
        variables = to_framework(variables, s.abstract_state.variables, saved, config.framework)
        variables = s.parallel.place(variables, s.parallel.state_shardings.variables)
    res = evaluate_model(s, make_eval_fn(s.fns, s.parallel), variables)
    name = s.metric
    out = {"step": step, "metric": name}
    for split in ("val", "test"):
        out[f"{split}_{name}"] = res[split]["metric"]
        out[f"{split}_loss"] = res[split]["loss"]
        if "decode_metric" in res[split]:
            out[f"{split}_decode_{name}"] = res[split]["decode_metric"]
    _say(f"Checkpoint step {step}: {_eval_text(res, name)}")
    return out


def _eval_text(res: dict[str, dict[str, float]], name: str) -> str:
    """``val accuracy 0.9 | test accuracy 0.8`` (token tasks add the decode accuracies)."""
    parts = [f"{split} {name} {res[split]['metric']:.4f}" for split in ("val", "test")]
    parts += [
        f"{split} decode_{name} {res[split]['decode_metric']:.4f}"
        for split in ("val", "test")
        if "decode_metric" in res[split]
    ]
    return " | ".join(parts)
