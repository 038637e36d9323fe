"""Range-based set reconciliation: the fingerprint tree and sessions between two sets.

The tree is checked against a plain sorted list (rank, sums, order) under
random inserts in any order; sessions run between two in-memory sets and must
leave both sides holding what the directions allow (both: the union), in few
round trips; malformed messages raise ProtocolError, never crash.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stemedb import _reconcile
from stemedb.errors import ProtocolError
from stemedb.replication.reconcile import (
    ALL_SKIP,
    WHOLE_STORE,
    Reconciler,
    decode_message,
    encode_message,
    run_in_memory,
)


class Side:
    """A set of (timestamp, ID) items in growable columns, with its tree, per scope."""

    def __init__(self, capacity: int) -> None:
        self.timestamps = np.zeros(max(capacity, 1), dtype=np.uint64)
        self.ids = np.zeros((max(capacity, 1), 32), dtype=np.uint8)
        self.count = 0
        self.tree = _reconcile.RangeTree()

    def columns(self) -> tuple[np.ndarray, np.ndarray]:
        return self.timestamps[:self.count], self.ids[:self.count]

    def items(self, scope: int) -> tuple[_reconcile.RangeTree, np.ndarray, np.ndarray]:
        assert scope == WHOLE_STORE
        return (self.tree, *self.columns())

    def add(self, timestamps: np.ndarray, ids: np.ndarray) -> None:
        held = self.keys()
        fresh = [i for i in range(len(ids)) if bytes(ids[i]) not in held]
        k = len(fresh)
        self.timestamps[self.count:self.count + k] = timestamps[fresh]
        self.ids[self.count:self.count + k] = ids[fresh]
        rows = np.arange(self.count, self.count + k, dtype=np.uint32)
        self.count += k
        self.tree.add(rows, *self.columns())

    def keys(self) -> set[bytes]:
        return {bytes(row) for row in self.ids[:self.count]}


def universe(rng: np.random.Generator, n: int, spread_ms: int) -> tuple[np.ndarray, np.ndarray]:
    timestamps = rng.integers(0, max(spread_ms, 1) * 1000, n).astype(np.uint64)
    ids = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    return timestamps, ids


def key_order(timestamps: np.ndarray, ids: np.ndarray) -> list[int]:
    return sorted(range(len(ids)), key=lambda r: (int(timestamps[r]) // 1000, bytes(ids[r])))


# ---------------------------------------------------------------- the tree


@pytest.mark.parametrize("n,spread", [(0, 10), (1, 10), (63, 1), (64, 1), (65, 3), (2000, 1),
                                      (5000, 100000)])
def test_tree_matches_a_sorted_list(n, spread):
    seed = random.randrange(1 << 30)
    rng = np.random.default_rng(seed)
    timestamps, ids = universe(rng, n, spread)
    tree = _reconcile.RangeTree()
    order = rng.permutation(n).astype(np.uint32)
    for chunk in np.array_split(order, 5):
        tree.add(chunk, timestamps, ids)
    tree.add(order[:10], timestamps, ids)  # already held: ignored
    assert len(tree) == n, f"seed {seed}"
    tree.check(timestamps, ids)
    expected = key_order(timestamps, ids)
    assert list(tree.rows()) == expected, f"seed {seed}"
    assert list(tree.rows(n // 3, n // 2)) == expected[n // 3:n // 2]
    for _ in range(40):
        if n and rng.random() < 0.7:
            row = int(rng.integers(n))
            bound = (int(timestamps[row]) // 1000, bytes(ids[row][:int(rng.integers(0, 33))]))
        else:
            bound = (int(rng.integers(0, spread + 2)), bytes(rng.integers(0, 256, int(rng.integers(0, 4)),
                                                                           dtype=np.uint8)))
        padded = bound[1] + bytes(32 - len(bound[1]))
        below = [r for r in range(n) if (int(timestamps[r]) // 1000, bytes(ids[r])) < (bound[0], padded)]
        assert tree.rank(bound, timestamps, ids) == len(below), f"seed {seed} bound {bound}"
        count, total = tree.summary((0, b""), bound, timestamps, ids)
        expected_sum = sum(int.from_bytes(bytes(ids[r]), "little") for r in below) % (1 << 256)
        assert (count, int.from_bytes(total, "little")) == (len(below), expected_sum), f"seed {seed}"
    assert tree.rank(None, timestamps, ids) == n


def test_tree_in_order_appends_keep_leaves_full():
    n = 100_000
    timestamps = np.arange(n, dtype=np.uint64) * 1000
    ids = np.random.default_rng(1).integers(0, 256, (n, 32), dtype=np.uint8)
    tree = _reconcile.RangeTree()
    tree.add(np.arange(n, dtype=np.uint32), timestamps, ids)
    tree.check(timestamps, ids)
    # 4 bytes an item when leaves are full; half-full leaves would be past 8.
    assert tree.memory_bytes() / n < 6.5


def test_tree_refuses_rows_past_the_columns():
    timestamps = np.zeros(4, dtype=np.uint64)
    ids = np.zeros((4, 32), dtype=np.uint8)
    tree = _reconcile.RangeTree()
    with pytest.raises(ValueError, match="record number 4 is past the columns"):
        tree.add(np.array([1, 4], dtype=np.uint32), timestamps, ids)
    assert len(tree) == 0


def test_fingerprint_depends_on_salt_count_and_sum():
    rng = np.random.default_rng(3)
    timestamps, ids = universe(rng, 100, 10)
    tree = _reconcile.RangeTree()
    tree.add(np.arange(100, dtype=np.uint32), timestamps, ids)
    salt = bytes(8)
    whole = tree.fingerprint((0, b""), None, timestamps, ids, salt)
    assert len(whole) == 16
    assert tree.fingerprint((0, b""), None, timestamps, ids, b"\x01" + bytes(7)) != whole
    assert tree.fingerprint((0, b""), None, timestamps, ids, salt, 8) == whole[:8]
    half = (int(timestamps[key_order(timestamps, ids)[50]]) // 1000, b"")
    assert tree.fingerprint((0, b""), half, timestamps, ids, salt) != whole


def test_mostly_ordered_inserts_take_the_append_path_and_keep_every_invariant():
    rng = np.random.default_rng(4)
    n = 20_000
    timestamps = (np.arange(n, dtype=np.uint64) * 1000 + rng.integers(0, 3000, n).astype(np.uint64))
    ids = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    tree = _reconcile.RangeTree()
    for chunk in np.array_split(np.arange(n, dtype=np.uint32), 700):
        tree.add(chunk, timestamps, ids)
    tree.check(timestamps, ids)
    assert list(tree.rows()) == key_order(timestamps, ids)


def scoped_columns(rng, n, partitions):
    """Columns of n records: assertions, votes of both versions, epochs, envelopes."""
    timestamps = np.sort(rng.integers(0, n * 10, n)).astype(np.uint64) * 1000
    rng.shuffle(timestamps[: n // 3])               # some arrive out of time order
    ids = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    kinds = rng.choice(np.array([1, 1, 1, 2, 2, 3, 4], dtype=np.uint8), n)
    places = rng.integers(1, 1 << 63, n, dtype=np.uint64)
    places[(kinds > 2) | ((kinds == 2) & (rng.random(n) < 0.5))] = 0     # v1 votes, epochs, envelopes
    return timestamps, ids, kinds, places


@pytest.mark.parametrize("n,partitions", [(0, 4), (1, 1), (63, 8), (64, 8), (65, 3), (5000, 16),
                                          (40_000, 7), (3000, 0)])
def test_scope_trees_place_each_record_by_the_placement_rule(n, partitions):
    rng = np.random.default_rng(n + partitions)
    timestamps, ids, kinds, places = scoped_columns(rng, n, partitions)
    trees = _reconcile.ScopeTrees(partitions)
    for chunk in np.array_split(np.arange(n, dtype=np.uint32), max(1, n // 500)):
        trees.add(chunk, kinds[chunk], places[chunk], timestamps, ids)
    assert len(trees.whole) == n and list(trees.whole.rows()) == key_order(timestamps, ids)
    trees.whole.check(timestamps, ids)
    if not partitions:
        assert trees.scopes() == [0]
        with pytest.raises(ValueError, match="keeps no partition trees"):
            trees.tree(1)
        return
    wanted = _reconcile.partitions_of(kinds, places, partitions)
    expected = np.where((kinds == 1) | ((kinds == 2) & (places != 0)), places % np.uint64(partitions), -1)
    assert wanted.tolist() == expected.astype(np.int64).tolist()
    scopes = np.where(wanted < 0, 1, wanted + 2)
    assert trees.scopes() == [0] + sorted(set(scopes.tolist()))
    for scope in range(1, partitions + 2):
        tree = trees.tree(scope)
        rows = np.nonzero(scopes == scope)[0]
        tree.check(timestamps, ids)
        assert sorted(tree.rows().tolist()) == rows.tolist()
    with pytest.raises(ValueError, match=f"has {partitions} partitions"):
        trees.tree(partitions + 2)
    with pytest.raises(ValueError, match="kept by the engine"):
        trees.tree(1).add(np.zeros(0, dtype=np.uint32), timestamps, ids)


@pytest.mark.parametrize("n,partitions", [(0, 5), (1, 5), (62, 5), (63, 5), (64, 5), (2017, 2),
                                          (63 * 31 + 1, 3), (63 * 31 * 31 + 5, 1), (30_000, 64),
                                          (3000, 0)])
def test_scope_trees_persist_as_ordered_rows_and_bulk_load_to_the_same_trees(n, partitions):
    rng = np.random.default_rng(7 + n)
    timestamps, ids, kinds, places = scoped_columns(rng, n + 50, partitions)
    trees = _reconcile.ScopeTrees(partitions)
    trees.add(np.arange(n, dtype=np.uint32), kinds[:n], places[:n], timestamps, ids)
    state = trees.state()
    assert state["rows"].dtype == np.uint32 and np.array_equal(state["rows"], trees.whole.rows())
    loaded = _reconcile.ScopeTrees.from_state(state, partitions, n, kinds, places, timestamps, ids)
    assert loaded.scopes() == trees.scopes()
    salt = bytes(range(8))
    for scope in trees.scopes():
        ours, theirs = trees.tree(scope), loaded.tree(scope)
        theirs.check(timestamps, ids)
        assert np.array_equal(ours.rows(), theirs.rows())
        for _ in range(10):
            lo, hi = sorted(rng.integers(0, max(n, 1) * 10, 2).tolist())
            assert ours.fingerprint((lo, b""), (hi, b"\x80"), timestamps, ids, salt) == \
                theirs.fingerprint((lo, b""), (hi, b"\x80"), timestamps, ids, salt)
    # Records indexed after the load go on into the loaded trees as into the kept ones.
    more = np.arange(n, n + 50, dtype=np.uint32)
    for target in (trees, loaded):
        target.add(more, kinds[more], places[more], timestamps, ids)
    for scope in trees.scopes():
        loaded.tree(scope).check(timestamps, ids)
        assert np.array_equal(trees.tree(scope).rows(), loaded.tree(scope).rows())
    # Full leaves: about 4 bytes a record a tree, like appends leave them.
    if n >= 10_000:
        assert loaded.whole.memory_bytes() / n < 5.2


def test_partition_trees_are_split_off_the_whole_store_order_for_any_partition_count():
    rng = np.random.default_rng(21)
    timestamps, ids, kinds, places = scoped_columns(rng, 3000, 4)
    rows = np.arange(3000, dtype=np.uint32)
    single, clustered = _reconcile.ScopeTrees(0), _reconcile.ScopeTrees(4)
    for trees in (single, clustered):
        trees.add(rows, kinds, places, timestamps, ids)
    for state in (single.state(), clustered.state(), _reconcile.ScopeTrees(9).state()):
        if not len(state["rows"]):
            continue
        loaded = _reconcile.ScopeTrees.from_state(state, 4, 3000, kinds, places, timestamps, ids)
        assert loaded.partitions == 4 and loaded.scopes() == clustered.scopes()
        for scope in clustered.scopes():
            assert np.array_equal(loaded.tree(scope).rows(), clustered.tree(scope).rows())
    # A store that starts keeping partitions after records were written (once: O(n)).
    single.keep_partitions(4, 3000, kinds, places, timestamps, ids)
    assert single.scopes() == clustered.scopes()
    for scope in clustered.scopes():
        single.tree(scope).check(timestamps, ids)
        assert np.array_equal(single.tree(scope).rows(), clustered.tree(scope).rows())
    with pytest.raises(ValueError, match="already 4"):
        single.keep_partitions(4, 3000, kinds, places, timestamps, ids)
    more = np.arange(3000, 3000, dtype=np.uint32)
    single.add(more, kinds[more], places[more], timestamps, ids)


def test_scope_trees_state_that_disagrees_with_the_columns_is_refused():
    from stemedb.errors import CorruptionError

    rng = np.random.default_rng(22)
    timestamps, ids, kinds, places = scoped_columns(rng, 2000, 4)
    trees = _reconcile.ScopeTrees(4)
    trees.add(np.arange(2000, dtype=np.uint32), kinds, places, timestamps, ids)
    good = trees.state()

    def spoiled(key, change):
        state = dict(good, rows=good["rows"].copy())
        if callable(change):
            change(state[key])
        else:
            state[key] = change
        return state

    def swap(rows):
        rows[10], rows[11] = rows[11], rows[10]

    def twice(rows):
        rows[1500] = rows[1499]

    def past(rows):
        rows[-1] = 2000

    for state, what in [(spoiled("rows", swap), r"entry 11 \(record \d+\) is past the records or not above"),
                        (spoiled("rows", twice), "entry 1500"), (spoiled("rows", past), "past the records"),
                        (spoiled("rows", good["rows"][:-1]), "hold 1999 records, the columns 2000"),
                        (spoiled("kind", "IdIndex"), "not ScopeTrees"),
                        (spoiled("format", 9), "not ScopeTrees")]:
        with pytest.raises(CorruptionError, match=what):
            _reconcile.ScopeTrees.from_state(state, 4, 2000, kinds, places, timestamps, ids)
    with pytest.raises(CorruptionError, match="more than the columns hold"):
        _reconcile.ScopeTrees.from_state(good, 4, 5000, kinds, places, timestamps, ids)


# ---------------------------------------------------------------- sessions


def reconcile(a: Side, b: Side, *, a_sends: bool = True, a_receives: bool = True,
              salt: bytes | None = None, **params) -> tuple[int, Reconciler, Reconciler]:
    salt = salt or os.urandom(8)
    initiator = Reconciler(a, [WHOLE_STORE], can_send=a_sends, can_receive=a_receives, salt=salt,
                           **params)
    responder = Reconciler(b, [WHOLE_STORE], can_send=a_receives, can_receive=a_sends, salt=salt,
                           **params)

    def deliver(sender: Reconciler, sends: dict[int, np.ndarray]) -> None:
        source, target = (a, b) if sender is initiator else (b, a)
        for rows in sends.values():
            timestamps, ids = source.columns()
            target.add(timestamps[rows], ids[rows])

    trips = run_in_memory(initiator, responder, deliver)
    assert initiator.done and responder.done
    return trips, initiator, responder


def two_sides(rng, n, only_a, only_b, spread_ms):
    timestamps, ids = universe(rng, n, spread_ms)
    owner = np.zeros(n, dtype=np.int8)  # 0 both, 1 only a, 2 only b
    owner[only_a] = 1
    owner[only_b] = 2
    a, b = Side(n), Side(n)
    a.add(timestamps[owner != 2], ids[owner != 2])
    b.add(timestamps[owner != 1], ids[owner != 1])
    return a, b, {bytes(r) for r in ids}


@pytest.mark.parametrize("n,d_a,d_b,spread", [
    (0, 0, 0, 10), (1, 0, 1, 10), (1, 1, 0, 10), (50, 0, 50, 10), (50, 50, 0, 10),
    (1000, 0, 0, 5), (1000, 3, 4, 5), (5000, 100, 100, 1), (5000, 0, 2500, 1000),
    (20000, 40, 0, 100000),
])
def test_session_both_directions_reaches_the_union(n, d_a, d_b, spread):
    seed = random.randrange(1 << 30)
    rng = np.random.default_rng(seed)
    picked = rng.permutation(n)
    a, b, union = two_sides(rng, n, picked[:d_a], picked[d_a:d_a + d_b], spread)
    trips, initiator, _ = reconcile(a, b)
    assert a.keys() == union and b.keys() == union, f"seed {seed}"
    a.tree.check(*a.columns())
    b.tree.check(*b.columns())
    # A second session finds nothing: one round trip, nothing sent.
    trips, _, _ = reconcile(a, b)
    assert trips == 1, f"seed {seed}"


@pytest.mark.parametrize("a_sends,a_receives", [(False, True), (True, False)])
def test_session_one_direction_moves_records_one_way(a_sends, a_receives):
    seed = random.randrange(1 << 30)
    rng = np.random.default_rng(seed)
    picked = rng.permutation(3000)
    a, b, union = two_sides(rng, 3000, picked[:30], picked[30:70], 50)
    a_before, b_before = a.keys(), b.keys()
    reconcile(a, b, a_sends=a_sends, a_receives=a_receives)
    if a_receives:
        assert a.keys() == union and b.keys() == b_before, f"seed {seed}"
    else:
        assert b.keys() == union and a.keys() == a_before, f"seed {seed}"


def test_one_missing_record_takes_three_round_trips_at_100k():
    rng = np.random.default_rng(11)
    a, b, union = two_sides(rng, 100_000, np.array([], dtype=np.int64), np.array([99_999]), 100_000)
    trips, initiator, responder = reconcile(a, b, a_sends=False)
    assert a.keys() == union
    assert trips <= 3
    total = initiator.stats.bytes_sent + responder.stats.bytes_sent
    assert total < 2000, total


def test_an_empty_side_gets_everything_in_one_round_trip():
    rng = np.random.default_rng(12)
    a, b, union = two_sides(rng, 10_000, np.array([], dtype=np.int64), np.arange(10_000), 10)
    trips, initiator, responder = reconcile(a, b)
    assert a.keys() == union and trips == 1
    assert initiator.stats.bytes_sent + responder.stats.bytes_sent < 64


def test_sessions_with_many_salts_never_lose_a_difference():
    rng = np.random.default_rng(13)
    for trial in range(20):
        a, b, union = two_sides(rng, 2000, rng.choice(2000, 20, replace=False)[:10],
                                rng.choice(2000, 20, replace=False)[10:], 3)
        reconcile(a, b, salt=bytes([trial]) * 8, branching=4, list_threshold=4)
        assert a.keys() == union and b.keys() == union, f"trial {trial}"


# ---------------------------------------------------------------- the wire


def test_message_framing_round_trip_and_errors():
    blocks = [(0, b"\x00\x00"), (2, b"abc"), (300, b"")]
    data = encode_message(blocks)
    assert decode_message(data) == blocks
    for cut in range(len(data)):
        with pytest.raises(ProtocolError):
            decode_message(data[:cut])
    with pytest.raises(ProtocolError, match="after the last block"):
        decode_message(data + b"\x00")
    with pytest.raises(ProtocolError, match="appears twice"):
        decode_message(encode_message([(1, b""), (1, b"")]))


def session_messages() -> list[bytes]:
    rng = np.random.default_rng(21)
    a, b, _ = two_sides(rng, 4000, rng.choice(4000, 30, replace=False), np.array([], dtype=np.int64), 2)
    salt = bytes(8)
    lists: dict = {}
    first, _, _ = _reconcile.reconcile(a.tree, *a.columns(), b"", salt, lists, can_send=True,
                                       can_receive=True, initiate=True)
    second, _, _ = _reconcile.reconcile(b.tree, *b.columns(), first, salt, {}, can_send=True,
                                        can_receive=True)
    return [first, second]


def test_every_truncation_of_a_range_list_is_refused():
    rng = np.random.default_rng(22)
    timestamps, ids = universe(rng, 500, 2)
    tree = _reconcile.RangeTree()
    tree.add(np.arange(500, dtype=np.uint32), timestamps, ids)
    for message in session_messages():
        for cut in range(len(message)):
            with pytest.raises(ProtocolError):
                _reconcile.reconcile(tree, timestamps, ids, message[:cut], bytes(8), {},
                                     can_send=True, can_receive=True)
    assert ALL_SKIP == b"\x00\x00"


def test_a_need_without_its_list_is_refused():
    timestamps = np.zeros(1, dtype=np.uint64)
    ids = np.zeros((1, 32), dtype=np.uint8)
    tree = _reconcile.RangeTree()
    need = b"\x00" + bytes([6 << 5]) + b"\x01\x01"
    with pytest.raises(ProtocolError, match="answers no ID list"):
        _reconcile.reconcile(tree, timestamps, ids, need, bytes(8), {}, can_send=True,
                             can_receive=True)


def test_bounds_must_rise_and_end_at_infinity():
    timestamps = np.zeros(1, dtype=np.uint64)
    ids = np.zeros((1, 32), dtype=np.uint8)
    tree = _reconcile.RangeTree()
    skip_at_5 = b"\x06\x00"            # bound ms 5, no prefix, SKIP
    with pytest.raises(ProtocolError, match="does not reach infinity"):
        _reconcile.reconcile(tree, timestamps, ids, skip_at_5, bytes(8), {}, can_send=True,
                             can_receive=True)
    with pytest.raises(ProtocolError, match="not above the previous"):
        _reconcile.reconcile(tree, timestamps, ids, skip_at_5 + b"\x01\x00" + ALL_SKIP, bytes(8), {},
                             can_send=True, can_receive=True)
    with pytest.raises(ProtocolError, match="follows the one that reached infinity"):
        _reconcile.reconcile(tree, timestamps, ids, ALL_SKIP + ALL_SKIP, bytes(8), {},
                             can_send=True, can_receive=True)


@given(st.binary(max_size=200))
def test_random_bytes_parse_or_raise_protocol_error(data):
    rng = np.random.default_rng(len(data))
    timestamps, ids = universe(rng, 300, 2)
    tree = _reconcile.RangeTree()
    tree.add(np.arange(300, dtype=np.uint32), timestamps, ids)
    try:
        _reconcile.reconcile(tree, timestamps, ids, data, bytes(8), {}, can_send=True, can_receive=True)
    except ProtocolError:
        pass
