"""The replication payloads (stemedb.replication.framing) against docs/protocol.md and the vectors.

The vectors of section "replication" in tests/vectors/protocol.json are built
with `struct` by tests/vectors/generate_protocol.py, independently of this
code: each must parse to its fields and be rebuilt byte for byte, inside a
frame the binary protocol's reader accepts. Every truncation of every payload
is refused with a FrameError naming the field; unknown flags are refused.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

import stemedb
from stemedb import _codec, _protocol
from stemedb.errors import (
    CorruptionError,
    DurabilityError,
    FrameError,
    InvalidRecord,
    NotFound,
    ProtocolError,
    SignatureError,
    StorageFull,
    Unavailable,
    error_from_code,
)
from stemedb.replication import framing
from stemedb.replication.framing import NodeHello, RecordBatch, SyncAnswer, SyncRequest, SyncWith

ROOT = pathlib.Path(__file__).resolve().parent.parent
VECTORS = [v for v in json.loads((ROOT / "tests" / "vectors" / "protocol.json").read_text())["vectors"]
           if v.get("section") == "replication"]
DOC = (ROOT / "docs" / "protocol.md").read_text()
SIGNER = stemedb.Signer.from_seed(bytes([3]) * 32)


def sample_batch(n: int = 3) -> RecordBatch:
    records = [stemedb.Assertion(f"s{i}", "p", i, timestamp=10 + i).sign(SIGNER) for i in range(n)]
    blob, offsets, ids = _codec.encode_many(records)
    return RecordBatch(blob, np.asarray(offsets, dtype=np.int64), ids)


def batch_of(fields: dict) -> RecordBatch:
    parts = [bytes.fromhex(h) for h in fields["records"]]
    offsets = np.concatenate(([0], np.cumsum([len(p) for p in parts]))).astype(np.int64)
    ids = np.frombuffer(b"".join(bytes.fromhex(h) for h in fields["ids"]), dtype=np.uint8).reshape(-1, 32)
    return RecordBatch(b"".join(parts), offsets, ids)


def batch_fields(batch: RecordBatch) -> dict:
    blob, offsets = bytes(batch.blob), batch.offsets
    return {"ids": [bytes(row).hex() for row in batch.ids],
            "records": [blob[offsets[i]:offsets[i + 1]].hex() for i in range(len(offsets) - 1)]}


def parse(vector: dict) -> dict:
    payload = bytes.fromhex(vector["payload"])
    opcode, response = vector["opcode"], vector["direction"] == "response"
    if opcode == "node_hello":
        hello = framing.decode_node_hello(payload)
        return {"cluster": hello.cluster, "version": hello.version, "node": hello.node}
    if opcode == "replica_put" and not response:
        batch, push = framing.decode_replica_put(payload)
        return {"push": push, **batch_fields(batch)}
    if opcode == "push" and not response:
        return batch_fields(framing.decode_push(payload))
    if opcode in ("replica_put", "push"):
        return {"counts": list(framing.decode_counts(payload, 1 if opcode == "replica_put" else 2, opcode))}
    if opcode == "sync" and not response:
        request = framing.decode_sync_request(payload)
        return {"session": request.session, "step": request.step, "flags": request.flags,
                "salt": request.salt.hex(), "scopes": list(request.scopes),
                "message": request.message.hex(), **batch_fields(request.records)}
    if opcode == "sync":
        answer = framing.decode_sync_answer(payload)
        return {"step": answer.step, "flags": answer.flags, "message": answer.message.hex(),
                **batch_fields(answer.records)}
    if opcode == "sync_with" and not response:
        request = framing.decode_sync_with(payload)
        return {"peer": request.peer, "token": request.token, "pull": request.pull, "push": request.push}
    if response:
        return {"json": json.dumps(framing.decode_json(payload, opcode), sort_keys=True)}
    framing.decode_empty(payload, opcode)
    return {}


def build(vector: dict) -> bytes:
    f, opcode, response = vector["fields"], vector["opcode"], vector["direction"] == "response"
    if opcode == "node_hello":
        return framing.encode_node_hello(NodeHello(f["cluster"], f["version"], f["node"]))
    if opcode in ("replica_put", "push") and response:
        return framing.encode_counts(*f["counts"])
    if opcode == "replica_put":
        return framing.encode_replica_put(batch_of(f), push=f["push"])
    if opcode == "push":
        return framing.encode_records(batch_of(f))
    if opcode == "sync" and not response:
        return framing.encode_sync_request(SyncRequest(
            f["session"], f["step"], f["flags"], bytes.fromhex(f["message"]), batch_of(f),
            bytes.fromhex(f["salt"]), tuple(f["scopes"])))
    if opcode == "sync":
        return framing.encode_sync_answer(SyncAnswer(f["step"], f["flags"], bytes.fromhex(f["message"]),
                                                     batch_of(f)))
    if opcode == "sync_with" and not response:
        return framing.encode_sync_with(SyncWith(f["peer"], f["token"], pull=f["pull"], push=f["push"]))
    if response:
        return framing.encode_json(json.loads(f["json"]))
    return b""


def test_every_replication_opcode_has_vectors_and_a_documented_row():
    opcodes = {v["opcode"] for v in VECTORS}
    assert opcodes == {"node_hello", "sync", "replica_put", "push", "sync_with", "cluster_status",
                       "cluster_reload"}
    section = DOC[DOC.index("## Replication opcodes"):]
    for name in opcodes:
        code = getattr(_protocol, name.upper())
        assert f"| `0x{code:02X}` | {name.upper()} |" in section, name


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_parses_and_rebuilds(vector):
    raw = bytes.fromhex(vector["hex"])
    reader = _protocol.FrameReader(1 << 24, from_server=vector["direction"] == "response")
    reader.feed(raw)
    frame = reader.next()
    assert reader.next() is None and reader.buffered == 0
    assert (_protocol.OPCODE_NAMES[frame.opcode], frame.flags, frame.request_id) == (
        vector["opcode"], vector["flags"], vector["request_id"])
    assert parse(vector) == vector["fields"]
    assert build(vector).hex() == vector["payload"]


@pytest.mark.parametrize("vector", [v for v in VECTORS if v["payload"]],
                         ids=[v["name"] for v in VECTORS if v["payload"]])
def test_every_truncation_and_every_extra_byte_is_refused(vector):
    payload = bytes.fromhex(vector["payload"])
    for cut in range(len(payload)):
        with pytest.raises(FrameError):
            parse({**vector, "payload": payload[:cut].hex()})
    with pytest.raises(FrameError):
        parse({**vector, "payload": (payload + b"\x00").hex()})


def test_records_blocks_check_ids_against_records():
    batch = sample_batch()
    payload = framing.encode_records(batch)
    back = framing.decode_records(payload)
    assert back.ids.tobytes() == batch.ids.tobytes() and bytes(back.blob) == bytes(batch.blob)
    two_ids = (2).to_bytes(4, "little") + batch.ids[:2].tobytes() + payload[4 + 3 * 32:]
    with pytest.raises(FrameError, match="records: 2 IDs but 3 records"):
        framing.decode_records(two_ids)
    empty = framing.encode_records(RecordBatch.empty())
    assert empty == bytes(8) and len(framing.decode_records(empty)) == 0


def test_select_and_concat():
    batch = sample_batch(4)
    picked = batch.select(np.array([3, 1]))
    assert picked.ids.tobytes() == batch.ids[[3, 1]].tobytes()
    joined = framing.concat([batch.select(np.array([0])), RecordBatch.empty(), batch.select(np.array([2, 3]))])
    records = _codec.decode_many(joined.blob, joined.offsets)
    assert [r.subject for r in records] == ["s0", "s2", "s3"] and len(joined) == 3
    assert joined.size == len(bytes(joined.blob))


def test_flags_and_fields_out_of_their_range_are_refused():
    batch = framing.encode_records(sample_batch(1))
    with pytest.raises(FrameError, match="REPLICA_PUT: unknown flags 0x2"):
        framing.decode_replica_put(b"\x02" + batch)
    start = framing.encode_sync_request(SyncRequest(1, 0, framing.SYNC_START, b"", RecordBatch.empty(),
                                                    b"s" * 8, (2,)))
    with pytest.raises(FrameError, match="SYNC: unknown flags 0x10"):
        framing.decode_sync_request(start[:12] + b"\x10" + start[13:])
    with pytest.raises(FrameError, match="PULL and PUSH belong to the START step"):
        framing.decode_sync_request(start[:12] + b"\x04" + start[13:])
    with pytest.raises(FrameError, match="PULL and PUSH exclude each other"):
        framing.decode_sync_request(start[:12] + b"\x0d" + start[13:])
    twice = framing.encode_sync_request(SyncRequest(1, 0, framing.SYNC_START, b"", RecordBatch.empty(),
                                                    b"s" * 8, (2, 2)))
    with pytest.raises(FrameError, match="a scope is listed twice"):
        framing.decode_sync_request(twice)
    with pytest.raises(FrameError, match=r"SYNC_WITH: flags 0x3 \(0 both directions, 1 pull, 2 push\)"):
        framing.decode_sync_with(b"\x03" + bytes(4))
    with pytest.raises(FrameError, match="SYNC_WITH: peer is empty"):
        framing.decode_sync_with(bytes(5))
    with pytest.raises(FrameError, match="NODE_HELLO: cluster is not UTF-8"):
        framing.decode_node_hello(b"\x01\xff" + bytes(4) + b"\x00")
    with pytest.raises(FrameError, match="CLUSTER_STATUS"):
        framing.decode_empty(b"x", "CLUSTER_STATUS")


@pytest.mark.parametrize("error", [
    SignatureError("s"), InvalidRecord("i"), StorageFull("f"), DurabilityError("d"),
    CorruptionError("c"), NotFound("n"), Unavailable("u"), ProtocolError("p"),
])
def test_errors_cross_the_wire_through_the_one_table(error):
    payload = _protocol.encode_error(error.code, 0, str(error))
    code, _retry, message = _protocol.decode_error(payload)
    back = error_from_code(code, message)
    assert type(back) is type(error) and str(back) == str(error)
    assert not hasattr(framing, "error_code") and not hasattr(framing, "ERROR_CODES")
