"""flax_linoss.mixers.registry and flax_linoss.zoo.swap: mixer names, registration, and the
attention swap helper.

Cheap (no compilation): what is registered, that get_mixer returns the right classes, that
registering guards against silent overwrites, and that swap_attention patches exactly the
documented attributes and always restores them.
"""

from __future__ import annotations

import sys
import types

import flax.linen as nn
import pytest
from flax import nnx

import flax_linoss
from flax_linoss import available_mixers, get_mixer, register_mixer, swap_attention
from flax_linoss.mixers import linen as linen_mixers
from flax_linoss.mixers import nnx as nnx_mixers

BUILTIN = ["attention", "d-linoss", "linoss-im", "linoss-im-selective", "linoss-imex"]


def test_import_is_light():
    code = "import sys, flax_linoss; print('flax.linen' in sys.modules)"
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_builtins():
    for api in ("linen", "nnx"):
        assert set(BUILTIN) <= set(available_mixers(api))
    assert get_mixer("attention") is nn.MultiHeadDotProductAttention
    assert get_mixer("attention", api="nnx") is nnx.MultiHeadAttention
    assert get_mixer("linoss-im") is linen_mixers.LinOSSMixer
    assert get_mixer("linoss-imex").discretization == "imex"
    assert get_mixer("d-linoss").discretization == "damped"
    assert get_mixer("d-linoss", api="nnx") is nnx_mixers.DLinOSSMixer
    assert get_mixer("linoss-im-selective").selective is True
    assert get_mixer("linoss-im-selective", api="nnx") is nnx_mixers.SelectiveLinOSSMixer
    assert flax_linoss.get_mixer is get_mixer


def test_the_selective_mixer_has_its_gate_in_both_apis():
    import jax

    x = jax.numpy.ones((1, 4, 8))
    m = get_mixer("linoss-im-selective", api="nnx")(2, 8, rngs=nnx.Rngs(0))
    assert m.dt_proj is not None and m.block == "outer"
    variables = get_mixer("linoss-im-selective")(num_heads=2).init(jax.random.key(0), x)
    assert "dt_proj" in variables["params"]


def test_register_and_errors():
    class Mine(linen_mixers.LinOSSMixer):
        pass

    try:
        assert register_mixer("test-mine", Mine) is Mine
        assert get_mixer("test-mine") is Mine
        assert "test-mine" not in available_mixers("nnx")
        with pytest.raises(ValueError, match="already registered"):
            register_mixer("test-mine", Mine)
        register_mixer("test-mine", linen_mixers.DLinOSSMixer, overwrite=True)
        assert get_mixer("test-mine") is linen_mixers.DLinOSSMixer

        @register_mixer("test-deco", api="nnx")
        def factory(*args, **kwargs):
            return nnx_mixers.LinOSSMixer(*args, **kwargs)

        assert get_mixer("test-deco", api="nnx") is factory
    finally:
        from flax_linoss.mixers import registry

        registry._REGISTRY.pop(("linen", "test-mine"), None)
        registry._REGISTRY.pop(("nnx", "test-deco"), None)
    with pytest.raises(KeyError, match="available"):
        get_mixer("nope")
    with pytest.raises(ValueError, match="api"):
        get_mixer("linoss-im", api="torch")
    with pytest.raises(TypeError, match="callable"):
        register_mixer("bad", 3)
    with pytest.raises(ValueError, match="non-empty"):
        register_mixer("", linen_mixers.LinOSSMixer)


class _UsesSelfAttention(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.SelfAttention(num_heads=1)(x)


def test_swap_attention_linen_patches_and_restores():
    import flax.linen.attention as attention
    import jax
    import jax.numpy as jnp

    originals = {a: getattr(nn, a) for a in ("MultiHeadDotProductAttention", "MultiHeadAttention")}
    self_attention = nn.SelfAttention
    # A user module that bound the class at import time (`from flax.linen import ...`).
    user = types.SimpleNamespace(SelfAttention=nn.SelfAttention, other=1)
    x = jnp.ones((1, 3, 4))
    with swap_attention("d-linoss", namespaces=[user]) as swap:
        assert swap.classes == (linen_mixers.DLinOSSMixer,)
        built = nn.MultiHeadDotProductAttention()
        assert type(built) is linen_mixers.DLinOSSMixer
        assert isinstance(built, attention.MultiHeadAttention)  # the patched name
        params = _UsesSelfAttention().init(jax.random.key(0), x)["params"]
        assert list(params) == ["DLinOSSMixer_0"]  # SelfAttention built the mixer
        assert issubclass(swap.built[-1], linen_mixers.DLinOSSMixer)
        assert swap.built[-1].__name__ == "DLinOSSMixer"
        assert user.SelfAttention is nn.SelfAttention
        assert user.other == 1
        with swap_attention("linoss-im"):  # nesting: the inner block wins
            assert type(nn.MultiHeadDotProductAttention()) is linen_mixers.LinOSSMixer
        assert type(nn.MultiHeadDotProductAttention()) is linen_mixers.DLinOSSMixer
    for a, orig in originals.items():
        assert getattr(nn, a) is orig and getattr(attention, a) is orig
    assert nn.SelfAttention is self_attention and user.SelfAttention is self_attention

    with pytest.raises(RuntimeError), swap_attention(linen_mixers.LinOSSMixer):
        raise RuntimeError("boom")  # the body's error, not the "nothing built" one
    assert nn.MultiHeadDotProductAttention is originals["MultiHeadDotProductAttention"]


def test_swap_attention_nnx():
    original = nnx.MultiHeadAttention
    with swap_attention("linoss-imex", api="nnx") as swap:
        layer = nnx.MultiHeadAttention(2, 8, rngs=nnx.Rngs(0))
        assert isinstance(layer, nnx.MultiHeadAttention)
    assert type(layer) is nnx_mixers.LinOSSIMEXMixer
    assert swap.built == [nnx_mixers.LinOSSIMEXMixer]
    assert nnx.MultiHeadAttention is original


def test_swap_attention_raises_when_nothing_was_built():
    with pytest.raises(ValueError, match=r"no flax\.nnx.*MultiHeadAttention was built"):
        with swap_attention("linoss-im", api="nnx"):
            pass
    assert nnx.MultiHeadAttention.__name__ == "MultiHeadAttention"
    with pytest.raises(ValueError, match="names no mixer"):
        with swap_attention("attention,attention", api="nnx"):
            pass
    with pytest.raises(ValueError, match="cannot import target"):
        with swap_attention("linoss-im", target="flax_linoss.NoSuchClass"):
            pass
    with pytest.raises(KeyError, match="No adapter 'nope'"):
        with swap_attention("linoss-im", target=nnx.MultiHeadAttention, adapter="nope"):
            pass


def test_swap_attention_self_attention_needs_a_class():
    with pytest.raises(TypeError, match="mixer class"), swap_attention(lambda **kw: None):
        pass
    assert nn.SelfAttention.__name__ == "SelfAttention"
