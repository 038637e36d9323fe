"""Segment files: preallocated, fixed-size, written with pwrite, read through mmap.

Owns: the `segments/` directory: creating a segment (preallocate, header,
fsync the file and the directory, then name it in the MANIFEST), appending
framed bytes at the tail, sealing a segment (its footer: where its frames
end, how many there are, a digest, its successor), syncing, mapping for
reads, telling the active segment from sealed ones and spares, noticing
missing files, and setting damaged bytes aside (copy to a quarantine file,
then zero). Must never: parse records or decide what a frame means (that is
`_segment`, recovery and the database), write into a sealed segment, or zero
a byte that has not first been copied durably.

Resource handling: a SegmentLog owns one descriptor and one read-only mapping
per segment file; `close()` releases them all. A mapping is never unmapped
while the log is open, so a reader's memoryview cannot outlive its pages. A
missing segment is a placeholder without a file: reads of it fail their
checksum check and report the file missing.
Error handling: ENOSPC becomes StorageFull (nothing was written); other
OSErrors propagate to the caller, which decides whether the log is poisoned.
A segment whose header is damaged refuses the open (CorruptionError naming
the file); a damaged footer is reported, not fatal.
"""

from __future__ import annotations

import errno
import mmap
import os
import time
from dataclasses import dataclass, field

from stemedb import _hash, _segment
from stemedb.engine.files import FileLayer
from stemedb.engine.manifest import Manifest, write_manifest
from stemedb.errors import CorruptionError, StorageFull

MIN_SEGMENT_SIZE = 1 << 16
DEFAULT_SEGMENT_SIZE = 64 << 20
QUARANTINE = ".torn-"     # NNNNNNNN.seg.torn-OFFSET[.K]: bytes set aside from that offset


def _size_text(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"


def segment_name(number: int) -> str:
    return f"{number:08d}.seg"


@dataclass
class Segment:
    number: int
    path: str
    fd: int
    size: int
    view: mmap.mmap | None
    version: int = _segment.SEGMENT_VERSION
    tail: int = _segment.HEADER_SIZE  # next free offset (frames are appended here)
    sealed: bool = False
    missing: bool = False             # a placeholder: the file is not there
    footer: dict[str, int] | None = None   # the seal of a sealed version-2 segment
    footer_problem: str | None = None      # why footer bytes that are there cannot be used
    # Record frames, batch frames and the CRC-32C of bytes [HEADER_SIZE, tail): kept as
    # batches are appended; None after an open (counted once, when the segment is sealed).
    records: int | None = 0
    batches: int | None = 0
    first_batch: int = 0
    last_batch: int = 0
    digest: int | None = 0
    dirty_until: int = 0  # end of a failed write's range past the tail (zeroed by the next write)
    buffer: memoryview = field(init=False)

    def __post_init__(self) -> None:
        self.buffer = memoryview(self.view if self.view is not None else bytes(_segment.HEADER_SIZE))

    @property
    def limit(self) -> int:
        """End of the frame area: where the footer starts (version 2) or the file ends (1)."""
        return self.size - _segment.FOOTER_SIZE if self.version >= 2 else self.size

    @property
    def frames_end(self) -> int:
        """Where this segment's frames end: its footer's word if sealed with one, else its limit."""
        return self.footer["end"] if self.footer is not None else self.limit

    def forget_counts(self) -> None:
        self.records = self.batches = self.digest = None


@dataclass
class QuarantineFile:
    """Bytes set aside from a segment (docs/format.md, "Recovery")."""

    path: str
    segment: int
    offset: int


class SegmentLog:
    """The ordered set of segment files of one store."""

    def __init__(self, directory: str, files: FileLayer, segment_size: int,
                 manifest: Manifest) -> None:
        if segment_size < MIN_SEGMENT_SIZE or segment_size % 4096:
            raise ValueError(
                f"segment_size: {segment_size} must be a multiple of 4096 and at least {MIN_SEGMENT_SIZE}"
            )
        self.directory = directory
        self.files = files
        self.segment_size = segment_size
        self.manifest = manifest
        self.segments: list[Segment] = []
        # Segments after the active one are spares: created ahead of a batch
        # that needs them, so that a StorageFull refuses the batch before any
        # of it is written.
        self.active_number = 0
        self.quarantine: list[QuarantineFile] = []

    # -- opening -------------------------------------------------------------

    def open_existing(self) -> None:
        """Map every segment file found, and tell the active one from sealed ones and spares.

        A `.seg.tmp` file is a segment whose creation never finished (nothing
        in it was ever acknowledged): it is removed. Numbers up to the highest
        one found or named (by the MANIFEST, or a sealed segment's footer)
        that have no file get a placeholder and are reported missing.
        """
        self.files.makedirs(self.directory)
        listing = self.files.listdir(self.directory)
        numbers: dict[int, str] = {}
        for name in listing:
            if name.endswith(".seg.tmp"):
                self.files.remove(os.path.join(self.directory, name))
            elif name.endswith(".seg") and name[:-4].isdigit():
                numbers[int(name[:-4])] = name
            elif ".seg" + QUARANTINE in name:
                self._note_quarantine(name)
        highest = max([*numbers, self.manifest.newest_segment])
        for number in range(highest + 1):
            if number in numbers:
                self.segments.append(self._open_segment(number, numbers[number]))
            else:
                self.segments.append(self._placeholder(number))
        for segment in list(self.segments):
            if segment.footer is not None and segment.footer["successor"] >= len(self.segments):
                for number in range(len(self.segments), segment.footer["successor"] + 1):
                    self.segments.append(self._placeholder(number))
        self._choose_active()

    def _open_segment(self, number: int, name: str) -> Segment:
        path = os.path.join(self.directory, name)
        fd = self.files.open(path)
        try:
            size = self.files.size(fd)
            if size < _segment.HEADER_SIZE:
                raise CorruptionError(f"{path}: {size} bytes, shorter than a segment header",
                                      path=path, offset=0)
            view = self.files.map(fd, size)
        except BaseException:
            self.files.close(fd)
            raise
        try:
            header_number, header_size, _, version = _segment.parse_segment_header(
                view[:_segment.HEADER_SIZE])
            if header_number != number or header_size != size:
                raise ValueError(f"header says segment {header_number} of {header_size} bytes, "
                                 f"the file is segment {number} of {size} bytes")
        except ValueError as exc:
            view.close()
            self.files.close(fd)
            raise CorruptionError(f"{path} at offset 0: {exc}", path=path, offset=0) from None
        segment = Segment(number, path, fd, size, view, version=version)
        if version >= 2:
            self._read_footer(segment)
        return segment

    def _read_footer(self, segment: Segment) -> None:
        place = segment.limit
        try:
            footer = _segment.parse_segment_footer(segment.buffer[place:segment.size])
        except ValueError as exc:
            segment.footer_problem = f"{segment.path} at offset {place}: {exc}"
            return
        if footer is None:
            return
        end = footer["end"]
        # The successor is the next segment file that existed at sealing: number + 1, or
        # later if files in between were already missing (they are reported as such).
        if footer["number"] != segment.number or footer["successor"] <= segment.number:
            segment.footer_problem = (
                f"{segment.path} at offset {place}: segment footer names segment "
                f"{footer['number']} followed by {footer['successor']}")
        elif not (_segment.HEADER_SIZE <= end <= place and end % _segment.ALIGN == 0):
            segment.footer_problem = (
                f"{segment.path} at offset {place}: segment footer says its frames end at "
                f"{end}, outside its frame area")
        else:
            segment.footer = footer

    def _placeholder(self, number: int) -> Segment:
        path = os.path.join(self.directory, segment_name(number))
        return Segment(number, path, -1, 0, None, tail=_segment.HEADER_SIZE, sealed=True,
                       missing=True)

    def missing_text(self, segment: Segment) -> str:
        named = []
        if segment.number <= self.manifest.newest_segment:
            named.append(f"the MANIFEST names segment {self.manifest.newest_segment} as the newest")
        before = self.segments[segment.number - 1] if segment.number else None
        if before is not None and before.footer is not None:
            named.append(f"{segment_name(before.number)} is sealed with it as its successor")
        if any(not s.missing for s in self.segments[segment.number + 1:]):
            named.append("later segments exist")
        return (f"{segment.path} is missing ({'; '.join(named)}); records written in it are "
                "not served: restore the file from a backup or a replica")

    def _choose_active(self) -> None:
        """The active segment: after the last sealed one, or the last one holding frames.

        A version-2 segment with anything in its footer area is sealed (a damaged
        footer is reported, and its frames are read to their limit). Later
        segments without data are spares. Version-1 segments have no footer:
        the last one holding data is the active one, as version 1 always had it.
        """
        real = [s for s in self.segments if not s.missing]
        last_sealed = max((s.number for s in real if self._has_footer_bytes(s)), default=-1)
        later = [s for s in real if s.number > last_sealed]
        holding = next((s.number for s in reversed(later) if self._holds_data(s)), None)
        if holding is not None:
            self.active_number = holding
        else:
            self.active_number = later[0].number if later else len(self.segments)
        for segment in self.segments:
            segment.sealed = segment.missing or segment.number < self.active_number
            if segment.number == self.active_number:
                segment.forget_counts()

    def _has_footer_bytes(self, segment: Segment) -> bool:
        return segment.version >= 2 and (segment.footer is not None or segment.footer_problem is not None)

    def _holds_data(self, segment: Segment) -> bool:
        start = _segment.HEADER_SIZE
        return bool(_segment.last_nonzero(segment.buffer, start, segment.limit) > start)

    def _note_quarantine(self, name: str) -> None:
        stem, _, rest = name.partition(".seg" + QUARANTINE)
        offset_text = rest.split(".")[0]
        if stem.isdigit() and offset_text.isdigit():
            self.quarantine.append(QuarantineFile(os.path.join(self.directory, name), int(stem),
                                                  int(offset_text)))

    # -- creating and sealing -------------------------------------------------

    def ensure_active(self) -> None:
        """Create an active segment if the open found none to write in (a new store, or the
        last segment is sealed or missing)."""
        if self.active_number >= len(self.segments):
            self.create_segment()

    def create_segment(self) -> Segment:
        """Create, preallocate and durably name the next segment (a spare until rolled into).

        It is built as `NNNNNNNN.seg.tmp` and renamed only after its header is
        synced, then the directory is synced, then the MANIFEST is rewritten to
        name it: a crash leaves either no segment or a complete one, never a
        headerless file that would block opening, and never a MANIFEST naming
        a segment that does not exist.
        """
        number = len(self.segments)
        path = os.path.join(self.directory, segment_name(number))
        temp = path + ".tmp"
        size = self.segment_size
        if self.files.exists(temp):
            self.files.remove(temp)
        fd = self.files.open(temp, create=True)
        try:
            self.files.preallocate(fd, size)
            header = _segment.segment_header(number, size, time.time_ns() // 1000)
            self.files.pwrite(fd, header, 0)
            self.files.fsync(fd)
            self.files.rename(temp, path)
            self.files.fsync_dir(self.directory)
            view = self.files.map(fd, size)
            if number > self.manifest.newest_segment:
                previous = self.manifest.newest_segment
                self.manifest.newest_segment = number
                try:
                    write_manifest(self.files, self.manifest)
                except BaseException:
                    self.manifest.newest_segment = previous
                    view.close()
                    raise
        except OSError as exc:
            self.files.close(fd)
            for leftover in (temp, path):
                try:
                    if self.files.exists(leftover):
                        self.files.remove(leftover)
                except OSError:
                    pass
            try:
                self.files.fsync_dir(self.directory)
            except OSError:
                pass
            if exc.errno == errno.ENOSPC:
                raise StorageFull(
                    f"no room for a new {_size_text(size)} segment in {self.directory}; "
                    "free disk space, then write again (reads keep working)"
                ) from exc
            raise
        segment = Segment(number, path, fd, size, view)
        self.segments.append(segment)
        return segment

    def spare_count(self) -> int:
        return sum(1 for s in self.segments[self.active_number + 1:] if not s.missing)

    def prepare(self, count: int) -> None:
        """Make sure `count` spare segments exist after the active one."""
        while self.spare_count() < count:
            self.create_segment()

    def seal_active(self) -> None:
        """Write the active segment's footer (the caller syncs it before using the next one).

        Its successor must already exist (`prepare(1)`): the footer names it.
        A version-1 segment (from an older store) has no room for a footer;
        it is sealed by position alone, as version 1 always was.
        """
        segment = self.active
        if segment.version < 2:
            segment.sealed = True
            return
        if segment.records is None or segment.batches is None or segment.digest is None:
            self._count(segment)
        assert segment.records is not None and segment.batches is not None
        assert segment.digest is not None
        footer = _segment.segment_footer(
            segment.number, segment.tail, segment.records, segment.batches, segment.first_batch,
            segment.last_batch, self._next_real(segment.number), segment.digest)
        self.files.pwrite(segment.fd, footer, segment.limit)
        segment.footer = _segment.parse_segment_footer(footer)
        segment.sealed = True

    def _count(self, segment: Segment) -> None:
        """Records, batches and digest of [HEADER_SIZE, tail), after an open forgot them."""
        start, end = _segment.HEADER_SIZE, segment.tail
        records = 0
        batch_positions = []
        position = start
        while position < end:
            result = _segment.scan(segment.buffer, position, end)
            types = result["types"]
            records += int((types == _segment.RECORD).sum())
            batch_positions.extend(result["positions"][types == _segment.BATCH].tolist())
            position = _segment.find_frame(segment.buffer, result["stop"] + _segment.ALIGN, end)
            if position < 0:
                break
        segment.records, segment.batches = records, len(batch_positions)
        if batch_positions:
            segment.first_batch = _segment.batch_info(segment.buffer, batch_positions[0])[0]
            segment.last_batch = _segment.batch_info(segment.buffer, batch_positions[-1])[0]
        segment.digest = _hash.crc32c(segment.buffer[start:end])

    def _next_real(self, number: int) -> int:
        for segment in self.segments[number + 1:]:
            if not segment.missing:
                return segment.number
        raise ValueError(f"segment {number} has no successor yet (call prepare(1) first)")

    def advance(self) -> Segment:
        """Continue in the next (spare) segment after the active one was sealed and synced."""
        self.active_number = self._next_real(self.active_number)
        return self.active

    # -- writing -------------------------------------------------------------

    @property
    def active(self) -> Segment:
        return self.segments[self.active_number]

    def room(self) -> int:
        return self.active.limit - self.active.tail

    def append(self, frames: bytes, *, clear_until: int = 0) -> tuple[Segment, int]:
        """Write one batch's frames at the active segment's tail; returns (segment, offset).

        `clear_until`: zero the bytes after the frames up to there in the same
        write (what an earlier failed write left past the tail). The segment's
        counts and digest follow the batch frame at the start of `frames`.
        """
        segment = self.active
        offset = segment.tail
        if len(frames) > segment.limit - offset:
            raise ValueError("append: frames do not fit the active segment (caller must roll)")
        data: bytes = frames
        if clear_until > offset + len(frames):
            data = frames + bytes(clear_until - offset - len(frames))
        self.files.pwrite(segment.fd, data, offset)
        segment.tail = offset + len(frames)
        if segment.digest is not None:
            segment.digest = _hash.crc32c(frames, segment.digest)
        if segment.records is not None and segment.batches is not None:
            seq, count, _ = _segment.batch_info(frames, 0)
            segment.records += count
            segment.batches += 1
            segment.first_batch = segment.first_batch or seq
            segment.last_batch = seq
        return segment, offset

    def sync(self) -> None:
        """fdatasync the active segment (its size never changes, so data sync suffices)."""
        self.files.fdatasync(self.active.fd)

    def set_aside(self, segment: Segment, start: int, end: int) -> str:
        """Copy bytes [start, end) of an unsealed segment to a quarantine file, then zero them.

        The copy, `NNNNNNNN.seg.torn-START` (with `.K` appended if that name is
        taken), is synced and named durably before a byte is zeroed; the
        zeroing is synced too. Returns the copy's path. An OSError leaves the
        segment untouched (a copy may exist; retrying writes another name).
        """
        if segment.sealed:
            raise ValueError(f"{segment.path}: a sealed segment is never written")
        quarantine = f"{segment.path}{QUARANTINE}{start}"
        suffix = 0
        while self.files.exists(quarantine if not suffix else f"{quarantine}.{suffix}"):
            suffix += 1
        if suffix:
            quarantine = f"{quarantine}.{suffix}"
        self.files.write_file(quarantine, bytes(segment.buffer[start:end]))
        self.files.fsync_dir(self.directory)
        self.quarantine.append(QuarantineFile(quarantine, segment.number, start))
        chunk = 1 << 20
        position = start
        while position < end:
            length = min(chunk, end - position)
            self.files.pwrite(segment.fd, bytes(length), position)
            position += length
        self.files.fdatasync(segment.fd)
        return quarantine

    # -- reading and teardown -----------------------------------------------

    def real_segments(self) -> list[Segment]:
        return [s for s in self.segments if not s.missing]

    def disk_bytes(self) -> int:
        return sum(s.size for s in self.segments)

    def used_bytes(self) -> int:
        return sum(s.tail for s in self.segments if not s.missing)

    def close(self) -> None:
        for segment in self.segments:
            try:
                segment.buffer.release()
            except BufferError:
                pass  # a read racing the close holds it for one call; it goes with that read
            if segment.missing or segment.view is None:
                continue
            try:
                segment.view.close()
            except BufferError:
                pass  # a reader still holds a view; the mapping goes when it does
            self.files.close(segment.fd)
        self.segments = []
