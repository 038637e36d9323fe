"""The embedded database: open, put, get, scan, stats, verify, close.

Owns: one data directory (LOCK, MANIFEST, segments/, index/), the write path
(verify → encode → group commit → frame → append → fdatasync → index), the
read path (index → location → checksum → decode from the mapping), recovery
on open, snapshots, and scrubbing. Must never: acknowledge a write before it
is durable (in "sync" mode), serve bytes whose checksum or ID does not match,
or change anything when a write is refused.

Resource handling: a Database owns its lock file, segment descriptors and
mappings; `close()` (or the context manager) writes a snapshot and releases
them. Use one Database per directory per process; the LOCK file enforces it
across processes.
Error handling: see stemedb.errors — InvalidRecord / SignatureError refuse a
write and change nothing; StorageFull refuses it and keeps reads working;
DurabilityError poisons the store until it is reopened; CorruptionError names
the file and offset of a damaged record.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stemedb import _codec, _segment
from stemedb.engine.commit import GroupCommit, Metrics, Pending
from stemedb.engine.files import FileLayer
from stemedb.engine.segments import DEFAULT_SEGMENT_SIZE, Segment, SegmentLog
from stemedb.engine.state import State, load_snapshot, write_snapshot
from stemedb.errors import (
    CorruptionError,
    DurabilityError,
    InvalidRecord,
    NotFound,
    SignatureError,
    StemeError,
    StorageFull,
)
from stemedb.records import (
    Envelope,
    Epoch,
    Signer,
    Vote,
    check_envelope_members,
    check_stored_member,
)

DURABILITY_MODES = ("sync", "batch", "none")
KIND_NAMES = {1: "assertion", 2: "vote", 3: "epoch", 4: "envelope"}
STORE_VERSION = 1


@dataclass
class RecoveryReport:
    """What opening the store found and did."""

    segments_scanned: int = 0
    records_replayed: int = 0
    torn_bytes_dropped: int = 0
    snapshot_records: int = 0
    snapshot_problem: str | None = None
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class VerifyReport:
    """Result of `Database.verify()`: a scrub of every checksum and ID."""

    ok: bool
    records_checked: int
    problems: list[str]

    def __bool__(self) -> bool:
        return self.ok


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
    ) -> None:
        if durability not in DURABILITY_MODES:
            raise ValueError(f"durability: {durability!r}, expected one of {', '.join(DURABILITY_MODES)}")
        self.path = os.fspath(path)
        self.durability = durability
        if segment_size is None:
            segment_size = _default_segment_size()
        self.files = files or FileLayer()
        self.batch_interval = batch_interval_ms / 1000.0
        self.snapshot_every = snapshot_every
        self.metrics = Metrics()
        self.recovery = RecoveryReport()
        self._closed = False
        self._state_lock = threading.RLock()
        self._snapshot_lock = threading.Lock()
        self._snapshot_thread: threading.Thread | None = None
        self._batch_seq = 0
        self._records_since_snapshot = 0
        # Called as listener(record_numbers, columns) under the state lock after each
        # durable batch is indexed (materialised views use it to invalidate pairs).
        self.write_listeners: list[Any] = []
        self._verify_pool = ThreadPoolExecutor(max_workers=verify_threads or os.cpu_count() or 2,
                                               thread_name_prefix="stemedb-verify")
        self.files.makedirs(self.path)
        self._lock_fd = self._take_lock()
        try:
            segment_size = self._read_or_write_manifest(segment_size)
            self.log = SegmentLog(os.path.join(self.path, "segments"), self.files, segment_size)
            self._ensure_directories()
            self._recover()
        except BaseException:
            self._release_lock()
            self._verify_pool.shutdown()
            raise
        self._commit = GroupCommit(self._write_group)
        self._flusher: threading.Thread | None = None
        self._flush_stop = threading.Event()
        if durability == "batch":
            self._flusher = threading.Thread(target=self._flush_loop, name="stemedb-flush", daemon=True)
            self._flusher.start()
        # Load (or compile) the numba query kernels once per process, off the opening
        # thread: a query that arrives first waits for it; opening does not.
        threading.Thread(target=_warm_query_kernels, name="stemedb-jit-warm-up", daemon=True).start()

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

    def _read_or_write_manifest(self, segment_size: int) -> int:
        path = os.path.join(self.path, "MANIFEST")
        if self.files.exists(path):
            try:
                manifest = json.loads(self.files.read_file(path))
            except ValueError as exc:
                raise CorruptionError(f"{path}: unreadable ({exc})", path=path, offset=0) from None
            if manifest.get("version") != STORE_VERSION:
                raise StemeError(f"{path}: unknown store version {manifest.get('version')}")
            return int(manifest["segment_size"])
        manifest = {"version": STORE_VERSION, "segment_size": segment_size,
                    "created_us": time.time_ns() // 1000}
        parent = os.path.dirname(os.path.abspath(self.path))
        self.files.fsync_dir(parent)  # the data directory's own entry
        temp = path + ".tmp"
        self.files.write_file(temp, json.dumps(manifest).encode())
        self.files.rename(temp, path)
        self.files.fsync_dir(self.path)
        return segment_size

    # --------------------------------------------------------------- recovery

    def _recover(self) -> None:
        started = time.perf_counter()
        report = self.recovery
        self.log.open_existing()
        state = None
        start_segment, start_offset = 0, _segment.HEADER_SIZE
        try:
            loaded = load_snapshot(self.files, os.path.join(self.path, "index"))
        except ValueError as exc:
            loaded = None
            report.snapshot_problem = str(exc)
            report.problems.append(f"snapshot ignored: {exc}")
        if loaded is not None:
            snapshot_state, manifest = loaded
            problem = self._snapshot_position_problem(manifest)
            if problem is None:
                state = snapshot_state
                start_segment, start_offset = (int(x) for x in manifest["position"])
                self._batch_seq = int(manifest["batch_seq"])
                report.snapshot_records = state.count
            else:
                report.snapshot_problem = problem
                report.problems.append(f"snapshot ignored: {problem}")
        self.state = state or State()
        if not self.log.segments:
            self.log.create_segment()
        else:
            active = self.log.active_number
            for segment in self.log.segments:
                if segment.number > active:
                    # An empty spare: zero anything a crash left in it.
                    report.torn_bytes_dropped += self.log.cut(segment, _segment.HEADER_SIZE)
                    continue
                if segment.number < start_segment:
                    segment.tail = segment.size  # sealed and fully covered by the snapshot
                    continue
                offset = start_offset if segment.number == start_segment else _segment.HEADER_SIZE
                self._replay_segment(segment, offset)
        self._indexed_position = (self.log.active.number, self.log.active.tail)
        self._indexed_batch_seq = self._batch_seq
        report.seconds = time.perf_counter() - started

    def _snapshot_position_problem(self, manifest: dict[str, Any]) -> str | None:
        """Why the snapshot's position cannot be trusted with these segments, or None."""
        try:
            number, offset = (int(x) for x in manifest["position"])
            batch_seq = int(manifest["batch_seq"])
        except (KeyError, TypeError, ValueError):
            return "its position or batch sequence is missing or malformed"
        if not self.log.segments:
            return None if number == 0 and offset == _segment.HEADER_SIZE else \
                "it covers segments that are not here"
        if not 0 <= number <= self.log.active_number:
            return f"it covers segment {number}, which is not a written segment here"
        size = self.log.segments[number].size
        if not (_segment.HEADER_SIZE <= offset <= size and offset % _segment.ALIGN == 0):
            return f"its position {offset} is not a frame boundary of segment {number}"
        if batch_seq < 0:
            return f"its batch sequence {batch_seq} is negative"
        return None

    def _replay_segment(self, segment: Segment, offset: int) -> None:
        report = self.recovery
        report.segments_scanned += 1
        while True:
            result = _segment.scan(segment.buffer, offset, segment.size)
            self._index_scanned(segment, result)
            stop = result["stop"]
            if result["reason"] == _segment.CLEAN:
                segment.tail = stop
                if segment.sealed:
                    break
                # The active segment ends at the first zero magic; anything non-zero after it
                # is an unsynced, never-acknowledged write that was torn: cut it.
                report.torn_bytes_dropped += self.log.cut(segment, stop)
                break
            later = _segment.find_frame(segment.buffer, stop + 8, segment.size, _segment.BATCH)
            newer = later >= 0 and self._batch_is_newer(segment, later)
            if newer or segment.sealed:
                # Intact newer batches follow (or the segment is sealed), so this frame was
                # once synced: corruption. Resume at the next intact frame of any type, so
                # the intact records of a damaged batch are still served.
                resume = _segment.find_frame(segment.buffer, stop + 8, segment.size)
                if resume < 0:
                    report.problems.append(
                        f"{segment.path} at offset {stop}: frame fails its checksum; "
                        "no intact frame follows in this segment")
                    segment.tail = stop
                    break
                report.problems.append(
                    f"{segment.path} at offset {stop}: frame fails its checksum; "
                    f"{resume - stop} bytes skipped, records there are not served")
                offset = resume
                continue
            report.torn_bytes_dropped += self.log.cut(segment, stop)
            break

    def _batch_is_newer(self, segment: Segment, position: int) -> bool:
        seq, _, _ = _segment.batch_info(segment.buffer, position)
        return bool(seq > self._batch_seq)

    def _index_scanned(self, segment: Segment, result: dict[str, Any]) -> None:
        types, positions, lengths = result["types"], result["positions"], result["lengths"]
        if len(types):
            batch_positions = positions[types == _segment.BATCH]
            if len(batch_positions):
                self._batch_seq = max(self._batch_seq,
                                      _segment.batch_info(segment.buffer, int(batch_positions[-1]))[0])
        records = types == _segment.RECORD
        if not records.any():
            return
        positions = positions[records]
        lengths = lengths[records]
        payloads = positions + _segment.FRAME_HEADER
        columns = _codec.extract_columns(segment.buffer, payloads, lengths)
        columns["location"] = (np.uint64(segment.number) << np.uint64(32)) | positions.astype(np.uint64)
        columns["length"] = lengths
        ids = _segment.read_ids(segment.buffer, positions)
        links = self._epoch_links_from(segment.buffer, payloads, lengths, columns["kind"])
        fresh = self._fresh_mask(ids)
        keep = np.nonzero(fresh)[0]
        if len(keep) != len(ids):
            columns = {k: v[keep] for k, v in columns.items()}
            ids = ids[keep]
        self.state.add(ids, columns, self._relink(links, keep, len(fresh)))
        self.recovery.records_replayed += len(ids)

    # ------------------------------------------------------------------ write

    def put(self, record: Any) -> bytes:
        """Store one signed record (or one proven by an already stored envelope); returns its ID."""
        return bytes(self.put_many([record])[0])

    def put_many(self, records: Sequence[Any], *,
                 envelope: Envelope | Sequence[Envelope] | None = None) -> list[bytes]:
        """Store many records in one durable batch; returns their IDs in order.

        Each record must carry valid signatures of all its signers, or be a
        member of `envelope` (one Envelope or a list of them, stored in the
        same batch after one signature check each) or of an envelope already
        stored. Records already stored are skipped (their IDs are still
        returned). Nothing is written if any record is refused.
        """
        self._check_open()
        records = list(records)
        envelopes = _envelope_list(envelope)
        blob, offsets, ids = _codec.encode_many(records)
        self._verify(records, blob, offsets, ids, envelopes)
        if envelopes:
            env_blob, env_offsets, env_ids = _codec.encode_many(envelopes)
            blob, offsets, ids = _concat([env_blob, blob], [env_offsets, offsets], [env_ids, ids])
        self._commit.submit(Pending(blob=blob, offsets=offsets, ids=ids))
        return _id_list(ids[len(envelopes):])

    def vote(self, vote: Any) -> bytes:
        """Store a signed Vote (the same as put, refusing any other kind); returns its ID."""
        if not isinstance(vote, Vote):
            raise InvalidRecord(f"vote: expected a stemedb.Vote, got {type(vote).__name__}")
        return self.put(vote)

    def epoch(self, epoch: Any) -> bytes:
        """Store a signed Epoch (the same as put, refusing any other kind); returns its ID."""
        if not isinstance(epoch, Epoch):
            raise InvalidRecord(f"epoch: expected a stemedb.Epoch, got {type(epoch).__name__}")
        return self.put(epoch)

    def writer(self, signer: Signer) -> Writer:
        """A thread-safe writer that signs each group-commit batch with one envelope."""
        if not isinstance(signer, Signer):
            raise TypeError(f"writer() expects a stemedb.Signer, got {type(signer).__name__}")
        return Writer(self, signer)

    def _put_unsigned(self, records: list[Any], signer: Signer) -> list[bytes]:
        self._check_open()
        for index, record in enumerate(records):
            if not hasattr(record, "_with_proof") or isinstance(record, Envelope):
                raise InvalidRecord(f"records[{index}]: expected an Assertion, Vote or Epoch")
            if record.signers not in ((), (signer.public_key,)):
                raise SignatureError(f"records[{index}]: declares other signers than the writer's")
        result = self._commit.submit(Pending(records=records, signer=signer))
        return list(result)

    def _verify(self, records: list[Any], blob: bytes, offsets: np.ndarray, ids: np.ndarray,
                envelopes: list[Envelope]) -> None:
        if envelopes:
            check_envelope_members(envelopes, blob, offsets, ids, verify=self._verify_envelopes)
            return
        individually: list[int] = []
        for index, record in enumerate(records):
            if record.envelope is not None:
                self._verify_stored_envelope(index, record, bytes(ids[index]))
            else:
                individually.append(index)
        if not individually:
            return
        if len(individually) < 64:
            for index in individually:
                _verify_at(records, index)
            return
        chunks = np.array_split(np.array(individually), self._verify_pool._max_workers)
        futures = [self._verify_pool.submit(_verify_chunk, records, chunk) for chunk in chunks if len(chunk)]
        for future in futures:
            future.result()

    def _verify_envelopes(self, envelopes: Sequence[Envelope]) -> None:
        """The envelopes' own signatures, on the verification pool when there are several."""
        if len(envelopes) == 1:
            envelopes[0].verify()
            return
        for future in [self._verify_pool.submit(env.verify) for env in envelopes]:
            future.result()

    def _verify_stored_envelope(self, index: int, record: Any, record_id: bytes) -> None:
        try:
            envelope = self.get(record.envelope)
        except NotFound:
            raise SignatureError(
                f"records[{index}]: its envelope {record.envelope.hex()} is not stored; "
                "write members with put_many(members, envelope=envelope)") from None
        check_stored_member(envelope, record, record_id, f"records[{index}] ({record_id.hex()})")

    def _write_group(self, group: list[Pending]) -> None:
        """The leader's work for one group commit (runs in one writer's thread)."""
        blobs, offsets_list, ids_list = [], [], []
        by_signer: dict[bytes, list[Pending]] = {}
        for pending in group:
            if pending.records is not None:
                by_signer.setdefault(pending.signer.public_key, []).append(pending)
            elif pending.ids is not None and len(pending.ids):
                assert pending.offsets is not None
                blobs.append(pending.blob)
                offsets_list.append(pending.offsets)
                ids_list.append(pending.ids)
        for writers in by_signer.values():
            # One envelope, hence one signature, for every writer of this signer in the batch.
            records = [record for pending in writers for record in pending.records or ()]
            members, envelope = writers[0].signer.sign_batch(records)
            blob, offsets, ids = _codec.encode_many([envelope, *members])
            start = 1
            for pending in writers:
                count = len(pending.records or ())
                pending.result = _id_list(ids[start:start + count])
                start += count
            blobs.append(blob)
            offsets_list.append(offsets)
            ids_list.append(ids)
        if not blobs:
            return
        blob, offsets, ids = _concat(blobs, offsets_list, ids_list)
        fresh = self._fresh_mask(ids)
        if not fresh.all():
            keep = np.nonzero(fresh)[0]
            if not len(keep):
                return
            blob, offsets, ids = _select(blob, offsets, ids, keep)
        self.metrics.batch_writers_max = max(self.metrics.batch_writers_max, len(group))
        self.metrics.writers_committed += len(group)
        self.metrics.batch_records_max = max(self.metrics.batch_records_max, len(ids))
        self._append_durably(blob, offsets, ids)

    def _fresh_mask(self, ids: np.ndarray) -> np.ndarray:
        """True for IDs neither stored nor repeated earlier in the same batch."""
        with self._state_lock:
            return np.asarray(self.state.ids.new_mask(ids, self.state.all_ids()))

    def _append_durably(self, blob: bytes, offsets: np.ndarray, ids: np.ndarray) -> None:
        sizes = np.diff(offsets)
        frame_sizes = (_segment.FRAME_HEADER + sizes + 7) // 8 * 8
        batch_frame = _segment.frame_size(24)
        capacity = self.log.segment_size - _segment.HEADER_SIZE - batch_frame
        too_big = np.nonzero(frame_sizes > capacity)[0]
        if len(too_big):
            first = int(too_big[0])
            raise InvalidRecord(
                f"record {bytes(ids[first]).hex()}: {int(sizes[first])} bytes do not fit a "
                f"{self.log.segment_size}-byte segment; open the store with a larger segment_size")
        # Plan the split over segments first and create every segment it needs, so
        # that StorageFull refuses the whole batch before any of it is written.
        plan: list[tuple[int, int] | None] = []
        room = self.log.room()
        cumulative = np.cumsum(frame_sizes)
        start, n = 0, len(ids)
        while start < n:
            base = int(cumulative[start - 1]) if start else 0
            fits = int(np.searchsorted(cumulative[start:] - base, room - batch_frame, side="right"))
            if fits == 0:
                plan.append(None)
                room = self.log.segment_size - _segment.HEADER_SIZE
                continue
            plan.append((start, start + fits))
            room -= int(cumulative[start + fits - 1]) - base + batch_frame
            start += fits
        try:
            self.log.prepare(plan.count(None))
        except StorageFull:
            raise
        except OSError as exc:
            self._fail(exc)
        for step in plan:
            if step is None:
                self._roll()
                continue
            lo, hi = step
            self._write_frames(blob, offsets[lo:hi + 1] - offsets[lo], ids[lo:hi],
                               int(offsets[lo]), int(offsets[hi]))
        if self._records_since_snapshot >= self.snapshot_every:
            self._checkpoint_in_background()

    def _roll(self) -> None:
        try:
            if self.durability != "none":
                self._sync()
            self.log.roll()
        except StorageFull:
            raise
        except OSError as exc:
            self._fail(exc)

    def _write_frames(self, blob: bytes, offsets: np.ndarray, ids: np.ndarray, lo: int, hi: int) -> None:
        self._batch_seq += 1
        part = memoryview(blob)[lo:hi]
        frames, positions, lengths = _segment.build_batch(part, offsets, ids, self._batch_seq)
        segment = self.log.active
        offset = segment.tail
        data = frames
        if segment.dirty_until > offset + len(frames):
            # An earlier write here failed part-way; zero the rest of its range in the
            # same write so none of its refused frames can be replayed after a crash.
            data = frames + bytes(segment.dirty_until - offset - len(frames))
        try:
            self.log.append(data)
        except OSError as exc:
            segment.tail = offset
            segment.dirty_until = max(segment.dirty_until, offset + len(data))
            self.metrics.write_errors += 1
            if exc.errno == errno.ENOSPC:
                raise StorageFull(f"disk full while writing {segment.path}; free space and retry") from exc
            self._fail(exc)
        segment.tail = offset + len(frames)
        segment.dirty_until = 0
        if self.durability == "sync":
            self._sync()
        columns = _codec.extract_columns(frames, positions, lengths)
        frame_positions = positions - _segment.FRAME_HEADER + offset
        columns["location"] = (np.uint64(segment.number) << np.uint64(32)) | frame_positions.astype(np.uint64)
        columns["length"] = lengths
        links = self._epoch_links_from(frames, positions, lengths, columns["kind"])
        with self._state_lock:
            base = self.state.count  # links carry batch positions; the index wants record numbers
            recnos = self.state.add(ids, columns, [(base + i, superseded) for i, superseded in links])
            self._indexed_position = (segment.number, offset + len(frames))
            self._indexed_batch_seq = self._batch_seq
            for listener in self.write_listeners:
                listener(recnos, columns)
        self.metrics.batches += 1
        self.metrics.records_written += len(ids)
        self.metrics.bytes_written += len(frames)
        self._records_since_snapshot += len(ids)

    def _sync(self) -> None:
        started = time.perf_counter()
        try:
            self.log.sync()
        except OSError as exc:
            self.metrics.write_errors += 1
            self._fail(exc)
        self.metrics.observe_fsync(time.perf_counter() - started)

    def _fail(self, exc: OSError) -> None:
        error = DurabilityError(
            f"{exc.strerror or exc} while writing {self.log.active.path}; the store refuses "
            "writes until it is closed and reopened (recovery re-reads what reached the disk)")
        self._commit.poison(error)
        raise error from exc

    def _flush_loop(self) -> None:
        while not self._flush_stop.wait(self.batch_interval):
            try:
                with self._commit._lock:
                    if self._commit.failure is None and not self._closed:
                        self._sync()
            except StemeError:
                return

    @staticmethod
    def _epoch_links_from(buffer: Any, positions: np.ndarray, lengths: np.ndarray,
                          kinds: np.ndarray) -> list[tuple[int, bytes]]:
        """(batch index, superseded epoch ID) for each Epoch record's supersedes list."""
        links: list[tuple[int, bytes]] = []
        for index in np.nonzero(kinds == 3)[0]:
            start = int(positions[index])
            epoch = _codec.decode(bytes(buffer[start:start + int(lengths[index])]))
            links.extend((int(index), superseded) for superseded in epoch.supersedes)
        return links

    def _relink(self, links: list[tuple[int, bytes]], keep: np.ndarray, total: int) -> list[tuple[int, bytes]]:
        if not links:
            return []
        base = self.state.count
        new_index = np.full(total, -1)
        new_index[keep] = np.arange(len(keep))
        return [(base + int(new_index[i]), sup) for i, sup in links if new_index[i] >= 0]

    # ------------------------------------------------------------------- read

    def get(self, record_id: bytes) -> Any:
        """The record with this ID; raises NotFound, or CorruptionError if its bytes are damaged."""
        return _codec.decode(self.get_encoded(record_id))

    def get_encoded(self, record_id: bytes) -> bytes:
        """The stored bytes (content + proof) of the record with this ID, checksum-checked."""
        self._check_open()
        if type(record_id) is not bytes or len(record_id) != 32:
            record_id = bytes(_id_array([record_id])[0])
        with self._state_lock:
            state = self.state
            row = state.ids.lookup(record_id, state.columns.arrays["id"])
            if row < 0:
                raise NotFound(f"no record with ID {record_id.hex()}")
            location = int(state.columns.arrays["location"][row])
            length = int(state.columns.arrays["length"][row])
        segment = self.log.segments[location >> 32]
        data = _segment.frame_payload(segment.buffer, location & 0xFFFFFFFF, length)
        if data is None:
            offset = location & 0xFFFFFFFF
            raise CorruptionError(
                f"{segment.path} at offset {offset}: record {record_id.hex()} fails its checksum; "
                "it is not served (restore it from a replica or backup)", path=segment.path, offset=offset)
        return data

    def get_many(self, ids: Any) -> list[Any]:
        """Records for many IDs (list of bytes or an (n, 32) uint8 array); None where absent."""
        blob, offsets, rows = self.get_encoded_many(ids)
        present = rows >= 0
        if not present.any():
            return [None] * len(rows)
        starts = offsets[:-1][present]
        decoded = _codec.decode_many(blob, np.append(starts, offsets[1:][present][-1]))
        if present.all():
            return decoded
        out: list[Any] = [None] * len(rows)
        for slot, record in zip(np.nonzero(present)[0], decoded):
            out[slot] = record
        return out

    def get_encoded_many(self, ids: Any) -> tuple[bytes, np.ndarray, np.ndarray]:
        """(blob, offsets, record numbers) of the encoded records for many IDs.

        The fast batch read: no decoding; an absent ID has an empty slice and
        record number -1. Raises CorruptionError if a frame fails its checksum.
        """
        self._check_open()
        array = _id_array(ids)
        with self._state_lock:
            rows = self.state.lookup_many(array)
            blob, offsets = self._gather(rows, lambda i: f"record {_hex(bytes(array[i]))}")
        return blob, offsets, rows

    def _gather(self, rows: np.ndarray, what: Any = None) -> tuple[bytes, np.ndarray]:
        """The stored bytes of record numbers `rows` (absent: -1, empty slice), CRC-checked.

        Raises CorruptionError naming file and offset for the first damaged frame;
        `what(i)` names the record asked for at position i in the message.
        """
        with self._state_lock:
            cols = self.state.columns
            blob, offsets, bad = _segment.gather(
                [s.buffer for s in self.log.segments], cols.arrays["location"], cols.arrays["length"], rows)
        if bad:
            index, seg, offset = bad[0]
            path = self.log.segments[seg].path
            name = what(index) if what is not None else "record"
            raise CorruptionError(
                f"{path} at offset {offset}: {name} fails its checksum; it is not served "
                "(restore it from a replica or backup)", path=path, offset=offset)
        return blob, offsets

    def records_at(self, rows: Any) -> list[Any]:
        """Decode the records with these record numbers (checksums checked)."""
        self._check_open()
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return []
        blob, offsets = self._gather(rows)
        return list(_codec.decode_many(blob, offsets))

    def contains(self, record_id: bytes) -> bool:
        self._check_open()
        with self._state_lock:
            return bool(self.state.lookup_many(_id_array([record_id]))[0] >= 0)

    def __contains__(self, record_id: bytes) -> bool:
        return self.contains(record_id)

    def __len__(self) -> int:
        return self.state.count

    def scan(self, subject: str | None = None, predicate: str | None = None,
             *, kind: str | None = None) -> Iterator[Any]:
        """Iterate stored records in write order, optionally by subject and/or predicate."""
        self._check_open()
        rows: np.ndarray
        with self._state_lock:
            if subject is not None and predicate is not None:
                rows = self.state.postings["pair"].get(_codec.pair_key(subject, predicate))
            elif subject is not None:
                rows = self.state.postings["subject"].get(_codec.subject_key(subject))
            elif predicate is not None:
                rows = self.state.postings["predicate"].get(_codec.predicate_key(predicate))
            else:
                rows = np.arange(self.state.count, dtype=np.int64)
            if kind is not None:
                codes = {v: k for k, v in KIND_NAMES.items()}
                if kind not in codes:
                    raise ValueError(f"kind: {kind!r}, expected one of {', '.join(codes)}")
                rows = rows[self.state.columns.arrays["kind"][rows] == codes[kind]]
        for start in range(0, len(rows), 4096):
            chunk = np.asarray(rows[start:start + 4096], dtype=np.int64)
            blob, offsets = self._gather(chunk)
            for record in _codec.decode_many(blob, offsets):
                # Posting keys are 64-bit hashes: confirm the match on the record itself.
                if subject is not None and getattr(record, "subject", None) != subject:
                    continue
                if predicate is not None and getattr(record, "predicate", None) != predicate:
                    continue
                yield record

    # ------------------------------------------------------------------ query

    def query(self, subject: str, predicate: str | None = None, *, lens: Any = "recency",
              lifecycle: Any = "any", epoch: Any = None, as_of: int | None = None,
              decay: bool = False, now: int | None = None, audit: bool = False,
              agent: Any = None) -> Any:
        """Resolve the claims about subject (and predicate) through a lens.

        Returns a Resolution, or with predicate=None a mapping predicate →
        Resolution. See stemedb.query and docs/query.md for lenses and filters.
        """
        from stemedb import query as _query
        return _query.query(self, subject, predicate, lens=lens, lifecycle=lifecycle, epoch=epoch,
                            as_of=as_of, decay=decay, now=now, audit=audit, agent=agent)

    def query_many(self, pairs: Any, **options: Any) -> list[Any]:
        """Resolve many (subject, predicate) pairs in one call."""
        from stemedb import query as _query
        return _query.query_many(self, pairs, **options)

    def conflicts(self, top: int | None = None, **options: Any) -> list[Any]:
        """The disagreement dashboard: every contested pair by conflict score, highest first."""
        from stemedb import query as _query
        return _query.conflicts(self, top, **options)

    def materialize(self, lens: Any) -> Any:
        """A view caching the winner of every pair under `lens`, kept fresh by writes."""
        from stemedb import query as _query
        return _query.materialize(self, lens)

    def audit(self, agent: Any = None, since: int | None = None,
              limit: int | None = 100) -> list[dict[str, Any]]:
        """Recorded query audits (newest first), optionally by agent and time."""
        from stemedb import query as _query
        return _query.audit_log(self, agent=agent, since=since, limit=limit)

    def stats(self) -> dict[str, Any]:
        """Counts, sizes and write metrics."""
        self._check_open()
        with self._state_lock:
            counts = self.state.kind_counts
            memory = self.state.memory_bytes()
            postings = {name: len(p) for name, p in self.state.postings.items()}
            count = self.state.count
        return {
            "path": self.path,
            "durability": self.durability,
            "records": count,
            "by_kind": {name: int(counts[code]) for code, name in KIND_NAMES.items()},
            "segments": len(self.log.segments),
            "segment_size": self.log.segment_size,
            "disk_bytes": self.log.disk_bytes(),
            "used_bytes": self.log.used_bytes(),
            "index_bytes": memory,
            "posting_keys": postings,
            "writes": self.metrics.as_dict(),
            "failed": self._commit.failure is not None,
            "recovery": {
                "seconds": self.recovery.seconds,
                "records_replayed": self.recovery.records_replayed,
                "snapshot_records": self.recovery.snapshot_records,
                "torn_bytes_dropped": self.recovery.torn_bytes_dropped,
                "problems": list(self.recovery.problems),
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
        with self._snapshot_lock:
            with self._state_lock:
                if self.durability != "sync":
                    self.log.sync()
                # The position the indexed state covers, not the log tail: a commit may
                # have appended frames it has not indexed yet (they are replayed on open).
                number, offset = self._indexed_position
                meta = {"position": [number, offset], "batch_seq": self._indexed_batch_seq,
                        "created_us": time.time_ns() // 1000}
                arrays = self.state.arrays_for_snapshot()
                count = self.state.count
                self._records_since_snapshot = 0
            write_snapshot(self.files, os.path.join(self.path, "index"), arrays, count, meta)

    def _checkpoint_in_background(self) -> None:
        if self._snapshot_thread is not None and self._snapshot_thread.is_alive():
            return
        self._records_since_snapshot = 0

        def run() -> None:
            try:
                self.checkpoint()
            except (OSError, StemeError) as exc:  # the segments stay the truth; retried later
                self.recovery.problems.append(f"background snapshot failed: {exc}")

        self._snapshot_thread = threading.Thread(target=run, name="stemedb-snapshot", daemon=True)
        self._snapshot_thread.start()

    def verify(self) -> VerifyReport:
        """Scrub every frame checksum and record ID in every segment."""
        self._check_open()
        problems = list(self.recovery.problems)
        checked = 0
        with self._state_lock:
            known = self.state.count
            for segment in self.log.segments:
                offset = _segment.HEADER_SIZE
                while True:
                    result = _segment.scan(segment.buffer, offset, segment.size, verify_ids=True)
                    checked += int((result["types"] == _segment.RECORD).sum())
                    for position in result["id_mismatch"]:
                        problems.append(f"{segment.path} at offset {position}: stored ID does not "
                                        "match the record's content")
                    stop = result["stop"]
                    if result["reason"] == _segment.CLEAN:
                        trailing = _segment.last_nonzero(segment.buffer, stop, segment.size)
                        if trailing > stop:
                            problems.append(f"{segment.path} at offset {stop}: {trailing - stop} "
                                            "bytes of unexpected data after the last frame")
                        break
                    problems.append(f"{segment.path} at offset {stop}: frame fails its checksum")
                    later = _segment.find_frame(segment.buffer, stop + 8, segment.size)
                    if later < 0:
                        break
                    offset = later
        if checked < known:
            problems.append(f"{known - checked} indexed records were not found intact in the segments")
        return VerifyReport(ok=not problems, records_checked=checked, problems=problems)

    def close(self) -> None:
        """Flush, snapshot the indexes and release every file. Idempotent."""
        if self._closed:
            return
        try:
            if self._flusher is not None:
                self._flush_stop.set()
                self._flusher.join()
            if self._snapshot_thread is not None:
                self._snapshot_thread.join()
            if self._commit.failure is None:
                try:
                    self.checkpoint()
                except OSError:
                    pass  # the segments are the truth; the next open replays them
        finally:
            self._closed = True
            self._verify_pool.shutdown()
            self.log.close()
            self._release_lock()

    def _check_open(self) -> None:
        if self._closed:
            raise StemeError(f"{self.path}: the database is closed")

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<stemedb.Database {self.path!r} records={self.state.count}>"


class Writer:
    """Group-signing writer: `put(record)` takes an unsigned record and returns once durable.

    Records from all threads that arrive while a commit is in flight form the
    next batch, which is signed with one envelope by this writer's signer,
    appended and fsynced once. Thread-safe.
    """

    def __init__(self, db: Database, signer: Signer) -> None:
        self.db = db
        self.signer = signer

    def put(self, record: Any) -> bytes:
        return self.db._put_unsigned([record], self.signer)[0]

    def put_many(self, records: Iterable[Any]) -> list[bytes]:
        return self.db._put_unsigned(list(records), self.signer)


def _warm_query_kernels() -> None:
    from stemedb import query

    query.warm_up()


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
    """Open (creating if needed) the store at `path`. See Database for options."""
    return Database(path, **options)


def _verify_at(records: list[Any], index: int) -> None:
    try:
        records[index].verify()
    except SignatureError as exc:
        raise SignatureError(f"records[{index}]: {exc}") from None


def _verify_chunk(records: list[Any], chunk: np.ndarray) -> None:
    for index in chunk:
        _verify_at(records, int(index))


def _rows(ids: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(ids).view(np.dtype((np.void, 32))).ravel()


def _envelope_list(envelope: Any) -> list[Any]:
    if envelope is None:
        return []
    if isinstance(envelope, Envelope):
        return [envelope]
    if isinstance(envelope, (list, tuple)):
        return list(envelope)
    raise SignatureError(
        f"envelope: expected a stemedb.Envelope or a list of them, got {type(envelope).__name__}")


def _id_list(ids: np.ndarray) -> list[bytes]:
    return list(_codec.id_list(ids))


def _hex(value: Any) -> str:
    return value.hex() if isinstance(value, (bytes, bytearray)) else repr(value)


def _id_array(ids: Any) -> np.ndarray:
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


def _describe(value: Any) -> str:
    return f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__


def _concat(blobs: list[bytes], offsets_list: list[np.ndarray],
            ids_list: list[np.ndarray]) -> tuple[bytes, np.ndarray, np.ndarray]:
    if len(blobs) == 1:
        return blobs[0], offsets_list[0], ids_list[0]
    shifted = []
    base = 0
    for blob, offsets in zip(blobs, offsets_list):
        shifted.append(offsets[:-1] + base)
        base += len(blob)
    offsets = np.concatenate(shifted + [np.array([base], dtype=np.int64)])
    return b"".join(blobs), offsets, np.concatenate(ids_list)


def _select(blob: bytes, offsets: np.ndarray, ids: np.ndarray,
            keep: np.ndarray) -> tuple[bytes, np.ndarray, np.ndarray]:
    view = memoryview(blob)
    parts = [view[offsets[i]:offsets[i + 1]] for i in keep]
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    new_offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
    return b"".join(parts), new_offsets, ids[keep]
