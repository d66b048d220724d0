"""The functional decoding state of the mixers (``init_state`` / ``state=``), nnx and linen.

Proves: decoding with the state (a prompt in one call, then one step per call) equals the
full forward pass; the state is a valid ``lax.scan`` / ``lax.while_loop`` carry from the
first step on (same shapes, dtypes and, under an explicit mesh, shardings), with bfloat16
activations and a float32 state; masked steps leave it unchanged; cache-sized attention
masks (Gemma's) decode padding and packing as the full pass does; the ``decode=True`` cache
style is the same computation.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_linoss.mixers import linen as linen_mixers
from flax_linoss.mixers import masks
from flax_linoss.mixers.nnx import DLinOSSMixer, LinOSSMixer
from flax_linoss.mixers.state import MixerState

B, L, E = 2, 7, 6


def _x(dtype=jnp.float32, length=L, seed=0):
    return jax.random.normal(jax.random.key(seed), (B, length, E), dtype)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def _same_type(a, b):
    return jax.tree.map(lambda u, v: (u.shape, u.dtype) == (v.shape, v.dtype), a, b)


@pytest.mark.parametrize("block", ["outer", "plain"])
@pytest.mark.parametrize("cls", [LinOSSMixer, DLinOSSMixer])
def test_state_decoding_equals_the_full_pass(cls, block):
    mixer = cls(2, E, state_size=5, block=block, rngs=nnx.Rngs(0))
    x = _x()
    full = mixer(x)
    state = mixer.init_state((B,))
    if block == "plain":
        assert state.z.shape == (B, 2, 5) and state.conv is None
    else:  # two heads of 3 x 3 oscillators, and the last 3 inputs of q, k, v
        assert state.z.shape == (B, 2, 3, 3) and state.conv.shape == (B, 3, 3, E)
    assert state.z.dtype == jnp.float32 and state.index.shape == (B,)
    first, state = mixer(x[:, :3], state=state)  # a prompt in one call
    outs = [first]
    for t in range(3, L):
        y, new = mixer(x[:, t : t + 1], state=state)
        assert all(jax.tree.leaves(_same_type(new, state)))
        outs.append(y)
        state = new
    assert _rel(jnp.concatenate(outs, 1), full) < 1e-5
    np.testing.assert_array_equal(state.index, [L, L])
    np.testing.assert_array_equal(state.last, [L - 1, L - 1])


def test_state_is_a_scan_and_while_loop_carry_with_bfloat16_activations():
    mixer = LinOSSMixer(in_features=E, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = _x(jnp.bfloat16)
    graphdef, params = nnx.split(mixer)

    def step(state, x_t):
        y, state = nnx.merge(graphdef, params)(x_t[:, None], state=state)
        return state, y[:, 0]

    state0 = mixer.init_state((B,))
    final, ys = jax.jit(lambda s: jax.lax.scan(step, s, jnp.swapaxes(x, 0, 1)))(state0)
    assert final.z.dtype == jnp.float32 and ys.dtype == jnp.bfloat16
    full = mixer(x)
    assert _rel(jnp.swapaxes(ys, 0, 1), full) < 2e-2  # bfloat16 projections

    def body(carry):
        i, state = carry
        x_t = jax.lax.dynamic_slice_in_dim(x, i, 1, axis=1)
        return i + 1, nnx.merge(graphdef, params)(x_t, state=state)[1]

    i, looped = jax.jit(lambda s: jax.lax.while_loop(lambda c: c[0] < L, body, (0, s)))(state0)
    assert int(i) == L
    np.testing.assert_allclose(looped.z, final.z, rtol=1e-6, atol=1e-6)


def test_masked_steps_leave_the_state_unchanged():
    mixer = LinOSSMixer(in_features=E, rngs=nnx.Rngs(0))
    x = _x()
    _, state = mixer(x[:, :3], state=mixer.init_state((B,)))
    _, held = mixer(x[:, 3:5], state=state, mask=jnp.zeros((B, 2), bool))
    np.testing.assert_array_equal(held.z, state.z)
    np.testing.assert_array_equal(held.y, state.y)
    np.testing.assert_array_equal(held.last, state.last)
    np.testing.assert_array_equal(held.index, state.index + 2)
    # ... and one row masked, the other not.
    _, mixed = mixer(x[:, 3:4], state=state, mask=jnp.array([[True], [False]]))
    np.testing.assert_array_equal(mixed.z[1], state.z[1])
    assert not np.allclose(mixed.z[0], state.z[0])


def _gemma_style_mask(valid, segments):
    """``[B, L, L]``: causal, padding, and same-segment (no heads axis)."""
    causal = jnp.tril(jnp.ones((valid.shape[1],) * 2, bool))
    same = segments[:, :, None] == segments[:, None, :]
    return causal & valid[:, None, :] & valid[:, :, None] & same


def test_cache_sized_masks_decode_padding_and_packing_like_the_full_pass():
    """Gemma's protocol: the full pass gets ``[B, L, L]``; decoding gets ``[B, 1, K]`` rows
    of a cache of ``K`` slots at ``write_index`` (``K > L``); packed sequences restart."""
    mixer = LinOSSMixer(in_features=E, rngs=nnx.Rngs(0))
    x = _x()
    valid = jnp.array([[1, 1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]], bool)
    segments = jnp.array([[1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 1, 1]])
    mask = _gemma_style_mask(valid, segments)
    full = mixer(x, mask=mask)
    k = 11
    state = mixer.init_state((B,))
    outs = []
    for t in range(L):
        row = jnp.zeros((B, 1, k), bool).at[:, 0, : t + 1].set(mask[:, t, : t + 1])
        y, state = mixer(x[:, t : t + 1], mask=row, state=state)
        outs.append(y)
    dec = jnp.concatenate(outs, 1)
    keep = np.asarray(valid)
    assert _rel(np.asarray(dec)[keep], np.asarray(full)[keep]) < 1e-5
    # The second segment of row 0 equals running it alone.
    alone = mixer(x[:1, 4:])
    assert _rel(dec[0, 4:], alone[0]) < 1e-5


def test_segment_ids_restart_across_calls():
    mixer = LinOSSMixer(in_features=E, rngs=nnx.Rngs(0))
    x = _x()
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 2]] * B)
    full = mixer(x, segment_ids=seg)
    y1, state = mixer(x[:, :3], segment_ids=seg[:, :3], state=mixer.init_state((B,)))
    y2, _ = mixer(x[:, 3:], segment_ids=seg[:, 3:], state=state)
    assert _rel(jnp.concatenate([y1, y2], 1), full) < 1e-5
    assert _rel(y2, mixer(x[:, 3:])) < 1e-5


def test_read_mask_with_a_write_index():
    """Step ``i`` is read at column ``(write_index + i) % K``; the carried ``last`` links
    a new step to the previous call's."""
    attn = jnp.zeros((1, 2, 5), bool)
    attn = attn.at[0, 0, [1, 3]].set(True)  # step 0 at column 3 continues column 1
    attn = attn.at[0, 1, [4]].set(True)  # step 1 at column 4 starts anew (not linked to 3)
    steps = masks.read_mask(attn, (1, 2), write_index=jnp.array([3]), last=jnp.array([1]))
    np.testing.assert_array_equal(steps.valid, [[True, True]])
    np.testing.assert_array_equal(steps.restart, [False])
    np.testing.assert_array_equal(steps.segment_ids, [[0, 1]])
    np.testing.assert_array_equal(steps.last, [4])
    steps = masks.read_mask(attn[:, :1], (1, 1), write_index=jnp.array([3]), last=jnp.array([2]))
    np.testing.assert_array_equal(steps.restart, [True])  # column 2 is not allowed
    with pytest.raises(ValueError, match="cache-sized mask needs a decoding state"):
        masks.read_mask(attn, (1, 2))


def test_cache_style_is_the_same_computation():
    mixer = LinOSSMixer(in_features=E, rngs=nnx.Rngs(0))
    x = _x()
    mixer.init_cache(x.shape)
    y_cache = jnp.concatenate([mixer(x[:, :4], decode=True), mixer(x[:, 4:], decode=True)], 1)
    state = mixer.init_state((B,))
    y1, state = mixer(x[:, :4], state=state)
    y2, state = mixer(x[:, 4:], state=state)
    np.testing.assert_array_equal(y_cache, jnp.concatenate([y1, y2], 1))
    np.testing.assert_array_equal(mixer.state_z[...], state.z)
    assert int(mixer.cache_index[...]) == L


@pytest.mark.parametrize("block", ["outer", "plain"])
def test_linen_functional_state(block):
    kw = {"state_size": 4} if block == "plain" else {"num_heads": 2, "qkv_features": 4}
    mixer = linen_mixers.LinOSSMixer(block=block, **kw)
    x = _x()
    variables = mixer.init(jax.random.key(0), x)
    full = mixer.apply(variables, x)
    state = mixer.init_state((B,))  # unbound: state_size (plain) or qkv_features is set
    want = (B, 2, 4) if block == "plain" else (B, 2, 2, 2)
    assert isinstance(state, MixerState) and state.z.shape == want
    y1, state = mixer.apply(variables, x[:, :2], state=state)
    y2, state = mixer.apply(variables, x[:, 2:], state=state)
    assert _rel(jnp.concatenate([y1, y2], 1), full) < 1e-5
    bare = linen_mixers.LinOSSMixer(block=block)
    with pytest.raises(ValueError, match="bound module"):
        bare.init_state((B,))
    variables = bare.init(jax.random.key(0), x)
    want = (3, 2, E) if block == "plain" else (3, 1, E, E)
    assert bare.bind(variables).init_state(3).z.shape == want


@pytest.mark.parametrize("block", ["outer", "plain"])
def test_state_keeps_its_sharding_under_an_explicit_mesh(block):
    mesh = jax.make_mesh(
        (2, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2
    )
    P = jax.sharding.PartitionSpec
    with jax.set_mesh(mesh):
        mixer = LinOSSMixer(
            2,
            E,
            qkv_features=8,
            kernel_metadata={"out_sharding": (None, "model")},
            block=block,
            rngs=nnx.Rngs(0),
        )
        x = jax.device_put(_x(), P("data"))
        state = mixer.init_state((B,), out_sharding=P("data"))
        rows = P("data", *([None] * (state.z.ndim - 1)))
        assert jax.typeof(state.z).sharding.spec == rows
        graphdef, params = nnx.split(mixer)

        def body(carry):
            i, state = carry
            x_t = jax.lax.dynamic_slice_in_dim(x, i, 1, axis=1)
            return i + 1, nnx.merge(graphdef, params)(x_t, state=state)[1]

        _, final = jax.jit(lambda s: jax.lax.while_loop(lambda c: c[0] < L, body, (0, s)))(state)
        assert jax.typeof(final.z).sharding.spec == rows
        if block == "outer":
            assert jax.typeof(final.conv).sharding.spec == P("data", None, None, None)
        assert jax.typeof(final.index).sharding.spec == P("data")
        # Without qkv_sharding: the inner activations follow the kernel's H axis.
        y = mixer(x)
        assert jax.typeof(y).sharding.spec == jax.typeof(x).sharding.spec


def test_linen_mixer_fields_come_from_the_nnx_signature():
    import dataclasses
    import inspect

    fields = [f.name for f in dataclasses.fields(linen_mixers.LinOSSMixer)]
    attention = [f.name for f in dataclasses.fields(nn.MultiHeadDotProductAttention)]
    assert fields[: len(attention) - 2] == attention[:-2]  # attention's order (less parent, name)
    nnx_params = inspect.signature(LinOSSMixer.__init__).parameters
    for name in ("state_size", "scan", "constraint", "dropout_rate", "qkv_features"):
        assert linen_mixers.LinOSSMixer.__dataclass_fields__[name].default == (
            nnx_params[name].default
        )
