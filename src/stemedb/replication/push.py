"""Push replication: one bounded queue per peer, drained by `window` trio tasks.

Owns: `PushQueue` — the batches waiting for one peer (bounded by records and
by bytes, counting those sent but not confirmed yet), `offer()` that never
blocks (a batch that does not fit is dropped and counted: anti-entropy
repairs what push dropped), the senders that hand the batches at the head of
the queue to an injected async `send(batch)` — coalesced into one push of at
most `coalesce_records` records and `coalesce_bytes` bytes, so a queue that
fell behind catches up in few round trips (one fsync on the peer each), and
up to `window` pushes in flight at once, so a batch queued while a push is
on its way does not wait for its answer (the peer commits both in one group
commit when they meet) — each retrying with backoff while the peer is up or
suspect and suspended while it is down, and the figures metrics read
(depth, lag, dropped, sent, refused; the push delay — enqueued to confirmed
by the peer — of the last DELAY_SAMPLES batches sent, with its two parts,
the wait in the queue and the push's round trip, as p50 / p99). Must never: block
a local write, hold records that were not durable here first (the caller
offers only durable batches), or retry a batch the peer refused as invalid.

Resource handling: the queue holds encoded records in memory, at most
`max_bytes` of them. `offer()` and the peer_up/peer_down calls must run on the
trio thread that runs `run()`.
Error handling: `send` raising SignatureError, InvalidRecord or ProtocolError
means the peer refused the batch for good: it is dropped, counted and logged
(a refused coalesced push is sent again batch by batch, so only the batch the
peer refuses is dropped).
StemeError, OSError, trio stream errors and timeouts are transient: the
sender keeps the batch and sends it again after a backoff (the other senders
go on with the batches behind it: records form a set, their order does not
matter to the peer). A sender cancelled with a push unconfirmed puts its
batches back at the head of the queue.
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
    seq: int = 0            # the order it was queued in (set by offer)

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
    window: int = 2                 # pushes in flight to the peer at once
    stats: PushStats = field(default_factory=PushStats)

    def __post_init__(self) -> None:
        if self.max_records < 1 or self.max_bytes < 1 or self.window < 1:
            raise ValueError(f"push queue for {self.peer}: bounds and window must be positive")
        self._batches: deque[PushBatch] = deque()
        self._flying: list[PushBatch] = []   # sent, not confirmed yet (still counted as held)
        self._offered = 0
        self._records = 0
        self._bytes = 0
        self._down = True                 # until the peer is first heard from
        self._wakeup: trio.Event | None = None
        self.delays: deque[float] = deque(maxlen=DELAY_SAMPLES)
        self.waits: deque[float] = deque(maxlen=DELAY_SAMPLES)    # enqueued → its push began
        self.sends: deque[float] = deque(maxlen=DELAY_SAMPLES)    # one push's round trip

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
        self._offered += 1
        batch.seq = self._offered
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
        return len(self._batches) + len(self._flying)

    @property
    def depth_records(self) -> int:
        return self._records

    @property
    def depth_bytes(self) -> int:
        return self._bytes

    def lag(self) -> float:
        """Seconds the oldest batch not confirmed yet has waited (0 when none is held).

        Batches are taken from the head in queue order, so the first one in
        flight (if any) is older than every queued one, and the queue's head
        older than the rest of the queue."""
        if self._flying:
            return self.clock() - self._flying[0].enqueued_at
        return self.clock() - self._batches[0].enqueued_at if self._batches else 0.0

    def delay_quantiles(self) -> tuple[float, float] | None:
        """(p50, p99) in seconds of the push delays kept (enqueued → the peer confirmed durable);
        None before the first batch was sent."""
        return sample_quantiles(self.delays)

    def figures(self) -> dict[str, float | int | None]:
        quantiles = self.delay_quantiles()
        waits, sends = sample_quantiles(self.waits), sample_quantiles(self.sends)
        return {"depth_batches": self.depth_batches, "depth_records": self.depth_records,
                "depth_bytes": self.depth_bytes, "lag_seconds": self.lag(),
                "delay_p50_seconds": quantiles[0] if quantiles else None,
                "delay_p99_seconds": quantiles[1] if quantiles else None,
                "delay_samples": len(self.delays),
                "wait_p99_seconds": waits[1] if waits else None,
                "send_p50_seconds": sends[0] if sends else None,
                "send_p99_seconds": sends[1] if sends else None,
                "dropped_records": self.stats.dropped_records, "sent_records": self.stats.sent_records,
                "refused_records": self.stats.refused_records, "send_failures": self.stats.send_failures}

    # ---------------------------------------------------------------- drain

    async def run(self, send: Send) -> None:
        """Drain the queue forever through `send`, with up to `window` pushes in flight at once
        (run it in the node's nursery)."""
        async with trio.open_nursery() as nursery:
            for _ in range(self.window):
                nursery.start_soon(self._drain, send)

    async def _drain(self, send: Send) -> None:
        """One sender: takes the batches at the head, pushes them, and takes the next."""
        while True:
            while not self._batches or self._down:
                await self._sleep_until_woken()
            group = [self._batches.popleft() for _ in range(self._coalescible())]
            self._flying.extend(group)
            try:
                await self._deliver(send, group)
            except BaseException:
                # Cancelled (the node stops, the peer left the file): what was not confirmed
                # goes back to the head of the queue, as it was.
                unsent = [b for b in group if any(b is f for f in self._flying)]
                for batch in unsent:              # still counted in the bounds: only moved back
                    self._land(batch)
                self._batches = deque(sorted([*unsent, *self._batches], key=lambda b: b.seq))
                raise

    async def _deliver(self, send: Send, group: list[PushBatch]) -> None:
        """Push `group` until the peer confirmed or refused it: a transient failure is retried
        after a backoff that doubles up to retry_max, not while the peer is down."""
        delay = self.retry_initial
        while True:
            while self._down:
                await self._sleep_until_woken()
            try:
                await self._push(send, group)
                return
            except TRANSIENT as exc:
                self.stats.send_failures += 1
                log.debug("push to %s failed (%s); retry in %.2f s", self.peer, exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, self.retry_max)

    async def _push(self, send: Send, group: list[PushBatch]) -> None:
        """One push of `group`; refused for good as a whole, it is sent again batch by batch
        so that only the batch the peer refuses is dropped."""
        pushed = group[0] if len(group) == 1 else PushBatch(concat([b.batch for b in group]),
                                                            group[0].enqueued_at)
        began = self.clock()
        try:
            await send(pushed)
        except PERMANENT as exc:
            if len(group) > 1:
                for batch in group:
                    await self._deliver(send, [batch])
                return
            self._done(group)
            self.stats.refused_batches += 1
            self.stats.refused_records += pushed.records
            log.warning("push to %s: the peer refused %d records, dropped: %s", self.peer,
                        pushed.records, exc)
            return
        now = self.clock()
        self._done(group)
        self.delays.extend(now - b.enqueued_at for b in group)
        self.waits.extend(began - b.enqueued_at for b in group)
        self.sends.append(now - began)
        self.stats.sent_batches += len(group)
        self.stats.sent_records += pushed.records

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

    def _done(self, group: list[PushBatch]) -> None:
        """The peer confirmed (or refused) these in-flight batches: they leave the queue."""
        for batch in group:
            self._land(batch)
            self._records -= batch.records
            self._bytes -= batch.size

    def _land(self, batch: PushBatch) -> None:
        for index, flying in enumerate(self._flying):
            if flying is batch:
                del self._flying[index]
                return

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    async def _sleep_until_woken(self) -> None:
        """Wait for the next offer or peer_up (every sender waiting wakes)."""
        if self._wakeup is None:
            self._wakeup = trio.Event()
        await self._wakeup.wait()


def sample_quantiles(samples: deque[float]) -> tuple[float, float] | None:
    """(p50, p99) of `samples`; None when there are none."""
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[math.ceil(0.5 * len(ordered)) - 1], ordered[math.ceil(0.99 * len(ordered)) - 1]
