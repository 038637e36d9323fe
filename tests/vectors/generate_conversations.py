"""Writes tests/vectors/conversations.json, the conformance conversations of docs/protocol.md.

Run when a conversation is added or the protocol deliberately changes:
    PYTHONPATH=src python tests/vectors/generate_conversations.py

A conversation is what one connection says and what a server must answer:
`send` steps carry whole request frames (hex), `expect` steps the answer a
server must give — exactly, or by the properties a third party can check
without knowing the store's other contents. tests/vectors/conform.py replays
them against any server ("Conformance" in docs/protocol.md says how to read
them). Frames are built here with `struct`, not with the compiled codec;
records come from the record codec (docs/format.md), signed with the key of
seed 00 01 … 1f. Subjects start with "conformance:" so that replaying the
conversations against a server holding other data gives the same answers,
and replaying them twice too (writes are idempotent).
"""

from __future__ import annotations

import json
import pathlib
import struct

import stemedb
from stemedb import Assertion, Ref

SEED = bytes(range(32))
SIGNER = stemedb.Signer.from_seed(SEED)
T = 1_700_000_000_000_000
RESPONSE, MORE = 1, 2
OPCODES = {"hello": 0x01, "auth": 0x02, "ping": 0x03, "put": 0x10, "get": 0x11, "query": 0x12,
           "scan": 0x13, "vote": 0x14, "epoch": 0x15, "stats": 0x16, "audit": 0x17, "error": 0x7F}
ABSENT = bytes([0xEE]) * 32  # an ID no record has (no known content hashes to it)


def frame(opcode: str | int, request_id: int, payload: bytes, *, flags: int = 0, magic: bytes = b"SD") -> str:
    code = OPCODES[opcode] if isinstance(opcode, str) else opcode
    return (magic + struct.pack("<BBII", code, flags, request_id, len(payload)) + payload).hex()


def s8(text: str) -> bytes:
    return struct.pack("<B", len(text.encode())) + text.encode()


def s16(text: str) -> bytes:
    return struct.pack("<H", len(text.encode())) + text.encode()


def s32(text: str) -> bytes:
    return struct.pack("<I", len(text.encode())) + text.encode()


def batch(records: list[bytes]) -> bytes:
    return (struct.pack("<I", len(records)) + b"".join(struct.pack("<I", len(r)) for r in records)
            + b"".join(records))


def id_list(values: list[bytes]) -> bytes:
    return struct.pack("<I", len(values)) + b"".join(values)


def hello(request_id: int = 1, *, low: int = 1, high: int = 1, token: str = "") -> bytes:
    return struct.pack("<HH", low, high) + s8("conform") + s16(token)


def scan(subject: str, predicate: str, kind: int, limit: int) -> bytes:
    return s16(subject) + s16(predicate) + struct.pack("<BI", kind, limit)


def query(subject: str, predicate: str, lens: str, options: str) -> bytes:
    return s16(subject) + s16(predicate) + s8(lens) + s32(options)


def answer(opcode: str, request_id: int, **properties: object) -> dict:
    return {"expect": {"opcode": opcode, "request_id": request_id, **properties}}


def refusal(request_id: int, code: int) -> dict:
    return {"expect": {"opcode": "error", "request_id": request_id, "error_code": code}}


def records() -> dict[str, Assertion]:
    def claim(name: str, obj: object, i: int, **fields: object) -> Assertion:
        return Assertion(f"conformance:{name}", "treats", obj, timestamp=T + i, **fields).sign(SIGNER)

    return {
        "one": claim("ryw", Ref("headache"), 0, confidence=0.75, source_class="clinical"),
        "query": claim("query", Ref("headache"), 1, confidence=0.75, source_class="clinical",
                       lifecycle="approved"),
        "scan0": claim("scan", 1, 2),
        "scan1": claim("scan", 2, 3),
        "scan2": claim("scan", 3, 4),
        "unsigned": Assertion("conformance:unsigned", "treats", 1, timestamp=T),
    }


def query_result(claim: Assertion) -> str:
    """The server's answer for `claim`, alone for its pair, under recency with lifecycle approved."""
    zeros = "00" * 32
    return json.dumps({
        "subject": claim.subject, "predicate": claim.predicate, "lens": "recency",
        "winner": {"kind": "assertion", "id": claim.id.hex(), "subject": claim.subject,
                   "predicate": claim.predicate, "object": {"ref": "headache"}, "confidence": 0.75,
                   "timestamp": claim.timestamp, "source_class": "clinical", "lifecycle": "approved",
                   "source_hash": zeros, "parent_hash": None, "epoch": None, "visual_hash": None,
                   "vector": None, "signers": [SIGNER.public_key.hex()],
                   "signatures": [claim.signatures[0][1].hex()], "envelope": None},
        "confidence": 0.75, "conflict_score": 0.0, "candidates_count": 1, "analysis": None,
        "filters": {"lifecycle": "approved", "as_of": None, "epoch": None, "decay": False, "now": None},
        "contributions": [{"assertion_id": claim.id.hex(), "weight": 0.75, "lifecycle": "approved",
                           "source_hash": zeros, "supports": True}],
    })


def conversations() -> list[dict]:
    r = records()
    enc = {name: record.encode() for name, record in r.items()}
    hello_step = {"hello": True}
    scanned = [enc["scan0"], enc["scan1"], enc["scan2"]]
    return [
        dict(name="ping", about="PING echoes its payload, empty or not.", steps=[
            hello_step,
            {"send": frame("ping", 2, b"abc")}, answer("ping", 2, flags=RESPONSE, payload=b"abc".hex()),
            {"send": frame("ping", 3, b"")}, answer("ping", 3, flags=RESPONSE, payload=""),
        ]),
        dict(name="read-your-writes", about="A GET pipelined right behind a PUT of the same record "
             "finds it (Ordering on a connection); the PUT answers the record's ID.", steps=[
            hello_step,
            {"send": frame("put", 2, batch([enc["one"]]))},
            {"send": frame("get", 3, id_list([r["one"].id]))},
            {"expect_any_order": [
                answer("put", 2, flags=RESPONSE, payload=id_list([r["one"].id]).hex())["expect"],
                answer("get", 3, flags=RESPONSE, payload=batch([enc["one"]]).hex())["expect"],
            ]},
        ]),
        dict(name="get-absent", about="An absent ID has length 0 in the GET answer.", steps=[
            hello_step,
            {"send": frame("get", 2, id_list([ABSENT]))},
            answer("get", 2, flags=RESPONSE, payload=struct.pack("<II", 1, 0).hex()),
        ]),
        dict(name="query", about="A QUERY's result JSON and contributing records, exactly "
             "(docs/schemas/query-result.schema.json).", steps=[
            hello_step,
            {"send": frame("put", 2, batch([enc["query"]]))},
            answer("put", 2, flags=RESPONSE, payload=id_list([r["query"].id]).hex()),
            {"send": frame("query", 3, query("conformance:query", "treats", "recency",
                                             '{"lifecycle": "approved"}'))},
            answer("query", 3, flags=RESPONSE,
                   payload=(s32(query_result(r["query"])) + batch([enc["query"]])).hex()),
        ]),
        dict(name="scan", about="SCAN streams record batches (MORE on all but the last frame, "
             "whose batch may be empty); together they are the records in write order.", steps=[
            hello_step,
            {"send": frame("put", 2, batch(scanned))},
            answer("put", 2, flags=RESPONSE, payload=id_list([r[f"scan{i}"].id for i in range(3)]).hex()),
            {"send": frame("scan", 3, scan("conformance:scan", "", 1, 0))},
            {"expect_stream": {"opcode": "scan", "request_id": 3, "records": [e.hex() for e in scanned]}},
            {"send": frame("scan", 4, scan("conformance:scan", "", 0, 2))},
            {"expect_stream": {"opcode": "scan", "request_id": 4, "records": [e.hex() for e in scanned[:2]]}},
        ]),
        dict(name="over-limit-values", about="Well-framed values over a documented limit are answered "
             "invalid_request (9); the connection goes on.", steps=[
            hello_step,
            {"send": frame("ping", 2, b"x" * 1025)}, refusal(2, 9),
            {"send": frame("scan", 3, scan("", "", 5, 0))}, refusal(3, 9),
            {"send": frame("scan", 4, scan("", "", 0, 2_000_000))}, refusal(4, 9),
            {"send": {"opcode": "get", "request_id": 5, "payload_prefix": struct.pack("<I", 65537).hex(),
                      "payload_repeat": ABSENT.hex(), "times": 65537}}, refusal(5, 9),
            {"send": frame("query", 6, query("conformance:query", "treats", "", '{"colour": "red"}'))},
            refusal(6, 9),
            {"send": frame("query", 7, query("conformance:query", "treats", "no-such-lens", ""))},
            refusal(7, 9),
            {"send": frame("query", 8, query("", "treats", "", ""))}, refusal(8, 9),
            {"send": frame("ping", 9, b"still here")}, answer("ping", 9, flags=RESPONSE,
                                                              payload=b"still here".hex()),
        ]),
        dict(name="refused-records", about="A batch with a record that is not signed is refused "
             "(signature, 11) and nothing of it is written; the connection goes on.", steps=[
            hello_step,
            {"send": frame("put", 2, batch([enc["scan0"], enc["unsigned"]]))}, refusal(2, 11),
            {"send": frame("get", 3, id_list([r["unsigned"].id]))},
            answer("get", 3, flags=RESPONSE, payload=struct.pack("<II", 1, 0).hex()),
        ]),
        dict(name="request-before-hello", about="Anything before HELLO: auth_required (4) with the "
             "frame's request id, then the connection is closed.", steps=[
            {"send": frame("ping", 5, b"")}, refusal(5, 4), {"expect_closed": True},
        ]),
        dict(name="unsupported-version", about="No common version: unsupported_version (2), closed.",
             steps=[{"send": frame("hello", 1, hello(low=7, high=9))}, refusal(1, 2), {"expect_closed": True}]),
        dict(name="token-too-long", about="A token over MAX_TOKEN (1,024 bytes): auth_failed (5), closed.",
             steps=[{"send": frame("hello", 1, struct.pack("<HH", 1, 1) + s8("conform") + s16("t" * 1025))},
                    refusal(1, 5), {"expect_closed": True}]),
        dict(name="bad-magic", about="A frame without the magic: protocol (1) with request id 0, closed.",
             steps=[hello_step, {"send": frame("ping", 2, b"", magic=b"XD")}, refusal(0, 1),
                    {"expect_closed": True}]),
        dict(name="unknown-opcode", about="An opcode the protocol does not define: protocol (1), closed.",
             steps=[hello_step, {"send": frame(0x33, 2, b"")}, refusal(2, 1), {"expect_closed": True}]),
        dict(name="replication-opcode-before-support", about="An opcode of the replication range is "
             "known: a server that does not serve it answers unsupported (13), or forbidden (6) to a "
             "role below admin; the connection goes on (how a client probes for it).", steps=[
            hello_step,
            {"send": frame(0x4F, 2, b"")},
            {"expect": {"opcode": "error", "request_id": 2, "error_code_in": [6, 13]}},
            {"send": frame("ping", 3, b"ok")}, answer("ping", 3, flags=RESPONSE, payload=b"ok".hex()),
        ]),
    ]


def main() -> None:
    path = pathlib.Path(__file__).with_name("conversations.json")
    document = {
        "description": "StemeDB conformance conversations (docs/protocol.md, \"Conformance\"): each is "
                       "one connection's requests and the answers a server must give. Replay with "
                       "tests/vectors/conform.py HOST:PORT.",
        "protocol_version": 1,
        "signer_seed": SEED.hex(),
        "conversations": conversations(),
    }
    path.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {len(document['conversations'])} conversations to {path}")


if __name__ == "__main__":
    main()
