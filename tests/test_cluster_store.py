"""The store adapter: trees per scope follow the engine; records from peers are verified first.

Trees are compared with the partitions computed from the records
themselves, before and after a reopen; every kind of forged record is
refused with nothing of its batch stored; members that arrive before their
envelope are held back and stored once it comes, or refused at the end of
the session if it never does.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from faults import NoSyncFiles
from sim.forgery import forge

import stemedb
from stemedb import _codec
from stemedb.errors import InvalidRecord, NotFound, SignatureError
from stemedb.replication.cluster import ClusterFile
from stemedb.replication.framing import RecordBatch, concat
from stemedb.replication.placement import GLOBAL, Placement, scope_of
from stemedb.replication.reconcile import WHOLE_STORE
from stemedb.replication.store import EngineStore, Intake, verify_batch

SIGNER = stemedb.Signer.from_seed(bytes([0x21]) * 32)
OTHER = stemedb.Signer.from_seed(bytes([0x22]) * 32)
CLUSTER = ClusterFile.parse('name = "t"\nversion = 1\nreplication_factor = 1\npartitions = 8\n'
                            '[[nodes]]\nid = "n1"\naddress = "h:1"\n')
PLACEMENT = Placement(CLUSTER)


def open_store(path):
    return stemedb.open(path, files=NoSyncFiles(), segment_size=1 << 20)


def encoded(records) -> RecordBatch:
    blob, offsets, ids = _codec.encode_many(records)
    return RecordBatch(blob, np.asarray(offsets, dtype=np.int64), ids)


def claims(tag: str, n: int, start: int = 0):
    return [stemedb.Assertion(f"{tag}-{i % 5}", "p", i, timestamp=1000 + start + i) for i in range(n)]


def expected_scopes(db) -> dict[int, set[bytes]]:
    out: dict[int, set[bytes]] = {WHOLE_STORE: set()}
    for record in db.scan():
        scope = scope_of(PLACEMENT.record_partition(record.encode()))
        out.setdefault(scope, set()).add(record.id)
        out[WHOLE_STORE].add(record.id)
    return out


def test_trees_follow_writes_and_are_rebuilt_at_open(tmp_path):
    db = open_store(tmp_path / "a")
    members, envelope = SIGNER.sign_batch(claims("x", 30), timestamp=5)
    db.put_many(members, envelope=envelope)
    store = EngineStore(db, PLACEMENT)
    voted = stemedb.Vote(members[0], 1.0, timestamp=7).sign(SIGNER)          # version 2
    bare = stemedb.Vote(members[1].id, 1.0, timestamp=8).sign(SIGNER)        # version 1
    db.put_many([voted, bare])
    db.put_many([c.sign(SIGNER) for c in claims("y", 12, 100)])
    wanted = expected_scopes(db)
    assert set(store.scopes()) == set(wanted)
    for scope, ids in wanted.items():
        assert store.ids_of_scope(scope) == ids and store.count(scope) == len(ids)
        tree, timestamps, column_ids = store.items(scope)
        tree.check(timestamps, column_ids)
    assert store.ids_of_scope(scope_of(GLOBAL)) == {envelope.id, bare.id}
    assert voted.id in store.ids_of_scope(scope_of(PLACEMENT.subject_partition(members[0].subject)))
    store.close()
    db.put(claims("z", 1, 500)[0].sign(SIGNER))
    assert store.count(WHOLE_STORE) == 46 and len(db) == 46   # the engine's trees: kept while open
    db.close()
    reopened = open_store(tmp_path / "a")
    assert reopened.partitions == PLACEMENT.partitions         # recorded in the MANIFEST
    again = EngineStore(reopened, PLACEMENT)
    assert again.count(WHOLE_STORE) == 46
    for scope, ids in expected_scopes(reopened).items():
        assert again.ids_of_scope(scope) == ids
    reopened.close()


def test_equal_sets_have_equal_fingerprints_whatever_the_order(tmp_path):
    records = [c.sign(SIGNER) for c in claims("q", 40)]
    a, b = open_store(tmp_path / "a"), open_store(tmp_path / "b")
    a.put_many(records)
    for record in reversed(records):
        b.put(record)
    sa, sb = EngineStore(a, PLACEMENT), EngineStore(b, PLACEMENT)
    for scope in sa.scopes():
        assert sa.fingerprint(scope) == sb.fingerprint(scope)
    b.put(claims("r", 1)[0].sign(SIGNER))
    assert sa.fingerprint(WHOLE_STORE) != sb.fingerprint(WHOLE_STORE)
    a.close()
    b.close()


def test_read_rows_and_ids_give_the_stored_bytes(tmp_path):
    db = open_store(tmp_path / "a")
    records = [c.sign(SIGNER) for c in claims("r", 5)]
    db.put_many(records)
    store = EngineStore(db, PLACEMENT)
    batch = store.read_rows(np.array([4, 0]))
    assert batch.ids.tobytes() == records[4].id + records[0].id
    assert bytes(batch.blob) == records[4].encode() + records[0].encode()
    assert store.read_ids([records[2].id]).ids.tobytes() == records[2].id
    with pytest.raises(NotFound, match="no record with ID 00000000"):
        store.read_ids([bytes(32)])
    assert len(store.read_rows(np.array([], dtype=np.int64))) == 0
    db.close()


def test_verify_sorts_records_by_proof(tmp_path):
    db = open_store(tmp_path / "a")
    store = EngineStore(db, PLACEMENT)
    stored_members, stored_envelope = SIGNER.sign_batch(claims("old", 3), timestamp=1)
    db.put_many(stored_members[:1], envelope=stored_envelope)
    members, envelope = SIGNER.sign_batch(claims("new", 2), timestamp=2)
    absent_members, _absent = OTHER.sign_batch(claims("far", 2), timestamp=3)
    signed = claims("solo", 1)[0].sign(SIGNER)
    batch = encoded([signed, *members, envelope, stored_members[1], absent_members[0]])
    verified = store.verify(batch)
    ids = batch.ids
    assert verified.envelopes.ids.tobytes() == ids[3].tobytes()
    assert verified.batch_members.ids.tobytes() == ids[1:3].tobytes()
    assert verified.others.ids.tobytes() == ids[0].tobytes() + ids[4].tobytes()
    assert verified.waiting.ids.tobytes() == ids[5].tobytes()
    assert store.store(verified) == 5
    for i in range(5):
        assert bytes(ids[i]) in db
    assert bytes(ids[5]) not in db
    db.close()


@pytest.mark.parametrize("kind,error,message", [
    ("bad_signature", SignatureError, r"records\[1\]: record [0-9a-f]+: bad signature"),
    ("wrong_id", InvalidRecord, r"records\[1\]: came as [0-9a-f]+ but its content is [0-9a-f]+"),
])
def test_forged_signed_records_are_refused_and_nothing_is_stored(tmp_path, kind, error, message):
    import random

    db = open_store(tmp_path / "a")
    store = EngineStore(db, PLACEMENT)
    honest = [c.sign(SIGNER) for c in claims("h", 3)]
    data, sent_as, true_id = forge(honest[1], kind, random.Random(1))
    batch = encoded(honest)
    forged = concat([batch.select(np.array([0])),
                     RecordBatch(data, np.array([0, len(data)]), np.frombuffer(sent_as, np.uint8).reshape(1, 32)),
                     batch.select(np.array([2]))])
    with pytest.raises(error, match=message):
        store.store(store.verify(forged))
    assert len(db) == 0 and true_id not in db
    db.close()


def test_forged_members_are_refused(tmp_path):
    import random

    db = open_store(tmp_path / "a")
    store = EngineStore(db, PLACEMENT)
    members, envelope = SIGNER.sign_batch(claims("m", 3), timestamp=9)
    data, sent_as, _ = forge(members[0], "bad_signature", random.Random(2))   # not listed in it
    forged = encoded([envelope, *members[1:]])
    forged = concat([forged, RecordBatch(data, np.array([0, len(data)]),
                                         np.frombuffer(sent_as, np.uint8).reshape(1, 32))])
    with pytest.raises(SignatureError, match=r"not listed in its envelope"):
        store.verify(forged)
    db.put_many(members[1:], envelope=envelope)                    # now the envelope is stored
    with pytest.raises(SignatureError, match=r"not a member of envelope"):
        store.verify(RecordBatch(data, np.array([0, len(data)]), np.frombuffer(sent_as, np.uint8).reshape(1, 32)))
    bad_envelope = envelope._with_proof(envelope.signers, ((0, bytes(64)),), None)
    with pytest.raises(SignatureError):
        store.verify(encoded([bad_envelope]))
    assert len(db) == 3
    db.close()


def test_garbage_bytes_are_invalid_records(tmp_path):
    db = open_store(tmp_path / "a")
    store = EngineStore(db, PLACEMENT)
    record = claims("g", 1)[0].sign(SIGNER)
    data = record.encode()[:-5]
    with pytest.raises(InvalidRecord):
        store.verify(RecordBatch(data, np.array([0, len(data)]),
                                 np.frombuffer(record.id, np.uint8).reshape(1, 32)))
    assert len(verify_batch(RecordBatch.empty(), lambda _: None).waiting) == 0
    db.close()


def test_intake_holds_members_until_their_envelope_arrives(tmp_path):
    db = open_store(tmp_path / "a")
    intake = Intake(EngineStore(db, PLACEMENT))
    members, envelope = SIGNER.sign_batch(claims("late", 4), timestamp=11)
    assert intake.accept(encoded(members[:2])) == 0 and intake.held_records == 2
    assert intake.accept(encoded(members[2:3])) == 0 and intake.held_records == 3
    assert members[0].id not in db                               # held back: never served
    assert intake.accept(encoded([envelope, members[3]])) == 2   # the envelope and one member
    assert intake.held_records == 0
    assert all(m.id in db for m in members) and intake.stored == 5
    intake.finish()
    db.close()


def test_intake_refuses_members_whose_envelope_never_came(tmp_path):
    db = open_store(tmp_path / "a")
    intake = Intake(EngineStore(db, PLACEMENT))
    members, _envelope = SIGNER.sign_batch(claims("orphan", 2), timestamp=12)
    intake.accept(encoded(members))
    with pytest.raises(SignatureError, match=r"its envelope [0-9a-f]+ was never sent \(2 members held"):
        intake.finish()
    assert len(db) == 0 and intake.held_records == 0
    db.close()


def test_intake_verifies_and_stores_in_one_engine_call(tmp_path, monkeypatch):
    db = open_store(tmp_path / "a")
    store = EngineStore(db, PLACEMENT)

    def refuse(batch):
        raise AssertionError("Intake decoded and verified the batch outside the engine")

    monkeypatch.setattr(store, "verify", refuse)
    calls = []
    real_put = db.put_encoded

    def counted(*args, **kwargs):
        calls.append(kwargs.get("hold_back", False))
        return real_put(*args, **kwargs)

    monkeypatch.setattr(db, "put_encoded", counted)
    intake = Intake(store)
    members, envelope = SIGNER.sign_batch(claims("one", 3), timestamp=13)
    assert intake.accept(encoded([envelope, *members])) == 4
    assert calls == [True] and all(m.id in db for m in members)
    db.close()


def test_a_version_2_vote_from_a_peer_naming_another_subject_is_refused(tmp_path):
    db = open_store(tmp_path / "a")
    store = EngineStore(db, PLACEMENT)
    assertion = claims("voted", 1)[0].sign(SIGNER)
    db.put(assertion)
    liar = stemedb.Vote(assertion.id, 1.0, subject="someone-else", timestamp=3).sign(OTHER)
    honest = stemedb.Vote(assertion, 1.0, timestamp=4).sign(OTHER)
    with pytest.raises(InvalidRecord, match=r"records\[1\]: subject: 'someone-else' is not the subject"):
        store.accept(encoded([honest, liar]))
    assert honest.id not in db and liar.id not in db
    stored, held = store.accept(encoded([honest]))
    assert stored == 1 and len(held) == 0 and honest.id in db
    db.close()


def test_a_reconciliation_step_never_sees_a_half_indexed_batch(tmp_path):
    db = open_store(tmp_path / "a")
    store = EngineStore(db, PLACEMENT)
    done = threading.Event()

    def writer():
        for k in range(40):
            db.put_many([c.sign(SIGNER) for c in claims(f"w{k}", 25, 100 * k)])
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    while True:
        finished = done.is_set()
        with store.lock:
            whole = len(store.items(WHOLE_STORE)[0])
            scoped = sum(len(store.items(scope)[0]) for scope in range(1, PLACEMENT.partitions + 2))
            assert whole == db.state.count == scoped       # every tree has every indexed batch
            assert whole % 25 == 0
        if finished:
            break
    thread.join()
    assert store.count(WHOLE_STORE) == 1000
    db.close()
