"""flax_linoss.mixers.nnx: the LinOSS mixer as a drop-in for ``nnx.MultiHeadAttention``.

Proves, numerically: a small nnx transformer LM built on ``nnx.MultiHeadAttention`` trains
and decodes with each mixer picked by the registry, and the swap helper builds the same
model from unmodified code (decoding through ``init_cache`` and through ``nnx.view``); the
linen and nnx mixers give identical outputs with copied parameters; padding and packing
behave as in linen; parameters carry logical axis metadata; bad input raises clearly.
"""

from __future__ import annotations

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from oscillator_reference import assert_rel_close

from flax_linoss import convert, get_mixer, swap_attention
from flax_linoss.mixers import base
from flax_linoss.mixers import linen as linen_mixers
from flax_linoss.mixers.nnx import DLinOSSMixer, LinOSSIMEXMixer, LinOSSMixer

MIXERS = ["linoss-im", "linoss-imex", "d-linoss"]
CLASSES = {"linoss-im": LinOSSMixer, "linoss-imex": LinOSSIMEXMixer, "d-linoss": DLinOSSMixer}
VOCAB, DIM, LENGTH, BATCH = 16, 32, 16, 4


def _sinusoid(positions, dim):
    freqs = jnp.exp(-jnp.log(1e4) * jnp.arange(dim // 2) / (dim // 2))
    angles = positions[..., None] * freqs
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class Block(nnx.Module):
    """Pre-norm block: layer norm, self-attention, MLP (as in the lm1b decoder)."""

    def __init__(self, dim, attention_cls=None, *, rngs):
        self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
        # `nnx.MultiHeadAttention` is looked up here, at construction: swap_attention's hook.
        cls = nnx.MultiHeadAttention if attention_cls is None else attention_cls
        self.attn = cls(num_heads=2, in_features=dim, qkv_features=dim, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp_in = nnx.Linear(dim, 2 * dim, rngs=rngs)
        self.mlp_out = nnx.Linear(2 * dim, dim, rngs=rngs)

    def __call__(self, x, mask, decode):
        x = x + self.attn(self.ln1(x), mask=mask, decode=decode)
        return x + self.mlp_out(jax.nn.relu(self.mlp_in(self.ln2(x))))


class DecoderLM(nnx.Module):
    def __init__(self, attention_cls=None, *, rngs):
        self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
        self.blocks = nnx.List([Block(DIM, attention_cls, rngs=rngs)])
        self.norm = nnx.LayerNorm(DIM, rngs=rngs)
        self.head = nnx.Linear(DIM, VOCAB, rngs=rngs)

    def __call__(self, tokens, *, decode=None, start=0):
        positions = start + jnp.arange(tokens.shape[1])
        x = self.embed(tokens) + _sinusoid(positions, DIM)
        mask = None if decode else nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask, decode)
        return self.head(self.norm(x))

    def init_cache(self, shape):
        for block in self.blocks:
            block.attn.init_cache((*shape, DIM))


def _tokens():
    return jnp.asarray((np.arange(LENGTH)[None] + np.arange(BATCH)[:, None]) % 5 + 1)


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))


@nnx.jit
def _train_step(model, optimizer, tokens):
    loss, grads = nnx.value_and_grad(_loss)(model, tokens)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def _forward(model, tokens):
    return model(tokens)


@nnx.jit
def _decode_step(model, tokens, start):
    return model(tokens, decode=True, start=start)


def _decode(model, tokens, prefill, *, view=False):
    """Prefill ``prefill`` tokens, then one at a time; returns all logits."""
    if not view:
        model.init_cache(tokens.shape)
    outs = [_decode_step(model, tokens[:, :prefill], jnp.int32(0))]
    for t in range(prefill, tokens.shape[1]):
        outs.append(_decode_step(model, tokens[:, t : t + 1], jnp.int32(t)))
    return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("mixer", MIXERS)
def test_nnx_lm_with_mixer_from_registry_and_swap_helper(mixer):
    tokens = _tokens()
    model = DecoderLM(get_mixer(mixer, api="nnx"), rngs=nnx.Rngs(0))
    assert type(model.blocks[0].attn) is CLASSES[mixer]
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    before = float(_train_step(model, optimizer, tokens))
    after = float(_loss(model, tokens))
    assert np.isfinite(before) and after < before - 1e-3, (before, after)

    full = _forward(model, tokens)
    assert_rel_close(_decode(model, tokens, prefill=5), full, 2e-5)
    assert int(model.blocks[0].attn.cache_index[...]) == LENGTH

    # The swap helper: unmodified code building `nnx.MultiHeadAttention` gets the mixer.
    with swap_attention(mixer, api="nnx"):
        swapped = DecoderLM(rngs=nnx.Rngs(1))
    assert type(swapped.blocks[0].attn) is CLASSES[mixer]
    assert type(DecoderLM(rngs=nnx.Rngs(1)).blocks[0].attn) is nnx.MultiHeadAttention
    nnx.update(swapped, nnx.state(model, nnx.Param))
    np.testing.assert_allclose(_forward(swapped, tokens), full, atol=1e-6)
    # Decoding through nnx.view(decode=True, batch_size=...) creates the cache.
    view = nnx.view(swapped, decode=True, batch_size=BATCH, max_length=LENGTH)
    assert swapped.blocks[0].attn.state_z is None
    assert_rel_close(_decode(view, tokens, prefill=3, view=True), full, 2e-5)


@pytest.mark.parametrize(
    ("discretization", "bidirectional"),
    [("im", False), ("imex", True), ("damped", False), ("damped", True)],
)
def test_linen_and_nnx_mixers_agree(discretization, bidirectional):
    x = jax.random.normal(jax.random.key(1), (2, 9, 8))
    kw = dict(qkv_features=12, out_features=6, state_size=5, bidirectional=bidirectional)
    lin = linen_mixers.LinOSSMixer(num_heads=2, discretization=discretization, **kw)
    variables = nn.unbox(lin.init(jax.random.key(0), x))
    mod = LinOSSMixer(2, 8, discretization=discretization, rngs=nnx.Rngs(3), **kw)
    convert.linen_to_nnx(variables, mod)
    ids = jnp.array([[0] * 4 + [1] * 5, [0] * 9])
    valid = jnp.array([[1] * 7 + [0] * 2, [0] * 2 + [1] * 7], bool)
    for call in ({}, {"segment_ids": ids}, {"mask": valid}):
        np.testing.assert_allclose(lin.apply(variables, x, **call), mod(x, **call), atol=1e-6)
    back = convert.nnx_to_linen(mod)
    jax.tree.map(np.testing.assert_array_equal, back, variables)


def test_nnx_padding_and_packing():
    x = jax.random.normal(jax.random.key(1), (2, 10, 8))
    mod = DLinOSSMixer(in_features=8, bidirectional=True, rngs=nnx.Rngs(0))
    valid = jnp.array([[1] * 6 + [0] * 4, [0] * 3 + [1] * 7], bool)
    garbage = jnp.where(valid[..., None], x, 1e3)
    y = mod(garbage, mask=nnx.make_attention_mask(valid, valid))
    assert_rel_close(y[0, :6], mod(x[:1, :6])[0], 1e-5)
    assert_rel_close(y[1, 3:], mod(x[1:, 3:])[0], 1e-5)
    ids = jnp.array([[0] * 4 + [1] * 6])
    y = mod(x[:1], mask=nnx.make_attention_mask(ids, ids, jnp.equal))
    assert_rel_close(y[0, 4:], mod(x[:1, 4:])[0], 1e-5)


def test_accepts_multi_head_attention_arguments():
    theirs = set(inspect.signature(nnx.MultiHeadAttention.__init__).parameters)
    ours = set(inspect.signature(LinOSSMixer.__init__).parameters)
    assert theirs <= ours, theirs - ours
    theirs = set(inspect.signature(nnx.MultiHeadAttention.__call__).parameters)
    assert theirs <= set(inspect.signature(LinOSSMixer.__call__).parameters)
    x = jnp.ones((2, 5, 8))
    mod = LinOSSMixer(
        2, 8, 10, 6, num_kv_heads=1, use_bias=False, normalize_qk=True, rngs=nnx.Rngs(0)
    )
    assert mod(x, x, x, is_causal=True, sow_weights=True).shape == (2, 5, 6)
    assert mod.in_proj.bias is None and mod.query.bias is None


def test_dropout():
    x = jnp.ones((2, 5, 8))
    mod = LinOSSMixer(in_features=8, dropout_rate=0.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="deterministic"):
        mod(x)
    det = mod(x, deterministic=True)
    assert not np.allclose(det, mod(x, deterministic=False))
    np.testing.assert_allclose(nnx.view(mod, deterministic=True)(x), det)


@pytest.mark.parametrize("block", ["outer", "plain", "selective"])
def test_every_parameter_records_its_logical_axes(block):
    if block == "selective":  # the plain block with its step-size gate
        mod = DLinOSSMixer(in_features=8, block="plain", selective=True, rngs=nnx.Rngs(0))
    else:
        mod = DLinOSSMixer(in_features=8, bidirectional=block == "plain", rngs=nnx.Rngs(0))
        assert mod.block == block  # a bidirectional mixer defaults to the plain block
    for path, var in nnx.to_flat_state(nnx.state(mod, nnx.Param)):
        layer = str(path[0]) in ("linoss", "linoss_reverse")
        key = str(path[-1]) if layer else "/".join(str(p) for p in path)
        assert var.get_metadata("logical_axes") == base.PARAM_AXES[key], path
        assert var.get_metadata("logical_axes") is not None
        assert len(var.get_metadata("logical_axes")) == var[...].ndim, path


def test_sharding_metadata():
    mod = DLinOSSMixer(in_features=8, bidirectional=True, rngs=nnx.Rngs(0))
    # Without a mesh no `out_sharding` (flax would demand a mesh for optimizer state) ...
    assert mod.linoss.b.get_metadata("out_sharding", None) is None
    nnx.Optimizer(mod, optax.adam(1e-3), wrt=nnx.Param)
    # ... under a mesh and logical axis rules, the usual partition specs.
    mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = (("embed", None), ("kv", None), ("oscillator", "model"))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        mod = DLinOSSMixer(in_features=8, block="plain", rngs=nnx.Rngs(0))
        specs = nnx.get_partition_spec(nnx.state(mod, nnx.Param))
        spec = lambda v: tuple(v.get_value() if isinstance(v, nnx.Variable) else v)
        assert spec(specs["linoss"]["b"]) == ("model", None, None)
        assert spec(specs["in_proj"]["kernel"]) == (None, None)
        nnx.Optimizer(mod, optax.adam(1e-3), wrt=nnx.Param)


def test_errors():
    x, other = jnp.ones((2, 5, 8)), jnp.zeros((2, 5, 8))
    mod = LinOSSMixer(in_features=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="cannot do cross-attention"):
        mod(x, other)
    with pytest.raises(ValueError, match="cannot do cross-attention"):
        mod(x, inputs_v=other, inputs_k=x)
    with pytest.raises(ValueError, match="cache not initialised"):
        mod(x, decode=True)
    with pytest.raises(ValueError, match="cannot broadcast"):
        mod(x, mask=jnp.ones((3, 5), bool))
    with pytest.raises(ValueError, match="query/key lengths"):
        mod(x, mask=jnp.ones((2, 1, 1, 9), bool))
    with pytest.raises(ValueError, match="in_features=8"):
        mod(jnp.ones((2, 5, 4)))
    mod.init_cache((2, 5, 8))
    with pytest.raises(ValueError, match="batch shape"):
        mod(x[:1, :1], decode=True)
    bi = LinOSSMixer(in_features=8, bidirectional=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="is_causal"):
        bi(x, is_causal=True)
    with pytest.raises(ValueError, match="cannot decode"):
        bi.init_cache(x.shape)
    with pytest.raises(ValueError, match="cannot decode"):
        bi(x, decode=True)
    with pytest.raises(ValueError, match="cannot decode"):
        bi.init_state((2,))
    with pytest.raises(TypeError, match="in_features"):
        LinOSSMixer(rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="discretization"):
        LinOSSMixer(in_features=8, discretization="rk4", rngs=nnx.Rngs(0))
