"""The embedded database: open, put, get, scan, stats, verify, close.

Owns: one data directory (LOCK, MANIFEST, segments/, index/), the write path
(verify → encode → size check, all in the writer's thread → group commit →
frame → append → fdatasync → index), the read path (index → location →
checksum → decode from the mapping), recovery on open (engine/recovery.py
walks the segments; this module decides what is indexed, set aside, held
back or reported), snapshots, and scrubbing. Must never: acknowledge a write
before it is durable (in "sync" mode), serve bytes whose checksum or ID does
not match, change anything when a write is refused, or let one writer's bad
input fail the batch it would have shared with others.

Resource handling: a Database owns its lock file, segment descriptors and
mappings; `close()` (or the context manager) writes a snapshot and releases
them. Use one Database per directory per process; the LOCK file enforces it
across processes.
Error handling: see stemedb.errors — InvalidRecord / SignatureError refuse a
write and change nothing; StorageFull refuses it and keeps reads working;
DurabilityError poisons the store until it is reopened; CorruptionError names
the file and offset of a damaged record (or the damaged MANIFEST). Damage
found at open never stops it (except a damaged segment header or MANIFEST):
it is reported in `recovery`, `stats()` and `verify()`.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stemedb import _codec, _hash, _segment
from stemedb.engine import recovery as _recovery
from stemedb.engine.commit import GroupCommit, Metrics, Pending
from stemedb.engine.files import FileLayer
from stemedb.engine.manifest import (
    STORE_VERSION,
    Manifest,
    new_manifest,
    read_manifest,
    write_manifest,
)
from stemedb.engine.recovery import Damage
from stemedb.engine.segments import DEFAULT_SEGMENT_SIZE, MIN_SEGMENT_SIZE, Segment, SegmentLog
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
    RecordKind,
    Signer,
    Vote,
    check_envelope_members,
    check_stored_member,
)

DURABILITY_MODES = ("sync", "batch", "none")
KIND_NAMES = {RecordKind.ASSERTION: "assertion", RecordKind.VOTE: "vote", RecordKind.EPOCH: "epoch",
              RecordKind.ENVELOPE: "envelope"}
PROOF_ENVELOPE = 2
BATCH_FRAME = _segment.frame_size(24)


@dataclass
class RecoveryReport:
    """What opening the store found and did."""

    segments_scanned: int = 0
    records_replayed: int = 0
    torn_bytes_dropped: int = 0     # bytes this open set aside (copied to a quarantine file, zeroed)
    snapshot_records: int = 0
    snapshot_problem: str | None = None
    problems: list[str] = field(default_factory=list)
    damage: list[Damage] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, damage: Damage) -> None:
        self.damage.append(damage)
        self.problems.append(damage.text())

    def plain_problems(self) -> list[str]:
        """The problems that are not damage entries (a snapshot ignored or failed)."""
        texts = {d.text() for d in self.damage}
        return [p for p in self.problems if p not in texts]


@dataclass
class VerifyReport:
    """Result of `Database.verify()`: a scrub of every checksum, ID, footer and file."""

    ok: bool
    records_checked: int
    problems: list[str]
    damage: list[Damage] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.ok


@dataclass
class HeldBack:
    """An intact member record not served because its envelope is not stored."""

    segment: int
    position: int
    length: int
    envelope: bytes


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
        # Set aside at open but not yet copied (the disk was full): writes wait for it.
        self._pending_set_aside: list[tuple[Segment, int, int, int]] = []
        self._held_back: list[HeldBack] = []
        self._unverified: list[Damage] = []
        try:
            manifest = self._open_manifest(segment_size)
            self.log = SegmentLog(os.path.join(self.path, "segments"), self.files,
                                  manifest.segment_size, manifest)
            self._ensure_directories()
            self._recover()
        except BaseException:
            if hasattr(self, "log"):
                self.log.close()
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

    def _upgrade_manifest(self) -> None:
        """Rewrite a version-1 MANIFEST as version 2, naming the newest segment found.

        Best effort: on a full disk the old MANIFEST stays (it is still valid)
        and the next segment creation writes the new one.
        """
        manifest = self.log.manifest
        if manifest.version >= STORE_VERSION:
            return
        manifest.newest_segment = max(manifest.newest_segment, len(self.log.segments) - 1)
        try:
            write_manifest(self.files, manifest)
        except OSError:
            pass  # still version 1; the next segment created writes version 2

    # --------------------------------------------------------------- recovery

    def _recover(self) -> None:
        """Load the snapshot, replay what follows it, and report everything found wrong.

        docs/format.md, "Recovery", states the rules this follows.
        """
        started = time.perf_counter()
        report = self.recovery
        self.log.open_existing()
        for segment in self.log.segments:
            if segment.missing:
                report.add(Damage(_recovery.MISSING, segment.path,
                                  detail=self.log.missing_text(segment)))
        self._upgrade_manifest()
        start_segment, start_offset = self._load_snapshot()
        self.log.ensure_active()
        active = self.log.active_number
        for segment in self.log.real_segments():
            self._report_footer(segment)
            if segment.number > active:
                self._clear_spare(segment)
            elif segment.number < start_segment:
                segment.tail = segment.frames_end  # sealed and covered by the snapshot: not read
            else:
                offset = start_offset if segment.number == start_segment else _segment.HEADER_SIZE
                self._replay_segment(segment, offset)
        self._release_held_back()
        for damage in self._quarantine_damage():
            report.add(damage)
        self._indexed_position = (self.log.active.number, self.log.active.tail)
        self._indexed_batch_seq = self._batch_seq
        report.seconds = time.perf_counter() - started

    def _load_snapshot(self) -> tuple[int, int]:
        """Install the newest usable snapshot; returns the (segment, offset) replay starts at."""
        report = self.recovery
        self.state = State()
        try:
            loaded = load_snapshot(self.files, os.path.join(self.path, "index"))
        except ValueError as exc:
            report.snapshot_problem = str(exc)
            report.problems.append(f"snapshot ignored: {exc}")
            return 0, _segment.HEADER_SIZE
        if loaded is None:
            return 0, _segment.HEADER_SIZE
        snapshot_state, manifest = loaded
        problem = self._snapshot_position_problem(manifest)
        if problem is not None:
            report.snapshot_problem = problem
            report.problems.append(f"snapshot ignored: {problem}")
            return 0, _segment.HEADER_SIZE
        self.state = snapshot_state
        self._batch_seq = int(manifest["batch_seq"])
        report.snapshot_records = snapshot_state.count
        self._held_back = self._snapshot_held_back(manifest.get("held_back", []))
        number, offset = (int(x) for x in manifest["position"])
        return number, offset

    def _snapshot_position_problem(self, manifest: dict[str, Any]) -> str | None:
        """Why the snapshot's position cannot be trusted with these segments, or None."""
        try:
            number, offset = (int(x) for x in manifest["position"])
            batch_seq = int(manifest["batch_seq"])
        except (KeyError, TypeError, ValueError):
            return "its position or batch sequence is missing or malformed"
        if not 0 <= number < len(self.log.segments) or number > self.log.active_number:
            return f"it covers segment {number}, which is not a written segment here"
        segment = self.log.segments[number]
        if not segment.missing and not (_segment.HEADER_SIZE <= offset <= segment.frames_end
                                         and offset % _segment.ALIGN == 0):
            return f"its position {offset} is not a frame boundary of segment {number}"
        if batch_seq < 0:
            return f"its batch sequence {batch_seq} is negative"
        return None

    def _snapshot_held_back(self, entries: Any) -> list[HeldBack]:
        """The held-back members a snapshot lists, re-read from their frames (intact ones only)."""
        held: list[HeldBack] = []
        for entry in entries if isinstance(entries, list) else []:
            try:
                number, position, length = (int(x) for x in entry)
                segment = self.log.segments[number]
            except (TypeError, ValueError, IndexError):
                continue
            payload = _segment.frame_payload(segment.buffer, position, length)
            if payload is not None and len(payload) > 32:
                held.append(HeldBack(number, position, length, payload[-32:]))
        return held

    def _report_footer(self, segment: Segment) -> None:
        if segment.footer_problem is not None:
            self.recovery.add(Damage(_recovery.FOOTER, segment.path, segment.limit,
                                     detail=segment.footer_problem))
        elif segment.sealed and segment.version >= 2 and segment.footer is None:
            self.recovery.add(Damage(
                _recovery.FOOTER, segment.path, segment.limit,
                detail=f"{segment.path} at offset {segment.limit}: sealed (later segments hold "
                       "data) but it has no footer"))

    def _clear_spare(self, segment: Segment) -> None:
        """A spare after the active segment must be empty; anything in it is set aside."""
        end = _segment.last_nonzero(segment.buffer, _segment.HEADER_SIZE, segment.size)
        if end > _segment.HEADER_SIZE:
            records = _segment.count_record_headers(segment.buffer, _segment.HEADER_SIZE, end)
            self._set_aside(segment, _segment.HEADER_SIZE, end, records)

    def _replay_segment(self, segment: Segment, offset: int) -> None:
        """Index the intact frames of one segment from `offset`; report or set aside the rest."""
        self.recovery.segments_scanned += 1
        limit = segment.frames_end if segment.sealed else segment.limit
        walked = _recovery.walk(segment.buffer, offset, limit)
        for run in walked.runs:
            self._index_run(segment, run)
        tail_gap = walked.tail_gap
        for gap in walked.gaps:
            if gap.zero and self._quarantined(segment, gap):
                continue  # set aside by an earlier open; its file is reported
            what = _recovery.describe_gap(gap, at_tail=gap is tail_gap)
            if gap.zero:
                self.recovery.add(_recovery.gap_damage(_recovery.ZEROED, segment.path, gap, what))
            elif segment.sealed:
                self.recovery.add(_recovery.gap_damage(_recovery.DAMAGED, segment.path, gap,
                                                       what + "; not served"))
            else:
                self._set_aside(segment, gap.start, gap.data_end, gap.records)
        if segment.sealed:
            self._check_sealed(segment, offset, walked)
        else:
            segment.tail = walked.end

    def _check_sealed(self, segment: Segment, offset: int, walked: _recovery.Walk) -> None:
        """What a replayed sealed segment's footer promised against what the walk found."""
        footer = segment.footer
        if footer is None:
            segment.tail = walked.end
            return
        segment.tail = footer["end"]
        self._batch_seq = max(self._batch_seq, footer["last_batch"])
        if offset == _segment.HEADER_SIZE and walked.records != footer["records"]:
            self.recovery.add(Damage(
                _recovery.DAMAGED, segment.path, _segment.HEADER_SIZE,
                footer["end"] - _segment.HEADER_SIZE, footer["records"] - walked.records,
                detail=f"hold {walked.records} intact record frames where its footer counts "
                       f"{footer['records']}; missing ones are not served"))

    def _quarantined(self, segment: Segment, gap: _recovery.Gap) -> bool:
        return any(q.segment == segment.number and gap.start <= q.offset < gap.end
                   for q in self.log.quarantine)

    def _set_aside(self, segment: Segment, start: int, end: int, records: int) -> None:
        """Copy unreadable bytes of an unsealed segment aside, then zero them.

        If the copy cannot be made (a full disk), nothing is zeroed: the bytes
        stay, reads go on, and writes are refused until the copy succeeds.
        """
        try:
            self.log.set_aside(segment, start, end)
        except OSError as exc:
            self._pending_set_aside.append((segment, start, end, records))
            self.recovery.add(Damage(_recovery.NOT_SET_ASIDE, segment.path, start, end - start,
                                     records, detail=exc.strerror or str(exc)))
            return
        self.recovery.torn_bytes_dropped += end - start

    def _finish_set_aside(self) -> None:
        """Before the first write: set aside what a full disk kept recovery from setting aside."""
        while self._pending_set_aside:
            segment, start, end, _ = self._pending_set_aside[0]
            try:
                self.log.set_aside(segment, start, end)
            except OSError as exc:
                raise StorageFull(
                    f"writes are refused until space frees: {end - start} unreadable bytes of "
                    f"{segment.path} at offset {start} must first be copied aside ({exc.strerror or exc}); "
                    "free disk space, then write again (reads keep working)") from exc
            self._pending_set_aside.pop(0)
            self.recovery.torn_bytes_dropped += end - start
            self._now_set_aside(segment.path, start)

    def _now_set_aside(self, path: str, offset: int) -> None:
        """Report as set aside what the open reported as not yet set aside."""
        report = self.recovery
        place = (path, offset)
        gone = {d.text() for d in report.damage
                if d.kind == _recovery.NOT_SET_ASIDE and (d.path, d.offset) == place}
        report.damage = [d for d in report.damage if d.text() not in gone]
        report.problems = [p for p in report.problems if p not in gone]
        for damage in self._quarantine_damage():
            if (damage.path, damage.offset) == place:
                report.add(damage)

    def _quarantine_damage(self) -> list[Damage]:
        """One entry per set-aside file in segments/ (this open's and earlier ones)."""
        found = []
        for quarantine in self.log.quarantine:
            segment_path = os.path.join(self.log.directory, f"{quarantine.segment:08d}.seg")
            try:
                data = self.files.read_file(quarantine.path)
            except OSError as exc:
                found.append(Damage(_recovery.SET_ASIDE, segment_path, quarantine.offset,
                                    copy=os.path.basename(quarantine.path),
                                    detail=f"(unreadable: {exc.strerror or exc})"))
                continue
            found.append(_recovery.quarantine_damage(quarantine.path, segment_path,
                                                     quarantine.offset, data))
        return found

    def _index_run(self, segment: Segment, run: _recovery.Run) -> None:
        types, positions, lengths = run.scan["types"], run.scan["positions"], run.scan["lengths"]
        batch_positions = positions[types == _segment.BATCH]
        if len(batch_positions):
            self._batch_seq = max(self._batch_seq,
                                  _segment.batch_info(segment.buffer, int(batch_positions[-1]))[0])
        records = types == _segment.RECORD
        if records.any():
            self._index_frames(segment, positions[records], lengths[records], run.resynced)

    def _index_frames(self, segment: Segment, positions: np.ndarray, lengths: np.ndarray,
                      resynced: bool) -> None:
        """Index intact record frames found by recovery.

        Skipped: records already indexed; members whose envelope is not stored
        (held back); and, for frames found by resynchronising after damage,
        records whose signatures or envelope membership do not check.
        """
        payloads = positions + _segment.FRAME_HEADER
        columns = _codec.extract_columns(segment.buffer, payloads, lengths)
        columns["location"] = (np.uint64(segment.number) << np.uint64(32)) | positions.astype(np.uint64)
        columns["length"] = lengths
        ids = _segment.read_ids(segment.buffer, positions)
        keep = self._fresh_mask(ids)
        self._hold_back_orphans(segment, positions, lengths, ids, columns, keep)
        if resynced:
            self._drop_unproven(segment, positions, lengths, ids, keep)
        links = self._epoch_links_from(segment.buffer, payloads, lengths, columns["kind"])
        chosen = np.nonzero(keep)[0]
        if len(chosen) != len(ids):
            columns = {k: v[chosen] for k, v in columns.items()}
            ids = ids[chosen]
        self.state.add(ids, columns, self._relink(links, chosen, len(keep)))
        self.recovery.records_replayed += len(ids)

    def _hold_back_orphans(self, segment: Segment, positions: np.ndarray, lengths: np.ndarray,
                           ids: np.ndarray, columns: dict[str, np.ndarray], keep: np.ndarray) -> None:
        """Members whose envelope is neither stored nor among these frames: not served."""
        members = np.nonzero(keep & (columns["proof"] == PROOF_ENVELOPE))[0]
        if not len(members):
            return
        # Members of one envelope sit together: each run of equal envelope IDs is checked once.
        starts, envelopes = _segment.tail_runs(segment.buffer, positions[members], lengths[members])
        stored = self.state.lookup_many(envelopes) >= 0
        if stored.all():
            return
        here = {bytes(ids[i]) for i in np.nonzero(columns["kind"] == RecordKind.ENVELOPE)[0]}
        bounds = np.append(starts, len(members))
        for run in np.nonzero(~stored)[0]:
            envelope = bytes(envelopes[run])
            if envelope in here:
                continue
            for index in members[bounds[run]:bounds[run + 1]]:
                keep[index] = False
                self._held_back.append(HeldBack(segment.number, int(positions[index]),
                                                int(lengths[index]), envelope))

    def _drop_unproven(self, segment: Segment, positions: np.ndarray, lengths: np.ndarray,
                       ids: np.ndarray, keep: np.ndarray) -> None:
        """Frames found after damage are served only if their records prove themselves."""
        envelopes: dict[bytes, Any] = {}
        for index in np.nonzero(keep)[0]:
            start = int(positions[index]) + _segment.FRAME_HEADER
            record_id = bytes(ids[index])
            try:
                record = _codec.decode(bytes(segment.buffer[start:start + int(lengths[index])]))
                if record.envelope is None:
                    record.verify()
                    if isinstance(record, Envelope):
                        envelopes[record_id] = record
                    continue
                envelope = envelopes.get(record.envelope) or self._stored(record.envelope)
                if envelope is None:
                    continue  # held back already (its envelope is not stored)
                check_stored_member(envelope, record, record_id, f"record {record_id.hex()}")
            except (SignatureError, ValueError) as exc:   # InvalidRecord is a ValueError
                keep[index] = False
                damage = Damage(_recovery.UNVERIFIED, segment.path, int(positions[index]),
                                _segment.frame_size(int(lengths[index])), 1,
                                detail=f"found after damage, not served: {exc}")
                self._unverified.append(damage)
                self.recovery.add(damage)

    def _stored(self, record_id: bytes) -> Any:
        try:
            return self.get(record_id)
        except (NotFound, CorruptionError):
            return None

    def _release_held_back(self) -> None:
        """Serve held-back members whose envelope recovery found later; report the rest."""
        held, self._held_back = self._held_back, []
        by_segment: dict[int, list[HeldBack]] = {}
        for entry in held:
            by_segment.setdefault(entry.segment, []).append(entry)
        for number, entries in by_segment.items():
            self._index_frames(self.log.segments[number],
                               np.array([e.position for e in entries], dtype=np.int64),
                               np.array([e.length for e in entries], dtype=np.uint32), False)
        for damage in self._held_back_damage():
            self.recovery.add(damage)

    def _held_back_damage(self) -> list[Damage]:
        by_envelope: dict[bytes, list[HeldBack]] = {}
        for entry in self._held_back:
            by_envelope.setdefault(entry.envelope, []).append(entry)
        found = []
        for envelope, entries in by_envelope.items():
            first = entries[0]
            found.append(Damage(
                _recovery.HELD_BACK, self.log.segments[first.segment].path, first.position,
                sum(_segment.frame_size(e.length) for e in entries), len(entries),
                detail=f"their envelope {envelope.hex()} is not stored (damaged or never written); "
                       "they are served after it is stored again and the store reopened"))
        return found

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
        self._check_fits(np.diff(offsets), ids)
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
        """A group-signing writer's records: everything that can refuse them is checked here.

        The checks run in the writer's own thread, before its records join the
        commit queue, so that a bad record is refused to its own writer and
        never fails the batch it would have shared with others.
        """
        self._check_open()
        if not records:
            return []
        key = signer.public_key
        for index, record in enumerate(records):
            if not hasattr(record, "_with_proof") or isinstance(record, Envelope):
                raise InvalidRecord(f"records[{index}]: expected an Assertion, Vote or Epoch")
            if record.signers not in ((), (key,)):
                raise SignatureError(f"records[{index}]: declares other signers than the writer's")
        members = [record._with_proof((key,), (), None) for record in records]
        # remember=True: the leader re-proves them with the envelope without re-encoding
        _, offsets, ids = _codec.encode_many(members, remember=True)
        self._check_fits(np.diff(offsets) + 32, ids)   # + the envelope ID of their proof
        self._commit.submit(Pending(records=members, ids=ids, signer=signer))
        return _id_list(ids)

    def _check_fits(self, sizes: np.ndarray, ids: np.ndarray) -> None:
        """Refuse, in the caller's thread, a record whose frame cannot fit any segment."""
        frame_sizes = (_segment.FRAME_HEADER + sizes + 7) // 8 * 8
        too_big = np.nonzero(frame_sizes > self._frame_capacity())[0]
        if len(too_big):
            first = int(too_big[0])
            raise InvalidRecord(
                f"record {bytes(ids[first]).hex()}: {int(sizes[first])} bytes do not fit a "
                f"{self.log.segment_size}-byte segment; open the store with a larger segment_size")

    def _frame_capacity(self) -> int:
        """The largest frame a fresh segment holds after its header, footer and a batch frame."""
        return self.log.segment_size - _segment.HEADER_SIZE - _segment.FOOTER_SIZE - BATCH_FRAME

    def _members_per_envelope(self) -> int:
        """Members one envelope may list: its frame must fit a segment, and MAX_MEMBERS holds."""
        room = self._frame_capacity() - _segment.FRAME_HEADER - _envelope_overhead()
        return max(1, min(_codec.MAX_MEMBERS, room // 32))

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
        """The leader's work for one group commit (runs in one writer's thread).

        Nothing here may fail because of one writer's input: every record was
        checked in its writer's thread. What can still fail (a full disk, an
        I/O error) fails the whole batch, for every writer in it.
        """
        self._finish_set_aside()
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
            for blob, offsets, ids in self._envelope_batches(writers):
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

    def _envelope_batches(self, writers: list[Pending]) -> Iterator[tuple[bytes, np.ndarray, np.ndarray]]:
        """Encoded (envelope, members...) runs for the writers of one signer in this batch.

        One envelope, hence one signature, for all of them, unless the envelope
        would not fit a segment (or exceed MAX_MEMBERS): then one per chunk.
        """
        signer = writers[0].signer
        key = signer.public_key
        members = [record for pending in writers for record in pending.records or ()]
        ids = np.concatenate([pending.ids for pending in writers if pending.ids is not None])
        step = self._members_per_envelope()
        for start in range(0, len(members), step):
            chunk_ids = ids[start:start + step]
            envelope = Envelope(key, chunk_ids).sign(signer)
            proven = [m._with_proof((key,), (), envelope.id) for m in members[start:start + step]]
            yield _codec.encode_many([envelope, *proven])

    def _fresh_mask(self, ids: np.ndarray) -> np.ndarray:
        """True for IDs neither stored nor repeated earlier in the same batch."""
        with self._state_lock:
            return np.asarray(self.state.ids.new_mask(ids, self.state.all_ids()))

    def _append_durably(self, blob: bytes, offsets: np.ndarray, ids: np.ndarray) -> None:
        sizes = np.diff(offsets)
        frame_sizes = (_segment.FRAME_HEADER + sizes + 7) // 8 * 8
        fresh_room = self.log.segment_size - _segment.HEADER_SIZE - _segment.FOOTER_SIZE
        # Every frame was checked to fit (_check_fits) before its writer queued it.
        assert int(frame_sizes.max(initial=0)) <= self._frame_capacity()
        # Plan the split over segments first and create every segment it needs, so
        # that StorageFull refuses the whole batch before any of it is written.
        plan: list[tuple[int, int] | None] = []
        room = self.log.room()
        cumulative = np.cumsum(frame_sizes)
        start, n = 0, len(ids)
        while start < n:
            base = int(cumulative[start - 1]) if start else 0
            fits = int(np.searchsorted(cumulative[start:] - base, room - BATCH_FRAME, side="right"))
            if fits == 0:
                plan.append(None)
                room = fresh_room
                continue
            plan.append((start, start + fits))
            room -= int(cumulative[start + fits - 1]) - base + BATCH_FRAME
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
        """Seal the active segment (footer, synced) and continue in the next one.

        The footer is durable before anything is written to the next segment,
        so a segment that has a successor holding frames always has its seal.
        """
        try:
            self.log.prepare(1)
            self._seal()
            if self.durability != "none":
                self._sync()
            self.log.advance()
        except (StorageFull, DurabilityError):
            raise
        except OSError as exc:
            self._fail(exc)

    def _seal(self) -> None:
        segment = self.log.active
        try:
            self.log.seal_active()
        except OSError as exc:
            segment.sealed = False
            segment.footer = None
            if segment.version >= 2:
                try:  # a partial footer would read as a damaged seal after a crash
                    self.files.pwrite(segment.fd, bytes(_segment.FOOTER_SIZE), segment.limit)
                except OSError:
                    pass
            self.metrics.write_errors += 1
            if exc.errno == errno.ENOSPC:
                raise StorageFull(f"disk full while sealing {segment.path}; free space and retry") from exc
            raise

    def _write_frames(self, blob: bytes, offsets: np.ndarray, ids: np.ndarray, lo: int, hi: int) -> None:
        self._batch_seq += 1
        part = memoryview(blob)[lo:hi]
        frames, positions, lengths = _segment.build_batch(part, offsets, ids, self._batch_seq)
        segment = self.log.active
        offset = segment.tail
        try:
            # An earlier write here may have failed part-way; zero the rest of its range in
            # the same write so none of its refused frames can be replayed after a crash.
            self.log.append(frames, clear_until=segment.dirty_until)
        except OSError as exc:
            segment.tail = offset
            segment.dirty_until = max(segment.dirty_until, offset + len(frames))
            self.metrics.write_errors += 1
            if exc.errno == errno.ENOSPC:
                raise StorageFull(f"disk full while writing {segment.path}; free space and retry") from exc
            self._fail(exc)
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
        for index in np.nonzero(kinds == RecordKind.EPOCH)[0]:
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
            raise self._unreadable(segment, location & 0xFFFFFFFF, f"record {record_id.hex()}")
        return data

    @staticmethod
    def _unreadable(segment: Segment, offset: int, name: str) -> CorruptionError:
        failed = "is in a missing segment file" if segment.missing else "fails its checksum"
        return CorruptionError(
            f"{segment.path} at offset {offset}: {name} {failed}; it is not served (restore it "
            "from a replica or backup)", path=segment.path, offset=offset)

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
            name = what(index) if what is not None else "record"
            raise self._unreadable(self.log.segments[seg], offset, name)
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
            "segments": len(self.log.real_segments()),
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
                "set_aside": [d.as_dict() for d in self.recovery.damage
                              if d.kind in (_recovery.SET_ASIDE, _recovery.NOT_SET_ASIDE)],
                "held_back": sum(d.records or 0 for d in self.recovery.damage
                                 if d.kind == _recovery.HELD_BACK),
                "missing_segments": [d.path for d in self.recovery.damage
                                     if d.kind == _recovery.MISSING],
                "damage": [d.as_dict() for d in self.recovery.damage],
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
                        "created_us": time.time_ns() // 1000,
                        # behind the position, so the next open would not find them again
                        "held_back": [[h.segment, h.position, h.length] for h in self._held_back]}
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
        """Scrub every segment: frame checksums, record IDs, footers and their digests.

        Not OK while anything is wrong: damaged or zeroed bytes, bytes set aside
        (until their quarantine file is removed), missing segment files, damaged
        footers, held-back members, indexed records whose frame is not intact.
        """
        self._check_open()
        damage: list[Damage] = []
        intact: list[np.ndarray] = [np.zeros(0, dtype=np.uint64)]
        checked = 0
        with self._state_lock:
            for segment in self.log.segments:
                checked += self._verify_segment(segment, damage, intact)
            damage.extend(self._held_back_damage())
            damage.extend(self._unverified)
            pending = {(s.number, start) for s, start, _, _ in self._pending_set_aside}
            damage.extend(d for d in self.recovery.damage if d.kind == _recovery.NOT_SET_ASIDE
                          and (self._segment_number(d.path), d.offset) in pending)
            locations = self.state.columns.view("location")
            lost = np.nonzero(~np.isin(locations, np.concatenate(intact)))[0]
            lost_where = int(locations[lost[0]]) if len(lost) else 0
        damage.extend(self._quarantine_damage())
        problems = self.recovery.plain_problems() + [d.text() for d in damage]
        if len(lost):
            segment = self.log.segments[lost_where >> 32]
            problems.append(f"{len(lost)} indexed records were not found intact in the segments "
                            f"(the first in {segment.path} at offset {lost_where & 0xFFFFFFFF})")
        return VerifyReport(ok=not problems, records_checked=checked, problems=problems,
                            damage=damage)

    def _segment_number(self, path: str) -> int:
        name = os.path.basename(path)
        return int(name[:-4]) if name.endswith(".seg") and name[:-4].isdigit() else -1

    def _verify_segment(self, segment: Segment, damage: list[Damage],
                        intact: list[np.ndarray]) -> int:
        """Check one segment (under the state lock); returns the intact record frames in it."""
        if segment.missing:
            damage.append(Damage(_recovery.MISSING, segment.path,
                                 detail=self.log.missing_text(segment)))
            return 0
        start = _segment.HEADER_SIZE
        if segment.number > self.log.active_number:
            end = _segment.last_nonzero(segment.buffer, start, segment.size)
            if end > start:
                damage.append(Damage(_recovery.DAMAGED, segment.path, start, end - start,
                                     _segment.count_record_headers(segment.buffer, start, end),
                                     detail="of data in a spare segment (after the active one)"))
            return 0
        if segment.footer_problem is not None or (segment.sealed and segment.version >= 2
                                                  and segment.footer is None):
            footer_damage = Damage(_recovery.FOOTER, segment.path, segment.limit,
                                   detail=segment.footer_problem or
                                   f"{segment.path} at offset {segment.limit}: sealed (later "
                                   "segments hold data) but it has no footer")
            damage.append(footer_damage)
        if not segment.sealed:
            # Only what is indexed: frames past it may be a commit in flight.
            number, offset = self._indexed_position
            limit = offset if number == segment.number else start
        else:
            limit = segment.frames_end
        walked = _recovery.walk(segment.buffer, start, limit, verify_ids=True)
        pending = {s for seg, s, _, _ in self._pending_set_aside if seg is segment}
        found = len(damage)
        for gap in walked.gaps:
            if (gap.zero and self._quarantined(segment, gap)) or gap.start in pending:
                continue
            kind = _recovery.ZEROED if gap.zero else _recovery.DAMAGED
            what = _recovery.describe_gap(gap, at_tail=gap is walked.tail_gap)
            damage.append(_recovery.gap_damage(kind, segment.path, gap, what))
        if segment.footer is not None:
            self._verify_footer(segment, walked, damage, quiet=len(damage) > found)
        for run in walked.runs:
            positions = run.scan["positions"][run.scan["types"] == _segment.RECORD]
            intact.append((np.uint64(segment.number) << np.uint64(32)) | positions.astype(np.uint64))
        return walked.records

    def _verify_footer(self, segment: Segment, walked: _recovery.Walk, damage: list[Damage],
                       quiet: bool) -> None:
        """A sealed segment against its footer: record count, digest, zeros after the end."""
        footer = segment.footer
        assert footer is not None
        start, end = _segment.HEADER_SIZE, footer["end"]
        if walked.records != footer["records"]:
            damage.append(Damage(
                _recovery.DAMAGED, segment.path, start, end - start,
                footer["records"] - walked.records,
                detail=f"hold {walked.records} intact record frames where its footer counts "
                       f"{footer['records']}"))
        elif not quiet and _hash.crc32c(segment.buffer[start:end]) != footer["digest"]:
            damage.append(Damage(_recovery.DAMAGED, segment.path, start, end - start,
                                 detail="whose CRC-32C does not match the footer's digest "
                                        "(damage outside any frame's checksum, e.g. padding)"))
        after = _segment.last_nonzero(segment.buffer, end, segment.limit)
        if after > end:
            damage.append(Damage(_recovery.DAMAGED, segment.path, end, after - end,
                                 detail="of unexpected data after the footer's end of frames"))

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


@functools.cache
def _envelope_overhead() -> int:
    """Bytes of a signed envelope's encoding besides its member IDs."""
    probe = Signer.from_seed(bytes(32))
    envelope = Envelope(probe.public_key, [bytes(32)], timestamp=0).sign(probe)
    return len(envelope.encode()) - 32


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
