"""Canonical encoding: round trips, compiled vs reference, IDs, strict decoding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import SIGNERS, any_record, assertions, signed_records, unsigned_records

import stemedb
from stemedb import _codec
from stemedb import _reference as reference


@given(any_record)
def test_round_trip_every_kind(record):
    data = record.encode()
    assert stemedb.decode(data) == record
    assert stemedb.decode(data).encode() == data


@given(any_record)
def test_compiled_and_reference_encoders_agree(record):
    assert reference.encode(record) == record.encode()
    assert reference.content(record) == record.content()
    assert reference.record_id(record) == record.id
    assert reference.id_of_encoded(record.encode()) == record.id
    assert reference.decode(record.encode()) == record


@given(st.lists(any_record, max_size=20))
def test_batch_forms_match_single_forms(records):
    blob, offsets, ids = stemedb.encode_many(records)
    assert ids.shape == (len(records), 32)
    assert offsets[0] == 0 and offsets[-1] == len(blob)
    for i, record in enumerate(records):
        assert blob[offsets[i]:offsets[i + 1]] == record.encode()
        assert bytes(ids[i]) == record.id
    assert stemedb.decode_many(blob, offsets) == records
    assert np.array_equal(_codec.hash_encoded(blob, offsets), ids)


@given(assertions(), st.data())
def test_any_content_change_changes_the_id(record, data):
    field = data.draw(st.sampled_from(
        ["subject", "predicate", "object", "confidence", "timestamp", "source_class",
         "lifecycle", "source_hash", "parent_hash", "epoch", "signers"]))
    kwargs = dict(
        confidence=record.confidence, timestamp=record.timestamp,
        source_class=record.source_class, lifecycle=record.lifecycle,
        source_hash=record.source_hash, parent_hash=record.parent_hash, epoch=record.epoch,
        visual_hash=record.visual_hash, vector=record.vector, signers=record.signers,
    )
    subject, predicate, value = record.subject, record.predicate, record.object
    if field == "subject":
        subject = subject + "x"
    elif field == "predicate":
        predicate = predicate + "x"
    elif field == "object":
        value = [value] if False else ("x" if value != "x" else "y")
    elif field == "confidence":
        kwargs["confidence"] = 0.5 if record.confidence != 0.5 else 0.25
    elif field == "timestamp":
        kwargs["timestamp"] = (record.timestamp + 1) % 2**64
    elif field == "source_class":
        kwargs["source_class"] = (int(record.source_class) + 1) % 7
    elif field == "lifecycle":
        kwargs["lifecycle"] = (int(record.lifecycle) + 1) % 5
    elif field == "source_hash":
        kwargs["source_hash"] = bytes([record.source_hash[0] ^ 1]) + record.source_hash[1:]
    elif field == "parent_hash":
        kwargs["parent_hash"] = None if record.parent_hash else bytes(32)
    elif field == "epoch":
        kwargs["epoch"] = None if record.epoch else bytes(32)
    else:
        kwargs["signers"] = (SIGNERS[0].public_key,) if not record.signers else ()
    changed = stemedb.Assertion(subject, predicate, value, **kwargs)
    assert changed.id != record.id


def test_flipping_any_content_byte_changes_the_id_or_is_refused():
    record = stemedb.Assertion("aspirin", "treats", "headache", timestamp=1).sign(SIGNERS[0])
    content = record.content()
    for i in range(len(content)):
        data = bytearray(record.encode())
        data[i] ^= 0x01
        try:
            other = stemedb.decode(bytes(data))
        except stemedb.InvalidRecord:
            continue
        assert other.id != record.id
        with pytest.raises(stemedb.SignatureError):
            other.verify()


@given(any_record, st.data())
def test_truncation_and_extension_raise_invalid_record(record, data):
    encoded = record.encode()
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    with pytest.raises(stemedb.InvalidRecord):
        stemedb.decode(encoded[:cut])
    with pytest.raises(stemedb.InvalidRecord):
        reference.decode(encoded[:cut])
    extra = data.draw(st.binary(min_size=1, max_size=8))
    with pytest.raises(stemedb.InvalidRecord, match="trailing bytes"):
        stemedb.decode(encoded + extra)
    with pytest.raises(stemedb.InvalidRecord, match="trailing bytes"):
        reference.decode(encoded + extra)


@given(st.binary(max_size=300))
def test_random_bytes_decode_or_raise_invalid_record(data):
    compiled_error = reference_error = None
    try:
        compiled = stemedb.decode(data)
    except stemedb.InvalidRecord as exc:
        compiled_error = exc
    try:
        ref = reference.decode(data)
    except stemedb.InvalidRecord as exc:
        reference_error = exc
    assert (compiled_error is None) == (reference_error is None)
    if compiled_error is None:
        assert compiled == ref and compiled.encode() == data


@given(unsigned_records, st.integers(min_value=0, max_value=200))
def test_mutated_encodings_agree_between_implementations(record, position):
    data = bytearray(record.encode())
    data[position % len(data)] ^= 0xFF
    outcomes = []
    for decoder in (stemedb.decode, reference.decode):
        try:
            outcomes.append(decoder(bytes(data)).encode())
        except stemedb.InvalidRecord:
            outcomes.append(None)
    assert outcomes[0] == outcomes[1]


def _encoded(record):
    return bytearray(record.encode())


def test_decode_names_unknown_version_and_kind():
    data = _encoded(stemedb.Assertion("s", "p", 1, timestamp=1))
    data[0] = 9
    with pytest.raises(stemedb.InvalidRecord, match="version"):
        stemedb.decode(bytes(data))
    data[0] = 1
    data[1] = 7
    with pytest.raises(stemedb.InvalidRecord, match="kind"):
        stemedb.decode(bytes(data))


def test_version_2_is_for_votes_only_and_carries_a_subject():
    vote = stemedb.Vote(bytes(32), 1.0, timestamp=1, subject="s")
    assert stemedb.decode(vote.encode()).subject == "s"
    for record in (stemedb.Assertion("s", "p", 1, timestamp=1), stemedb.Epoch("e", timestamp=1)):
        data = _encoded(record)
        data[0] = 2
        with pytest.raises(stemedb.InvalidRecord, match=r"^version: format version 2 is defined for "
                                                        r"votes \(kind 2\) only, not for kind"):
            stemedb.decode(bytes(data))
        with pytest.raises(stemedb.InvalidRecord, match="version"):
            reference.decode(bytes(data))
    v1 = _encoded(stemedb.Vote(bytes(32), 1.0, timestamp=1))
    v1[0] = 2   # a version-1 body read as version 2 lacks the subject
    with pytest.raises(stemedb.InvalidRecord, match="subject length: truncated"):
        stemedb.decode(bytes(v1))
    v2 = _encoded(vote)
    v2[0] = 1   # a version-2 body read as version 1 has bytes after its fields
    with pytest.raises(stemedb.InvalidRecord, match="content_length"):
        stemedb.decode(bytes(v2))
    data = _encoded(vote)
    data[0] = 3
    with pytest.raises(stemedb.InvalidRecord, match=r"unknown format version 3 \(this build reads 1, "
                                                    r"and 2 for votes\)"):
        stemedb.decode(bytes(data))


def test_decode_refuses_non_canonical_floats():
    record = stemedb.Assertion("s", "p", 0.0, confidence=0.0, timestamp=1)
    data = _encoded(record)
    # object (number) follows subject/predicate: 6 header + 1 signers + 2+1 + 2+1 + 1 tag
    at = 6 + 1 + 3 + 3 + 1
    data[at + 7] = 0x80  # -0.0 as f64
    with pytest.raises(stemedb.InvalidRecord, match="negative zero"):
        stemedb.decode(bytes(data))
    data = _encoded(record)
    data[at + 8:at + 12] = bytes.fromhex("0000c07f")  # NaN confidence
    with pytest.raises(stemedb.InvalidRecord, match="confidence"):
        stemedb.decode(bytes(data))


def test_decode_rejects_empty_and_wrong_types():
    with pytest.raises(stemedb.InvalidRecord, match="empty"):
        stemedb.decode(b"")
    with pytest.raises(stemedb.InvalidRecord, match="bytes-like"):
        stemedb.decode("not bytes")


def test_offsets_are_validated():
    records = [stemedb.Assertion("s", "p", i, timestamp=i) for i in range(3)]
    blob, offsets, _ = stemedb.encode_many(records)
    bad = offsets.copy()
    bad[1] = len(blob) + 5
    with pytest.raises(ValueError, match=r"offsets\[1\]"):
        stemedb.decode_many(blob, bad)


def test_encode_many_rejects_non_records():
    with pytest.raises(stemedb.InvalidRecord, match=r"records\[1\]"):
        stemedb.encode_many([stemedb.Assertion("s", "p", 1), "nope"])


@given(signed_records())
def test_pickle_round_trip(record):
    import pickle

    assert pickle.loads(pickle.dumps(record)) == record


def test_limits_match_the_format_document():
    import pathlib

    doc = (pathlib.Path(__file__).parent.parent / "docs" / "format.md").read_text()
    rows = {line.split("|")[1].strip(" `"): line for line in doc.splitlines()
            if line.startswith("| `MAX_")}
    for name, value in [("MAX_SUBJECT", 1024), ("MAX_PREDICATE", 256), ("MAX_TEXT", 1 << 20),
                        ("MAX_REFERENCE", 1024), ("MAX_BYTES", 1 << 20), ("MAX_VECTOR", 4096),
                        ("MAX_EPOCH_NAME", 256), ("MAX_DESCRIPTION", 1 << 16),
                        ("MAX_SUPERSEDES", 1024), ("MAX_MEMBERS", 1_000_000),
                        ("MAX_SIGNER_COUNT", 16)]:
        assert getattr(_codec, name) == value, name
        assert name in rows, f"{name} missing from the limits table of docs/format.md"
        assert f"{value:,}" in rows[name], f"{name}: docs/format.md disagrees with the code"


def test_byte_order_is_written_once_in_the_shared_pxd():
    import pathlib
    import re

    ext = pathlib.Path(__file__).parent.parent / "ext" / "stemedb"
    helper = re.compile(r"^cdef inline \S+ (?:get|put)_[uf]\d+\(", re.M)
    shared = helper.findall((ext / "_bytes.pxd").read_text())
    assert len(shared) == 11  # put and get of u8 (put only), u16, u32, u64, f32, f64
    for source in sorted(ext.glob("*.pyx")):
        assert not helper.search(source.read_text()), f"{source.name} defines its own byte helpers"


def test_reference_is_an_independent_reading_that_agrees_on_the_kinds():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(reference))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names}
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "stemedb._codec" not in modules and "_codec" not in imported
    assert "RecordKind" not in imported
    assert (reference.KIND_ASSERTION, reference.KIND_VOTE, reference.KIND_EPOCH,
            reference.KIND_ENVELOPE) == tuple(stemedb.RecordKind)


@given(st.lists(st.one_of(any_record, unsigned_records.map(lambda r: ("member", r))), max_size=12))
def test_envelope_proofs_read_what_decoding_reads(items):
    records = [item for item in items if not isinstance(item, tuple)]
    members = [item[1] for item in items if isinstance(item, tuple)]
    if members:
        records += SIGNERS[0].sign_batch(members)[0]
    blob, offsets, _ = stemedb.encode_many(records)
    envelopes, signers, ok = _codec.envelope_proofs(blob, offsets)
    for i, record in enumerate(records):
        proven = record.envelope is not None and len(record.signers) == 1
        assert ok[i] == proven
        assert bytes(envelopes[i]) == (record.envelope if proven else bytes(32))
        assert bytes(signers[i]) == (record.signers[0] if proven else bytes(32))


def test_content_lengths_name_the_record_and_field():
    record = stemedb.Assertion("s", "p", 1, timestamp=1)
    data = record.encode()
    assert _codec.content_lengths(data + data, [0, len(data), 2 * len(data)]).tolist() == \
        [len(record.content())] * 2
    with pytest.raises(stemedb.InvalidRecord,
                       match=r"^record 1: content_length: truncated: needs 4 bytes at offset 2, only 2 left$"):
        _codec.content_lengths(data + data[:4], [0, len(data), len(data) + 4])
