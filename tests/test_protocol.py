"""The wire codec (stemedb._protocol) against docs/protocol.md and tests/vectors/protocol.json.

The vectors were built with `struct` by tests/vectors/generate_protocol.py,
independently of the compiled codec: every vector must parse to its fields and
be rebuilt byte for byte from them. Fuzzing (hypothesis) feeds the frame reader
and every payload decoder arbitrary and mutated bytes: they must parse or raise
FrameError (records: InvalidRecord), never anything else, never hang.
"""

from __future__ import annotations

import json
import pathlib
import re
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import signed_records

import stemedb
from stemedb import _protocol as P
from stemedb.errors import InvalidRecord, ProtocolError

ROOT = pathlib.Path(__file__).parent.parent
DOC = (ROOT / "docs" / "protocol.md").read_text()
VECTORS = json.loads((ROOT / "tests" / "vectors" / "protocol.json").read_text())["vectors"]
# The replication payloads are stemedb.replication.framing's: tests/test_cluster_framing.py.
VALID = [v for v in VECTORS if v["direction"] != "invalid-request" and v.get("section") != "replication"]
INVALID = [v for v in VECTORS if v["direction"] == "invalid-request"]


def table_rows(heading: str) -> list[list[str]]:
    """The rows of the first table after `heading` in docs/protocol.md."""
    section = DOC[DOC.index(heading):]
    rows = []
    for line in section.splitlines()[1:]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not set(cells[0]) <= set("-: "):
                rows.append(cells)
        elif rows:
            break
    return rows[1:]  # without the header row


def number(text: str) -> int:
    return int(text.replace(",", "").replace("`", ""), 0)


def test_limits_table_matches_the_code():
    limits = {row[0].strip("`"): row[1] for row in table_rows("## Limits")}
    for name in ("FRAME_HEADER", "DEFAULT_MAX_FRAME", "DEFAULT_PREAUTH_FRAME", "MAX_TOKEN", "MAX_PING",
                 "MAX_GET_IDS", "MAX_SCAN"):
        assert number(limits[name]) == getattr(P, name), name
    assert P.MAGIC == b"SD" and "`53 44`" in DOC


def test_opcode_table_matches_the_code():
    rows = table_rows("## Opcodes")
    documented = {}
    for row in rows:
        code = row[0].strip("`")
        if "–" in code:
            continue
        documented[number(code)] = row[1]
    expected = {P.HELLO: "HELLO", P.AUTH: "AUTH", P.PING: "PING", P.PUT: "PUT", P.GET: "GET",
                P.QUERY: "QUERY", P.SCAN: "SCAN", P.VOTE: "VOTE", P.EPOCH: "EPOCH", P.STATS: "STATS",
                P.AUDIT: "AUDIT", P.VERIFY: "VERIFY", P.ERROR: "ERROR"}
    assert documented == expected
    for opcode in range(256):
        assert P.is_request_opcode(opcode) == (opcode in expected and opcode != P.ERROR
                                               or P.SYNC_FIRST <= opcode <= P.SYNC_LAST)


# The error table (docs/protocol.md, "Errors") is checked against the error classes in
# tests/test_errors.py.


def test_worked_example_names_real_vectors():
    names = {v["name"] for v in VECTORS}
    cited = set(re.findall(r"`([a-z-]+)`", DOC[DOC.index("The complete frames are"):][:400]))
    assert cited and cited <= names
    by_name = {v["name"]: v for v in VECTORS}
    for name, first_line in (("hello-response", "53 44 01 01 01 00 00 00 14 00 00 00"),
                             ("put-request", "53 44 10 00 04 00 00 00 bd 00 00 00"),
                             ("put-response", "53 44 10 01 04 00 00 00 24 00 00 00"),
                             ("error-rate-limited", "53 44 7f 01 0b 00 00 00 1b 00 00 00")):
        assert first_line in DOC
        assert by_name[name]["hex"].startswith(first_line.replace(" ", ""))


# ------------------------------------------------------------------- vectors

def parse_fields(vector: dict) -> dict:
    payload = bytes.fromhex(vector["payload"])
    opcode = P.__dict__[vector["opcode"].upper()]
    response = vector["direction"] == "response"
    if opcode == P.ERROR:
        code, retry, message = P.decode_error(payload)
        return {"code": code, "retry_after_ms": retry, "message": message}
    if opcode == P.HELLO:
        keys = (("version", "role", "server_flags", "max_frame", "max_inflight", "server_name") if response
                else ("min_version", "max_version", "client_name", "token"))
        decoder = P.decode_hello_ok if response else P.decode_hello
        return dict(zip(keys, decoder(payload)))
    if opcode == P.AUTH:
        return {"role": P.decode_role(payload)} if response else {"token": P.decode_auth(payload)}
    if opcode == P.PING:
        return {"data": payload.hex()}
    writes = (P.PUT, P.VOTE, P.EPOCH)
    if opcode in (*writes, P.GET) and (response == (opcode in writes)):
        return {"ids": [bytes(row).hex() for row in P.decode_ids(payload)]}
    if opcode in (*writes, P.GET, P.SCAN) and (opcode != P.SCAN or response):
        blob, offsets = P.decode_record_batch(payload, opcode == P.GET)
        return {"records": [bytes(blob[offsets[i]:offsets[i + 1]]).hex() for i in range(len(offsets) - 1)]}
    if opcode == P.QUERY:
        if response:
            text, blob, offsets = P.decode_query_result(payload)
            return {"result": text, "records": [bytes(blob[offsets[i]:offsets[i + 1]]).hex()
                                                for i in range(len(offsets) - 1)]}
        return dict(zip(("subject", "predicate", "lens", "options"), P.decode_query(payload)))
    if opcode == P.SCAN:
        return dict(zip(("subject", "predicate", "kind", "limit"), P.decode_scan(payload)))
    if opcode == P.STATS:
        if response:
            return {"text": P.decode_text(payload)}
        P.decode_empty(payload, "STATS")
        return {}
    if opcode == P.AUDIT:
        return {"text": P.decode_text(payload)} if response else {"limit": P.decode_u32(payload, "limit")}
    raise AssertionError(vector["name"])


def build_payload(vector: dict) -> bytes:
    f = vector["fields"]
    opcode = P.__dict__[vector["opcode"].upper()]
    response = vector["direction"] == "response"

    def batch(hexes: list[str]) -> bytes:
        parts = [bytes.fromhex(h) for h in hexes]
        offsets = np.concatenate(([0], np.cumsum([len(p) for p in parts]))).astype(np.int64)
        return P.encode_record_batch(b"".join(parts), offsets)

    if opcode == P.ERROR:
        return P.encode_error(f["code"], f["retry_after_ms"], f["message"])
    if opcode == P.HELLO:
        if response:
            return P.encode_hello_ok(f["version"], f["role"], f["server_flags"], f["max_frame"],
                                     f["max_inflight"], f["server_name"])
        return P.encode_hello(f["min_version"], f["max_version"], f["client_name"], f["token"])
    if opcode == P.AUTH:
        return P.encode_role(f["role"]) if response else P.encode_auth(f["token"])
    if opcode == P.PING:
        return bytes.fromhex(f["data"])
    if "ids" in f:
        return P.encode_ids([bytes.fromhex(h) for h in f["ids"]])
    if opcode == P.QUERY:
        if response:
            parts = [bytes.fromhex(h) for h in f["records"]]
            offsets = np.concatenate(([0], np.cumsum([len(p) for p in parts]))).astype(np.int64)
            return P.encode_query_result(f["result"], b"".join(parts), offsets)
        return P.encode_query(f["subject"], f["predicate"], f["lens"], f["options"])
    if "records" in f:
        return batch(f["records"])
    if opcode == P.SCAN:
        return P.encode_scan(f["subject"], f["predicate"], f["kind"], f["limit"])
    if opcode == P.STATS:
        return P.encode_text(f["text"]) if response else b""
    if opcode == P.AUDIT:
        return P.encode_text(f["text"]) if response else P.encode_u32(f["limit"])
    raise AssertionError(vector["name"])


@pytest.mark.parametrize("vector", VALID, ids=[v["name"] for v in VALID])
def test_vector_parses_and_rebuilds(vector):
    raw = bytes.fromhex(vector["hex"])
    reader = P.FrameReader(1 << 24, from_server=vector["direction"] == "response")
    reader.feed(raw)
    frame = reader.next()
    assert reader.next() is None and reader.buffered == 0
    assert (frame.opcode, frame.flags, frame.request_id) == (
        P.__dict__[vector["opcode"].upper()], vector["flags"], vector["request_id"])
    assert frame.payload.hex() == vector["payload"]
    assert parse_fields(vector) == vector["fields"]
    payload = build_payload(vector)
    assert bytes(payload).hex() == vector["payload"]
    assert P.encode_frame(frame.opcode, frame.flags, frame.request_id, payload).hex() == vector["hex"]


def test_vector_records_are_valid_signed_records():
    by_name = {v["name"]: v for v in VECTORS}
    record = stemedb.decode(bytes.fromhex(by_name["put-request"]["fields"]["records"][0]))
    record.verify()
    assert record.id.hex() == by_name["put-response"]["fields"]["ids"][0]
    envelope, *members = [stemedb.decode(bytes.fromhex(h))
                          for h in by_name["put-envelope-request"]["fields"]["records"]]
    stemedb.verify_batch(envelope, members)


@pytest.mark.parametrize("vector", INVALID, ids=[v["name"] for v in INVALID])
def test_invalid_vectors_are_refused_from_the_header(vector):
    reader = P.FrameReader(P.DEFAULT_MAX_FRAME)
    reader.feed(bytes.fromhex(vector["hex"]))
    with pytest.raises(P.FrameError) as refused:
        reader.next()
    assert refused.value.code == vector["error_code"]
    assert isinstance(refused.value, ProtocolError)


def test_frame_reader_checks_direction_and_limits():
    ping = P.encode_frame(P.PING, 0, 5, b"x" * 10)
    client_side = P.FrameReader(100, from_server=True)
    client_side.feed(ping)
    with pytest.raises(P.FrameError, match="RESPONSE"):
        client_side.next()
    small = P.FrameReader(9)
    small.feed(ping[:12])  # the header alone is enough to refuse
    with pytest.raises(P.FrameError) as refused:
        small.next()
    assert refused.value.code == P.E_FRAME_TOO_LARGE and refused.value.request_id == 5
    big = P.FrameReader(100)
    big.feed(ping[:15])
    assert big.next() is None and big.buffered == 15
    big.max_payload = 10  # limits can change (after authentication) between frames
    big.feed(ping[15:])
    assert big.next().payload == b"x" * 10


# ------------------------------------------------------------------- properties

frames = st.builds(
    lambda op, flags, rid, payload: (op, flags, rid, payload),
    st.sampled_from([P.HELLO, P.AUTH, P.PING, P.PUT, P.GET, P.QUERY, P.SCAN, P.STATS, 0x41]),
    st.just(0),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=300),
)


@given(st.lists(frames, max_size=8), st.data())
def test_any_chunking_yields_the_same_frames(items, data):
    raw = b"".join(P.encode_frame(*item) for item in items)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=12)))
    reader = P.FrameReader(1000)
    got = []
    for start, end in zip([0, *cuts], [*cuts, len(raw)]):
        reader.feed(raw[start:end])
        got.extend(reader.frames())
    assert [(f.opcode, f.flags, f.request_id, f.payload) for f in got] == items
    assert reader.buffered == 0


@given(st.binary(max_size=2000), st.booleans(), st.integers(0, 5000))
def test_frame_reader_fuzz(data, from_server, limit):
    reader = P.FrameReader(limit, from_server=from_server)
    try:
        reader.feed(data)
        for _ in range(len(data) // 12 + 1):
            frame = reader.next()
            if frame is None:
                break
            assert len(frame.payload) <= limit
    except P.FrameError as exc:
        assert exc.code in P.ERROR_CODES


@given(st.sampled_from(VALID), st.data())
def test_mutated_vectors_never_crash_the_decoders(vector, data):
    raw = bytearray(bytes.fromhex(vector["hex"]))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    reader = P.FrameReader(1 << 20, from_server=vector["direction"] == "response")
    reader.feed(bytes(raw))
    try:
        frame = reader.next()
    except P.FrameError:
        return
    if frame is None:
        return
    decode_any(frame.opcode, frame.payload)


DECODERS = [
    P.decode_hello, P.decode_hello_ok, P.decode_auth, P.decode_role, P.decode_ids,
    lambda p: P.decode_record_batch(p), lambda p: P.decode_record_batch(p, True), P.decode_query,
    P.decode_query_result, P.decode_scan, P.decode_text, P.decode_error,
    lambda p: P.decode_u32(p, "x"), lambda p: P.decode_empty(p, "x"),
]


def decode_any(opcode: int, payload: bytes) -> None:
    """Every payload decoder on the bytes: a result or FrameError; records: InvalidRecord."""
    for decoder in DECODERS:
        try:
            decoder(payload)
        except P.FrameError:
            pass
    try:
        blob, offsets = P.decode_record_batch(payload)
    except P.FrameError:
        return
    try:
        stemedb.decode_many(bytes(blob), offsets)
    except InvalidRecord:
        pass


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_payload_decoders_fuzz(payload):
    decode_any(0, payload)


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=60)
@given(st.lists(signed_records(), min_size=1, max_size=4), st.data())
def test_record_batches_of_mutated_records(records, data):
    """The PUT path's decoding: record batch, then the record codec, on damaged bytes."""
    blob, offsets, _ids = stemedb.encode_many(records)
    payload = bytearray(P.encode_record_batch(blob, offsets))
    for _ in range(data.draw(st.integers(0, 3))):
        payload[data.draw(st.integers(0, len(payload) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    try:
        got_blob, got_offsets = P.decode_record_batch(bytes(payload))
        decoded = stemedb.decode_many(bytes(got_blob), got_offsets)
    except (P.FrameError, InvalidRecord):
        return
    assert len(decoded) == len(records)


@given(st.text(max_size=50), st.text(max_size=50), st.text(max_size=30), st.text(max_size=80),
       st.integers(0, 4), st.integers(0, 2**32 - 1))
def test_message_round_trips(subject, predicate, lens, options, kind, limit):
    lens = lens.encode()[:255].decode("utf-8", "ignore")
    assert P.decode_query(P.encode_query(subject, predicate, lens, options)) == (subject, predicate, lens, options)
    assert P.decode_scan(P.encode_scan(subject, predicate, kind, limit)) == (subject, predicate, kind, limit)
    assert P.decode_error(P.encode_error(7, limit, options)) == (7, limit, options)
    assert P.decode_text(P.encode_text(options)) == options


@given(st.lists(st.binary(min_size=1, max_size=200), max_size=50), st.integers(300, 3000))
def test_split_record_batch_covers_everything_within_the_limit(parts, limit):
    offsets = np.concatenate(([0], np.cumsum([len(p) for p in parts]))).astype(np.int64)
    blob = b"".join(parts)
    spans = P.split_record_batch(blob, offsets, limit)
    again = []
    for first, end in spans:
        payload = P.encode_record_batch(blob, offsets[first:end + 1])
        assert len(payload) <= limit
        got_blob, got_offsets = P.decode_record_batch(payload)
        again.extend(bytes(got_blob[got_offsets[i]:got_offsets[i + 1]]) for i in range(len(got_offsets) - 1))
    assert again == parts
    assert spans[0][0] == 0 and spans[-1][1] == len(parts)


def test_record_batch_count_is_checked_before_allocating():
    with pytest.raises(P.FrameError, match="does not fit"):
        P.decode_record_batch(struct.pack("<I", 0xFFFFFFFF) + b"\0" * 8)
    with pytest.raises(P.FrameError, match="count"):
        P.decode_ids(struct.pack("<I", 0xFFFFFFFF))
    with pytest.raises(ValueError, match="do not fit"):
        P.split_record_batch(b"x" * 100, [0, 100], 50)


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=40)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=20), st.integers(-5, 5), st.booleans()),
                min_size=1, max_size=20), st.integers(0, 2**40))
def test_envelope_members_match_sign_batch_byte_for_byte(items, timestamp):
    """The client's byte-level group signing equals Signer.sign_batch followed by encoding."""
    from stemedb.client._wire import signed_batch

    signer = stemedb.Signer.from_seed(bytes(range(32)))
    records = [stemedb.Assertion(subject, "p", value, timestamp=timestamp,
                                 signers=[signer.public_key] if declared else [])
               for subject, value, declared in items]
    members, envelope = signer.sign_batch(records)
    blob, offsets = P.decode_record_batch(signed_batch(records, signer, 1 << 24))
    got = stemedb.decode_many(bytes(blob), offsets)
    assert got[0].members == envelope.members and got[0].signer == envelope.signer
    stemedb.verify_batch(got[0], got[1:])
    # The envelopes differ only by their timestamps; the members, once they name the same
    # envelope, are the same bytes.
    same_envelope = [m._with_proof(m.signers, (), got[0].id) for m in members]
    expected_blob, _, _ = stemedb.encode_many(same_envelope)
    assert bytes(blob[offsets[1]:]) == expected_blob and got[1:] == same_envelope


def test_envelope_members_refuses_signed_or_foreign_records():
    signer = stemedb.Signer.from_seed(bytes(range(32)))
    signed = stemedb.Assertion("a", "p", 1).sign(signer)
    foreign = stemedb.Assertion("a", "p", 1, signers=[bytes(32)])
    for record in (signed, foreign):
        blob, offsets, _ = stemedb.encode_many([record])
        with pytest.raises(ValueError):
            P.envelope_members(blob, offsets, signer.public_key)
    with pytest.raises(ValueError, match="not an envelope member"):
        P.set_envelope_id(bytearray(40), [0, 40], bytes(32))


def test_fuzz_figure():
    """RELIABILITY.md fuzz-decoder row for the wire codec: seeded random and mutated inputs."""
    import random

    seed = 20261126
    rng = random.Random(seed)
    valid = [bytes.fromhex(v["hex"]) for v in VALID]
    executions = refused = decoded = 0
    for _ in range(4000):
        if rng.random() < 0.5:
            data = bytearray(rng.choice(valid))
            for _ in range(rng.randint(1, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            if rng.random() < 0.3:
                data = data[:rng.randrange(len(data) + 1)]
        else:
            data = bytearray(rng.randbytes(rng.randrange(0, 300)))
            if rng.random() < 0.5:
                data[:2] = b"SD"
        for from_server in (False, True):
            executions += 1
            reader = P.FrameReader(1 << 16, from_server=from_server)
            try:
                reader.feed(bytes(data))
                frames = reader.frames()
            except P.FrameError:
                refused += 1
                frames = []
            except Exception as exc:  # noqa: BLE001 - any other exception is a crash
                raise AssertionError(f"seed {seed}: {data.hex()}") from exc
            for frame in frames:
                executions += 1
                decoded += 1
                decode_any(frame.opcode, frame.payload)
        executions += 1
        decode_any(0, bytes(data[12:]))
    print(f"\nfuzz-decoder (wire): {executions} executions (seed {seed}), no crash; {refused} inputs "
          f"refused by the frame reader, {decoded} frames reached the payload decoders")
    # A crash raises above; here: the inputs reached both the refusals and the payload decoders.
    assert refused > 500 and decoded > 500
