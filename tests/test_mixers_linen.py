"""flax_linoss.mixers.linen: the LinOSS mixer as a drop-in for linen attention.

Proves, numerically: a small linen decoder language model (tests/linen_lm.py, whose blocks
call ``nn.SelfAttention(...)(x, mask)`` the stock way) trains and decodes with each mixer
swapped in by a config value (registry) and by the swap helper; a prefill + one-token
decode equals the full forward pass (float32 and bfloat16); padding never influences valid
outputs (all mask forms, left/right/middle padding); packed segments equal running them
alone; the mixer is causal; a bidirectional encoder classifier gives the same logits for
padded and unpadded sequences; parameters carry logical axis names; bad input raises clearly.
"""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import linen_lm as lm
import numpy as np
import optax
import pytest
from oscillator_reference import assert_rel_close

from flax_linoss import get_mixer, swap_attention
from flax_linoss.mixers import base
from flax_linoss.mixers.linen import DLinOSSMixer, LinOSSMixer, as_self_attention

MIXERS = ["linoss-im", "linoss-imex", "d-linoss"]
CLASS_NAME = {
    "attention": "MultiHeadDotProductAttention",
    "linoss-im": "LinOSSMixer",
    "linoss-imex": "LinOSSIMEXMixer",
    "d-linoss": "DLinOSSMixer",
}
VOCAB, LENGTH, BATCH = 16, 16, 4


def _config(**kw):
    return lm.LMConfig(
        vocab_size=VOCAB,
        width=32,
        num_heads=2,
        num_layers=1,
        qkv_features=32,
        mlp_dim=64,
        max_len=LENGTH,
        dropout_rate=0.1,
        attention_dropout_rate=0.1,
        **kw,
    )


def _pattern_tokens(batch=BATCH, length=LENGTH, period=5):
    """A repeated pattern 1..period (tokens > 0: linen_lm treats 0 as padding)."""
    offsets = np.arange(batch)[:, None]
    return jnp.asarray((np.arange(length)[None] + offsets) % period + 1, jnp.int32)


def _xent(logits, tokens):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, tokens[..., None], -1))


def _mixer_params(params):
    return set(params["block_0"]) - {"attn_norm", "mlp_norm", "mlp_in", "mlp_out"}


class _LM:
    """Jitted init / forward / train step / decoding of ``linen_lm.DecoderLM`` for one config.

    Each function is traced on its first call (linen looks the attention class up then, so
    under swap_attention the first call must happen inside the block).
    """

    def __init__(self, config_mixer):
        train_cfg = _config(mixer=config_mixer, deterministic=False)
        eval_cfg = train_cfg.replace(deterministic=True)
        dec_cfg = eval_cfg.replace(decode=True)
        self.tokens = tokens = _pattern_tokens()
        tx = optax.adam(1e-2)

        def loss(p, key):
            logits = lm.DecoderLM(train_cfg).apply({"params": p}, tokens, rngs={"dropout": key})
            return _xent(logits, tokens)

        def train_step(p):
            grads = jax.grad(loss)(p, jax.random.key(1))
            updates, _ = tx.update(grads, tx.init(p), p)
            return optax.apply_updates(p, updates)

        def decode_step(p, cache, x):
            out, mut = lm.DecoderLM(dec_cfg).apply(
                {"params": p, "cache": cache}, x, mutable=["cache"]
            )
            return out, mut["cache"]

        # flax convention: init of the decode model on a full-length input creates the
        # params and the (zero) cache; the params are those of the non-decode model.
        self.init_fn = lambda: nn.unbox(lm.DecoderLM(dec_cfg).init(jax.random.key(0), tokens))
        self._init = jax.jit(self.init_fn)
        self.forward = jax.jit(lambda p: lm.DecoderLM(eval_cfg).apply({"params": p}, tokens))
        self.train_step = jax.jit(train_step)
        self._decode_step = jax.jit(decode_step)

    def init(self):
        """``(params, cache)``."""
        variables = self._init()
        return variables["params"], variables["cache"]

    def decode(self, params, cache, prefill):
        inputs = lm.shift_right(self.tokens)  # decode mode does not shift
        out, cache = self._decode_step(params, cache, inputs[:, :prefill])
        outs = [out]
        for t in range(prefill, LENGTH):
            out, cache = self._decode_step(params, cache, inputs[:, t : t + 1])
            outs.append(out)
        return jnp.concatenate(outs, axis=1)


def _check_trains_and_decodes(model, params, cache, prefill):
    """One training step lowers the loss; decoding through the cache == full forward."""
    before = _xent(model.forward(params), model.tokens)
    new_params = model.train_step(params)
    full = model.forward(new_params)
    after = _xent(full, model.tokens)
    assert np.isfinite(before) and after < before - 1e-3, (before, after)
    decoded = model.decode(new_params, cache, prefill)
    assert_rel_close(decoded, full, 2e-5)
    return new_params


@pytest.mark.filterwarnings("ignore:SelfAttention will be deprecated")
@pytest.mark.parametrize("mixer", MIXERS)
def test_lm_with_mixer_from_config_and_swap_helper(mixer):
    """The test LM with each mixer, picked (a) by one config value (registry) and (b) by
    swap_attention around the stock `nn.SelfAttention(...)(x, decoder_mask)` code.

    (a) trains one step and decodes (prompt of 5, then one token at a time) exactly like
    the full forward pass. (b) builds the very same parameters, computes the same logits
    and decodes the same through the `SelfAttention`-signature subclass; its training step
    is the same function and is run for d-linoss in `test_lm_swap_helper_trains`.
    """
    model = _LM(config_mixer=mixer)
    params, cache = model.init()
    assert _mixer_params(params) == {f"{CLASS_NAME[mixer]}_0"}
    # The test LM's 2 heads: the outer block's 2 heads of 16 x 16 oscillators.
    assert jax.tree.map(jnp.shape, cache["block_0"]) == {
        f"{CLASS_NAME[mixer]}_0": {
            "cache_index": (),
            "conv_buffer": (BATCH, 3, 3, 32),
            "last_index": (BATCH,),
            "segment_id": (BATCH,),
            "state_y": (BATCH, 2, 16, 16),
            "state_z": (BATCH, 2, 16, 16),
        }
    }
    new_params = _check_trains_and_decodes(model, params, cache, prefill=5)

    stock = _LM(config_mixer=None)  # the stock line: nn.SelfAttention(...)(x, mask)
    with swap_attention(mixer):
        # Shapes only (tracing, no compile): the swapped model has the same variables.
        shapes = jax.eval_shape(stock.init_fn)
        assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(
            jnp.shape, {"params": params, "cache": cache}
        )
        np.testing.assert_allclose(stock.forward(new_params), model.forward(new_params))
        np.testing.assert_allclose(
            stock.decode(new_params, cache, prefill=5),
            model.forward(new_params),
            atol=2e-5,
            rtol=1e-5,
        )
    # Outside the block the stock model is attention again.
    assert "SelfAttention_0" in jax.eval_shape(_LM(config_mixer=None).init_fn)["params"]["block_0"]


@pytest.mark.filterwarnings("ignore:SelfAttention will be deprecated")
def test_lm_swap_helper_trains():
    stock = _LM(config_mixer=None)
    with swap_attention("d-linoss"):
        params, _ = stock.init()
        assert _mixer_params(params) == {"DLinOSSMixer_0"}
        before = _xent(stock.forward(params), stock.tokens)
        after = _xent(stock.forward(stock.train_step(params)), stock.tokens)
    assert after < before - 1e-3, (before, after)


def test_lm_with_stock_attention():
    """The test model itself is sound with flax attention: its one-token decoding (position
    offset and attention keys in the cache) equals the full forward pass."""
    model = _LM(config_mixer="attention")
    params, cache = model.init()
    assert _mixer_params(params) == {"MultiHeadDotProductAttention_0"}
    assert_rel_close(model.decode(params, cache, prefill=1), model.forward(params), 2e-5)


def test_lm_packed_segments_equal_alone():
    """Packing (block-diagonal mask, per-segment positions, padding): each segment as if
    alone."""
    cfg = _config(mixer="d-linoss", deterministic=True)
    model = lm.DecoderLM(cfg)
    seg_a = jnp.array([3, 1, 4, 1, 5, 9], jnp.int32) % VOCAB
    seg_b = jnp.array([2, 6, 5, 3, 5, 8, 9], jnp.int32) % VOCAB
    pad = 3
    row = jnp.concatenate([seg_a, seg_b, jnp.zeros(pad, jnp.int32)])[None]
    segmentation = jnp.array([[1] * 6 + [2] * 7 + [0] * pad])
    positions = jnp.array([list(range(6)) + list(range(7)) + [0] * pad])
    params = jax.jit(model.init)(jax.random.key(0), row)["params"]
    apply = jax.jit(model.apply)
    packed = apply({"params": params}, row, positions=positions, segment_ids=segmentation)
    alone_a = apply({"params": params}, seg_a[None])
    alone_b = apply({"params": params}, seg_b[None])
    assert_rel_close(packed[:, :6], alone_a, 1e-5)
    assert_rel_close(packed[:, 6:13], alone_b, 1e-5)


# ----------------------------------------------------------------------------------------
# The mixer on its own.


def _x(shape=(3, 10, 8), seed=1, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


PADDINGS = {
    "right": [1] * 7 + [0] * 3,
    "left": [0] * 3 + [1] * 7,
    "middle": [1] * 3 + [0] * 2 + [1] * 5,
}


def _mask_forms(valid):
    attn = nn.make_attention_mask(valid, valid)
    return {
        "per_step": valid,
        "attention_noncausal": attn,
        "attention_causal": nn.combine_masks(attn, nn.make_causal_mask(valid)),
        "float_per_step": valid.astype(jnp.float32),
    }


@pytest.mark.parametrize("bidirectional", [False, True])
def test_padding_never_influences_valid_outputs(bidirectional):
    """Right, left and middle padding (and none), in every mask form flax produces."""
    rows = [np.array(PADDINGS[k], bool) for k in sorted(PADDINGS)] + [np.ones(10, bool)]
    valid = jnp.asarray(np.stack(rows))
    x = _x((4, 10, 8))
    # Garbage at padded steps must not matter.
    garbage = jnp.where(valid[..., None], x, 1e3 * _x((4, 10, 8), seed=7))
    mixer = DLinOSSMixer(qkv_features=12, state_size=6, bidirectional=bidirectional)
    params = jax.jit(mixer.init)(jax.random.key(0), x)
    apply = jax.jit(mixer.apply)
    alone = [apply(params, x[i : i + 1, row])[0] for i, row in enumerate(rows)]
    for form, mask in _mask_forms(valid).items():
        y = apply(params, garbage, mask=mask)
        for i, row in enumerate(rows):
            assert_rel_close(y[i, row], alone[i], 1e-5, f"{form} {i}")
    # Without the mask the garbage does leak (the test can fail).
    assert not np.allclose(apply(params, garbage)[0, rows[0]], alone[0], atol=1e-3)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_segments_equal_alone(bidirectional):
    lengths = (4, 3, 5)
    x = _x((1, sum(lengths), 8))
    ids = jnp.asarray(np.repeat(np.arange(3), lengths)[None])
    mixer = LinOSSMixer(qkv_features=8, bidirectional=bidirectional)
    params = mixer.init(jax.random.key(0), x)
    block = nn.make_attention_mask(ids, ids, jnp.equal)
    causal_block = nn.combine_masks(block, nn.make_causal_mask(ids))
    starts = np.cumsum((0, *lengths))
    for kw in ({"segment_ids": ids}, {"mask": block}, {"mask": causal_block}):
        y = mixer.apply(params, x, **kw)
        for s, e in itertools.pairwise(starts):
            alone = mixer.apply(params, x[:, s:e])
            assert_rel_close(y[:, s:e], alone, 1e-5, str(list(kw)))
    # Without packing information the segments do interact (the test can fail).
    y = mixer.apply(params, x)
    assert not np.allclose(y[:, 4:7], mixer.apply(params, x[:, 4:7]), atol=1e-3)


def test_causal_by_construction_and_bidirectional_is_not():
    x = _x()
    x2 = x.at[:, 6:].set(_x(seed=3)[:, 6:])
    for bidirectional, same in ((False, True), (True, False)):
        mixer = LinOSSMixer(bidirectional=bidirectional)
        params = mixer.init(jax.random.key(0), x)
        y, y2 = mixer.apply(params, x), mixer.apply(params, x2)
        assert np.allclose(y[:, :6], y2[:, :6], atol=1e-6) == same
    # A full (non-causal) mask on the causal mixer keeps it causal.
    mixer = LinOSSMixer()
    params = mixer.init(jax.random.key(0), x)
    full_mask = jnp.ones((3, 1, 10, 10), bool)
    np.testing.assert_allclose(
        mixer.apply(params, x, mask=full_mask), mixer.apply(params, x), atol=1e-6
    )


def _decode(mixer, params, x, prefill, mask=None):
    cache = mixer.init(jax.random.key(0), x)["cache"]
    outs, t = [], 0
    for n in [prefill] + [1] * (x.shape[1] - prefill):
        kw = {} if mask is None else {"mask": mask[:, t : t + n]}
        out, mut = mixer.apply(
            {"params": params, "cache": cache}, x[:, t : t + n], mutable=["cache"], **kw
        )
        cache = mut["cache"]
        outs.append(out)
        t += n
    assert int(cache["cache_index"]) == x.shape[1]
    bound = mixer.bind({"params": params})
    assert cache["state_z"].shape == bound.init_state((x.shape[0],)).z.shape
    return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize(
    ("cls", "dtype", "atol", "block"),
    [
        (LinOSSMixer, jnp.float32, 1e-5, "outer"),
        (DLinOSSMixer, jnp.float32, 1e-5, "outer"),
        (DLinOSSMixer, jnp.float32, 1e-5, "plain"),
        (DLinOSSMixer, jnp.bfloat16, 3e-2, "outer"),
    ],
)
def test_prefill_then_steps_equals_full_forward(cls, dtype, atol, block):
    x = _x(dtype=dtype)
    full_mixer = cls(num_heads=3, qkv_features=12, dtype=dtype, block=block)
    params = full_mixer.init(jax.random.key(0), x)["params"]
    full = full_mixer.apply({"params": params}, x)
    decoded = _decode(full_mixer.clone(decode=True), params, x, prefill=4)
    assert decoded.dtype == dtype
    scale = float(jnp.max(jnp.abs(full.astype(jnp.float32))))
    np.testing.assert_allclose(
        np.asarray(decoded, np.float32), np.asarray(full, np.float32), atol=atol * scale
    )


@pytest.mark.parametrize("block", ["outer", "plain"])
def test_decode_with_padded_prompt(block):
    """A left-padded prompt, prefilled with its padding mask, decodes like the full pass."""
    x = _x()
    valid = jnp.asarray(np.stack([PADDINGS["left"], PADDINGS["middle"], [1] * 10]), bool)
    mixer = LinOSSMixer(state_size=5 if block == "plain" else None, block=block)
    params = mixer.init(jax.random.key(0), x)["params"]
    full = mixer.apply({"params": params}, x, mask=valid)
    decoded = _decode(mixer.clone(decode=True), params, x, prefill=6, mask=valid)
    assert_rel_close(decoded * valid[..., None], full * valid[..., None], 1e-5)


@pytest.mark.parametrize("block", ["outer", "plain"])
def test_decode_cache_is_independent_of_length(block):
    mixer = LinOSSMixer(num_heads=2, state_size=7, decode=True, block=block)
    short = jax.eval_shape(mixer.init, jax.random.key(0), _x((2, 4, 8)))["cache"]
    long = jax.eval_shape(mixer.init, jax.random.key(0), _x((2, 64, 8)))["cache"]
    assert jax.tree.map(jnp.shape, short) == jax.tree.map(jnp.shape, long)
    assert short["state_y"].shape == ((2, 2, 7) if block == "plain" else (2, 2, 4, 4))


def test_dropout_follows_attention_conventions():
    x = _x()
    mixer = LinOSSMixer(dropout_rate=0.5)
    params = mixer.init(jax.random.key(0), x, deterministic=True)
    det = mixer.apply(params, x, deterministic=True)
    rng = {"dropout": jax.random.key(1)}
    noisy = mixer.apply(params, x, deterministic=False, rngs=rng)
    assert not np.allclose(det, noisy)
    same = mixer.apply(params, x, deterministic=False, dropout_rng=jax.random.key(2))
    np.testing.assert_allclose(
        same, mixer.apply(params, x, deterministic=False, dropout_rng=jax.random.key(2))
    )
    with pytest.raises(ValueError, match="deterministic"):
        mixer.apply(params, x)


def test_accepts_attention_arguments():
    """Every nn.MultiHeadDotProductAttention field is a field of the mixer."""
    attn_fields = set(nn.MultiHeadDotProductAttention.__dataclass_fields__) - {
        "parent",
        "name",
    }
    assert attn_fields <= set(LinOSSMixer.__dataclass_fields__)
    x = _x()
    mixer = LinOSSMixer(
        num_heads=2,  # the outer block's heads (as for attention, qkv_features divides)
        qkv_features=10,
        out_features=6,
        use_bias=False,
        precision="highest",
        normalize_qk=True,
        attention_fn=nn.dot_product_attention,
    )
    params = mixer.init(jax.random.key(0), x)
    y = mixer.apply(params, x, x, sow_weights=True)  # inputs_k = inputs_q is self-mixing
    assert y.shape == (3, 10, 6)
    assert "bias" not in params["params"]["in_proj"]
    assert "bias" not in params["params"]["query"]
    plain = LinOSSMixer(num_heads=3, qkv_features=10, block="plain")  # heads ignored
    assert plain.apply(plain.init(jax.random.key(0), x), x).shape == (3, 10, 8)


def test_self_attention_signature():
    self_mixer = as_self_attention(LinOSSMixer)
    assert self_mixer.__name__ == "LinOSSMixer"
    x = _x()
    valid = jnp.asarray(np.stack([PADDINGS["right"]] * 3), bool)
    mask = nn.make_attention_mask(valid, valid)
    params = LinOSSMixer().init(jax.random.key(0), x)
    np.testing.assert_allclose(
        self_mixer().apply(params, x, mask), LinOSSMixer().apply(params, x, mask=mask)
    )


def test_logical_axis_names():
    x = _x()
    mixer = DLinOSSMixer(qkv_features=12, state_size=6, bidirectional=True)
    specs = nn.get_partition_spec(mixer.init(jax.random.key(0), x))["params"]
    assert tuple(specs["in_proj"]["kernel"]) == ("embed", "kv")
    assert tuple(specs["out_proj"]["kernel"]) == ("kv", "embed")
    for layer in ("linoss", "linoss_reverse"):
        for name in ("a_raw", "dt_raw", "g_raw", "b", "c", "d"):
            assert tuple(specs[layer][name]) == base.PARAM_AXES[name], (layer, name)
    # A user's own partitioning (lm1b style) wins over the defaults.
    user = LinOSSMixer(kernel_init=nn.with_logical_partitioning(nn.initializers.ones, ("a", "b")))
    specs = nn.get_partition_spec(user.init(jax.random.key(0), x))["params"]
    assert tuple(specs["in_proj"]["kernel"]) == ("a", "b")
    # Under logical axis rules the names map to mesh axes.
    rules = (("embed", None), ("kv", None), ("oscillator", "model"))
    mesh_specs = nn.logical_to_mesh_sharding(
        nn.get_partition_spec(mixer.init(jax.random.key(0), x)),
        jax.make_mesh((1, 1), ("data", "model")),
        rules,
    )
    assert tuple(mesh_specs["params"]["linoss"]["b"].spec) == ("model", None, None)


# ----------------------------------------------------------------------------------------
# A bidirectional encoder classifier with padding.


class _Encoder(nn.Module):
    mixer: str = "d-linoss"

    @nn.compact
    def __call__(self, tokens, mask):
        x = nn.Embed(VOCAB, 16)(tokens)
        attn = get_mixer(self.mixer)(num_heads=2, qkv_features=16, bidirectional=True)
        x = x + attn(nn.LayerNorm()(x), mask=mask)
        x = x + nn.Dense(16)(nn.gelu(nn.Dense(32)(nn.LayerNorm()(x))))
        valid = jnp.diagonal(mask, axis1=-2, axis2=-1)[:, 0] if mask.ndim == 4 else mask
        w = valid[..., None].astype(x.dtype)
        pooled = jnp.sum(x * w, axis=1) / jnp.sum(w, axis=1)
        return nn.Dense(3)(pooled)


@pytest.mark.parametrize("mixer", ["linoss-im", "d-linoss"])
def test_bidirectional_encoder_padded_equals_unpadded(mixer):
    rng = np.random.default_rng(0)
    lengths = [5, 9, 7]
    seqs = [rng.integers(1, VOCAB, n) for n in lengths]
    width = 12
    model = _Encoder(mixer)
    params = model.init(jax.random.key(0), jnp.ones((1, width), jnp.int32), jnp.ones((1, width)))
    apply = jax.jit(model.apply)
    alone = jnp.concatenate(
        [apply(params, jnp.asarray(s)[None], jnp.ones((1, len(s)), bool)) for s in seqs]
    )
    for side in ("right", "left"):
        tokens = np.zeros((3, width), np.int32)
        for i, s in enumerate(seqs):
            if side == "right":
                tokens[i, : len(s)] = s
            else:
                tokens[i, width - len(s) :] = s
        tokens = jnp.asarray(tokens)
        valid = tokens > 0
        for mask in (valid, nn.make_attention_mask(valid, valid)):
            logits = apply(params, tokens, mask)
            assert_rel_close(logits, alone, 1e-5, side)
    # Ignoring the mask changes the logits: padding would leak without it.
    leaky = apply(params, tokens, jnp.ones_like(valid))
    assert not np.allclose(leaky, alone, atol=1e-3)


# ----------------------------------------------------------------------------------------
# Bad input.


def test_cross_attention_is_rejected():
    x, other = _x(), _x(seed=5)
    mixer = LinOSSMixer()
    params = mixer.init(jax.random.key(0), x)
    for kw in ({"inputs_k": other}, {"inputs_v": other, "inputs_k": x}, {"inputs_kv": other}):
        with pytest.raises(ValueError, match="cannot do cross-attention"):
            mixer.apply(params, x, **kw)


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((3, 9), "cannot broadcast"),  # wrong length, per-step form
        ((2, 10), "cannot broadcast"),  # wrong batch
        ((3, 1, 10, 9), "query/key lengths"),
        ((3, 1, 1, 10), "query/key lengths"),  # a decode-style mask
        ((2, 1, 10, 10), "cannot broadcast"),
        ((3, 1, 1, 10, 10), "rank 5"),
    ],
)
def test_bad_mask_shapes(shape, match):
    x = _x()
    mixer = LinOSSMixer()
    params = mixer.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=match):
        mixer.apply(params, x, mask=jnp.ones(shape, bool))


def test_decode_errors():
    x = _x()
    mixer = LinOSSMixer(decode=True)
    variables = mixer.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="has no 'cache' collection"):
        mixer.apply({"params": variables["params"]}, x[:, :1], mutable=["cache"])
    with pytest.raises(ValueError, match="must be mutable"):
        mixer.apply(variables, x[:, :1])
    with pytest.raises(ValueError, match="batch shape"):
        mixer.apply(variables, x[:2, :1], mutable=["cache"])
    with pytest.raises(ValueError, match="cannot decode"):
        LinOSSMixer(decode=True, bidirectional=True).init(jax.random.key(0), x)


def test_bad_options_and_inputs():
    x = _x()
    with pytest.raises(ValueError, match="discretization"):
        LinOSSMixer(discretization="rk4").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="state_size"):
        LinOSSMixer(state_size=0).init(jax.random.key(0), x)
    with pytest.raises(TypeError, match="floating"):
        LinOSSMixer().init(jax.random.key(0), jnp.ones((2, 3, 4), jnp.int32))
    with pytest.raises(TypeError, match="segment_ids"):
        LinOSSMixer().init(jax.random.key(0), x, segment_ids=jnp.ones((3, 10)))
