"""Column extraction agrees with the records it was extracted from."""

from __future__ import annotations

import blake3
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import SIGNERS, any_record

import stemedb
from stemedb import RecordKind, _codec


@given(st.lists(any_record, min_size=1, max_size=15))
def test_columns_match_record_fields(records):
    blob, offsets, _ = stemedb.encode_many(records)
    columns = _codec.extract_columns(blob, offsets[:-1], np.diff(offsets))
    for i, record in enumerate(records):
        kind = RecordKind[type(record).__name__.upper()]
        assert columns["kind"][i] == kind
        proof = 2 if record.envelope is not None else 1 if record.signatures else 0
        assert columns["proof"][i] == proof
        assert columns["timestamp"][i] == record.timestamp
        signer = int.from_bytes(record.signers[0][:8], "little") if record.signers else 0
        assert columns["signer"][i] == signer
        if kind == RecordKind.ASSERTION:
            assert columns["subject"][i] == _codec.subject_key(record.subject)
            assert columns["predicate"][i] == _codec.predicate_key(record.predicate)
            assert columns["pair"][i] == _codec.pair_key(record.subject, record.predicate)
            assert columns["confidence"][i] == np.float32(record.confidence)
            assert columns["source_class"][i] == int(record.source_class)
            assert columns["lifecycle"][i] == int(record.lifecycle)
            epoch = _codec.id_key(record.epoch) if record.epoch else 0
            assert columns["epoch"][i] == epoch
            parent = _codec.id_key(record.parent_hash) if record.parent_hash else 0
            assert columns["target"][i] == parent
        else:
            assert columns["subject"][i] == 0 and columns["source_class"][i] == 255
        if kind == RecordKind.VOTE:
            assert columns["target"][i] == _codec.id_key(record.assertion_id)
            assert columns["confidence"][i] == np.float32(record.weight)


def test_equal_objects_share_an_object_key_and_different_ones_do_not():
    a = stemedb.Assertion("s", "p", "x", timestamp=1)
    b = stemedb.Assertion("t", "q", "x", timestamp=2, confidence=0.5)
    c = stemedb.Assertion("s", "p", stemedb.Ref("x"), timestamp=3)
    blob, offsets, _ = stemedb.encode_many([a, b, c])
    keys = _codec.extract_columns(blob, offsets[:-1], np.diff(offsets))["object"]
    assert keys[0] == keys[1] != keys[2]


def test_pair_key_separates_subject_and_predicate_boundaries():
    assert _codec.pair_key("ab", "c") != _codec.pair_key("a", "bc")


def test_pair_key_hashes_the_pair_as_encoded():
    joined = b"\x02\x00ab\x01\x00c"  # u16 len(subject) subject u16 len(predicate) predicate
    expected = int.from_bytes(blake3.blake3(joined).digest()[:8], "little")
    assert _codec.pair_key("ab", "c") == expected


@given(any_record, st.data())
def test_extraction_refuses_exactly_what_the_shared_walk_refuses(record, data):
    """Columns and decoding read through one walk: a record that breaks the layout is
    refused by both with the same message; one that keeps it is extracted."""
    encoded = bytearray(record.encode())
    if data.draw(st.booleans(), label="truncate"):
        encoded = encoded[:data.draw(st.integers(1, len(encoded) - 1), label="cut")]
    else:
        position = data.draw(st.integers(0, len(encoded) - 1), label="position")
        encoded[position] ^= data.draw(st.integers(1, 255), label="flip")
    try:
        stemedb.decode(bytes(encoded))
        decode_error = None
    except stemedb.InvalidRecord as exc:
        decode_error = str(exc)
    try:
        _codec.extract_columns(bytes(encoded), [0], [len(encoded)])
    except stemedb.InvalidRecord as exc:
        assert decode_error is not None and str(exc) == f"record 0: {decode_error}"
    else:  # the walk passed: decoding may refuse only a rule that it alone checks
        assert decode_error is None or not _is_walk_failure(decode_error)


def _is_walk_failure(message):
    return ": truncated:" in message or message.startswith(
        ("version: unknown", "kind: unknown", "content_length:", "object: unknown object tag",
         "proof: unknown"))


@pytest.mark.parametrize("edit, message", [
    (lambda b, c: b[:3], "content_length: truncated: needs 4 bytes at offset 2, only 1 left"),
    (lambda b, c: b[:2] + (8).to_bytes(4, "little") + b[6:],  # the keys may not run into the proof
     "signers: truncated: needs 32 bytes at offset 7, only 1 left"),
    (lambda b, c: b[:2] + bytes([6, 0, 0, 0]) + b[6:],
     "content_length: header declares 6 bytes, fewer than the header and signer count need"),
    (lambda b, c: b[:2] + (c + 1).to_bytes(4, "little") + b[6:c] + b"\0" + b[c:],
     "content_length: header declares 115 bytes but the fields end at 114"),
    (lambda b, c: b[:56] + b"\x09" + b[57:], "object: unknown object tag 9"),
    (lambda b, c: b[:c] + b"\x07" + b[c + 1:], "proof: unknown proof kind 7"),
    (lambda b, c: b[:c + 2], "signatures: truncated: needs 65 bytes at offset 116, only 0 left"),
])
def test_a_broken_layout_is_named_by_field_in_decoding_and_extraction(edit, message):
    # docs/format.md, "Worked example": 114 bytes of content, the object tag at offset 56
    record = stemedb.Assertion("aspirin", "treats", stemedb.Ref("headache"), confidence=0.75,
                               timestamp=1_700_000_000_000_000, source_class="clinical",
                               lifecycle="approved").sign(SIGNERS[0])
    content = len(record.content())
    assert content == 114 and record.encode()[56] == 4
    broken = edit(record.encode(), content)
    with pytest.raises(stemedb.InvalidRecord) as decoding:
        stemedb.decode(broken)
    assert str(decoding.value) == message
    with pytest.raises(stemedb.InvalidRecord) as extraction:
        _codec.extract_columns(broken, [0], [len(broken)])
    assert str(extraction.value) == f"record 0: {message}"


# Pinned values: keys are persisted in snapshots, so these must never change.
# Each is also recomputed from the `blake3` package (first 8 bytes, little-endian).
GOLDEN_KEYS = [
    ("", 0xA6A1F9F5B94913AF),
    ("abc", 0x33514638ACB33764),
    ("subject", 0x682E2AD04E72B4FA),
    ("ünïcode predicate", 0x331DF9AC85F2B75D),
    ("x" * 5000, 0x93BAB55ECD12B752),
]


def test_keys_are_pinned_blake3_prefixes():
    import blake3

    for text, expected in GOLDEN_KEYS:
        assert int.from_bytes(blake3.blake3(text.encode()).digest()[:8], "little") == expected
        assert _codec.subject_key(text) == expected
        assert _codec.predicate_key(text) == expected
    record_id = bytes(range(32))
    assert _codec.id_key(record_id) == int.from_bytes(record_id[:8], "little")
