"""A consistent point of a store's log, found in its files while the store is being written.

Owns: reading a data directory's MANIFEST and segment files (never its LOCK:
a running server keeps the store open) and deciding how much of each
segment belongs to one consistent copy: every segment with a valid footer
whole, then the first unsealed segment up to the end of its last complete
batch (a batch frame and every record frame it counts, each passing its
CRC-32C), and nothing after it. Because segments are append-only and a
batch is never split over two segments, that is always a prefix of the
commit order: no half batch, nothing of a later batch without every earlier
one. Must never: write to the data directory or take its lock.

Resource handling: each segment file is opened read-only and mapped for the
duration of one look, then closed. Error handling: a missing MANIFEST or
segment file, or a damaged segment header, raises StemeError /
CorruptionError naming the file (a backup of a damaged store would restore
the damage; run `stemedb verify` first).
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from stemedb import _segment
from stemedb.engine.files import FileLayer
from stemedb.engine.manifest import read_manifest
from stemedb.engine.segments import MIN_SEGMENT_SIZE
from stemedb.errors import CorruptionError, StemeError

ATTEMPTS = 5   # looks at the files before giving up on a store that keeps sealing under us


@dataclass(frozen=True)
class Extent:
    """Bytes [0, length) of segment `number` belong to the point."""

    number: int
    path: str
    length: int
    sealed: bool      # the whole file, footer included
    version: int = _segment.SEGMENT_VERSION   # 1: no footer, frames may fill the whole file

    def frames_end(self, segment_size: int) -> int:
        """Where frames may end in this segment: the footer's place, or (version 1) the file's end."""
        return frames_end(self.version, segment_size)


def frames_end(version: int, segment_size: int) -> int:
    return segment_size - _segment.FOOTER_SIZE if version >= 2 else segment_size


@dataclass(frozen=True)
class Point:
    """A consistent prefix of a store's log (see the module doc)."""

    directory: str
    segment_size: int
    created_us: int
    extents: tuple[Extent, ...]
    taken_us: int

    @property
    def position(self) -> tuple[int, int]:
        """(segment, offset) just past the last byte of the point; (0, 0) for an empty store."""
        if not self.extents:
            return (0, 0)
        last = self.extents[-1]
        return (last.number, last.length)


def segment_name(number: int) -> str:
    return f"{number:08d}.seg"


def capture(directory: str, *, since: Point | None = None) -> Point:
    """The consistent point of the store in `directory` now.

    `since`, an earlier point of the same store, lets the look skip what it
    already established: its sealed segments are not re-read and its last
    segment is scanned from where that point ended.
    """
    files = FileLayer()
    manifest = read_manifest(files, directory, min_segment_size=MIN_SEGMENT_SIZE)
    if manifest is None:
        raise StemeError(f"{directory}: no StemeDB store here (no MANIFEST); give the data "
                         "directory of the store to back up")
    segments_dir = os.path.join(directory, "segments")
    for _ in range(ATTEMPTS):
        taken_us = time.time_ns() // 1000
        extents = _look(segments_dir, manifest.segment_size, manifest.newest_segment, since)
        if extents is not None:
            return Point(directory, manifest.segment_size, manifest.created_us, tuple(extents),
                         taken_us)
    raise StemeError(f"{directory}: a segment without a footer is followed by one holding frames "
                     f"at each of {ATTEMPTS} looks: either the store seals segments faster than a "
                     "backup can look (try again), or a footer was lost (run stemedb verify)")


def _look(segments_dir: str, segment_size: int, newest: int,
          since: Point | None) -> list[Extent] | None:
    """The extents of one look, or None if a segment was sealed while we looked (look again)."""
    numbers = sorted(int(name[:-4]) for name in _listdir(segments_dir)
                     if name.endswith(".seg") and name[:-4].isdigit())
    highest = max([*numbers, newest], default=-1)
    present = set(numbers)
    for number in range(highest + 1):
        if number not in present:
            raise StemeError(f"{os.path.join(segments_dir, segment_name(number))}: segment file "
                             "missing; restore it (docs/operations.md) before backing up, or "
                             "run stemedb verify")
    known = {e.number: e for e in since.extents} if since is not None else {}
    extents: list[Extent] = []
    for number in range(highest + 1):
        path = os.path.join(segments_dir, segment_name(number))
        earlier = known.get(number)
        if earlier is not None and earlier.sealed:
            extents.append(earlier)
            continue
        start = earlier.length if earlier is not None else 0
        extent, has_frames = _segment_extent(number, path, segment_size, start)
        if extent.sealed:
            extents.append(extent)
            continue
        # The first unsealed segment ends the point; a later one holding frames means it was
        # sealed (and written past) while we read it: look again.
        written_after = any(_starts_with_a_frame(os.path.join(segments_dir, segment_name(later)))
                            for later in range(number + 1, highest + 1))
        if written_after and extent.version < 2:   # sealed by position: version 1 has no footer
            extents.append(Extent(number, path, segment_size, True, extent.version))
            continue
        if written_after:
            return None
        extents.append(extent)   # (its header at least: a sealed predecessor names it)
        return extents
    return extents


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _segment_extent(number: int, path: str, segment_size: int, start: int) -> tuple[Extent, bool]:
    """(the extent of one segment file, whether it holds any frame)."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size != segment_size:
            raise CorruptionError(f"{path}: {size} bytes, the store's segments have {segment_size}; "
                                  "run stemedb verify", path=path, offset=0)
        with mmap.mmap(handle.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ) as mapped:
            buffer = memoryview(mapped)
            try:
                try:
                    header_number, _, _, version = _segment.parse_segment_header(
                        buffer[:_segment.HEADER_SIZE])
                except ValueError as exc:
                    raise CorruptionError(f"{path}: {exc}; run stemedb verify", path=path,
                                          offset=0) from None
                if header_number != number:
                    raise CorruptionError(f"{path}: its header says segment {header_number}",
                                          path=path, offset=0)
                frame_end = frames_end(version, size)
                if version >= 2 and _footer(buffer, size, path) is not None:
                    return Extent(number, path, size, True, version), True
                end = complete_batches_end(buffer, max(start, _segment.HEADER_SIZE), frame_end)
                return Extent(number, path, end, False, version), end > _segment.HEADER_SIZE
            finally:
                buffer.release()


def _starts_with_a_frame(path: str) -> bool:
    """Whether a segment after the first unsealed one has been written to (a spare has not:
    writing a segment always starts right after its header)."""
    with open(path, "rb") as handle:
        head = os.pread(handle.fileno(), _segment.FRAME_HEADER, _segment.HEADER_SIZE)
    return any(head)


def _footer(buffer: memoryview, size: int, path: str) -> dict[str, int] | None:
    try:
        return _segment.parse_segment_footer(buffer[size - _segment.FOOTER_SIZE:size])
    except ValueError as exc:   # a backup would copy the damage, and its restore not verify
        raise CorruptionError(f"{path}: {exc}; run stemedb verify and repair the store before "
                              "backing it up", path=path, offset=size - _segment.FOOTER_SIZE) from None


def complete_batches_end(buffer: memoryview, start: int, end: int) -> int:
    """Offset just past the last complete batch in buffer[start:end] (`start` if none).

    `start` must be a frame boundary (the header's end or an earlier batch end).
    """
    last = start
    for run in frame_runs(buffer, start, end):
        types, positions = run["types"], run["positions"]
        for position in positions[types == _segment.BATCH].tolist():
            _, _, batch_bytes = _segment.batch_info(buffer, position)
            if position + batch_bytes <= run["stop"]:
                last = max(last, position + batch_bytes)
    return last


def frame_runs(buffer: memoryview, start: int, end: int) -> Iterator[dict[str, np.ndarray]]:
    """The scans of buffer[start:end], resuming after zeros or damage at the next valid frame."""
    position = start
    while position < end:
        run = _segment.scan(buffer, position, end)
        yield run
        position = _segment.find_frame(buffer, run["stop"] + _segment.ALIGN, end)
        if position < 0:
            return
