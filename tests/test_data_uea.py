"""UEA readers, checksums, the TFDS builder and the papers' protocol (real SCP1 files and tiny
generated fixtures)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from flax_linoss.data import checksums, paths, protocol, uea_formats
from flax_linoss.data.errors import (
    ChecksumError,
    DataError,
    DataNotFoundError,
    UnknownDatasetError,
)
from flax_linoss.data.uea_formats import UEAFormatError
from flax_linoss.data.uea_table import UEADatasetInfo, uea_dataset_info

SCP1 = "SelfRegulationSCP1"
REPO = Path(__file__).resolve().parents[1]
# Raw UEA files for the tests: $FLAX_LINOSS_TEST_DATA/uea, else ../shared/data/uea beside the
# repository (where CI keeps them).
UEA_ROOT = Path(os.environ.get("FLAX_LINOSS_TEST_DATA", REPO.parent / "shared" / "data")) / "uea"
# In CI (where $CI is set) the data must be there: the tests run and fail if it is not.
HAVE_SCP1 = (UEA_ROOT / SCP1 / f"{SCP1}Dimension1_TRAIN.arff").exists() or bool(
    os.environ.get("CI")
)
needs_scp1 = pytest.mark.skipif(
    not HAVE_SCP1,
    reason=f"real UEA data absent: expected {UEA_ROOT / SCP1}/ ($FLAX_LINOSS_TEST_DATA/uea or "
    "../shared/data/uea beside the repository)",
)


@pytest.fixture(autouse=True)
def _own_data_dir(tmp_path, monkeypatch):
    """Nothing here may prepare into the user's data directory."""
    monkeypatch.setenv(paths.ENV_VAR, str(tmp_path / "default_data_dir"))


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


def make_tiny(root: Path, writer=write_arff_dims, seed=0) -> Path:
    folder = root / TINY.name
    folder.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr, x_te, y_te = _tiny_arrays(seed)
    writer(folder, TINY.name, x_tr, y_tr, TINY.class_names, "TRAIN")
    writer(folder, TINY.name, x_te, y_te, TINY.class_names, "TEST")
    return folder


def _sums(folder: Path, **digests):
    (folder / "SHA256SUMS").write_text("".join(f"{d}  {n}\n" for n, d in digests.items()))


# ----------------------------------------------------------------------------- parsers


@pytest.mark.parametrize("writer", [write_arff_dims, write_arff_relational, write_ts])
def test_tiny_formats_round_trip(tmp_path, writer):
    make_tiny(tmp_path, writer)
    x_tr, y_tr, x_te, y_te = _tiny_arrays()
    for split, x, y in (("TRAIN", x_tr, y_tr), ("TEST", x_te, y_te)):
        d = uea_formats.read_uea_split(tmp_path, TINY.name, split, expected=TINY)
        assert d.x.dtype == np.float32 and d.labels.dtype == np.int32
        np.testing.assert_array_equal(d.x, x.astype(np.float32))
        np.testing.assert_array_equal(d.labels, y)
        assert d.class_names == ("down", "up")


def _tiny_with(tmp_path, writer, edit):
    """The tiny dataset written by ``writer`` with the TRAIN file's text passed through
    ``edit``; returns the edited file."""
    folder = make_tiny(tmp_path, writer)
    f = next(folder.glob("Tiny*_TRAIN.*"))
    f.write_text(edit(f.read_text()))
    return f


@pytest.mark.parametrize(
    ("header", "value"), [("dimensions", "six"), ("seriesLength", "abc"), ("dimensions", "0")]
)
def test_ts_header_numbers_that_do_not_read_are_data_errors(tmp_path, header, value):
    f = _tiny_with(tmp_path, write_ts, lambda t: re.sub(rf"@{header} \w+", f"@{header} {value}", t))
    with pytest.raises(UEAFormatError, match=rf"{f.name}:\d+: @{header} must be a positive whole"):
        uea_formats.read_uea_split(tmp_path, TINY.name, "TRAIN")


@pytest.mark.parametrize("writer", [write_arff_dims, write_arff_relational, write_ts])
def test_missing_values_are_refused_with_how_many_and_where(tmp_path, writer):
    folder = tmp_path / TINY.name
    folder.mkdir()
    x_tr, y_tr, x_te, y_te = _tiny_arrays()
    x_tr[1, 2, 0] = x_tr[1, 3, 0] = x_tr[3, 0, 0] = np.nan  # '?' in the files
    writer(folder, TINY.name, x_tr, y_tr, TINY.class_names, "TRAIN")
    writer(folder, TINY.name, x_te, y_te, TINY.class_names, "TEST")
    f = next(folder.glob("Tiny*_TRAIN.*"))
    line = 1 + next(i for i, s in enumerate(f.read_text().splitlines()) if "?" in s)
    with pytest.raises(UEAFormatError) as e:
        uea_formats.read_uea_split(tmp_path, TINY.name, "TRAIN")
    msg = str(e.value)
    assert f"{f}: 3 missing values ('?') in 2 series, the first at line {line}" in msg, msg
    assert "step 3" in msg and "missing=" in msg and "\n" not in msg
    # Opting in keeps them as NaN for a documented treatment (uea_splits' `missing`).
    d = uea_formats.read_uea_split(tmp_path, TINY.name, "TRAIN", missing="nan")
    assert np.isnan(d.x[1, 2, 0]) and np.isnan(d.x).sum() == 3
    uea_formats.read_uea_split(tmp_path, TINY.name, "TEST")  # TEST has none


@pytest.mark.parametrize("writer", [write_arff_dims, write_arff_relational, write_ts])
@pytest.mark.parametrize(
    ("token", "why"),
    [("NaN", "not a finite number"), ("-inf", "not a finite number"), ("1e39", "float32")],
)
def test_non_finite_and_out_of_range_values_are_refused(tmp_path, writer, token, why):
    def edit(text):
        lines = text.splitlines()
        row = lines.index("@data") + 2  # the second series
        lines[row] = re.sub(r"(-?\d+\.\d+)(?=,)", token, lines[row], count=1)
        return "\n".join(lines) + "\n"

    f = _tiny_with(tmp_path, writer, edit)
    n = 1 + f.read_text().splitlines().index("@data") + 2
    with pytest.raises(UEAFormatError, match=rf"{f.name}:{n}: .*{re.escape(token)}.*{why}"):
        uea_formats.read_uea_split(tmp_path, TINY.name, "TRAIN", missing="nan")


def test_uea_splits_refuse_missing_values_unless_a_treatment_is_chosen():
    x_tr, y_tr, x_te, y_te = _tiny_arrays()
    x_tr = np.concatenate([x_tr] * 5)  # 20 + 3 series: every split gets some
    y_tr = np.tile(y_tr, 5)
    x_tr = x_tr + np.arange(20)[:, None, None]  # distinct rows (the paper split deduplicates)
    x_tr[7, 1, 1] = np.nan
    data = (x_tr, y_tr, x_te, y_te)
    with pytest.raises(DataError, match=r"1 missing value .*TRAIN series 8, step 2, channel 2"):
        protocol.uea_splits(data, seed=0)
    with pytest.raises(DataError, match="missing must be one of"):
        protocol.uea_splits(data, seed=0, missing="drop")
    for normalise in (False, True):
        filled = protocol.uea_splits(data, seed=0, missing="fill", normalise=normalise)
        masked = protocol.uea_splits(
            data, seed=0, missing="mask", normalise=normalise, add_time=True, fill_value=-1.0
        )
        for k in ("train", "val", "test"):
            assert np.isfinite(filled[k][0]).all() and np.isfinite(masked[k][0]).all()
            assert filled[k][0].shape[-1] == 2 and masked[k][0].shape[-1] == 1 + 2 + 2
        x = np.concatenate([filled[k][0] for k in filled])
        xm = np.concatenate([masked[k][0] for k in masked])
        assert (x == 0).sum() == 1 and (xm[..., 1:3] == -1).sum() == 1
        assert (xm[..., 3:] == 0).sum() == 1 and set(np.unique(xm[..., 3:])) == {0.0, 1.0}
        # The mask's zero sits where the fill went, in the channel of the missing value.
        assert np.argwhere(xm[..., 4] == 0).tolist() == np.argwhere(xm[..., 2] == -1).tolist()


def test_truncated_arff_names_file_and_line(tmp_path):
    folder = make_tiny(tmp_path)
    f = folder / "TinyDimension2_TEST.arff"
    text = f.read_text()
    f.write_text(text[: len(text) - 25])  # cut inside the last row
    n_lines = len(f.read_text().splitlines())
    with pytest.raises(UEAFormatError) as e:
        uea_formats.read_uea_split(tmp_path, TINY.name, "TEST")
    assert str(f) in str(e.value) and f":{n_lines}:" in str(e.value)
    assert isinstance(e.value, DataError)


def test_corrupt_number_names_file_and_line(tmp_path):
    folder = make_tiny(tmp_path, write_ts)
    f = folder / "Tiny_TRAIN.ts"
    lines = f.read_text().splitlines()
    lines[10] = lines[10].replace(",", ",x1.5", 1)  # second data row
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(UEAFormatError, match=r"Tiny_TRAIN\.ts:11: cannot parse numbers"):
        uea_formats.read_uea_split(tmp_path, TINY.name, "TRAIN")


def test_file_with_rows_missing_at_end_is_rejected(tmp_path):
    folder = make_tiny(tmp_path)
    f = folder / "TinyDimension1_TRAIN.arff"
    f.write_text("\n".join(f.read_text().splitlines()[:-1]) + "\n")  # drop a whole row
    with pytest.raises(UEAFormatError, match=r"TinyDimension2_TRAIN\.arff: has 4 rows"):
        uea_formats.read_uea_split(tmp_path, TINY.name, "TRAIN")


def test_shorter_channel_file_is_refused_not_padded(tmp_path):
    # Dimension 2 holds 4 of the 5 steps in a well-formed file: a whole channel is short.
    folder = make_tiny(tmp_path)
    x_tr, y_tr, _, _ = _tiny_arrays()
    write_arff_dims(folder, "Short", x_tr[:, :4], y_tr, TINY.class_names, "TRAIN")
    (folder / "ShortDimension2_TRAIN.arff").replace(folder / "TinyDimension2_TRAIN.arff")
    for f in folder.glob("Short*"):
        f.unlink()
    with pytest.raises(UEAFormatError, match=r"TinyDimension2_TRAIN\.arff: series have 4 values"):
        uea_formats.read_uea_split(tmp_path, TINY.name, "TRAIN", expected=TINY)
    with pytest.raises(UEAFormatError, match="shorter"):
        uea_formats.read_uea_split(tmp_path, TINY.name, "TRAIN")
    # Declared variable-length, the same files are padded with NaN.
    d = uea_formats.read_uea_split(tmp_path, TINY.name, "TRAIN", equal_length=False)
    assert np.isnan(d.x[:, 4, 1]).all() and not np.isnan(d.x[:, :, 0]).any()


@pytest.mark.parametrize("writer", [write_arff_relational, write_ts])
def test_shorter_channel_in_a_row_is_refused(tmp_path, writer):
    folder = tmp_path / TINY.name
    folder.mkdir()
    x_tr, y_tr, _, _ = _tiny_arrays()
    x_tr[2, 4, 1] = 777.25  # the third series' dimension 2 loses its last value below
    writer(folder, TINY.name, x_tr, y_tr, TINY.class_names, "TRAIN")
    writer(folder, TINY.name, x_tr, y_tr, TINY.class_names, "TEST")
    f = next(folder.glob("Tiny_TRAIN.*"))
    lines = f.read_text().splitlines()
    row = next(i for i, s in enumerate(lines) if "777.25" in s)
    lines[row] = lines[row].replace(",777.25", "")
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(UEAFormatError, match=rf"{f.name}:{row + 1}: dimension 2 has 4 values"):
        uea_formats.read_uea_split(tmp_path, TINY.name, "TRAIN", expected=TINY)


def test_missing_folder_says_what_and_where_in_one_line(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        uea_formats.read_uea_split(tmp_path / "nowhere", SCP1, "TRAIN")
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError) and "\n" not in msg
    assert "nowhere" in msg and f"{SCP1}Dimension1_TRAIN.arff" in msg
    assert f"{SCP1}_TRAIN.ts" in msg and "timeseriesclassification.com" in msg


def test_unknown_name_suggests_and_lists_known():
    with pytest.raises(UnknownDatasetError, match=r"did you mean [^)]*SelfRegulationSCP1") as e:
        uea_dataset_info("SelfRegulationSCP")
    assert "Known: " in str(e.value) and "EigenWorms" in str(e.value)


# ----------------------------------------------------------------------------- checksums


def test_checksum_mismatch_names_file(tmp_path):
    folder = make_tiny(tmp_path)
    good = checksums.sha256_file(folder / "TinyDimension1_TRAIN.arff")
    _sums(folder, TinyDimension1_TRAIN_arff=good)
    (folder / "SHA256SUMS").write_text(
        f"{good}  TinyDimension1_TRAIN.arff\n{'0' * 64}  TinyDimension2_TRAIN.arff\n"
    )
    with pytest.raises(ChecksumError, match=r"TinyDimension2_TRAIN\.arff"):
        uea_formats.read_uea_split(tmp_path, TINY.name, "TRAIN")
    # Unverified reading still works, and TEST files are not listed.
    uea_formats.read_uea_split(tmp_path, TINY.name, "TRAIN", verify=False)
    uea_formats.read_uea_split(tmp_path, TINY.name, "TEST")


def test_wrong_list_for_an_intact_file_says_the_list_is_wrong(tmp_path, monkeypatch):
    folder = make_tiny(tmp_path)
    f = folder / "TinyDimension1_TRAIN.arff"
    true = checksums.sha256_file(f)
    monkeypatch.setitem(checksums.KNOWN_SHA256, f.name, true)  # the archive's digest
    (folder / "SHA256SUMS").write_text(f"# copied by hand\n{'1' * 64}  {f.name}\n")
    with pytest.raises(ChecksumError) as e:
        uea_formats.read_uea_split(tmp_path, TINY.name, "TRAIN")
    msg = str(e.value)
    assert "SHA256SUMS:2" in msg and "the file is intact and the list is wrong" in msg


def test_changed_file_with_a_regenerated_list_is_refused(tmp_path, monkeypatch):
    folder = make_tiny(tmp_path)
    f = folder / "TinyDimension1_TRAIN.arff"
    monkeypatch.setitem(checksums.KNOWN_SHA256, f.name, checksums.sha256_file(f))
    f.write_text(f.read_text().replace("@data", "% edited\n@data"))
    (folder / "SHA256SUMS").write_text(f"{checksums.sha256_file(f)}  {f.name}\n")
    with pytest.raises(ChecksumError, match=r"is not the archive's file.*written from the changed"):
        uea_formats.read_uea_split(tmp_path, TINY.name, "TRAIN")


def test_list_mismatch_without_known_digest_tells_broken_file_from_wrong_line(tmp_path):
    folder = make_tiny(tmp_path)
    f = folder / "TinyDimension1_TRAIN.arff"
    (folder / "SHA256SUMS").write_text(f"{'2' * 64}  {f.name}\n")
    with pytest.raises(ChecksumError, match=r"reads as a complete, well-formed file.*list is"):
        uea_formats.read_uea_split(tmp_path, TINY.name, "TRAIN")
    f.write_text(f.read_text()[:-20])  # now really broken
    with pytest.raises(ChecksumError, match=r"is corrupt.*does not read"):
        uea_formats.read_uea_split(tmp_path, TINY.name, "TRAIN")


@needs_scp1
def test_scp1_wrong_list_line_is_reported_as_the_list(tmp_path):
    copy = tmp_path / SCP1
    shutil.copytree(UEA_ROOT / SCP1, copy)
    os.chmod(copy, 0o755)
    sums = copy / "SHA256SUMS"
    os.chmod(sums, 0o644)
    lines = sums.read_text().splitlines()
    lines[3] = "0" * 64 + lines[3][64:]  # the 4th file's digest, wrong
    sums.write_text("\n".join(lines) + "\n")
    name = lines[3].split()[-1]
    with pytest.raises(ChecksumError, match=rf"lists SHA-256 0+ for {name}.*list is wrong"):
        protocol.load_uea_arrays(SCP1, tmp_path)


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
    digests = checksums.verify_files(files)
    assert digests == {f.name: checksums.KNOWN_SHA256[f.name] for f in files}
    assert len(digests) == 12


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
    with pytest.raises(DataError, match="prng"):
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
    # The raw files' digests are stored with the prepared data.
    files = sorted((UEA_ROOT / SCP1).glob("*.arff"))
    assert b.raw_sha256() == {f.name: checksums.KNOWN_SHA256[f.name] for f in files}


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
    with pytest.raises(DataNotFoundError, match=r"absent.*Tiny_TRAIN\.ts") as e:
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


def test_tfds_prepared_copy_keeps_missing_values_for_get_dataset_to_refuse(tmp_path):
    from flax_linoss.data import uea

    folder = tmp_path / "manual" / TINY.name
    folder.mkdir(parents=True)
    x_tr, y_tr, x_te, y_te = _tiny_arrays()
    x_te[2, 4, 1] = np.nan
    write_ts(folder, TINY.name, x_tr, y_tr, TINY.class_names, "TRAIN")
    write_ts(folder, TINY.name, x_te, y_te, TINY.class_names, "TEST")
    b = _tiny_builder(tmp_path / "tfds")
    _prepare(b, tmp_path / "manual")  # preparing converts; '?' is stored as NaN
    arrays = uea.uea_arrays(b)
    assert np.isnan(arrays[2][2, 4, 1]) and np.isnan(arrays[2]).sum() == 1
    with pytest.raises(DataError, match=r"uea/Tiny has 1 missing value .*TEST series 3, step 5"):
        protocol.check_missing(arrays, "error", what="uea/Tiny")
    protocol.check_missing(arrays, "fill")


def test_preparing_says_from_which_folder_and_draws_no_bars_off_a_terminal(tmp_path, capsys):
    from flax_linoss.data import uea

    folder = make_tiny(tmp_path / "raw", write_ts)
    uea.load(TINY, root=tmp_path / "raw", data_dir=tmp_path / "data")
    out, err = capsys.readouterr()
    assert f"Preparing uea/Tiny from {folder}\n" in out, out
    assert f"Prepared uea/Tiny in {tmp_path / 'data' / 'uea' / 'Tiny'}" in out
    assert "Downloading and preparing" not in out and "Unknown size" not in out
    assert "\x1b[" not in out + err and "\r" not in out + err, err  # no progress bars in a log


def test_tfds_unknown_config_suggests(tmp_path):
    from flax_linoss.data import uea

    with pytest.raises(UnknownDatasetError, match=r"did you mean EigenWorms.*Known: "):
        uea.prepare("EigenWorm", tmp_path)


def test_tfds_wrong_class_names_rejected(tmp_path):
    manual = tmp_path / "manual"
    folder = make_tiny(manual, write_arff_relational)
    for f in folder.glob("*.arff"):
        f.write_text(f.read_text().replace("{down,up}", "{down,up,flat}"))
    with pytest.raises(UEAFormatError, match="classes"):
        _prepare(_tiny_builder(tmp_path / "tfds"), manual)
    shutil.rmtree(tmp_path / "tfds", ignore_errors=True)


def _train_x(builder):
    src = builder.as_data_source()["train"]
    return np.stack([r["series"] for r in src.__getitems__(list(range(len(src))))])


def test_raw_files_changed_after_preparing_are_noticed(tmp_path):
    from flax_linoss.data import uea

    manual = tmp_path / "manual"
    folder = make_tiny(manual)
    data_dir = tmp_path / "data"
    b = uea.load(TINY, root=manual, data_dir=data_dir)
    assert b.raw_sha256() == {
        f.name: checksums.sha256_file(f) for f in uea_formats.dataset_files(manual, "Tiny")
    }
    first = _train_x(b)

    # Repairing / changing a raw file (still valid): the next load prepares again from it.
    f = folder / "TinyDimension2_TRAIN.arff"
    lines = f.read_text().splitlines()
    lines[-1] = "9.5," + lines[-1].split(",", 1)[1]  # last TRAIN series, dimension 2, step 0
    f.write_text("\n".join(lines) + "\n")
    again = uea.load(TINY, root=manual, data_dir=data_dir)
    x = _train_x(again)
    assert x[3, 0, 1] == 9.5
    np.testing.assert_array_equal(
        np.delete(x.reshape(-1), 3 * 10 + 1), np.delete(first.reshape(-1), 3 * 10 + 1)
    )
    assert again.raw_sha256()[f.name] == checksums.sha256_file(f)
    assert not list((data_dir / "uea" / "Tiny").glob("incomplete.*"))

    # A change that breaks a file: refused, and the prepared copy stays as it was.
    f.write_text(f.read_text()[:-30])
    with pytest.raises(UEAFormatError, match=r"TinyDimension2_TRAIN\.arff"):
        uea.load(TINY, root=manual, data_dir=data_dir)
    kept = _tiny_builder(data_dir)
    np.testing.assert_array_equal(_train_x(kept), x)
    # Without raw files at hand the prepared copy is used as it is.
    np.testing.assert_array_equal(_train_x(uea.load(TINY, data_dir=data_dir)), x)


def test_interrupted_preparations_are_cleaned_up(tmp_path):
    from flax_linoss.data import uea

    manual = tmp_path / "manual"
    make_tiny(manual)
    dataset_folder = tmp_path / "data" / "uea" / "Tiny"
    # What a killed preparation leaves: TFDS's unfinished version folder (and ours).
    for left in ("incomplete.K1LLED_1.1.0", "incomplete.0123abcd_reprepare"):
        (dataset_folder / left / "uea-train.array_record-00000-of-00001").parent.mkdir(parents=True)
        (dataset_folder / left / "uea-train.array_record-00000-of-00001").write_bytes(b"x")
    uea.load(TINY, root=manual, data_dir=tmp_path / "data")
    assert sorted(p.name for p in dataset_folder.iterdir() if not p.name.startswith(".")) == [
        "1.1.0"
    ]
    # Also when the dataset is already prepared.
    (dataset_folder / "incomplete.AGAIN1_1.1.0").mkdir()
    uea.load(TINY, data_dir=tmp_path / "data")
    assert not list(dataset_folder.glob("incomplete.*"))


def test_data_directory_rule(tmp_path, monkeypatch):
    monkeypatch.delenv(paths.ENV_VAR)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds_default"))
    assert paths.data_dir() == tmp_path / "tfds_default"
    monkeypatch.delenv("TFDS_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert paths.data_dir() == tmp_path / "home" / "tensorflow_datasets"
    monkeypatch.setenv(paths.ENV_VAR, str(tmp_path / "mine"))
    assert paths.data_dir() == tmp_path / "mine" == paths.data_dir("")
    assert paths.data_dir(tmp_path / "given") == tmp_path / "given"
    assert paths.manual_dir() == tmp_path / "mine" / "downloads" / "manual"


def test_no_path_refers_to_the_repository_layout():
    import flax_linoss.data as fd

    package = Path(fd.__file__).parent
    for f in package.glob("*.py"):
        text = f.read_text()
        for token in ('"shared"', "shared/", ".parents["):
            assert token not in text, (f, token)


def test_raw_files_in_the_default_manual_folder_are_found(tmp_path):
    from flax_linoss.data import uea

    data_dir = Path(os.environ[paths.ENV_VAR])
    make_tiny(data_dir / "downloads" / "manual" / "uea")
    b = uea.load(TINY)  # no root, no data_dir: the documented defaults
    assert Path(b.data_dir) == data_dir / "uea" / "Tiny" / "1.1.0"
    assert len(b.as_data_source()["test"]) == 3


def test_missing_raw_files_download_then_say_where_to_put_them(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    from flax_linoss.data import builders, uea

    fetched = make_tiny(tmp_path / "extracted")
    urls = []

    def download_and_extract(self, url):
        urls.append(url)
        return os.fspath(fetched)

    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", download_and_extract)
    monkeypatch.setattr(builders, "check_reachable", lambda url: None)
    b = uea.load(TINY, data_dir=tmp_path / "d1")
    assert urls == ["https://www.timeseriesclassification.com/aeon-toolkit/Tiny.zip"]
    assert len(b.as_data_source()["train"]) == 4

    def offline(url):
        raise ConnectionError("no network")

    monkeypatch.setattr(builders, "check_reachable", offline)
    with pytest.raises(DataNotFoundError) as e:
        uea.load(TINY, data_dir=tmp_path / "d2")
    msg = str(e.value)
    assert "d2/downloads/manual" in msg and "Downloading them failed too" in msg
    assert "no network" in msg and "\n" not in msg
    assert len(urls) == 1  # failed before TFDS's downloader and its minutes of retries
    # A folder named by the user must hold the files: no download then.
    urls.clear()
    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", download_and_extract)
    with pytest.raises(DataNotFoundError, match="does not exist"):
        uea.load(TINY, root=tmp_path / "typo", data_dir=tmp_path / "d3")
    assert urls == []


def test_unreachable_host_fails_at_once():
    import socket
    import time

    from flax_linoss.data import builders

    with socket.socket() as s:  # a local port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(OSError):
        builders.check_reachable(f"http://127.0.0.1:{port}/x.zip", timeout=5)
    assert time.monotonic() - start < 5


def test_data_dir_holding_raw_files_is_never_written(tmp_path, monkeypatch):
    from flax_linoss.data import uea

    # The layout earlier versions read $FLAX_LINOSS_DATA_DIR as: <dir>/uea/<Name>/*.arff.
    old = tmp_path / "old"
    folder = make_tiny(old / "uea")
    before = sorted(p.name for p in folder.iterdir())
    monkeypatch.setenv(paths.ENV_VAR, str(old))
    with pytest.raises(DataError, match=r"holds raw files.*downloads/manual"):
        uea.load(TINY, root=old / "uea")
    assert sorted(p.name for p in folder.iterdir()) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_data_dir_reads_but_does_not_prepare(tmp_path):
    from flax_linoss.data import uea

    manual = tmp_path / "manual"
    make_tiny(manual)
    data_dir = tmp_path / "data"
    uea.load(TINY, root=manual, data_dir=data_dir)
    for p in [data_dir, *data_dir.rglob("*")]:
        if p.is_dir():
            p.chmod(0o555)
    try:
        assert len(uea.load(TINY, root=manual, data_dir=data_dir).as_data_source()["test"]) == 3
        with pytest.raises(DataError, match="not writable"):
            uea.load(TINY, root=manual, data_dir=data_dir / "uea" / "fresh")
    finally:
        for p in [data_dir, *data_dir.rglob("*")]:
            if p.is_dir():
                p.chmod(0o755)


@needs_scp1
def test_grain_over_tfds_source_and_registry(scp1_tfds, scp1_arrays):
    from flax_linoss.data import get_dataset, loader

    src = scp1_tfds.as_data_source()["test"]
    it = loader.make_loader(
        src, batch_size=64, seed=1, drop_remainder=False, shard_index=0, shard_count=1
    )
    got = loader.batches_to_arrays(list(it))
    np.testing.assert_array_equal(np.sort(got["index"]), np.arange(293))
    np.testing.assert_array_equal(got["series"], scp1_arrays[2][got["index"]])

    # get_dataset reads the prepared TFDS copy; the split is the papers' protocol on the raw
    # archive, exactly.
    raw = protocol.uea_splits(SCP1, seed=2345, root=UEA_ROOT, add_time=True)
    via_tfds = get_dataset(
        f"uea/{SCP1}", seed=2345, add_time=True, root=UEA_ROOT, data_dir=scp1_tfds.data_dir_root
    )
    assert via_tfds.info["channels"] == 7 and via_tfds.info["num_classes"] == 2
    for k in ("train", "val", "test"):
        np.testing.assert_array_equal(raw[k][0], via_tfds[k].arrays["series"])
        np.testing.assert_array_equal(raw[k][1], via_tfds[k].arrays["label"])
    assert [len(via_tfds[k]) for k in ("train", "val", "test")] == [392, 84, 85]
    # "" means the default, as configs write it; the prepared copy is found without raw files.
    again = get_dataset(f"uea/{SCP1}", seed=2345, root="", data_dir=scp1_tfds.data_dir_root)
    np.testing.assert_array_equal(again["test"].arrays["series"], raw["test"][0][..., 1:])


def test_get_dataset_unknown_name_and_option_suggest():
    from flax_linoss.data import get_dataset

    with pytest.raises(UnknownDatasetError, match=r"did you mean [^)]*uea/SelfRegulationSCP1"):
        get_dataset("uea/SelfRegulationSCP", seed=0)
    with pytest.raises(UnknownDatasetError, match=r"no option 'rot' \(did you mean root\?\)"):
        get_dataset(f"uea/{SCP1}", seed=0, rot="/data")


def test_drop_fraction_keeps_the_split_and_returns_the_kept_times():
    # The Neural-CDE protocol on small arrays: int(f L) steps of every series removed at
    # random (seeded, per series), after the split; the kept steps' original indices returned.
    rng = np.random.default_rng(0)
    x_tr, x_te = rng.normal(size=(30, 40, 3)), rng.normal(size=(12, 40, 3))
    y_tr, y_te = rng.integers(0, 2, 30), rng.integers(0, 2, 12)
    arrays = (x_tr, y_tr, x_te, y_te)
    full = protocol.uea_splits(arrays, seed=5)
    half = protocol.uea_splits(arrays, seed=5, drop_fraction=0.5, add_time=True)
    again = protocol.uea_splits(arrays, seed=5, drop_fraction=0.5, add_time=True)
    for k, (x, y) in full.items():
        xs, ys, t = half[k]
        np.testing.assert_array_equal(ys, y)  # the split is unchanged
        assert xs.shape == (len(x), 20, 4) and t.shape == (len(x), 20)
        assert np.all(np.diff(t, axis=1) > 0) and t.min() >= 0 and t.max() <= 39
        kept = np.take_along_axis(x, t.astype(int)[..., None], axis=1)
        np.testing.assert_array_equal(xs[..., 1:], kept)  # the kept values, in order
        np.testing.assert_allclose(xs[..., 0], t / 20)  # the time channel: their times
        np.testing.assert_array_equal(again[k][2], t)  # seeded
        assert len({r.tobytes() for r in t}) > 1  # each series its own steps
    other = protocol.uea_splits(arrays, seed=5, drop_fraction=0.5, drop_seed=1)
    assert not np.array_equal(other["train"][2], half["train"][2])
    assert protocol.uea_splits(arrays, seed=5, drop_fraction=0.3)["test"][0].shape[1] == 28
    with pytest.raises(DataError, match=r"drop_fraction must be in \[0, 1\)"):
        protocol.uea_splits(arrays, seed=5, drop_fraction=1.0)
