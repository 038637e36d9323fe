"""The write path: what a writer prepares in its own thread, and the leader's work for a batch.

Owns: the work a writer hands to the group commit (records already
encoded, proven and parsed into columns; or a group-signing writer's
unsigned records), the size check every record passes before it queues, and
the leader's work beside `commit.py`: dedup against the ID index → sign the
group-signing writers' records with one envelope each → plan the batch over
segments (every segment it needs is created first) → frame
(`_segment.build_batch`) → pwrite → fdatasync → `State.add` under the state
lock → write notifications after it → snapshot when due. Also the flusher
of durability "batch", sealing a full segment and rolling to the next.
Must never: fail in the leader because of one writer's input (everything
that depends on it was checked in that writer's thread), acknowledge
before the fdatasync that covers a write returned (durability "sync"), or
retry a failed write or sync.

Error handling: ENOSPC becomes StorageFull with nothing of the batch
written; any other write or sync error poisons the store (DurabilityError
until it is reopened).
"""

from __future__ import annotations

import errno
import functools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from stemedb import _codec, _segment
from stemedb._codec import Record
from stemedb.engine.commit import GroupCommit, Metrics, Pending
from stemedb.engine.files import FileLayer
from stemedb.engine.indexes import State, epoch_links
from stemedb.engine.segments import SegmentLog
from stemedb.engine.snapshots import Checkpointer
from stemedb.engine.verify import EncodedBatch, StoredSubjects, check_vote_subjects, trusted
from stemedb.engine.view import WriteNotifier
from stemedb.errors import DurabilityError, InvalidRecord, SignatureError, StorageFull
from stemedb.records import Envelope, Signer, Vote

BATCH_FRAME = _segment.frame_size(24)
ENVELOPE_PROOF = 32           # an envelope proof's ID: what signing adds to a member's encoding


@dataclass
class Prepared:
    """Records ready for the leader: encoded, proven, parsed (see EncodedBatch)."""

    blob: bytes | memoryview
    offsets: np.ndarray
    ids: np.ndarray
    columns: dict[str, np.ndarray]
    links: list[tuple[int, bytes]] = field(default_factory=list)  # (index, superseded epoch)

    @classmethod
    def of(cls, batch: EncodedBatch) -> Prepared:
        starts, lengths = batch.offsets[:-1], np.diff(batch.offsets)
        return cls(batch.blob, batch.offsets, batch.ids, batch.columns,
                   epoch_links(batch.blob, starts, lengths, batch.columns["kind"]))


@dataclass
class Unsigned:
    """A group-signing writer's records, checked and encoded; the leader signs them."""

    members: list[Record]         # each declaring only the signer, without a proof yet
    ids: np.ndarray
    signer: Signer


Work = Prepared | Unsigned


class WritePath:
    """The write path of one open store (see the module doc)."""

    def __init__(self, log: SegmentLog, state: State, lock: threading.RLock, files: FileLayer, *,
                 durability: str, metrics: Metrics, notifier: WriteNotifier,
                 checkpointer: Checkpointer, before_write: Callable[[], None],
                 subjects: StoredSubjects) -> None:
        self.log = log
        self.state = state
        self.lock = lock
        self.files = files
        self.durability = durability
        self.metrics = metrics
        self.notifier = notifier
        self.checkpointer = checkpointer
        self.before_write = before_write  # recovery's unfinished set-aside, done first
        self.subjects = subjects          # stored records' subject keys (version-2 votes are checked)
        self.batch_seq = state.batch_seq  # the last batch sequence number written
        self.commit: GroupCommit[Work] = GroupCommit(self.write_group)
        self._flusher: threading.Thread | None = None
        self._flush_stop = threading.Event()

    # ------------------------------------------------------ in the writer's thread

    def submit(self, batch: EncodedBatch) -> None:
        """Commit a checked (check_fits) and proven batch as one durable batch.

        Records already stored are skipped.
        """
        if len(batch):
            self.commit.submit(Pending(Prepared.of(batch)))

    def submit_unsigned(self, records: Sequence[Record], signer: Signer) -> np.ndarray:
        """A group-signing writer's records; returns their IDs once durable.

        Everything that can refuse them is checked here, in the writer's own
        thread, so a bad record never fails the batch it would have shared.
        """
        key = signer.public_key
        subject_votes = False
        for index, record in enumerate(records):
            if not hasattr(record, "_with_proof") or isinstance(record, Envelope):
                raise InvalidRecord(f"records[{index}]: expected an Assertion, Vote or Epoch")
            if record.signers not in ((), (key,)):
                raise SignatureError(f"records[{index}]: declares other signers than the writer's")
            subject_votes = subject_votes or (isinstance(record, Vote) and record.subject is not None)
        members = [record._with_proof((key,), (), None) for record in records]
        # remember=True: the leader re-proves them with the envelope without re-encoding
        blob, offsets, ids = _codec.encode_many(members, remember=True)
        # The whole batch fitting one frame bounds each record (the common case: no numpy
        # per put); otherwise each record is checked and the first too big is named.
        whole = int(offsets[-1]) + ENVELOPE_PROOF * len(members)
        if (_segment.FRAME_HEADER + whole + 7) // 8 * 8 > self.frame_capacity():
            self.check_fits(np.diff(offsets) + ENVELOPE_PROOF, ids)
        if subject_votes:
            check_vote_subjects(trusted(blob, offsets, ids), self.subjects)
        self.commit.submit(Pending(Unsigned(members, ids, signer)))
        return ids

    def check_fits(self, sizes: np.ndarray, ids: np.ndarray) -> None:
        """Refuse, in the caller's thread, a record whose frame cannot fit any segment."""
        frame_sizes = (_segment.FRAME_HEADER + sizes + 7) // 8 * 8
        too_big = np.nonzero(frame_sizes > self.frame_capacity())[0]
        if len(too_big):
            first = int(too_big[0])
            raise InvalidRecord(
                f"record {bytes(ids[first]).hex()}: {int(sizes[first])} bytes do not fit a "
                f"{self.log.segment_size}-byte segment; open the store with a larger segment_size")

    def frame_capacity(self) -> int:
        """The largest frame a fresh segment holds after its header, footer and a batch frame."""
        return self.log.segment_size - _segment.HEADER_SIZE - _segment.FOOTER_SIZE - BATCH_FRAME

    def members_per_envelope(self) -> int:
        """Members one envelope may list: its frame must fit a segment, and MAX_MEMBERS holds."""
        room = self.frame_capacity() - _segment.FRAME_HEADER - _envelope_overhead()
        return max(1, min(_codec.MAX_MEMBERS, room // 32))

    # ------------------------------------------------------------- the leader

    def write_group(self, group: list[Pending[Work]]) -> None:
        """The leader's work for one group commit (runs in one writer's thread).

        Nothing here may fail because of one writer's input: every record was
        checked in its writer's thread. What can still fail (a full disk, an
        I/O error) fails the whole batch, for every writer in it.
        """
        self.before_write()
        parts: list[Prepared] = []
        by_signer: dict[bytes, list[Unsigned]] = {}
        for pending in group:
            work = pending.work
            if isinstance(work, Unsigned):
                by_signer.setdefault(work.signer.public_key, []).append(work)
            elif len(work.ids):
                parts.append(work)
        for writers in by_signer.values():
            parts.extend(self._envelope_batches(writers))
        if not parts:
            return
        batch = _concat(parts)
        fresh = self._fresh_mask(batch.ids)
        if not fresh.all():
            keep = np.nonzero(fresh)[0]
            if not len(keep):
                return
            batch = _select(batch, keep)
        self.metrics.batch_writers_max = max(self.metrics.batch_writers_max, len(group))
        self.metrics.writers_committed += len(group)
        self.metrics.batch_records_max = max(self.metrics.batch_records_max, len(batch.ids))
        self._append_durably(batch)

    def _envelope_batches(self, writers: list[Unsigned]) -> Iterator[Prepared]:
        """(envelope, members...) runs for the writers of one signer in this batch.

        One envelope, hence one signature, for all of them, unless the envelope
        would not fit a segment (or exceed MAX_MEMBERS): then one per chunk.
        """
        signer = writers[0].signer
        key = signer.public_key
        members = [record for work in writers for record in work.members]
        ids = np.concatenate([work.ids for work in writers])
        step = self.members_per_envelope()
        for start in range(0, len(members), step):
            chunk_ids = ids[start:start + step]
            envelope = Envelope(key, chunk_ids).sign(signer)
            proven = [m._with_proof((key,), (), envelope.id) for m in members[start:start + step]]
            blob, offsets, run_ids = _codec.encode_many([envelope, *proven])
            yield Prepared.of(trusted(blob, offsets, run_ids))

    def _fresh_mask(self, ids: np.ndarray) -> np.ndarray:
        """True for IDs neither stored nor repeated earlier in the same batch."""
        with self.lock:
            return np.asarray(self.state.ids.new_mask(ids, self.state.all_ids()))

    def _append_durably(self, batch: Prepared) -> None:
        sizes = np.diff(batch.offsets)
        frame_sizes = (_segment.FRAME_HEADER + sizes + 7) // 8 * 8
        fresh_room = self.log.segment_size - _segment.HEADER_SIZE - _segment.FOOTER_SIZE
        # Every frame was checked to fit (check_fits) before its writer queued it.
        assert int(frame_sizes.max(initial=0)) <= self.frame_capacity()
        # Plan the split over segments first and create every segment it needs, so
        # that StorageFull refuses the whole batch before any of it is written.
        plan: list[tuple[int, int] | None] = []
        room = self.log.room()
        cumulative = np.cumsum(frame_sizes)
        start, n = 0, len(batch.ids)
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
            else:
                self._write_frames(batch, *step)

    def _roll(self) -> None:
        """Seal the active segment (footer, synced) and continue in the next one.

        The footer is durable before anything is written to the next segment,
        so a segment that has a successor holding frames always has its seal.
        """
        try:
            self.log.prepare(1)
            self._seal()
            if self.durability != "none":
                self.sync()
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

    def _write_frames(self, batch: Prepared, lo: int, hi: int) -> None:
        """Records lo..hi-1 of the batch as one batch frame in the active segment, then indexed."""
        self.batch_seq += 1
        offsets = batch.offsets
        part = memoryview(batch.blob)[int(offsets[lo]):int(offsets[hi])]
        ids = batch.ids[lo:hi]
        frames, positions, lengths = _segment.build_batch(part, offsets[lo:hi + 1] - offsets[lo], ids,
                                                          self.batch_seq)
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
            self.sync()
        columns = {name: values[lo:hi] for name, values in batch.columns.items()}
        frame_positions = positions - _segment.FRAME_HEADER + offset
        columns["location"] = (np.uint64(segment.number) << np.uint64(32)) | frame_positions.astype(np.uint64)
        columns["length"] = lengths
        links = [(index - lo, superseded) for index, superseded in batch.links if lo <= index < hi]
        with self.lock:
            record_numbers = self.state.add(ids, columns, links)
            self.state.position = (segment.number, offset + len(frames))
            self.state.batch_seq = self.batch_seq
            listeners = self.notifier.current()
        self.notifier.deliver(listeners, record_numbers, columns)
        self.metrics.batches += 1
        self.metrics.records_written += len(ids)
        self.metrics.bytes_written += len(frames)
        self.checkpointer.indexed(len(ids))

    def sync(self) -> None:
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
        self.commit.poison(error)
        raise error from exc

    # ------------------------------------------------------------ the flusher

    def start_flusher(self, interval: float) -> None:
        """Durability "batch": fdatasync the log every `interval` seconds in a thread."""
        self._flusher = threading.Thread(target=self._flush_loop, args=(interval,),
                                         name="stemedb-flush", daemon=True)
        self._flusher.start()

    def stop_flusher(self) -> None:
        if self._flusher is not None:
            self._flush_stop.set()
            self._flusher.join()

    def _flush_loop(self, interval: float) -> None:
        while not self._flush_stop.wait(interval):
            try:
                self.commit.while_healthy(self.sync)
            except DurabilityError:
                return


@functools.cache
def _envelope_overhead() -> int:
    """Bytes of a signed envelope's encoding besides its member IDs."""
    probe = Signer.from_seed(bytes(32))
    envelope = Envelope(probe.public_key, [bytes(32)], timestamp=0).sign(probe)
    return len(envelope.encode()) - 32


def _concat(parts: list[Prepared]) -> Prepared:
    """One batch of several writers' parts, in order."""
    if len(parts) == 1:
        return parts[0]
    shifted, links = [], []
    base = records = 0
    for part in parts:
        shifted.append(part.offsets[:-1] + base)
        base += int(part.offsets[-1])
        links += [(index + records, superseded) for index, superseded in part.links]
        records += len(part.ids)
    offsets = np.concatenate(shifted + [np.array([base], dtype=np.int64)])
    columns = {name: np.concatenate([part.columns[name] for part in parts]) for name in parts[0].columns}
    return Prepared(b"".join(part.blob for part in parts), offsets,
                    np.concatenate([part.ids for part in parts]), columns, links)


def _select(batch: Prepared, keep: np.ndarray) -> Prepared:
    """The records `keep` (ascending indexes) of a batch."""
    view = memoryview(batch.blob)
    offsets = batch.offsets
    parts = [view[offsets[i]:offsets[i + 1]] for i in keep]
    sizes = np.diff(offsets)[keep]
    new_offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
    new_index = np.full(len(batch.ids), -1)
    new_index[keep] = np.arange(len(keep))
    links = [(int(new_index[i]), superseded) for i, superseded in batch.links if new_index[i] >= 0]
    return Prepared(b"".join(parts), new_offsets, batch.ids[keep],
                    {name: values[keep] for name, values in batch.columns.items()}, links)
