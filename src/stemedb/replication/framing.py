"""The messages nodes exchange, and their bytes (the interim peer framing).

Owns: every byte layout between two nodes (docs/replication.md, "Peer
messages"): the 12-byte frame header, a bounded incremental frame parser, and
the payloads of HELLO, PING, PUT (a forwarded write), PUSH, SYNC and ERROR.
This is the one place that knows them: when the binary protocol's
replication opcodes (docs/protocol.md, 0x40-0x4F) carry these messages, only
this module changes. Must never: do I/O or touch a store.

Record payloads reuse the binary protocol's `record_batch` shape, preceded by
the records' IDs as the sender computed them, so a receiver can tell a
record whose content does not hash to its claimed ID (a forged or damaged
record) from a merely unknown one.

Error handling: every malformed frame or payload raises ProtocolError naming
the field; a frame header that declares more than `max_payload` bytes is
refused before any of its payload is buffered.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from stemedb import _protocol
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

MAGIC = b"SR"
HEADER = struct.Struct("<2sBBII")       # magic, kind, flags, request_id, length
HEADER_SIZE = HEADER.size
RESPONSE = 0x01                         # flags bit 0: an answer to the request with this id
# A client's PUT frame holds up to 16 MiB of records; forwarded, its records gain 36 bytes each
# (ID and length), so peer frames may be larger than the binary protocol's.
DEFAULT_MAX_PAYLOAD = 32 << 20
MAX_PING = 1024
ID_SIZE = 32

# Message kinds; numbered like the binary protocol's opcodes they will become.
HELLO = 0x01
PING = 0x03
PUT = 0x10          # a write forwarded by the node that accepted it
SYNC = 0x41         # one step of an anti-entropy session
PUSH = 0x44         # records that became durable on the sender
ERROR = 0x7F
KIND_NAMES = {HELLO: "HELLO", PING: "PING", PUT: "PUT", SYNC: "SYNC", PUSH: "PUSH", ERROR: "ERROR"}

PUT_PUSH = 0x01     # PUT flag: after storing, push to the partition's other replicas

SYNC_START = 0x01   # SYNC request flags: the first step (carries salt and scopes) ...
SYNC_END = 0x02     # ... the last (the initiator has nothing more to send or ask)
SYNC_DONE = 0x01    # SYNC answer flag: the responder has nothing more to send or ask
SALT_SIZE = 8
MAX_SCOPES = 1 << 16


@dataclass(frozen=True)
class Frame:
    kind: int
    flags: int
    request_id: int
    payload: bytes

    @property
    def is_response(self) -> bool:
        return bool(self.flags & RESPONSE)


def encode_frame(kind: int, request_id: int, payload: bytes = b"", *, response: bool = False) -> bytes:
    if kind not in KIND_NAMES:
        raise ValueError(f"kind: unknown message kind {kind:#x}")
    return HEADER.pack(MAGIC, kind, RESPONSE if response else 0, request_id, len(payload)) + payload


class FrameParser:
    """Cuts frames out of a byte stream; feeding one byte at a time gives the same frames."""

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer += data
        if len(self._buffer) >= HEADER_SIZE:
            self._check_header()

    def next(self) -> Frame | None:
        if len(self._buffer) < HEADER_SIZE:
            return None
        _, kind, flags, request_id, length = self._check_header()
        if len(self._buffer) < HEADER_SIZE + length:
            return None
        payload = bytes(self._buffer[HEADER_SIZE:HEADER_SIZE + length])
        del self._buffer[:HEADER_SIZE + length]
        return Frame(kind, flags, request_id, payload)

    def frames(self) -> Iterator[Frame]:
        """Every complete frame buffered, one at a time: a bad header after a good frame
        raises only once the good one has been taken."""
        while (frame := self.next()) is not None:
            yield frame

    def _check_header(self) -> tuple[bytes, int, int, int, int]:
        magic, kind, flags, request_id, length = HEADER.unpack_from(self._buffer)
        if magic != MAGIC:
            raise ProtocolError(f"peer frame: magic {bytes(magic)!r}, expected {MAGIC!r}: the peer "
                                "is not a StemeDB node")
        if kind not in KIND_NAMES:
            raise ProtocolError(f"peer frame: unknown message kind {kind:#x}")
        if flags & ~RESPONSE:
            raise ProtocolError(f"peer frame: unknown flags {flags:#x}")
        if length > self.max_payload:
            raise ProtocolError(f"peer frame: {length} payload bytes, above the limit of "
                                f"{self.max_payload}")
        return magic, kind, flags, request_id, length


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


def decode_records(payload: bytes, start: int = 0) -> RecordBatch:
    """A records block at payload[start:], which it must fill exactly."""
    if len(payload) - start < 4:
        raise ProtocolError("peer records: the ID count runs past the end")
    (count,) = struct.unpack_from("<I", payload, start)
    end = start + 4 + count * ID_SIZE
    if end > len(payload):
        raise ProtocolError(f"peer records: {count} IDs do not fit the {len(payload) - start - 4} "
                            "bytes left")
    ids = np.frombuffer(payload, dtype=np.uint8, count=count * ID_SIZE, offset=start + 4)
    blob, offsets = _protocol.decode_record_batch(payload, start=end)
    if len(offsets) - 1 != count:
        raise ProtocolError(f"peer records: {count} IDs but {len(offsets) - 1} records")
    return RecordBatch(blob, offsets, ids.reshape(count, ID_SIZE))


# ----------------------------------------------------------------- payloads


@dataclass(frozen=True)
class Hello:
    """Who is speaking: the cluster's name and file version, and the node's id."""

    cluster: str
    version: int
    node: str


def encode_hello(hello: Hello) -> bytes:
    return _str8(hello.cluster, "cluster") + struct.pack("<I", hello.version) + _str8(hello.node, "node")


def decode_hello(payload: bytes) -> Hello:
    reader = _Reader(payload, "HELLO")
    cluster = reader.str8("cluster")
    version = reader.u32("version")
    node = reader.str8("node")
    reader.end()
    return Hello(cluster, version, node)


def encode_put(batch: RecordBatch, *, push: bool) -> bytes:
    return bytes([PUT_PUSH if push else 0]) + encode_records(batch)


def decode_put(payload: bytes) -> tuple[RecordBatch, bool]:
    if not payload:
        raise ProtocolError("PUT: empty payload")
    if payload[0] & ~PUT_PUSH:
        raise ProtocolError(f"PUT: unknown flags {payload[0]:#x}")
    return decode_records(payload, 1), bool(payload[0] & PUT_PUSH)


def encode_counts(*counts: int) -> bytes:
    return struct.pack(f"<{len(counts)}I", *counts)


def decode_counts(payload: bytes, n: int, what: str) -> tuple[int, ...]:
    if len(payload) != 4 * n:
        raise ProtocolError(f"{what} answer: {len(payload)} bytes, expected {4 * n}")
    return struct.unpack(f"<{n}I", payload)


@dataclass
class SyncRequest:
    session: int                 # chosen by the initiator, unique among its open sessions
    step: int                    # 0, 1, 2, ...: a repeated step is a duplicate
    flags: int                   # SYNC_START, SYNC_END
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
    if flags & ~(SYNC_START | SYNC_END):
        raise ProtocolError(f"SYNC: unknown flags {flags:#x}")
    salt = b""
    scopes: tuple[int, ...] = ()
    if flags & SYNC_START:
        salt = reader.take(SALT_SIZE, "salt")
        count = reader.u32("scope count")
        if count > MAX_SCOPES:
            raise ProtocolError(f"SYNC: {count} scopes, at most {MAX_SCOPES}")
        scopes = reader.unpack(f"<{count}I", "scopes")
        if len(set(scopes)) != count:
            raise ProtocolError("SYNC: a scope is listed twice")
    message = reader.take(reader.u32("message length"), "message")
    return SyncRequest(session, step, flags, message, decode_records(payload, reader.position),
                       salt, scopes)


def encode_sync_answer(answer: SyncAnswer) -> bytes:
    return (struct.pack("<IBI", answer.step, answer.flags, len(answer.message)) + answer.message
            + encode_records(answer.records))


def decode_sync_answer(payload: bytes) -> SyncAnswer:
    reader = _Reader(payload, "SYNC answer")
    step = reader.u32("step")
    flags = reader.unpack("<B", "flags")[0]
    if flags & ~SYNC_DONE:
        raise ProtocolError(f"SYNC answer: unknown flags {flags:#x}")
    message = reader.take(reader.u32("message length"), "message")
    return SyncAnswer(step, flags, message, decode_records(payload, reader.position))


def encode_error(code: int, message: str) -> bytes:
    text = message.encode()[:0xFFFF]
    return struct.pack("<HH", code, len(text)) + text


def decode_error(payload: bytes) -> tuple[int, str]:
    reader = _Reader(payload, "ERROR")
    code = reader.unpack("<H", "code")[0]
    text = reader.take(reader.unpack("<H", "message length")[0], "message")
    reader.end()
    return code, text.decode(errors="replace")


# Errors cross the wire as the binary protocol's codes (docs/protocol.md, "Errors"),
# most specific class first.
ERROR_CODES: tuple[tuple[type[StemeError], int], ...] = (
    (SignatureError, _protocol.E_SIGNATURE),
    (InvalidRecord, _protocol.E_INVALID_RECORD),
    (StorageFull, _protocol.E_STORAGE_FULL),
    (DurabilityError, _protocol.E_DURABILITY),
    (CorruptionError, _protocol.E_CORRUPTION),
    (NotFound, _protocol.E_NOT_FOUND),
    (Unavailable, _protocol.E_UNAVAILABLE),
    (ProtocolError, _protocol.E_PROTOCOL),
)


def error_code(exc: BaseException) -> int:
    for cls, code in ERROR_CODES:
        if isinstance(exc, cls):
            return code
    return _protocol.E_INTERNAL


def error_from_code(code: int, message: str) -> StemeError:
    """The exception a peer's ERROR answer stands for (StemeError for unknown codes)."""
    for cls, known in ERROR_CODES:
        if known == code:
            return cls(message)
    return StemeError(message)


def _str8(text: str, what: str) -> bytes:
    data = text.encode()
    if len(data) > 255:
        raise ValueError(f"{what}: {len(data)} bytes, at most 255")
    return bytes([len(data)]) + data


class _Reader:
    def __init__(self, payload: bytes, what: str) -> None:
        self.payload = payload
        self.what = what
        self.position = 0

    def take(self, n: int, field: str) -> bytes:
        if n > len(self.payload) - self.position:
            raise ProtocolError(f"{self.what}: {field} at byte {self.position} runs past the end")
        out = self.payload[self.position:self.position + n]
        self.position += n
        return bytes(out)

    def unpack(self, layout: str, field: str) -> tuple[int, ...]:
        return struct.unpack(layout, self.take(struct.calcsize(layout), field))

    def u32(self, field: str) -> int:
        return int(self.unpack("<I", field)[0])

    def str8(self, field: str) -> str:
        data = self.take(self.take(1, field)[0], field)
        try:
            return data.decode()
        except UnicodeDecodeError:
            raise ProtocolError(f"{self.what}: {field} is not UTF-8") from None

    def end(self) -> None:
        if self.position != len(self.payload):
            raise ProtocolError(f"{self.what}: {len(self.payload) - self.position} bytes after the "
                                "last field")
