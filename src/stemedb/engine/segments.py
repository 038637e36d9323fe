"""Segment files: preallocated, fixed-size, written with pwrite, read through mmap.

Owns: the `segments/` directory: creating a segment (preallocate, header,
fsync the file and the directory), appending framed bytes at the tail,
syncing, mapping for reads, and cutting a torn tail. Must never: parse
records or decide what a frame means (that is `_segment` and the database).

Resource handling: a SegmentLog owns one descriptor and one read-only mapping
per segment; `close()` releases them all. A mapping is never unmapped while
the log is open, so a reader's memoryview cannot outlive its pages.
Error handling: ENOSPC becomes StorageFull (nothing was written); other
OSErrors propagate to the caller, which decides whether the log is poisoned.
"""

from __future__ import annotations

import errno
import mmap
import os
import time
from dataclasses import dataclass, field

from stemedb import _segment
from stemedb.engine.files import FileLayer
from stemedb.errors import CorruptionError, StorageFull

MIN_SEGMENT_SIZE = 1 << 16
DEFAULT_SEGMENT_SIZE = 64 << 20


def segment_name(number: int) -> str:
    return f"{number:08d}.seg"


@dataclass
class Segment:
    number: int
    path: str
    fd: int
    size: int
    view: mmap.mmap
    tail: int = _segment.HEADER_SIZE  # next free offset (frames are appended here)
    sealed: bool = False
    buffer: memoryview = field(init=False)

    def __post_init__(self) -> None:
        self.buffer = memoryview(self.view)


class SegmentLog:
    """The ordered set of segment files of one store."""

    def __init__(self, directory: str, files: FileLayer, segment_size: int) -> None:
        if segment_size < MIN_SEGMENT_SIZE or segment_size % 4096:
            raise ValueError(
                f"segment_size: {segment_size} must be a multiple of 4096 and at least {MIN_SEGMENT_SIZE}"
            )
        self.directory = directory
        self.files = files
        self.segment_size = segment_size
        self.segments: list[Segment] = []

    # -- opening -------------------------------------------------------------

    def open_existing(self) -> None:
        """Map every segment file found; the last one is the active segment."""
        self.files.makedirs(self.directory)
        names = [n for n in self.files.listdir(self.directory) if n.endswith(".seg")]  # not .torn-*
        for expected, name in enumerate(names):
            number = int(name[:-4])
            if number != expected:
                raise CorruptionError(
                    f"{self.directory}: segment {segment_name(expected)} is missing "
                    f"(found {name})", path=os.path.join(self.directory, name), offset=0,
                )
            path = os.path.join(self.directory, name)
            fd = self.files.open(path)
            size = self.files.size(fd)
            if size < _segment.HEADER_SIZE:
                self.files.close(fd)
                raise CorruptionError(f"{path}: {size} bytes, shorter than a segment header",
                                      path=path, offset=0)
            view = self.files.map(fd, size)
            try:
                header_number, header_size, _ = _segment.parse_segment_header(view[:_segment.HEADER_SIZE])
            except ValueError as exc:
                view.close()
                self.files.close(fd)
                raise CorruptionError(f"{path} at offset 0: {exc}", path=path, offset=0) from None
            if header_number != number or header_size != size:
                view.close()
                self.files.close(fd)
                raise CorruptionError(
                    f"{path} at offset 0: header says segment {header_number} of {header_size} "
                    f"bytes, the file is segment {number} of {size} bytes", path=path, offset=0,
                )
            self.segments.append(Segment(number, path, fd, size, view, sealed=True))
        if self.segments:
            self.segments[-1].sealed = False

    def create_segment(self) -> Segment:
        """Create, preallocate and durably name the next segment.

        Only after the file and its directory entry are synced may a record in
        it be acknowledged: otherwise a crash could lose the whole file.
        """
        number = len(self.segments)
        path = os.path.join(self.directory, segment_name(number))
        size = self.segment_size
        fd = self.files.open(path, create=True)
        try:
            self.files.preallocate(fd, size)
            header = _segment.segment_header(number, size, time.time_ns() // 1000)
            self.files.pwrite(fd, header, 0)
            self.files.fsync(fd)
            self.files.fsync_dir(self.directory)
            view = self.files.map(fd, size)
        except OSError as exc:
            self.files.close(fd)
            try:
                self.files.remove(path)
                self.files.fsync_dir(self.directory)
            except OSError:
                pass
            if exc.errno == errno.ENOSPC:
                raise StorageFull(
                    f"no room for a new {size >> 20} MiB segment in {self.directory}; "
                    "free disk space, then write again (reads keep working)"
                ) from exc
            raise
        if self.segments:
            self.segments[-1].sealed = True
        segment = Segment(number, path, fd, size, view)
        self.segments.append(segment)
        return segment

    # -- writing -------------------------------------------------------------

    @property
    def active(self) -> Segment:
        return self.segments[-1]

    def room(self) -> int:
        return self.active.size - self.active.tail

    def append(self, frames: bytes) -> tuple[Segment, int]:
        """Write framed bytes at the active segment's tail; returns (segment, offset)."""
        segment = self.active
        offset = segment.tail
        if len(frames) > segment.size - offset:
            raise ValueError("append: frames do not fit the active segment (caller must roll)")
        self.files.pwrite(segment.fd, frames, offset)
        segment.tail = offset + len(frames)
        return segment, offset

    def sync(self) -> None:
        """fdatasync the active segment (its size never changes, so data sync suffices)."""
        self.files.fdatasync(self.active.fd)

    def cut(self, segment: Segment, offset: int) -> int:
        """Zero a torn tail from `offset` on; returns how many bytes were dropped.

        A torn tail is normally the unacknowledged part of the last batch, but
        a damaged byte in the last batch looks the same after a crash. So the
        dropped bytes are first copied, durably, to `NNNNNNNN.seg.torn-OFFSET`
        beside the segment: nothing is destroyed that an operator may want.
        """
        end = _segment.last_nonzero(segment.buffer, offset, segment.size)
        dropped = end - offset
        if dropped <= 0:
            segment.tail = offset
            return 0
        quarantine = f"{segment.path}.torn-{offset}"
        self.files.write_file(quarantine, bytes(segment.buffer[offset:end]))
        self.files.fsync_dir(self.directory)
        chunk = 1 << 20
        position = offset
        while position < end:
            length = min(chunk, end - position)
            self.files.pwrite(segment.fd, bytes(length), position)
            position += length
        self.files.fdatasync(segment.fd)
        segment.tail = offset
        return dropped

    # -- reading and teardown -----------------------------------------------

    def disk_bytes(self) -> int:
        return sum(s.size for s in self.segments)

    def used_bytes(self) -> int:
        return sum(s.tail for s in self.segments)

    def close(self) -> None:
        for segment in self.segments:
            segment.buffer.release()
            try:
                segment.view.close()
            except BufferError:
                pass  # a reader still holds a view; the mapping goes when it does
            self.files.close(segment.fd)
        self.segments = []
