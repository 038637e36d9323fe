"""The embedded database API: put/get/scan/stats, verification on write, dedup, reopen."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from faults import FaultyFiles

import stemedb
from stemedb import Assertion, Epoch, Vote

SIGNER = stemedb.Signer.from_seed(b"\x07" * 32)
OTHER = stemedb.Signer.from_seed(b"\x08" * 32)
SMALL = 1 << 16  # 64 KiB segments: rolls happen within a test


def claim(i: int, subject: str = "s", signer: stemedb.Signer = SIGNER) -> Assertion:
    return Assertion(subject, "p", i, timestamp=1000 + i).sign(signer)


@pytest.fixture
def db(tmp_path):
    with stemedb.open(tmp_path / "db", segment_size=SMALL) as database:
        yield database


def test_put_get_contains(db):
    record = claim(1)
    assert db.put(record) == record.id
    assert db.get(record.id) == record
    assert db.contains(record.id) and record.id in db
    assert not db.contains(bytes(32))
    with pytest.raises(stemedb.NotFound, match="no record with ID"):
        db.get(bytes(32))
    assert len(db) == 1


def test_put_existing_is_a_noop(db):
    record = claim(1)
    db.put(record)
    assert db.put(record) == record.id
    assert db.put_many([record, record]) == [record.id, record.id]
    assert db.stats()["records"] == 1


def test_unsigned_and_badly_signed_records_are_refused_and_nothing_is_written(db):
    with pytest.raises(stemedb.SignatureError, match=r"records\[0\].*unsigned"):
        db.put(Assertion("s", "p", 1))
    good = claim(1)
    bad = claim(2)._with_proof(claim(2).signers, [(0, bytes(64))], None)
    with pytest.raises(stemedb.SignatureError, match=r"records\[1\]"):
        db.put_many([good, bad])
    assert db.stats()["records"] == 0
    assert not db.contains(good.id)


def test_many_individually_signed_records_are_verified_in_parallel(db):
    records = [claim(i) for i in range(300)]
    forged = records[250]._with_proof(records[250].signers, [(0, OTHER.sign_id(records[250].id))], None)
    with pytest.raises(stemedb.SignatureError, match=r"records\[250\]"):
        db.put_many(records[:250] + [forged] + records[251:])
    assert db.stats()["records"] == 0
    assert db.put_many(records) == [r.id for r in records]


def test_envelope_batch(db):
    members, envelope = SIGNER.sign_batch([Assertion("s", "p", i, timestamp=i) for i in range(500)])
    ids = db.put_many(members, envelope=envelope)
    assert ids == [m.id for m in members]
    assert db.get(envelope.id) == envelope
    assert db.get(members[7].id) == members[7]
    assert db.stats()["by_kind"] == {"assertion": 500, "vote": 0, "epoch": 0, "envelope": 1}
    # a member alone is accepted once its envelope is stored
    again = stemedb.decode(members[3].encode())
    assert db.put(again) == again.id


def test_envelope_members_are_checked(db):
    members, envelope = SIGNER.sign_batch([Assertion("s", "p", i, timestamp=i) for i in range(5)])
    outsider, _ = SIGNER.sign_batch([Assertion("s", "p", 99, timestamp=99)])
    forged = outsider[0]._with_proof(outsider[0].signers, (), envelope.id)
    with pytest.raises(stemedb.SignatureError, match=r"records\[5\].*not listed"):
        db.put_many(members + [forged], envelope=envelope)
    with pytest.raises(stemedb.SignatureError, match="not stored"):
        db.put(members[0])  # its envelope was never stored
    other_members, _ = OTHER.sign_batch([Assertion("s", "p", 1, timestamp=1)])
    with pytest.raises(stemedb.SignatureError, match=r"records\[0\]"):
        db.put_many(other_members, envelope=envelope)
    assert db.stats()["records"] == 0


def test_get_many_accepts_lists_and_arrays(db):
    records = [claim(i) for i in range(10)]
    db.put_many(records)
    ids = [r.id for r in records] + [bytes(32)]
    assert db.get_many(ids) == records + [None]
    array = np.frombuffer(b"".join(ids), dtype=np.uint8).reshape(-1, 32)
    assert db.get_many(array) == records + [None]
    with pytest.raises(stemedb.InvalidRecord, match=r"ids\[0\]: expected 32 bytes"):
        db.get_many([b"short"])
    blob, offsets, rows = db.get_encoded_many(array)
    assert rows[-1] == -1 and offsets[-1] - offsets[-2] == 0
    assert blob[offsets[0]:offsets[1]] == records[0].encode()


def test_scan_by_subject_and_predicate(db):
    records = [Assertion(f"s{i % 3}", f"p{i % 2}", i, timestamp=i).sign(SIGNER) for i in range(30)]
    db.put_many(records)
    assert list(db.scan("s1")) == [r for r in records if r.subject == "s1"]
    assert list(db.scan("s1", "p0")) == [r for r in records if r.subject == "s1" and r.predicate == "p0"]
    assert list(db.scan(predicate="p1")) == [r for r in records if r.predicate == "p1"]
    assert list(db.scan("nobody")) == []
    assert len(list(db.scan())) == 30
    assert len(list(db.scan(kind="assertion"))) == 30
    with pytest.raises(ValueError, match="kind"):
        list(db.scan(kind="fact"))


def test_votes_and_epochs_are_indexed(db):
    target = claim(1)
    vote = Vote(target, 0.5, timestamp=5).sign(OTHER)
    old = Epoch("2024", timestamp=1).sign(SIGNER)
    new = Epoch("2025", supersedes=[old], timestamp=2).sign(SIGNER)
    db.put_many([target, vote, old, new])
    state = db.state
    votes = state.postings["target"].get(stemedb._codec.id_key(target.id))
    assert [db.get(bytes(state.columns.arrays["id"][r])) for r in votes] == [vote]
    superseding = state.superseded_by.get(stemedb._codec.id_key(old.id))
    assert [bytes(state.columns.arrays["id"][r]) for r in superseding] == [new.id]


def test_segments_roll_and_everything_survives_reopen(tmp_path):
    path = tmp_path / "db"
    records = [claim(i, subject=f"subject-{i % 7}") for i in range(2000)]
    with stemedb.open(path, segment_size=SMALL) as db:
        for start in range(0, 2000, 100):
            db.put_many(records[start:start + 100])
        assert db.stats()["segments"] > 3
    with stemedb.open(path) as db:  # segment size comes from the MANIFEST
        assert db.recovery.snapshot_records == 2000 and db.recovery.records_replayed == 0
        assert db.get_many([r.id for r in records]) == records
        assert list(db.scan("subject-3")) == [r for r in records if r.subject == "subject-3"]
        assert db.verify().ok


def test_reopen_without_close_replays_the_log(tmp_path):
    path = tmp_path / "db"
    records = [claim(i) for i in range(300)]
    db = stemedb.open(path, segment_size=SMALL)
    db.put_many(records[:100])
    db.checkpoint()
    db.put_many(records[100:])
    db.log.close()  # simulate a crash: no final snapshot
    db._release_lock()
    with stemedb.open(path) as again:
        assert again.recovery.snapshot_records == 100
        assert again.recovery.records_replayed == 200
        assert again.get_many([r.id for r in records]) == records


def test_writer_signs_each_batch_with_one_envelope(tmp_path):
    # The default segments of a test store (4 MiB): no batch is split by a roll, so batches == envelopes.
    with stemedb.open(tmp_path / "db") as db:
        writer = db.writer(SIGNER)
        results: list[bytes] = []
        lock = threading.Lock()

        def work(t: int) -> None:
            for i in range(50):
                record_id = writer.put(Assertion("w", "p", t * 1000 + i, timestamp=i))
                with lock:
                    results.append(record_id)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(set(results)) == 400
        stats = db.stats()
        assert stats["by_kind"]["assertion"] == 400
        envelopes = list(db.scan(kind="envelope"))
        assert len(envelopes) == stats["writes"]["batches"]  # exactly one envelope per batch
        members_of: dict[bytes, list[bytes]] = {}
        for record in db.get_many(results):
            assert record.signers == (SIGNER.public_key,) and record.envelope is not None
            members_of.setdefault(record.envelope, []).append(record.id)
        assert sum(len(e.members) for e in envelopes) == 400
        for envelope in envelopes:
            assert sorted(envelope.members) == sorted(members_of[envelope.id])
            stemedb.verify_batch(envelope, db.get_many(list(envelope.members)))
        with pytest.raises(stemedb.SignatureError, match="other signers"):
            writer.put(Assertion("w", "p", 1).sign(OTHER))


def hold_next_sync(db: stemedb.Database, files: FaultyFiles, waiting: int) -> threading.Event:
    """Hold the next fdatasync until `waiting` more writers have queued behind its batch.

    Returns an event set once the sync was let go. The writers that queued
    meanwhile must all be served by the next batch, with one fsync: that is
    group commit.
    """
    released = threading.Event()
    armed = [True]

    def hook(_files: FaultyFiles, method: str, _number: int, phase: str) -> None:
        if method != "fdatasync" or phase != "before" or not armed[0]:
            return
        armed[0] = False
        deadline = time.monotonic() + 60  # a hang guard, not a measurement
        while len(db._commit._queue) < waiting:
            assert time.monotonic() < deadline, "the other writers never queued"
            time.sleep(0.001)
        released.set()

    files.hooks.append(hook)
    return released


def leading(db: stemedb.Database) -> None:
    """Wait until a writer leads a batch (it took the queue, its sync is pending)."""
    deadline = time.monotonic() + 60
    while db._commit._queue or not db._commit._leader_active:
        assert time.monotonic() < deadline, "no writer became the leader"
        time.sleep(0.001)


def test_group_commit_serves_every_queued_writer_with_one_fsync(tmp_path):
    """While one batch syncs, 7 writers queue; the next batch takes all 7 with one fsync."""
    files = FaultyFiles(tmp_path, sync_for_real=False)
    with stemedb.open(tmp_path / "db", files=files) as db:
        records = [claim(i) for i in range(8)]
        before = db.stats()["writes"]
        released = hold_next_sync(db, files, waiting=7)
        first = threading.Thread(target=db.put, args=(records[0],))
        first.start()
        leading(db)
        others = [threading.Thread(target=db.put, args=(r,)) for r in records[1:]]
        for thread in others:
            thread.start()
        for thread in [first, *others]:
            thread.join()
        assert released.is_set()
        after = db.stats()["writes"]
        assert after["fsyncs"] - before["fsyncs"] == 2
        assert after["batches"] - before["batches"] == 2
        assert after["max_writers_per_batch"] == 7
        assert after["records_written"] - before["records_written"] == 8
        assert db.get_many([r.id for r in records]) == records


def test_writer_signs_the_queued_writers_with_one_envelope(tmp_path):
    files = FaultyFiles(tmp_path, sync_for_real=False)
    with stemedb.open(tmp_path / "db", files=files) as db:
        writer = db.writer(SIGNER)
        released = hold_next_sync(db, files, waiting=5)
        ids: list[bytes] = []
        lock = threading.Lock()

        def put(i: int) -> None:
            record_id = writer.put(Assertion("g", "p", i, timestamp=i))
            with lock:
                ids.append(record_id)

        first = threading.Thread(target=put, args=(0,))
        first.start()
        leading(db)
        others = [threading.Thread(target=put, args=(i,)) for i in range(1, 6)]
        for thread in others:
            thread.start()
        for thread in [first, *others]:
            thread.join()
        assert released.is_set()
        envelopes = list(db.scan(kind="envelope"))
        assert sorted(len(e.members) for e in envelopes) == [1, 5]
        assert sorted(m for e in envelopes for m in e.members) == sorted(ids)


def test_concurrent_put_from_threads(tmp_path):
    records = [claim(i) for i in range(400)]
    with stemedb.open(tmp_path / "db") as db:  # 4 MiB segments: no roll adds a sync of its own

        def work(chunk):
            for record in chunk:
                db.put(record)

        threads = [threading.Thread(target=work, args=(records[t::4],)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stats = db.stats()
        assert stats["records"] == 400 and db.get_many([r.id for r in records]) == records
        writes = stats["writes"]
        # One fsync per batch, never one per record; how many batches the threads form
        # depends on scheduling (test_group_commit_serves_every_queued_writer_... pins that down).
        assert writes["fsyncs"] == writes["batches"]
        assert writes["records_written"] == 400


def test_durability_modes(tmp_path):
    for mode in ("batch", "none"):
        with stemedb.open(tmp_path / mode, durability=mode, segment_size=SMALL) as db:
            db.put_many([claim(i) for i in range(50)])
        with stemedb.open(tmp_path / mode) as db:
            assert db.stats()["records"] == 50
    with pytest.raises(ValueError, match="durability"):
        stemedb.open(tmp_path / "x", durability="maybe")


def test_second_open_of_the_same_directory_is_refused(tmp_path):
    with stemedb.open(tmp_path / "db", segment_size=SMALL):
        with pytest.raises(stemedb.StemeError, match="LOCK"):
            stemedb.open(tmp_path / "db")


def test_closed_database_refuses_calls(tmp_path):
    db = stemedb.open(tmp_path / "db", segment_size=SMALL)
    db.close()
    db.close()
    with pytest.raises(stemedb.StemeError, match="closed"):
        db.put(claim(1))


def test_record_larger_than_a_segment_is_refused(db):
    big = Assertion("s", "p", b"x" * 70_000).sign(SIGNER)
    with pytest.raises(stemedb.InvalidRecord, match="segment_size"):
        db.put(big)
    db.put(claim(1))  # the store still works


def test_stats_shape(db):
    db.put_many([claim(i) for i in range(5)])
    stats = db.stats()
    for key in ("records", "by_kind", "segments", "disk_bytes", "used_bytes", "index_bytes",
                "posting_keys", "writes", "recovery"):
        assert key in stats
    assert stats["writes"]["fsyncs"] >= 1 and stats["writes"]["records_written"] == 5


def test_one_durable_batch_with_several_envelopes(db):
    first, env_a = SIGNER.sign_batch([Assertion("a", "p", i, timestamp=i) for i in range(20)])
    second, env_b = OTHER.sign_batch([Assertion("b", "p", i, timestamp=i) for i in range(20)])
    mixed = [x for pair in zip(first, second) for x in pair]
    assert db.put_many(mixed, envelope=[env_a, env_b]) == [r.id for r in mixed]
    assert db.stats()["by_kind"]["envelope"] == 2
    assert db.stats()["writes"]["batches"] == 1
    stray, env_c = SIGNER.sign_batch([Assertion("c", "p", 1, timestamp=1)])
    with pytest.raises(stemedb.SignatureError, match=r"records\[1\]: not proven by any"):
        db.put_many([first[0], stray[0]], envelope=[env_a, env_b])


def test_an_epoch_superseding_several_epochs_survives_reopen(tmp_path):
    path = tmp_path / "db"
    old = [Epoch(f"e{i}", timestamp=i).sign(SIGNER) for i in range(3)]
    new = Epoch("merged", supersedes=old, timestamp=9).sign(SIGNER)
    with stemedb.open(path, segment_size=SMALL) as db:
        db.put_many(old + [new])
    for reopen in range(2):
        with stemedb.open(path) as db:
            for epoch in old:
                rows = db.state.superseded_by.get(stemedb._codec.id_key(epoch.id))
                assert [db.records_at(rows)[0].id] == [new.id], reopen
            if reopen == 0:
                db.put(claim(1))  # the second open replays this after the snapshot


def test_checkpoint_covers_only_indexed_records(tmp_path):
    path = tmp_path / "db"
    db = stemedb.open(path, segment_size=SMALL)
    db.put_many([claim(i) for i in range(10)])
    # frames appended but not yet indexed must be replayed, not skipped, after reopen
    blob, offsets, ids = stemedb.encode_many([claim(99)])
    db._writes.batch_seq += 1
    frames, _, _ = stemedb._segment.build_batch(blob, offsets, ids, db._writes.batch_seq)
    db.log.append(frames)
    db.log.sync()
    db.checkpoint()
    db.log.close()
    db._release_lock()
    with stemedb.open(path) as again:
        assert again.contains(claim(99).id)
        assert again.stats()["records"] == 11


def test_background_snapshot_every_n_records(tmp_path):
    path = tmp_path / "db"
    records = [claim(i) for i in range(250)]
    with stemedb.open(path, segment_size=SMALL, snapshot_every=100) as db:
        for start in range(0, 250, 50):
            db.put_many(records[start:start + 50])
        db._checkpointer.join()
        snapshots = sorted((path / "index").iterdir())
        assert snapshots and snapshots[-1].name.startswith("snapshot-")
    with stemedb.open(path) as db:
        assert db.get_many([r.id for r in records]) == records


def test_a_damaged_or_foreign_snapshot_is_ignored_and_the_log_replayed(tmp_path):
    import json as json_module

    path = tmp_path / "db"
    records = [claim(i) for i in range(40)]
    with stemedb.open(path, segment_size=SMALL) as db:
        db.put_many(records)
    snapshot = next((path / "index").iterdir())
    manifest = json_module.loads((snapshot / "MANIFEST.json").read_text())
    manifest["version"] = 1
    (snapshot / "MANIFEST.json").write_text(json_module.dumps(manifest))
    with stemedb.open(path) as db:
        assert "MANIFEST.json: checksum mismatch" in db.recovery.snapshot_problem
        assert db.recovery.records_replayed == 40
        assert db.get_many([r.id for r in records]) == records
    column = next(p for p in (next((path / "index").iterdir())).iterdir() if p.name == "column.timestamp.npy")
    raw = bytearray(column.read_bytes())
    raw[-1] ^= 0xFF
    column.write_bytes(bytes(raw))
    with stemedb.open(path) as db:
        assert "checksum mismatch" in db.recovery.snapshot_problem
        assert db.get_many([r.id for r in records]) == records


def test_write_metrics_count_batches_writers_and_fsyncs(db):
    db.put_many([claim(i) for i in range(10)])
    db.put(claim(10))
    writes = db.stats()["writes"]
    assert writes["batches"] == 2 and writes["records_written"] == 11
    assert writes["mean_records_per_batch"] == 5.5
    assert writes["mean_writers_per_batch"] == 1.0 and writes["max_writers_per_batch"] == 1
    assert writes["fsyncs"] == 2 and sum(writes["fsync_histogram_ms"].values()) == 2


def test_vote_and_epoch_conveniences(db):
    target = claim(1)
    db.put(target)
    vote = Vote(target, 1.0, timestamp=2).sign(OTHER)
    epoch = Epoch("2025", timestamp=3).sign(SIGNER)
    assert db.vote(vote) == vote.id and db.get(vote.id) == vote
    assert db.epoch(epoch) == epoch.id and db.get(epoch.id) == epoch
    with pytest.raises(stemedb.InvalidRecord, match="vote: expected a stemedb.Vote, got Epoch"):
        db.vote(epoch)
    with pytest.raises(stemedb.InvalidRecord, match="epoch: expected a stemedb.Epoch, got Assertion"):
        db.epoch(target)


def test_group_signing_writer_refuses_only_the_record_that_cannot_fit_a_segment(tmp_path):
    with stemedb.open(tmp_path / "db", segment_size=SMALL) as db:
        writer = db.writer(SIGNER)
        with pytest.raises(stemedb.InvalidRecord, match=r"bytes do not fit a 65536-byte segment"):
            writer.put(Assertion("big", "p", "x" * 70_000, timestamp=1))
        # many records that fit one by one, though not all in one frame: all stored
        many = [Assertion("s", "p", "y" * 9_000 + str(i), timestamp=10 + i) for i in range(12)]
        ids = writer.put_many(many)
        assert len(ids) == 12 and all(db.contains(i) for i in ids)
        assert db.stats()["by_kind"]["assertion"] == 12      # nothing of the refused one
