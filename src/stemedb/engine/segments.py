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
    view: mmap.mmap
    tail: int = _segment.HEADER_SIZE  # next free offset (frames are appended here)
    sealed: bool = False
    dirty_until: int = 0  # end of a failed write's range past the tail (zeroed by the next write)
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
        # Segments after the active one are spares: created ahead of a batch
        # that needs them, so that a StorageFull refuses the batch before any
        # of it is written.
        self.active_number = 0

    # -- opening -------------------------------------------------------------

    def open_existing(self) -> None:
        """Map every segment file found.

        The active segment is the last one holding data; later ones are empty
        spares. A `.seg.tmp` file is a segment whose creation never finished
        (nothing in it was ever acknowledged): it is removed.
        """
        self.files.makedirs(self.directory)
        listing = self.files.listdir(self.directory)
        for name in listing:
            if name.endswith(".seg.tmp"):
                self.files.remove(os.path.join(self.directory, name))
        names = [n for n in listing if n.endswith(".seg")]  # not .seg.tmp, not .torn-*
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
        self.active_number = 0
        for segment in reversed(self.segments):
            if bytes(segment.view[_segment.HEADER_SIZE:_segment.HEADER_SIZE + 4]) != bytes(4):
                self.active_number = segment.number
                break
        for segment in self.segments[self.active_number:]:
            segment.sealed = False

    def create_segment(self) -> Segment:
        """Create, preallocate and durably name the next segment (a spare until rolled into).

        It is built as `NNNNNNNN.seg.tmp` and renamed only after its header is
        synced, then the directory is synced: a crash leaves either no segment
        or a complete one, never a headerless file that would block opening.
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

    def prepare(self, count: int) -> None:
        """Make sure `count` spare segments exist after the active one."""
        while len(self.segments) - 1 - self.active_number < count:
            self.create_segment()

    def roll(self) -> Segment:
        """Seal the active segment and continue in the next (spare) one."""
        self.prepare(1)
        self.active.sealed = True
        self.active_number += 1
        return self.active

    # -- writing -------------------------------------------------------------

    @property
    def active(self) -> Segment:
        return self.segments[self.active_number]

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
