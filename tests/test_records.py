"""Record construction: Python value mapping, defaults, validation messages, immutability."""

from __future__ import annotations

import enum
import math
import pathlib
import re
import time

import numpy as np
import pytest

import stemedb
from stemedb import (
    Assertion,
    Envelope,
    Epoch,
    Lifecycle,
    RecordKind,
    Ref,
    SourceClass,
    Vote,
    _codec,
)


def test_object_values_map_from_python():
    assert Assertion("s", "p", "text").object == "text"
    assert Assertion("s", "p", 3).object == 3.0
    assert isinstance(Assertion("s", "p", 3).object, float)
    assert Assertion("s", "p", 2.5).object == 2.5
    assert Assertion("s", "p", True).object is True
    assert Assertion("s", "p", False).object is False
    assert Assertion("s", "p", Ref("acme")).object == Ref("acme")
    assert Assertion("s", "p", b"\x00\x01").object == b"\x00\x01"
    assert Assertion("s", "p", True).object_tag == 3
    assert Assertion("s", "p", 1).object_tag == 2


def test_defaults():
    before = time.time_ns() // 1000
    a = Assertion("s", "p", "o")
    after = time.time_ns() // 1000
    assert before <= a.timestamp <= after
    assert a.confidence == 1.0
    assert a.source_class is SourceClass.OBSERVATIONAL
    assert a.lifecycle is Lifecycle.PROPOSED
    assert a.source_hash == bytes(32)
    assert a.parent_hash is None and a.epoch is None and a.vector is None
    assert a.signers == () and a.signatures == () and a.envelope is None


def test_enums_by_member_name_and_number():
    for value in (SourceClass.PEER_REVIEWED, "peer_reviewed", "PeerReviewed", 2):
        assert Assertion("s", "p", 1, source_class=value).source_class is SourceClass.PEER_REVIEWED
    assert Assertion("s", "p", 1, lifecycle="approved").lifecycle is Lifecycle.APPROVED
    e = Epoch("e", supersession_kind="retracts")
    assert e.supersession_kind is stemedb.SupersessionKind.RETRACTS


def test_records_are_immutable_and_compare_by_value():
    a = Assertion("s", "p", "o", timestamp=5)
    b = Assertion("s", "p", "o", timestamp=5)
    assert a == b and hash(a) == hash(b) and a.id == b.id
    assert a != Assertion("s", "p", "o", timestamp=6)
    with pytest.raises(AttributeError):
        a.subject = "x"
    with pytest.raises(AttributeError):
        a.extra = 1
    assert len({a, b}) == 1


def test_confidence_is_stored_as_float32():
    a = Assertion("s", "p", 1, confidence=0.1)
    assert a.confidence == pytest.approx(0.1) and a.confidence != 0.1
    assert stemedb.decode(a.encode()).confidence == a.confidence


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(subject=""), "subject: must not be empty"),
        (dict(subject="x" * 1025), "subject: 1025 bytes"),
        (dict(subject="é" * 513), "subject: 1026 bytes"),
        (dict(subject=5), "subject: expected str"),
        (dict(subject="\ud800"), "subject: not encodable"),
        (dict(predicate=""), "predicate: must not be empty"),
        (dict(predicate="p" * 257), "predicate: 257 bytes"),
        (dict(confidence=math.nan), "confidence: NaN"),
        (dict(confidence=math.inf), "confidence: inf is outside"),
        (dict(confidence=1.5), "confidence: 1.5 is outside"),
        (dict(confidence=-0.1), "confidence: -0.1 is outside"),
        (dict(confidence="high"), "confidence: expected a number"),
        (dict(source_class="gossip"), "source_class: unknown value 'gossip'"),
        (dict(source_class=7), "source_class: unknown value 7"),
        (dict(lifecycle=9), "lifecycle: unknown value 9"),
        (dict(lifecycle=True), "lifecycle: expected a name or number, got bool"),
        (dict(source_hash=b"short"), "source_hash: expected 32 bytes, got 5"),
        (dict(parent_hash=b"x" * 33), "parent_hash: expected 32 bytes, got 33"),
        (dict(epoch="abc"), "epoch: expected 32 bytes, got str"),
        (dict(visual_hash=b"x" * 9), "visual_hash: expected 8 bytes"),
        (dict(vector=[]), "vector: 0 values"),
        (dict(vector=[math.nan]), "vector: every value must be finite"),
        (dict(vector=[1e39]), "vector: every value must be finite"),
        (dict(timestamp=-1), "timestamp: -1 is outside"),
        (dict(timestamp=2**64), "timestamp: .* is outside"),
        (dict(timestamp=1.5), "timestamp: expected int"),
        (dict(signers=[b"k" * 31]), "signers: expected 32 bytes"),
        (dict(signers=[b"k" * 32, b"k" * 32]), "signers: public key .* listed twice"),
        (dict(signers=b"k" * 32), "signers: expected a sequence"),
        (dict(object=math.nan), r"object \(number\): nan is not finite"),
        (dict(object=2**60), r"object \(number\): integer"),
        (dict(object=[1, 2]), "object: unsupported type list"),
        (dict(object=None), "object: unsupported type NoneType"),
        (dict(object=b"x" * ((1 << 20) + 1)), r"object \(bytes\)"),
    ],
)
def test_invalid_assertions_name_the_field(kwargs, field):
    args = dict(subject="s", predicate="p", object="o")
    args.update({k: kwargs.pop(k) for k in list(kwargs) if k in args})
    with pytest.raises(stemedb.InvalidRecord, match=field):
        Assertion(args["subject"], args["predicate"], args["object"], **kwargs)


def test_invalid_ref():
    with pytest.raises(stemedb.InvalidRecord, match="reference"):
        Ref("")
    with pytest.raises(stemedb.InvalidRecord, match="reference"):
        Ref("r" * 1025)


def test_invalid_votes_epochs_envelopes():
    with pytest.raises(stemedb.InvalidRecord, match="assertion_id: expected 32 bytes"):
        Vote(b"x", 1.0)
    with pytest.raises(stemedb.InvalidRecord, match="weight"):
        Vote(bytes(32), math.inf)
    with pytest.raises(stemedb.InvalidRecord, match="weight"):
        Vote(bytes(32), 1e39)
    with pytest.raises(stemedb.InvalidRecord, match="name: must not be empty"):
        Epoch("")
    with pytest.raises(stemedb.InvalidRecord, match="supersedes: an epoch ID is listed twice"):
        Epoch("e", supersedes=[bytes(32), bytes(32)])
    with pytest.raises(stemedb.InvalidRecord, match="supersession_kind"):
        Epoch("e", supersession_kind="merges")
    with pytest.raises(stemedb.InvalidRecord, match="members: 0 record IDs"):
        Envelope(bytes(32), [])
    with pytest.raises(stemedb.InvalidRecord, match="members: expected 32 bytes"):
        Envelope(bytes(32), [b"x"])


def test_a_vote_on_an_assertion_carries_its_subject_and_a_bare_id_does_not():
    a = Assertion("aspirin", "treats", "o", timestamp=1)
    on_object = Vote(a, 0.5, timestamp=2)
    assert (on_object.format_version, on_object.subject) == (2, "aspirin")
    assert on_object.content()[0] == 2
    bare = Vote(a.id, 0.5, timestamp=2)
    assert (bare.format_version, bare.subject) == (1, None) and bare.content()[0] == 1
    named = Vote(a.id, 0.5, timestamp=2, subject="aspirin")
    assert named == on_object and named.id == on_object.id != bare.id
    # the subject is part of the content, so covered by the ID
    assert Vote(a.id, 0.5, timestamp=2, subject="aspirin!").id != named.id
    assert Vote(a, 0.5, timestamp=2, subject="aspirin") == on_object
    with pytest.raises(stemedb.InvalidRecord, match=r"subject: 'ibuprofen' is not the subject of "
                                                    r"the assertion voted on \('aspirin'\)"):
        Vote(a, 0.5, subject="ibuprofen")
    with pytest.raises(stemedb.InvalidRecord, match="subject: must not be empty"):
        Vote(a.id, 0.5, subject="")
    with pytest.raises(stemedb.InvalidRecord, match="subject"):
        Vote(a.id, 0.5, subject="s" * 1025)
    assert Vote(a.id, 0.5, subject="s" * 1024).subject == "s" * 1024
    assert stemedb.decode(on_object.encode()) == on_object
    assert stemedb.decode(bare.encode()).subject is None


def test_records_accepted_where_ids_are_expected():
    a = Assertion("s", "p", "o")
    assert Vote(a, 1.0).assertion_id == a.id
    e1 = Epoch("2024")
    assert Epoch("2025", supersedes=[e1]).supersedes == (e1.id,)
    assert Assertion("s", "p", "o", parent_hash=a, epoch=e1).parent_hash == a.id


def test_revise_points_at_the_parent():
    a = Assertion("s", "p", "o", confidence=0.4)
    b = a.revise(lifecycle="approved")
    assert b.parent_hash == a.id and b.lifecycle is Lifecycle.APPROVED
    assert b.object == "o" and b.confidence == a.confidence


def test_to_dict_is_json_ready():
    import json

    a = Assertion("s", "p", Ref("x"), vector=[1.0, 2.0])
    d = json.loads(json.dumps(a.to_dict()))
    assert d["object"] == {"ref": "x"} and d["id"] == a.id.hex() and d["vector"] == [1.0, 2.0]


def test_negative_zero_is_normalised_so_equal_values_share_an_id():
    assert Assertion("s", "p", -0.0, timestamp=1).id == Assertion("s", "p", 0.0, timestamp=1).id
    assert Vote(bytes(32), -0.0, timestamp=1).id == Vote(bytes(32), 0.0, timestamp=1).id


def test_record_kind_is_the_kind_byte_the_codec_writes_reads_and_extracts():
    signer = stemedb.Signer.from_seed(bytes(32))
    assertion = Assertion("s", "p", 1, timestamp=1)
    records = {
        RecordKind.ASSERTION: assertion,
        RecordKind.VOTE: Vote(assertion, 0.5, timestamp=2),
        RecordKind.EPOCH: Epoch("e", timestamp=3),
        RecordKind.ENVELOPE: Envelope(signer.public_key, [assertion.id], timestamp=4).sign(signer),
    }
    assert stemedb.RecordKind is RecordKind and issubclass(RecordKind, enum.IntEnum)
    for kind, record in records.items():
        encoded = record.encode()
        assert encoded[1] == kind
        assert type(stemedb.decode(encoded)) is type(record)
    blob, offsets, _ = stemedb.encode_many(list(records.values()))
    kinds = _codec.extract_columns(blob, offsets[:-1], np.diff(offsets))["kind"]
    assert kinds.tolist() == list(records)
    assert (kinds == RecordKind.VOTE).tolist() == [False, True, False, False]


def test_record_kind_matches_the_format_document():
    doc = (pathlib.Path(__file__).parent.parent / "docs" / "format.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| 1 | u8 | `kind` |"))
    documented = {int(code): name for code, name in re.findall(r"(\d) (\w+)", row.split("|")[4])}
    assert documented == {kind.value: kind.name.title() for kind in RecordKind}
