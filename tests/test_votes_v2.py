"""Votes that carry their assertion's subject (format version 2) in the engine.

A version-2 vote's subject key is its `place` (its `subject` column stays 0,
so subject scans never return votes); a store that holds the voted
assertion, or gets it in the same batch, refuses a vote that names another
subject, by every write path, and stores nothing of the batch; the client's
byte-level group signing keeps the version byte.
"""

from __future__ import annotations

import numpy as np
import pytest
from faults import NoSyncFiles

import stemedb
from stemedb import _codec, _protocol
from stemedb.errors import InvalidRecord

SIGNER = stemedb.Signer.from_seed(bytes([0x51]) * 32)


@pytest.fixture
def db(tmp_path):
    store = stemedb.open(tmp_path / "s", files=NoSyncFiles(), segment_size=1 << 20)
    yield store
    store.close()


def test_place_is_the_subject_key_of_assertions_and_version_2_votes_only(db):
    claim = stemedb.Assertion("aspirin", "treats", "x", timestamp=1).sign(SIGNER)
    records = [claim,
               stemedb.Vote(claim, 1.0, timestamp=2).sign(SIGNER),
               stemedb.Vote(claim.id, 1.0, timestamp=3).sign(SIGNER),
               stemedb.Epoch("e", timestamp=4).sign(SIGNER)]
    db.put_many(records)
    key = _codec.subject_key("aspirin")
    assert db.view.column("place").tolist() == [key, key, 0, 0]
    assert db.view.column("subject").tolist() == [key, 0, 0, 0]
    assert [r.id for r in db.scan(subject="aspirin")] == [claim.id]      # no vote in subject scans
    members, envelope = SIGNER.sign_batch([stemedb.Vote(claim, 0.5, timestamp=5)])
    db.put_many(members, envelope=envelope)
    assert db.view.column("place").tolist()[-2:] == [0, key]           # the envelope, then its member


def test_a_vote_naming_another_subject_than_its_stored_assertion_is_refused(db):
    claim = stemedb.Assertion("aspirin", "treats", "x", timestamp=1).sign(SIGNER)
    db.put(claim)
    liar = stemedb.Vote(claim.id, 1.0, timestamp=2, subject="ibuprofen").sign(SIGNER)
    honest = stemedb.Vote(claim, 1.0, timestamp=3).sign(SIGNER)
    expected = (r"records\[1\]: subject: 'ibuprofen' is not the subject of assertion "
                f"{claim.id.hex()}, the one it votes on")
    with pytest.raises(InvalidRecord, match=expected):
        db.put_many([honest, liar])
    blob, offsets, _ = _codec.encode_many([honest, liar])
    with pytest.raises(InvalidRecord, match=expected):
        db.put_encoded(blob, offsets)
    members, envelope = SIGNER.sign_batch([honest, liar])
    with pytest.raises(InvalidRecord, match=r"records\[1\]: subject: 'ibuprofen'"):
        db.put_many(members, envelope=envelope)
    writer = db.writer(SIGNER)
    with pytest.raises(InvalidRecord, match=r"records\[0\]: subject: 'ibuprofen'"):
        writer.put(stemedb.Vote(claim.id, 1.0, timestamp=4, subject="ibuprofen"))
    assert len(db) == 1
    db.put(honest)
    assert honest.id in db


def test_a_vote_is_checked_against_an_assertion_in_the_same_batch(db):
    claim = stemedb.Assertion("aspirin", "treats", "x", timestamp=1).sign(SIGNER)
    liar = stemedb.Vote(claim.id, 1.0, timestamp=2, subject="other").sign(SIGNER)
    with pytest.raises(InvalidRecord, match=r"records\[1\]: subject: 'other' is not the subject"):
        db.put_many([claim, liar])
    assert len(db) == 0
    db.put_many([claim, stemedb.Vote(claim, 1.0, timestamp=2).sign(SIGNER)])
    assert len(db) == 2


def test_a_vote_on_an_assertion_this_store_lacks_is_accepted_and_placed_by_its_subject(db):
    vote = stemedb.Vote(bytes(32), 1.0, timestamp=2, subject="anything").sign(SIGNER)
    db.put(vote)
    assert db.view.column("place").tolist() == [_codec.subject_key("anything")]


def test_a_subject_on_a_vote_for_a_record_that_is_not_an_assertion_is_refused(db):
    epoch = stemedb.Epoch("e", timestamp=1).sign(SIGNER)
    db.put(epoch)
    with pytest.raises(InvalidRecord, match=f"records\\[0\\]: subject: the vote names subject 's', but the "
                                            f"record it votes on, {epoch.id.hex()}, is an epoch"):
        db.put(stemedb.Vote(epoch.id, 1.0, timestamp=2, subject="s").sign(SIGNER))
    db.put(stemedb.Vote(epoch.id, 1.0, timestamp=2).sign(SIGNER))   # version 1: not checked, as before
    assert len(db) == 2


def test_group_signing_on_the_client_keeps_version_2():
    claim = stemedb.Assertion("aspirin", "treats", "x", timestamp=1)
    drafts = [stemedb.Vote(claim, 1.0, timestamp=2), stemedb.Vote(claim.id, 0.5, timestamp=3)]
    blob, offsets, _ = _codec.encode_many(drafts)
    rewritten, member_offsets = _protocol.envelope_members(blob, offsets, SIGNER.public_key)
    members, _envelope = SIGNER.sign_batch(drafts)
    decoded = _codec.decode_many(bytes(rewritten), member_offsets)
    assert [m.format_version for m in decoded] == [2, 1] and decoded[0].subject == "aspirin"
    assert [m.id for m in decoded] == [m.id for m in members]
    assert np.array_equal(_codec.hash_encoded(bytes(rewritten), member_offsets),
                          _codec.ids_of(members))
