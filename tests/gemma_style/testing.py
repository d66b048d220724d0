"""Reusable checks on the Gemma-protocol fixture, for its own tests and for swap tests.

A swap test builds the model under the swap and hands it to these helpers, e.g.::

    config = TransformerConfig.tiny()
    with swap_attention("linoss-im,linoss-im,attention", target=modules.Attention,
                        adapter="gemma"):
        model = transformer.Transformer(config, rngs=nnx.Rngs(0))
    before, after = testing.train_and_evaluate(model)        # after < before
    testing.check_sampler_matches_forward(model)              # raises if not within 1e-5

    with jax.set_mesh(testing.explicit_mesh()):
        config = testing.sharded_config()
        with swap_attention(...):
            model = transformer.Transformer(config, rngs=nnx.Rngs(0))
        testing.check_param_shardings(model)
        testing.train_and_evaluate(model); testing.check_sampler_matches_forward(model)

linen (the swap must be active during every init / apply, so around the helpers)::

    with swap_attention(..., target=linen_modules.Attention, adapter="gemma"):
        model = linen_transformer.Transformer(config)
        params = testing.linen_init(model)
        before, after, params = testing.linen_train_and_evaluate(model, params)
        testing.check_linen_sampler_matches_forward(model, params)

Every helper works on one training batch ``[4, 12]`` and one set of prompts whose token
buffer has the same length, so the forward pass compiles once per model.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType

from gemma_style import sampler as sampler_lib
from gemma_style import transformer as transformer_lib
from gemma_style.sampler import on_mesh as _on_mesh
from gemma_style.transformer_cfg import ShardingConfig, TransformerConfig

PAD = 0
BATCH, LENGTH = 4, 12
#: Prompts of different lengths, with pad ids before (left padding) and inside a prompt;
#: the longest has 9 tokens, so with 3 generation steps the buffer holds LENGTH steps.
PROMPTS = (
    (2, 5, 6),
    (0, 0, 2, 7, 8, 9, 10),
    (2, 11, 0, 12, 13),
    (2, 3, 4, 5, 6, 7, 8, 9, 10),
)
GENERATION_STEPS = 3
CACHE_SIZE = 16


def training_batch(num_embed: int = 32) -> tuple[jax.Array, jax.Array]:
    """``(tokens [4, 12] int32, input_mask [4, 12] bool)``: periodic sequences over the ids
    ``3 .. num_embed - 1``; row 1 is left-padded, row 2 right-padded, row 3 has a pad step
    in the middle (pad id 0 where the mask is False)."""
    period = np.array([5, 4, 6, 3])[:, None]
    tokens = 3 + (np.arange(LENGTH)[None] + np.arange(BATCH)[:, None]) % period
    tokens = tokens % num_embed
    mask = np.ones((BATCH, LENGTH), bool)
    mask[1, :3] = False
    mask[2, -2:] = False
    mask[3, 6] = False
    return _on_mesh(jnp.asarray(np.where(mask, tokens, PAD), jnp.int32)), _on_mesh(
        jnp.asarray(mask)
    )


def next_token_loss(logits, tokens, input_mask):
    """Mean cross entropy of step ``t + 1`` given steps ``<= t``, over valid pairs."""
    weights = (input_mask[:, 1:] & input_mask[:, :-1]).astype(jnp.float32)
    # One-hot rather than a gather: the vocabulary axis may be sharded.
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    targets = jax.nn.one_hot(tokens[:, 1:], logits.shape[-1], dtype=jnp.float32)
    losses = -jnp.sum(log_probs * targets, axis=-1)
    return jnp.sum(losses * weights) / jnp.sum(weights)


# ----------------------------------------------------------------------------------------
# nnx


@nnx.jit
def _nnx_forward(model, tokens, positions, attn_mask):
    logits, _ = model(tokens, positions, None, attn_mask)
    return logits


def forward(model, tokens, input_mask, positions=None) -> jax.Array:
    """Full forward pass without a cache, deterministic (dropout off):
    ``logits [B, L, V]`` under the causal mask of ``input_mask``."""
    if positions is None:
        positions = transformer_lib.build_positions_from_mask(input_mask)
    mask = transformer_lib.make_causal_attn_mask(input_mask)
    return _nnx_forward(nnx.view(model, deterministic=True), tokens, positions, mask)


def eval_loss(model, tokens=None, input_mask=None) -> float:
    if tokens is None:
        tokens, input_mask = training_batch(model.num_embed)
    return float(next_token_loss(forward(model, tokens, input_mask), tokens, input_mask))


@nnx.jit
def _nnx_train_step(model, optimizer, rngs, tokens, input_mask):
    positions = transformer_lib.build_positions_from_mask(input_mask)
    mask = transformer_lib.make_causal_attn_mask(input_mask)

    def loss_fn(model, rngs):
        logits, _ = model(tokens, positions, None, mask, rngs=rngs)
        return next_token_loss(logits, tokens, input_mask)

    loss, grads = nnx.value_and_grad(loss_fn)(model, rngs)
    optimizer.update(model, grads)
    return loss


def train(model, tokens=None, input_mask=None, *, steps=3, learning_rate=1e-2, seed=0):
    """``steps`` Adam steps on the next-token loss, dropout drawn from call-time ``rngs``
    (as gemma's training does). Returns the training losses.

    The dropout key is an ``unsafe_rbg`` key: XLA's bit generator compiles in about half
    the time of the default threefry on CPU (the suite's budget)."""
    if tokens is None:
        tokens, input_mask = training_batch(model.num_embed)
    optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)
    rngs = nnx.Rngs(dropout=jax.random.key(seed, impl="unsafe_rbg"))
    return [
        float(_nnx_train_step(model, optimizer, rngs, tokens, input_mask)) for _ in range(steps)
    ]


def train_and_evaluate(model, *, steps=3, learning_rate=1e-2) -> tuple[float, float]:
    """``(loss_before, loss_after)``: the deterministic loss on the training batch before
    and after :func:`train` (a model that learns has ``after < before``)."""
    tokens, input_mask = training_batch(model.num_embed)
    before = eval_loss(model, tokens, input_mask)
    losses = train(model, tokens, input_mask, steps=steps, learning_rate=learning_rate)
    if not np.all(np.isfinite(losses)):
        raise AssertionError(f"non-finite training losses {losses}")
    return before, eval_loss(model, tokens, input_mask)


def sample(model, prompts=PROMPTS, total_generation_steps=GENERATION_STEPS, *, vocab=None):
    """Runs :class:`sampler.Sampler` (dropout off) with ``echo=True``."""
    vocab = vocab or sampler_lib.TinyVocab(model.num_embed)
    s = sampler_lib.Sampler(
        transformer=nnx.view(model, deterministic=True), vocab=vocab, cache_size=CACHE_SIZE
    )
    return s(list(prompts), total_generation_steps, echo=True)


def compare_with_forward(out: sampler_lib.SamplerOutput, prompts, full_fn) -> dict:
    """Step ``t``'s sampled logits (``out.logits[i][t + 1]``, from an ``echo=True`` run on
    the token-id ``prompts``) against ``full_fn(tokens, valid, positions)[:, t]``, a full
    forward pass over the sampled tokens, at the non-pad steps that ran. See
    :func:`compare_sampler_with_forward` for the result."""
    tokens = np.asarray(out.tokens, np.int32)
    sampled = np.stack(out.logits)[:, 1:]
    valid = tokens != PAD
    # Positions as the sampler builds them: prompt pads skipped, generated steps counted.
    position_mask = np.ones_like(valid)
    for i, p in enumerate(prompts):
        position_mask[i, : len(p)] = np.asarray(p) != PAD
    positions = transformer_lib.build_positions_from_mask(jnp.asarray(position_mask))
    full = np.asarray(
        full_fn(_on_mesh(jnp.asarray(tokens)), _on_mesh(jnp.asarray(valid)), _on_mesh(positions))
    )[:, :-1]
    compared = valid[:, :-1] & (np.arange(tokens.shape[1] - 1) < out.num_steps)[None]
    diff = np.linalg.norm(sampled - full, axis=-1)
    scale = np.linalg.norm(full, axis=-1)
    rel = np.where(compared, diff / np.maximum(scale, 1e-30), 0.0)
    return {
        "max_rel_error": float(rel.max()),
        "compared_steps": int(compared.sum()),
        "sampled": sampled,
        "full": full,
        "tokens": tokens,
        "compared": compared,
    }


def compare_sampler_with_forward(model, prompts=PROMPTS, total_generation_steps=GENERATION_STEPS):
    """Samples ``prompts`` and recomputes the sampled sequences in one full forward pass.

    Returns a dict: ``max_rel_error`` (max over compared steps of
    ``|sampled - full| / |full|``, vector 2-norms over the vocabulary), ``compared_steps``,
    and the arrays ``sampled``, ``full`` ``[B, T - 1, V]``, ``tokens``, ``compared``.
    """
    out = sample(model, prompts, total_generation_steps)
    return compare_with_forward(
        out, prompts, lambda tokens, valid, pos: forward(model, tokens, valid, positions=pos)
    )


def check_sampler_matches_forward(model, prompts=PROMPTS, rtol=1e-5, **kwargs) -> float:
    """Raises ``AssertionError`` unless the sampler's logits equal the full forward pass's
    within ``rtol`` at every compared step; returns the max relative error."""
    result = compare_sampler_with_forward(model, prompts, **kwargs)
    _assert_close(result, rtol, len(prompts))
    return result["max_rel_error"]


def _assert_close(result, rtol, batch):
    if result["compared_steps"] < batch * 2:
        raise AssertionError(f"only {result['compared_steps']} steps were compared")
    if not result["max_rel_error"] <= rtol:
        raise AssertionError(
            f"sampled logits differ from the full forward pass: max relative error "
            f"{result['max_rel_error']:.3g} > {rtol:g}"
        )


# ----------------------------------------------------------------------------------------
# Meshes and shardings


def explicit_mesh(fsdp: int = 1, tensor: int = 2) -> jax.sharding.Mesh:
    """An explicit-axes mesh ``('fsdp', 'tensor')`` on the first ``fsdp * tensor``
    devices."""
    return jax.make_mesh(
        (fsdp, tensor),
        ("fsdp", "tensor"),
        axis_types=(AxisType.Explicit, AxisType.Explicit),
        devices=jax.devices()[: fsdp * tensor],
    )


def sharded_config(**override) -> TransformerConfig:
    """:meth:`TransformerConfig.tiny` with ``ShardingConfig.fsdp_tp_sharding`` on the axes
    of :func:`explicit_mesh`."""
    shd = ShardingConfig.fsdp_tp_sharding(fsdp_axis_name="fsdp", tensor_parallel_axis_name="tensor")
    return TransformerConfig.tiny(shd_config=shd, **override)


def _normalize(spec, ndim):
    entries = tuple(spec) if spec is not None else ()
    return entries + (None,) * (ndim - len(entries))


def param_shardings(model) -> dict[str, tuple[tuple, tuple]]:
    """``{"layers/0/attn/q_einsum/kernel": (declared, actual), ...}`` for every parameter:
    the ``out_sharding`` it was created with and its array's sharding spec (both padded
    with ``None`` to the array's rank; ``()``-padded Nones when unsharded)."""
    result = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var[...]
        declared = var.get_metadata().get("out_sharding")
        sharding = getattr(value, "sharding", None)
        actual = getattr(sharding, "spec", None)
        name = "/".join(str(p) for p in path)
        result[name] = (_normalize(declared, value.ndim), _normalize(actual, value.ndim))
    return result


def check_param_shardings(model, min_sharded: int = 1) -> dict:
    """Raises unless every parameter lies as its ``out_sharding`` metadata says and at
    least ``min_sharded`` of them are split over a mesh axis; returns
    :func:`param_shardings`."""
    shardings = param_shardings(model)
    wrong = {k: v for k, v in shardings.items() if v[0] != v[1]}
    if wrong:
        raise AssertionError(f"parameters not laid out as declared (declared, actual): {wrong}")
    sharded = [k for k, (d, _) in shardings.items() if any(e is not None for e in d)]
    if len(sharded) < min_sharded:
        raise AssertionError(f"only {len(sharded)} parameters are sharded: {sharded}")
    return shardings


# ----------------------------------------------------------------------------------------
# linen (each helper traces its functions when called, so a swap around it takes effect)


def linen_init(model, seed: int = 0):
    tokens, input_mask = training_batch(model.config.num_embed)
    positions = transformer_lib.build_positions_from_mask(input_mask)
    mask = transformer_lib.make_causal_attn_mask(input_mask)
    return jax.jit(model.init)(jax.random.key(seed), tokens, positions, None, mask)


def linen_forward(model, params, tokens, input_mask, positions=None):
    if positions is None:
        positions = transformer_lib.build_positions_from_mask(input_mask)
    mask = transformer_lib.make_causal_attn_mask(input_mask)
    return jax.jit(model.apply)(params, tokens, positions, None, mask)[0]


def linen_train_and_evaluate(model, params, *, steps=3, learning_rate=1e-2):
    """``(loss_before, loss_after, new_params)`` for ``steps`` Adam steps."""
    tokens, input_mask = training_batch(model.config.num_embed)
    positions = transformer_lib.build_positions_from_mask(input_mask)
    mask = transformer_lib.make_causal_attn_mask(input_mask)
    tx = optax.adam(learning_rate)

    def loss_fn(params):
        logits, _ = model.apply(params, tokens, positions, None, mask)
        return next_token_loss(logits, tokens, input_mask)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    evaluate = jax.jit(loss_fn)
    before = float(evaluate(params))
    opt_state = tx.init(params)
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
        if not np.isfinite(loss):
            raise AssertionError(f"non-finite training loss {loss}")
    return before, float(evaluate(params)), params


def compare_linen_sampler_with_forward(
    model, params, prompts: Sequence = PROMPTS, total_generation_steps=GENERATION_STEPS
):
    """As :func:`compare_sampler_with_forward`, with :class:`sampler.LinenSampler`."""
    vocab = sampler_lib.TinyVocab(model.config.num_embed)
    s = sampler_lib.LinenSampler(model=model, params=params, vocab=vocab, cache_size=CACHE_SIZE)
    out = s(list(prompts), total_generation_steps, echo=True)
    return compare_with_forward(
        out,
        prompts,
        lambda tokens, valid, pos: linen_forward(model, params, tokens, valid, positions=pos),
    )


def check_linen_sampler_matches_forward(model, params, prompts=PROMPTS, rtol=1e-5, **kwargs):
    result = compare_linen_sampler_with_forward(model, params, prompts, **kwargs)
    _assert_close(result, rtol, len(prompts))
    return result["max_rel_error"]
