"""Config checks: every problem is reported before anything is compiled.

:func:`validate` compares a config with :func:`~flax_linoss.train.default_config.get_config`
(unknown or missing keys, wrong types), checks the choices and ranges of each field, and
rejects impossible combinations (such as ``pmap`` with an ``fsdp``, ``model`` or ``seq``
axis). Errors name the field and, for unknown keys, list the closest known ones.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from flax_linoss.common import NORMS
from flax_linoss.mixers.base import BLOCK_CHOICES
from flax_linoss.ops import CONSTRAINTS, DISCRETIZATIONS, SCANS
from flax_linoss.train import default_config, sharding

__all__ = [
    "CHOICES",
    "ConfigError",
    "check_override_keys",
    "flat_keys",
    "suggest",
    "validate",
]


class ConfigError(ValueError):
    """A config field is unknown, of the wrong type, out of range or inconsistent."""


# field -> allowed values
CHOICES: dict[str, tuple[str, ...]] = {
    "framework": ("linen", "nnx"),
    "model.discretization": DISCRETIZATIONS,
    "model.norm": NORMS,
    "model.kind": ("paper", "transformer"),
    "model.mixer_block": tuple(BLOCK_CHOICES),
    "model.constraint": CONSTRAINTS,
    "model.positional": ("none", "learned", "sinusoidal"),
    "model.scan": tuple(SCANS),
    "model.dtype": ("float32", "bfloat16", "float16", "float64"),
    "model.param_dtype": ("float32", "float64"),
    "optimizer.name": ("adam", "adamw"),
    "optimizer.schedule": ("constant", "cosine"),
    "train.best_ties": ("first", "last"),
    "parallel.implementation": ("jit", "shard_map", "pmap"),
}

# Free-form sub-dicts: their keys are passed through (dataset options).
_OPEN = ("data.options", "parallel.logical_axis_rules")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping | ml_collections.ConfigDict) and key not in _OPEN:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def flat_keys(config: Mapping[str, Any] | ml_collections.ConfigDict) -> dict[str, Any]:
    """``{"a.b.c": value}`` for every leaf (``data.options`` counts as one leaf)."""
    return _flatten(config)


def suggest(key: str, known: Iterable[str]) -> str:
    """`` (did you mean ...?)`` with the closest known keys, or ``""``."""
    known = list(known)
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    if not close:  # also try the last component alone (e.g. "lr" inside "optimizer.")
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in known}
        close = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=3)]
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _all_paths(config) -> list[str]:
    paths = []

    def walk(d, prefix):
        for k, v in d.items():
            paths.append(prefix + k)
            if isinstance(v, Mapping | ml_collections.ConfigDict):
                walk(v, prefix + k + ".")

    walk(config, "")
    return paths


def check_override_keys(config: ml_collections.ConfigDict, keys: Iterable[str]) -> None:
    """Raises :class:`ConfigError` for an override key that the config does not have.

    Args:
        config: The loaded config (before overrides).
        keys: Dotted override keys, e.g. ``["train.num_steps"]`` from
            ``--config.train.num_steps=10``.
    """
    paths = _all_paths(config)
    known = set(paths)
    # Leaves, and the options inside data.options (they are fields too).
    leaves = [p for p in paths if p not in _OPEN and not any(q.startswith(p + ".") for q in paths)]
    for key in keys:
        if key not in known:
            raise ConfigError(f"Unknown config key {key!r}{suggest(key, leaves)}.")


def _type_ok(value: Any, want: Any) -> bool:
    if isinstance(want, bool):
        return isinstance(value, bool)
    if isinstance(want, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(want, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(want, str):
        return isinstance(value, str)
    return True


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks ``config`` and returns it.

    Raises:
        ConfigError: naming the first problem found: an unknown key (with close matches), a
            missing key, a wrong type, a value outside its choices or range, or an impossible
            combination.
    """
    ref = flat_keys(default_config.get_config())
    got = flat_keys(config)
    for key in got:
        if key not in ref:
            raise ConfigError(f"Unknown config key {key!r}{suggest(key, ref)}.")
    for key in ref:
        if key not in got:
            raise ConfigError(f"Config is missing the key {key!r}.")
    for key, want in ref.items():
        value = got[key]
        if not _type_ok(value, want):
            raise ConfigError(
                f"Config field {key!r} must be a {type(want).__name__}, got {value!r} "
                f"({type(value).__name__})."
            )
    for key, allowed in CHOICES.items():
        if got[key] not in allowed:
            raise ConfigError(
                f"Config field {key!r} must be one of {', '.join(allowed)}; got {got[key]!r}"
                f"{suggest(str(got[key]), allowed)}."
            )

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    for key in (
        "data.batch_size",
        "data.eval_batch_size",
        "model.num_blocks",
        "model.hidden_size",
        "model.state_size",
        "train.num_steps",
        "train.log_every",
        "train.keep_checkpoints",
        "parallel.fsdp_axis_size",
        "parallel.model_axis_size",
        "parallel.sequence_axis_size",
    ):
        need(got[key] >= 1, f"Config field {key!r} must be >= 1, got {got[key]}.")
    need(
        got["data.split_seed"] >= -1,
        f"Config field 'data.split_seed' must be >= 0, or -1 to follow 'seed'; got "
        f"{got['data.split_seed']}.",
    )
    for key in (
        "data.num_shards",
        "data.worker_count",
        "train.eval_every",
        "train.patience",
        "train.checkpoint_every",
        "parallel.num_devices",
        "parallel.num_processes",
        "optimizer.warmup_steps",
        "optimizer.weight_decay",
        "optimizer.grad_clip_norm",
    ):
        need(got[key] >= 0, f"Config field {key!r} must be >= 0, got {got[key]}.")
    need(got["optimizer.learning_rate"] > 0, "optimizer.learning_rate must be > 0.")
    need(got["model.num_heads"] >= 1, "model.num_heads must be >= 1.")
    need(got["model.mlp_dim"] >= 0, "model.mlp_dim must be >= 0 (0: 4 * hidden_size).")
    if got["model.kind"] == "transformer":
        from flax_linoss.models import mixer_pattern

        try:
            mixer_pattern(got["model.mixer"], got["model.num_blocks"])
        except ValueError as e:
            raise ConfigError(f"model.mixer: {e}") from None
        need(
            BLOCK_CHOICES[got["model.mixer_block"]]["block"] != "outer"
            or got["model.hidden_size"] % got["model.num_heads"] == 0,
            f"model.mixer_block={got['model.mixer_block']!r} (an outer block) needs "
            "model.hidden_size to be a multiple of model.num_heads.",
        )
    for key in ("model.dtype", "model.param_dtype"):
        need(
            got[key] != "float64" or jax.dtypes.canonicalize_dtype(np.float64) == np.float64,
            f"{key}='float64' needs 64-bit JAX: add --jax_enable_x64 (or set "
            "JAX_ENABLE_X64=1, or jax.config.update('jax_enable_x64', True) first).",
        )
    need(0 <= got["model.dropout_rate"] < 1, "model.dropout_rate must be in [0, 1).")
    need(0 <= got["optimizer.end_lr_factor"] <= 1, "optimizer.end_lr_factor must be in [0, 1].")
    need(
        got["optimizer.weight_decay"] == 0 or got["optimizer.name"] == "adamw",
        "optimizer.weight_decay > 0 needs optimizer.name='adamw' (adam has no decoupled decay).",
    )
    need(
        got["optimizer.warmup_steps"] < got["train.num_steps"]
        or got["optimizer.schedule"] == "constant",
        f"optimizer.warmup_steps ({got['optimizer.warmup_steps']}) must be < train.num_steps "
        f"({got['train.num_steps']}) for the cosine schedule: shorten the warmup, e.g. "
        f"--config.optimizer.warmup_steps={got['train.num_steps'] // 10}, or set "
        "--config.optimizer.schedule=constant.",
    )
    impl = got["parallel.implementation"]
    axes = {k: got[f"parallel.{k}_axis_size"] for k in ("fsdp", "model", "sequence")}
    if impl == "pmap":
        for name, size in axes.items():
            need(
                size == 1,
                f"parallel.implementation='pmap' is data-parallel only: set "
                f"parallel.{name}_axis_size=1 or use 'jit'.",
            )
    if impl == "shard_map":
        for name in ("model", "sequence"):
            need(
                axes[name] == 1,
                f"parallel.implementation='shard_map' maps the batch axes (data, fsdp) only: "
                f"set parallel.{name}_axis_size=1 or use 'jit'.",
            )
    sharded = int(np.prod(list(axes.values())))
    need(
        got["parallel.num_devices"] % sharded == 0,
        f"parallel.num_devices={got['parallel.num_devices']} must be a multiple of "
        f"fsdp_axis_size * model_axis_size * sequence_axis_size = {sharded}.",
    )
    try:
        sharding.parse_rules(config.parallel.logical_axis_rules)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not got["parallel.distributed"]:
        need(
            got["parallel.num_processes"] in (0, 1) and got["parallel.process_id"] in (-1, 0),
            "parallel.num_processes / process_id are set but parallel.distributed is False.",
        )
    if got["data.num_shards"]:
        need(
            got["data.batch_size"] % got["data.num_shards"] == 0,
            f"data.batch_size {got['data.batch_size']} must be divisible by data.num_shards "
            f"{got['data.num_shards']}.",
        )
    if not isinstance(config.data.options, Mapping | ml_collections.ConfigDict):
        raise ConfigError("data.options must be a dict of get_dataset options.")
    return config
