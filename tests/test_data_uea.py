"""UEA readers, the TFDS builder and the papers' protocol (real SCP1 files and tiny fixtures)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from flax_linoss.data import protocol, uea_files
from flax_linoss.data.uea_files import ChecksumError, UEADatasetInfo, UEAFormatError

SCP1 = "SelfRegulationSCP1"


def _data_dir() -> Path:
    env = os.environ.get("FLAX_LINOSS_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


UEA_ROOT = _data_dir() / "uea"
# In CI (where $CI is set) the data must be there: the tests run and fail if it is not.
HAVE_SCP1 = (UEA_ROOT / SCP1 / f"{SCP1}Dimension1_TRAIN.arff").exists() or bool(
    os.environ.get("CI")
)
needs_scp1 = pytest.mark.skipif(
    not HAVE_SCP1,
    reason=f"real UEA data absent: expected {UEA_ROOT / SCP1}/ (repo/../shared/data/uea or "
    "$FLAX_LINOSS_DATA_DIR/uea)",
)


# ----------------------------------------------------------------------------- tiny fixtures

TINY = UEADatasetInfo(
    "Tiny", channels=2, length=5, class_names=("down", "up"), num_train=4, num_test=3
)


def _tiny_arrays(seed=0):
    rng = np.random.default_rng(seed)
    x_tr = np.round(rng.normal(size=(4, 5, 2)), 3)
    x_te = np.round(rng.normal(size=(3, 5, 2)), 3)
    return x_tr, np.array([0, 1, 1, 0]), x_te, np.array([1, 0, 1])


def _fmt(v):
    return "?" if np.isnan(v) else repr(float(v))


def write_arff_dims(folder: Path, name, x, y, classes, split):
    for c in range(x.shape[2]):
        lines = [f"@relation {name}_channel_{c}", ""]
        lines += [f"@attribute channel_{c}_{t} numeric" for t in range(x.shape[1])]
        lines += [f"@attribute target {{{','.join(classes)}}}", "", "@data"]
        lines += [
            ",".join(_fmt(v) for v in x[i, :, c]) + f",{classes[y[i]]}" for i in range(len(x))
        ]
        (folder / f"{name}Dimension{c + 1}_{split}.arff").write_text("\n".join(lines) + "\n")


def write_arff_relational(folder: Path, name, x, y, classes, split):
    lines = [f"@relation {name}", "@attribute relationalAtt relational"]
    lines += [f"@attribute t{t} numeric" for t in range(x.shape[1])]
    lines += ["@end relationalAtt", f"@attribute target {{{','.join(classes)}}}", "@data"]
    for i in range(len(x)):
        dims = "\\n".join(",".join(_fmt(v) for v in x[i, :, c]) for c in range(x.shape[2]))
        lines.append(f"'{dims}',{classes[y[i]]}")
    (folder / f"{name}_{split}.arff").write_text("\n".join(lines) + "\n")


def write_ts(folder: Path, name, x, y, classes, split):
    lines = [
        f"@problemName {name}",
        "@timeStamps false",
        "@missing false",
        "@univariate false",
        f"@dimensions {x.shape[2]}",
        "@equalLength true",
        f"@seriesLength {x.shape[1]}",
        f"@classLabel true {' '.join(classes)}",
        "@data",
    ]
    for i in range(len(x)):
        dims = ":".join(",".join(_fmt(v) for v in x[i, :, c]) for c in range(x.shape[2]))
        lines.append(f"{dims}:{classes[y[i]]}")
    (folder / f"{name}_{split}.ts").write_text("\n".join(lines) + "\n")


def make_tiny(root: Path, writer=write_arff_dims) -> Path:
    folder = root / TINY.name
    folder.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr, x_te, y_te = _tiny_arrays()
    writer(folder, TINY.name, x_tr, y_tr, TINY.class_names, "TRAIN")
    writer(folder, TINY.name, x_te, y_te, TINY.class_names, "TEST")
    return folder


# ----------------------------------------------------------------------------- parsers


@pytest.mark.parametrize("writer", [write_arff_dims, write_arff_relational, write_ts])
def test_tiny_formats_round_trip(tmp_path, writer):
    make_tiny(tmp_path, writer)
    x_tr, y_tr, x_te, y_te = _tiny_arrays()
    for split, x, y in (("TRAIN", x_tr, y_tr), ("TEST", x_te, y_te)):
        d = uea_files.read_uea_split(tmp_path, TINY.name, split, expected=TINY)
        assert d.x.dtype == np.float32 and d.labels.dtype == np.int32
        np.testing.assert_array_equal(d.x, x.astype(np.float32))
        np.testing.assert_array_equal(d.labels, y)
        assert d.class_names == ("down", "up")


def test_missing_values_become_nan(tmp_path):
    folder = tmp_path / TINY.name
    folder.mkdir()
    x_tr, y_tr, _, _ = _tiny_arrays()
    x_tr[1, 2, 0] = np.nan
    write_ts(folder, TINY.name, x_tr, y_tr, TINY.class_names, "TRAIN")
    write_ts(folder, TINY.name, x_tr, y_tr, TINY.class_names, "TEST")
    d = uea_files.read_uea_split(tmp_path, TINY.name, "TRAIN")
    assert np.isnan(d.x[1, 2, 0]) and np.isnan(d.x).sum() == 1


def test_truncated_arff_names_file_and_line(tmp_path):
    folder = make_tiny(tmp_path)
    f = folder / "TinyDimension2_TEST.arff"
    text = f.read_text()
    f.write_text(text[: len(text) - 25])  # cut inside the last row
    n_lines = len(f.read_text().splitlines())
    with pytest.raises(UEAFormatError) as e:
        uea_files.read_uea_split(tmp_path, TINY.name, "TEST")
    assert str(f) in str(e.value) and f":{n_lines}:" in str(e.value)


def test_corrupt_number_names_file_and_line(tmp_path):
    folder = make_tiny(tmp_path, write_ts)
    f = folder / "Tiny_TRAIN.ts"
    lines = f.read_text().splitlines()
    lines[10] = lines[10].replace(",", ",x1.5", 1)  # second data row
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(UEAFormatError, match=r"Tiny_TRAIN\.ts:11: cannot parse numbers"):
        uea_files.read_uea_split(tmp_path, TINY.name, "TRAIN")


def test_file_with_rows_missing_at_end_is_rejected(tmp_path):
    folder = make_tiny(tmp_path)
    f = folder / "TinyDimension1_TRAIN.arff"
    f.write_text("\n".join(f.read_text().splitlines()[:-1]) + "\n")  # drop a whole row
    with pytest.raises(UEAFormatError, match=r"TinyDimension2_TRAIN\.arff: has 4 rows"):
        uea_files.read_uea_split(tmp_path, TINY.name, "TRAIN")


def test_checksum_mismatch_names_file(tmp_path):
    folder = make_tiny(tmp_path)
    good = uea_files.sha256_file(folder / "TinyDimension1_TRAIN.arff")
    (folder / "SHA256SUMS").write_text(
        f"{good}  TinyDimension1_TRAIN.arff\n{'0' * 64}  TinyDimension2_TRAIN.arff\n"
    )
    with pytest.raises(ChecksumError, match=r"TinyDimension2_TRAIN\.arff"):
        uea_files.read_uea_split(tmp_path, TINY.name, "TRAIN")
    # Unverified reading still works, and TEST files are not listed.
    uea_files.read_uea_split(tmp_path, TINY.name, "TRAIN", verify=False)
    uea_files.read_uea_split(tmp_path, TINY.name, "TEST")


def test_missing_folder_says_what_and_where(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        uea_files.read_uea_split(tmp_path / "nowhere", SCP1, "TRAIN")
    msg = str(e.value)
    assert "nowhere" in msg and f"{SCP1}Dimension1_TRAIN.arff" in msg
    assert f"{SCP1}_TRAIN.ts" in msg and "timeseriesclassification.com" in msg


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match=r"Known: .*SelfRegulationSCP1"):
        uea_files.uea_dataset_info("NoSuchSet")


# ----------------------------------------------------------------------------- real SCP1


@pytest.fixture(scope="module")
def scp1_arrays():
    return protocol.load_uea_arrays(SCP1, UEA_ROOT)


@needs_scp1
def test_scp1_raw(scp1_arrays):
    x_tr, y_tr, x_te, y_te, names = scp1_arrays
    assert x_tr.shape == (268, 896, 6) and x_te.shape == (293, 896, 6)
    assert x_tr.dtype == np.float32 and y_tr.dtype == np.int32
    assert names == ("negativity", "positivity")
    assert set(np.unique(y_tr)) == {0, 1} and set(np.unique(y_te)) == {0, 1}
    assert not np.isnan(x_tr).any()
    files = sorted((UEA_ROOT / SCP1).glob("*.arff"))
    assert uea_files.verify_checksums(files) == 12


def _row_keys(x):
    return {r.tobytes() for r in x}


@needs_scp1
def test_scp1_paper_protocol(scp1_arrays):
    x_tr, y_tr, x_te, y_te, _ = scp1_arrays
    s = protocol.uea_splits((x_tr, y_tr, x_te, y_te), seed=2345)
    assert {k: len(v[0]) for k, v in s.items()} == {"train": 392, "val": 84, "test": 85}
    keys = {k: _row_keys(v[0]) for k, v in s.items()}
    assert sum(len(k) for k in keys.values()) == 561
    assert not (
        keys["train"] & keys["val"] or keys["train"] & keys["test"] or keys["val"] & keys["test"]
    )
    allx = np.concatenate([x_tr, x_te])
    assert set().union(*keys.values()) == _row_keys(allx)
    # Labels follow their rows.
    label_of = {r.tobytes(): lab for r, lab in zip(allx, np.concatenate([y_tr, y_te]))}
    for x, y in s.values():
        assert all(label_of[r.tobytes()] == lab for r, lab in zip(x, y))
    # Same seed, same split; another seed, another split.
    again = protocol.uea_splits((x_tr, y_tr, x_te, y_te), seed=2345)
    for k in s:
        np.testing.assert_array_equal(s[k][0], again[k][0])
    other = protocol.uea_splits((x_tr, y_tr, x_te, y_te), seed=3456)
    assert _row_keys(other["test"][0]) != keys["test"]
    # No normalisation unless asked: values are the archive's.
    assert max(v[0].max() for v in s.values()) == allx.max()
    assert min(v[0].min() for v in s.values()) == allx.min()


@needs_scp1
def test_scp1_protocol_from_name_time_channel_and_normalise(scp1_arrays):
    s = protocol.uea_splits(SCP1, seed=2345, root=UEA_ROOT, add_time=True)
    x = s["val"][0]
    assert x.shape == (84, 896, 7)
    np.testing.assert_allclose(x[3, :, 0], np.arange(896) / 896, rtol=1e-6)
    plain = protocol.uea_splits(scp1_arrays[:4], seed=2345)
    np.testing.assert_array_equal(x[..., 1:], plain["val"][0])
    n = protocol.uea_splits(scp1_arrays[:4], seed=2345, add_time=True, normalise=True)
    tr = n["train"][0]
    np.testing.assert_allclose(tr[..., 1:].mean(axis=(0, 1)), 0, atol=1e-4)
    np.testing.assert_allclose(tr[..., 1:].std(axis=(0, 1)), 1, atol=1e-4)
    np.testing.assert_array_equal(tr[..., 0], s["train"][0][..., 0])


def test_paper_split_indices_rules():
    idx = protocol.paper_split_indices(561, 2345)
    assert [len(v) for v in idx.values()] == [392, 84, 85]
    allidx = np.concatenate(list(idx.values()))
    np.testing.assert_array_equal(np.sort(allidx), np.arange(561))
    cur = protocol.paper_split_indices(561, 2345, prng="current")
    assert not np.array_equal(cur["train"], idx["train"])  # the PRNG flag matters
    with pytest.raises(ValueError, match="prng"):
        protocol.paper_split_indices(10, 0, prng="new")


def test_deduplicate_sorts_and_keeps_first():
    x = np.array([[[2.0]], [[1.0]], [[2.0]], [[0.5]]])
    y = np.array([7, 8, 9, 6])
    xu, yu = protocol.deduplicate(x, y)
    np.testing.assert_array_equal(xu[:, 0, 0], [0.5, 1.0, 2.0])
    np.testing.assert_array_equal(yu, [6, 8, 7])


@needs_scp1
def test_scp1_original_split(scp1_arrays):
    x_tr, _, x_te, _, _ = scp1_arrays
    s = protocol.uea_splits(SCP1, seed=1, root=UEA_ROOT, split="original")
    assert len(s["train"][0]) + len(s["val"][0]) == 268 and len(s["val"][0]) == 40
    np.testing.assert_array_equal(s["test"][0], x_te)
    assert _row_keys(s["train"][0]) | _row_keys(s["val"][0]) == _row_keys(x_tr)


# ----------------------------------------------------------------------------- TFDS builder


@pytest.fixture(scope="module")
def scp1_tfds(tmp_path_factory):
    if not HAVE_SCP1:
        pytest.skip(f"real UEA data absent: expected {UEA_ROOT / SCP1}")
    from flax_linoss.data import uea

    data_dir = tmp_path_factory.mktemp("tfds")
    return uea.prepare(SCP1, UEA_ROOT, data_dir)


@needs_scp1
def test_scp1_tfds_array_record(scp1_tfds, scp1_arrays):
    import tensorflow_datasets as tfds

    b = scp1_tfds
    assert b.info.features["label"].names == ["negativity", "positivity"]
    assert {k: v.num_examples for k, v in b.info.splits.items()} == {"train": 268, "test": 293}
    src = b.as_data_source()
    ds = tfds.data_source(f"uea/{SCP1}", split="test", data_dir=os.fspath(b.data_dir_root))
    x_tr, y_tr, x_te, y_te, _ = scp1_arrays
    for split, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        assert len(src[split]) == len(x)
        for i in (0, 5, len(x) - 1):
            rec = src[split][i]
            assert rec["series"].dtype == np.float32 and rec["series"].shape == (896, 6)
            np.testing.assert_array_equal(rec["series"], x[i])
            assert rec["label"] == y[i]
    np.testing.assert_array_equal(ds[7]["series"], x_te[7])
    assert list(Path(b.data_dir).glob("*.array_record*"))


def _tiny_builder(data_dir, fmt="auto"):
    from flax_linoss.data import uea

    return uea.Uea(config=uea.UeaConfig(info=TINY, fmt=fmt), data_dir=os.fspath(data_dir))


def _prepare(builder, manual):
    import tensorflow_datasets as tfds

    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual))
    )


def test_tfds_tiny_prepare_and_failures_leave_nothing(tmp_path, monkeypatch):
    manual = tmp_path / "manual"
    folder = make_tiny(manual, write_ts)
    data_dir = tmp_path / "tfds"

    # Missing manual folder: says where to put which files.
    with pytest.raises(FileNotFoundError, match=r"absent(.|\n)*Tiny_TRAIN\.ts") as e:
        _prepare(_tiny_builder(data_dir), tmp_path / "absent")
    assert "timeseriesclassification.com" in str(e.value)

    # Corrupt TEST file: error names file and line, nothing is left that loads.
    good = (folder / "Tiny_TEST.ts").read_text()
    (folder / "Tiny_TEST.ts").write_text(good.replace("up\n", "u", 1))
    with pytest.raises(UEAFormatError, match=r"Tiny_TEST\.ts:\d+"):
        _prepare(_tiny_builder(data_dir), manual)
    _assert_not_prepared(data_dir)

    # A failure while writing (after some examples) also leaves nothing.
    (folder / "Tiny_TEST.ts").write_text(good)
    from flax_linoss.data import uea

    def failing(self, data):
        yield 0, {"series": data.x[0], "label": int(data.labels[0])}
        raise OSError("disk full")

    monkeypatch.setattr(uea.Uea, "_generate_examples", failing)
    with pytest.raises(OSError, match="disk full"):
        _prepare(_tiny_builder(data_dir), manual)
    _assert_not_prepared(data_dir)
    monkeypatch.undo()

    b = _tiny_builder(data_dir)
    _prepare(b, manual)
    src = _tiny_builder(data_dir).as_data_source()
    x_tr, y_tr, _, _ = _tiny_arrays()
    assert len(src["train"]) == 4 and len(src["test"]) == 3
    np.testing.assert_array_equal(src["train"][2]["series"], x_tr[2].astype(np.float32))
    assert src["train"][1]["label"] == y_tr[1]


def _assert_not_prepared(data_dir):
    b = _tiny_builder(data_dir)
    assert not b.is_prepared()
    assert not (Path(b.data_dir) / "dataset_info.json").exists()
    assert not Path(b.data_dir).exists() or not any(Path(b.data_dir).iterdir())
    assert not any(Path(b.data_dir_root).rglob("*.array_record*"))
    assert dict(b.as_data_source()) == {}  # no split that could be read as complete


def test_tfds_unknown_config_lists_known(tmp_path):
    from flax_linoss.data import uea

    with pytest.raises(ValueError, match=r"Known: .*EigenWorms"):
        uea.prepare("NoSuchSet", tmp_path)


def test_tfds_wrong_class_names_rejected(tmp_path):
    manual = tmp_path / "manual"
    folder = make_tiny(manual, write_arff_relational)
    for f in folder.glob("*.arff"):
        f.write_text(f.read_text().replace("{down,up}", "{down,up,flat}"))
    with pytest.raises(UEAFormatError, match="classes"):
        _prepare(_tiny_builder(tmp_path / "tfds"), manual)
    shutil.rmtree(tmp_path / "tfds", ignore_errors=True)


@needs_scp1
def test_grain_over_tfds_source_and_registry(scp1_tfds, scp1_arrays):
    from flax_linoss.data import loader, registry

    src = scp1_tfds.as_data_source()["test"]
    it = loader.make_loader(
        src, batch_size=64, seed=1, drop_remainder=False, shard_index=0, shard_count=1
    )
    got = loader.batches_to_arrays(list(it))
    np.testing.assert_array_equal(np.sort(got["index"]), np.arange(293))
    np.testing.assert_array_equal(got["series"], scp1_arrays[2][got["index"]])

    # The registry reads the same data from raw files or from the prepared TFDS copy.
    raw = registry.get_dataset(f"uea/{SCP1}", seed=2345, root=UEA_ROOT, add_time=True)
    via_tfds = registry.get_dataset(
        f"uea/{SCP1}", seed=2345, add_time=True, data_dir=scp1_tfds.data_dir_root
    )
    assert raw.info["channels"] == 7 and raw.info["num_classes"] == 2
    for k in ("train", "val", "test"):
        np.testing.assert_array_equal(raw[k].arrays["series"], via_tfds[k].arrays["series"])
        np.testing.assert_array_equal(raw[k].arrays["label"], via_tfds[k].arrays["label"])
    assert [len(raw[k]) for k in ("train", "val", "test")] == [392, 84, 85]
