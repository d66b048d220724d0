"""Grain loaders: shapes, per-epoch coverage and shuffles, padding, sharding, resumable state."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from flax_linoss.data import loader, protocol
from flax_linoss.data.loader import ArraySource, make_loader

REPO = Path(__file__).resolve().parents[1]
# Raw UEA files for the tests: $FLAX_LINOSS_TEST_DATA/uea, else ../shared/data/uea beside the
# repository (where CI keeps them).
UEA_ROOT = Path(os.environ.get("FLAX_LINOSS_TEST_DATA", REPO.parent / "shared" / "data")) / "uea"
SCP1 = "SelfRegulationSCP1"
# In CI (where $CI is set) the data must be there: the tests run and fail if it is not.
HAVE_SCP1 = (UEA_ROOT / SCP1 / f"{SCP1}Dimension1_TRAIN.arff").exists() or bool(
    os.environ.get("CI")
)
needs_scp1 = pytest.mark.skipif(
    not HAVE_SCP1,
    reason=f"real UEA data absent: expected {UEA_ROOT / SCP1}/ ($FLAX_LINOSS_TEST_DATA/uea or "
    "../shared/data/uea beside the repository)",
)


@pytest.fixture(scope="module")
def scp1_train():
    if not HAVE_SCP1:
        pytest.skip(f"real UEA data absent: expected {UEA_ROOT / SCP1}")
    x, y = protocol.uea_splits(SCP1, seed=2345, root=UEA_ROOT)["train"]
    return ArraySource(x, y)


def _small(n=10):
    x = np.arange(n * 3 * 2, dtype=np.float32).reshape(n, 3, 2)
    return ArraySource(x, np.arange(n, dtype=np.int32) % 3)


def _epochs(it, steps_per_epoch, epochs):
    batches = list(it)
    assert len(batches) == steps_per_epoch * epochs
    return [batches[e * steps_per_epoch : (e + 1) * steps_per_epoch] for e in range(epochs)]


@needs_scp1
def test_scp1_batches_shapes_and_exact_coverage(scp1_train):
    n = len(scp1_train)  # 392
    steps = loader.steps_per_epoch(n, 32, drop_remainder=False)
    assert steps == 13
    it = make_loader(
        scp1_train,
        batch_size=32,
        seed=0,
        drop_remainder=False,
        num_epochs=2,
        shard_index=0,
        shard_count=1,
    )
    epochs = _epochs(it, steps, 2)
    b = epochs[0][0]
    assert b["series"].shape == (32, 896, 6) and b["series"].dtype == np.float32
    assert b["label"].shape == (32,) and b["label"].dtype == np.int32
    assert b["valid"].dtype == np.bool_ and b["index"].dtype == np.int64
    orders = []
    for ep in epochs:
        got = loader.batches_to_arrays(ep)
        np.testing.assert_array_equal(np.sort(got["index"]), np.arange(n))  # once each
        np.testing.assert_array_equal(got["series"], scp1_train.arrays["series"][got["index"]])
        np.testing.assert_array_equal(got["label"], scp1_train.arrays["label"][got["index"]])
        assert (~np.concatenate([x["valid"] for x in ep])).sum() == steps * 32 - n
        orders.append(got["index"])
    assert not np.array_equal(orders[0], orders[1])  # reshuffled each epoch
    # Padded rows are zeros with index -1, only at the end of the epoch.
    last = epochs[0][-1]
    assert (last["index"][~last["valid"]] == -1).all()
    assert not last["series"][~last["valid"]].any()


@needs_scp1
def test_scp1_sharding_two_ways_gives_disjoint_halves(scp1_train):
    seen = []
    for k in range(2):
        it = make_loader(
            scp1_train,
            batch_size=16,
            seed=5,
            drop_remainder=False,
            shard_index=k,
            shard_count=2,
        )
        got = loader.batches_to_arrays(list(it))
        seen.append(set(got["index"].tolist()))
        assert len(got["index"]) == len(seen[-1]) == 196
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(len(scp1_train)))


@needs_scp1
def test_scp1_state_restore_reproduces_following_batches(scp1_train):
    kw = dict(batch_size=32, seed=7, num_epochs=None, shard_index=0, shard_count=1)
    it = make_loader(scp1_train, **kw)
    for _ in range(15):  # past the first epoch boundary (12 steps)
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(5)]
    fresh = make_loader(scp1_train, **kw)
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_drop_remainder_drops_a_different_tail_each_epoch():
    src = _small(10)
    it = make_loader(src, batch_size=4, seed=3, num_epochs=3, shard_index=0, shard_count=1)
    epochs = _epochs(it, 2, 3)
    idx = [np.concatenate([b["index"] for b in ep]) for ep in epochs]
    for i in idx:
        assert len(set(i.tolist())) == 8 and all(b["valid"].all() for b in epochs[0])
    dropped = [set(range(10)) - set(i.tolist()) for i in idx]
    assert len({frozenset(d) for d in dropped}) > 1


def test_same_seed_same_order_other_seed_other_order_and_no_shuffle():
    src = _small(20)

    def order(seed, shuffle=True):
        it = make_loader(
            src, batch_size=5, seed=seed, shuffle=shuffle, shard_index=0, shard_count=1
        )
        return np.concatenate([b["index"] for b in it])

    np.testing.assert_array_equal(order(1), order(1))
    assert not np.array_equal(order(1), order(2))
    np.testing.assert_array_equal(order(1, shuffle=False), np.arange(20))


def test_uneven_shards_stay_in_step():
    src = _small(11)
    counts = []
    for k in range(3):
        for drop in (True, False):
            it = make_loader(
                src, batch_size=2, seed=0, drop_remainder=drop, shard_index=k, shard_count=3
            )
            counts.append((drop, len(list(it))))
    assert {c for d, c in counts if d} == {1}  # floor(3 / 2) on every shard
    assert {c for d, c in counts if not d} == {2}  # ceil(4 / 2) on every shard


def test_errors():
    src = _small(5)
    with pytest.raises(ValueError, match="drop_remainder"):
        make_loader(src, batch_size=8, shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="both"):
        make_loader(src, batch_size=2, shard_index=0)
    with pytest.raises(ValueError, match="shard_index"):
        make_loader(src, batch_size=2, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="same first dimension"):
        ArraySource(np.zeros((3, 2, 1)), np.zeros(4))


def test_default_shard_is_jax_process():
    import jax

    it = make_loader(_small(6), batch_size=6, shuffle=False)
    (b,) = list(it)
    assert jax.process_count() == 1 and b["index"].tolist() == list(range(6))


def test_worker_processes_resume_exactly():
    src = _small(10)
    kw = dict(batch_size=3, seed=1, num_epochs=None, shard_index=0, shard_count=1)
    ref = make_loader(src, **kw)
    ref_batches = [next(ref) for _ in range(8)]
    it = make_loader(src, worker_count=1, **kw)
    first = [next(it) for _ in range(5)]
    state = it.get_state()
    del it
    it2 = make_loader(src, worker_count=1, **kw)
    it2.set_state(state)
    rest = [next(it2) for _ in range(3)]
    del it2
    for got, want in zip(first + rest, ref_batches):
        np.testing.assert_array_equal(np.asarray(got["index"]), want["index"])
        np.testing.assert_array_equal(np.asarray(got["series"]), want["series"])
