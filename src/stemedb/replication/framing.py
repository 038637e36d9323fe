"""The payloads of the binary protocol's replication opcodes, and their bytes.

Owns: every byte layout of the replication requests and answers
(docs/protocol.md, "Replication"): NODE_HELLO (who a node is), the records
block (IDs as the sender computed them, then a record batch), REPLICA_PUT
(a write forwarded by the node that accepted it), PUSH, the SYNC step and
its answer, SYNC_WITH, and the JSON texts of CLUSTER_STATUS and
CLUSTER_RELOAD. Frames themselves (header, request ids, flags, ERROR) are
the binary protocol's, built and cut by stemedb._protocol; errors cross the
wire through the one error table (stemedb.errors), never a table here.
Must never: do I/O or touch a store.

Record payloads reuse the binary protocol's `record_batch` shape, preceded by
the records' IDs as the sender computed them, so a receiver can tell a
record whose content does not hash to its claimed ID (a forged or damaged
record) from a merely unknown one.

Error handling: every malformed payload raises FrameError (a ProtocolError)
naming the field; the server answers it `protocol` and closes the connection.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from stemedb import _protocol
from stemedb.errors import FrameError

ID_SIZE = 32
MAX_PING = _protocol.MAX_PING

REPLICA_PUT_PUSH = 0x01  # REPLICA_PUT flag: after storing, push to the partition's other replicas

SYNC_START = 0x01   # SYNC request flags: the first step (carries salt and scopes) ...
SYNC_END = 0x02     # ... the last (the initiator has nothing more to send or ask)
SYNC_PULL = 0x04    # START only: the initiator only receives (the responder takes no records)
SYNC_PUSH = 0x08    # START only: the initiator only sends (the responder sends no records)
SYNC_DONE = 0x01    # SYNC answer flag: the responder has nothing more to send or ask
SYNC_REQUEST_FLAGS = SYNC_START | SYNC_END | SYNC_PULL | SYNC_PUSH
SALT_SIZE = 8
MAX_SCOPES = 1 << 16

SYNC_WITH_PULL = 0x01   # SYNC_WITH flags: only receive from the peer ...
SYNC_WITH_PUSH = 0x02   # ... only send to it (neither: both directions)


# ------------------------------------------------------------------ records


@dataclass
class RecordBatch:
    """Encoded records blob[offsets[i]:offsets[i+1]] with their IDs ids[i] ((n, 32) uint8)."""

    blob: bytes | memoryview
    offsets: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def size(self) -> int:
        return int(self.offsets[-1] - self.offsets[0]) if len(self.offsets) else 0

    @classmethod
    def empty(cls) -> RecordBatch:
        return cls(b"", np.zeros(1, dtype=np.int64), np.zeros((0, ID_SIZE), dtype=np.uint8))

    def select(self, rows: np.ndarray) -> RecordBatch:
        """The records at positions `rows`, in that order."""
        view = memoryview(self.blob)
        starts, ends = self.offsets[:-1][rows], self.offsets[1:][rows]
        sizes = ends - starts
        offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
        blob = b"".join(view[int(s):int(e)] for s, e in zip(starts, ends))
        return RecordBatch(blob, offsets, np.ascontiguousarray(self.ids[rows]))


def concat(batches: list[RecordBatch]) -> RecordBatch:
    batches = [b for b in batches if len(b)]
    if not batches:
        return RecordBatch.empty()
    if len(batches) == 1:
        return batches[0]
    parts, offsets, base = [], [], 0
    for batch in batches:
        view = memoryview(batch.blob)[int(batch.offsets[0]):int(batch.offsets[-1])]
        parts.append(view)
        offsets.append(batch.offsets[:-1] - batch.offsets[0] + base)
        base += len(view)
    offsets.append(np.array([base], dtype=np.int64))
    return RecordBatch(b"".join(parts), np.concatenate(offsets).astype(np.int64),
                       np.concatenate([b.ids for b in batches]))


def encode_records(batch: RecordBatch) -> bytes:
    """`count:u32`, `count` × 32-byte IDs, then the protocol's record_batch of the same count."""
    ids = np.ascontiguousarray(batch.ids, dtype=np.uint8).reshape(-1, ID_SIZE)
    return (struct.pack("<I", len(ids)) + ids.tobytes()
            + _protocol.encode_record_batch(batch.blob, batch.offsets))


def decode_records(payload: bytes, start: int = 0, what: str = "records") -> RecordBatch:
    """A records block at payload[start:], which it must fill exactly."""
    if len(payload) - start < 4:
        raise FrameError(f"{what}: the ID count runs past the end")
    (count,) = struct.unpack_from("<I", payload, start)
    end = start + 4 + count * ID_SIZE
    if end > len(payload):
        raise FrameError(f"{what}: {count} IDs do not fit the {len(payload) - start - 4} bytes left")
    ids = np.frombuffer(payload, dtype=np.uint8, count=count * ID_SIZE, offset=start + 4)
    try:
        blob, offsets = _protocol.decode_record_batch(payload, start=end)
    except FrameError as exc:
        raise FrameError(f"{what}: {exc}") from None
    if len(offsets) - 1 != count:
        raise FrameError(f"{what}: {count} IDs but {len(offsets) - 1} records")
    return RecordBatch(blob, offsets, ids.reshape(count, ID_SIZE))


# ----------------------------------------------------------------- payloads


@dataclass(frozen=True)
class NodeHello:
    """Who is speaking: the cluster's name and file version, and the node's id."""

    cluster: str
    version: int
    node: str


def encode_node_hello(hello: NodeHello) -> bytes:
    return _str8(hello.cluster, "cluster") + struct.pack("<I", hello.version) + _str8(hello.node, "node")


def decode_node_hello(payload: bytes) -> NodeHello:
    reader = _Reader(payload, "NODE_HELLO")
    cluster = reader.str8("cluster")
    version = reader.u32("version")
    node = reader.str8("node")
    reader.end()
    return NodeHello(cluster, version, node)


def encode_replica_put(batch: RecordBatch, *, push: bool) -> bytes:
    return bytes([REPLICA_PUT_PUSH if push else 0]) + encode_records(batch)


def decode_replica_put(payload: bytes) -> tuple[RecordBatch, bool]:
    if not payload:
        raise FrameError("REPLICA_PUT: empty payload")
    if payload[0] & ~REPLICA_PUT_PUSH:
        raise FrameError(f"REPLICA_PUT: unknown flags {payload[0]:#x}")
    return decode_records(payload, 1, "REPLICA_PUT records"), bool(payload[0] & REPLICA_PUT_PUSH)


def decode_push(payload: bytes) -> RecordBatch:
    return decode_records(payload, 0, "PUSH records")


def encode_counts(*counts: int) -> bytes:
    return struct.pack(f"<{len(counts)}I", *counts)


def decode_counts(payload: bytes, n: int, what: str) -> tuple[int, ...]:
    if len(payload) != 4 * n:
        raise FrameError(f"{what} answer: {len(payload)} bytes, expected {4 * n}")
    return struct.unpack(f"<{n}I", payload)


@dataclass
class SyncRequest:
    session: int                 # chosen by the initiator, unique among its open sessions
    step: int                    # 0, 1, 2, ...: a repeated step is a duplicate
    flags: int                   # SYNC_START, SYNC_END; with START, SYNC_PULL or SYNC_PUSH
    message: bytes               # the reconciliation message (reconcile.encode_message), or empty
    records: RecordBatch         # records the initiator found the responder lacking
    salt: bytes = b""            # START only
    scopes: tuple[int, ...] = ()  # START only


@dataclass
class SyncAnswer:
    step: int
    flags: int                   # SYNC_DONE
    message: bytes
    records: RecordBatch


def encode_sync_request(request: SyncRequest) -> bytes:
    head = struct.pack("<QIB", request.session, request.step, request.flags)
    if request.flags & SYNC_START:
        if len(request.salt) != SALT_SIZE:
            raise ValueError(f"salt: {len(request.salt)} bytes, expected {SALT_SIZE}")
        head += request.salt + struct.pack(f"<I{len(request.scopes)}I", len(request.scopes), *request.scopes)
    return head + struct.pack("<I", len(request.message)) + request.message + encode_records(request.records)


def decode_sync_request(payload: bytes) -> SyncRequest:
    reader = _Reader(payload, "SYNC")
    session = reader.unpack("<Q", "session")[0]
    step = reader.u32("step")
    flags = reader.unpack("<B", "flags")[0]
    if flags & ~SYNC_REQUEST_FLAGS:
        raise FrameError(f"SYNC: unknown flags {flags:#x}")
    if flags & (SYNC_PULL | SYNC_PUSH) and not flags & SYNC_START:
        raise FrameError("SYNC: PULL and PUSH belong to the START step")
    if flags & SYNC_PULL and flags & SYNC_PUSH:
        raise FrameError("SYNC: PULL and PUSH exclude each other (neither: both directions)")
    salt = b""
    scopes: tuple[int, ...] = ()
    if flags & SYNC_START:
        salt = reader.take(SALT_SIZE, "salt")
        count = reader.u32("scope count")
        if count > MAX_SCOPES:
            raise FrameError(f"SYNC: {count} scopes, at most {MAX_SCOPES}")
        scopes = reader.unpack(f"<{count}I", "scopes")
        if len(set(scopes)) != count:
            raise FrameError("SYNC: a scope is listed twice")
    message = reader.take(reader.u32("message length"), "message")
    return SyncRequest(session, step, flags, message,
                       decode_records(payload, reader.position, "SYNC records"), salt, scopes)


def encode_sync_answer(answer: SyncAnswer) -> bytes:
    return (struct.pack("<IBI", answer.step, answer.flags, len(answer.message)) + answer.message
            + encode_records(answer.records))


def decode_sync_answer(payload: bytes) -> SyncAnswer:
    reader = _Reader(payload, "SYNC answer")
    step = reader.u32("step")
    flags = reader.unpack("<B", "flags")[0]
    if flags & ~SYNC_DONE:
        raise FrameError(f"SYNC answer: unknown flags {flags:#x}")
    message = reader.take(reader.u32("message length"), "message")
    return SyncAnswer(step, flags, message, decode_records(payload, reader.position, "SYNC answer records"))


@dataclass(frozen=True)
class SyncWith:
    """Run a session with `peer` (a node id of the cluster, or stemedb://host:port) now."""

    peer: str
    token: str = ""              # presented to `peer` when it is not a node of this cluster
    pull: bool = True            # receive what the peer has and this server lacks
    push: bool = True            # send what this server has and the peer lacks


def encode_sync_with(request: SyncWith) -> bytes:
    if not (request.pull or request.push):
        raise ValueError("sync_with: pull, push or both")
    flags = 0 if request.pull and request.push else (SYNC_WITH_PULL if request.pull else SYNC_WITH_PUSH)
    return bytes([flags]) + _str16(request.peer, "peer") + _str16(request.token, "token")


def decode_sync_with(payload: bytes) -> SyncWith:
    reader = _Reader(payload, "SYNC_WITH")
    flags = reader.unpack("<B", "flags")[0]
    if flags & ~(SYNC_WITH_PULL | SYNC_WITH_PUSH) or flags == SYNC_WITH_PULL | SYNC_WITH_PUSH:
        raise FrameError(f"SYNC_WITH: flags {flags:#x} (0 both directions, 1 pull, 2 push)")
    peer = reader.str16("peer")
    token = reader.str16("token")
    reader.end()
    if not peer:
        raise FrameError("SYNC_WITH: peer is empty")
    return SyncWith(peer, token, pull=flags != SYNC_WITH_PUSH, push=flags != SYNC_WITH_PULL)


def encode_json(document: Any) -> bytes:
    """A JSON answer (SYNC_WITH, CLUSTER_STATUS, CLUSTER_RELOAD): the protocol's text:str32."""
    return _protocol.encode_text(json.dumps(document, sort_keys=True))


def decode_json(payload: bytes, what: str) -> Any:
    text = _protocol.decode_text(payload)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FrameError(f"{what}: not JSON ({exc.msg})") from None


def decode_empty(payload: bytes, what: str) -> None:
    _protocol.decode_empty(payload, what)


def _str8(text: str, what: str) -> bytes:
    data = text.encode()
    if len(data) > 255:
        raise ValueError(f"{what}: {len(data)} bytes, at most 255")
    return bytes([len(data)]) + data


def _str16(text: str, what: str) -> bytes:
    data = text.encode()
    if len(data) > 0xFFFF:
        raise ValueError(f"{what}: {len(data)} bytes, at most 65535")
    return struct.pack("<H", len(data)) + data


class _Reader:
    def __init__(self, payload: bytes, what: str) -> None:
        self.payload = payload
        self.what = what
        self.position = 0

    def take(self, n: int, field: str) -> bytes:
        if n > len(self.payload) - self.position:
            raise FrameError(f"{self.what}: {field} at byte {self.position} runs past the end")
        out = self.payload[self.position:self.position + n]
        self.position += n
        return bytes(out)

    def unpack(self, layout: str, field: str) -> tuple[int, ...]:
        return struct.unpack(layout, self.take(struct.calcsize(layout), field))

    def u32(self, field: str) -> int:
        return int(self.unpack("<I", field)[0])

    def _text(self, data: bytes, field: str) -> str:
        try:
            return data.decode()
        except UnicodeDecodeError:
            raise FrameError(f"{self.what}: {field} is not UTF-8") from None

    def str8(self, field: str) -> str:
        return self._text(self.take(self.take(1, field)[0], field), field)

    def str16(self, field: str) -> str:
        return self._text(self.take(self.unpack("<H", field)[0], field), field)

    def end(self) -> None:
        if self.position != len(self.payload):
            raise FrameError(f"{self.what}: {len(self.payload) - self.position} bytes after the "
                             "last field")
