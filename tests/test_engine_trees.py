"""The range trees the engine keeps beside its ID index (docs/architecture.md, "Range trees").

Every check compares the engine's trees with what the records themselves say:
the key order is (timestamp in ms, ID) of the records written, and the scope of
each record is computed here from its kind and subject (an assertion's and a
version-2 vote's subject key modulo P, else global), not read back from the
engine's columns. Trees must survive a close (snapshot), a lost snapshot
(replay), a snapshot whose tree order is damaged (refused, replayed), and a
store first kept for a cluster after records were written.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import stemedb
from stemedb import Assertion, Vote, _codec, _hash
from stemedb.engine import snapshots
from stemedb.errors import ConfigError

SIGNER = stemedb.Signer.from_seed(b"\x31" * 32)
OTHER = stemedb.Signer.from_seed(b"\x32" * 32)
SMALL = 1 << 20
PARTITIONS = 8


def open_store(path, **options):
    return stemedb.open(path, segment_size=SMALL, **options)


def write_mix(db, seed: int, n: int = 300) -> list:
    """Assertions out of time order, both vote versions, an epoch, an envelope with members."""
    rng = np.random.default_rng(seed)
    times = rng.integers(1, 200_000, n).tolist()           # µs: many share a millisecond
    assertions = [Assertion(f"s{seed}-{i % 23}", "p", i, timestamp=t).sign(SIGNER)
                  for i, t in enumerate(times)]
    votes = [Vote(assertions[i], 1.0, timestamp=times[i] + 1).sign(OTHER) for i in range(0, n, 7)]
    bare = [Vote(assertions[i].id, -1.0, timestamp=times[i] + 2).sign(OTHER) for i in range(3, n, 11)]
    epoch = stemedb.Epoch(f"e{seed}", timestamp=5).sign(SIGNER)
    members, envelope = SIGNER.sign_batch([Assertion(f"m{seed}-{i}", "q", i, timestamp=100 + i)
                                           for i in range(20)], timestamp=7)
    for start in range(0, n, 60):            # several batches
        db.put_many(assertions[start:start + 60])
    db.put_many(votes + bare + [epoch])
    db.put_many(members, envelope=envelope)
    return [*assertions, *votes, *bare, epoch, envelope, *members]


def scope_of(record, partitions: int) -> int:
    subject = getattr(record, "subject", None)
    if isinstance(record, Assertion) or (isinstance(record, Vote) and subject is not None):
        return 2 + _codec.subject_key(subject) % partitions
    return 1


def key_order(records) -> list[bytes]:
    """The reconciliation key: (timestamp in milliseconds, ID); timestamps are microseconds."""
    return [r.id for r in sorted(records, key=lambda r: (r.timestamp // 1000, r.id))]


def tree_ids(db, scope: int) -> list[bytes]:
    with db.reconcile_lock():
        tree, timestamps, ids = db.reconcile_items(scope)
        tree.check(timestamps, ids)
        return [bytes(ids[row]) for row in tree.rows()]


def assert_trees_match(db, records, partitions: int) -> None:
    assert tree_ids(db, 0) == key_order(records)
    if not partitions:
        assert db.reconcile_scopes() == [0]
        return
    by_scope: dict[int, list] = {}
    for record in records:
        by_scope.setdefault(scope_of(record, partitions), []).append(record)
    assert db.reconcile_scopes() == [0, *sorted(by_scope)]
    for scope in range(1, partitions + 2):
        assert tree_ids(db, scope) == key_order(by_scope.get(scope, []))


def test_the_whole_store_tree_follows_every_write_and_every_open(tmp_path):
    db = open_store(tmp_path / "a")
    records = write_mix(db, 1)
    assert db.partitions == 0
    assert_trees_match(db, records, 0)
    db.close()
    reopened = open_store(tmp_path / "a")                 # from the snapshot
    assert reopened.recovery.snapshot_records == len(records) and not reopened.recovery.problems
    assert_trees_match(reopened, records, 0)
    records += write_mix(reopened, 2, 50)
    assert_trees_match(reopened, records, 0)
    reopened.close()
    for name in os.listdir(tmp_path / "a" / "index"):     # no snapshot: everything replayed
        snapshots.FileLayer().remove_tree(str(tmp_path / "a" / "index" / name))
    replayed = open_store(tmp_path / "a")
    assert replayed.recovery.snapshot_records == 0 and replayed.recovery.records_replayed == len(records)
    assert_trees_match(replayed, records, 0)
    replayed.close()


def test_partition_trees_place_each_record_by_its_subject(tmp_path):
    db = open_store(tmp_path / "a", partitions=PARTITIONS)
    records = write_mix(db, 3)
    assert db.partitions == PARTITIONS
    assert_trees_match(db, records, PARTITIONS)
    db.close()
    reopened = open_store(tmp_path / "a")                 # the count comes from the MANIFEST
    assert reopened.partitions == PARTITIONS
    assert_trees_match(reopened, records, PARTITIONS)
    records += write_mix(reopened, 4, 40)
    assert_trees_match(reopened, records, PARTITIONS)
    reopened.close()


def test_a_store_kept_for_a_cluster_later_splits_its_records_once(tmp_path):
    db = open_store(tmp_path / "a")
    records = write_mix(db, 5)
    db.keep_partitions(PARTITIONS)
    assert_trees_match(db, records, PARTITIONS)
    db.keep_partitions(PARTITIONS)                        # the same count again: nothing changes
    records += write_mix(db, 6, 30)
    assert_trees_match(db, records, PARTITIONS)
    db.close()
    manifest = json.loads((tmp_path / "a" / "MANIFEST").read_text())
    assert manifest["partitions"] == PARTITIONS


def test_a_different_partition_count_is_refused_naming_both(tmp_path):
    open_store(tmp_path / "a", partitions=PARTITIONS).close()
    before = (tmp_path / "a" / "MANIFEST").read_bytes()
    with pytest.raises(ConfigError, match=f"partitions: 16 asked for, .* cluster of {PARTITIONS} "
                       f"partitions .* partitions={PARTITIONS}"):
        open_store(tmp_path / "a", partitions=16)
    with open_store(tmp_path / "a") as db:
        with pytest.raises(ConfigError, match=f"16 asked for, .* {PARTITIONS} partitions"):
            db.keep_partitions(16)
        assert db.partitions == PARTITIONS
    assert (tmp_path / "a" / "MANIFEST").read_bytes() == before
    for bad in (-1, 70_000, True, 2.5):
        with pytest.raises(ConfigError, match="partitions: .*expected a whole number 1..65534"):
            open_store(tmp_path / "b", partitions=bad)
    plain = open_store(tmp_path / "c")
    plain.close()
    assert "partitions" not in json.loads((tmp_path / "c" / "MANIFEST").read_text())


def test_the_trees_are_read_only_and_scopes_are_checked(tmp_path):
    with open_store(tmp_path / "a", partitions=4) as db:
        write_mix(db, 7, 20)
        with db.reconcile_lock():
            tree, timestamps, ids = db.reconcile_items(2)
            with pytest.raises(ValueError, match="kept by the engine"):
                tree.add(np.zeros(1, dtype=np.uint32), timestamps, ids)
        with pytest.raises(ValueError, match="this store has 4 partitions, so scopes 0..5"):
            db.reconcile_items(6)
    with open_store(tmp_path / "b") as db:
        with pytest.raises(ValueError, match="keeps no partition trees"):
            db.reconcile_items(1)


def test_rows_are_read_by_record_number(tmp_path):
    with open_store(tmp_path / "a") as db:
        records = write_mix(db, 8, 30)
        rows = np.array([3, 0, len(records) - 1])
        assert [bytes(i) for i in db.ids_of_rows(rows)] == [bytes(db.view.column("id")[r]) for r in rows]
        stored = {bytes(i): len(db.get_encoded(bytes(i))) for i in db.ids_of_rows(rows)}
        assert db.record_lengths(rows).tolist() == [stored[bytes(i)] for i in db.ids_of_rows(rows)]
        assert db.record_lengths(rows).dtype == np.int64
        for bad in (len(records), -1):
            with pytest.raises(ValueError, match=f"record number {bad} is not stored"):
                db.ids_of_rows([0, bad])
        assert db.stats()["index_bytes"]["range_trees"] > 0


def test_a_snapshot_whose_tree_order_is_damaged_is_ignored_and_replayed(tmp_path):
    db = open_store(tmp_path / "a", partitions=PARTITIONS)
    records = write_mix(db, 9)
    db.close()
    index = tmp_path / "a" / "index"
    (snapshot,) = [index / n for n in os.listdir(index)]
    rows = np.load(snapshot / "trees.rows.npy")
    rows[[10, 11]] = rows[[11, 10]]                      # two records out of key order
    path = snapshot / "trees.rows.npy"
    np.save(path, rows)
    manifest = json.loads((snapshot / "MANIFEST.json").read_text())
    manifest["checksums"]["trees.rows"] = _hash.crc32c(path.read_bytes())   # a consistent lie
    manifest["manifest_crc32c"] = snapshots._manifest_checksum(manifest)
    (snapshot / "MANIFEST.json").write_text(json.dumps(manifest))
    reopened = open_store(tmp_path / "a")
    assert any("ScopeTrees entry 11" in p for p in reopened.recovery.problems)
    assert reopened.recovery.records_replayed == len(records)
    assert_trees_match(reopened, records, PARTITIONS)
    reopened.close()
