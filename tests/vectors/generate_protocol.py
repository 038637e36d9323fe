"""Writes tests/vectors/protocol.json, the wire vectors of docs/protocol.md.

Run when vectors are added, or when the protocol deliberately changes (then
bump PROTOCOL_VERSION); existing vectors must come out unchanged otherwise:
    PYTHONPATH=src python tests/vectors/generate_protocol.py

The frames are built here with `struct`, independently of the compiled codec
(stemedb._protocol); tests/test_protocol.py checks that the codec builds the
same bytes from the same fields and parses them back to the same fields.
Records inside PUT / GET / QUERY / SCAN payloads are opaque byte strings to
the protocol; they come from the record codec (docs/format.md).

The vectors of section "replication" (docs/protocol.md, "Replication
opcodes") are built the same way; tests/test_cluster_framing.py checks them
against stemedb.replication.framing.
"""

from __future__ import annotations

import json
import pathlib
import struct

import stemedb
from stemedb import Assertion, Epoch, Ref, Vote

SEED = bytes(range(32))
SIGNER = stemedb.Signer.from_seed(SEED)
T = 1_700_000_000_000_000

RESPONSE, MORE, ACKS_ONE, ACKS_ALL = 1, 2, 4, 8
OPCODES = {"hello": 0x01, "auth": 0x02, "ping": 0x03, "put": 0x10, "get": 0x11, "query": 0x12,
           "scan": 0x13, "vote": 0x14, "epoch": 0x15, "stats": 0x16, "audit": 0x17, "error": 0x7F,
           "node_hello": 0x40, "sync": 0x41, "replica_put": 0x42, "push": 0x44, "sync_with": 0x45,
           "cluster_status": 0x46, "cluster_reload": 0x47}


def frame(opcode: str | int, flags: int, request_id: int, payload: bytes) -> bytes:
    code = OPCODES[opcode] if isinstance(opcode, str) else opcode
    return b"SD" + struct.pack("<BBII", code, flags, request_id, len(payload)) + payload


def s8(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<B", len(raw)) + raw


def s16(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<H", len(raw)) + raw


def s32(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<I", len(raw)) + raw


def batch(records: list[bytes]) -> bytes:
    return (struct.pack("<I", len(records)) + b"".join(struct.pack("<I", len(r)) for r in records)
            + b"".join(records))


def ids(values: list[bytes]) -> bytes:
    return struct.pack("<I", len(values)) + b"".join(values)


def error(code: int, retry_after_ms: int, message: str) -> bytes:
    return struct.pack("<HI", code, retry_after_ms) + s16(message)


def vectors() -> list[dict]:
    claim = Assertion("aspirin", "treats", Ref("headache"), confidence=0.75, timestamp=T,
                      source_class="clinical", lifecycle="approved").sign(SIGNER)
    encoded = claim.encode()
    members, envelope = SIGNER.sign_batch(
        [Assertion("sensor-1", "reading", 20.5, timestamp=T), Assertion("sensor-2", "reading", 21.0, timestamp=T)],
        timestamp=T)
    absent = bytes(32)
    token = "example-token-0123456789"
    # What a server answers for query-request when it holds only `claim` (checked against a
    # live server by tests/test_client_spec.py); the shape is docs/schemas/query-result.schema.json,
    # written out here member by member in the order a server writes them.
    zeros = "00" * 32
    result = json.dumps({
        "subject": "aspirin", "predicate": "treats", "lens": "recency",
        "winner": {"kind": "assertion", "id": claim.id.hex(), "subject": "aspirin", "predicate": "treats",
                   "object": {"ref": "headache"}, "confidence": 0.75, "timestamp": T,
                   "source_class": "clinical", "lifecycle": "approved", "source_hash": zeros,
                   "parent_hash": None, "epoch": None, "visual_hash": None, "vector": None,
                   "signers": [SIGNER.public_key.hex()],
                   "signatures": [claim.signatures[0][1].hex()], "envelope": None},
        "confidence": 0.75, "conflict_score": 0.0, "candidates_count": 1, "analysis": None,
        "filters": {"lifecycle": "approved", "as_of": None, "epoch": None, "decay": False, "now": None},
        "contributions": [{"assertion_id": claim.id.hex(), "weight": 0.75, "lifecycle": "approved",
                           "source_hash": zeros, "supports": True}],
    })
    stats = json.dumps({"records": 1})
    vote = Vote(claim.id, 1.0, timestamp=T).sign(SIGNER)
    epoch = Epoch("guidelines-2024", "first edition", timestamp=T).sign(SIGNER)
    audit = json.dumps([{
        "v": 1, "at": T, "agent": "local:127.0.0.1:40000", "subject": "aspirin", "predicate": "treats",
        "lens": "recency",
        "filters": {"lifecycle": "any", "as_of": None, "epoch": None, "decay": False, "now": None},
        "results": {"treats": {"winner": claim.id.hex(), "value": {"ref": "headache"}, "confidence": 1.0,
                               "conflict_score": 0.0, "candidates_count": 1,
                               "contributions": [[claim.id.hex(), 0.75, "approved", "00" * 32]]}},
    }])
    out = [
        dict(name="hello-request", direction="request", opcode="hello", flags=0, request_id=1,
             fields={"min_version": 1, "max_version": 1, "client_name": "stemedb-python", "token": ""},
             payload=struct.pack("<HH", 1, 1) + s8("stemedb-python") + s16("")),
        dict(name="hello-request-with-token", direction="request", opcode="hello", flags=0, request_id=1,
             fields={"min_version": 1, "max_version": 1, "client_name": "stemedb-python", "token": token},
             payload=struct.pack("<HH", 1, 1) + s8("stemedb-python") + s16(token)),
        dict(name="hello-response", direction="response", opcode="hello", flags=RESPONSE, request_id=1,
             fields={"version": 1, "role": 2, "server_flags": 0, "max_frame": 16 << 20,
                     "max_inflight": 128, "server_name": "stemedb"},
             payload=struct.pack("<HBBII", 1, 2, 0, 16 << 20, 128) + s8("stemedb")),
        dict(name="hello-response-auth-required", direction="response", opcode="hello", flags=RESPONSE,
             request_id=1,
             fields={"version": 1, "role": 0, "server_flags": 1, "max_frame": 16 << 20,
                     "max_inflight": 128, "server_name": "stemedb"},
             payload=struct.pack("<HBBII", 1, 0, 1, 16 << 20, 128) + s8("stemedb")),
        dict(name="auth-request", direction="request", opcode="auth", flags=0, request_id=2,
             fields={"token": token}, payload=s16(token)),
        dict(name="auth-response", direction="response", opcode="auth", flags=RESPONSE, request_id=2,
             fields={"role": 2}, payload=bytes([2])),
        dict(name="ping-request", direction="request", opcode="ping", flags=0, request_id=3,
             fields={"data": "6869"}, payload=b"hi"),
        dict(name="ping-response", direction="response", opcode="ping", flags=RESPONSE, request_id=3,
             fields={"data": "6869"}, payload=b"hi"),
        dict(name="put-request", direction="request", opcode="put", flags=0, request_id=4,
             fields={"records": [encoded.hex()]}, payload=batch([encoded])),
        dict(name="put-response", direction="response", opcode="put", flags=RESPONSE, request_id=4,
             fields={"ids": [claim.id.hex()]}, payload=ids([claim.id])),
        dict(name="put-envelope-request", direction="request", opcode="put", flags=0, request_id=5,
             fields={"records": [r.encode().hex() for r in [envelope, *members]]},
             payload=batch([r.encode() for r in [envelope, *members]])),
        dict(name="put-envelope-response", direction="response", opcode="put", flags=RESPONSE,
             request_id=5, fields={"ids": [r.id.hex() for r in [envelope, *members]]},
             payload=ids([r.id for r in [envelope, *members]])),
        dict(name="get-request", direction="request", opcode="get", flags=0, request_id=6,
             fields={"ids": [claim.id.hex(), absent.hex()]}, payload=ids([claim.id, absent])),
        dict(name="get-response", direction="response", opcode="get", flags=RESPONSE, request_id=6,
             fields={"records": [encoded.hex(), ""]},
             payload=struct.pack("<III", 2, len(encoded), 0) + encoded),
        # A GET answer streamed in two frames (servers cut answers into frames of about 1 MiB;
        # here the cut is shown on small records): MORE on the first, none on the last.
        dict(name="get-streamed-request", direction="request", opcode="get", flags=0, request_id=12,
             fields={"ids": [claim.id.hex(), absent.hex(), claim.id.hex()]},
             payload=ids([claim.id, absent, claim.id])),
        dict(name="get-streamed-response-part", direction="response", opcode="get",
             flags=RESPONSE | MORE, request_id=12, fields={"records": [encoded.hex(), ""]},
             payload=struct.pack("<III", 2, len(encoded), 0) + encoded),
        dict(name="get-streamed-response-end", direction="response", opcode="get", flags=RESPONSE,
             request_id=12, fields={"records": [encoded.hex()]}, payload=batch([encoded])),
        dict(name="query-request", direction="request", opcode="query", flags=0, request_id=7,
             fields={"subject": "aspirin", "predicate": "treats", "lens": "recency",
                     "options": '{"lifecycle": "approved"}'},
             payload=s16("aspirin") + s16("treats") + s8("recency") + s32('{"lifecycle": "approved"}')),
        dict(name="query-response", direction="response", opcode="query", flags=RESPONSE, request_id=7,
             fields={"result": result, "records": [encoded.hex()]},
             payload=s32(result) + batch([encoded])),
        dict(name="scan-request", direction="request", opcode="scan", flags=0, request_id=8,
             fields={"subject": "aspirin", "predicate": "", "kind": 1, "limit": 100},
             payload=s16("aspirin") + s16("") + struct.pack("<BI", 1, 100)),
        dict(name="scan-response-part", direction="response", opcode="scan", flags=RESPONSE | MORE,
             request_id=8, fields={"records": [encoded.hex()]}, payload=batch([encoded])),
        dict(name="scan-response-end", direction="response", opcode="scan", flags=RESPONSE, request_id=8,
             fields={"records": []}, payload=batch([])),
        dict(name="stats-request", direction="request", opcode="stats", flags=0, request_id=9,
             fields={}, payload=b""),
        dict(name="stats-response", direction="response", opcode="stats", flags=RESPONSE, request_id=9,
             fields={"text": stats}, payload=s32(stats)),
        dict(name="audit-request", direction="request", opcode="audit", flags=0, request_id=10,
             fields={"limit": 50}, payload=struct.pack("<I", 50)),
        dict(name="audit-response", direction="response", opcode="audit", flags=RESPONSE, request_id=10,
             fields={"text": audit}, payload=s32(audit)),
        dict(name="vote-request", direction="request", opcode="vote", flags=0, request_id=12,
             fields={"records": [vote.encode().hex()]}, payload=batch([vote.encode()])),
        dict(name="vote-response", direction="response", opcode="vote", flags=RESPONSE, request_id=12,
             fields={"ids": [vote.id.hex()]}, payload=ids([vote.id])),
        dict(name="epoch-request", direction="request", opcode="epoch", flags=0, request_id=13,
             fields={"records": [epoch.encode().hex()]}, payload=batch([epoch.encode()])),
        dict(name="epoch-response", direction="response", opcode="epoch", flags=RESPONSE, request_id=13,
             fields={"ids": [epoch.id.hex()]}, payload=ids([epoch.id])),
        dict(name="put-acks-all-request", direction="request", opcode="put", flags=ACKS_ALL,
             request_id=14, fields={"records": [encoded.hex()]}, payload=batch([encoded])),
        dict(name="error-rate-limited", direction="response", opcode="error", flags=RESPONSE,
             request_id=11, fields={"code": 7, "retry_after_ms": 250, "message": "rate limit exceeded"},
             payload=error(7, 250, "rate limit exceeded")),
        dict(name="error-frame-too-large", direction="response", opcode="error", flags=RESPONSE,
             request_id=0, fields={"code": 3, "retry_after_ms": 0, "message": "frame too large"},
             payload=error(3, 0, "frame too large")),
    ]
    out += replication_vectors(claim, encoded, members, envelope)
    for vector in out:
        vector["hex"] = frame(vector["opcode"], vector["flags"], vector["request_id"], vector["payload"]).hex()
        vector["payload"] = vector["payload"].hex()
    invalid = [
        ("bad-magic", b"XD" + struct.pack("<BBII", 0x03, 0, 1, 0), 1),
        ("unknown-opcode", frame(0x33, 0, 1, b""), 1),
        ("reserved-flag-bits", frame("ping", 4, 1, b""), 1),
        ("request-with-response-flag", frame("ping", RESPONSE, 1, b""), 1),
        ("put-with-both-acks-flags", frame("put", ACKS_ONE | ACKS_ALL, 1, batch([])), 1),
        ("ping-with-an-acks-flag", frame("ping", ACKS_ONE, 1, b""), 1),
        ("declared-4-gib", b"SD" + struct.pack("<BBII", 0x10, 0, 1, 0xFFFFFFFF), 3),
    ]
    for name, raw, code in invalid:
        out.append(dict(name=name, direction="invalid-request", hex=raw.hex(), error_code=code))
    return out


def records_block(records: list) -> bytes:
    """The replication records block: `count:u32`, the IDs, then a record_batch of the same count."""
    return struct.pack("<I", len(records)) + b"".join(r.id for r in records) + batch(
        [r.encode() for r in records])


def replication_vectors(claim, encoded: bytes, members: list, envelope) -> list[dict]:
    """docs/protocol.md, "Replication opcodes": one request and one answer of each."""
    # A reconciliation message: one block (scope 0, the whole store) holding the range list
    # of an empty set (tests/vectors/reconcile.json, case "empty-set").
    message = bytes([1, 0, 3]) + bytes.fromhex("00a000")
    salt = bytes(range(1, 9))
    status = json.dumps({"node": "n1", "version": 3}, sort_keys=True)
    synced = json.dumps({"received": 1, "round_trips": 1, "sent": 0}, sort_keys=True)
    group = [envelope, *members]

    def rep(name: str, direction: str, opcode: str, request_id: int, fields: dict, payload: bytes,
            flags: int | None = None) -> dict:
        return dict(name=name, section="replication", direction=direction, opcode=opcode,
                    flags=(RESPONSE if direction == "response" else 0) if flags is None else flags,
                    request_id=request_id, fields=fields, payload=payload)

    hello = {"cluster": "demo", "version": 3, "node": "n1"}
    return [
        rep("node-hello-request", "request", "node_hello", 20, hello,
            s8("demo") + struct.pack("<I", 3) + s8("n1")),
        rep("node-hello-response", "response", "node_hello", 20, {**hello, "node": "n2"},
            s8("demo") + struct.pack("<I", 3) + s8("n2")),
        rep("replica-put-request", "request", "replica_put", 21,
            {"push": True, "ids": [r.id.hex() for r in group], "records": [r.encode().hex() for r in group]},
            bytes([1]) + records_block(group)),
        rep("replica-put-response", "response", "replica_put", 21, {"counts": [3]}, struct.pack("<I", 3)),
        rep("push-request", "request", "push", 22, {"ids": [claim.id.hex()], "records": [encoded.hex()]},
            records_block([claim])),
        rep("push-response", "response", "push", 22, {"counts": [1, 0]}, struct.pack("<II", 1, 0)),
        rep("sync-start-request", "request", "sync", 23,
            {"session": 0x0102030405060708, "step": 0, "flags": 0x01 | 0x04, "salt": salt.hex(),
             "scopes": [0], "message": message.hex(), "ids": [], "records": []},
            struct.pack("<QIB", 0x0102030405060708, 0, 0x05) + salt + struct.pack("<II", 1, 0)
            + struct.pack("<I", len(message)) + message + records_block([])),
        rep("sync-answer", "response", "sync", 23,
            {"step": 0, "flags": 0x01, "message": "", "ids": [claim.id.hex()], "records": [encoded.hex()]},
            struct.pack("<IBI", 0, 0x01, 0) + records_block([claim])),
        rep("sync-next-request", "request", "sync", 24,
            {"session": 0x0102030405060708, "step": 1, "flags": 0x02, "salt": "", "scopes": [],
             "message": "", "ids": [], "records": []},
            struct.pack("<QIB", 0x0102030405060708, 1, 0x02) + struct.pack("<I", 0) + records_block([])),
        rep("sync-with-request", "request", "sync_with", 25,
            {"peer": "stemedb://10.0.0.2:7440", "token": "", "pull": True, "push": False},
            bytes([1]) + s16("stemedb://10.0.0.2:7440") + s16("")),
        rep("sync-with-response", "response", "sync_with", 25, {"json": synced}, s32(synced)),
        rep("cluster-status-request", "request", "cluster_status", 26, {}, b""),
        rep("cluster-status-response", "response", "cluster_status", 26, {"json": status}, s32(status)),
        rep("cluster-reload-request", "request", "cluster_reload", 27, {}, b""),
    ]


def main() -> None:
    path = pathlib.Path(__file__).with_name("protocol.json")
    document = {
        "description": "StemeDB wire protocol vectors (docs/protocol.md). 'hex' is a whole frame; "
                       "'payload' its payload; 'fields' the decoded message. Records inside payloads "
                       "follow docs/format.md. 'invalid-request' frames must be refused with "
                       "'error_code' before any payload is read.",
        "protocol_version": 1,
        "signer_seed": SEED.hex(),
        "vectors": vectors(),
    }
    path.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {len(document['vectors'])} vectors to {path}")


if __name__ == "__main__":
    main()
