"""Push replication: one bounded queue per peer, drained by one trio task.

Owns: `PushQueue` — the batches waiting for one peer (bounded by records and
by bytes), `offer()` that never blocks (a batch that does not fit is dropped
and counted: anti-entropy repairs what push dropped), the drain task that
hands the batches at the head of the queue to an injected async
`send(batch)` — coalesced into one push of at most `coalesce_records`
records and `coalesce_bytes` bytes, so a queue that fell behind catches up
in few round trips (one fsync on the peer each) — retrying with backoff
while the peer is up or suspect and suspended while it is down, and the
figures metrics read (depth, lag, dropped, sent, refused, and the push
delay — enqueued to confirmed by the peer — of the last DELAY_SAMPLES
batches sent, as p50 / p99). Must never: block
a local write, hold records that were not durable here first (the caller
offers only durable batches), or retry a batch the peer refused as invalid.

Resource handling: the queue holds encoded records in memory, at most
`max_bytes` of them. `offer()` and the peer_up/peer_down calls must run on the
trio thread that runs `run()`.
Error handling: `send` raising SignatureError, InvalidRecord or ProtocolError
means the peer refused the batch for good: it is dropped, counted and logged
(a refused coalesced push is sent again batch by batch, so only the batch the
peer refuses is dropped).
StemeError, OSError, trio stream errors and timeouts are transient: the batch
stays at the head of the queue and is sent again after a backoff.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from stemedb.errors import InvalidRecord, ProtocolError, SignatureError, StemeError
from stemedb.replication.framing import RecordBatch, concat

log = logging.getLogger("stemedb.replication")

PERMANENT = (SignatureError, InvalidRecord, ProtocolError)
DELAY_SAMPLES = 10_000      # push delays kept for the p50 / p99 figures (the most recent ones)
TRANSIENT = (StemeError, OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError)


@dataclass
class PushBatch:
    """Records that became durable here, waiting to be sent to one peer."""

    batch: RecordBatch
    enqueued_at: float = 0.0

    @property
    def records(self) -> int:
        return len(self.batch)

    @property
    def size(self) -> int:
        return self.batch.size


@dataclass
class PushStats:
    offered_records: int = 0
    dropped_batches: int = 0
    dropped_records: int = 0
    sent_batches: int = 0
    sent_records: int = 0
    refused_batches: int = 0
    refused_records: int = 0
    send_failures: int = 0


Send = Callable[[PushBatch], Awaitable[object]]


@dataclass
class PushQueue:
    """The push queue of one peer."""

    peer: str
    max_records: int = 100_000
    max_bytes: int = 64 << 20
    clock: Callable[[], float] = trio.current_time
    retry_initial: float = 0.05     # seconds before the first retry; doubles up to retry_max
    retry_max: float = 2.0
    coalesce_records: int = 4096    # one push carries at most this many records ...
    coalesce_bytes: int = 4 << 20   # ... and this many bytes (a larger batch goes alone)
    stats: PushStats = field(default_factory=PushStats)

    def __post_init__(self) -> None:
        if self.max_records < 1 or self.max_bytes < 1:
            raise ValueError(f"push queue for {self.peer}: bounds must be positive")
        self._batches: deque[PushBatch] = deque()
        self._records = 0
        self._bytes = 0
        self._down = True                 # until the peer is first heard from
        self._wakeup: trio.Event | None = None
        self.delays: deque[float] = deque(maxlen=DELAY_SAMPLES)

    # ------------------------------------------------------------ producers

    def offer(self, batch: PushBatch) -> bool:
        """Queue `batch` if it fits; False (and counted as dropped) if it does not."""
        self.stats.offered_records += batch.records
        if (self._records + batch.records > self.max_records
                or self._bytes + batch.size > self.max_bytes):
            self.stats.dropped_batches += 1
            self.stats.dropped_records += batch.records
            return False
        batch.enqueued_at = self.clock()
        self._batches.append(batch)
        self._records += batch.records
        self._bytes += batch.size
        self._wake()
        return True

    def peer_up(self) -> None:
        self._down = False
        self._wake()

    def peer_down(self) -> None:
        self._down = True

    # -------------------------------------------------------------- figures

    @property
    def depth_batches(self) -> int:
        return len(self._batches)

    @property
    def depth_records(self) -> int:
        return self._records

    @property
    def depth_bytes(self) -> int:
        return self._bytes

    def lag(self) -> float:
        """Seconds the oldest queued batch has waited (0 when empty)."""
        return self.clock() - self._batches[0].enqueued_at if self._batches else 0.0

    def delay_quantiles(self) -> tuple[float, float] | None:
        """(p50, p99) in seconds of the push delays kept (enqueued → the peer confirmed durable);
        None before the first batch was sent."""
        if not self.delays:
            return None
        ordered = sorted(self.delays)
        return ordered[math.ceil(0.5 * len(ordered)) - 1], ordered[math.ceil(0.99 * len(ordered)) - 1]

    def figures(self) -> dict[str, float | int | None]:
        quantiles = self.delay_quantiles()
        return {"depth_batches": self.depth_batches, "depth_records": self.depth_records,
                "depth_bytes": self.depth_bytes, "lag_seconds": self.lag(),
                "delay_p50_seconds": quantiles[0] if quantiles else None,
                "delay_p99_seconds": quantiles[1] if quantiles else None,
                "delay_samples": len(self.delays),
                "dropped_records": self.stats.dropped_records, "sent_records": self.stats.sent_records,
                "refused_records": self.stats.refused_records, "send_failures": self.stats.send_failures}

    # ---------------------------------------------------------------- drain

    async def run(self, send: Send) -> None:
        """Drain the queue forever through `send` (run it in the node's nursery)."""
        delay = self.retry_initial
        alone = 0    # after a refused coalesced push: batches to send one at a time
        while True:
            while not self._batches or self._down:
                await self._sleep_until_woken()
            count = 1 if alone else self._coalescible()
            group = [self._batches[i] for i in range(count)]
            pushed = group[0] if count == 1 else PushBatch(concat([b.batch for b in group]),
                                                          group[0].enqueued_at)
            try:
                await send(pushed)
            except PERMANENT as exc:
                if count > 1:
                    alone = count     # find the batch the peer refuses: one at a time
                    continue
                self._pop(1)
                alone = max(0, alone - 1)
                self.stats.refused_batches += 1
                self.stats.refused_records += pushed.records
                log.warning("push to %s: the peer refused %d records, dropped: %s", self.peer,
                            pushed.records, exc)
            except TRANSIENT as exc:
                self.stats.send_failures += 1
                log.debug("push to %s failed (%s); retry in %.2f s", self.peer, exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, self.retry_max)
                continue
            else:
                self._pop(count)
                alone = max(0, alone - 1)
                now = self.clock()
                self.delays.extend(now - b.enqueued_at for b in group)
                self.stats.sent_batches += count
                self.stats.sent_records += pushed.records
            delay = self.retry_initial

    def _coalescible(self) -> int:
        """How many batches from the head go in the next push (at least one)."""
        count, records, size = 0, 0, 0
        for queued in self._batches:
            records += queued.records
            size += queued.size
            if count and (records > self.coalesce_records or size > self.coalesce_bytes):
                break
            count += 1
        return count

    def _pop(self, count: int) -> None:
        for _ in range(count):
            batch = self._batches.popleft()
            self._records -= batch.records
            self._bytes -= batch.size

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    async def _sleep_until_woken(self) -> None:
        self._wakeup = trio.Event()
        await self._wakeup.wait()
        self._wakeup = None
