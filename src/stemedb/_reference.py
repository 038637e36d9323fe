"""A pure-Python reference implementation of docs/format.md ("Record encoding").

Owns: a second, independent reading of the format, written for clarity with
``struct`` and the ``blake3`` package. Tests run every input through both this
module and the compiled codec and require identical bytes, IDs and errors.
The benchmark uses it as the "what you would write without a native core"
baseline. Must never: be used on a hot path of the database.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import blake3

from stemedb.errors import InvalidRecord

# Read from docs/format.md, deliberately not imported from stemedb.RecordKind or
# the compiled codec: a cross-check that shares the code it checks checks nothing.
VERSION = 1
VOTE_VERSION = 2        # a vote that carries its assertion's subject
KIND_ASSERTION, KIND_VOTE, KIND_EPOCH, KIND_ENVELOPE = 1, 2, 3, 4
TEXT, NUMBER, BOOLEAN, REFERENCE, BYTES = 1, 2, 3, 4, 5
PROOF_NONE, PROOF_SIGNATURES, PROOF_ENVELOPE = 0, 1, 2


def _object_fields(record: Any) -> bytes:
    from stemedb.records import Ref

    value = record.object
    if isinstance(value, bool):
        return struct.pack("<BB", BOOLEAN, 1 if value else 0)
    if isinstance(value, str):
        raw = value.encode()
        return struct.pack("<BI", TEXT, len(raw)) + raw
    if isinstance(value, Ref):
        raw = value.entity.encode()
        return struct.pack("<BH", REFERENCE, len(raw)) + raw
    if isinstance(value, bytes):
        return struct.pack("<BI", BYTES, len(value)) + value
    return struct.pack("<Bd", NUMBER, float(value))


def _body(record: Any) -> tuple[int, bytes]:
    kind = type(record).__name__
    if kind == "Assertion":
        subject, predicate = record.subject.encode(), record.predicate.encode()
        mask = ((record.parent_hash is not None) | (record.epoch is not None) << 1
                | (record.visual_hash is not None) << 2 | (record.vector is not None) << 3)
        body = (struct.pack("<H", len(subject)) + subject + struct.pack("<H", len(predicate))
                + predicate + _object_fields(record)
                + struct.pack("<fQBB", record.confidence, record.timestamp,
                              int(record.source_class), int(record.lifecycle))
                + record.source_hash + bytes([mask]))
        for optional in (record.parent_hash, record.epoch, record.visual_hash):
            if optional is not None:
                body += optional
        if record.vector is not None:
            body += struct.pack(f"<H{len(record.vector)}f", len(record.vector), *record.vector)
        return KIND_ASSERTION, body
    if kind == "Vote":
        body = record.assertion_id + struct.pack("<fQ", record.weight, record.timestamp)
        if record.subject is not None:
            subject = record.subject.encode()
            body += struct.pack("<H", len(subject)) + subject
        return KIND_VOTE, body
    if kind == "Epoch":
        name, description = record.name.encode(), record.description.encode()
        body = (struct.pack("<H", len(name)) + name + struct.pack("<I", len(description))
                + description + struct.pack("<QBH", record.timestamp,
                                            int(record.supersession_kind), len(record.supersedes))
                + b"".join(record.supersedes))
        return KIND_EPOCH, body
    if kind == "Envelope":
        members = record.members
        return KIND_ENVELOPE, struct.pack("<QI", record.timestamp, len(members)) + b"".join(members)
    raise InvalidRecord(f"record: unknown type {kind}")


def content(record: Any) -> bytes:
    """Canonical content bytes of a record object."""
    kind, body = _body(record)
    signers = bytes([len(record.signers)]) + b"".join(record.signers)
    size = 6 + len(signers) + len(body)
    version = VOTE_VERSION if kind == KIND_VOTE and record.subject is not None else VERSION
    return struct.pack("<BBI", version, kind, size) + signers + body


def proof(record: Any) -> bytes:
    if record.envelope is not None:
        return bytes([PROOF_ENVELOPE]) + record.envelope
    signatures = record._signature_entries
    if signatures:
        out = bytes([PROOF_SIGNATURES, len(signatures)])
        for index, signature in signatures:
            out += bytes([index]) + signature
        return out
    return bytes([PROOF_NONE])


def encode(record: Any) -> bytes:
    return content(record) + proof(record)


def record_id(record: Any) -> bytes:
    return blake3.blake3(content(record)).digest()


def id_of_encoded(data: bytes) -> bytes:
    (size,) = struct.unpack_from("<I", data, 2)
    return blake3.blake3(data[:size]).digest()


class _Cursor:
    def __init__(self, data: bytes, end: int) -> None:
        self.data, self.pos, self.end = data, 0, end

    def take(self, n: int, field: str) -> bytes:
        if n > self.end - self.pos:
            raise InvalidRecord(f"{field}: truncated: needs {n} bytes at offset {self.pos}, "
                                f"only {self.end - self.pos} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, field: str) -> Any:
        values = struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), field))
        return values[0] if len(values) == 1 else values

    def utf8(self, n: int, field: str) -> str:
        try:
            return self.take(n, field).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRecord(f"{field}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def _check_float(value: float, field: str) -> float:
    if math.isnan(value):
        raise InvalidRecord(f"{field}: NaN is not allowed")
    if value == 0 and math.copysign(1.0, value) < 0:
        raise InvalidRecord(f"{field}: negative zero is not canonical")
    return value


def _length(value: int, lo: int, hi: int, field: str) -> int:
    if not lo <= value <= hi:
        raise InvalidRecord(f"{field}: length {value}, allowed {lo}..{hi}")
    return value


def decode(data: bytes) -> Any:
    """Decode one record (strict), building the public record classes."""
    from stemedb import records as r

    data = bytes(data)
    cur = _Cursor(data, len(data))
    version, kind, size = cur.unpack("BBI", "header")
    if version not in (VERSION, VOTE_VERSION):
        raise InvalidRecord(f"version: unknown format version {version}")
    if kind not in (KIND_ASSERTION, KIND_VOTE, KIND_EPOCH, KIND_ENVELOPE):
        raise InvalidRecord(f"kind: unknown record kind {kind}")
    if version == VOTE_VERSION and kind != KIND_VOTE:
        raise InvalidRecord(f"version: format version {version} is defined for votes only")
    if size > len(data):
        raise InvalidRecord(f"content_length: truncated: header declares {size} bytes")
    cur.end = size
    count = cur.unpack("B", "signer_count")
    if count > 16:
        raise InvalidRecord(f"signer_count: {count}, the limit is 16")
    signers = [cur.take(32, "signers") for _ in range(count)]
    if len(set(signers)) != len(signers):
        raise InvalidRecord("signers: public key listed twice")
    record: Any
    if kind == KIND_ASSERTION:
        subject = cur.utf8(_length(cur.unpack("H", "subject length"), 1, 1024, "subject"), "subject")
        predicate = cur.utf8(_length(cur.unpack("H", "predicate length"), 1, 256, "predicate"),
                             "predicate")
        tag = cur.unpack("B", "object tag")
        value: Any
        if tag == TEXT:
            value = cur.utf8(_length(cur.unpack("I", "object length"), 0, 1 << 20, "object (text)"),
                             "object (text)")
        elif tag == NUMBER:
            value = _check_float(cur.unpack("d", "object (number)"), "object (number)")
            if not math.isfinite(value):
                raise InvalidRecord("object (number): not finite")
        elif tag == BOOLEAN:
            byte = cur.unpack("B", "object (boolean)")
            if byte > 1:
                raise InvalidRecord(f"object (boolean): byte {byte}, expected 0 or 1")
            value = bool(byte)
        elif tag == REFERENCE:
            value = r.Ref(cur.utf8(_length(cur.unpack("H", "object length"), 1, 1024,
                                           "object (reference)"), "object (reference)"))
        elif tag == BYTES:
            value = cur.take(_length(cur.unpack("I", "object length"), 0, 1 << 20, "object (bytes)"),
                             "object (bytes)")
        else:
            raise InvalidRecord(f"object: unknown object tag {tag}")
        confidence = _check_float(cur.unpack("f", "confidence"), "confidence")
        timestamp = cur.unpack("Q", "timestamp")
        source_class = cur.unpack("B", "source_class")
        lifecycle = cur.unpack("B", "lifecycle")
        if source_class > 6:
            raise InvalidRecord(f"source_class: unknown value {source_class}")
        if lifecycle > 4:
            raise InvalidRecord(f"lifecycle: unknown value {lifecycle}")
        source_hash = cur.take(32, "source_hash")
        mask = cur.unpack("B", "optional fields mask")
        if mask & 0xF0:
            raise InvalidRecord(f"optional fields mask: reserved bits set (0x{mask:02x})")
        parent = cur.take(32, "parent_hash") if mask & 1 else None
        epoch = cur.take(32, "epoch") if mask & 2 else None
        visual = cur.take(8, "visual_hash") if mask & 4 else None
        vector = None
        if mask & 8:
            n = _length(cur.unpack("H", "vector length"), 1, 4096, "vector")
            vector = [_check_float(x, "vector") for x in cur.unpack(f"{n}f", "vector")] \
                if n > 1 else [_check_float(cur.unpack("f", "vector"), "vector")]
        record = r.Assertion(subject, predicate, value, confidence=confidence, timestamp=timestamp,
                             source_class=source_class, lifecycle=lifecycle,
                             source_hash=source_hash, parent_hash=parent, epoch=epoch,
                             visual_hash=visual, vector=vector, signers=signers)
    elif kind == KIND_VOTE:
        assertion_id = cur.take(32, "assertion_id")
        weight = _check_float(cur.unpack("f", "weight"), "weight")
        timestamp = cur.unpack("Q", "timestamp")
        vote_subject = None
        if version == VOTE_VERSION:
            vote_subject = cur.utf8(_length(cur.unpack("H", "subject length"), 1, 1024, "subject"),
                                    "subject")
        record = r.Vote(assertion_id, weight, timestamp=timestamp, signers=signers,
                        subject=vote_subject)
    elif kind == KIND_EPOCH:
        name = cur.utf8(_length(cur.unpack("H", "name length"), 1, 256, "name"), "name")
        description = cur.utf8(_length(cur.unpack("I", "description length"), 0, 1 << 16,
                                       "description"), "description")
        timestamp, skind, n = cur.unpack("QBH", "epoch fields")
        if skind > 2:
            raise InvalidRecord(f"supersession_kind: unknown value {skind}")
        supersedes = [cur.take(32, "supersedes") for _ in range(_length(n, 0, 1024, "supersedes"))]
        record = r.Epoch(name, description, supersedes=supersedes, supersession_kind=skind,
                         timestamp=timestamp, signers=signers)
    else:
        if count != 1:
            raise InvalidRecord(f"signers: an envelope has exactly one signer, found {count}")
        timestamp = cur.unpack("Q", "timestamp")
        n = _length(cur.unpack("I", "member count"), 1, 1_000_000, "members")
        members = [cur.take(32, "members") for _ in range(n)]
        record = r.Envelope(signers[0], members, timestamp=timestamp)
    if cur.pos != size:
        raise InvalidRecord(f"content_length: header declares {size} bytes but the fields end at {cur.pos}")
    cur.end = len(data)
    proof_kind = cur.unpack("B", "proof kind")
    signatures: list[tuple[int, bytes]] = []
    envelope = None
    if proof_kind == PROOF_SIGNATURES:
        n = cur.unpack("B", "signature count")
        if not 1 <= n <= count:
            raise InvalidRecord(f"signatures: count {n}, allowed 1..{count}")
        last = -1
        for _ in range(n):
            index = cur.unpack("B", "signature signer index")
            if index <= last or index >= count:
                raise InvalidRecord(f"signatures: signer index {index} out of order")
            last = index
            signatures.append((index, cur.take(64, "signature")))
    elif proof_kind == PROOF_ENVELOPE:
        if kind == KIND_ENVELOPE:
            raise InvalidRecord("proof: an envelope cannot be proven by another envelope")
        envelope = cur.take(32, "envelope")
    elif proof_kind != PROOF_NONE:
        raise InvalidRecord(f"proof: unknown proof kind {proof_kind}")
    if cur.pos != len(data):
        raise InvalidRecord(f"trailing bytes: {len(data) - cur.pos} bytes after the record's proof")
    return record._with_proof(signers, signatures, envelope)
