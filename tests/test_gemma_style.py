"""The Gemma-protocol test decoder (tests/gemma_style) is sound with its stock attention.

The swap tests rely on it, so it is checked on its own first: nnx and linen train; the
while-loop sampler's per-step logits equal one full forward pass (prompts of different
lengths with padding in one batch), also under a 2-device explicit fsdp/tensor mesh where
every parameter lies as its ShardingConfig spec says; a prefill through the cache equals
the full pass; blocks build their attention through the module-global ``Attention``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from gemma_style import linen_modules, linen_transformer, modules, sampler, testing, transformer
from gemma_style.transformer_cfg import AttentionType, TransformerConfig


def test_causal_mask_and_positions():
    valid = jnp.array([[False, True, True, False, True]])
    mask = transformer.make_causal_attn_mask(valid)
    expected = np.tril(np.ones((5, 5), bool)) & np.array([False, True, True, False, True])
    np.testing.assert_array_equal(mask[0], expected)
    np.testing.assert_array_equal(transformer.build_positions_from_mask(valid), [[0, 0, 1, 1, 2]])


def test_nnx_trains_and_sampler_equals_full_forward():
    model = transformer.Transformer(TransformerConfig.tiny(num_layers=2), rngs=nnx.Rngs(0))
    before, after = testing.train_and_evaluate(model)
    assert after < before - 0.5, (before, after)

    out = testing.sample(model)
    assert out.num_steps == testing.LENGTH  # no early stop: every step is compared
    assert [t[: len(p)] for t, p in zip(out.tokens, testing.PROMPTS)] == [
        list(p) for p in testing.PROMPTS
    ]  # prompts teacher-forced

    def full(count_pads=False, ignore_padding=False):
        def fn(tokens, valid, positions):
            if count_pads:  # the middle pad of prompt 2 would shift later steps
                positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
            valid = jnp.ones_like(valid) if ignore_padding else valid
            return testing.forward(model, tokens, valid, positions=positions)

        return testing.compare_with_forward(out, testing.PROMPTS, fn)

    result = full()
    assert result["compared_steps"] >= 40
    assert result["max_rel_error"] <= 1e-5, result["max_rel_error"]
    # The comparison sees positions and padding (it can fail).
    assert full(count_pads=True)["max_rel_error"] > 1e-3
    assert full(ignore_padding=True)["max_rel_error"] > 1e-3


def test_prefill_through_the_cache_dropout_and_sow():
    """Several tokens per cached call (as gemma's attention allows), then one, then the
    rest: equal to the full pass; ``end_index`` advances; the sow config records the
    residual stream; dropout needs call-time rngs unless deterministic."""
    config = TransformerConfig.tiny(num_layers=2, num_kv_heads=1)  # multi-query heads
    model = transformer.Transformer(
        config, rngs=nnx.Rngs(0), sow_config=modules.SowConfig(rs_after_attention=True)
    )
    tokens, valid = testing.training_batch()
    positions = transformer.build_positions_from_mask(valid)
    mask = transformer.make_causal_attn_mask(valid)
    cache_size = 16

    @nnx.jit
    @nnx.capture(nnx.Intermediate)
    def run(model):
        full, _ = model(tokens, positions, None, mask)
        cache = model.init_cache(cache_size, 4, jnp.float32)
        slots = jnp.arange(cache_size)
        slot_valid = jnp.pad(valid, ((0, 0), (0, cache_size - valid.shape[1])))
        outs, ends = [], []
        for start, stop in ((0, 5), (5, 6), (6, 12)):
            step_mask = slot_valid[:, None, :] & (slots <= jnp.arange(start, stop)[:, None])
            logits, cache = model(tokens[:, start:stop], positions[:, start:stop], cache, step_mask)
            outs.append(logits)
            ends.append(cache["layer_0"]["end_index"])
        return full, jnp.concatenate(outs, axis=1), ends, cache

    (full, decoded, ends, cache), sown = run(nnx.view(model, deterministic=True))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), cache["layer_1"]) == {
        "k": ((4, cache_size, 1, 8), jnp.float32),
        "v": ((4, cache_size, 1, 8), jnp.float32),
        "end_index": ((4,), jnp.int32),
    }
    np.testing.assert_array_equal(np.stack(ends), np.repeat([[5], [6], [12]], 4, axis=1))
    ok = np.asarray(valid)
    np.testing.assert_allclose(decoded[ok], full[ok], rtol=1e-5, atol=1e-5 * np.abs(full).max())
    sown = sown["layers"][0]["rs_after_attention"]  # one per call
    assert [x.shape for x in sown] == [(4, 12, 16), (4, 5, 16), (4, 1, 16), (4, 6, 16)]

    model = transformer.Transformer(config, rngs=nnx.Rngs(0))
    with pytest.raises(Exception, match="rngs"):
        nnx.eval_shape(lambda m: m(tokens, positions, None, mask), model)
    noisy = nnx.jit(lambda m, rngs: m(tokens, positions, None, mask, rngs=rngs)[0])
    keys = [jax.random.key(i, impl="unsafe_rbg") for i in (1, 2)]
    a, b = (noisy(model, nnx.Rngs(dropout=k)) for k in keys)
    assert not np.allclose(a, b)


def test_blocks_build_attention_through_the_module_global_name(monkeypatch):
    built = []

    class Recording(modules.Attention):
        def __init__(self, *args, **kwargs):
            built.append(kwargs)
            super().__init__(*args, **kwargs)

    config = TransformerConfig.tiny()
    monkeypatch.setattr(modules, "Attention", Recording)
    model = nnx.eval_shape(lambda: transformer.Transformer(config, rngs=nnx.Rngs(0)))
    assert [type(layer.attn) for layer in model.layers] == [Recording] * 3
    assert built[0]["attn_type"] == AttentionType.LOCAL_SLIDING
    assert {"num_heads", "num_kv_heads", "features", "head_dim", "shd_config"} <= set(built[0])

    class LinenRecording(linen_modules.Attention):
        def setup(self):
            super().setup()
            self.marker = self.param("marker", jax.nn.initializers.zeros, (1,))

        def __call__(self, x, segment_pos, cache, attn_mask):
            cache, out = super().__call__(x, segment_pos, cache, attn_mask)
            return cache, out + self.marker

    monkeypatch.setattr(linen_modules, "Attention", LinenRecording)
    shapes = jax.eval_shape(lambda: testing.linen_init(linen_transformer.Transformer(config)))
    assert "marker" in shapes["params"]["layer_2"]["attn"]


def test_linen_trains_and_sampler_equals_full_forward():
    model = linen_transformer.Transformer(TransformerConfig.tiny(num_layers=2))
    params = testing.linen_init(model)
    assert set(params["params"]) == {"embedder", "final_norm", "layer_0", "layer_1"}
    before, after, params = testing.linen_train_and_evaluate(model, params)
    assert after < before - 0.2, (before, after)
    result = testing.compare_linen_sampler_with_forward(model, params)
    assert result["compared_steps"] >= 40
    assert result["max_rel_error"] <= 1e-5, result["max_rel_error"]


def test_explicit_fsdp_tensor_mesh():
    """fsdp=1 x tensor=2 explicit mesh with ``fsdp_tp_sharding``: parameters lie on their
    specs (and are really split), the model trains, the sampler (sharded cache carry)
    equals the full pass."""
    with jax.set_mesh(testing.explicit_mesh()):
        config = testing.sharded_config(num_layers=2)
        shd = config.shd_config
        model = transformer.Transformer(config, rngs=nnx.Rngs(0))
        specs = testing.check_param_shardings(model, min_sharded=15)
        assert specs["layers/0/attn/q_einsum/kernel"][1] == tuple(shd.q_weight_ndh)
        assert specs["embedder/embedding"][1] == tuple(shd.emb_vd)
        kernel = model.layers[0].attn.kv_einsum.kernel[...]
        assert kernel.addressable_shards[0].data.shape == (2, 1, 16, 8)  # heads split in 2
        cache = model.init_cache(testing.CACHE_SIZE, 4, jnp.float32)
        assert cache["layer_0"]["k"].sharding.spec == jax.P("fsdp", None, "tensor", None)

        before, after = testing.train_and_evaluate(model)
        assert after < before - 0.5, (before, after)
        testing.check_param_shardings(model)  # still after the optimizer's updates
        assert testing.check_sampler_matches_forward(model) <= 1e-5


def test_sampler_rejects_a_too_small_cache():
    model = transformer.Transformer(TransformerConfig.tiny(num_layers=1), rngs=nnx.Rngs(0))
    s = sampler.Sampler(transformer=model, vocab=sampler.TinyVocab(32), cache_size=8)
    with pytest.raises(ValueError, match="exceed cache_size"):
        s(["hello"], total_generation_steps=4)
