"""Online, incremental backup: copy a consistent point of a store to a destination.

Owns: turning a Point (backup/point.py) into parts and a manifest
(backup/catalog.py) at a destination, copying only what the destination
lacks. The incremental rule: segments are append-only and sealed ones are
never written again, so for each segment the destination's newest manifest
already holds bytes [0, L); a backup copies only [L, length) as one new part
— a sealed segment it holds whole is not read at all, the segment that was
the tail last time is extended by its growth. Before extending, the bytes of
that segment's last part are read back from the store and their checksum
compared: if the store rewrote them (recovery after a crash set a torn tail
aside and new batches took its place) the whole segment is copied again as
new parts; the old parts stay for the older manifests that name them. Must
never: write a manifest before every part it names is stored, or rewrite a
part (each part's name carries its checksum).

Error handling: a destination that holds another store's backups, or a store
shorter than its backup, is refused (StemeError, nothing written); the
source's errors are point.py's.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from stemedb.backup import catalog
from stemedb.backup.catalog import Manifest
from stemedb.backup.objects import Objects, open_objects
from stemedb.backup.point import Extent, Point, capture
from stemedb.errors import StemeError

# (segment, start, end) -> [(batch end offset, commit µs), …] of the batches ending in (start, end]
CommitTimes = Callable[[int, int, int], Sequence[tuple[int, int]]]


@dataclass
class Copied:
    """What one backup or archive round wrote."""

    manifest: Manifest
    objects: int = 0
    bytes: int = 0
    recopied: list[int] = field(default_factory=list)   # segments copied again from 0


def backup(source: str, destination: str) -> Copied:
    """Back up the store in directory `source` (open or not) to `destination`; see the module doc."""
    objects = open_objects(destination)
    previous = _previous(objects)
    point = capture(source)
    copied = copy_point(point, objects, kind="backup", previous=previous)
    objects.put(copied.manifest.name, copied.manifest.encode())
    return copied


def _previous(objects: Objects) -> Manifest | None:
    if not catalog.manifest_names(objects):
        return None
    return catalog.newest(objects, objects.describe(""))


def copy_point(point: Point, objects: Objects, *, kind: str, previous: Manifest | None,
               commit_times: CommitTimes | None = None, name: str | None = None,
               trusted: bool = False) -> Copied:
    """Store the parts `point` needs beyond `previous` and return the manifest naming them all.

    The manifest itself is not written (the caller names it: a backup or archive.json).
    `trusted`: `previous` was made by this process from the store it holds open, which no
    recovery can have rewritten since, so its tail is extended without reading it back.
    """
    store = {"segment_size": point.segment_size, "created_us": point.created_us}
    if previous is not None and previous.document["store"] != store:
        raise StemeError(
            f"{objects.describe('')} holds backups of another store (created "
            f"{catalog.iso(int(previous.document['store']['created_us']))}, segments of "
            f"{previous.document['store']['segment_size']} bytes); give each store its own "
            "destination")
    held = {int(s["number"]): s for s in previous.segments} if previous is not None else {}
    copied = Copied(Manifest({}, name or catalog.backup_name(point.taken_us)))
    segments: list[dict[str, Any]] = []
    with _Uploads(objects) as uploads:
        for extent in point.extents:
            segments.append(_copy_segment(extent, held.get(extent.number), point, uploads, copied,
                                          commit_times, trusted))
    records = sum(int(p["records"]) for s in segments for p in s["parts"])
    digest = sum(catalog.digest_value(p["record_digest"]) for s in segments
                 for p in s["parts"]) % catalog.MODULUS
    copied.manifest.document = {
        "format": catalog.FORMAT, "kind": kind, "taken_us": point.taken_us,
        "store": store, "position": list(point.position), "records": records,
        "record_digest": catalog.digest_hex(digest), "segments": segments,
    }
    return copied


class _Uploads:
    """Parts written to the destination on a background thread, one in flight at a time.

    Writing part k (its bytes, then fsync — the destination's disk, or S3's
    network) overlaps reading part k+1 (checksum and frame walk), so a backup
    takes about the longer of the two rather than their sum. At most two
    parts are mapped at once. Leaving the `with` waits for the last write and
    raises the first error; a write that failed stops the next one starting.
    """

    def __init__(self, objects: Objects) -> None:
        self.objects = objects
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> _Uploads:
        return self

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        self._wait()
        if error is None and self._error is not None:
            raise self._error

    def _wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def exists(self, name: str) -> bool:
        return self.objects.exists(name)

    def describe(self, name: str) -> str:
        return self.objects.describe(name)

    def put(self, name: str, data: memoryview, release: Callable[[], None]) -> None:
        """Write `data` as object `name` in the background, then call `release` (it unmaps data)."""
        self._wait()
        if self._error is not None:
            release()
            raise self._error

        def run() -> None:
            try:
                self.objects.put(name, data)
            except BaseException as exc:  # raised in the caller's thread, at the next put or the end
                self._error = exc
            finally:
                release()

        self._thread = threading.Thread(target=run, name="stemedb-backup-write", daemon=True)
        self._thread.start()


def _copy_segment(extent: Extent, held: dict[str, Any] | None, point: Point, objects: _Uploads,
                  copied: Copied, commit_times: CommitTimes | None,
                  trusted: bool) -> dict[str, Any]:
    parts: list[dict[str, Any]] = []
    start = 0
    if held is not None:
        held_length = int(held["length"])
        if held_length > extent.length:
            raise StemeError(
                f"{extent.path}: the store holds {extent.length} bytes of this segment, the "
                f"backup at {objects.describe('')} already {held_length}; the store was "
                "restored to an earlier point, or lost unsynced bytes in a crash: back it up "
                "(or archive it) to a new destination")
        parts = [dict(p) for p in held["parts"]]
        if held_length < extent.length and parts and not trusted and \
                not _unchanged(extent.path, parts[-1]):
            copied.recopied.append(extent.number)
            parts = []
        start = sum(int(p["length"]) for p in parts)
    if start < extent.length:
        parts.append(_store_part(extent, start, point, objects, copied, commit_times))
    return {"number": extent.number, "length": extent.length, "sealed": extent.sealed,
            "version": extent.version, "parts": parts}


@contextlib.contextmanager
def _mapped(path: str, offset: int, length: int) -> Iterator[memoryview]:
    """Bytes [offset, offset+length) of a file as a read-only view of a mapping of it.

    No copy and no zero-filled buffer: the checksum, the frame walk and the
    destination's write all read the page cache through it (prefaulted in one
    pass with MAP_POPULATE). Segments only grow and their bytes below a
    durable point never change while a server appends, so the range is stable.
    """
    if length == 0:
        yield memoryview(b"")
        return
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if offset + length > size:
            raise StemeError(f"{path}: ended at {size} while it was being copied")
        base = offset - offset % mmap.ALLOCATIONGRANULARITY
        mapping = mmap.mmap(fd, offset + length - base, flags=mmap.MAP_SHARED | _POPULATE,
                            prot=mmap.PROT_READ, offset=base)
    finally:
        os.close(fd)
    view = memoryview(mapping)[offset - base:]
    try:
        yield view
    finally:
        view.release()
        mapping.close()


_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def _unchanged(path: str, part: dict[str, Any]) -> bool:
    with _mapped(path, int(part["offset"]), int(part["length"])) as data:
        return catalog.blake3_hex(data) == part["blake3"]


def _checksum_beside(data: memoryview, work: Callable[[], Any]) -> tuple[str, Any]:
    """(BLAKE3 of `data` in hex, work()), the hash computed on a second thread meanwhile.

    The hash releases the GIL, so it and the frame walk share the machine's
    cores instead of taking turns (a backup's two CPU passes over each part).
    """
    hashed: dict[str, Any] = {}

    def run() -> None:
        try:
            hashed["checksum"] = catalog.blake3_hex(data)
        except BaseException as exc:  # re-raised in the caller's thread
            hashed["error"] = exc

    thread = threading.Thread(target=run, name="stemedb-backup-hash", daemon=True)
    thread.start()
    try:
        result = work()
    finally:
        thread.join()
    if "error" in hashed:
        raise hashed["error"]
    return hashed["checksum"], result


def _store_part(extent: Extent, start: int, point: Point, objects: _Uploads, copied: Copied,
                commit_times: CommitTimes | None) -> dict[str, Any]:
    length = extent.length - start
    mapping = contextlib.ExitStack()
    with mapping:
        data = mapping.enter_context(_mapped(extent.path, start, length))
        checksum, (records, digest, batches_end) = _checksum_beside(
            data, lambda: catalog.part_contents(data, start, extent.frames_end(point.segment_size)))
        name = catalog.part_name(extent.number, start, checksum)
        if not objects.exists(name):
            objects.put(name, data, mapping.pop_all().close)   # the write unmaps it when done
            copied.objects += 1
            copied.bytes += length
    part: dict[str, Any] = {"object": name, "offset": start, "length": length,
                            "blake3": checksum, "records": records,
                            "record_digest": catalog.digest_hex(digest),
                            "batches_end": batches_end, "captured_us": point.taken_us,
                            "commits": None}
    if commit_times is not None:
        times = [list(pair) for pair in commit_times(extent.number, start, extent.length)]
        part["commits"] = times
    return part
