"""Continuous archival: the server copies its log to a directory or S3 as it grows.

Owns: `CommitClock`, a write listener (engine/view.py) that records the end
offset and commit time (µs, taken when the batch is durable and indexed,
just before its writers are acknowledged) of every batch, which
point-in-time restore cuts by; and `Archiver`, which every `interval`
seconds copies what is new — sealed segments whole, the active segment up
to the last batch the clock has seen (acknowledged, never a half batch) —
as parts to the archive (backup/copy.py, the same incremental rule and
layout as a backup) and then replaces `archive.json` with the manifest of
everything archived. Its status feeds stemedb_archive_lag_seconds (the age
of the oldest acknowledged batch not archived yet; 0 when caught up),
stemedb_archive_last_success_timestamp_seconds, stemedb_archived_bytes_total
and stemedb_archive_failures_total (server/metrics.py).

Must never: block the write path (the listener appends to a list), or let a
failing archive stop the server (a failed round is logged, counted, and
retried at the next interval: the lag grows and the StemeDBArchiveLag alert
fires). What a restore can lose is bounded by the interval plus one round's
upload time: a batch acknowledged after the last archive.json was written.

Resource handling: one worker thread at a time runs a round (trio.to_thread);
the listener is unsubscribed by `close()`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import trio

from stemedb import _segment
from stemedb.backup import catalog
from stemedb.backup.catalog import Manifest
from stemedb.backup.copy import Copied, copy_point
from stemedb.backup.objects import open_objects
from stemedb.backup.point import Extent, Point, capture
from stemedb.engine.database import Database
from stemedb.server.metrics import ArchiveStatus

log = logging.getLogger("stemedb.archive")


class CommitClock:
    """(segment, batch end offset, commit µs) of each batch since it subscribed, oldest first.

    While the archive is unreachable the entries pile up; past `limit` every other one is
    dropped (the oldest and the newest kept). A dropped batch then reads as committed at the
    next kept batch's time, later than it was: a point-in-time restore may leave it out
    but never includes a batch committed after the time asked for.
    """

    limit = 1_000_000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: list[tuple[int, int, int]] = []
        self._last: tuple[int, int] | None = None    # kept when the entries are forgotten

    def __call__(self, record_numbers: np.ndarray, columns: Mapping[str, np.ndarray]) -> None:
        now = time.time_ns() // 1000
        location = int(columns["location"][-1])
        end = (location & 0xFFFFFFFF) + _segment.frame_size(int(columns["length"][-1]))
        with self._lock:
            self._entries.append((location >> 32, end, now))
            self._last = (location >> 32, end)
            if len(self._entries) > self.limit:
                self._entries = self._entries[:-1:2] + self._entries[-1:]

    def last(self) -> tuple[int, int] | None:
        """(segment, end) of the newest batch seen."""
        with self._lock:
            return self._last

    def times(self, segment: int, start: int, end: int) -> list[tuple[int, int]]:
        with self._lock:
            return [(e, us) for s, e, us in self._entries if s == segment and start < e <= end]

    def forget(self, position: tuple[int, int]) -> None:
        """Drop the batches at or before `position` (archived)."""
        with self._lock:
            self._entries = [x for x in self._entries if (x[0], x[1]) > position]

    def oldest_after(self, position: tuple[int, int]) -> int | None:
        with self._lock:
            return next((us for s, e, us in self._entries if (s, e) > position), None)


class Archiver:
    """Archives one open store to `url` every `interval` seconds (see the module doc)."""

    def __init__(self, db: Database, url: str, interval: float) -> None:
        self.db = db
        self.url = url
        self.interval = interval
        self.objects = open_objects(url)
        self.clock = CommitClock()
        db.view.subscribe(self.clock)
        # What is in the files now was committed before this server acknowledged anything.
        self.started = capture(db.path)
        self.point: Point | None = None
        self.previous: Manifest | None = None
        # Read in the first round: an unreachable archive fails a round, never the server's start.
        self._read_previous = False
        self.archived: tuple[int, int] = (-1, 0)
        self.last_success: float | None = None
        self.archived_bytes = 0
        self.failures = 0
        self._round_lock = threading.Lock()

    def close(self) -> None:
        self.db.view.unsubscribe(self.clock)

    def round(self) -> Copied | None:
        """Archive what is new; returns what was written (None: nothing new)."""
        with self._round_lock:
            if not self._read_previous:
                if catalog.manifest_names(self.objects):
                    self.previous = catalog.newest(self.objects, self.url)
                self._read_previous = True
            point = _trim(capture(self.db.path, since=self.point),
                          max(self.started.position, self.clock.last() or (0, 0)))
            if self.previous is not None and self.point is not None and \
                    point.extents == self.point.extents:
                self.last_success = time.time()
                return None
            copied = copy_point(point, self.objects, kind="archive", previous=self.previous,
                                commit_times=self.clock.times, name=catalog.ARCHIVE,
                                trusted=self.point is not None)
            self.objects.put(catalog.ARCHIVE, copied.manifest.encode())
            self.previous, self.point = copied.manifest, point
            self.archived = point.position
            self.clock.forget(point.position)
            self.archived_bytes += copied.bytes
            self.last_success = time.time()
            return copied

    def status(self) -> ArchiveStatus:
        oldest = self.clock.oldest_after(self.archived)
        lag = max(0.0, time.time() - oldest / 1e6) if oldest is not None else 0.0
        return ArchiveStatus(lag_seconds=lag, last_success_unix=self.last_success,
                             archived_bytes=self.archived_bytes, failures=self.failures)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Archive every interval until cancelled (then once more, for what is left)."""
        task_status.started()
        try:
            while True:
                await self._round_in_thread()
                await trio.sleep(self.interval)
        finally:
            with trio.CancelScope(shield=True):
                await self._round_in_thread()

    async def _round_in_thread(self) -> None:
        try:
            await trio.to_thread.run_sync(self.round)
        except Exception as exc:   # logged, counted, retried: archival never stops the server
            self.failures += 1
            log.error("archive round to %s failed: %s", self.url, exc)


def _trim(point: Point, limit: tuple[int, int]) -> Point:
    """`point` without anything past `limit` (segment, offset): the acknowledged batches only."""
    number, offset = limit
    kept: list[Extent] = []
    for extent in point.extents:
        if extent.number < number:
            kept.append(extent)
        elif extent.number == number:
            if extent.length > offset and offset >= _segment.HEADER_SIZE:
                extent = Extent(extent.number, extent.path, offset, False)
            kept.append(extent)
            break
    return Point(point.directory, point.segment_size, point.created_us, tuple(kept),
                 point.taken_us)
