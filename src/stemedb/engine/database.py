"""The storage engine's façade: open a store, write, read, scrub, snapshot, close.

Owns: one data directory (LOCK, MANIFEST, segments/, index/) for as long as
it is open: taking the lock file, opening or creating the MANIFEST, and
wiring the modules that each own one concern — recovery (engine/recovery.py),
verification (verify.py), the write path (writes.py, with the group commit
of commit.py), reads (reads.py), the scrub (scrub.py), snapshots
(snapshots.py), the indexes (indexes.py) and the read view offered to the
layers above (view.py). Must never: know of queries or lenses (they take a
Database and read through `db.view`), acknowledge a write before it is
durable (in "sync" mode), serve bytes whose checksum or ID does not match,
change anything when a write is refused, or let one writer's bad input fail
the batch it would have shared with others.

Resource handling: a Database owns its lock file, segment descriptors and
mappings and its verification threads; `close()` (or the context manager)
writes a snapshot and releases them. Use one Database per directory per
process; the LOCK file enforces it across processes.
Error handling: see stemedb.errors — InvalidRecord / SignatureError refuse a
write and change nothing; StorageFull refuses it and keeps reads working;
DurabilityError poisons the store until it is reopened; CorruptionError names
the file and offset of a damaged record (or the damaged MANIFEST). Damage
found at open never stops it (except a damaged segment header or MANIFEST):
it is reported in `recovery`, `stats()` and `verify()`.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, overload

import numpy as np

from stemedb import _codec
from stemedb._codec import Record
from stemedb._reconcile import RangeTree
from stemedb.engine import verify, walk
from stemedb.engine.commit import Metrics
from stemedb.engine.files import FileLayer
from stemedb.engine.indexes import State
from stemedb.engine.manifest import (
    MAX_PARTITIONS,
    Manifest,
    new_manifest,
    read_manifest,
    write_manifest,
)
from stemedb.engine.reads import KIND_NAMES, IdsLike, Reads
from stemedb.engine.recovery import Recovery, RecoveryReport
from stemedb.engine.scrub import VerifyReport, scrub
from stemedb.engine.segments import DEFAULT_SEGMENT_SIZE, MIN_SEGMENT_SIZE, SegmentLog
from stemedb.engine.sidefiles import LineFile
from stemedb.engine.snapshots import Checkpointer
from stemedb.engine.view import ReadView, WriteNotifier
from stemedb.engine.writes import WritePath
from stemedb.errors import (
    ClientClosed,
    ConfigError,
    DatabaseClosed,
    InvalidRecord,
    SignatureError,
    StemeError,
)
from stemedb.records import Envelope, Epoch, RecordKind, Signer, Vote

DURABILITY_MODES = ("sync", "batch", "none")
Opened = TypeVar("Opened", bound="Database")   # `with` gives back the same class (a subclass too)


class Database:
    """An open StemeDB store. Create with `stemedb.open(path)`."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: str = "sync",
        segment_size: int | None = None,
        batch_interval_ms: float = 10.0,
        snapshot_every: int = 1_000_000,
        files: FileLayer | None = None,
        verify_threads: int | None = None,
        partitions: int | None = None,
    ) -> None:
        if durability not in DURABILITY_MODES:
            raise ValueError(f"durability: {durability!r}, expected one of {', '.join(DURABILITY_MODES)}")
        self.path = os.fspath(path)
        self.durability = durability
        self.files = files or FileLayer()
        self.batch_interval = batch_interval_ms / 1000.0
        self.snapshot_every = snapshot_every
        self.metrics = Metrics()
        self.recovery = RecoveryReport()
        self._closed = False
        self._count_at_close = 0
        self._state_lock = threading.RLock()
        self.files.makedirs(self.path)
        self._lock_fd = self._take_lock()
        try:
            manifest = self._open_manifest(_default_segment_size() if segment_size is None
                                           else segment_size)
            self.log = SegmentLog(os.path.join(self.path, "segments"), self.files,
                                  manifest.segment_size, manifest)
            self._ensure_directories()
            self._recovery = Recovery(self.path, self.files, self.log, self.recovery,
                                      partitions=manifest.partitions)
            self._state = self._recovery.run()
        except BaseException:
            if hasattr(self, "log"):
                self.log.close()
            self._release_lock()
            raise
        try:
            self._keep_partitions(manifest.partitions if partitions is None else partitions)
        except BaseException:
            self.log.close()
            self._release_lock()
            raise
        self._verifier = verify.Verifier(verify_threads)
        self._reads = Reads(self.log, self._state, self._state_lock, self.path)
        # Point reads go straight to the compiled reader (stemedb._point): one call from the
        # caller to the bytes. The methods below say what they do; these instance attributes
        # only skip the Python frames between (after close they raise DatabaseClosed too).
        point = self._reads.point
        self.get_encoded = point.get_encoded  # type: ignore[method-assign]
        self.get = point.get  # type: ignore[method-assign]
        self.contains = point.contains  # type: ignore[method-assign]
        notifier = WriteNotifier()
        self.view = ReadView(self._state, self._state_lock, self._reads, notifier, self._check_open)
        self._checkpointer = Checkpointer(
            os.path.join(self.path, "index"), self.files, self._state, self._state_lock, self.log,
            sync_log=durability != "sync", every=snapshot_every,
            held_back=self._recovery.held_back_entries, report_problem=self.recovery.problems.append)
        self._writes = WritePath(self.log, self._state, self._state_lock, self.files,
                                 durability=durability, metrics=self.metrics, notifier=notifier,
                                 checkpointer=self._checkpointer,
                                 before_write=self._recovery.finish_set_aside,
                                 subjects=self._reads.subject_keys)
        self._commit = self._writes.commit
        if durability == "batch":
            self._writes.start_flusher(self.batch_interval)

    # ------------------------------------------------------------------ setup

    def _take_lock(self) -> int:
        fd = os.open(os.path.join(self.path, "LOCK"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StemeError(f"{self.path} is open in another process (LOCK is held)") from None
        return fd

    def _release_lock(self) -> None:
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        finally:
            os.close(self._lock_fd)

    def _ensure_directories(self) -> None:
        """Create segments/ and make its name durable (index/ is made by its first snapshot).

        fsyncing a file or a directory does not make its own entry in the parent
        durable; without this a power loss could drop a new store's whole log.
        """
        path = os.path.join(self.path, "segments")
        if not self.files.exists(path):
            self.files.makedirs(path)
            self.files.fsync_dir(self.path)

    def _open_manifest(self, segment_size: int) -> Manifest:
        """The store's MANIFEST; a new store's is written first (it names the store)."""
        manifest = read_manifest(self.files, self.path, min_segment_size=MIN_SEGMENT_SIZE)
        if manifest is not None:
            return manifest
        if segment_size < MIN_SEGMENT_SIZE or segment_size % 4096:
            raise ValueError(
                f"segment_size: {segment_size} must be a multiple of 4096 and at least {MIN_SEGMENT_SIZE}")
        manifest = new_manifest(self.path, segment_size)
        parent = os.path.dirname(os.path.abspath(self.path))
        self.files.fsync_dir(parent)  # the data directory's own entry
        write_manifest(self.files, manifest)
        return manifest

    def _keep_partitions(self, partitions: int) -> None:
        """Keep range trees per partition for `partitions` (0: none), recorded in the MANIFEST."""
        if isinstance(partitions, bool) or not isinstance(partitions, int) or \
                not 0 <= partitions <= MAX_PARTITIONS:
            raise ConfigError(f"partitions: {partitions!r}, expected a whole number 1..{MAX_PARTITIONS} "
                              "(the cluster file's partition count)")
        manifest = self.log.manifest
        if not partitions:
            return
        if manifest.partitions and manifest.partitions != partitions:
            raise ConfigError(
                f"partitions: {partitions} asked for, but {self.path} was opened for a cluster of "
                f"{manifest.partitions} partitions (its MANIFEST records it); open it with "
                f"partitions={manifest.partitions}, or use a new data directory for a cluster of "
                f"{partitions}")
        with self._state_lock:
            if self._state.partitions == partitions:
                return
            if not manifest.partitions:
                manifest.partitions = partitions
                try:
                    write_manifest(self.files, manifest)
                except BaseException:
                    manifest.partitions = 0
                    raise
            self._state.keep_partitions(partitions)

    @property
    def state(self) -> State:
        """The engine's indexes (for the engine's own tools and tests; other layers use `view`)."""
        return self._state

    # ------------------------------------------------------------ replication

    @property
    def partitions(self) -> int:
        """The partition count this store keeps range trees for (0: the whole store only)."""
        return self._state.partitions

    def keep_partitions(self, partitions: int) -> None:
        """Start keeping a range tree per partition (a store opened without `partitions=`).

        The same as opening with `partitions=P`: recorded in the MANIFEST, and
        the trees split off the whole store's in one O(n) pass. A store
        already kept for another count raises ConfigError naming both.
        """
        self._check_open()
        self._keep_partitions(partitions)

    def reconcile_lock(self) -> threading.RLock:
        """The lock to hold while using `reconcile_items` (writers index a batch under it)."""
        return self._state_lock

    def reconcile_items(self, scope: int) -> tuple[RangeTree, np.ndarray, np.ndarray]:
        """(tree, timestamps, ids) of a scope, for `_reconcile` calls; hold `reconcile_lock()`.

        Scope 0 is the whole store; with partitions kept, 1 the global
        partition and 2 + p partition p (docs/replication.md). The tree is
        the engine's own (read-only: its `add` refuses), and the two arrays
        are the engine's columns the tree's record numbers index: all three
        are valid only until the lock is released (a write may move the
        columns to larger arrays and change the tree).
        """
        self._check_open()
        with self._state_lock:
            return self._state.reconcile_items(scope)

    def reconcile_scopes(self) -> list[int]:
        """Scope 0 and every other scope whose tree holds a record, ascending."""
        self._check_open()
        with self._state_lock:
            return list(self._state.trees.scopes())

    def record_lengths(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """Encoded bytes of each record number (int64), without reading any record."""
        self._check_open()
        rows = self._rows(rows)
        with self._state_lock:
            return np.asarray(self._state.columns.arrays["length"][rows], dtype=np.int64)

    def record_kinds(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """The RecordKind number (uint8) of each record number, without reading any record."""
        self._check_open()
        rows = self._rows(rows)
        with self._state_lock:
            return np.asarray(self._state.columns.arrays["kind"][rows], dtype=np.uint8)

    def ids_of_rows(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """The (n, 32) uint8 IDs of these record numbers (a copy)."""
        self._check_open()
        rows = self._rows(rows)
        with self._state_lock:
            return np.ascontiguousarray(self._state.columns.arrays["id"][rows])

    def _rows(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        count = self._state.count
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= count):
            bad = int(rows[(rows < 0) | (rows >= count)][0])
            raise ValueError(f"rows: record number {bad} is not stored (0..{count - 1})")
        return rows

    # ------------------------------------------------------------------ write

    def put(self, record: Record) -> bytes:
        """Store one signed record (or one proven by an already stored envelope); returns its ID."""
        return self.put_many([record])[0]

    def put_many(self, records: Iterable[Record], *,
                 envelope: Envelope | Sequence[Envelope] | None = None) -> list[bytes]:
        """Store many records in one durable batch; returns their IDs in order.

        Each record must carry valid signatures of all its signers, or be a
        member of `envelope` (one Envelope or a list of them, stored in the
        same batch after one signature check each) or of an envelope already
        stored. Records already stored are skipped (their IDs are still
        returned). Nothing is written if any record is refused.
        """
        self._check_open()
        envelopes = _envelope_list(envelope)
        # The envelopes go first in the batch: one encode of both, no second copy of the blob.
        blob, offsets, ids = _codec.encode_many(records, before=envelopes)
        # Encoded just now from record objects, which are canonical by construction: only the
        # columns are parsed, not the rules of put_encoded.
        self._commit_batch(verify.trusted(blob, offsets, ids, first=len(envelopes)), None)
        return _codec.id_list(ids[len(envelopes):])

    @overload
    def put_encoded(self, blob: bytes | bytearray | memoryview, offsets: np.ndarray, *,
                    kind: RecordKind | None = None, ids: np.ndarray | None = None,
                    hold_back: Literal[False] = False) -> np.ndarray: ...

    @overload
    def put_encoded(self, blob: bytes | bytearray | memoryview, offsets: np.ndarray, *,
                    kind: RecordKind | None = None, ids: np.ndarray | None = None,
                    hold_back: Literal[True]) -> PutResult: ...

    def put_encoded(self, blob: bytes | bytearray | memoryview, offsets: np.ndarray, *,
                    kind: RecordKind | None = None, ids: np.ndarray | None = None,
                    hold_back: bool = False) -> np.ndarray | PutResult:
        """Store n already-encoded records, blob[offsets[i]:offsets[i+1]], in one durable batch.

        Returns their (n, 32) uint8 IDs in input order, recomputed from the
        bytes (records already stored are skipped; their IDs are returned).
        Every record is checked before any is written: canonical encoding
        (InvalidRecord "record i: field: ..."), then its proof — its own
        signatures, or membership in an envelope anywhere in the batch or
        already stored (SignatureError "records[i]: ..."). `kind` (e.g.
        VOTE) refuses any non-envelope record of another kind. `ids`, the
        (n, 32) IDs the records came with (from a peer), refuses a record
        whose content has another ID (InvalidRecord naming it). Nothing is
        written if any record is refused. No record object is built (but
        the batch's envelopes, for their member lists).

        With `hold_back=True` (records from a peer, whose envelope may come
        later) a member whose envelope is neither in the batch nor stored
        does not refuse the batch: it is left out, not stored, and named in
        the result's `held`; everything else is stored as above, and a
        forged record still refuses the whole batch. Returns a PutResult.
        """
        self._check_open()
        batch = verify.parse(blob, offsets)
        if ids is not None:
            verify.check_claimed_ids(batch, ids)
        held = self._commit_batch(batch, kind, hold_back=hold_back)
        if not hold_back:
            return batch.ids
        stored = np.ones(len(batch), dtype=bool)
        stored[held] = False
        return PutResult(batch.ids, stored, held)

    def put_validated(self, blob: bytes, offsets: np.ndarray, ids: np.ndarray,
                      columns: dict[str, np.ndarray]) -> np.ndarray:
        """put_encoded of records this process already ran through `_codec.validate_many`, with
        the (n, 32) IDs and the columns it returned for exactly these bytes (`stemedb import`
        checks every line before it stores any, and does not parse them twice).

        The canonical checks are not repeated; everything else is as put_encoded:
        the proofs (signatures, envelope membership) are checked here, the batch
        is refused as a whole, and the IDs are returned. `blob` must be bytes
        (immutable: what was validated is what is stored).
        """
        self._check_open()
        if not isinstance(blob, bytes):
            raise TypeError(f"put_validated: blob must be bytes, got {type(blob).__name__}")
        offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        if ids.shape != (len(offsets) - 1, 32) or any(len(v) != len(ids) for v in columns.values()):
            raise ValueError(f"put_validated: {len(offsets) - 1} records, IDs of shape {ids.shape} "
                             f"and columns of {sorted({len(v) for v in columns.values()})} rows")
        self._commit_batch(verify.EncodedBatch(blob, offsets, np.ascontiguousarray(ids), columns),
                           None)
        return ids

    def _commit_batch(self, batch: verify.EncodedBatch, kind: RecordKind | None, *,
                      hold_back: bool = False) -> np.ndarray:
        """Check in the caller's thread (size, proofs), then one group commit; returns the held."""
        self._writes.check_fits(np.diff(batch.offsets), batch.ids)
        held = self._verifier.prove(batch, self._reads.stored, kind=kind,
                                    subjects=self._reads.subject_keys, hold_back=hold_back)
        self._writes.submit(verify.without(batch, held) if len(held) else batch)
        return held

    def vote(self, vote: Vote) -> bytes:
        """Store a signed Vote (the same as put, refusing any other kind); returns its ID."""
        if not isinstance(vote, Vote):
            raise InvalidRecord(f"vote: expected a stemedb.Vote, got {type(vote).__name__}")
        return self.put(vote)

    def epoch(self, epoch: Epoch) -> bytes:
        """Store a signed Epoch (the same as put, refusing any other kind); returns its ID."""
        if not isinstance(epoch, Epoch):
            raise InvalidRecord(f"epoch: expected a stemedb.Epoch, got {type(epoch).__name__}")
        return self.put(epoch)

    def writer(self, signer: Signer) -> Writer:
        """A thread-safe writer that signs each group-commit batch with one envelope."""
        if not isinstance(signer, Signer):
            raise TypeError(f"writer() expects a stemedb.Signer, got {type(signer).__name__}")
        return Writer(self, signer)

    def _put_unsigned(self, records: list[Record], signer: Signer) -> list[bytes]:
        self._check_open()
        if not records:
            return []
        return _codec.id_list(self._writes.submit_unsigned(records, signer))

    # ------------------------------------------------------------------- read

    def get(self, record_id: bytes) -> Record:
        """The record with this ID; raises NotFound, or CorruptionError if its bytes are damaged."""
        return _codec.decode(self.get_encoded(record_id))  # type: ignore[no-any-return]

    def get_encoded(self, record_id: bytes) -> bytes:
        """The stored bytes (content + proof) of the record with this ID, checksum-checked."""
        self._check_open()
        return self._reads.get_encoded(record_id)

    def get_many(self, ids: IdsLike) -> list[Record | None]:
        """Records for many IDs (list of bytes or an (n, 32) uint8 array); None where absent."""
        self._check_open()
        return self._reads.get_many(ids)

    def get_encoded_many(self, ids: IdsLike) -> tuple[bytes, np.ndarray, np.ndarray]:
        """(blob, offsets, record numbers) of the encoded records for many IDs.

        The fast batch read: no decoding; an absent ID has an empty slice and
        record number -1. Raises CorruptionError if a frame fails its checksum.
        """
        self._check_open()
        return self._reads.get_encoded_many(ids)

    def encoded_lengths(self, ids: IdsLike) -> np.ndarray:
        """Bytes of the stored record for each ID (int64, -1 where absent), without reading any."""
        self._check_open()
        return self._reads.encoded_lengths(ids)

    def records_at(self, rows: np.ndarray | Sequence[int]) -> list[Record]:
        """Decode the records with these record numbers (checksums checked)."""
        self._check_open()
        return self._reads.records_at(np.asarray(rows, dtype=np.int64))

    def contains(self, record_id: bytes) -> bool:
        self._check_open()
        return self._reads.contains(record_id)

    def __contains__(self, record_id: bytes) -> bool:
        return self.contains(record_id)

    def __len__(self) -> int:
        return self._count_at_close if self._closed else self._state.count

    def scan(self, subject: str | None = None, predicate: str | None = None,
             *, kind: str | None = None) -> Iterator[Record]:
        """Iterate stored records in write order, optionally by subject and/or predicate."""
        self._check_open()
        return self._reads.scan(subject, predicate, kind)

    def side_file(self, name: str) -> LineFile:
        """An append-only file of lines in the data directory (e.g. the query audit log)."""
        self._check_open()
        return LineFile(self.files, self.path, name)

    def stats(self) -> dict[str, Any]:
        """Counts, sizes and write metrics."""
        self._check_open()
        with self._state_lock:
            state = self._state
            counts = state.kind_counts
            memory = state.memory_bytes()
            postings = {name: len(p) for name, p in state.postings.items()}
            count = state.count
        report = self.recovery
        return {
            "path": self.path,
            "durability": self.durability,
            "records": count,
            "by_kind": {name: int(counts[code]) for code, name in KIND_NAMES.items()},
            "segments": len(self.log.real_segments()),
            "segment_size": self.log.segment_size,
            "disk_bytes": self.log.disk_bytes(),
            "used_bytes": self.log.used_bytes(),
            "index_bytes": memory,
            "posting_keys": postings,
            "writes": self.metrics.as_dict(),
            "failed": self._commit.failure is not None,
            "recovery": {
                "seconds": report.seconds,
                "records_replayed": report.records_replayed,
                "snapshot_records": report.snapshot_records,
                "torn_bytes_dropped": report.torn_bytes_dropped,
                "problems": list(report.problems),
                "set_aside": [d.as_dict() for d in report.damage
                              if d.kind in (walk.SET_ASIDE, walk.NOT_SET_ASIDE)],
                "held_back": sum(d.records or 0 for d in report.damage if d.kind == walk.HELD_BACK),
                "missing_segments": [d.path for d in report.damage if d.kind == walk.MISSING],
                "damage": [d.as_dict() for d in report.damage],
            },
        }

    # --------------------------------------------------------------- maintain

    def checkpoint(self) -> None:
        """Write an index snapshot so the next open replays only what follows it.

        The state is captured under the state lock (column rows below the count
        never change, so they are shared, not copied; index tables are copied);
        the files are written after the lock is released, so writers wait only
        for the capture.
        """
        self._check_open()
        self._checkpointer.checkpoint()

    def verify(self) -> VerifyReport:
        """Scrub every segment: frame checksums, record IDs, footers and their digests.

        Not OK while anything is wrong: damaged or zeroed bytes, bytes set aside
        (until their quarantine file is removed), missing segment files, damaged
        footers, held-back members, indexed records whose frame is not intact.
        """
        self._check_open()
        return scrub(self.log, self._state, self._state_lock, self._recovery)

    def close(self) -> None:
        """Flush, snapshot the indexes and release every file. Idempotent."""
        if self._closed:
            return
        try:
            self._writes.stop_flusher()
            self._checkpointer.join()
            if self._commit.failure is None:
                try:
                    self._checkpointer.at_close()
                except OSError:
                    pass  # the segments are the truth; the next open replays them
        finally:
            with self._state_lock:   # a reader that found the store open waits, then sees it closed
                self._count_at_close = self._state.count
                self._closed = True
                self._reads.point.close()
                self.view.release()
                self._state.release()
            self._verifier.close()
            self.log.close()
            self._release_lock()

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise DatabaseClosed(f"{self.path}: the database is closed; open it again to use it")

    def __enter__(self: Opened) -> Opened:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<stemedb.Database {self.path!r} records={len(self)}>"


@dataclass(frozen=True)
class PutResult:
    """What `put_encoded(..., hold_back=True)` did with each record of its batch.

    `ids`: (n, 32) uint8, every record's ID recomputed from its bytes, in
    input order. `stored`: bool (n,), true where the record is in the store
    now (written by this call, or already there). `held`: int64 indexes,
    ascending, of the members held back — their envelope is neither in the
    batch nor stored — which were not judged and not stored (`stored` is
    false there): offer them again once their envelope has arrived.
    """

    ids: np.ndarray
    stored: np.ndarray
    held: np.ndarray


class Writer:
    """Group-signing writer: `put(record)` takes an unsigned record and returns once durable.

    Records from all threads that arrive while a commit is in flight form the
    next batch, which is signed with one envelope by this writer's signer,
    appended and fsynced once. Thread-safe. The shape every writer has (the
    clients' too): `put`, `put_many`, `flush`, `close`, and ``with``.
    """

    def __init__(self, db: Database, signer: Signer) -> None:
        self.db = db
        self.signer = signer
        self._closed = False

    def put(self, record: Record) -> bytes:
        """Sign `record` with the batch it joins and store it; its ID once durable."""
        return self.put_many([record])[0]

    def put_many(self, records: Iterable[Record]) -> list[bytes]:
        """Store many unsigned records (signed in envelopes); their IDs once all are durable."""
        if self._closed:
            raise ClientClosed("the writer is closed")
        return self.db._put_unsigned(list(records), self.signer)

    def flush(self) -> None:
        """Nothing to wait for: every put has returned only once durable."""

    def close(self) -> None:
        """Refuse further puts (ClientClosed); what was put is already durable."""
        self._closed = True

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _default_segment_size() -> int:
    """Segment size for a new store: STEMEDB_SEGMENT_SIZE (bytes) if set, else 64 MiB."""
    text = os.environ.get("STEMEDB_SEGMENT_SIZE")
    if not text:
        return DEFAULT_SEGMENT_SIZE
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"STEMEDB_SEGMENT_SIZE: {text!r} is not a whole number of bytes") from None


def open(path: str | os.PathLike[str], **options: Any) -> Database:  # noqa: A001
    """Open (creating if needed) the store at `path`, without the query API (see stemedb.open)."""
    return Database(path, **options)


def _envelope_list(envelope: Envelope | Sequence[Envelope] | None) -> list[Envelope]:
    if envelope is None:
        return []
    if isinstance(envelope, Envelope):
        return [envelope]
    if isinstance(envelope, (list, tuple)):
        for item in envelope:
            if not isinstance(item, Envelope):
                raise SignatureError(
                    f"envelope: expected a stemedb.Envelope, got {type(item).__name__}")
        return list(envelope)
    raise SignatureError(
        f"envelope: expected a stemedb.Envelope or a list of them, got {type(envelope).__name__}")


