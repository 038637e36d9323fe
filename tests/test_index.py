"""stemedb._index against Python dict models: IdIndex, PostingIndex.

Random content comes from SEED (override with STEMEDB_TEST_SEED=<int>); every
assertion that depends on it names the seed, so a failure can be replayed.
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stemedb import _index
from stemedb.errors import CorruptionError

SEED = int(os.environ.get("STEMEDB_TEST_SEED", "20240611"))
NO_RECORD = 0xFFFFFFFF


def rng_for(salt: str) -> np.random.Generator:
    return np.random.default_rng([SEED, *salt.encode()])


def rows(ids: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(ids), dtype=np.uint8).reshape(len(ids), 32)


# ----------------------------------------------------------------------------
# IdIndex

# First 8 bytes shared by many test IDs, so that keys collide on purpose: the
# zero key, an all-ones key, keys equal in their top half (the part a slot
# keeps) or only in their bottom half.
PREFIXES = [
    bytes(8),
    b"\xff" * 8,
    bytes(4) + b"\x01\x02\x03\x04",
    b"\x01\x02\x03\x04" + bytes(4),
    b"\x09\x09\x09\x09\x01\x02\x03\x04",
    b"\x09\x09\x09\x09\x05\x06\x07\x08",
]
TAILS = [bytes(24), b"\x01" * 24, bytes(23) + b"\x01", b"\x80" + bytes(23)]

ids_strategy = st.one_of(
    st.binary(min_size=32, max_size=32),
    st.builds(bytes.__add__, st.sampled_from(PREFIXES), st.sampled_from(TAILS)),
    st.builds(bytes.__add__, st.sampled_from(PREFIXES), st.binary(min_size=24, max_size=24)),
)


def variants(id_: bytes) -> list[bytes]:
    """IDs with the same 8-byte key as id_ (so the index must compare full IDs)."""
    return [id_[:31] + bytes([id_[31] ^ 1]), id_[:8] + bytes(24), id_[:8] + b"\xff" * 24]


class IdModel:
    """An IdIndex beside the dict it must agree with, fed the way the engine feeds it."""

    def __init__(self, capacity: int = 0):
        self.index = _index.IdIndex(capacity)
        self.model: dict[bytes, int] = {}
        self.column = np.empty((0, 32), dtype=np.uint8)

    def insert(self, batch: list[bytes]) -> None:
        first = len(self.column)
        recnos = np.arange(first, first + len(batch), dtype=np.uint32)
        expected, seen = [], set()
        for id_ in batch:
            expected.append(id_ not in self.model and id_ not in seen)
            seen.add(id_)
        assert self.index.new_mask(rows(batch), self.column).tolist() == expected
        # The batch's own rows are not in the column yet: insert_many must not need them.
        inserted = self.index.insert_many(rows(batch), recnos, self.column)
        assert inserted.dtype == np.bool_ and inserted.tolist() == expected
        self.column = np.concatenate([self.column, rows(batch)])
        for id_, new, recno in zip(batch, expected, recnos.tolist()):
            if new:
                self.model[id_] = recno
        assert len(self.index) == len(self.model)

    def check(self, probes: list[bytes]) -> None:
        expected = [self.model.get(p, -1) for p in probes]
        found = self.index.lookup_many(rows(probes), self.column)
        assert found.dtype == np.int64 and found.tolist() == expected
        contained = self.index.contains_many(rows(probes), self.column)
        assert contained.tolist() == [e >= 0 for e in expected]
        for probe, want in list(zip(probes, expected))[:20]:
            assert self.index.lookup(probe, self.column) == want
            assert self.index.contains(probe, self.column) is (want >= 0)


@given(st.lists(st.lists(ids_strategy, max_size=40), max_size=8), st.integers(0, 100))
def test_id_index_matches_dict(batches, capacity):
    model = IdModel(capacity)
    for batch in batches:
        model.insert(batch)
        probes = list(model.model) + [v for id_ in batch for v in variants(id_)]
        model.check(probes)


def test_id_index_equal_keys_different_tails():
    """Sixty IDs with one 8-byte key, in two batches, each found by its full ID."""
    rng = rng_for("equal keys")
    key = b"\x42" * 8
    tails = {rng.bytes(24) for _ in range(60)}
    same_key = [key + tail for tail in tails]
    model = IdModel()
    model.insert(same_key[:30] + [rng.bytes(32) for _ in range(100)])
    model.insert(same_key[30:] + same_key[:5])
    model.check(same_key + [key + rng.bytes(24) for _ in range(20)])


def test_id_index_growth_across_many_resizes():
    """300 K IDs in random batches (1% with a copied key, 1% repeated), from the
    smallest table: every lookup right, memory always within 64/3 bytes per ID."""
    rng = rng_for("growth")
    model = IdModel()
    total, batches = 0, 0
    while total < 300_000:
        size = int(rng.integers(1, 20_000))
        batch = [rng.bytes(32) for _ in range(size)]
        if model.model:
            known = list(model.model)
            for i in rng.choice(size, size // 100 + 1):
                batch[i] = known[int(rng.integers(len(known)))][:8] + rng.bytes(24)
            for i in rng.choice(size, size // 100 + 1):
                batch[i] = known[int(rng.integers(len(known)))]
        model.insert(batch)
        total += size
        batches += 1
        # Right after doubling the table is 3/8 full: 8 / (3/8) = 21.3 bytes per ID.
        assert model.index.memory_bytes() <= max(128, 64 * len(model.index) / 3), f"seed {SEED}"
    assert model.index.memory_bytes() >= 8 * 4 * len(model.index) / 3
    sample = list(model.model)[::7]
    model.check(sample + [v for id_ in sample[:2000] for v in variants(id_)])


def test_id_index_capacity_avoids_growth():
    index = _index.IdIndex(capacity=10_000)
    before = index.memory_bytes()
    ids = rng_for("capacity").integers(0, 256, (10_000, 32), dtype=np.uint8)
    assert index.insert_many(ids, np.arange(10_000), ids).all()
    assert index.memory_bytes() == before == 16384 * 8


def test_id_index_accepts_sequences_and_read_only_mapped_column(tmp_path):
    rng = rng_for("mapped")
    ids = [rng.bytes(32) for _ in range(1000)]
    path = tmp_path / "ids.column"
    path.write_bytes(b"".join(ids))
    column = np.memmap(path, dtype=np.uint8, mode="r", shape=(1000, 32))
    index = _index.IdIndex()
    assert index.insert_many(ids, list(range(1000)), column).all()
    assert index.lookup_many(np.array(ids, dtype="S32"), column).tolist() == list(range(1000))
    assert index.lookup(ids[123], column) == 123


def test_id_index_state_round_trip(tmp_path):
    rng = rng_for("id state")
    model = IdModel()
    model.insert([rng.bytes(32) for _ in range(5000)] + [PREFIXES[0] + t for t in TAILS])
    state = model.index.state()
    assert state["kind"] == "IdIndex" and state["format"] == _index.STATE_FORMAT
    assert state["count"] == len(model.model) and state["slots"].dtype == np.uint64
    np.save(tmp_path / "slots.npy", state["slots"])
    mapped = dict(state, slots=np.load(tmp_path / "slots.npy", mmap_mode="r"))
    restored = _index.IdIndex.from_state(mapped)
    assert len(restored) == len(model.model)
    live = model.index
    model.index = restored
    model.check(list(model.model) + [rng.bytes(32)])
    # The copy and the restored index are independent of the live index.
    model.index = live
    model.insert([rng.bytes(32) for _ in range(5000)])
    assert len(restored) == state["count"] < len(live)
    assert np.array_equal(state["slots"], np.load(tmp_path / "slots.npy"))
    # copy=False hands out the live table; the default, a copy.
    view = live.state(copy=False)["slots"]
    assert np.shares_memory(view, live.state(copy=False)["slots"])
    assert not np.shares_memory(view, live.state()["slots"])


def test_id_index_from_state_rejects_damage():
    rng = rng_for("id damage")
    ids = rng.integers(0, 256, (100, 32), dtype=np.uint8)
    index = _index.IdIndex()
    index.insert_many(ids, np.arange(100), ids)
    good = index.state()
    slots = good["slots"]
    used = np.flatnonzero((slots & 0xFFFFFFFF) != NO_RECORD)
    free = np.flatnonzero((slots & 0xFFFFFFFF) == NO_RECORD)

    def damaged(**changes):
        return dict(good, **changes)

    moved = slots.copy()
    # Move an entry to an empty slot just before its home: no probe goes there.
    entry = used[len(used) // 2]
    home = int(moved[entry] >> np.uint64(64 - 8))  # 256 slots for 100 IDs
    target = [f for f in free if (home - f) % 256 < 50][0]
    moved[target], moved[entry] = moved[entry], np.uint64(0xFFFFFFFF)
    full = np.arange(256, dtype=np.uint64) << np.uint64(56)
    cases = [
        damaged(kind="PostingIndex"),
        damaged(format=2),
        damaged(slots=slots[:200]),
        damaged(slots=slots.reshape(16, 16)),
        damaged(count=99),
        damaged(count="100"),
        {k: v for k, v in good.items() if k != "slots"},
        damaged(slots=moved),
        damaged(slots=full, count=256),
    ]
    for case in cases:
        with pytest.raises(CorruptionError):
            _index.IdIndex.from_state(case)
    assert len(_index.IdIndex.from_state(good)) == 100


def test_id_index_argument_errors():
    ids = rng_for("errors").integers(0, 256, (3, 32), dtype=np.uint8)
    index = _index.IdIndex()
    with pytest.raises(ValueError, match="recnos has 2 entries"):
        index.insert_many(ids, [0, 1], ids)
    with pytest.raises(ValueError, match="no record"):
        index.insert_many(ids, np.array([0, 1, NO_RECORD], dtype=np.uint32), ids)
    with pytest.raises(ValueError, match="within"):
        index.insert_many(ids, [0, -1, 2], ids)
    with pytest.raises(TypeError):
        index.insert_many(ids, [0.0, 1.0, 2.0], ids)
    with pytest.raises(ValueError, match="shape"):
        index.insert_many(ids[:, :31], [0, 1, 2], ids)
    with pytest.raises(TypeError):
        index.lookup_many(ids.astype(np.int16), ids)
    with pytest.raises(ValueError, match="32 bytes"):
        index.lookup(b"x" * 31, ids)
    with pytest.raises(ValueError, match="32 bytes"):
        index.lookup_many([b"x" * 32, b"y" * 31], ids)
    with pytest.raises(ValueError):
        _index.IdIndex(-1)
    assert len(index) == 0
    index.insert_many(ids, [0, 1, 2], ids)
    with pytest.raises(ValueError, match="all_ids has only 1 rows"):
        index.lookup_many(ids, ids[:1])
    assert index.lookup_many(np.empty((0, 32), np.uint8), ids).shape == (0,)
    assert index.insert_many([], [], ids).shape == (0,)


def test_id_index_concurrent_readers():
    rng = rng_for("readers")
    ids = rng.integers(0, 256, (200_000, 32), dtype=np.uint8)
    index = _index.IdIndex()
    index.insert_many(ids, np.arange(len(ids)), ids)
    results: list[bool] = []

    def read() -> None:
        for _ in range(5):
            results.append(bool((index.lookup_many(ids, ids) == np.arange(len(ids))).all()))

    threads = [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 15


# ----------------------------------------------------------------------------
# PostingIndex

KEYS = [0, 1, 2, 12345, 2**63, 2**64 - 1]
entries_strategy = st.tuples(
    st.one_of(st.sampled_from(KEYS), st.integers(0, 2**64 - 1)),
    st.one_of(st.integers(1, 3), st.integers(1, 5000)),
)


class PostingModel:
    def __init__(self) -> None:
        self.index = _index.PostingIndex()
        self.model: dict[int, list[int]] = defaultdict(list)
        self.last = -1

    def add(self, entries: list[tuple[int, int]]) -> None:
        keys, recnos = [], []
        for key, gap in entries:
            self.last += gap
            keys.append(key)
            recnos.append(self.last)
            self.model[key].append(self.last)
        self.index.add_many(np.array(keys, dtype=np.uint64), np.array(recnos, dtype=np.uint32))

    def check(self, absent: list[int]) -> None:
        assert len(self.index) == len(self.model)
        assert sorted(self.index.keys().tolist()) == sorted(self.model)
        probes = list(self.model) + absent
        for key in probes[:30]:
            got = self.index.get(key)
            assert got.dtype == np.uint32 and got.tolist() == self.model.get(key, [])
            assert self.index.count(key) == len(self.model.get(key, []))
        flat, offsets = self.index.get_many(np.array(probes, dtype=np.uint64))
        assert flat.dtype == np.uint32 and offsets.dtype == np.int64
        assert len(offsets) == len(probes) + 1 and offsets[0] == 0
        for i, key in enumerate(probes):
            assert flat[offsets[i]:offsets[i + 1]].tolist() == self.model.get(key, [])


@given(st.lists(st.lists(entries_strategy, max_size=60), max_size=8), st.integers(0, 8))
def test_posting_index_matches_dict(batches, reload_after):
    model = PostingModel()
    for number, batch in enumerate(batches):
        model.add(batch)
        if number == reload_after:
            model.index = _index.PostingIndex.from_state(model.index.state())
        model.check(absent=[3, 2**64 - 2, 999_999])


def test_posting_index_many_keys_and_records():
    """200 K records over 20 K keys, 70% of record numbers keyed, in batches."""
    rng = rng_for("postings")
    recnos = np.flatnonzero(rng.random(285_000) < 0.7)[:200_000].astype(np.uint32)
    key_pool = rng.integers(0, 2**64, 20_000, dtype=np.uint64)
    keys = key_pool[rng.integers(0, len(key_pool), len(recnos))]
    index = _index.PostingIndex()
    for start in range(0, len(recnos), 30_000):
        index.add_many(keys[start:start + 30_000], recnos[start:start + 30_000])
    order = np.argsort(keys, kind="stable")
    distinct, starts = np.unique(keys[order], return_index=True)
    assert len(index) == len(distinct)
    bounds = list(starts) + [len(keys)]
    flat, offsets = index.get_many(distinct)
    for i in range(len(distinct)):
        expected = recnos[order[bounds[i]:bounds[i + 1]]]
        assert np.array_equal(flat[offsets[i]:offsets[i + 1]], expected), f"seed {SEED}"
    # prev: 4 bytes per record number (plus growth slack), table: 16 bytes per slot.
    assert index.memory_bytes() <= 4 * 1.25 * (int(recnos[-1]) + 1) + 16 * 32768
    restored = _index.PostingIndex.from_state(index.state())
    assert restored.memory_bytes() == 4 * (int(recnos[-1]) + 1) + 16 * 32768
    assert np.array_equal(restored.get_many(distinct)[0], flat)


def test_posting_index_sparse_record_numbers():
    index = _index.PostingIndex()
    index.add_many([7, 8], [0, 3])
    index.add_many([7], [1_000_000])
    index.add_many([8, 7], [4_000_000, 4_000_001])
    assert index.get(7).tolist() == [0, 1_000_000, 4_000_001]
    assert index.get(8).tolist() == [3, 4_000_000]
    assert index.get(9).tolist() == [] and index.count(9) == 0
    state = index.state()
    assert state["last"] == 4_000_001 and len(state["prev"]) == 4_000_002
    assert state["entries"] == 5 and state["keys"] == 2


def test_posting_index_rejects_non_increasing_record_numbers():
    index = _index.PostingIndex()
    index.add_many([1, 2, 1], [10, 11, 12])
    before = index.state()
    for keys, recnos in [
        ([1, 2], [13, 13]),
        ([1, 2], [14, 13]),
        ([1], [12]),
        ([1], [5]),
        ([1], [NO_RECORD]),
        ([1], [-1]),
        ([1, 2], [20]),
        ([-1], [20]),
    ]:
        with pytest.raises(ValueError):
            index.add_many(keys, recnos)
    after = index.state()
    assert after.keys() == before.keys()
    for name in before:
        assert np.array_equal(before[name], after[name]), name
    index.add_many([1], [13])
    assert index.get(1).tolist() == [10, 12, 13]


def test_posting_index_from_state_rejects_damage():
    index = _index.PostingIndex()
    index.add_many([5, 6, 5, 7, 6], [0, 2, 3, 4, 5])
    good = index.state()
    table, prev = good["table"], good["prev"]

    forward = prev.copy()
    forward[0] = 3  # a link that does not go back: a walk could loop
    rows = {int(table[i, 0]): i for i in range(len(table)) if table[i, 1] >> np.uint64(32)}
    recount = table.copy()
    recount[rows[5], 1] += np.uint64(1) << np.uint64(32)
    cases = [
        dict(good, kind="IdIndex"),
        dict(good, table=table[:10]),
        dict(good, table=table[:, :1]),
        dict(good, prev=prev[:3]),
        dict(good, keys=2),
        dict(good, entries=6),
        dict(good, last=3),
        dict(good, prev=forward),
        dict(good, table=recount),
    ]
    for case in cases:
        with pytest.raises(CorruptionError):
            _index.PostingIndex.from_state(case)
    # Counts moved between keys still add up, so from_state accepts them; the
    # chain that is now too short is caught when read.
    shifted = recount.copy()
    shifted[rows[6], 1] -= np.uint64(1) << np.uint64(32)
    damaged = _index.PostingIndex.from_state(dict(good, table=shifted))
    assert damaged.get(6).tolist() == [5]
    with pytest.raises(CorruptionError):
        damaged.get(5)


