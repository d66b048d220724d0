"""PPG-DaLiA preprocessing, safe unpickling and TFDS builder on generated files with the real
layout."""

from __future__ import annotations

import itertools
import os
import pickle

import numpy as np
import pytest

from flax_linoss.data import checksums, paths, ppg
from flax_linoss.data.errors import ChecksumError, DataFormatError, UnsafePickleError
from flax_linoss.data.ppg import PpgConfig


@pytest.fixture(autouse=True)
def _own_data_dir(tmp_path, monkeypatch):
    """Nothing here may prepare into the user's data directory."""
    monkeypatch.setenv(paths.ENV_VAR, str(tmp_path / "default_data_dir"))


def fake_subject(seconds: int, seed: int) -> dict:
    """A subject record shaped like PPG_FieldStudy/S{k}/S{k}.pkl (64 Hz BVP, 32 Hz ACC...)."""
    rng = np.random.default_rng(seed)
    n_labels = (seconds - 8) // 2 + 1  # one per 2 s over 8 s windows, as in the dataset
    return {
        "signal": {
            "wrist": {
                "ACC": rng.normal(size=(32 * seconds, 3)) * 20,
                "BVP": rng.normal(size=(64 * seconds, 1)) * 50,
                "EDA": rng.uniform(0, 5, size=(4 * seconds, 1)),
                "TEMP": rng.uniform(30, 35, size=(4 * seconds, 1)),
            },
            "chest": {},
        },
        "label": rng.uniform(50, 150, size=n_labels),
        "subject": f"S{seed}",
    }


def write_subjects(root, subjects, seconds, protocol=2):
    # Protocol 2, as the real (Python 2) files; numpy scalars inside, as the real records.
    for s in subjects:
        d = root / "PPG_FieldStudy" / f"S{s}"
        d.mkdir(parents=True)
        record = fake_subject(seconds, s)
        record["questionnaire"] = {"AGE": np.int64(30 + s), "WEIGHT": np.float64(70.5)}
        with open(d / f"S{s}.pkl", "wb") as f:
            pickle.dump(record, f, protocol=protocol)


def test_preprocess_channels_scaling_and_label_alignment():
    data = fake_subject(200, 1)
    x, lab = ppg.preprocess_subject(data)
    assert x.shape == (64 * 200, 6) and x.dtype == np.float32
    assert len(lab) * 128 == len(x)  # 3 prepended labels align labels with 128-step slots
    acc = data["signal"]["wrist"]["ACC"]
    np.testing.assert_allclose(x[0::2, :3], x[1::2, :3])  # ACC 32 Hz repeated twice
    lo, hi = acc.min(), acc.max()
    np.testing.assert_allclose(x[::2, :3], 2 * (acc - lo) / (hi - lo) - 1, atol=1e-6)
    eda = data["signal"]["wrist"]["EDA"][:, 0]
    np.testing.assert_allclose(x[::16, 4], 2 * (eda - eda.min()) / np.ptp(eda) - 1, atol=1e-6)
    assert (x[16:32, 5] == x[16, 5]).all()  # TEMP repeated 16 times
    for c in (3, 4, 5):  # each signal spans [-1, 1]
        assert x[:, c].min() == pytest.approx(-1) and x[:, c].max() == pytest.approx(1)
    assert lab.min() == pytest.approx(-1) and lab.max() == pytest.approx(1)
    assert lab[0] == lab[1] == lab[2] == lab[3]


def test_papers_windows_on_a_full_size_subject():
    data = fake_subject(5300, 2)  # about 1.5 h: every block holds a 49,920-step window
    cfg = PpgConfig()
    x, lab = ppg.preprocess_subject(data)
    out = ppg.subject_windows(data, 2, cfg)
    variant = ppg.split_variant(0, 2)
    blocks = ppg.split_blocks(len(x), variant)
    for split, (xw, yw) in out.items():
        assert xw.shape[1:] == (49920, 6) and yw.shape[1:] == (390,)
        assert len(xw) == len(yw) >= 1
        s, e = blocks[split]
        start = -(-s // 128) * 128
        for k in (0, len(xw) - 1):
            a = start + k * 4992
            assert s <= a and a + 49920 <= e  # inside its block: no leakage across splits
            np.testing.assert_array_equal(xw[k], x[a : a + 49920])
            np.testing.assert_array_equal(yw[k], lab[a // 128 : a // 128 + 390])
        # Every full window of the block is used (nothing dropped but the short tail).
        assert len(xw) == (e - start - 49920) // 4992 + 1
    assert len(out["train"][0]) == 38  # int(0.7 * 339200) = 237440 steps


def test_split_order_is_seeded_and_covers_all_six_orders():
    v = [ppg.split_variant(0, s) for s in range(1, 16)]
    assert v == [ppg.split_variant(0, s) for s in range(1, 16)]
    assert v != [ppg.split_variant(1, s) for s in range(1, 16)]
    assert {ppg.split_variant(seed, 1) for seed in range(60)} == set(range(6))
    for variant in range(6):
        b = ppg.split_blocks(1000, variant)
        spans = sorted(b.values())
        assert spans[0][0] == 0 and spans[-1][1] == 1000
        assert all(p[1] == q[0] for p, q in itertools.pairwise(spans))  # contiguous, disjoint
        assert b["train"][1] - b["train"][0] == 700


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"S3\.pkl(.|\n)*archive\.ics\.uci\.edu"):
        ppg.find_subject_file(tmp_path, 3)
    d = tmp_path / "S4"
    d.mkdir()
    (d / "S4.pkl").write_bytes(pickle.dumps(fake_subject(100, 4))[:200])
    with pytest.raises(DataFormatError, match=r"S4\.pkl: corrupt or truncated"):
        ppg.load_subject(ppg.find_subject_file(tmp_path, 4))
    with pytest.raises(ValueError, match="missing"):
        ppg.preprocess_subject({"signal": {"wrist": {}}})
    bad = fake_subject(100, 5)
    bad["signal"]["wrist"]["BVP"] = bad["signal"]["wrist"]["BVP"][:-200]
    with pytest.raises(ValueError, match="disagree"):
        ppg.preprocess_subject(bad)


def test_tfds_builder_on_tiny_subjects(tmp_path):
    manual = tmp_path / "manual"
    write_subjects(manual, (1, 2), seconds=200)
    cfg = PpgConfig(window=1280, stride=256, label_step=128, split_seed=3, subjects=(1, 2))
    ds = ppg.ppg_splits(data_dir=tmp_path / "tfds", manual_dir=manual, config=cfg)
    assert ds.info["target_shape"] == (10,) and ds.info["length"] == 1280
    for split in ("train", "val", "test"):
        want = [ppg.subject_windows(fake_subject(200, s), s, cfg)[split] for s in (1, 2)]
        n = sum(len(w[0]) for w in want)
        assert len(ds[split]) == n > 0
        rec = ds[split][0]
        assert rec["series"].shape == (1280, 6) and rec["series"].dtype == np.float32
        assert rec["label"].shape == (10,) and rec["subject"] == 1
        np.testing.assert_array_equal(rec["series"], want[0][0][0])
        np.testing.assert_array_equal(rec["label"], want[0][1][0])
    # Reading back again does not rebuild; a missing manual folder names the files.
    from flax_linoss.data import registry

    again = registry.get_dataset("ppg_dalia", seed=123, data_dir=tmp_path / "tfds", config=cfg)
    assert len(again["train"]) == len(ds["train"]) and again.info["task"] == "regression"
    np.testing.assert_array_equal(again["test"][1]["label"], ds["test"][1]["label"])
    with pytest.raises(FileNotFoundError, match=r"S1\.pkl"):
        ppg.prepare(tmp_path / "absent", tmp_path / "tfds2", cfg)
    assert not list((tmp_path / "tfds2").rglob("*.array_record*"))

    # The raw files' digests are stored; a changed subject file is prepared again (``root`` is
    # the same option as ``manual_dir``).
    files = [ppg.find_subject_file(manual, s) for s in (1, 2)]
    b = ppg.load(cfg, data_dir=tmp_path / "tfds")
    assert b.raw_sha256() == {f.name: checksums.sha256_file(f) for f in files}
    record = fake_subject(200, 2)
    record["label"] = record["label"] + 1000.0  # rescaled to [-1, 1] per subject: same windows
    record["signal"]["wrist"]["BVP"][:] = -record["signal"]["wrist"]["BVP"]
    files[1].write_bytes(pickle.dumps(record, protocol=2))
    changed = registry.get_dataset("ppg_dalia", data_dir=tmp_path / "tfds", root=manual, config=cfg)
    assert ppg.load(cfg, data_dir=tmp_path / "tfds").raw_sha256()["S2.pkl"] == (
        checksums.sha256_file(files[1])
    )
    last = len(changed["test"]) - 1  # subject 2's windows come last
    assert changed["test"][last]["subject"] == 2
    np.testing.assert_array_equal(
        changed["test"][last]["series"][:, 3], -ds["test"][last]["series"][:, 3]
    )


# ----------------------------------------------------------------------------- safe unpickling


class _Call:
    """Pickles as ``func(*args)``: what a malicious pickle does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_subject_pickles_of_every_protocol_load_as_written(tmp_path, protocol):
    write_subjects(tmp_path, (1,), seconds=40, protocol=protocol)
    got = ppg.load_subject(ppg.find_subject_file(tmp_path, 1))
    want = fake_subject(40, 1)
    np.testing.assert_array_equal(got["signal"]["wrist"]["BVP"], want["signal"]["wrist"]["BVP"])
    np.testing.assert_array_equal(got["label"], want["label"])
    assert got["questionnaire"] == {"AGE": 31, "WEIGHT": 70.5} and got["subject"] == "S1"
    assert isinstance(got["questionnaire"]["AGE"], np.int64)


def test_python2_numpy_names_are_allowed(tmp_path):
    # Pickles written by Python 2 / numpy 1 name numpy.core.multiarray, not numpy._core.
    data = pickle.dumps({"label": np.arange(3.0), "x": np.float32(1.5)}, protocol=2)
    data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray\n_reconstruct" in data
    (tmp_path / "S1.pkl").write_bytes(data)
    got = ppg.load_subject(tmp_path / "S1.pkl")
    np.testing.assert_array_equal(got["label"], np.arange(3.0))


@pytest.mark.parametrize(
    "payload",
    [
        lambda marker: _Call(os.system, f"touch {marker}"),
        lambda marker: _Call(eval, f"open({str(marker)!r}, 'w').close()"),
        lambda marker: {"signal": [_Call(exec, f"open({str(marker)!r}, 'w').close()")]},
        lambda marker: _Call(open, str(marker), "w"),
    ],
    ids=["os.system", "eval", "nested exec", "open"],
)
def test_pickle_that_calls_a_function_is_refused_and_never_run(tmp_path, payload):
    marker = tmp_path / "was_run"
    d = tmp_path / "PPG_FieldStudy" / "S1"
    d.mkdir(parents=True)
    (d / "S1.pkl").write_bytes(pickle.dumps(payload(marker), protocol=2))
    with pytest.raises(UnsafePickleError, match=r"S1\.pkl: refused to unpickle") as e:
        ppg.load_subject(d / "S1.pkl")
    assert "nothing from it was run" in str(e.value)
    assert not marker.exists()
    # The builder refuses it too, before writing anything.
    with pytest.raises(UnsafePickleError, match=r"S1\.pkl"):
        ppg.prepare(tmp_path, tmp_path / "tfds", PpgConfig(window=1280, stride=256, subjects=(1,)))
    assert not marker.exists()
    assert not list((tmp_path / "tfds").rglob("*.array_record*"))


def test_checksums_are_verified_before_unpickling(tmp_path, monkeypatch):
    write_subjects(tmp_path, (1, 2), seconds=40)
    f1 = ppg.find_subject_file(tmp_path, 1)
    good = checksums.sha256_file(f1)
    (f1.parent / "SHA256SUMS").write_text(f"{'3' * 64}  S1.pkl\n")
    with pytest.raises(ChecksumError, match=r"S1\.pkl.*reads as a complete, well-formed file"):
        ppg.load_subject(f1)
    # A known digest for the file: the intact file wins and the list is named as wrong.
    monkeypatch.setitem(checksums.KNOWN_SHA256, "S1.pkl", good)
    with pytest.raises(ChecksumError, match="the file is intact and the list is wrong"):
        ppg.load_subject(f1)
    # A tampered file never reaches the unpickler when its digest is known.
    (f1.parent / "SHA256SUMS").unlink()
    f1.write_bytes(pickle.dumps(_Call(os.system, f"touch {tmp_path / 'was_run'}"), protocol=2))
    with pytest.raises(ChecksumError, match=r"S1\.pkl is not the archive's file"):
        ppg.load_subject(f1)
    assert not (tmp_path / "was_run").exists()
