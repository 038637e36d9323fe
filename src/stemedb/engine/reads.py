"""Reads: from an ID or a record number to checksum-checked bytes, and records decoded from them.

Owns: the read path (ID index → location column → `_segment.gather`, which
checks each frame's CRC straight from the read-only mapping → decoding only
when the caller wants objects; for one ID, `_point.PointReader` does all of
that in one compiled call), scans by subject / predicate / kind, and the
sizes of stored records. Must never: serve bytes whose frame checksum
fails, or hold the state lock while decoding.

Error handling: an absent ID raises NotFound (or gives -1 / an empty slice
in the batch calls); a damaged frame, or one in a missing segment file,
raises CorruptionError naming the file and offset; malformed IDs raise
InvalidRecord naming the argument.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from stemedb import _codec, _point, _segment
from stemedb._codec import Record
from stemedb.engine.indexes import State
from stemedb.engine.segments import Segment, SegmentLog
from stemedb.errors import CorruptionError, DatabaseClosed, InvalidRecord, NotFound
from stemedb.records import RecordKind

KIND_NAMES = {RecordKind.ASSERTION: "assertion", RecordKind.VOTE: "vote", RecordKind.EPOCH: "epoch",
              RecordKind.ENVELOPE: "envelope"}
SCAN_CHUNK = 4096                # records gathered and decoded per step of a scan

IdsLike = np.ndarray | Iterable[bytes | bytearray | memoryview]


class Reads:
    """The read path of one open store. Thread-safe."""

    def __init__(self, log: SegmentLog, state: State, lock: threading.RLock, path: str = "") -> None:
        self.log = log
        self.state = state
        self.lock = lock
        # One ID: get_encoded / get / contains in one compiled call each.
        self.point = _point.PointReader(state, log.segments, lock, id_bytes, unreadable,
                                        path or log.directory)
        self._path = path or log.directory

    def _check_open(self) -> None:
        """Under the lock: close() releases the indexes under it, so a call that found the
        store open and then waited must not read them (row numbers from before close would
        point past the emptied columns)."""
        if self.point.closed:
            raise DatabaseClosed(f"{self._path}: the database is closed; open it again to use it")

    def get_encoded(self, record_id: bytes) -> bytes:
        """The stored bytes (content + proof) of the record with this ID, checksum-checked."""
        return self.point.get_encoded(record_id)

    def stored(self, record_id: bytes) -> Record | None:
        """The stored record with this ID, or None if it is absent or its frame is damaged."""
        try:
            return _codec.decode(self.get_encoded(record_id))  # type: ignore[no-any-return]
        except (NotFound, CorruptionError):
            return None

    def get_encoded_many(self, ids: IdsLike) -> tuple[bytes, np.ndarray, np.ndarray]:
        """(blob, offsets, record numbers) for many IDs; absent: an empty slice and -1."""
        array = id_array(ids)
        with self.lock:
            self._check_open()
            rows = self.state.lookup_many(array)
            blob, offsets = self.gather(rows, lambda i: f"record {bytes(array[i]).hex()}")
        return blob, offsets, rows

    def gather(self, rows: np.ndarray, what: Callable[[int], str] | None = None
               ) -> tuple[bytes, np.ndarray]:
        """The stored bytes of record numbers `rows` (absent: -1, empty slice), CRC-checked.

        Raises CorruptionError naming file and offset for the first damaged
        frame; `what(i)` names the record asked for at position i.
        """
        with self.lock:
            self._check_open()
            arrays = self.state.columns.arrays
            blob, offsets, bad = _segment.gather(
                [s.buffer for s in self.log.segments], arrays["location"], arrays["length"], rows)
        if bad:
            index, segment, offset = bad[0]
            name = what(index) if what is not None else "record"
            raise unreadable(self.log.segments[segment], offset, name)
        return blob, offsets

    def record_at(self, row: int) -> Record:
        """Decode the record with this record number (DatabaseClosed after close)."""
        return self.point.record_at(row)

    def records_at(self, rows: np.ndarray) -> list[Record]:
        """Decode the records with these record numbers (checksums checked)."""
        if not len(rows):
            return []
        if len(rows) == 1:      # one record (a query's winner): one compiled call
            return [self.point.record_at(int(rows[0]))]
        blob, offsets = self.gather(rows)
        return list(_codec.decode_many(blob, offsets))

    def get_many(self, ids: IdsLike) -> list[Record | None]:
        """Records for many IDs; None where absent."""
        blob, offsets, rows = self.get_encoded_many(ids)
        present = rows >= 0
        if not present.any():
            return [None] * len(rows)
        starts = offsets[:-1][present]
        decoded: list[Record] = _codec.decode_many(blob, np.append(starts, offsets[1:][present][-1]))
        if present.all():
            return list(decoded)
        out: list[Record | None] = [None] * len(rows)
        for slot, record in zip(np.nonzero(present)[0], decoded):
            out[slot] = record
        return out

    def encoded_lengths(self, ids: IdsLike) -> np.ndarray:
        """Bytes of the stored record for each ID (int64; -1 where absent), reading no record."""
        array = id_array(ids)
        with self.lock:
            self._check_open()
            rows = np.asarray(self.state.lookup_many(array), dtype=np.int64)
            lengths = self.state.columns.arrays["length"][np.maximum(rows, 0)].astype(np.int64)
        lengths[rows < 0] = -1
        return lengths

    def subject_keys(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(kind, subject key) of the stored record of each ID; kind 0 and key 0 where absent."""
        array = id_array(ids)
        with self.lock:
            self._check_open()
            rows = np.asarray(self.state.lookup_many(array), dtype=np.int64)
            found = rows >= 0
            arrays = self.state.columns.arrays
            kinds = np.where(found, arrays["kind"][np.maximum(rows, 0)], 0).astype(np.uint8)
            keys = np.where(found, arrays["subject"][np.maximum(rows, 0)], 0).astype(np.uint64)
        return kinds, keys

    def contains(self, record_id: bytes) -> bool:
        return self.point.contains(record_id)

    def scan(self, subject: str | None, predicate: str | None, kind: str | None) -> Iterator[Record]:
        """Stored records in write order, by subject and/or predicate and/or kind name."""
        codes = {name: code for code, name in KIND_NAMES.items()}
        if kind is not None and kind not in codes:
            raise ValueError(f"kind: {kind!r}, expected one of {', '.join(codes)}")
        rows: np.ndarray
        with self.lock:
            self._check_open()
            postings = self.state.postings
            if subject is not None and predicate is not None:
                rows = postings["pair"].get(_codec.pair_key(subject, predicate))
            elif subject is not None:
                rows = postings["subject"].get(_codec.subject_key(subject))
            elif predicate is not None:
                rows = postings["predicate"].get(_codec.predicate_key(predicate))
            else:
                rows = np.arange(self.state.count, dtype=np.int64)
            if kind is not None:
                rows = rows[self.state.columns.arrays["kind"][rows] == codes[kind]]
        for start in range(0, len(rows), SCAN_CHUNK):
            chunk = np.asarray(rows[start:start + SCAN_CHUNK], dtype=np.int64)
            for record in self.records_at(chunk):
                # Posting keys are 64-bit hashes: confirm the match on the record itself.
                if subject is not None and getattr(record, "subject", None) != subject:
                    continue
                if predicate is not None and getattr(record, "predicate", None) != predicate:
                    continue
                yield record


def unreadable(segment: Segment, offset: int, name: str) -> CorruptionError:
    """The error for a record whose frame fails its checksum (or whose file is missing)."""
    failed = "is in a missing segment file" if segment.missing else "fails its checksum"
    return CorruptionError(
        f"{segment.path} at offset {offset}: {name} {failed}; it is not served (restore it "
        "from a replica or backup)", path=segment.path, offset=offset)


def id_bytes(record_id: object) -> bytes:
    """One ID as 32 bytes (from bytes, bytearray or memoryview); InvalidRecord names a malformed one."""
    if isinstance(record_id, (bytearray, memoryview)):
        record_id = bytes(record_id)
    if not isinstance(record_id, bytes) or len(record_id) != 32:
        raise InvalidRecord(f"record_id: expected 32 bytes, got {_describe(record_id)}")
    return record_id


def id_array(ids: IdsLike) -> np.ndarray:
    """IDs as a contiguous (n, 32) uint8 array; InvalidRecord names a malformed one."""
    if isinstance(ids, np.ndarray):
        if ids.dtype != np.uint8 or ids.ndim != 2 or ids.shape[1] != 32:
            raise InvalidRecord(f"ids: expected an (n, 32) uint8 array, got {ids.dtype} {ids.shape}")
        return np.ascontiguousarray(ids)
    rows = []
    for index, value in enumerate(ids):
        if isinstance(value, (bytearray, memoryview)):
            value = bytes(value)
        if not isinstance(value, bytes) or len(value) != 32:
            raise InvalidRecord(f"ids[{index}]: expected 32 bytes, got {_describe(value)}")
        rows.append(value)
    if not rows:
        return np.zeros((0, 32), dtype=np.uint8)
    return np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(-1, 32)


def _describe(value: object) -> str:
    return f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__
