"""Mixers under meshes: an nnx model trained under an explicit-axes mesh with the tutorials'
attention metadata and with logical axis rules; the linen mixer under logical axis rules.
(2 of the 8 fake CPU devices.)"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from flax_linoss import get_mixer
from flax_linoss.mixers import base

MIXERS = ["attention", "d-linoss", "d-linoss:plain"]
# nnx.MultiHeadAttention's kernel is [E, heads, head_dim]; the tutorials shard the heads.
TUTORIAL = {
    "kernel_metadata": {"out_sharding": (None, "model", None)},
    "out_kernel_metadata": {"out_sharding": ("model", None, None)},
}
RULES = (("embed", None), ("kv", "model"), ("oscillator", None))


def _mesh():
    return jax.make_mesh((1, 2), ("batch", "model"), devices=jax.devices()[:2])


class _Net(nnx.Module):
    """A tutorial-style model: input projection, two pre-norm mixer blocks, a head."""

    def __init__(self, mixer, metadata, rngs):
        self.embed = nnx.Linear(16, 16, rngs=rngs)
        mixer, _, block = mixer.partition(":")  # "name:block" picks a LinOSS block
        cls = get_mixer(mixer, api="nnx")
        kw = {**metadata, **({"block": block} if block else {})}
        self.mixers = nnx.List([cls(4, 16, decode=False, rngs=rngs, **kw) for _ in range(2)])
        self.norms = nnx.List([nnx.LayerNorm(16, rngs=rngs) for _ in range(2)])
        self.head = nnx.Linear(16, 16, rngs=rngs)
        mesh = jax.sharding.get_abstract_mesh()
        self.explicit = not mesh.empty and jax.sharding.AxisType.Explicit in mesh.axis_types

    def __call__(self, tokens):
        x = self.embed(jax.nn.one_hot(tokens, 16))
        # As for attention under an explicit mesh: say how the output projection's result is
        # sharded (it contracts over the sharded heads / inner width).
        out = P("batch", None, None) if self.explicit else None
        for norm, mix in zip(self.norms, self.mixers, strict=True):
            x = x + mix(norm(x), mask=nnx.make_causal_mask(tokens), out_sharding=out)
        return self.head(x)


def _train(model, tokens, steps=3, **call_kwargs):
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, tokens):
        def loss_fn(m):
            logits = m(tokens, **call_kwargs)
            return optax.softmax_cross_entropy_with_integer_labels(
                logits[:, :-1], tokens[:, 1:]
            ).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    return [float(step(model, opt, tokens)) for _ in range(steps)]


def _tokens():
    return jnp.asarray(np.arange(2 * 12).reshape(2, 12) % 7 + 1, jnp.int32)


@pytest.mark.parametrize("mixer", MIXERS)
def test_nnx_trains_under_explicit_mesh_with_tutorial_metadata(mixer):
    mesh = _mesh()
    assert all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
    with jax.set_mesh(mesh):
        model = _Net(mixer, TUTORIAL, nnx.Rngs(0))
        tokens = jax.device_put(_tokens(), P("batch"))
        losses = _train(model, tokens)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    if mixer != "attention":
        m = model.mixers[0]
        # Our parameters follow the metadata meant for attention's shapes ...
        assert tuple(m.in_proj.kernel.get_metadata("out_sharding")) == (None, "model")
        assert tuple(m.out_proj.kernel.get_metadata("out_sharding")) == ("model", None)
        if m.block == "plain":
            assert tuple(m.linoss.b.get_metadata("out_sharding")) == (None, "model", None)
            assert tuple(m.linoss.b[...].sharding.spec) == (None, "model", None)
            osc, name = m.linoss.a_raw, "a_raw"
        else:  # every input projection like attention's (E, H) kernel
            for proj in (m.query, m.key, m.gate):
                assert tuple(proj.kernel.get_metadata("out_sharding")) == (None, "model")
                assert tuple(proj.kernel[...].sharding.spec) == (None, "model")
            osc, name = m.heads.a_raw, "heads/a_raw"
        # ... and never logical names as mesh axes.
        assert osc.get_metadata("out_sharding", None) is None
        assert osc.get_metadata("logical_axes") == base.PARAM_AXES[name]


# The outer block (D-LinOSS's trains under the mesh with metadata above) and the plain one.
@pytest.mark.parametrize("mixer", ["linoss-im", "linoss-im:plain"])
def test_nnx_without_metadata_under_explicit_mesh_is_replicated(mixer):
    with jax.set_mesh(_mesh()):
        model = _Net(mixer, {}, nnx.Rngs(0))
        losses = _train(model, jax.device_put(_tokens(), P("batch")))
    assert losses[-1] < losses[0]
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        assert var.get_metadata("out_sharding", None) is None


@pytest.mark.parametrize("block", ["outer", "plain"])
def test_nnx_with_logical_axis_rules(block):
    mesh = jax.make_mesh(
        (1, 2),
        ("batch", "model"),
        axis_types=(jax.sharding.AxisType.Auto,) * 2,
        devices=jax.devices()[:2],
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        model = _Net(f"d-linoss:{block}", {}, nnx.Rngs(0))
        specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
        losses = _train(model, _tokens())
    spec = lambda v: tuple(v.get_value() if isinstance(v, nnx.Variable) else v)
    mixer = specs["mixers"][0]
    if block == "plain":
        assert spec(mixer["linoss"]["b"]) == (None, "model", None)
    else:  # "kv" -> model: the inner width of every stream; the heads' oscillators whole
        assert spec(mixer["conv_kernel"]) == (None, None, "model")
        assert spec(mixer["key"]["kernel"]) == (None, "model")
        assert spec(mixer["heads"]["a_raw"]) == (None, None)
    assert spec(mixer["in_proj"]["kernel"]) == (None, "model")
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("mixer", ["d-linoss,attention"])
def test_library_transformer_trains_under_an_explicit_mesh(mixer):
    from flax_linoss.models import TransformerLM

    mesh = jax.make_mesh((2, 1), ("batch", "model"), devices=jax.devices()[:2])
    with jax.set_mesh(mesh):
        model = TransformerLM(
            16, 2, 16, mixer=mixer, mixer_options={"state_size": 8}, rngs=nnx.Rngs(0)
        )
        tokens = jax.device_put(_tokens(), P("batch"))
        losses = _train(model, tokens, deterministic=True)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("block", ["outer", "plain"])
def test_linen_mixer_under_logical_axis_rules(block):
    mixer = get_mixer("d-linoss")(num_heads=2, qkv_features=16, block=block)
    x = jnp.ones((2, 8, 16))
    mesh = jax.make_mesh(
        (1, 2),
        ("batch", "model"),
        axis_types=(jax.sharding.AxisType.Auto,) * 2,
        devices=jax.devices()[:2],
    )
    with nn.logical_axis_rules(RULES):
        abstract = jax.eval_shape(mixer.init, jax.random.key(0), x)
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, RULES)
        init = jax.jit(mixer.init, out_shardings=shardings)
        variables = init(jax.random.key(0), x)
    path = ("linoss", "b") if block == "plain" else ("conv_kernel",)
    leaf = lambda tree: functools.reduce(lambda t, k: t[k], path, nn.unbox(tree)["params"])
    want = (None, "model", None) if block == "plain" else (None, None, "model")
    assert tuple(leaf(variables).sharding.spec) == want

    def loss(p):
        return jnp.mean(mixer.apply(p, x) ** 2)

    grads = jax.jit(jax.grad(loss))(variables)
    assert np.isfinite(np.asarray(leaf(grads))).all() and np.abs(leaf(grads)).max() > 0


def test_selective_outer_block_with_timestamps_under_an_explicit_mesh_equals_no_mesh():
    """The selective gate and the timestamps' gaps (per-step sizes) reach the outer block's
    per-shard core under an explicit mesh: the same output as without a mesh."""
    from flax_linoss.mixers.nnx import LinOSSMixer

    x = jax.random.normal(jax.random.key(0), (2, 10, 16))
    times = jnp.cumsum(jax.random.uniform(jax.random.key(1), (2, 10), minval=0.2), axis=1)
    mixer = LinOSSMixer(4, 16, selective=True, rngs=nnx.Rngs(0))
    mixer.dt_proj.kernel[...] = 0.3 * jax.random.normal(jax.random.key(2), (16, 16))
    call = nnx.jit(lambda m, x, times: m(x, timestamps=times))
    want = call(mixer, x, times)
    graphdef, params = nnx.split(mixer)
    mesh = jax.make_mesh((2, 1), ("batch", "model"), devices=jax.devices()[:2])
    with jax.set_mesh(mesh):
        sharded = nnx.merge(graphdef, jax.device_put(params))
        got = call(sharded, jax.device_put(x, P("batch")), jax.device_put(times, P("batch")))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    ("explicit", "heads"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_outer_block_splits_the_length_and_heads_under_the_rules(explicit, heads, monkeypatch):
    """Rules mapping ``"length"`` to a mesh axis split the outer block's sequence: its
    convolution, timestamps' gaps and recurrence run per shard (``sequence_axis``) and give
    the unsplit output, with padding, packing, the selective gate and timestamps (shards of
    3 steps, fewer than the convolution's history where padded). Rules mapping ``"heads"``
    split its heads as well: each device runs its own heads (2 of 4)."""
    from flax_linoss import ops
    from flax_linoss.mixers.nnx import LinOSSMixer

    seen = []
    real = ops.outer_apply

    def spy(q, *a, **k):
        seen.append((k.get("sequence_axis"), q.shape[-2]))
        return real(q, *a, **k)

    monkeypatch.setattr(ops, "outer_apply", spy)
    x = jax.random.normal(jax.random.key(0), (2, 12, 16))
    times = jnp.cumsum(jax.random.uniform(jax.random.key(1), (2, 12), minval=0.2), axis=1)
    valid = np.ones((2, 12), bool)
    valid[0, 2:7] = False  # across a boundary, a whole shard
    ids = np.zeros((2, 12), np.int32)
    ids[1, 6:] = 1  # a segment starting at a boundary
    ids[1, 10:] = 2  # and inside a shard
    mixer = LinOSSMixer(4, 16, selective=True, rngs=nnx.Rngs(0))
    mixer.dt_proj.kernel[...] = 0.3 * jax.random.normal(jax.random.key(2), (16, 16))
    kw = dict(timestamps=times, mask=jnp.asarray(valid), segment_ids=jnp.asarray(ids))
    want = mixer(x, **kw)
    kind = jax.sharding.AxisType.Explicit if explicit else jax.sharding.AxisType.Auto
    rules = (("batch", "data"), ("length", "seq"))
    if heads:
        mesh = jax.make_mesh((2, 2, 2), ("data", "seq", "model"), axis_types=(kind,) * 3)
        rules += (("heads", "model"), ("kv", "model"))
    else:
        mesh = jax.make_mesh((2, 4), ("data", "seq"), axis_types=(kind, kind))
    seen.clear()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        graphdef, params = nnx.split(mixer)
        sharded = nnx.merge(graphdef, jax.device_put(params, P()))
        put = lambda a: jax.device_put(a, P("data", "seq", *([None] * (np.ndim(a) - 2))))
        got = jax.jit(lambda x, kw: sharded(x, **kw))(put(x), {k: put(v) for k, v in kw.items()})
    # (the first, unsplit trace is the per-shard runner's eval_shape)
    assert {c for c in seen if c[0] is not None} == {("seq", 2 if heads else 4)}
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
