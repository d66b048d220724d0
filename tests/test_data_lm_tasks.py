"""Token tasks for comparing sequence mixers (MQAR, selective copying, induction heads): each
task's defining property, determinism by seed, shapes, option checks, registry and loader."""

from __future__ import annotations

import numpy as np
import pytest

from flax_linoss.data import get_dataset, lm_tasks, make_loader
from flax_linoss.data.errors import DataError, UnknownDatasetError
from flax_linoss.data.lm_tasks import MQAR, Induction, SelectiveCopy
from flax_linoss.data.loader import ArraySource

SMALL = {
    "mqar": MQAR(vocab_size=64, seq_len=32, num_kv_pairs=4),
    "selective_copy": SelectiveCopy(vocab_size=10, seq_len=40, num_tokens_to_copy=6),
    "induction": Induction(vocab_size=12, seq_len=30),
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_items_shapes_padding_and_next_token_targets(name):
    task = SMALL[name]
    items = lm_tasks.generate(task, 50, seed=3)
    n, length = 50, task.seq_len
    assert items["inputs"].shape == items["targets"].shape == items["weights"].shape == (n, length)
    assert items["inputs"].dtype == items["targets"].dtype == np.int32
    assert items["weights"].dtype == np.float32
    assert set(np.unique(items["weights"])) <= {0.0, 1.0}
    x, y, w = items["inputs"], items["targets"], items["weights"]
    assert (x > 0).all() and (x < task.vocab_size).all()  # 0 is padding, never produced
    assert (y[w == 1] > 0).all() and (y < task.vocab_size).all()
    # Unscored positions predict the next input; the last one, if unscored, predicts padding.
    unscored = w[:, :-1] == 0
    np.testing.assert_array_equal(y[:, :-1][unscored], x[:, 1:][unscored])
    assert (y[:, -1][w[:, -1] == 0] == 0).all()
    assert task.info == {"task": "lm", "vocab_size": task.vocab_size, "length": length}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_deterministic_by_seed_and_item_by_item(name):
    task = SMALL[name]
    a = lm_tasks.generate(task, 12, seed=(5, 0))
    b = lm_tasks.generate(task, 12, seed=(5, 0))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    src = lm_tasks.TokenTaskSource(task, 3, seed=(5, 0))  # item i does not depend on N
    np.testing.assert_array_equal(src[2]["inputs"], a["inputs"][2])
    other = lm_tasks.generate(task, 12, seed=(5, 1))
    assert not np.array_equal(other["inputs"], a["inputs"])
    assert len({a["inputs"][i].tobytes() for i in range(12)}) == 12  # items differ


def test_mqar_every_query_is_scored_with_the_value_paired_with_its_key():
    task = MQAR(vocab_size=128, seq_len=64, num_kv_pairs=8)
    items = lm_tasks.generate(task, 100, seed=0)
    k, context = 8, 16
    for x, y, w in zip(items["inputs"], items["targets"], items["weights"]):
        keys, values = x[0:context:2], x[1:context:2]
        assert len(set(keys)) == k and len(set(values)) == k  # without replacement
        assert ((keys >= 1) & (keys < 64)).all() and ((values >= 64) & (values < 128)).all()
        scored = np.flatnonzero(w)
        assert len(scored) == k  # every key is queried once
        assert (scored >= context).all() and ((scored - context) % 2 == 0).all()
        pair = dict(zip(keys.tolist(), values.tolist()))
        assert sorted(x[scored].tolist()) == sorted(keys.tolist())
        for t in scored:
            assert y[t] == pair[int(x[t])]
    # With no room to spare (L = 4K) every even slot after the pairs holds a query.
    tight = lm_tasks.generate(MQAR(vocab_size=32, seq_len=16, num_kv_pairs=4), 5, seed=1)
    assert (np.flatnonzero(tight["weights"][0]) == [8, 10, 12, 14]).all()


def test_mqar_query_gaps_follow_the_power_law():
    def mean_gap(power_a):
        task = MQAR(vocab_size=512, seq_len=256, num_kv_pairs=4, power_a=power_a)
        w = lm_tasks.generate(task, 300, seed=2)["weights"]
        return ((np.nonzero(w)[1] - 8) / 2).mean()

    space = (256 - 8) // 2
    assert abs(mean_gap(1.0) - (space - 1) / 2) < 6  # a = 1: uniform gaps
    assert mean_gap(0.01) < 0.6 * mean_gap(1.0)  # Zoology's default favours short gaps


def test_selective_copy_copies_the_scattered_data_tokens_in_order():
    task = SMALL["selective_copy"]
    items = lm_tasks.generate(task, 100, seed=0)
    m, region = 6, 40 - 6
    for x, y, w in zip(items["inputs"], items["targets"], items["weights"]):
        assert (x[region:] == SelectiveCopy.MARKER).all()
        data = x[:region][x[:region] != SelectiveCopy.NOISE]
        assert len(data) == m and (data >= 3).all() and (x[:region] != SelectiveCopy.MARKER).all()
        np.testing.assert_array_equal(np.flatnonzero(w), np.arange(region, 40))
        np.testing.assert_array_equal(y[region:], data)  # in order, one per marker
    positions = [np.flatnonzero(x[:region] != 1) for x in items["inputs"]]
    assert len({p.tobytes() for p in positions}) > 90  # scattered, not fixed slots


def test_induction_recalls_the_token_after_the_first_trigger():
    task = SMALL["induction"]
    items = lm_tasks.generate(task, 200, seed=0)
    firsts = []
    for x, y, w in zip(items["inputs"], items["targets"], items["weights"]):
        triggers = np.flatnonzero(x == Induction.TRIGGER)
        assert len(triggers) == 2 and triggers[1] == 29 and triggers[0] <= 27
        assert np.flatnonzero(w).tolist() == [29]
        assert y[29] == x[triggers[0] + 1] >= 2
        firsts.append(triggers[0])
    assert min(firsts) == 0 and max(firsts) == 27  # anywhere that leaves a successor


def test_paper_defaults():
    assert MQAR().info == {"task": "lm", "vocab_size": 8192, "length": 64}
    assert (MQAR().num_kv_pairs, MQAR().power_a) == (8, 0.01)
    s = SelectiveCopy()
    assert (s.vocab_size - 3, s.seq_len, s.num_tokens_to_copy) == (14, 4096, 16)
    assert (Induction().vocab_size - 2, Induction().seq_len) == (15, 256)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: MQAR(seq_len=33), "even"),
        (lambda: MQAR(seq_len=32, num_kv_pairs=9), r"seq_len >= 4 \* num_kv_pairs = 36"),
        (lambda: MQAR(vocab_size=16, num_kv_pairs=8), "vocab_size >= 18"),
        (lambda: MQAR(vocab_size=64.0), "vocab_size must be an integer"),
        (lambda: MQAR(num_kv_pairs=True), "num_kv_pairs must be an integer"),
        (lambda: MQAR(power_a=0), "power_a must be > 0"),
        (lambda: SelectiveCopy(seq_len=20, num_tokens_to_copy=11), "seq_len must be >= 22"),
        (lambda: SelectiveCopy(vocab_size=3), "vocab_size must be >= 4"),
        (lambda: Induction(vocab_size=2), "vocab_size must be >= 3"),
        (lambda: Induction(seq_len=2), "seq_len must be >= 3"),
        (lambda: lm_tasks.TokenTaskSource(Induction(), 0), "number of examples must be >= 1"),
    ],
)
def test_options_are_checked(make, match):
    with pytest.raises(DataError, match=match):
        make()


def test_registry_and_loader_batch_token_items():
    ds = get_dataset(
        "synthetic/mqar", seed=1, num_train=10, num_val=3, num_test=3,
        vocab_size=64, seq_len=32, num_kv_pairs=4,
    )  # fmt: skip
    assert ds.info == {"task": "lm", "vocab_size": 64, "length": 32}
    assert [len(ds[k]) for k in ("train", "val", "test")] == [10, 3, 3]
    assert not np.array_equal(ds["train"][0]["inputs"], ds["val"][0]["inputs"])
    np.testing.assert_array_equal(
        ds["test"][2]["targets"], MQAR(64, 32, 4).example(2, seed=(1, 2))["targets"]
    )
    it = make_loader(
        ds["val"], batch_size=4, shuffle=False, drop_remainder=False, shard_index=0, shard_count=1
    )
    (b,) = list(it)
    assert set(b) == {"inputs", "targets", "weights", "valid", "index"}
    assert b["inputs"].shape == b["targets"].shape == b["weights"].shape == (4, 32)
    assert b["inputs"].dtype == np.int32 and b["weights"].dtype == np.float32
    assert b["valid"].tolist() == [True, True, True, False] and b["index"].tolist() == [0, 1, 2, -1]
    assert not b["inputs"][3].any() and not b["weights"][3].any()  # padding row: id 0, weight 0
    np.testing.assert_array_equal(b["targets"][1], ds["val"][1]["targets"])
    for name in ("selective_copy", "induction"):
        d = get_dataset(f"synthetic/{name}", seed=0, num_train=4, num_val=2, num_test=2)
        assert d.info["task"] == "lm"
        assert d["train"][3]["inputs"].shape == (d.info["length"],)


def test_registry_checks_token_task_options():
    with pytest.raises(
        UnknownDatasetError, match=r"no option 'num_kv_pair' \(did you mean num_kv_pairs"
    ):
        get_dataset("synthetic/mqar", num_kv_pair=4)
    with pytest.raises(DataError, match="even"):
        get_dataset("synthetic/mqar", seq_len=63)
    with pytest.raises(UnknownDatasetError, match=r"did you mean synthetic/induction"):
        get_dataset("synthetic/induction_heads")


def test_array_source_carries_token_fields():
    items = lm_tasks.generate(SMALL["induction"], 6, seed=0)
    src = ArraySource(**items)
    assert len(src) == 6 and set(src[5]) == {"inputs", "targets", "weights"}
    np.testing.assert_array_equal(src[5]["targets"], items["targets"][5])
    with pytest.raises(ValueError, match="same first dimension"):
        ArraySource(inputs=items["inputs"], weights=items["weights"][:3])
