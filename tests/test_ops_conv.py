"""flax_linoss.ops.causal_conv / causal_conv_step against a float64 step-by-step reference.

The reference keeps the buffer of the last ``W - 1`` valid inputs as a list and moves it
step by step: a masked step does not enter it, a new segment empties it first.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_linoss import ops
from flax_linoss.ops._scans import native

D = 3
# The paths: the pure-JAX form everywhere, the fused CPU kernels where they build.
SCANS = [
    "jax",
    pytest.param(
        "native",
        marks=pytest.mark.skipif(
            not native.available(), reason=f"no native kernels: {native.unavailable_reason()}"
        ),
    ),
]


def rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    scale = np.linalg.norm(ref)
    return float(np.linalg.norm(x - ref) / (scale if scale > 0 else 1.0))


def reference(x, w, b, mask=None, seg=None, buf=None):
    """``(y, final buffer)``; jnp float64 (differentiable), a Python loop over the steps."""
    n, length, _ = x.shape
    width = w.shape[0]
    outs, finals = [], []
    for r in range(n):
        hist = [jnp.zeros(D, jnp.float64)] * (width - 1) if buf is None else list(buf[r])
        row = []
        for t in range(length):
            if seg is not None and t > 0 and seg[r, t] != seg[r, t - 1]:
                hist = [jnp.zeros(D, jnp.float64)] * (width - 1)
            y = w[width - 1] * x[r, t] + b
            for j in range(1, width):
                y = y + w[width - 1 - j] * hist[-j]
            row.append(y)
            if (mask is None or mask[r, t]) and width > 1:
                hist = [*hist, x[r, t]][1:]
        outs.append(jnp.stack(row))
        finals.append(jnp.stack(hist) if width > 1 else jnp.zeros((0, D)))
    return jnp.stack(outs), jnp.stack(finals)


def problem(seed, length, width):
    rng = np.random.default_rng(seed)
    f32 = lambda a: np.asarray(a, np.float32)
    x = f32(rng.normal(size=(2, length, D)))
    w, b = f32(rng.normal(size=(width, D))), f32(rng.normal(size=D))
    flags = {
        "mask": rng.uniform(size=(2, length)) > 0.35,
        "seg": np.cumsum(rng.uniform(size=(2, length)) > 0.8, axis=1),
        "buf": f32(rng.normal(size=(2, width - 1, D))),
    }
    return x, w, b, flags


@pytest.mark.parametrize("scan", SCANS)
@pytest.mark.parametrize("flagged", [False, True], ids=["plain", "mask+segments+buffer"])
@pytest.mark.parametrize(("length", "width"), [(1, 4), (5, 2), (13, 4), (6, 1)])
def test_values_and_gradients_match_reference(length, width, flagged, scan):
    x, w, b, fl = problem(length + width, length, width)
    mask, seg = (fl["mask"], fl["seg"]) if flagged else (None, None)
    rng = np.random.default_rng(1)
    ct = rng.normal(size=x.shape).astype(np.float32)
    ct_buf = rng.normal(size=(2, width - 1, D)).astype(np.float32)
    start = fl["buf"]

    with jax.enable_x64(True):

        def ref_loss(x, w, b, start):
            y, fin = reference(x, w, b, mask, seg, start if flagged else None)
            return jnp.sum(ct * y) + jnp.sum(ct_buf * fin), (y, fin)

        f64 = [jnp.asarray(a, jnp.float64) for a in (x, w, b, start)]
        grad_ref = jax.jit(jax.grad(ref_loss, argnums=(0, 1, 2, 3), has_aux=True))
        ref_grads, (ref_y, ref_fin) = grad_ref(*f64)

    def loss(x, w, b, start):
        y, fin = ops.causal_conv(
            x,
            w,
            b,
            mask=mask,
            segment_ids=seg,
            initial_state=start if flagged else None,
            return_state=True,
            scan=scan,
        )
        return jnp.sum(ct * y) + jnp.sum(ct_buf * fin), (y, fin)

    grads, (y, fin) = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(x, w, b, start)
    assert rel(y, ref_y) < 1e-6
    assert fin.shape == (2, width - 1, D) and rel(fin, ref_fin) < 1e-6
    for name, g, r in zip(("x", "w", "b", "initial_state"), grads, ref_grads):
        if name == "initial_state" and not flagged:
            continue
        assert rel(g, r) < 1e-6, name


def test_step_form_equals_sequence_form():
    x, w, b, fl = problem(3, 9, 4)
    y, fin = ops.causal_conv(x, w, b, mask=fl["mask"], initial_state=fl["buf"], return_state=True)
    state, outs = jnp.asarray(fl["buf"]), []
    for t in range(x.shape[1]):
        state, y_t = ops.causal_conv_step(state, x[:, t], w, b, mask=fl["mask"][:, t])
        outs.append(y_t)
    assert rel(jnp.stack(outs, 1), y) < 1e-6
    assert rel(state, fin) < 1e-6


def test_padding_is_invisible_to_valid_steps():
    # Left and interior padding: the valid steps get exactly the unpadded sequence's output.
    x, w, b, _ = problem(4, 6, 4)
    keep = np.array([0, 0, 1, 1, 0, 1, 1, 0, 0, 1, 1], bool)  # 6 valid of 11
    padded = np.full((2, keep.size, D), 9.0, np.float32)
    padded[:, keep] = x
    y, fin = ops.causal_conv(x, w, b, return_state=True)
    y_p, fin_p = ops.causal_conv(padded, w, b, mask=keep[None], return_state=True)
    np.testing.assert_allclose(np.asarray(y_p)[:, keep], y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fin_p, fin, rtol=1e-6)


def test_segments_do_not_see_each_other():
    x, w, b, _ = problem(5, 10, 4)
    seg = np.array([[0] * 3 + [1] * 5 + [2] * 2] * 2)
    y = ops.causal_conv(x, w, b, segment_ids=seg)
    for lo, hi in ((0, 3), (3, 8), (8, 10)):
        np.testing.assert_allclose(
            np.asarray(y)[:, lo:hi], ops.causal_conv(x[:, lo:hi], w, b), rtol=1e-6, atol=1e-6
        )


def test_bfloat16_input():
    x, w, _, fl = problem(6, 7, 4)
    bx = jnp.asarray(x, jnp.bfloat16)
    y, fin = ops.causal_conv(bx, w.astype(jnp.bfloat16), mask=fl["mask"], return_state=True)
    assert y.dtype == jnp.bfloat16 and fin.dtype == jnp.bfloat16
    ref = ops.causal_conv(np.asarray(bx, np.float32), w, mask=fl["mask"])
    assert rel(y, ref) < 2e-2


@pytest.mark.parametrize("scan", SCANS)
def test_streams_are_the_channels_side_by_side(scan):
    """A tuple of inputs convolves as their concatenation, split again: outputs, final
    buffer and the gradients of every input."""
    x, w, b, fl = problem(17, 11, 4)
    rng = np.random.default_rng(5)
    f32 = lambda a: np.asarray(a, np.float32)
    x2, w2, b2 = (
        f32(rng.normal(size=(2, 11, 5))),
        f32(rng.normal(size=(4, 5))),
        f32(rng.normal(size=5)),
    )
    start = f32(rng.normal(size=(2, 3, D + 5)))
    ct = f32(rng.normal(size=(2, 11, D + 5)))
    kw = dict(mask=fl["mask"], segment_ids=fl["seg"], return_state=True, scan=scan)

    def loss(x, x2, w, b, start, streams):
        inputs = (x, x2) if streams else jnp.concatenate([x, x2], -1)
        y, last = ops.causal_conv(inputs, w, b, initial_state=start, **kw)
        y = jnp.concatenate(y, -1) if streams else y
        return jnp.sum(ct * y) + jnp.sum(jnp.sin(last)), (y, last)

    grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)
    args = (x, x2, np.concatenate([w, w2], 1), np.concatenate([b, b2]), start)
    got, (y, last) = grad(*args, True)
    want, (y_ref, last_ref) = grad(*args, False)
    assert rel(y, y_ref) < 1e-6 and rel(last, last_ref) < 1e-6
    for g, r in zip(got, want):
        assert rel(g, r) < 1e-6
    with pytest.raises(ValueError, match="every stream the same"):
        ops.causal_conv((x, x2[:, :5]), args[2])
    with pytest.raises(ValueError, match="the streams of `x` have 8 channels"):
        ops.causal_conv((x, x2), w)


def test_bad_inputs_raise_one_clear_error():
    x, w, b, _ = problem(7, 5, 4)
    with pytest.raises(ValueError, match="channels"):
        ops.causal_conv(x, w[:, :2])
    with pytest.raises(ValueError, match="`w` of shape"):
        ops.causal_conv(x, w[0])
    with pytest.raises(ValueError, match=r"`b` must have shape \[channels\]"):
        ops.causal_conv(x, w, b[:2])
    with pytest.raises(ValueError, match="`mask` of shape"):
        ops.causal_conv(x, w, mask=np.ones((2, 4), bool))
    with pytest.raises(ValueError, match="`initial_state` of shape"):
        ops.causal_conv(x, w, initial_state=np.zeros((2, 4, D), np.float32))
    with pytest.raises(ValueError, match="`state` of shape"):
        ops.causal_conv_step(np.zeros((2, 2, D), np.float32), x[:, 0], w)


@pytest.mark.parametrize(("width", "flagged"), [(4, True), (4, False), (2, True)])
def test_sequence_split_over_devices_matches_reference(width, flagged):
    """Each of 4 shards (3 steps, fewer than the taps' history of 3 valid inputs when
    masked) starts from the valid inputs before it: across a shard with no valid step,
    not across a segment start (at a boundary or inside a shard), from the initial buffer;
    values, gradients and the final buffer."""
    from jax.sharding import PartitionSpec as P

    length = 12
    x, w, b, fl = problem(width + 20, length, width)
    mask, seg = fl["mask"], fl["seg"]
    mask[0, 3:6] = False  # a whole shard
    seg[1] = 0
    seg[1, 6:] = 1  # a segment starting at a boundary
    seg[1, 10:] = 2  # and inside a shard
    kw = dict(mask=mask, seg=seg, buf=fl["buf"]) if flagged else {}
    ct = np.random.default_rng(width).normal(size=x.shape).astype(np.float32)
    mesh = jax.make_mesh((4,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))
    step = P(None, "seq")

    def sharded(x, w, b, buf):
        def local(x, mask, seg, w, b, buf):
            return ops.causal_conv(
                x,
                w,
                b,
                mask=mask if flagged else None,
                segment_ids=seg if flagged else None,
                initial_state=buf if flagged else None,
                return_state=True,
                sequence_axis="seq",
            )

        specs = (step, step, step, P(), P(), P())
        fn = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(step, P()))
        return fn(x, mask, seg, w, b, buf)

    def loss(y, final):
        return jnp.sum(jnp.asarray(ct, y.dtype) * y) + jnp.sum(final * 0.5), (y, final)

    grads, (y, final) = jax.jit(
        jax.grad(lambda *a: loss(*sharded(*a)), argnums=(0, 1, 2, 3), has_aux=True)
    )(x, w, b, fl["buf"])
    with jax.enable_x64(True):
        f64 = [jnp.asarray(a, jnp.float64) for a in (x, w, b, fl["buf"])]

        def ref(x, w, b, buf):
            kw_ = {**kw, "buf": buf} if flagged else {}
            return loss(*reference(x, w, b, **kw_))

        grad_ref = jax.jit(jax.grad(ref, argnums=(0, 1, 2, 3), has_aux=True))
        ref_grads, (ref_y, ref_final) = grad_ref(*f64)
    assert rel(y, ref_y) < 1e-5 and rel(final, ref_final) < 1e-5
    for name, got, want in zip(("x", "w", "b", "buf"), grads, ref_grads):
        if flagged or name != "buf":
            assert rel(got, want) < 1e-5, name
