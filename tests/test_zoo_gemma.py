"""The one-line swap into a Gemma-protocol codebase (issue: model zoos).

On the test decoder of ``tests/gemma_style`` (written here in the protocol of flax's
``examples/gemma`` and of DeepMind's linen ``gemma``): ``swap_attention(..., target=
modules.Attention, adapter="gemma")`` around construction makes every layer (or every
pattern entry) a LinOSS mixer; the model trains; the codebase's own while-loop sampler,
threading the mixer's state as the attention cache, gives the full forward pass's logits;
the swap is undone after the block; the same under a 2-device fsdp/tensor mesh built from
the codebase's ShardingConfig; linen too; a swap whose target is never built raises.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from gemma_style import linen_modules, linen_transformer, modules, testing, transformer
from gemma_style.transformer_cfg import TransformerConfig

import flax_linoss
from flax_linoss.mixers.state import MixerState


def _layers(model):
    return [type(layer.attn).__name__ for layer in model.layers]


def test_nnx_swap_trains_and_samples_like_the_full_forward():
    original = modules.Attention
    # One name swaps every layer; a pattern is assigned in construction order.
    with flax_linoss.swap_attention("linoss-im", target=modules.Attention, adapter="gemma"):
        pure = transformer.Transformer(TransformerConfig.tiny(), rngs=nnx.Rngs(0))
    assert _layers(pure) == ["LinOSSMixer"] * 3
    pattern = "linoss-im,linoss-im,attention"
    with flax_linoss.swap_attention(pattern, target=modules.Attention, adapter="gemma") as swap:
        model = transformer.Transformer(TransformerConfig.tiny(), rngs=nnx.Rngs(0))
    assert modules.Attention is original
    assert _layers(model) == ["LinOSSMixer", "LinOSSMixer", "Attention"]
    assert len(swap.built) == 3
    cache = model.init_cache(cache_size=16, batch_size=2)
    assert isinstance(cache["layer_0"]["state"], MixerState)
    # The outer block: num_kv_heads heads of head_dim x head_dim oscillators.
    assert cache["layer_0"]["state"].z.shape == (2, 2, 8, 8)
    # Training and the codebase's sampler, with LinOSS and attention layers side by side.
    before, after = testing.train_and_evaluate(model)
    assert after < before - 0.3, (before, after)
    testing.check_sampler_matches_forward(model, rtol=1e-5)


def test_nnx_swap_under_an_fsdp_tensor_mesh():
    mesh = testing.explicit_mesh(fsdp=1, tensor=2)
    with jax.set_mesh(mesh):
        config = testing.sharded_config()
        with flax_linoss.swap_attention(
            "linoss-im,attention", target=modules.Attention, adapter="gemma"
        ):
            model = transformer.Transformer(config, rngs=nnx.Rngs(0))
        assert _layers(model) == ["LinOSSMixer", "Attention", "LinOSSMixer"]
        mixer = model.layers[0].attn
        spec = jax.typeof(mixer.in_proj.kernel[...]).sharding.spec
        q_spec = tuple(config.shd_config.q_weight_ndh)  # [heads, features, head_dim]
        assert tuple(spec) == (q_spec[1], q_spec[0])  # [features, heads * head_dim]
        for proj in (mixer.query, mixer.key, mixer.gate):  # every stream like the queries
            assert jax.typeof(proj.kernel[...]).sharding.spec == spec
        testing.check_param_shardings(model)
        before, after = testing.train_and_evaluate(model)
        assert after < before - 0.3, (before, after)
        testing.check_sampler_matches_forward(model, rtol=1e-5)


def test_linen_swap_trains_and_samples_like_the_full_forward():
    original = linen_modules.Attention
    config = TransformerConfig.tiny()
    with flax_linoss.swap_attention("d-linoss", target=linen_modules.Attention, adapter="gemma"):
        pure = testing.linen_init(linen_transformer.Transformer(config))
    assert all("in_proj" in pure["params"][f"layer_{i}"]["attn"] for i in range(3))
    pattern = "d-linoss,attention"  # D-LinOSS and attention layers side by side
    with flax_linoss.swap_attention(pattern, target=linen_modules.Attention, adapter="gemma"):
        model = linen_transformer.Transformer(config)
        params = testing.linen_init(model)
        layer_params = params["params"]["layer_0"]["attn"]
        assert "in_proj" in layer_params and "heads" in layer_params  # no extra nesting
        assert "g_raw" in layer_params["heads"]  # damped
        assert "in_proj" not in params["params"]["layer_1"]["attn"]
        before, after, params = testing.linen_train_and_evaluate(model, params, steps=8)
        assert after < before - 0.3, (before, after)
        testing.check_linen_sampler_matches_forward(model, params, rtol=1e-5)
        # DeepMind gemma's class-method form of init_cache gives the same state.
        cache = linen_modules.Attention.init_cache(16, config.num_kv_heads, config.head_dim, 2)
        kv, dim = config.num_kv_heads, config.head_dim
        assert cache["state"].z.shape == (2, kv, dim, dim)
    assert linen_modules.Attention is original


def test_a_swap_whose_target_is_never_built_raises():
    with pytest.raises(ValueError, match=r"no gemma_style\.modules\.Attention was built"):
        with flax_linoss.swap_attention("linoss-im", target=modules.Attention, adapter="gemma"):
            pass
    with pytest.raises(ValueError, match="namespaces"):
        with flax_linoss.swap_attention(
            "linoss-im", target="gemma_style.modules.Attention", adapter="gemma"
        ):
            transformer.Transformer  # looked up, never built


def test_options_and_a_users_adapter():
    """``options`` reach every mixer; an adapter of a few lines serves another protocol
    (an attention called as ``attn(x, mask, cache) -> (out, cache)``)."""

    class Attn(nnx.Module):  # the other codebase's attention
        def __init__(self, dim, heads, *, rngs):
            self.proj = nnx.Linear(dim, dim, rngs=rngs)

        def __call__(self, x, mask, cache):
            return self.proj(x), cache

    class Mine(flax_linoss.NnxAdapter):
        def __init__(self, dim, heads, *, rngs):
            self.init_mixer(num_heads=heads, in_features=dim, rngs=rngs)

        def __call__(self, x, mask, cache):
            if cache is None:
                return self.mix(x, mask=mask), None
            return self.mix(x, mask=mask, state=cache)

        def init_cache(self, batch_size):
            return self.init_state((batch_size,))

    namespace = type("Codebase", (), {"Attn": Attn})
    options = {"block": "plain", "state_size": 3}
    with flax_linoss.swap_attention(
        "d-linoss", target=Attn, adapter=Mine, namespaces=[namespace], options=options
    ):
        layer = namespace.Attn(4, 2, rngs=nnx.Rngs(0))
    assert namespace.Attn is Attn
    x = jax.random.normal(jax.random.key(0), (2, 5, 4))
    full, _ = layer(x, None, None)
    y1, cache = layer(x[:, :2], None, layer.init_cache(2))
    y2, cache = layer(x[:, 2:], None, cache)
    assert cache.z.shape == (2, 2, 3)
    assert jnp.allclose(jnp.concatenate([y1, y2], 1), full, atol=1e-5)
