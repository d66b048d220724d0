"""One trainer for the linen and the nnx models.

Both frameworks are reduced to the same pure functions (:class:`ModelFns`): ``init(key, x)``
gives linen-form variables ``{"params", "batch_stats"}`` and ``apply(variables, x, train,
rng)`` gives ``(output, new_batch_stats)``. For nnx, ``apply`` merges the module's graph with
the variables (``nnx.merge`` plus :func:`flax_linoss.convert.linen_to_nnx`), reseeds its dropout
stream with ``rng`` and reads the statistics back. So the step functions, the optimiser state and
the checkpoints are the same for both: a checkpoint written with one framework resumes with the
other.

The train state is a dict ``{"step", "params", "batch_stats", "opt_state", "rng"}``. The
dropout key of step ``s`` is ``fold_in(rng, s)`` and the data order is a function of the seed
and the Grain iterator position, so a resumed run continues bit for bit (on the same devices).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from typing import Any

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

__all__ = [
    "ModelFns",
    "NonFiniteLossError",
    "evaluate",
    "init_state",
    "make_model",
    "make_optimizer",
    "make_step_fn",
    "model_signature",
    "setup_distributed",
    "train_and_evaluate",
]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class ModelFns:
    """A model as pure functions.

    Attributes:
        init: ``(key, x [B, L, C]) -> {"params", "batch_stats"}``.
        apply: ``(variables, x [B, L, C], train: bool, rng) -> (out, batch_stats)``; ``out``
            is logits ``[B, K]`` or regression outputs ``[B, T, D]``.
        task: ``"classification"`` or ``"regression"``.
    """

    init: Callable[[jax.Array, jax.Array], dict[str, Any]]
    apply: Callable[[dict[str, Any], jax.Array, bool, jax.Array], tuple[jax.Array, Any]]
    task: str


def _model_kwargs(config: ml_collections.ConfigDict, shape: dict[str, Any]) -> dict[str, Any]:
    m = config.model
    return dict(
        num_blocks=m.num_blocks,
        hidden_size=m.hidden_size,
        state_size=m.state_size,
        output_size=shape["output_size"],
        task=shape["task"],
        output_step=shape["output_step"],
        discretization=m.discretization,
        scan=m.scan,
        norm=m.norm,
        dropout_rate=m.dropout_rate,
        dtype=jnp.dtype(m.dtype),
    )


def make_model(
    config: ml_collections.ConfigDict, shape: dict[str, Any], *, axis_name: str | None = None
) -> ModelFns:
    """The configured model (``config.framework``) as :class:`ModelFns`.

    Args:
        config: A validated config.
        shape: From :func:`flax_linoss.train.data.model_shape`.
        axis_name: Mapped axis for batch-norm statistics (``"data"`` under shard_map / pmap).
    """
    kw = _model_kwargs(config, shape)
    if config.framework == "linen":
        from flax_linoss.linen import LinOSSModel

        module = LinOSSModel(**kw, norm_axis_name=axis_name)

        def init(key, x):
            v = LinOSSModel(**kw).init({"params": key}, x, deterministic=True)
            return {"params": v["params"], "batch_stats": v.get("batch_stats", {})}

        def apply(variables, x, train, rng):
            if not train:
                return module.apply(variables, x, deterministic=True), variables["batch_stats"]
            out, mut = module.apply(
                variables, x, deterministic=False, rngs={"dropout": rng}, mutable=["batch_stats"]
            )
            return out, mut.get("batch_stats", {})

        return ModelFns(init, apply, shape["task"])

    from flax import nnx

    from flax_linoss.convert import linen_to_nnx, nnx_to_linen
    from flax_linoss.nnx import LinOSSModel as NnxModel

    def build(key, axis):
        return NnxModel(
            shape["in_features"], **kw, norm_axis_name=axis, rngs=nnx.Rngs(params=key, dropout=0)
        )

    abstract = nnx.eval_shape(lambda: build(jax.random.key(0), axis_name))
    graphdef, abstract_state = nnx.split(abstract)

    def init(key, x):
        del x
        variables = nnx_to_linen(build(key, None))
        variables.setdefault("batch_stats", {})
        return variables

    def apply(variables, x, train, rng):
        model = nnx.merge(graphdef, abstract_state, copy=True)
        linen_to_nnx(variables, model)
        if train:
            nnx.reseed(model, dropout=rng)
        out = model(x, deterministic=not train)
        stats = nnx_to_linen(model).get("batch_stats", {})
        return out, stats

    return ModelFns(init, apply, shape["task"])


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam/AdamW with optional warmup + cosine schedule and gradient clipping."""
    o = config.optimizer
    if o.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=o.learning_rate,
            warmup_steps=o.warmup_steps,
            decay_steps=config.train.num_steps,
            end_value=o.learning_rate * o.end_lr_factor,
        )
    elif o.warmup_steps:
        lr = optax.join_schedules(
            [
                optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps),
                optax.constant_schedule(o.learning_rate),
            ],
            [o.warmup_steps],
        )
    else:
        lr = o.learning_rate
    if o.name == "adamw":
        tx = optax.adamw(lr, weight_decay=o.weight_decay)
    else:
        tx = optax.adam(lr)
    if o.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
    return tx


def model_signature(config: ml_collections.ConfigDict, shape: dict[str, Any]) -> dict[str, Any]:
    """The fields that fix the checkpoint's tree structure and shapes."""
    m, o = config.model, config.optimizer
    return {
        "discretization": m.discretization,
        "num_blocks": m.num_blocks,
        "hidden_size": m.hidden_size,
        "state_size": m.state_size,
        "norm": m.norm,
        "in_features": shape["in_features"],
        "output_size": shape["output_size"],
        "task": shape["task"],
        "output_step": shape["output_step"],
        "optimizer": o.name,
        "schedule": "constant" if (o.schedule == "constant" and not o.warmup_steps) else "sched",
        "grad_clip": bool(o.grad_clip_norm),
    }


def init_state(
    config: ml_collections.ConfigDict,
    fns: ModelFns,
    tx: optax.GradientTransformation,
    example: np.ndarray,
) -> dict[str, Any]:
    """A fresh train state (on the default device) from ``config.seed``."""
    key = jax.random.PRNGKey(config.seed)
    init_key, dropout_key = jax.random.split(key)
    variables = jax.jit(fns.init)(init_key, jnp.asarray(example))
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": variables["params"],
        "batch_stats": variables["batch_stats"],
        "opt_state": tx.init(variables["params"]),
        "rng": dropout_key,
    }


def task_loss(task: str, out: jax.Array, label: jax.Array, valid: jax.Array):
    """Per-example loss ``[B]`` and per-example metric ``[B]`` (correct or squared error)."""
    if task == "classification":
        loss = optax.softmax_cross_entropy_with_integer_labels(out.astype(jnp.float32), label)
        metric = (jnp.argmax(out, -1) == label).astype(jnp.float32)
    else:
        err = jnp.square(out.astype(jnp.float32) - label.astype(jnp.float32))
        loss = err.reshape(err.shape[0], -1).mean(-1)
        metric = loss
    w = valid.astype(jnp.float32)
    return loss * w, metric * w


def metric_name(task: str) -> str:
    return "accuracy" if task == "classification" else "mse"


def make_step_fn(fns: ModelFns, tx: optax.GradientTransformation):
    """``(state, batch, axis_name) -> (state, metrics)`` for :class:`~.parallel.Parallel`.

    The loss is the mean over the (local) batch; with an axis name, gradients and metrics are
    averaged over it (equal local batches make that the global mean).
    """
    name = metric_name(fns.task)

    def step_fn(state, batch, axis_name):
        rng = jax.random.fold_in(state["rng"], state["step"])
        rng = par_lib.device_fold(rng, axis_name)

        def loss_fn(params):
            out, stats = fns.apply(
                {"params": params, "batch_stats": state["batch_stats"]},
                batch["series"],
                True,
                rng,
            )
            loss, metric = task_loss(fns.task, out, batch["label"], batch["valid"])
            n = batch["series"].shape[0]
            return loss.sum() / n, (stats, metric.sum() / n)

        (loss, (stats, metric)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        grads = par_lib.pmean(grads, axis_name)
        loss, metric = par_lib.pmean((loss, metric), axis_name)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = {
            "step": state["step"] + 1,
            "params": params,
            "batch_stats": stats,
            "opt_state": opt_state,
            "rng": state["rng"],
        }
        return new, {"loss": loss, name: metric}

    return step_fn


def make_eval_fn(fns: ModelFns, parallel: par_lib.Parallel):
    """jit ``(variables, batch) -> {"loss", "metric", "count"}`` sums over valid rows."""

    def eval_fn(variables, batch):
        out, _ = fns.apply(variables, batch["series"], False, None)
        loss, metric = task_loss(fns.task, out, batch["label"], batch["valid"])
        return {
            "loss": loss.sum(),
            "metric": metric.sum(),
            "count": batch["valid"].astype(jnp.float32).sum(),
        }

    return jax.jit(
        eval_fn,
        in_shardings=(parallel.replicated, parallel.batch_sharding),
        out_shardings=parallel.replicated,
    )


def setup_distributed(config: ml_collections.ConfigDict) -> None:
    """``jax.distributed.initialize`` when ``parallel.distributed`` (once per process)."""
    p = config.parallel
    if not p.distributed:
        return
    from jax._src import distributed

    if distributed.global_state.client is not None:
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


def _evaluate_split(eval_fn, parallel, variables, config, source) -> dict[str, float]:
    sums = {"loss": 0.0, "metric": 0.0, "count": 0.0}
    for batch in data_lib.eval_batches(config, source):
        batch = data_lib.prepare_batch(config, batch)
        out = eval_fn(variables, parallel.put_batch(batch, for_step=False))
        for k in sums:
            sums[k] += float(par_lib.to_host(out[k]))
    n = max(sums["count"], 1.0)
    return {"loss": sums["loss"] / n, "metric": sums["metric"] / n}


def _say(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


@dataclasses.dataclass
class _Setup:
    config: ml_collections.ConfigDict
    splits: Any
    shape: dict[str, Any]
    mesh: jax.sharding.Mesh
    parallel: par_lib.Parallel
    fns: ModelFns  # global-view model (evaluation)
    tx: optax.GradientTransformation
    example: np.ndarray


def _setup(config: ml_collections.ConfigDict) -> _Setup:
    config_lib.validate(config)
    impl = config.parallel.implementation
    if impl == "pmap":
        ok, why = par_lib.pmap_available()
        if not ok:
            raise config_lib.ConfigError(why)
    setup_distributed(config)
    mesh = par_lib.make_mesh(config.parallel.num_devices, config.parallel.model_axis_size)
    splits = data_lib.load_dataset(config)
    shape = data_lib.model_shape(splits.info, config.data.time_channel)
    fns = make_model(config, shape)
    step_fns = fns if impl == "jit" else make_model(config, shape, axis_name=par_lib.DATA_AXIS)
    tx = make_optimizer(config)
    parallel = par_lib.Parallel(impl, mesh, make_step_fn(step_fns, tx))
    par_lib.check_batch(config.data.batch_size, parallel)
    if config.data.eval_batch_size % (parallel.data_size * jax.process_count()):
        raise config_lib.ConfigError(
            f"data.eval_batch_size {config.data.eval_batch_size} must be a multiple of "
            f"{parallel.data_size * jax.process_count()}"
        )
    first = {k: np.asarray(v)[None] for k, v in splits["train"][0].items()}
    first["valid"] = np.ones((1,), bool)
    example = data_lib.prepare_batch(config, first)["series"]
    return _Setup(config, splits, shape, mesh, parallel, fns, tx, example)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) in ``workdir``; returns the final results.

    Evaluates on val and test every ``train.eval_every`` steps; the reported test metric is
    the one at the best validation evaluation. Resumes from the latest checkpoint in
    ``workdir`` if there is one (refusing a checkpoint of another model).

    Returns:
        ``{"metric", "best_step", "best_val", "test_at_best_val", "final_step", "stopped_early"}``.

    Raises:
        ConfigError: A bad config (before anything is compiled).
        IncompatibleCheckpointError: ``workdir`` holds a checkpoint of another model.
        NonFiniteLossError: The loss became NaN/inf (names the step; checkpoints are kept).
    """
    s = _setup(config)
    cfg, tcfg = config, config.train
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json(indent=2, sort_keys=True))
    name = metric_name(s.shape["task"])
    higher = name == "accuracy"
    signature = model_signature(cfg, s.shape)

    ckpts = ckpt_lib.RunCheckpoints(
        workdir, keep=tcfg.keep_checkpoints, async_save=tcfg.async_checkpointing
    )
    latest = ckpts.latest_step()
    if latest is not None:  # refuse another model before compiling or touching anything
        ckpt_lib.check_signature(ckpts.saved_meta(latest)["signature"], signature, workdir)

    writer = metrics_lib.MetricWriter(
        workdir, enabled=jax.process_index() == 0, tensorboard=tcfg.tensorboard
    )
    train_it = data_lib.train_iterator(cfg, s.splits["train"])
    state = init_state(cfg, s.fns, s.tx, s.example)
    state = s.parallel.replicate(state)
    meta: dict[str, Any] = {
        "signature": signature,
        "best": None,  # {"step", "val", "test"}
        "bad_evals": 0,
        "done": False,
        "stopped_early": False,
        "train_seconds": 0.0,  # wall time of the training loop, summed over resumes
    }
    if latest is not None:
        abstract = ckpt_lib.abstract_like(state, s.parallel.replicated)
        state, meta = ckpts.restore(latest, abstract, train_it)
        writer.truncate(latest)
        ckpts.drop_best_after(latest)
        meta.setdefault("train_seconds", 0.0)
        _say(f"Resumed from {workdir} at step {latest}.")
    step = int(par_lib.to_host(state["step"]))
    eval_fn = make_eval_fn(s.fns, s.parallel)

    def evaluate_now(st) -> None:
        variables = {"params": st["params"], "batch_stats": st["batch_stats"]}
        val = _evaluate_split(eval_fn, s.parallel, variables, cfg, s.splits["val"])
        test = _evaluate_split(eval_fn, s.parallel, variables, cfg, s.splits["test"])
        writer.write(step, "val", {"loss": val["loss"], name: val["metric"]})
        writer.write(step, "test", {"loss": test["loss"], name: test["metric"]})
        best = meta["best"]
        better = best is None or (
            val["metric"] > best["val"] if higher else val["metric"] < best["val"]
        )
        if better:
            meta["best"] = {"step": step, "val": val["metric"], "test": test["metric"]}
            meta["bad_evals"] = 0
            ckpts.save_best(step, variables, {"signature": signature, **meta["best"]})
        else:
            meta["bad_evals"] += 1
        _say(
            f"eval step {step}: val {name} {val['metric']:.4f} | test {name} "
            f"{test['metric']:.4f} | best val {meta['best']['val']:.4f} at step "
            f"{meta['best']['step']}"
        )

    if meta["stopped_early"] or step >= tcfg.num_steps:
        _say(f"The run in {workdir} has already finished (step {step}).")
    else:
        total = tcfg.num_steps
        _say(
            f"Training {cfg.framework} LinOSS-{cfg.model.discretization} on {cfg.data.name} "
            f"for {total} steps ({s.parallel.implementation} over {s.mesh.size} devices, "
            f"{jax.process_count()} process(es)); workdir {workdir}"
        )
        dstate = s.parallel.put_state(state)
        progress = metrics_lib.Progress(step, total)
        acc: dict[str, float] = {}
        acc_n = 0
        pending = None  # (step, metrics) of the previous step, checked one step late
        t0 = time.perf_counter()
        seconds_before = meta["train_seconds"]

        def check(st_metrics, at_step):
            loss = float(par_lib.to_host(st_metrics["loss"]))
            if not math.isfinite(loss):
                ckpts.wait()
                raise NonFiniteLossError(
                    f"Training loss is {loss} at step {at_step}; stopping. The last good "
                    f"checkpoint (step {ckpts.latest_step()}) is kept in {workdir}."
                )
            return {k: float(par_lib.to_host(v)) for k, v in st_metrics.items()}

        while step < total:
            batch = next(train_it)
            batch = data_lib.prepare_batch(cfg, batch)
            dstate, m = s.parallel.step(dstate, s.parallel.put_batch(batch))
            step += 1
            if pending is not None:
                vals = check(*pending)
                for k, v in vals.items():
                    acc[k] = acc.get(k, 0.0) + v
                acc_n += 1
            pending = (m, step)
            boundary = (
                step == total
                or step % tcfg.log_every == 0
                or (tcfg.eval_every and step % tcfg.eval_every == 0)
                or (tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0)
            )
            if not boundary:
                continue
            vals = check(*pending)
            pending = None
            for k, v in vals.items():
                acc[k] = acc.get(k, 0.0) + v
            acc_n += 1
            if step % tcfg.log_every == 0 or step == total:
                means = {k: v / acc_n for k, v in acc.items()}
                writer.write(step, "train", means)
                _say(progress.line(step, means))
                acc, acc_n = {}, 0
            st = s.parallel.canonical_state(dstate)
            stop = False
            if (tcfg.eval_every and step % tcfg.eval_every == 0) or step == total:
                evaluate_now(st)
                if tcfg.patience and meta["bad_evals"] > tcfg.patience:
                    stop = True
                    meta["stopped_early"] = True
                    _say(
                        f"Early stop at step {step}: no val improvement in "
                        f"{meta['bad_evals']} evaluations."
                    )
            if step == total or stop:
                meta["done"] = True
            if (
                (tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0)
                or step == total
                or stop
            ):
                # The previous save is committed before this one starts (Orbax would wait for
                # it too), so a run killed after this line resumes from it at the latest.
                ckpts.wait()
                _say(f"checkpoint: saving step {step}")
                meta["train_seconds"] = seconds_before + time.perf_counter() - t0
                ckpts.save(step, st, train_it, meta)
            if stop:
                break
            progress.restart(step)
        state = s.parallel.canonical_state(dstate)
        _say(f"Trained to step {step} in {metrics_lib.format_duration(time.perf_counter() - t0)}.")
    ckpts.close()
    writer.close()
    best = meta["best"] or {"step": None, "val": float("nan"), "test": float("nan")}
    results = {
        "metric": name,
        "best_step": best["step"],
        "best_val": best["val"],
        "test_at_best_val": best["test"],
        "final_step": step,
        "stopped_early": meta["stopped_early"],
        "train_seconds": meta["train_seconds"],
    }
    if jax.process_index() == 0:
        ckpt_lib.dump_json(os.path.join(workdir, "results.json"), results)
    _say(
        f"Final: test {name} {best['test']:.4f} at the best validation step {best['step']} "
        f"(val {name} {best['val']:.4f})."
    )
    return results


def evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, which: str = "best"
) -> dict[str, Any]:
    """Evaluates a run's best (or latest) checkpoint on val and test with this process's mesh.

    The parameters are restored into the current mesh, whatever device count wrote them.
    """
    s = _setup(config)
    name = metric_name(s.shape["task"])
    variables = jax.eval_shape(s.fns.init, jax.random.PRNGKey(0), jnp.asarray(s.example))
    abstract = ckpt_lib.abstract_like(variables, s.parallel.replicated)
    variables, meta, step = ckpt_lib.restore_model(workdir, abstract, which=which)
    if "signature" in meta:
        ckpt_lib.check_signature(meta["signature"], model_signature(config, s.shape), workdir)
    eval_fn = make_eval_fn(s.fns, s.parallel)
    out = {"step": step, "metric": name}
    for split in ("val", "test"):
        r = _evaluate_split(eval_fn, s.parallel, variables, config, s.splits[split])
        out[f"{split}_{name}"] = r["metric"]
        out[f"{split}_loss"] = r["loss"]
    _say(
        f"Checkpoint step {step}: val {name} {out[f'val_{name}']:.4f} | test {name} "
        f"{out[f'test_{name}']:.4f}"
    )
    return out
