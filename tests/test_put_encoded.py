"""Encoded bytes travel as bytes: `Database.put_encoded`, the read view and write notifications.

A request's records commit in one durable batch or not at all, whatever mix
of envelopes, members and individually signed records it holds — checked
here on the engine and through the binary protocol.
"""

from __future__ import annotations

import struct
import threading

import numpy as np
import pytest
from test_server_support import SIGNER, error_of, served
from test_server_support import config as server_config

import stemedb
from stemedb import Assertion, Epoch, RecordKind, Vote, _codec, _protocol
from stemedb.engine import verify
from stemedb.server import Server

OTHER = stemedb.Signer.from_seed(b"\x09" * 32)
SMALL = 1 << 16


def claim(i: int, subject: str = "s", signer: stemedb.Signer = SIGNER) -> Assertion:
    return Assertion(subject, "p", i, timestamp=1000 + i).sign(signer)


def batch_of(records: list[object]) -> tuple[bytes, np.ndarray]:
    blob, offsets, _ = stemedb.encode_many(records)
    return blob, offsets


def mixed(prefix: str = "m") -> tuple[list[object], stemedb.Envelope]:
    """Members before and after their envelope, individually signed records between."""
    members, envelope = SIGNER.sign_batch([Assertion(prefix, "p", i, timestamp=i) for i in range(6)])
    signed = [claim(i, f"{prefix}-signed", OTHER) for i in range(3)]
    return [members[0], members[1], signed[0], envelope, members[2], signed[1], *members[3:],
            signed[2]], envelope


@pytest.fixture
def db(tmp_path):
    with stemedb.open(tmp_path / "db", segment_size=SMALL) as database:
        yield database


def test_a_mixed_batch_commits_as_one_durable_batch(db):
    records, _ = mixed()
    blob, offsets = batch_of(records)
    before = db.stats()["writes"]["batches"]
    ids = db.put_encoded(blob, offsets)
    assert [bytes(row) for row in ids] == [r.id for r in records]
    assert db.stats()["writes"]["batches"] == before + 1
    assert db.get_many(ids) == records
    # already stored: skipped, IDs still returned, nothing written
    again = db.put_encoded(blob, offsets)
    assert np.array_equal(again, ids) and db.stats()["writes"]["batches"] == before + 1


@pytest.mark.parametrize("spoil", ["forged signature", "member not listed", "unsigned",
                                   "stranger's member", "not canonical"])
def test_a_refused_mixed_batch_writes_nothing(db, spoil):
    records, envelope = mixed()
    if spoil == "forged signature":
        bad = claim(99)._with_proof(claim(99).signers, [(0, bytes(64))], None)
    elif spoil == "member not listed":
        outsider = Assertion("outsider", "p", 1)._with_proof((SIGNER.public_key,), (), envelope.id)
        bad = outsider
    elif spoil == "unsigned":
        bad = Assertion("unsigned", "p", 1)
    elif spoil == "stranger's member":
        bad = Assertion("stranger", "p", 1)._with_proof((OTHER.public_key,), (), envelope.id)
    else:
        bad = Assertion("negative", "p", 1, confidence=0.3125).sign(SIGNER)
    blob, offsets = batch_of(records + [bad])
    if spoil == "not canonical":   # confidence -0.0: decoding refuses it, so must put_encoded
        blob = blob.replace(struct.pack("<f", 0.3125), struct.pack("<f", -0.0))
    before = db.stats()
    error = stemedb.InvalidRecord if spoil == "not canonical" else stemedb.SignatureError
    with pytest.raises(error, match=rf"records?[\[ ]{len(records)}"):
        db.put_encoded(blob, offsets)
    after = db.stats()
    assert after["records"] == before["records"] == 0
    assert after["writes"]["batches"] == before["writes"]["batches"]
    assert not any(db.contains(r.id) for r in records)


def test_members_of_a_stored_envelope_are_checked_against_it(db):
    members, envelope = SIGNER.sign_batch([Assertion("st", "p", i, timestamp=i) for i in range(4)])
    db.put_many(members[:2], envelope=envelope)
    blob, offsets = batch_of([members[2], members[3], claim(1)])
    assert [bytes(i) for i in db.put_encoded(blob, offsets)] == [members[2].id, members[3].id,
                                                                  claim(1).id]
    outsider = Assertion("nope", "p", 1)._with_proof((SIGNER.public_key,), (), envelope.id)
    with pytest.raises(stemedb.SignatureError, match=r"records\[1\] \(.*\): not a member of envelope"):
        db.put_encoded(*batch_of([claim(2), outsider]))
    impostor = members[0]._with_proof((OTHER.public_key,), (), envelope.id)
    with pytest.raises(stemedb.SignatureError, match=r"records\[0\] .*its signer is not the signer"):
        db.put_encoded(*batch_of([impostor]))
    orphan, _ = OTHER.sign_batch([Assertion("orphan", "p", 1)])
    with pytest.raises(stemedb.SignatureError, match=r"records\[0\]: its envelope .* is not stored"):
        db.put_encoded(*batch_of(orphan))
    assert not db.contains(claim(2).id)


def test_kind_restricts_everything_but_envelopes(db):
    target = claim(1)
    db.put(target)
    vote = Vote(target.id, 1.0, timestamp=5).sign(SIGNER)
    members, envelope = SIGNER.sign_batch([Vote(target.id, 0.5, timestamp=6)])
    ids = db.put_encoded(*batch_of([vote, envelope, *members]), kind=RecordKind.VOTE)
    assert len(ids) == 3
    with pytest.raises(stemedb.InvalidRecord, match=r"records\[1\]: expected a vote, got an assertion"):
        db.put_encoded(*batch_of([Vote(target.id, 2.0).sign(SIGNER), claim(2)]), kind=RecordKind.VOTE)
    with pytest.raises(stemedb.InvalidRecord, match=r"records\[0\]: expected an epoch, got a vote"):
        db.put_encoded(*batch_of([Vote(target.id, 3.0).sign(SIGNER)]), kind=RecordKind.EPOCH)
    assert not db.contains(claim(2).id)


def test_no_record_object_is_built_but_the_envelopes(db, monkeypatch):
    """Only the batch's envelope is decoded (for its member list); the rest is read as bytes."""
    decoded: list[int] = []
    real = _codec.decode

    def counting(data):
        decoded.append(len(data))
        return real(data)

    def refused(*_args):
        raise AssertionError("decode_many was called on the write path")

    monkeypatch.setattr(verify._codec, "decode", counting)
    monkeypatch.setattr(_codec, "decode_many", refused)
    members, envelope = SIGNER.sign_batch([Assertion("obj", "p", i, timestamp=i) for i in range(50)])
    signed = [claim(i, "obj-signed") for i in range(100)]
    ids = db.put_encoded(*batch_of([envelope, *members, *signed]))
    assert len(ids) == 151 and decoded == [len(envelope.encode())]


def test_ids_are_recomputed_from_the_bytes(db):
    record = claim(1)
    blob, offsets = batch_of([record])
    ids = db.put_encoded(memoryview(bytearray(blob)), offsets)
    assert bytes(ids[0]) == record.id and db.get_encoded(record.id) == blob


def test_put_many_is_encode_then_the_same_checks(db):
    records, envelope = mixed("pm")
    others = [r for r in records if r is not envelope]
    assert db.put_many(others, envelope=envelope) == [r.id for r in others]
    assert db.stats()["writes"]["batches"] == 1 and db.contains(envelope.id)
    with pytest.raises(stemedb.SignatureError, match=r"envelope\[0\]: .*bad signature"):
        forged = envelope._with_proof(envelope.signers, [(0, bytes(64))], None)
        db.put_many([claim(5)], envelope=forged)


def test_encoded_lengths_read_no_record(db):
    records = [claim(i) for i in range(3)]
    db.put_many(records)
    lengths = db.encoded_lengths([records[2].id, bytes(32), records[0].id])
    assert lengths.dtype == np.int64
    assert lengths.tolist() == [len(records[2].encode()), -1, len(records[0].encode())]


# ------------------------------------------------------------------- read view

def test_the_view_reads_columns_postings_and_records(db):
    records = [claim(i, subject=f"v{i % 2}") for i in range(6)]
    db.put_many(records)
    view = db.view
    snapshot = view.snapshot()
    assert snapshot.count == view.count == 6
    assert snapshot.column("timestamp").tolist() == [r.timestamp for r in records]
    rows = view.postings("subject").get(_codec.subject_key("v1"))
    assert [r.subject for r in view.records_at(rows)] == ["v1"] * 3
    assert view.postings("subject").get(_codec.subject_key("v1"), below=4).tolist() == [1, 3]
    keys = np.array([_codec.subject_key("v0"), 7, _codec.subject_key("v1")], dtype=np.uint64)
    flat, offsets = view.postings("subject").get_many(keys, below=3)
    assert [flat[offsets[i]:offsets[i + 1]].tolist() for i in range(3)] == [[0, 2], [], [1]]
    ids = np.frombuffer(records[4].id + bytes(32), dtype=np.uint8).reshape(2, 32)
    assert view.lookup(ids).tolist() == [4, -1]
    blob, offsets = view.gather(np.array([5, 0]))
    assert blob[offsets[0]:offsets[1]] == records[5].encode()
    db.put(claim(9))
    assert snapshot.count == 6 and view.count == 7   # a snapshot does not move
    with pytest.raises(ValueError, match="postings"):
        view.postings("nothing")


def test_write_notifications_come_after_the_state_lock_in_commit_order(db):
    seen: list[tuple[list[int], int, bool]] = []

    def listener(record_numbers, columns):
        free = threading.Event()

        def try_lock() -> None:
            if db._state_lock.acquire(blocking=False):
                db._state_lock.release()
                free.set()

        prober = threading.Thread(target=try_lock)
        prober.start()
        prober.join()
        seen.append((record_numbers.tolist(), db.view.count, free.is_set()))
        assert len(columns["kind"]) == len(record_numbers) == len(columns["location"])

    db.put(claim(0))
    start = db.view.subscribe(listener)
    assert start == 1
    db.put_many([claim(1), claim(2)])
    db.put(claim(3))
    assert seen == [([1, 2], 3, True), ([3], 4, True)]
    db.view.unsubscribe(listener)
    db.put(claim(4))
    assert len(seen) == 2


def test_a_listener_that_raises_does_not_fail_the_write(db, caplog):
    def broken(record_numbers, columns):
        raise RuntimeError("listener bug")

    db.view.subscribe(broken)
    assert db.put(claim(1)) == claim(1).id and db.contains(claim(1).id)
    assert "a write listener raised" in caplog.text


def test_epochs_written_encoded_link_what_they_supersede(db):
    old = Epoch("old", timestamp=1).sign(SIGNER)
    new = Epoch("new", supersedes=[old], timestamp=2).sign(SIGNER)
    db.put_encoded(*batch_of([old, claim(1), new]))
    rows = db.state.superseded_by.get(_codec.id_key(old.id))
    assert [r.id for r in db.records_at(rows)] == [new.id]


# ------------------------------------------------------------- through the protocol

@pytest.mark.trio
async def test_a_refused_mixed_batch_through_the_protocol_leaves_nothing_behind(tmp_path):
    """Envelope, its members and signed records in one PUT with one forged record: nothing stored.

    The server once split such a batch into two commits (members with their
    envelope first), so the refusal of the second left the first durable.
    """
    with stemedb.open(tmp_path / "data") as store:
        server = Server(store, server_config())
        records, envelope = mixed("wire")
        forged = claim(7, "wire-forged")._with_proof(claim(7).signers, [(0, bytes(64))], None)
        blob, offsets = batch_of(records + [forged])
        async with served(server) as client:
            await client.hello()
            answer = await client.call(_protocol.PUT, bytes(_protocol.encode_record_batch(blob, offsets)))
            code, _, message = error_of(answer)
            assert code == _protocol.E_SIGNATURE
            assert len(store) == 0 and store.stats()["writes"]["batches"] == 0
            assert f"records[{len(records)}]" in message   # named by its place in the request
            get = await client.call(_protocol.GET, _protocol.encode_ids([r.id for r in records]))
            _, got = _protocol.decode_record_batch(get.payload, True)
            assert not np.diff(got).any()   # every slot empty: not one record was stored
            blob, offsets = batch_of(records)
            put = await client.call(_protocol.PUT, bytes(_protocol.encode_record_batch(blob, offsets)))
            assert [bytes(row) for row in _protocol.decode_ids(put.payload)] == [r.id for r in records]
            assert store.stats()["writes"]["batches"] == 1 and len(store) == len(records)


# ------------------------------------------------------------- hold_back: records from a peer

def test_hold_back_stores_the_rest_and_names_members_whose_envelope_is_absent(db):
    members, envelope = SIGNER.sign_batch([Assertion("held", "p", i, timestamp=i) for i in range(3)])
    signed = [claim(i, "beside") for i in range(2)]
    records = [signed[0], members[0], members[1], signed[1], members[2]]
    blob, offsets = batch_of(records)
    result = db.put_encoded(blob, offsets, hold_back=True)
    assert [bytes(i) for i in result.ids] == [r.id for r in records]
    assert result.held.tolist() == [1, 2, 4]
    assert result.stored.tolist() == [True, False, False, True, False]
    assert [db.contains(r.id) for r in records] == result.stored.tolist()
    assert len(db) == 2
    # The envelope arrives: the held members are offered again and now stored.
    again = db.put_encoded(*batch_of([envelope, *members]), hold_back=True)
    assert again.held.tolist() == [] and again.stored.all()
    assert all(db.contains(r.id) for r in records) and len(db) == 6
    stemedb.verify_batch(db.get(envelope.id), db.get_many([m.id for m in members]))


def test_hold_back_still_refuses_the_whole_batch_for_a_forged_record(db):
    orphans, _ = SIGNER.sign_batch([Assertion("orph", "p", i, timestamp=i) for i in range(2)])
    good = claim(7, "good")
    forged = claim(8, "forged")
    forged_blob = bytearray(forged.encode())
    forged_blob[-1] ^= 1                      # the signature's last byte
    blob = good.encode() + orphans[0].encode() + bytes(forged_blob)
    offsets = np.cumsum([0, len(good.encode()), len(orphans[0].encode()), len(forged_blob)])
    with pytest.raises(stemedb.SignatureError, match=r"records\[2\]"):
        db.put_encoded(blob, offsets, hold_back=True)
    assert len(db) == 0
    # A member that names a stored envelope but is not listed in it is forged, not held.
    members, envelope = SIGNER.sign_batch([Assertion("st", "p", i, timestamp=i) for i in range(2)])
    db.put_many(members, envelope=envelope)
    outsider = Assertion("nope", "p", 1)._with_proof((SIGNER.public_key,), (), envelope.id)
    with pytest.raises(stemedb.SignatureError, match=r"records\[1\] \(.*\): not a member of envelope"):
        db.put_encoded(*batch_of([claim(9), outsider]), hold_back=True)
    assert not db.contains(claim(9).id) and len(db) == 3


def test_ids_a_batch_came_with_must_be_the_ids_of_its_content(db):
    records = [claim(i, "came-as") for i in range(3)]
    blob, offsets, ids = stemedb.encode_many(records)
    claimed = np.array(ids, copy=True)
    claimed[1, 0] ^= 0xFF
    for hold_back in (False, True):
        with pytest.raises(stemedb.InvalidRecord, match=rf"records\[1\]: came as {bytes(claimed[1]).hex()} "
                           rf"but its content is {records[1].id.hex()}"):
            db.put_encoded(blob, offsets, ids=claimed, hold_back=hold_back)
        with pytest.raises(stemedb.InvalidRecord, match="expected one 32-byte ID each"):
            db.put_encoded(blob, offsets, ids=claimed[:2], hold_back=hold_back)
    assert len(db) == 0
    assert db.put_encoded(blob, offsets, ids=ids).tolist() == np.asarray(ids).tolist()
    assert len(db) == 3


def test_put_validated_skips_only_the_canonical_checks_it_was_given(db):
    records, envelope = mixed("v")
    blob, offsets = batch_of(records)
    ids, columns = _codec.validate_many(blob, offsets)
    assert np.array_equal(db.put_validated(blob, offsets, ids, columns), ids)
    assert db.get_many(ids) == records
    # the proofs are still checked: a forged signature refuses the batch, nothing is stored
    forged = claim(7)._with_proof(claim(7).signers, [(0, bytes(64))], None)
    blob, offsets = batch_of([claim(8), forged])
    ids, columns = _codec.validate_many(blob, offsets)
    with pytest.raises(stemedb.SignatureError, match=r"records\[1\]"):
        db.put_validated(blob, offsets, ids, columns)
    assert not db.contains(claim(8).id)
    blob, offsets = batch_of([claim(9)])
    ids, columns = _codec.validate_many(blob, offsets)
    with pytest.raises(ValueError, match=r"1 records, IDs of shape \(2, 32\)"):
        db.put_validated(blob, offsets, np.vstack([ids, ids]), columns)
    with pytest.raises(TypeError, match="blob must be bytes, got bytearray"):
        db.put_validated(bytearray(blob), offsets, ids, columns)
    assert not db.contains(claim(9).id)
