"""Synthetic tasks (determinism, physics, long-range structure) and the dataset registry."""

from __future__ import annotations

import numpy as np
import pytest

from flax_linoss.data import registry, synthetic
from flax_linoss.data.loader import make_loader


def test_oscillator_shapes_determinism_and_prefix_stability():
    x, y = synthetic.oscillator_forecasting(8, seed=3, input_length=40, output_length=10)
    assert x.shape == (8, 40, 2) and y.shape == (8, 10, 2)
    assert x.dtype == np.float32 and y.dtype == np.float32
    x2, y2 = synthetic.oscillator_forecasting(3, seed=3, input_length=40, output_length=10)
    np.testing.assert_array_equal(x2, x[:3])  # example i does not depend on N
    np.testing.assert_array_equal(y2, y[:3])
    x3, _ = synthetic.oscillator_forecasting(8, seed=4, input_length=40, output_length=10)
    assert not np.allclose(x3, x)


@pytest.mark.parametrize("kind", synthetic.OSCILLATOR_KINDS)
def test_oscillator_kinds_are_continuous_positions(kind):
    x, y = synthetic.oscillator_forecasting(
        4, seed=0, kind=kind, input_length=60, output_length=20, dt=0.05
    )
    full = np.concatenate([x, y], axis=1)
    assert np.isfinite(full).all() and np.abs(full).max() <= 1.0 + 1e-6
    # y continues x smoothly: the jump at the boundary is like any other step.
    steps = np.abs(np.diff(full, axis=1)).max(axis=(1, 2))
    assert (np.abs(y[:, 0] - x[:, -1]).max(axis=1) <= steps + 1e-6).all()
    if kind != "coupled":  # (sin, -cos) lies on the unit circle
        np.testing.assert_allclose((full**2).sum(-1), 1.0, atol=1e-5)


def test_rk4_conserves_energy_and_damping_dissipates():
    keys = [
        "k",
        "drive_amp",
        "drive_freq",
        "wind0",
        "gust_amp",
        "gust_freq1",
        "gust_freq2",
        "gust_phase1",
        "gust_phase2",
        "gamma",
    ]
    p = {k: np.zeros(2) for k in keys}
    p["w0sq1"] = p["w0sq2"] = np.full(2, 9.81)
    p["gamma"] = np.array([0.0, 0.3])
    tr = synthetic.simulate_pendulums(p, np.array([[1.0, 0, 0, 0]] * 2), 1000, 0.05, 4)
    energy = 0.5 * tr[..., 1] ** 2 - 9.81 * np.cos(tr[..., 0])
    assert np.ptp(energy[0]) < 1e-4  # undamped: conserved by a proper integrator
    assert energy[1, -1] < energy[1, 0] - 1.0  # damped: loses energy
    # Small-angle period 2 pi / sqrt(g/l) within a few percent at 1 rad amplitude.
    crossings = np.nonzero(np.diff(np.sign(tr[0, :, 0])) != 0)[0]
    period = 2 * np.mean(np.diff(crossings)) * 0.05
    assert abs(period / (2 * np.pi / np.sqrt(9.81)) - 1.0) < 0.1


def test_long_range_label_lives_only_in_the_early_cue():
    kw = dict(length=2000, num_classes=4, cue_length=16, cue_region=0.1, noise_std=0.5)
    x, y = synthetic.long_range_classification(64, seed=1, **kw)
    assert x.shape == (64, 2000, 1) and x.dtype == np.float32 and y.dtype == np.int32
    assert set(np.unique(y)) == {0, 1, 2, 3}
    codes = synthetic._codebook(4, 16)
    # A matched filter over the first 10% recovers every label ...
    early = x[:, :200, 0]
    scores = np.stack(
        [
            np.max(np.lib.stride_tricks.sliding_window_view(early, 16, axis=1) @ c, axis=1)
            for c in codes
        ],
        axis=1,
    )
    assert (scores.argmax(1) == y).mean() > 0.95
    # ... and the remaining 90% are label-free noise: same distribution for all classes.
    late = x[:, 200:, 0]
    assert abs(late.std() - 0.5) < 0.01
    means = [late[y == c].mean() for c in range(4)]
    assert np.ptp(means) < 0.02
    x2, y2 = synthetic.long_range_classification(5, seed=1, **kw)
    np.testing.assert_array_equal(x2, x[:5])
    np.testing.assert_array_equal(y2, y[:5])


def test_long_range_accepts_length_1e5_cheaply():
    src = synthetic.LongRangeSource(1000, seed=0, length=100_000)
    rec = src[999]
    assert rec["series"].shape == (100_000, 1) and rec["series"].dtype == np.float32
    one_x, one_y = synthetic.long_range_example(999, seed=0, length=100_000)
    np.testing.assert_array_equal(one_x, rec["series"])
    assert one_y == rec["label"]


def test_long_range_argument_errors():
    with pytest.raises(ValueError, match="cue_region"):
        synthetic.long_range_classification(1, length=100, cue_length=16, cue_region=0.1)
    with pytest.raises(ValueError, match="kind"):
        synthetic.oscillator_forecasting(1, kind="chaotic")


def test_registry_synthetic_through_grain():
    ds = registry.get_dataset(
        "synthetic/long_range", seed=2, num_train=12, num_val=4, num_test=4, length=512
    )
    assert set(ds) == {"train", "val", "test"} and ds.info["num_classes"] == 4
    assert ds.info["length"] == 512 and ds.info["channels"] == 1
    it = make_loader(ds["train"], batch_size=4, seed=0, shard_index=0, shard_count=1)
    batches = list(it)
    assert len(batches) == 3 and batches[0]["series"].shape == (4, 512, 1)
    assert sorted(np.concatenate([b["index"] for b in batches]).tolist()) == list(range(12))
    assert not np.array_equal(ds["train"][0]["series"], ds["val"][0]["series"])

    osc = registry.get_dataset(
        "synthetic/oscillator",
        seed=0,
        num_train=8,
        num_val=2,
        num_test=2,
        input_length=32,
        output_length=8,
    )
    assert osc.info == {"task": "regression", "channels": 2, "length": 32, "target_shape": (8, 2)}
    b = next(make_loader(osc["train"], batch_size=4, shard_index=0, shard_count=1))
    assert b["series"].shape == (4, 32, 2) and b["label"].shape == (4, 8, 2)


def test_irregular_oscillator_times_bands_and_registry():
    x, label, t = synthetic.irregular_oscillator_example(3, seed=(1, 0), length=50)
    x2, _, t2 = synthetic.irregular_oscillator_example(3, seed=(1, 0), length=50)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(t, t2)
    assert x.shape == (50, 1) and t.shape == (50,) and 0 <= label < 4
    assert np.all(np.diff(t) >= 0) and 0 <= t[0] and t[-1] <= 32
    ds = registry.get_dataset("synthetic/irregular_oscillator", num_train=64, num_val=4, num_test=4)
    assert ds.info["timestamps"] and ds.info["length"] == 64
    labels = [ds["train"][i]["label"] for i in range(64)]
    assert set(labels) == {0, 1, 2, 3}  # every band appears
    # Without the times, samples per cycle overlap across bands: the window length varies.
    spans = [ds["train"][i]["timestamps"][-1] for i in range(64)]
    assert max(spans) > 2.5 * min(spans)
    b = next(make_loader(ds["train"], batch_size=8, shard_index=0, shard_count=1))
    assert b["timestamps"].shape == (8, 64) and b["series"].shape == (8, 64, 1)
    with pytest.raises(ValueError, match="min_frequency < max_frequency"):
        synthetic.irregular_oscillator_example(0, min_frequency=1.0, max_frequency=0.5)


def test_registry_unknown_name_lists_known():
    with pytest.raises(ValueError, match=r"Known: .*synthetic/oscillator.*uea/EigenWorms"):
        registry.get_dataset("uea/Nope")
    assert "ppg_dalia" in registry.available_datasets()
