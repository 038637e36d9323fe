"""`_codec.validate_many` refuses exactly what decoding refuses, with the same message.

The engine stores records that arrive encoded (a client's PUT, a peer's
records) after `validate_many` has judged their bytes in C, without building
objects. Decoding (`decode_at`) states the same rules in Python-visible
words. These tests hold the two together: every single-byte change of
records of every kind, random damage, and each rule on its own field.
"""

from __future__ import annotations

import struct

import blake3
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import SIGNERS, any_record

import stemedb
from stemedb import Assertion, Envelope, Epoch, Ref, Vote, _codec

SIGNER, COSIGNER, THIRD = SIGNERS
INTERESTING = (0x00, 0x01, 0x02, 0x05, 0x07, 0x10, 0x20, 0x3F, 0x7F, 0x80, 0x9F, 0xA0, 0xBF,
               0xC0, 0xC2, 0xDF, 0xE0, 0xED, 0xEF, 0xF0, 0xF4, 0xF5, 0xFE, 0xFF)


def outcome(data: bytes) -> tuple[str, object]:
    """("ok", (ids, columns)) or ("refused", message) of validate_many on one record."""
    try:
        return "ok", _codec.validate_many(data, np.array([0, len(data)], dtype=np.int64))
    except stemedb.InvalidRecord as exc:
        return "refused", str(exc)


def decoding(data: bytes) -> str | None:
    try:
        _codec.decode_many(data, np.array([0, len(data)], dtype=np.int64))
    except stemedb.InvalidRecord as exc:
        return str(exc)
    return None


def assert_agrees(data: bytes) -> None:
    expected = decoding(data)
    verdict, value = outcome(data)
    if expected is not None:
        assert verdict == "refused", f"validate_many accepted what decoding refuses: {expected}"
        assert value == expected
        return
    assert verdict == "ok", f"validate_many refused what decoding accepts: {value}"
    ids, columns = value  # type: ignore[misc]
    content = len(stemedb.decode(data).content())
    assert bytes(ids[0]) == blake3.blake3(data[:content]).digest()
    extracted = _codec.extract_columns(data, [0], [len(data)])
    for name, column in extracted.items():
        assert columns[name].tolist() == column.tolist(), name


SAMPLES = [
    Assertion("aspirin", "treats", Ref("headache"), confidence=0.75, timestamp=1_700_000_000_000_000,
              source_class="clinical", lifecycle="approved").sign(SIGNER),
    Assertion("s", "p", "héllo ✓ 𝄞", timestamp=5, parent_hash=bytes(range(32)), epoch=b"\x01" * 32,
              visual_hash=b"\x02" * 8, vector=[0.5, -1.25]).sign(SIGNER),
    Assertion("n", "p", 2.5, timestamp=1, signers=[SIGNER.public_key, COSIGNER.public_key])
    .sign(SIGNER).sign(COSIGNER),
    Assertion("b", "p", True, timestamp=1).sign(SIGNER),
    Assertion("y", "p", b"\x00\xff", timestamp=1),
    Vote(b"\x05" * 32, 0.5, timestamp=9).sign(SIGNER),
    Epoch("e", "desc ✓", supersedes=[b"\x03" * 32, b"\x04" * 32], timestamp=3).sign(SIGNER),
    Envelope(SIGNER.public_key, [b"\x06" * 32, b"\x07" * 32], timestamp=4).sign(SIGNER),
    Assertion("m", "p", 1, timestamp=1)._with_proof((SIGNER.public_key,), (), b"\x08" * 32),
    Vote(b"\x05" * 32, -1.0, timestamp=9, subject="aspirin ✓").sign(SIGNER),   # format version 2
]


@pytest.mark.parametrize("record", SAMPLES, ids=lambda r: type(r).__name__)
def test_every_single_byte_change_is_judged_as_decoding_judges_it(record):
    encoded = record.encode()
    assert_agrees(encoded)
    for position in range(len(encoded)):
        for value in INTERESTING:
            if encoded[position] != value:
                assert_agrees(encoded[:position] + bytes([value]) + encoded[position + 1:])
    for cut in range(len(encoded)):
        assert_agrees(encoded[:cut])
    assert_agrees(encoded + b"\x00")


@given(any_record, st.data())
def test_random_damage_is_judged_as_decoding_judges_it(record, data):
    encoded = bytearray(record.encode())
    for _ in range(data.draw(st.integers(1, 3), label="changes")):
        position = data.draw(st.integers(0, len(encoded) - 1), label="position")
        encoded[position] = data.draw(st.integers(0, 255), label="value")
    assert_agrees(bytes(encoded))


def replaced(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1 and len(old) == len(new)
    return data.replace(old, new)


def spliced(make, raw: bytes) -> bytes:
    """make(text)'s encoding (unsigned) with the bytes of `text` replaced by `raw`."""
    one, two = make("a" * len(raw)).encode(), make("b" * len(raw)).encode()
    at = next(i for i, (x, y) in enumerate(zip(one, two)) if x != y)
    assert one[at:at + len(raw)] == b"a" * len(raw)
    return one[:at] + raw + one[at + len(raw):]


TEXT_FIELDS = [
    lambda text: Assertion(text, "p", "v", timestamp=1),
    lambda text: Assertion("s", text, "v", timestamp=1),
    lambda text: Assertion("s", "p", text, timestamp=1),
    lambda text: Assertion("s", "p", Ref(text), timestamp=1),
    lambda text: Epoch(text, timestamp=1),
    lambda text: Vote(bytes(32), 1.0, timestamp=1, subject=text),
    lambda text: Epoch("e", text, timestamp=1),
]


@given(st.binary(min_size=1, max_size=24), st.sampled_from(TEXT_FIELDS))
def test_utf8_is_judged_as_python_judges_it(raw, make):
    assert_agrees(spliced(make, raw))


@pytest.mark.parametrize("raw", [
    b"\xc0\x80", b"\xc1\xbf", b"\xe0\x80\x80", b"\xe0\x9f\xbf", b"\xed\xa0\x80", b"\xed\xbf\xbf",
    b"\xf0\x80\x80\x80", b"\xf0\x8f\xbf\xbf", b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80", b"\xff",
    b"\x80", b"\xe2\x82", b"\xe2\x28\xa1", b"\xf0\x9d\x84", "€".encode(), "𝄞".encode(),
    "\ud7ff".encode(), "\ue000".encode(), "\U0010ffff".encode(), b"ok\xc3", b"\xc3\xa9\xc3",
])
@pytest.mark.parametrize("make", TEXT_FIELDS)
def test_utf8_edge_cases_in_every_text_field(raw, make):
    assert_agrees(spliced(make, raw))


FLOAT_SPECIALS = [struct.pack("<f", v) for v in (float("nan"), float("inf"), float("-inf"), -0.0,
                                                 1.0000001, -1e-30, 0.0, 1.0, 3e38)]
DOUBLE_SPECIALS = [struct.pack("<d", v) for v in (float("nan"), float("inf"), -0.0, 0.0, -1e300)]


@pytest.mark.parametrize("special", FLOAT_SPECIALS)
def test_canonical_floats_in_confidence_weight_and_vector(special):
    marker = struct.pack("<f", 0.3125)
    records = [Assertion("s", "p", "v", confidence=0.3125, timestamp=1),
               Vote(bytes(32), 0.3125, timestamp=1),
               Vote(bytes(32), 0.3125, timestamp=1, subject="s"),
               Assertion("s", "p", "v", timestamp=1, vector=[0.5, 0.3125])]
    for record in records:
        assert_agrees(replaced(record.sign(SIGNER).encode(), marker, special))


@pytest.mark.parametrize("special", DOUBLE_SPECIALS)
def test_canonical_numbers(special):
    record = Assertion("s", "p", 0.3125, timestamp=1).sign(SIGNER)
    assert_agrees(replaced(record.encode(), struct.pack("<d", 0.3125), special))


def test_duplicates_among_signers_and_superseded_epochs_are_refused():
    cosigned = Assertion("s", "p", 1, timestamp=1, signers=[SIGNER.public_key, COSIGNER.public_key])
    twice = replaced(cosigned.encode(), COSIGNER.public_key, SIGNER.public_key)
    assert outcome(twice) == ("refused", f"record 0: signers: public key "
                                         f"{SIGNER.public_key.hex()} is listed twice")
    listed = [bytes([i]) * 32 for i in range(1, 40)]
    epoch = Epoch("e", supersedes=listed, timestamp=1).sign(SIGNER)
    again = replaced(epoch.encode(), listed[30], listed[3])
    assert outcome(again) == ("refused", "record 0: supersedes: an epoch ID is listed twice")
    assert_agrees(again)


def test_signature_order_and_envelope_rules():
    both = Assertion("s", "p", 1, timestamp=1, signers=[SIGNER.public_key, COSIGNER.public_key])
    signed = both.sign(SIGNER).sign(COSIGNER).encode()
    content = len(both.content())
    first, second = signed[content + 2:content + 67], signed[content + 67:content + 132]
    assert_agrees(signed[:content + 2] + second + first)        # indices out of order
    assert_agrees(signed[:content + 2] + first + first)         # the same index twice
    envelope = Envelope(SIGNER.public_key, [bytes(32)], timestamp=1)
    proven = envelope._with_proof((SIGNER.public_key,), (), b"\x09" * 32).encode()
    assert outcome(proven) == ("refused", "record 0: proof: an envelope cannot be proven by "
                                          "another envelope")


def test_a_batch_names_its_first_refused_record_and_empty_ones():
    good = [r.encode() for r in SAMPLES[:3]]
    bad = good[1][:-1]
    blob = good[0] + bad + good[2]
    offsets = np.cumsum([0, len(good[0]), len(bad), len(good[2])]).astype(np.int64)
    with pytest.raises(stemedb.InvalidRecord, match=r"^record 1: "):
        _codec.validate_many(blob, offsets)
    with pytest.raises(stemedb.InvalidRecord, match=r"^record 1: empty$"):
        _codec.validate_many(good[0], np.array([0, len(good[0]), len(good[0])], dtype=np.int64))
    ids, columns = _codec.validate_many(b"", np.zeros(1, dtype=np.int64))
    assert ids.shape == (0, 32) and len(columns["kind"]) == 0


def test_a_valid_batch_gives_the_ids_and_columns_of_its_records():
    blob, offsets, ids = stemedb.encode_many(SAMPLES)
    checked, columns = _codec.validate_many(blob, offsets)
    assert np.array_equal(checked, ids)
    expected = _codec.extract_columns(blob, offsets[:-1], np.diff(offsets))
    assert all(np.array_equal(columns[name], expected[name]) for name in expected)


def test_signature_entries_give_every_signature_and_who_signed():
    unsigned = Assertion("u", "p", 1, timestamp=1)
    partly = Assertion("s", "p", 1, timestamp=1,
                       signers=[SIGNER.public_key, COSIGNER.public_key, THIRD.public_key])
    partly = partly.sign(SIGNER).sign(THIRD)
    records = [SAMPLES[0], SAMPLES[2], unsigned, partly, SAMPLES[8]]
    blob, offsets, ids = stemedb.encode_many(records)
    keys, signatures, owner, complete = _codec.signature_entries(blob, offsets, [0, 1, 2, 3, 4])
    assert complete.tolist() == [True, True, False, False, False]
    assert owner.tolist() == [0, 1, 1, 3, 3]
    assert [bytes(k) for k in keys] == [SIGNER.public_key, SIGNER.public_key, COSIGNER.public_key,
                                        SIGNER.public_key, THIRD.public_key]
    expected = [s for r in (records[0], records[1], records[3]) for _, s in r.signatures]
    assert [bytes(s) for s in signatures] == expected
    only, _, which, done = _codec.signature_entries(blob, offsets, [3])
    assert which.tolist() == [0, 0] and done.tolist() == [False] and len(only) == 2


def test_record_heads_read_kinds_and_first_signers():
    blob, offsets, _ = stemedb.encode_many(SAMPLES)
    kinds, signers = _codec.record_heads(blob, offsets)
    assert kinds.tolist() == [int(stemedb.RecordKind[type(r).__name__.upper()]) for r in SAMPLES]
    assert [bytes(s) for s in signers] == [r.signers[0] if r.signers else bytes(32) for r in SAMPLES]
    with pytest.raises(stemedb.InvalidRecord, match=r"^record 0: version: unknown"):
        _codec.record_heads(b"\x09" + blob[1:], offsets)
