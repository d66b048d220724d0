"""Small pieces shared by the linen and nnx skins (validation, pooling). No Flax here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

CLASSIFICATION = "classification"
REGRESSION = "regression"
TASKS = (CLASSIFICATION, REGRESSION)
NORMS = ("batch", "layer", "rms")


def check_sequence_input(x, where: str, rank: int | None = None) -> None:
    """Raises if ``x`` is not a real floating ``[..., length, features]`` array."""
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


def check_features(x, features: int, where: str) -> None:
    """Raises if the last axis of ``x`` is not ``features`` long."""
    if np.shape(x)[-1] != features:
        raise ValueError(
            f"{where} was built for {features} features but got input of shape "
            f"{np.shape(x)} ({np.shape(x)[-1]} features)."
        )


def check_norm(kind: str) -> str:
    if kind not in NORMS:
        raise ValueError(f"Unknown norm {kind!r}; expected one of {list(NORMS)}.")
    return kind


def check_model_options(task: str, output_step: int, num_blocks: int) -> None:
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; expected one of {list(TASKS)}.")
    if output_step < 1:
        raise ValueError(f"output_step must be >= 1, got {output_step}.")
    if num_blocks < 0:
        raise ValueError(f"num_blocks must be >= 0, got {num_blocks}.")


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
