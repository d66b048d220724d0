"""The mixers' outer-product block (block="outer", the default): against a float64
step-by-step reference of the whole block, decoding (functional state and nnx.Cache),
padding, packing, bfloat16, linen/nnx parity, the plain block one option away, and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from oscillator_reference import assert_rel_close, rel_err

from flax_linoss import ops
from flax_linoss.mixers import base
from flax_linoss.mixers import linen as linen_mixers
from flax_linoss.mixers.nnx import DLinOSSMixer, LinOSSIMEXMixer, LinOSSMixer
from flax_linoss.ops._scans import native

CLASSES = {"im": LinOSSMixer, "imex": LinOSSIMEXMixer, "damped": DLinOSSMixer}


def _mixer(disc="im", width=16, heads=4, **kw):
    return CLASSES[disc](heads, width, rngs=nnx.Rngs(0), **kw)


def _x(batch=2, length=11, width=16, seed=1):
    return jax.random.normal(jax.random.key(seed), (batch, length, width))


def _reference(m, x, valid=None, times=None):
    """The block step by step in float64: projections, the causal convolution over the last
    valid steps, one outer_step per step (velocity readout) with this step's ``dt`` (times
    the selective gate ``softplus(x W + b)`` and the gap to the previous valid timestamp,
    clamped into the stable range), the per-head RMS norm, the SiLU gate and the output
    projection."""
    params = jax.tree.map(lambda p: np.asarray(p, np.float64), nnx.state(m, nnx.Param))
    x = np.asarray(x, np.float64)
    batch, length, _ = x.shape
    valid = np.ones((batch, length), bool) if valid is None else valid
    lin = lambda name, t: t @ params[name]["kernel"] + params[name]["bias"]
    q, k, v = (lin(n, x) for n in ("query", "key", "in_proj"))
    w, b = params["conv_kernel"], params["conv_bias"]  # [W, 3, H], [3, H]
    width = w.shape[0]
    heads, dim = params["heads"]["a_raw"].shape
    with jax.enable_x64(True):
        raw = params["heads"]
        a, dt, g = ops.constrain(
            m.heads.discretization,
            jnp.asarray(raw["a_raw"]),
            jnp.asarray(raw["dt_raw"]),
            None if "g_raw" not in raw else jnp.asarray(raw["g_raw"]),
            constraint=m.heads.constraint,
        )
        readout = jnp.broadcast_to(jnp.asarray([1.0, 0.0]), (heads, dim, 2))
        out = np.zeros((batch, length, q.shape[-1]))
        gate = np.ones((batch, length, heads * dim))
        if "dt_proj" in params:
            gate = np.asarray(jax.nn.softplus(jnp.asarray(lin("dt_proj", x))))
        for n in range(batch):
            history = []  # the valid steps' (q, k, v), newest last
            before = None  # the last valid step's time
            state = ops.OuterState(*(jnp.zeros((heads, dim, dim)),) * 2)
            for t in range(length):
                cur = np.stack([q[n, t], k[n, t], v[n, t]])  # [3, H]
                past = history[-(width - 1) :] if width > 1 else []
                conv = w[-1] * cur + b
                for j, p in enumerate(reversed(past), start=1):
                    conv = conv + w[-1 - j] * p
                if valid[n, t]:
                    history.append(cur)
                qh, kh, vh = (c.reshape(heads, dim) for c in conv)
                gap = 1.0
                if times is not None and valid[n, t]:
                    gap = 1.0 if before is None else float(times[n, t] - before)
                    before = times[n, t]
                steps = dt * jnp.asarray(gate[n, t].reshape(heads, dim) * gap)
                steps = ops.clamp_steps(m.heads.discretization, a, steps, g)
                state, o = ops.outer_step(
                    state,
                    jnp.asarray(qh),
                    jnp.asarray(kh / np.sqrt(dim)),
                    jnp.asarray(vh),
                    a,
                    steps,
                    g=g,
                    discretization=m.heads.discretization,
                    readout=readout,
                    mask=jnp.asarray(valid[n, t]),
                )
                o = np.asarray(o)
                o = o / np.sqrt(np.mean(o * o, -1, keepdims=True) + 1e-6) * raw["scale"]
                out[n, t] = o.reshape(-1)
    y = out * jax.nn.silu(lin("gate", x))
    return np.asarray(y) @ params["out_proj"]["kernel"] + params["out_proj"]["bias"]


# The block's memory and convolution through the pure-JAX forms (what "auto" runs under
# these tests' 8 devices) and through the fused CPU kernels.
NATIVE = pytest.param(
    "native",
    marks=pytest.mark.skipif(not native.available(), reason="native kernels unavailable"),
)


@pytest.mark.parametrize("scan", ["auto", NATIVE])
@pytest.mark.parametrize("disc", ["im", "imex", "damped"])
def test_block_equals_a_float64_step_by_step_reference(disc, scan):
    m = _mixer(disc, scan=scan)
    x = _x()
    valid = np.ones((2, 11), bool)
    valid[1, 3:6] = False  # padded steps inside the sequence
    assert_rel_close(m(x), _reference(m, x), 2e-5, "no mask")
    got = m(x, mask=valid)
    want = _reference(m, x, valid)
    assert_rel_close(got[valid], want[valid], 2e-5, "masked")


@pytest.mark.parametrize("disc", ["im", "imex", "damped"])
def test_selective_block_with_timestamps_equals_the_float64_reference(disc):
    """``selective=True`` (a per-key-dim gate on ``dt`` from the input) and ``timestamps``
    (``dt`` times the gap to the previous valid observation) on the outer block: per-step
    sizes through the same memory, against the step-by-step reference."""
    m = _mixer(disc, selective=True)
    # A gate that is not 1 everywhere (it starts at exactly 1).
    m.dt_proj.kernel[...] = 0.5 * jax.random.normal(jax.random.key(3), m.dt_proj.kernel.shape)
    x = _x()
    valid = np.ones((2, 11), bool)
    valid[1, 3:6] = False
    times = np.cumsum(np.random.default_rng(0).uniform(0.2, 3.0, (2, 11)), 1)
    assert_rel_close(m(x), _reference(m, x), 2e-5, "selective")
    got = m(x, mask=valid, timestamps=times)
    want = _reference(m, x, valid, times)
    assert_rel_close(got[valid], want[valid], 2e-5, "selective, timestamps, mask")
    # Decoding with timestamps in pieces continues the whole sequence.
    state, pieces = m.init_state((2,), timestamps=True), []
    for lo, hi in ((0, 4), (4, 5), (5, 11)):
        y, state = m(x[:, lo:hi], mask=valid[:, lo:hi], timestamps=times[:, lo:hi], state=state)
        pieces.append(y)
    assert_rel_close(jnp.concatenate(pieces, 1)[valid], want[valid], 2e-5, "decoding")
    # Without the gate: timestamps alone.
    plain_gate = _mixer(disc)
    want = _reference(plain_gate, x, None, times)
    assert_rel_close(plain_gate(x, timestamps=times), want, 2e-5, "timestamps")
    with pytest.raises(ValueError, match="selective_rank"):
        _mixer(disc, selective=True, selective_rank=2)


@pytest.mark.parametrize("disc", ["im", "damped"])
def test_decoding_any_number_of_steps_per_call_equals_the_full_sequence(disc):
    m = _mixer(disc, chunk=4)
    x = _x(length=13)
    full = m(x)
    state = m.init_state((2,))
    pieces = []
    for lo, hi in ((0, 5), (5, 6), (6, 13)):
        y, new = m(x[:, lo:hi], state=state)
        # A valid loop carry: the same structure, shapes and dtypes as before the call.
        assert jax.tree.map(lambda a: (a.shape, a.dtype), new) == jax.tree.map(
            lambda a: (a.shape, a.dtype), state
        )
        pieces.append(y)
        state = new
    assert_rel_close(jnp.concatenate(pieces, 1), full, 2e-5)
    assert state.z.shape == (2, 4, 4, 4) and state.conv.shape == (2, 3, 3, 16)

    # The Flax attention style (nnx.Cache variables) gives the same.
    m.init_cache((2, 13, 16))
    steps = [m(x[:, t : t + 1], decode=True) for t in range(13)]
    assert_rel_close(jnp.concatenate(steps, 1), full, 2e-5)


def test_decoding_under_scan_keeps_one_carry_type_and_masked_steps_hold():
    m = _mixer()
    x = _x(length=8)
    graphdef, params = nnx.split(m)

    def run(state, xs):
        def body(state, inp):
            x_t, valid_t = inp
            mixer = nnx.merge(graphdef, params)
            y, state = mixer(x_t[:, None], state=state, mask=valid_t[:, None])
            return state, y[:, 0]

        return jax.lax.scan(body, state, xs)

    valid = np.ones((8, 2), bool)
    valid[2:4, 0] = False
    final, ys = jax.jit(run)(m.init_state((2,)), (jnp.swapaxes(x, 0, 1), jnp.asarray(valid)))
    full = m(x, mask=valid.T)
    keep = valid.T
    assert_rel_close(jnp.swapaxes(ys, 0, 1)[keep], full[keep], 2e-5)
    # Held steps change nothing: row 0 without its two masked steps ends in the same state.
    short = jnp.concatenate([x[:1, :2], x[:1, 4:]], 1)
    _, alone = m(short, state=m.init_state((1,)))
    assert_rel_close(final.z[:1], alone.z, 2e-5)
    assert_rel_close(final.conv[:1], alone.conv, 2e-5)


def test_padding_and_packing_never_leak_between_sequences():
    m = _mixer()
    a, b = _x(1, 5, seed=2), _x(1, 6, seed=3)
    packed = jnp.concatenate([a, b], 1)
    seg = jnp.asarray([[0] * 5 + [1] * 6])
    got = m(packed, segment_ids=seg)
    assert_rel_close(got[:, :5], m(a), 2e-5, "first")
    assert_rel_close(got[:, 5:], m(b), 2e-5, "second: the convolution restarts too")
    # Right padding with garbage: the valid steps are those of the short sequence.
    padded = jnp.concatenate([a, 100 * _x(1, 4, seed=4)], 1)
    mask = jnp.asarray([[True] * 5 + [False] * 4])
    assert_rel_close(m(padded, mask=mask)[:, :5], m(a), 2e-5, "padded")


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
def test_scan_picks_the_paths_and_the_pure_jax_ones_differentiate_forward():
    assert base.outer_paths("auto") == base.outer_paths("pallas") == ("auto", "auto")
    assert base.outer_paths("native") == ("native", "native")
    assert base.outer_paths("adjoint") == base.outer_paths("chunked") == ("chunked", "jax")
    x = _x()
    rng = np.random.default_rng(3)
    w, tangent = rng.normal(size=(2, *x.shape)).astype(np.float32)
    valid = np.ones(x.shape[:2], bool)
    valid[0, 4:7] = False
    score = lambda m: lambda x: jnp.sum(w * m(x, mask=valid))
    # The kernels have a reverse-mode rule only; the pure-JAX forms also a forward one.
    grad = jax.grad(score(_mixer(scan="native")))(x)
    _, forward = jax.jvp(score(_mixer(scan="chunked")), (x,), (tangent,))
    assert abs(float(forward) - float(jnp.sum(grad * tangent))) < 1e-4 * abs(float(forward))
    with pytest.raises(TypeError, match="forward-mode"):  # the kernels did run
        jax.jvp(score(_mixer(scan="native")), (x,), (tangent,))


def test_bfloat16_activations_keep_a_float32_state():
    m = _mixer(dtype=jnp.bfloat16)
    x = _x(length=6).astype(jnp.bfloat16)
    y, state = m(x, state=m.init_state((2,)))
    assert y.dtype == jnp.bfloat16
    assert state.z.dtype == jnp.float32 and state.y.dtype == jnp.float32
    ref = _mixer()(x.astype(jnp.float32))
    assert_rel_close(y.astype(jnp.float32), ref, 5e-2)


def test_linen_and_nnx_share_parameters_and_outputs():
    x = _x()
    lm = linen_mixers.LinOSSMixer(num_heads=4, qkv_features=16)
    variables = lm.init(jax.random.key(0), x)
    nm = _mixer()
    names = lambda tree: sorted(
        "/".join(str(getattr(k, "key", k)) for k in path)
        for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
    )
    params = nnx.state(nm, nnx.Param)
    assert names(nnx.to_pure_dict(params)) == names(nn_unbox(variables["params"]))
    nnx.replace_by_pure_dict(params, nn_unbox(variables["params"]))
    nnx.update(nm, params)
    assert_rel_close(nm(x), lm.apply(variables, x), 1e-6)
    state = lm.init_state((2,))
    y, _ = lm.apply(variables, x[:, :4], state=state)
    assert_rel_close(y, nm(x)[:, :4], 2e-5)


def nn_unbox(tree):
    from flax.core import meta

    return meta.unbox(tree)


def test_the_plain_block_is_one_option_away():
    plain = _mixer(block="plain")
    assert plain.linoss is not None and not hasattr(plain, "query")
    assert set(nnx.to_pure_dict(nnx.state(plain, nnx.Param))) == {"in_proj", "linoss", "out_proj"}
    assert plain.init_state((2,)).z.shape == (2, 2, 16)
    outer = _mixer()
    assert outer.linoss is None and outer.block == "outer"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"block": "gated"}, "block must be one of"),
        ({"heads": 3}, "multiple of num_heads"),
        ({"bidirectional": True, "block": "outer"}, "does not take bidirectional"),
        ({"conv_width": -1}, "conv_width must be an int"),
        ({"gate_activation": "tanh"}, "gate_activation must be None or one of"),
    ],
)
def test_bad_block_options_are_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _mixer(**kwargs)


def test_no_gate_and_no_convolution_still_decode():
    m = _mixer(conv_width=0, gate_activation=None)
    assert m.conv_kernel is None and m.gate is None
    x = _x(length=7)
    state = m.init_state((2,))
    assert state.conv is None
    y1, state = m(x[:, :3], state=state)
    y2, _ = m(x[:, 3:], state=state)
    assert_rel_close(jnp.concatenate([y1, y2], 1), m(x), 2e-5)


def test_timestamps_and_selective_steps_reach_the_plain_blocks_layer():
    """The plain block passes timestamps (irregular sampling) and the selective step sizes
    to its LinOSS layer: the mixer equals in_proj -> layer(..., timestamps) -> out_proj."""
    x = _x(length=6)
    times = jnp.asarray([[0.0, 0.5, 2.0, 2.1, 5.0, 9.0]] * 2)
    for kw in ({}, {"selective": True}):
        m = _mixer(block="plain", **kw)
        assert m.linoss.selective == bool(kw)
        want = m.out_proj(m.linoss(m.in_proj(x), timestamps=times))
        assert_rel_close(m(x, timestamps=times), want, 1e-6)
        # The gaps matter: evenly spaced times give another output.
        assert rel_err(m(x, timestamps=times), m(x)) > 1e-3
    lm = linen_mixers.LinOSSMixer(num_heads=4, qkv_features=16, block="plain", selective=True)
    variables = lm.init(jax.random.key(0), x)
    assert "dt_bias" in str(jax.tree_util.tree_structure(variables))
    assert lm.apply(variables, x, timestamps=times).shape == x.shape
    with pytest.raises(ValueError, match=r"init_state\(batch_shape, timestamps=True\)"):
        m(x, timestamps=times, state=m.init_state((2,)))
    with pytest.raises(ValueError, match="pass the new steps' `timestamps`"):
        m(x, state=m.init_state((2,), timestamps=True))


@pytest.mark.parametrize("selective", [False, True])
def test_decoding_with_timestamps_continues_the_whole_sequence(selective):
    """An irregularly sampled sequence decoded in pieces (a prompt, single steps, a padded
    step, then a packed restart) equals the whole-sequence call: the state carries the last
    valid step's time, so each piece's first gap is to it, and a restart forgets it."""
    m = _mixer(block="plain", selective=selective)
    x = _x(length=9)
    times = jnp.asarray([[0.0, 0.5, 2.0, 2.1, 5.0, 9.0, 9.5, 11.0, 14.0]] * 2) + jnp.asarray(
        [[0.0], [3.0]]
    )
    valid = np.ones((2, 9), bool)
    valid[1, 5] = False  # padding inside row 1: its gap after it is to step 4
    whole = m(x, timestamps=times, mask=jnp.asarray(valid))
    state = m.init_state((2,), timestamps=True)
    assert np.isnan(np.asarray(state.time)).all()
    pieces = []
    for lo, hi in ((0, 4), (4, 5), (5, 6), (6, 9)):
        y, state = m(
            x[:, lo:hi], timestamps=times[:, lo:hi], mask=jnp.asarray(valid[:, lo:hi]), state=state
        )
        pieces.append(y)
    got = jnp.concatenate(pieces, 1)
    assert_rel_close(got[valid], whole[valid], 1e-5)
    np.testing.assert_allclose(state.time, times[:, -1])
    # Without the carried time the first gap of a piece would be one unit: another output.
    cold = m(x[:, 4:], timestamps=times[:, 4:], state=m.init_state((2,), timestamps=True))[0]
    assert rel_err(cold[:, :1], whole[:, 4:5]) > 1e-3
    # A packed restart (a new segment id) starts over: as a fresh sequence.
    seg = jnp.ones((2, 3), jnp.int32)
    again, _ = m(x[:, 6:], timestamps=times[:, 6:], segment_ids=seg, state=state)
    fresh = m(x[:, 6:], timestamps=times[:, 6:])
    assert_rel_close(again, fresh, 1e-5)


def test_decoding_with_timestamps_in_the_cache_style():
    """nnx ``init_cache(..., timestamps=True)`` and linen ``init`` with timestamps make a
    cache that carries the last step's time; step-by-step decoding equals the whole call."""
    x = _x(length=6)
    times = jnp.asarray([[0.0, 0.5, 2.0, 2.1, 5.0, 9.0]] * 2)
    m = _mixer(block="plain")
    whole = m(x, timestamps=times)
    m.init_cache(x.shape, timestamps=True)
    steps = [m(x[:, i : i + 1], timestamps=times[:, i : i + 1], decode=True) for i in range(6)]
    assert_rel_close(jnp.concatenate(steps, 1), whole, 1e-5)

    lm = linen_mixers.LinOSSMixer(num_heads=4, qkv_features=16, block="plain", decode=True)
    variables = lm.init(jax.random.key(0), x, timestamps=times)
    assert "last_time" in variables["cache"]
    full = lm.clone(decode=False).apply({"params": variables["params"]}, x, timestamps=times)
    cache, outs = variables["cache"], []
    for i in range(6):
        y, upd = lm.apply(
            {"params": variables["params"], "cache": cache},
            x[:, i : i + 1],
            timestamps=times[:, i : i + 1],
            mutable=["cache"],
        )
        cache = upd["cache"]
        outs.append(y)
    assert_rel_close(jnp.concatenate(outs, 1), full, 1e-5)
    untimed = lm.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"init_cache\(input_shape, timestamps=True\)"):
        lm.apply(untimed, x[:, :1], timestamps=times[:, :1], mutable=["cache"])
