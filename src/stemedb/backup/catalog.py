"""The backup manifest: what a backup (or the archive) holds, and how to check every byte of it.

Owns: the manifest document (docs/operations.md, "Backup and archival"):
format version, kind, time, the store it copies (segment size, creation
time), position, record count and record digest, and per segment the parts
that hold its bytes, each with its BLAKE3 checksum, record count and digest
and, for archived parts, the commit times of its batches; reading it back
with its own checksum checked; naming and listing the manifests of a
destination; and the record digest itself. Must never: trust a manifest
whose checksum does not match.

The record digest of a set of record IDs is their sum as 256-bit
little-endian integers, modulo 2²⁵⁶ (hex, little-endian): it does not depend
on order, it adds up over parts, and unlike an XOR a record present twice
does not cancel out.

Error handling: a damaged or unknown manifest raises CorruptionError naming
the object; a destination without manifests raises StemeError.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from stemedb import _hash, _segment
from stemedb.backup.objects import Objects
from stemedb.backup.point import frame_runs
from stemedb.errors import CorruptionError, StemeError

FORMAT = 1
BACKUPS = "backups"            # backups/<name>.json: one per backup, never rewritten
ARCHIVE = "archive.json"       # the archiver's latest point, replaced at every round
PARTS = "parts"                # parts/<segment>-<offset>-<blake3 prefix>: immutable bytes
MODULUS = 1 << 256


def record_digest(ids: np.ndarray) -> int:
    """The sum of (n, 32) uint8 IDs as little-endian 256-bit integers, mod 2²⁵⁶."""
    if not len(ids):
        return 0
    words = np.ascontiguousarray(ids).view("<u4").reshape(len(ids), 8)
    sums = words.sum(axis=0, dtype=np.uint64)   # n < 2³² records: each column sum fits 64 bits
    return sum(int(value) << (32 * i) for i, value in enumerate(sums.tolist())) % MODULUS


def digest_hex(value: int) -> str:
    return value.to_bytes(32, "little").hex()


def digest_value(text: str) -> int:
    return int.from_bytes(bytes.fromhex(text), "little")


def part_records(data: bytes | bytearray | memoryview, offset: int,
                 frame_end: int) -> tuple[int, int]:
    """(record frames, record digest) of a part: segment bytes [offset, offset+len) of a segment
    whose frames end at `frame_end` (the footer's place)."""
    records, digest, _ = part_contents(data, offset, frame_end)
    return records, digest


def part_contents(data: bytes | bytearray | memoryview, offset: int,
                  frame_end: int) -> tuple[int, int, int]:
    """part_records, and the segment offset just past the part's last complete batch (one walk).

    The part must start at a frame boundary (offset 0, or the end of a batch).
    """
    view = memoryview(data)
    start = max(_segment.HEADER_SIZE - offset, 0)
    end = min(len(view), frame_end - offset)
    ids = [np.zeros((0, 32), dtype=np.uint8)]
    batches_end = start
    for run in frame_runs(view, start, end) if start < end else ():
        types, positions = run["types"], run["positions"]
        records = positions[types == _segment.RECORD]
        if len(records):
            ids.append(_segment.read_ids(view, records))
        for position in positions[types == _segment.BATCH].tolist():
            batch_bytes = _segment.batch_info(view, position)[2]
            if position + batch_bytes <= run["stop"]:
                batches_end = max(batches_end, position + batch_bytes)
    every = np.concatenate(ids)
    return len(every), record_digest(every), offset + batches_end


def blake3_hex(data: bytes | bytearray | memoryview) -> str:
    return _hash.blake3(data).hex()


@dataclass
class Manifest:
    """One backup's (or the archive's) manifest, as stored (see the module doc)."""

    document: dict[str, Any]
    name: str                 # the object it was read from, or will be written to

    @property
    def kind(self) -> str:
        return str(self.document["kind"])

    @property
    def taken_us(self) -> int:
        return int(self.document["taken_us"])

    @property
    def position(self) -> tuple[int, int]:
        number, offset = self.document["position"]
        return int(number), int(offset)

    @property
    def records(self) -> int:
        return int(self.document["records"])

    @property
    def segments(self) -> list[dict[str, Any]]:
        return list(self.document["segments"])

    def bytes_held(self) -> int:
        return sum(int(s["length"]) for s in self.document["segments"])

    def encode(self) -> bytes:
        body = {k: v for k, v in self.document.items() if k != "checksum"}
        body["checksum"] = _checksum(body)
        return json.dumps(body, sort_keys=True, indent=1).encode() + b"\n"


def _checksum(body: dict[str, Any]) -> str:
    canonical = json.dumps({k: v for k, v in body.items() if k != "checksum"}, sort_keys=True,
                           separators=(",", ":")).encode()
    return blake3_hex(canonical)


def parse_manifest(data: bytes, where: str, name: str) -> Manifest:
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptionError(f"{where}: damaged backup manifest: not JSON ({exc}); use another "
                              "backup (stemedb backup --list)", path=where, offset=0) from None
    if not isinstance(document, dict) or document.get("checksum") != _checksum(document):
        raise CorruptionError(f"{where}: damaged backup manifest: its checksum does not match; "
                              "use another backup (stemedb backup --list)", path=where, offset=0)
    if document.get("format") != FORMAT:
        raise StemeError(f"{where}: backup format {document.get('format')!r} is not {FORMAT}; "
                         "restore it with the StemeDB release that wrote it")
    return Manifest(document, name)


def read_manifest(objects: Objects, name: str) -> Manifest:
    return parse_manifest(objects.get(name), objects.describe(name), name)


def manifest_names(objects: Objects) -> list[str]:
    """The backup manifests of a destination, oldest first, then the archive's if present."""
    names = [n for n in objects.names(BACKUPS) if n.endswith(".json")]
    if objects.exists(ARCHIVE):
        names.append(ARCHIVE)
    return names


def newest(objects: Objects, where: str) -> Manifest:
    """The manifest that reaches furthest into the log (the latest backup or the archive)."""
    names = manifest_names(objects)
    if not names:
        raise StemeError(f"{where}: no backup here (no backups/*.json, no archive.json); give "
                         "the destination a backup or the archive was written to")
    found = [read_manifest(objects, name) for name in names]
    return max(found, key=lambda m: (m.position, m.taken_us))


def backup_name(taken_us: int) -> str:
    moment = datetime.datetime.fromtimestamp(taken_us / 1e6, tz=datetime.timezone.utc)
    return f"{BACKUPS}/{moment.strftime('%Y%m%dT%H%M%S')}.{taken_us % 1_000_000:06d}Z.json"


def part_name(number: int, offset: int, checksum: str) -> str:
    return f"{PARTS}/{number:08d}-{offset:012d}-{checksum[:16]}"


def iso(us: int) -> str:
    moment = datetime.datetime.fromtimestamp(us / 1e6, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(text: str) -> int:
    """µs since the epoch from a whole number of µs or an ISO 8601 time (UTC if no zone)."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise StemeError(f"--as-of: {text!r} is neither µs since 1970 nor an ISO 8601 time "
                         "(2026-12-02T01:30:00Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    delta = moment - datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
