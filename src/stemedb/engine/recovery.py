"""Recovery: what opening a store finds on disk, and the indexes it rebuilds from it.

Owns: the open-time procedure of docs/format.md, "Recovery": install the
newest usable snapshot, walk every segment after its position
(engine/walk.py), index the intact frames, hold back members whose envelope
is not stored, refuse frames found after damage that do not prove
themselves, set aside the unreadable bytes of unsealed segments (or record
that a full disk kept it from doing so), check sealed segments against
their footers, and report all of it in a `RecoveryReport`. Afterwards it
keeps what the rest of the engine needs of that: the held-back members
(listed in every snapshot), the set-aside copies still owed (made before the
next write), and the frames it refused (reported by `verify`). Must never:
stop an open for damage it can report (only a damaged segment header or
MANIFEST does), serve a record that did not verify after damage, or zero a
byte that was not first copied aside durably.

Error handling: damage is reported, not raised. A set-aside copy that cannot
be made raises StorageFull at the next write (`finish_set_aside`) until it
can; reads keep working.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from stemedb import _codec, _segment
from stemedb.engine import walk
from stemedb.engine.files import FileLayer
from stemedb.engine.indexes import State, epoch_links
from stemedb.engine.manifest import STORE_VERSION, write_manifest
from stemedb.engine.reads import Reads
from stemedb.engine.segments import Segment, SegmentLog
from stemedb.engine.snapshots import load_snapshot
from stemedb.engine.walk import Damage
from stemedb.errors import SignatureError, StorageFull
from stemedb.records import Envelope, RecordKind, check_stored_member

PROOF_ENVELOPE = 2      # docs/format.md, "Proof": proof_kind of an envelope member


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
class HeldBack:
    """An intact member record not served because its envelope is not stored."""

    segment: int
    position: int
    length: int
    envelope: bytes


@dataclass
class PendingSetAside:
    """Unreadable bytes recovery must copy aside before the next write (the disk was full)."""

    segment: Segment
    start: int
    end: int
    records: int


class Recovery:
    """Open-time recovery of one store, and what it leaves for writes and scrubs."""

    def __init__(self, path: str, files: FileLayer, log: SegmentLog, report: RecoveryReport, *,
                 partitions: int = 0) -> None:
        self.path = path
        self.files = files
        self.log = log
        self.report = report
        self.partitions = partitions      # the range trees' partition count (the MANIFEST's)
        self.state = State(partitions)
        self.held_back: list[HeldBack] = []
        self.pending_set_aside: list[PendingSetAside] = []
        self.unverified: list[Damage] = []     # frames found after damage that failed their proof
        self._reads = Reads(log, self.state, threading.RLock())

    # ------------------------------------------------------------------ open

    def run(self) -> State:
        """Load the snapshot, replay what follows it, and report everything found wrong."""
        started = time.perf_counter()
        report = self.report
        self.log.open_existing()
        for segment in self.log.segments:
            if segment.missing:
                report.add(Damage(walk.MISSING, segment.path, detail=self.log.missing_text(segment)))
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
        for damage in self.quarantine_damage():
            report.add(damage)
        self.state.position = (self.log.active.number, self.log.active.tail)
        report.seconds = time.perf_counter() - started
        return self.state

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

    def _load_snapshot(self) -> tuple[int, int]:
        """Install the newest usable snapshot; returns the (segment, offset) replay starts at."""
        report = self.report
        try:
            loaded = load_snapshot(self.files, os.path.join(self.path, "index"), self.partitions)
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
        self._reads = Reads(self.log, self.state, threading.RLock())
        self.state.batch_seq = int(manifest["batch_seq"])
        report.snapshot_records = snapshot_state.count
        self.held_back = self._snapshot_held_back(manifest.get("held_back", []))
        number, offset = (int(x) for x in manifest["position"])
        return number, offset

    def _snapshot_position_problem(self, manifest: dict[str, object]) -> str | None:
        """Why the snapshot's position cannot be trusted with these segments, or None."""
        try:
            number, offset = (int(x) for x in manifest["position"])  # type: ignore[attr-defined]
            batch_seq = int(manifest["batch_seq"])  # type: ignore[call-overload]
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

    def _snapshot_held_back(self, entries: object) -> list[HeldBack]:
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
            self.report.add(Damage(walk.FOOTER, segment.path, segment.limit,
                                   detail=segment.footer_problem))
        elif segment.sealed and segment.version >= 2 and segment.footer is None:
            self.report.add(Damage(
                walk.FOOTER, segment.path, segment.limit,
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
        self.report.segments_scanned += 1
        limit = segment.frames_end if segment.sealed else segment.limit
        walked = walk.walk(segment.buffer, offset, limit)
        for run in walked.runs:
            self._index_run(segment, run)
        tail_gap = walked.tail_gap
        for gap in walked.gaps:
            if gap.zero and self.quarantined(segment, gap):
                continue  # set aside by an earlier open; its file is reported
            what = walk.describe_gap(gap, at_tail=gap is tail_gap)
            if gap.zero:
                self.report.add(walk.gap_damage(walk.ZEROED, segment.path, gap, what))
            elif segment.sealed:
                self.report.add(walk.gap_damage(walk.DAMAGED, segment.path, gap, what + "; not served"))
            else:
                self._set_aside(segment, gap.start, gap.data_end, gap.records)
        if segment.sealed:
            self._check_sealed(segment, offset, walked)
        else:
            segment.tail = walked.end

    def _check_sealed(self, segment: Segment, offset: int, walked: walk.Walk) -> None:
        """What a replayed sealed segment's footer promised against what the walk found."""
        footer = segment.footer
        if footer is None:
            segment.tail = walked.end
            return
        segment.tail = footer["end"]
        self.state.batch_seq = max(self.state.batch_seq, footer["last_batch"])
        if offset == _segment.HEADER_SIZE and walked.records != footer["records"]:
            self.report.add(Damage(
                walk.DAMAGED, segment.path, _segment.HEADER_SIZE,
                footer["end"] - _segment.HEADER_SIZE, footer["records"] - walked.records,
                detail=f"hold {walked.records} intact record frames where its footer counts "
                       f"{footer['records']}; missing ones are not served"))

    # ------------------------------------------------------------- indexing

    def _index_run(self, segment: Segment, run: walk.Run) -> None:
        types, positions, lengths = run.scan["types"], run.scan["positions"], run.scan["lengths"]
        batch_positions = positions[types == _segment.BATCH]
        if len(batch_positions):
            self.state.batch_seq = max(
                self.state.batch_seq, _segment.batch_info(segment.buffer, int(batch_positions[-1]))[0])
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
        keep = np.asarray(self.state.ids.new_mask(ids, self.state.all_ids()))
        self._hold_back_orphans(segment, positions, lengths, ids, columns, keep)
        if resynced:
            self._drop_unproven(segment, positions, lengths, ids, keep)
        links = epoch_links(segment.buffer, payloads, lengths, columns["kind"])
        chosen = np.nonzero(keep)[0]
        if len(chosen) != len(ids):
            columns = {k: v[chosen] for k, v in columns.items()}
            ids = ids[chosen]
            links = _relink(links, chosen, len(keep))
        self.state.add(ids, columns, links)
        self.report.records_replayed += len(ids)

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
                self.held_back.append(HeldBack(segment.number, int(positions[index]),
                                               int(lengths[index]), envelope))

    def _drop_unproven(self, segment: Segment, positions: np.ndarray, lengths: np.ndarray,
                       ids: np.ndarray, keep: np.ndarray) -> None:
        """Frames found after damage are served only if their records prove themselves.

        Rare (only after damage), so the records are decoded and checked as objects.
        """
        envelopes: dict[bytes, Envelope] = {}
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
                envelope = envelopes.get(record.envelope) or self._reads.stored(record.envelope)
                if envelope is None:
                    continue  # held back already (its envelope is not stored)
                check_stored_member(envelope, record, record_id, f"record {record_id.hex()}")
            except (SignatureError, ValueError) as exc:   # InvalidRecord is a ValueError
                keep[index] = False
                damage = Damage(walk.UNVERIFIED, segment.path, int(positions[index]),
                                _segment.frame_size(int(lengths[index])), 1,
                                detail=f"found after damage, not served: {exc}")
                self.unverified.append(damage)
                self.report.add(damage)

    def _release_held_back(self) -> None:
        """Serve held-back members whose envelope recovery found later; report the rest."""
        held, self.held_back = self.held_back, []
        by_segment: dict[int, list[HeldBack]] = {}
        for entry in held:
            by_segment.setdefault(entry.segment, []).append(entry)
        for number, entries in by_segment.items():
            self._index_frames(self.log.segments[number],
                               np.array([e.position for e in entries], dtype=np.int64),
                               np.array([e.length for e in entries], dtype=np.uint32), False)
        for damage in self.held_back_damage():
            self.report.add(damage)

    # ------------------------------------------ what recovery leaves for later

    def held_back_entries(self) -> list[tuple[int, int, int]]:
        """(segment, position, length) of each held-back member, for the next snapshot."""
        return [(h.segment, h.position, h.length) for h in self.held_back]

    def held_back_damage(self) -> list[Damage]:
        by_envelope: dict[bytes, list[HeldBack]] = {}
        for entry in self.held_back:
            by_envelope.setdefault(entry.envelope, []).append(entry)
        found = []
        for envelope, entries in by_envelope.items():
            first = entries[0]
            found.append(Damage(
                walk.HELD_BACK, self.log.segments[first.segment].path, first.position,
                sum(_segment.frame_size(e.length) for e in entries), len(entries),
                detail=f"their envelope {envelope.hex()} is not stored (damaged or never written); "
                       "they are served after it is stored again and the store reopened"))
        return found

    def quarantined(self, segment: Segment, gap: walk.Gap) -> bool:
        """Is this gap of zeros where an earlier open set bytes aside?"""
        return any(q.segment == segment.number and gap.start <= q.offset < gap.end
                   for q in self.log.quarantine)

    def quarantine_damage(self) -> list[Damage]:
        """One entry per set-aside file in segments/ (this open's and earlier ones)."""
        found = []
        for quarantine in self.log.quarantine:
            segment_path = os.path.join(self.log.directory, f"{quarantine.segment:08d}.seg")
            try:
                data = self.files.read_file(quarantine.path)
            except OSError as exc:
                found.append(Damage(walk.SET_ASIDE, segment_path, quarantine.offset,
                                    copy=os.path.basename(quarantine.path),
                                    detail=f"(unreadable: {exc.strerror or exc})"))
                continue
            found.append(walk.quarantine_damage(quarantine.path, segment_path, quarantine.offset, data))
        return found

    def _set_aside(self, segment: Segment, start: int, end: int, records: int) -> None:
        """Copy unreadable bytes of an unsealed segment aside, then zero them.

        If the copy cannot be made (a full disk), nothing is zeroed: the bytes
        stay, reads go on, and writes are refused until the copy succeeds.
        """
        try:
            self.log.set_aside(segment, start, end)
        except OSError as exc:
            self.pending_set_aside.append(PendingSetAside(segment, start, end, records))
            self.report.add(Damage(walk.NOT_SET_ASIDE, segment.path, start, end - start, records,
                                   detail=exc.strerror or str(exc)))
            return
        self.report.torn_bytes_dropped += end - start

    def finish_set_aside(self) -> None:
        """Before a write: set aside what a full disk kept recovery from setting aside."""
        while self.pending_set_aside:
            pending = self.pending_set_aside[0]
            segment, start, end = pending.segment, pending.start, pending.end
            try:
                self.log.set_aside(segment, start, end)
            except OSError as exc:
                raise StorageFull(
                    f"writes are refused until space frees: {end - start} unreadable bytes of "
                    f"{segment.path} at offset {start} must first be copied aside ({exc.strerror or exc}); "
                    "free disk space, then write again (reads keep working)") from exc
            self.pending_set_aside.pop(0)
            self.report.torn_bytes_dropped += end - start
            self._now_set_aside(segment.path, start)

    def _now_set_aside(self, path: str, offset: int) -> None:
        """Report as set aside what the open reported as not yet set aside."""
        report = self.report
        place = (path, offset)
        gone = {d.text() for d in report.damage
                if d.kind == walk.NOT_SET_ASIDE and (d.path, d.offset) == place}
        report.damage = [d for d in report.damage if d.text() not in gone]
        report.problems = [p for p in report.problems if p not in gone]
        for damage in self.quarantine_damage():
            if (damage.path, damage.offset) == place:
                report.add(damage)


def _relink(links: list[tuple[int, bytes]], keep: np.ndarray, total: int) -> list[tuple[int, bytes]]:
    """Epoch links of a batch after only the records `keep` of `total` are indexed."""
    if not links:
        return []
    new_index = np.full(total, -1)
    new_index[keep] = np.arange(len(keep))
    return [(int(new_index[i]), superseded) for i, superseded in links if new_index[i] >= 0]
