"""flax_linoss.ops.outer: the outer-product oscillator recurrence against a float64
step-by-step reference written here from its equations, values and gradients.

    S_t[i, j] = M_i S_{t-1}[i, j] + f_i k_t[i] v_t[j],    o_t[j] = sum_i q_t[i] y(S_t[i, j])

A masked step leaves ``S`` as it is (its output is read from the held state); a step whose
segment id differs from the previous step's first zeroes ``S``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oscillator_reference import reference_step

from flax_linoss import ops
from flax_linoss.ops._scans import native as native_kernels

H, K, V = 2, 3, 2  # heads, key dims, value dims
CHUNK = 8

needs_native = pytest.mark.skipif(
    not native_kernels.available(),
    reason=f"native kernels unavailable: {native_kernels.unavailable_reason()}",
)


def rel(x, ref):
    """Norm-relative error."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    scale = np.linalg.norm(ref)
    return float(np.linalg.norm(x - ref) / (scale if scale > 0 else 1.0))


def reference(
    q, k, v, a, dt, g=None, *, disc="im", readout=None, z0=None, y0=None, mask=None, seg=None
):
    """``(o, z_L, y_L)`` step by step in float64 (``dt [H, K]``, or per step ``[N, L, H,
    K]``): every entry ``(i, j)`` an oscillator of the scheme's equations
    (``oscillator_reference.reference_step``, forcing ``k_t[i] v_t[j]``),
    read as ``c_z z + c_y y`` (the position without ``readout``). Call under
    ``jax.enable_x64(True)``."""
    f64 = lambda x: None if x is None else jnp.asarray(x, jnp.float64)
    q, k, v, a, dt, g, readout = map(f64, (q, k, v, a, dt, g, readout))
    n, length, heads, key_dim = q.shape
    zero = jnp.zeros((n, heads, key_dim, v.shape[-1]), jnp.float64)
    z0 = zero if z0 is None else jnp.broadcast_to(f64(z0), zero.shape)
    y0 = zero if y0 is None else jnp.broadcast_to(f64(y0), zero.shape)
    mask = jnp.ones((n, length), bool) if mask is None else jnp.asarray(mask, bool)
    seg = jnp.zeros((n, length), int) if seg is None else jnp.asarray(seg)
    restart = jnp.concatenate([jnp.zeros((n, 1), bool), seg[:, 1:] != seg[:, :-1]], 1)
    per_entry = lambda x: None if x is None else x[..., None]  # [.., H, K] -> [.., H, K, 1]

    def body(carry, inp, dt_t):
        z, y = carry
        q_t, k_t, v_t, ok, new = inp
        z = jnp.where(new[:, None, None, None], 0.0, z)
        y = jnp.where(new[:, None, None, None], 0.0, y)
        force = k_t[..., :, None] * v_t[..., None, :]  # [N, H, K, V]
        z_new, y_new = reference_step(z, y, force, per_entry(a), dt_t, per_entry(g), disc)
        z = jnp.where(ok[:, None, None, None], z_new, z)
        y = jnp.where(ok[:, None, None, None], y_new, y)
        read = y if readout is None else readout[..., 0:1] * z + readout[..., 1:2] * y
        return (z, y), jnp.einsum("nhk,nhkv->nhv", q_t, read)

    per_step = dt.ndim > 2  # [N, L, H, K]: this step's sizes
    fixed = None if per_step else per_entry(dt)

    def body_dt(carry, inp):
        *inp, dt_t = inp
        return body(carry, inp, per_entry(dt_t) if per_step else fixed)

    dts = jnp.broadcast_to(dt, (n, length, heads, key_dim)) if per_step else jnp.zeros((n, length))
    steps = tuple(jnp.swapaxes(x, 0, 1) for x in (q, k, v, mask, restart, dts))
    (z_l, y_l), o = jax.lax.scan(body_dt, (z0, y0), steps)
    return jnp.swapaxes(o, 0, 1), z_l, y_l


def problem(seed, n, length, disc="im", dims=(H, K, V)):
    """Random ``(q, k, v, a, dt, g)`` and flags for ``dims = (heads, key dims, value dims)``."""
    H, K, V = dims
    rng = np.random.default_rng(seed)
    f32 = lambda x: np.asarray(x, np.float32)
    q, k = f32(rng.normal(size=(2, n, length, H, K)))
    v = f32(rng.normal(size=(n, length, H, V)))
    raw = ops.init_oscillators(jax.random.PRNGKey(seed), H * K, disc)
    g_raw = raw.get("g_raw")
    if g_raw is not None:
        g_raw = g_raw + 0.2  # some damping
    a, dt, g = ops.constrain(disc, raw["a_raw"], raw["dt_raw"], g_raw, constraint="stable")
    a, dt = f32(a).reshape(H, K), f32(dt).reshape(H, K)
    g = None if g is None else f32(g).reshape(H, K)
    flags = {
        "mask": rng.uniform(size=(n, length)) > 0.3,
        "seg": np.cumsum(rng.uniform(size=(n, length)) > 0.85, axis=1),
        "z0": f32(rng.normal(size=(n, H, K, V))),
        "y0": f32(rng.normal(size=(n, H, K, V))),
        "readout": f32(rng.normal(size=(H, K, 2))),
    }
    return (q, k, v, a, dt, g), flags


# Lengths around the chunk (8): shorter, one chunk and a rest, several chunks and a rest.
# Every length with mask, segments, initial state and readout; two without flags.
CASES = [(1, True), (5, True), (37, True), (130, True), (37, False), (130, False)]


def _assert_matches_reference(
    args, g, fl, *, disc, flagged, readout, seed, check=True, shards=None, scan="chunked"
):
    """Values and gradients of ``outer_apply`` with respect to every input of ``args = (q,
    k, v, a, dt, z0, y0, readout)`` (``dt`` fixed or per step) against the float64
    reference, through random cotangents on the output and the final state. ``flagged``
    adds ``fl``'s mask, segments and initial state; ``readout`` the readout weights;
    ``shards`` splits the length over that many devices (``sequence_axis``); ``scan`` the
    path."""
    _, length, heads, key_dim = args[0].shape
    value_dim = args[2].shape[-1]
    kw = dict(mask=fl["mask"], seg=fl["seg"]) if flagged else {}
    rng = np.random.default_rng(seed)
    ct = rng.normal(size=(2, length, heads, value_dim)).astype(np.float32)
    ct_z, ct_y = rng.normal(size=(2, 2, heads, key_dim, value_dim)).astype(np.float32)

    def loss(out, z_l, y_l, cast):
        return jnp.sum(cast(ct) * out) + jnp.sum(cast(ct_z) * z_l) + jnp.sum(cast(ct_y) * y_l)

    with jax.enable_x64(True):

        def ref_loss(q, k, v, a, dt, z0, y0, c):
            extra = {**kw, "z0": z0, "y0": y0} if flagged else {}
            out = reference(q, k, v, a, dt, g, disc=disc, readout=c if readout else None, **extra)
            return loss(*out, lambda x: jnp.asarray(x, jnp.float64)), out

        f64 = [jnp.asarray(x, jnp.float64) for x in args]
        ref_grads, ref_out = jax.jit(jax.grad(ref_loss, argnums=tuple(range(8)), has_aux=True))(
            *f64
        )

    def apply(q, k, v, a, dt, z0, y0, c, mask, seg, axis=None):
        return ops.outer_apply(
            q,
            k,
            v,
            a,
            dt,
            g=g,
            discretization=disc,
            readout=c if readout else None,
            initial_state=ops.OuterState(z0, y0) if flagged else None,
            mask=mask,
            segment_ids=seg,
            return_state=True,
            chunk=CHUNK,
            check=check,
            sequence_axis=axis,
            scan=scan,
        )

    if shards:  # the length split over "seq" (a per-step dt with it), the rest replicated
        from jax.sharding import PartitionSpec as P

        mesh = jax.make_mesh((shards,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))
        step = P(None, "seq")
        specs = (step,) * 3 + (P(), step if np.ndim(args[4]) > 2 else P(), P(), P(), P())
        specs += (step if flagged else P(),) * 2
        state = ops.OuterState(P(), P())
        run = jax.shard_map(
            lambda *a: apply(*a, axis="seq"),
            mesh=mesh,
            in_specs=specs,
            out_specs=(step, state),
        )
    else:
        run = apply

    def fast_loss(q, k, v, a, dt, z0, y0, c):
        o, st = run(q, k, v, a, dt, z0, y0, c, kw.get("mask"), kw.get("seg"))
        return loss(o, st.z, st.y, jnp.asarray), (o, st)

    grads, (out, st) = jax.jit(jax.grad(fast_loss, argnums=tuple(range(8)), has_aux=True))(*args)
    assert out.dtype == jnp.float32 and st.z.dtype == jnp.float32
    assert rel(out, ref_out[0]) < 1e-5
    assert rel(st.z, ref_out[1]) < 1e-5
    assert rel(st.y, ref_out[2]) < 1e-5
    unused = (() if flagged else ("z0", "y0")) + (() if readout else ("readout",))
    names = ("q", "k", "v", "a", "dt", "z0", "y0", "readout")
    for name, gr, ref in zip(names, grads, ref_grads):
        if name not in unused:
            assert rel(gr, ref) < 1e-4, name


@pytest.mark.parametrize(("length", "flagged"), CASES)
def test_values_and_gradients_match_float64_reference(length, flagged):
    (q, k, v, a, dt, _), fl = problem(length, 2, length)
    args = (q, k, v, a, dt, fl["z0"], fl["y0"], fl["readout"])
    _assert_matches_reference(
        args, None, fl, disc="im", flagged=flagged, readout=flagged, seed=7, check=False
    )


# The fused CPU kernels (scan="native"): every scheme; key and value dims the kernels are
# compiled for (8, 16: the forward pass unrolls over the value dims, the backward pass over
# the key dims) and others; lengths shorter than a checkpoint interval, one and several
# intervals and a rest (native.OUTER_CHUNK = 32).
NATIVE_CASES = [
    (1, True, "im", (H, K, V)),
    (37, True, "im", (H, K, V)),
    (70, True, "imex", (1, 16, 8)),
    (45, False, "damped", (2, 8, 16)),
    (33, True, "damped", (1, 3, 3)),
]


@needs_native
@pytest.mark.parametrize(("length", "flagged", "disc", "dims"), NATIVE_CASES)
def test_native_kernel_matches_float64_reference(length, flagged, disc, dims):
    (q, k, v, a, dt, g), fl = problem(length + 20, 2, length, disc, dims)
    heads, key_dim, value_dim = dims
    z0, y0 = np.random.default_rng(length).normal(size=(2, 2, heads, key_dim, value_dim))
    readout = np.random.default_rng(length + 1).normal(size=(heads, key_dim, 2))
    if flagged:  # a segment starting at a held step, and one at the first step
        fl["mask"][0, length // 2] = False
        fl["seg"][0, length // 2 :] += 3
        fl["seg"][1, 0] = -1
    f32 = lambda x: np.asarray(x, np.float32)
    args = (q, k, v, a, dt, f32(z0), f32(y0), f32(readout))
    _assert_matches_reference(
        args, g, fl, disc=disc, flagged=flagged, readout=True, seed=3, scan="native"
    )


@needs_native
def test_native_kernel_in_float64():
    (q, k, v, a, dt, _), fl = problem(12, 2, 41, "im", (2, 3, 16))
    with jax.enable_x64(True):
        f64 = lambda x: jnp.asarray(x, jnp.float64)
        q, k, v, a, dt = map(f64, (q, k, v, a, dt))
        kw = dict(mask=fl["mask"], segment_ids=fl["seg"])

        def loss(fn, q, k, v, a, dt):
            o, st = fn(q, k, v, a, dt)
            return jnp.sum(jnp.sin(o)) + jnp.sum(st.z * st.y), (o, st)

        def fast(q, k, v, a, dt):
            return ops.outer_apply(q, k, v, a, dt, return_state=True, scan="native", **kw)

        def slow(q, k, v, a, dt):
            o, z, y = reference(q, k, v, a, dt, mask=fl["mask"], seg=fl["seg"])
            return o, ops.OuterState(z, y)

        grad = lambda fn: jax.jit(jax.grad(lambda *x: loss(fn, *x), range(5), has_aux=True))
        got, (o, st) = grad(fast)(q, k, v, a, dt)
        want, (o_ref, st_ref) = grad(slow)(q, k, v, a, dt)
        assert o.dtype == jnp.float64 and st.z.dtype == jnp.float64
        assert rel(o, o_ref) < 1e-12 and rel(st.y, st_ref.y) < 1e-12
        for name, x, ref in zip("qkv", got, want):
            assert rel(x, ref) < 1e-11, name
        assert rel(got[3], want[3]) < 1e-11 and rel(got[4], want[4]) < 1e-11


def test_which_path_auto_runs(monkeypatch):
    from flax_linoss.ops import outer
    from flax_linoss.ops._scans import native

    resolve = outer._resolve_scan
    assert resolve("chunked", False, None) == "chunked"
    monkeypatch.setattr(native, "available", lambda: True)
    monkeypatch.setattr(outer._auto, "per_device", lambda: True)
    assert resolve("auto", False, None) == "native"
    assert resolve("native", False, None) == "native"
    # A per-step dt or a split length: the chunked form (and "native" is refused, saying why).
    assert resolve("auto", True, None) == "chunked"
    assert resolve("auto", False, "seq") == "chunked"
    with pytest.raises(ValueError, match="time-invariant `dt`"):
        resolve("native", True, None)
    with pytest.raises(ValueError, match="no `sequence_axis`"):
        resolve("native", False, "seq")
    # Under a multi-device jit XLA cannot split a custom call: auto keeps the chunked form.
    monkeypatch.setattr(outer._auto, "per_device", lambda: False)
    assert resolve("auto", False, None) == "chunked"
    assert resolve("native", False, None) == "native"
    # No kernel (no compiler, or switched off): auto falls back, "native" says why.
    monkeypatch.setattr(outer._auto, "per_device", lambda: True)
    monkeypatch.setattr(native, "available", lambda: False)
    monkeypatch.setattr(native, "unavailable_reason", lambda: "disabled by FLAX_LINOSS_NATIVE=0")
    assert resolve("auto", False, None) == "chunked"
    with pytest.raises(ValueError, match="FLAX_LINOSS_NATIVE=0"):
        resolve("native", False, None)
    with pytest.raises(ValueError, match="Unknown scan 'fast'"):
        resolve("fast", False, None)


# The length split over 4 devices: shards shorter than a chunk (5 steps) and longer (9, 19),
# fixed and per-step dt, with the flags (a held or restarting step at a boundary among
# them) and without.
SHARD_CASES = [(20, "im", True, False), (36, "imex", True, True), (76, "damped", False, False)]
SHARD_CASES += [(36, "im", False, True)]


@pytest.mark.parametrize(("length", "disc", "flagged", "per_step"), SHARD_CASES)
def test_sequence_split_over_devices_matches_float64_reference(length, disc, flagged, per_step):
    (q, k, v, a, dt, g), fl = problem(length + 3, 2, length, disc)
    shard = length // 4
    fl["mask"][0, shard - 2 : 2 * shard + 1] = False  # held across a boundary, a whole shard
    fl["seg"][1, 2 * shard :] += 5  # a segment starting exactly at a boundary
    if per_step:
        dt = _per_step_dt(disc, a, dt, g, 2, length, length)
    args = (q, k, v, a, dt, fl["z0"], fl["y0"], fl["readout"])
    _assert_matches_reference(
        args, g, fl, disc=disc, flagged=flagged, readout=True, seed=5, check=False, shards=4
    )


def _per_step_dt(disc, a, dt, g, n, length, seed):
    """Per-step sizes ``[n, length, H, K]``: ``dt`` times a random factor in (0.3, 3),
    clamped into the scheme's stable range."""
    rng = np.random.default_rng(seed)
    steps = dt * rng.uniform(0.3, 3.0, size=(n, length, H, K)).astype(np.float32)
    return np.asarray(ops.clamp_steps(disc, a, steps, g), np.float32)


# Per-step dt: lengths around the chunk, every scheme, with and without the flags.
STEP_CASES = [(1, "im", True), (13, "im", True), (37, "imex", True), (37, "damped", True)]
STEP_CASES += [(21, "im", False), (21, "damped", False)]


@pytest.mark.parametrize(("length", "disc", "flagged"), STEP_CASES)
def test_per_step_dt_values_and_gradients_match_float64_reference(length, disc, flagged):
    """``dt [N, L, H, K]`` (a selective gate's or timestamps' sizes): the per-step form
    against the float64 reference, values and gradients with respect to every input,
    every ``dt[t]`` included."""
    (q, k, v, a, dt, g), fl = problem(length + 50, 2, length, disc)
    steps = _per_step_dt(disc, a, dt, g, 2, length, length)
    args = (q, k, v, a, steps, fl["z0"], fl["y0"], fl["readout"])
    _assert_matches_reference(args, g, fl, disc=disc, flagged=flagged, readout=True, seed=9)


def test_per_step_dt_constant_over_time_is_the_time_invariant_form():
    (q, k, v, a, dt, _), fl = problem(11, 2, 29)
    kw = dict(mask=fl["mask"], segment_ids=fl["seg"], readout=fl["readout"], chunk=CHUNK)
    fixed = ops.outer_apply(q, k, v, a, dt, **kw)
    steps = np.broadcast_to(dt, (2, 29, H, K))
    assert rel(ops.outer_apply(q, k, v, a, steps, **kw), fixed) < 1e-6
    # Broadcast over the batch: [L, H, K].
    assert rel(ops.outer_apply(q, k, v, a, steps[0], **kw), fixed) < 1e-6
    # The step form takes this step's sizes.
    state = ops.OuterState.zeros((2,), H, K, V)
    outs = []
    for t in range(29):
        state, o_t = ops.outer_step(
            state, q[:, t], k[:, t], v[:, t], a, steps[:, t], readout=fl["readout"]
        )
        outs.append(o_t)
    want = ops.outer_apply(q, k, v, a, steps, readout=fl["readout"], chunk=CHUNK)
    assert rel(jnp.stack(outs, 1), want) < 1e-5
    with pytest.raises(ValueError, match=r"`dt` must have shape \[heads, key_dim\]"):
        ops.outer_apply(q, k, v, a, steps[:, :5])


@pytest.mark.parametrize("disc", ["imex", "damped"])
def test_other_schemes_match_reference(disc):
    (q, k, v, a, dt, g), fl = problem(3, 2, 21, disc)
    with jax.enable_x64(True):
        ref_o, ref_z, ref_y = reference(
            q, k, v, a, dt, g, disc=disc, mask=fl["mask"], seg=fl["seg"], z0=fl["z0"]
        )
    o, st = ops.outer_apply(
        q,
        k,
        v,
        a,
        dt,
        g=g,
        discretization=disc,
        mask=fl["mask"],
        segment_ids=fl["seg"],
        initial_state=ops.OuterState(fl["z0"], np.zeros_like(fl["z0"])),
        return_state=True,
        chunk=CHUNK,
    )
    assert rel(o, ref_o) < 1e-5 and rel(st.z, ref_z) < 1e-5 and rel(st.y, ref_y) < 1e-5


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_chunk_length_does_not_change_the_result(chunk):
    (q, k, v, a, dt, _), fl = problem(4, 2, 19)
    with jax.enable_x64(True):
        ref_o = reference(q, k, v, a, dt, mask=fl["mask"], seg=fl["seg"])[0]
    o = ops.outer_apply(q, k, v, a, dt, mask=fl["mask"], segment_ids=fl["seg"], chunk=chunk)
    assert rel(o, ref_o) < 1e-5


def test_step_form_equals_scan_form():
    (q, k, v, a, dt, _), fl = problem(5, 2, 11)
    o_scan, st_scan = ops.outer_apply(
        q,
        k,
        v,
        a,
        dt,
        mask=fl["mask"],
        readout=fl["readout"],
        initial_state=ops.OuterState(fl["z0"], fl["y0"]),
        return_state=True,
        chunk=4,
    )
    state = ops.OuterState(jnp.asarray(fl["z0"]), jnp.asarray(fl["y0"]))
    outs = []
    for t in range(q.shape[1]):
        state, o_t = ops.outer_step(
            state, q[:, t], k[:, t], v[:, t], a, dt, readout=fl["readout"], mask=fl["mask"][:, t]
        )
        outs.append(o_t)
    assert rel(jnp.stack(outs, 1), o_scan) < 1e-5
    assert rel(state.z, st_scan.z) < 1e-5 and rel(state.y, st_scan.y) < 1e-5


def test_masked_steps_hold_the_state_exactly():
    # Inserting masked steps changes nothing for the valid ones: the same outputs at the
    # valid positions, the same final state, and each masked step reads the held state.
    (q, k, v, a, dt, _), _ = problem(6, 1, 9)
    where = np.array([0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1, 1, 1], bool)  # 9 valid of 14
    pos = np.cumsum(where) - 1
    spread = lambda x: np.where(where[None, :, None, None], x[:, pos], 7.0).astype(np.float32)
    o, st = ops.outer_apply(q, k, v, a, dt, return_state=True, chunk=4)
    o2, st2 = ops.outer_apply(
        spread(q), spread(k), spread(v), a, dt, mask=where[None], return_state=True, chunk=4
    )
    assert rel(np.asarray(o2)[:, where], o) < 1e-6
    assert rel(st2.z, st.z) < 1e-6 and rel(st2.y, st.y) < 1e-6
    # A masked step reads the held state with its own query (here the filler 7.0).
    _, st6 = ops.outer_apply(q[:, :6], k[:, :6], v[:, :6], a, dt, return_state=True)
    held = np.einsum("nhk,nhkv->nhv", spread(q)[:, 10], st6.y)
    assert rel(np.asarray(o2)[:, 10], held) < 1e-6
    assert np.all(np.asarray(o2)[:, 0] == 0.0)  # nothing before the first valid step


def test_segments_restart_the_state():
    # A packed row equals its segments run separately from a zero state.
    (q, k, v, a, dt, _), _ = problem(8, 1, 23)
    seg = np.array([[0] * 6 + [1] * 13 + [2] * 4])
    o = ops.outer_apply(q, k, v, a, dt, segment_ids=seg, chunk=CHUNK)
    for lo, hi in ((0, 6), (6, 19), (19, 23)):
        part = ops.outer_apply(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], a, dt, chunk=CHUNK)
        assert rel(np.asarray(o)[:, lo:hi], part) < 1e-6


def test_continuing_from_the_returned_state_equals_one_pass():
    (q, k, v, a, dt, _), fl = problem(9, 2, 30)
    o, st = ops.outer_apply(q, k, v, a, dt, mask=fl["mask"], return_state=True)
    o1, st1 = ops.outer_apply(
        q[:, :13], k[:, :13], v[:, :13], a, dt, mask=fl["mask"][:, :13], return_state=True
    )
    o2, st2 = ops.outer_apply(
        q[:, 13:],
        k[:, 13:],
        v[:, 13:],
        a,
        dt,
        mask=fl["mask"][:, 13:],
        initial_state=st1,
        return_state=True,
    )
    assert rel(jnp.concatenate([o1, o2], 1), o) < 1e-6
    assert rel(st2.y, st.y) < 1e-6 and rel(st2.z, st.z) < 1e-6


def test_bfloat16_inputs_keep_a_float32_state():
    (q, k, v, a, dt, _), fl = problem(10, 2, 17)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)
    o, st = ops.outer_apply(bf(q), bf(k), bf(v), a, dt, mask=fl["mask"], return_state=True)
    assert o.dtype == jnp.bfloat16
    assert st.z.dtype == jnp.float32 and st.y.dtype == jnp.float32
    f32 = lambda x: np.asarray(bf(x), np.float32)  # the same (rounded) inputs in float32
    o32, st32 = ops.outer_apply(f32(q), f32(k), f32(v), a, dt, mask=fl["mask"], return_state=True)
    assert rel(o, o32) < 1e-2  # the output's own rounding
    assert rel(st.y, st32.y) < 1e-6  # the state itself is float32 arithmetic
    state = ops.OuterState.zeros((2,), H, K, V)
    state, o_t = ops.outer_step(state, bf(q[:, 0]), bf(k[:, 0]), bf(v[:, 0]), a, dt)
    assert o_t.dtype == jnp.bfloat16 and state.z.dtype == jnp.float32
    first = ops.outer_apply(f32(q)[:, :1], f32(k)[:, :1], f32(v)[:, :1], a, dt, return_state=True)
    assert rel(state.y, first[1].y) < 1e-6


def test_bad_inputs_raise_one_clear_error():
    (q, k, v, a, dt, _), _ = problem(11, 1, 4)
    with pytest.raises(ValueError, match="`k` must have the shape of `q`"):
        ops.outer_apply(q, k[..., :2], v, a, dt)
    with pytest.raises(ValueError, match="`v` must be"):
        ops.outer_apply(q, k, v[:, :3], a, dt)
    with pytest.raises(ValueError, match=r"`a` must have shape \[heads, key_dim\]"):
        ops.outer_apply(q, k, v, a[:1], dt)
    with pytest.raises(ValueError, match="`dt` must be"):
        ops.outer_apply(q, k, v, a, dt * 0)
    with pytest.raises(ValueError, match=r"`readout` must have shape \[heads, key_dim, 2\]"):
        ops.outer_apply(q, k, v, a, dt, readout=np.ones((H, K)))
    with pytest.raises(ValueError, match="needs the damping `g`"):
        ops.outer_apply(q, k, v, a, dt, discretization="damped")
    with pytest.raises(ValueError, match="`mask` of shape"):
        ops.outer_apply(q, k, v, a, dt, mask=np.ones((1, 5), bool))
    with pytest.raises(ValueError, match="`chunk` must be a positive int"):
        ops.outer_apply(q, k, v, a, dt, chunk=0)
    with pytest.raises(ValueError, match=r"initial_state.z"):
        ops.outer_apply(q, k, v, a, dt, initial_state=ops.OuterState.zeros((1,), H, K, V + 1))
    with pytest.raises(ValueError, match=r"`state.y`"):
        ops.outer_step(
            ops.OuterState(jnp.zeros((1, H, K, V)), jnp.zeros((1, H, K + 1, V))),
            q[:, 0],
            k[:, 0],
            v[:, 0],
            a,
            dt,
        )
