"""Group commit: many writers, one append and one fdatasync per batch.

Owns: the queue of pending writes, leader election (the LevelDB way: the
first waiting writer becomes the leader, takes everything queued, writes it,
syncs once, then wakes everyone it served), batch-size and fsync-latency
metrics, and the poisoned state after a failed sync. What the leader writes
is engine/writes.py's business: this module only schedules it. Must never: acknowledge a
write before the fdatasync that covers it returned successfully, or retry a
failed fsync (after "fsyncgate" a failed fsync means the page cache may
already have dropped the data).

Error handling: the leader's exception is delivered to every writer of its
batch, so a writer must have its own input checked before it submits
(engine/verify.py and WritePath.check_fits do: nothing that depends on one
writer's records may fail in the leader). A failed write or sync poisons the committer: every later submit
raises DurabilityError until the store is closed and reopened.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from stemedb.errors import DurabilityError

Work = TypeVar("Work")


class Pending(Generic[Work]):
    """One writer's contribution to a group commit: its work, then its outcome.

    A plain slotted class: one is made per write call, so its cost is on the
    hot path of every small durable write.
    """

    __slots__ = ("work", "done", "error", "result", "wakeup")

    def __init__(self, work: Work) -> None:
        self.work = work                # what the leader writes for this writer
        self.done = False
        self.error: BaseException | None = None
        self.result: Any = None
        # Held while the writer waits; whoever serves it (or hands it leadership)
        # releases it. One raw lock per writer wakes exactly that writer, where a
        # shared Condition.notify_all would wake all of them to re-check.
        self.wakeup = threading.Lock()


class Metrics:
    """Counters for db.stats() (and, later, Prometheus)."""

    BUCKETS_MS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 1000, float("inf"))

    def __init__(self) -> None:
        self.batches = 0
        self.records_written = 0
        self.bytes_written = 0
        self.fsyncs = 0
        self.fsync_seconds = 0.0
        self.fsync_histogram = [0] * len(self.BUCKETS_MS)
        self.batch_writers_max = 0
        self.writers_committed = 0          # writers served by batches that wrote something
        self.batch_records_max = 0
        self.write_errors = 0

    def observe_fsync(self, seconds: float) -> None:
        self.fsyncs += 1
        self.fsync_seconds += seconds
        ms = seconds * 1000
        for i, bound in enumerate(self.BUCKETS_MS):
            if ms <= bound:
                self.fsync_histogram[i] += 1
                break

    def as_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "records_written": self.records_written,
            "bytes_written": self.bytes_written,
            "fsyncs": self.fsyncs,
            "fsync_mean_ms": 1000 * self.fsync_seconds / self.fsyncs if self.fsyncs else 0.0,
            "fsync_histogram_ms": {str(b): c for b, c in zip(self.BUCKETS_MS, self.fsync_histogram)},
            "mean_writers_per_batch": self.writers_committed / self.batches if self.batches else 0.0,
            "mean_records_per_batch": self.records_written / self.batches if self.batches else 0.0,
            "max_writers_per_batch": self.batch_writers_max,
            "max_records_per_batch": self.batch_records_max,
            "write_errors": self.write_errors,
        }


class GroupCommit(Generic[Work]):
    """Serialises writes into batches; `write_group` does the I/O for one batch."""

    def __init__(self, write_group: Callable[[list[Pending[Work]]], None]) -> None:
        self._write_group = write_group
        self._lock = threading.Lock()
        self._queue: list[Pending[Work]] = []
        self._leader_active = False
        self.failure: DurabilityError | None = None

    def poison(self, error: DurabilityError) -> None:
        with self._lock:
            if self.failure is None:
                self.failure = error

    def while_healthy(self, action: Callable[[], None]) -> None:
        """Run `action` unless the committer is poisoned, with no poisoning meanwhile."""
        with self._lock:
            if self.failure is None:
                action()

    def submit(self, pending: Pending[Work]) -> Any:
        """Queue `pending` and return once it is durable (or raise why it is not).

        The first writer to find no leader becomes the leader: it takes the
        whole queue, writes and syncs it once, wakes each writer it served,
        and hands leadership to the first writer that queued meanwhile (which
        is woken with its record not yet written).
        """
        pending.wakeup.acquire()  # held from here; a second acquire waits for a release
        with self._lock:
            if self.failure is not None:
                raise DurabilityError(f"store refuses writes after an earlier failure: {self.failure}")
            self._queue.append(pending)
            leading = not self._leader_active
            self._leader_active = True
        if not leading:
            pending.wakeup.acquire()
        if not pending.done:
            self._lead_once(pending)
        if pending.error is not None:
            raise pending.error
        return pending.result

    def _lead_once(self, pending: Pending[Work]) -> None:
        """Serve the whole queue (which includes `pending`), then hand over or step down."""
        with self._lock:
            group, self._queue = self._queue, []
        self._lead(group)
        for served in group:
            if served is not pending:
                served.wakeup.release()
        with self._lock:
            if self._queue:
                self._queue[0].wakeup.release()  # the next leader; still queued, not done
            else:
                self._leader_active = False

    def _lead(self, group: list[Pending[Work]]) -> None:
        error: BaseException | None
        if self.failure is not None:
            error = DurabilityError(
                f"store refuses writes after an earlier failure: {self.failure}")
        else:
            try:
                self._write_group(group)
                error = None
            except BaseException as exc:  # delivered to every writer of the batch
                error = exc
        for pending in group:
            if error is not None and pending.error is None:
                pending.error = error
            pending.done = True
