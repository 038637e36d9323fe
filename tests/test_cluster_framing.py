"""The peer framing: frames and payloads round-trip; every malformed input is a ProtocolError.

Golden bytes pin the layouts docs/replication.md ("Peer messages") gives;
every truncation of every payload is refused; the parser gives the same
frames fed a byte at a time as fed all at once, and refuses an oversized
frame from its header alone.
"""

from __future__ import annotations

import numpy as np
import pytest

import stemedb
from stemedb import _codec, _protocol
from stemedb.errors import (
    CorruptionError,
    DurabilityError,
    InvalidRecord,
    NotFound,
    ProtocolError,
    SignatureError,
    StemeError,
    StorageFull,
    Unavailable,
)
from stemedb.replication import framing
from stemedb.replication.framing import (
    Frame,
    FrameParser,
    Hello,
    RecordBatch,
    SyncAnswer,
    SyncRequest,
)

SIGNER = stemedb.Signer.from_seed(bytes([3]) * 32)


def sample_batch(n: int = 3) -> RecordBatch:
    records = [stemedb.Assertion(f"s{i}", "p", i, timestamp=10 + i).sign(SIGNER) for i in range(n)]
    blob, offsets, ids = _codec.encode_many(records)
    return RecordBatch(blob, np.asarray(offsets, dtype=np.int64), ids)


def test_frame_header_golden_bytes():
    data = framing.encode_frame(framing.PING, 7, b"hi")
    assert data.hex() == "5352" "03" "00" "07000000" "02000000" "6869"
    answer = framing.encode_frame(framing.PING, 7, b"hi", response=True)
    assert answer[3] == framing.RESPONSE
    hello = framing.encode_hello(Hello("demo", 3, "n1"))
    assert hello.hex() == "0464656d6f" "03000000" "026e31"


def test_parser_byte_at_a_time_equals_all_at_once():
    stream = b"".join([framing.encode_frame(framing.PING, 1, b""),
                       framing.encode_frame(framing.PUSH, 2, framing.encode_records(sample_batch())),
                       framing.encode_frame(framing.SYNC, 3, b"x" * 300, response=True)])
    whole = FrameParser()
    whole.feed(stream)
    expected = list(whole.frames())
    assert [(f.kind, f.request_id, f.is_response) for f in expected] == [
        (framing.PING, 1, False), (framing.PUSH, 2, False), (framing.SYNC, 3, True)]
    trickle = FrameParser()
    got: list[Frame] = []
    for i in range(len(stream)):
        trickle.feed(stream[i:i + 1])
        got += trickle.frames()
    assert got == expected


def test_a_bad_header_after_a_good_frame_raises_only_after_the_good_frame_is_taken():
    parser = FrameParser()
    parser.feed(framing.encode_frame(framing.PING, 1, b"ok") + b"GET / HTTP/1.1\r\n\r\n")
    frames = parser.frames()
    assert next(frames).payload == b"ok"
    with pytest.raises(ProtocolError, match="magic b'GE'"):
        next(frames)


@pytest.mark.parametrize("header,message", [
    (b"XX\x03\x00" + bytes(8), r"magic b'XX', expected b'SR'"),
    (b"SR\x99\x00" + bytes(8), r"unknown message kind 0x99"),
    (b"SR\x03\x04" + bytes(8), r"unknown flags 0x4"),
    (b"SR\x03\x00\x01\x00\x00\x00\xff\xff\xff\xff", r"4294967295 payload bytes, above the limit"),
])
def test_bad_headers_are_refused_before_the_payload(header, message):
    parser = FrameParser(max_payload=1 << 20)
    with pytest.raises(ProtocolError, match=message):
        parser.feed(header)


def test_records_round_trip_and_every_truncation_is_refused():
    batch = sample_batch()
    payload = framing.encode_records(batch)
    back = framing.decode_records(payload)
    assert back.ids.tobytes() == batch.ids.tobytes()
    assert bytes(back.blob) == bytes(batch.blob) and back.offsets.tolist() == batch.offsets.tolist()
    for cut in range(len(payload)):
        with pytest.raises(ProtocolError):
            framing.decode_records(payload[:cut])
    with pytest.raises(ProtocolError, match="trailing bytes"):
        framing.decode_records(payload + b"\x00")
    two_ids = (2).to_bytes(4, "little") + batch.ids[:2].tobytes() + payload[4 + 3 * 32:]
    with pytest.raises(ProtocolError, match="records: 2 IDs but 3 records"):
        framing.decode_records(two_ids)
    empty = framing.encode_records(RecordBatch.empty())
    assert empty == bytes(8) and len(framing.decode_records(empty)) == 0


def test_select_and_concat():
    batch = sample_batch(4)
    picked = batch.select(np.array([3, 1]))
    assert picked.ids.tobytes() == batch.ids[[3, 1]].tobytes()
    assert framing.decode_records(framing.encode_records(picked)).ids.tobytes() == picked.ids.tobytes()
    joined = framing.concat([batch.select(np.array([0])), RecordBatch.empty(), batch.select(np.array([2, 3]))])
    records = _codec.decode_many(joined.blob, joined.offsets)
    assert [r.subject for r in records] == ["s0", "s2", "s3"] and len(joined) == 3
    assert joined.size == len(bytes(joined.blob))


def test_put_and_counts():
    batch = sample_batch(2)
    back, push = framing.decode_put(framing.encode_put(batch, push=True))
    assert push and back.ids.tobytes() == batch.ids.tobytes()
    assert framing.decode_put(framing.encode_put(batch, push=False))[1] is False
    with pytest.raises(ProtocolError, match="PUT: unknown flags 0x2"):
        framing.decode_put(b"\x02" + framing.encode_records(batch))
    with pytest.raises(ProtocolError, match="PUT: empty payload"):
        framing.decode_put(b"")
    assert framing.decode_counts(framing.encode_counts(3, 4), 2, "PUSH") == (3, 4)
    with pytest.raises(ProtocolError, match="PUSH answer: 4 bytes, expected 8"):
        framing.decode_counts(b"\x00" * 4, 2, "PUSH")


def test_sync_messages_round_trip_and_truncations_are_refused():
    request = SyncRequest(session=0x0102030405060708, step=0, flags=framing.SYNC_START | framing.SYNC_END,
                          message=b"\x01\x02\x00\x00", records=sample_batch(1), salt=b"S" * 8,
                          scopes=(1, 2, 300))
    payload = framing.encode_sync_request(request)
    assert payload[:13].hex() == "0807060504030201" "00000000" "03"
    back = framing.decode_sync_request(payload)
    assert (back.session, back.step, back.flags, back.message, back.salt, back.scopes) == (
        request.session, 0, 3, request.message, b"S" * 8, (1, 2, 300))
    for cut in range(len(payload)):
        with pytest.raises(ProtocolError):
            framing.decode_sync_request(payload[:cut])
    later = framing.decode_sync_request(framing.encode_sync_request(
        SyncRequest(5, 9, 0, b"", RecordBatch.empty())))
    assert (later.session, later.step, later.salt, later.scopes) == (5, 9, b"", ())
    answer = SyncAnswer(step=9, flags=framing.SYNC_DONE, message=b"\x00\x00", records=sample_batch(2))
    data = framing.encode_sync_answer(answer)
    got = framing.decode_sync_answer(data)
    assert (got.step, got.flags, got.message, len(got.records)) == (9, 1, b"\x00\x00", 2)
    for cut in range(len(data)):
        with pytest.raises(ProtocolError):
            framing.decode_sync_answer(data[:cut])
    with pytest.raises(ProtocolError, match="SYNC: unknown flags 0x4"):
        framing.decode_sync_request(payload[:12] + b"\x04" + payload[13:])
    twice = framing.encode_sync_request(SyncRequest(1, 0, framing.SYNC_START, b"", RecordBatch.empty(),
                                                    b"s" * 8, (2, 2)))
    with pytest.raises(ProtocolError, match="a scope is listed twice"):
        framing.decode_sync_request(twice)


def test_hello_and_error_payloads():
    hello = Hello("démo", 12, "n-1")
    assert framing.decode_hello(framing.encode_hello(hello)) == hello
    with pytest.raises(ProtocolError, match="HELLO: 1 bytes after the last field"):
        framing.decode_hello(framing.encode_hello(hello) + b"\x00")
    with pytest.raises(ProtocolError, match="HELLO: cluster is not UTF-8"):
        framing.decode_hello(b"\x01\xff" + bytes(4) + b"\x00")
    error = framing.encode_error(_protocol.E_STORAGE_FULL, "disk full")
    assert framing.decode_error(error) == (_protocol.E_STORAGE_FULL, "disk full")


@pytest.mark.parametrize("error", [
    SignatureError("s"), InvalidRecord("i"), StorageFull("f"), DurabilityError("d"),
    CorruptionError("c"), NotFound("n"), Unavailable("u"), ProtocolError("p"),
])
def test_errors_cross_the_wire_as_their_own_class(error):
    code = framing.error_code(error)
    back = framing.error_from_code(code, str(error))
    assert type(back) is type(error) and str(back) == str(error)


def test_unknown_errors_become_internal():
    assert framing.error_code(StemeError("bug")) == _protocol.E_INTERNAL
    assert type(framing.error_from_code(_protocol.E_INTERNAL, "bug")) is StemeError
