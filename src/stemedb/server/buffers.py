"""Memory the server holds for its clients: the buffer budget and each connection's answer queue.

Owns: `BufferBudget` — two byte pools shared by every connection of both
doors: *requests* (bytes received and not yet finished with: partial frames,
HTTP bodies, payloads of requests being served) and *answers* (bytes of
answers built and not yet written to a socket); together they are
`limits.buffer_budget`, half each — and the per-connection accounts that
draw on them: `InputAccount` (one connection's request bytes) and
`OutputQueue` (one connection's answers waiting for its socket, at most
`limits.output_buffer` bytes). Waiting for a pool is the backpressure: a
reader that cannot reserve stops reading its socket (TCP then slows the
client), a request task that cannot reserve waits before it builds its next
answer frame.

Must never: make small requests or answers wait for a pool. Each connection
has a fixed allowance outside the pools (FREE_INPUT of requests, FREE_OUTPUT
of answers), so a client sending pings while others exhaust the budget is not
delayed by them. Must never block the event loop: everything here is
arithmetic plus trio events.

Resource handling: every byte taken from a pool is given back exactly once —
when a request is finished, an answer frame is written, a waiter is
cancelled, or the connection ends (`InputAccount.close`, `OutputQueue.discard`).
Pools are served in arrival order, so a large reservation is not starved by
a stream of small ones.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import trio

FREE_INPUT = 64 * 1024      # request bytes a connection may hold without the budget
FREE_OUTPUT = 64 * 1024     # answer bytes a connection may queue without the budget
RESERVE_STEP = 256 * 1024   # request bytes reserved at a time while a large frame arrives
COALESCE_BYTES = 256 * 1024  # small frames joined into one send at most
SEND_SLICE = 256 * 1024     # large answers are written in slices; each must go within send_timeout
COALESCE_FRAMES = 256


class _Waiter:
    __slots__ = ("size", "event", "granted")

    def __init__(self, size: int) -> None:
        self.size = size
        self.event = trio.Event()
        self.granted = False


class BytePool:
    """Bytes handed out up to `capacity`, first come first served; `take` waits for room."""

    def __init__(self, name: str, capacity: int) -> None:
        self.name = name
        self.capacity = capacity
        self.used = 0
        self.peak = 0
        self.waits = 0            # takes that had to wait, since start
        self._waiters: deque[_Waiter] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def take(self, size: int) -> int:
        """Reserve `size` bytes, waiting for room (behind earlier waiters); returns `size`.

        Limits.check_budget keeps every frame and body within a pool's
        capacity; a caller with something larger reserves the capacity.
        """
        if size > self.capacity:
            raise ValueError(f"{self.name} pool: {size} bytes asked, the capacity is {self.capacity}")
        if not self._waiters and self.used + size <= self.capacity:
            self._grant(size)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return size
        waiter = _Waiter(size)
        self._waiters.append(waiter)
        self.waits += 1
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:  # granted, then cancelled before it could use them
                self.give(size)
            else:
                self._waiters.remove(waiter)
                self._wake()  # it may have been the head of the line
            raise
        return size

    def force(self, size: int) -> None:
        """Count bytes that are already held and cannot wait (a final error frame, a race)."""
        self._grant(size)

    def give(self, size: int) -> None:
        self.used -= size
        assert self.used >= 0, f"{self.name} pool: gave back more than was taken"
        self._wake()

    def _grant(self, size: int) -> None:
        self.used += size
        self.peak = max(self.peak, self.used)

    def _wake(self) -> None:
        while self._waiters and self.used + self._waiters[0].size <= self.capacity:
            waiter = self._waiters.popleft()
            waiter.granted = True
            self._grant(waiter.size)
            waiter.event.set()

    def describe(self) -> dict[str, int]:
        return {"capacity": self.capacity, "used": self.used, "peak": self.peak,
                "waiting": self.waiting, "waits": self.waits}


class BufferBudget:
    """The server-wide budget: `total` bytes, half for requests and half for answers."""

    def __init__(self, total: int) -> None:
        self.requests = BytePool("requests", total // 2)
        self.answers = BytePool("answers", total - total // 2)

    def describe(self) -> dict[str, Any]:
        return {"requests": self.requests.describe(), "answers": self.answers.describe()}


class InputAccount:
    """Request bytes one connection holds; beyond FREE_INPUT they are reserved from the pool.

    `held` is what the connection buffers now (a partial frame or body) plus
    the payloads of its requests still being served; `pending` is the whole
    size of the frame or body being received, once its header says it. A
    frame is reserved whole, in one wait, before more of it is read: readers
    that each held part of a reservation and waited for the rest would wait
    for each other forever.
    """

    def __init__(self, pool: BytePool, free: int = FREE_INPUT) -> None:
        self.pool = pool
        self.free = free
        self.buffered = 0
        self.serving = 0
        self.pending = 0
        self.reserved = 0

    @property
    def held(self) -> int:
        return self.buffered + self.serving

    def room(self) -> int:
        """Bytes that may be received now without reserving more."""
        return self.free + self.reserved - self.held

    def expect(self, size: int) -> None:
        """The frame or body being received is `size` bytes in all (0: not known yet)."""
        self.pending = size
        self._trim()

    async def make_room(self, wanted: int) -> int:
        """Wait until `wanted` more bytes may be received (reserving from the pool); returns the room."""
        shortfall = wanted - self.room()
        if shortfall > 0:
            taken = await self.pool.take(min(max(shortfall, RESERVE_STEP), self.pool.capacity))
            self.reserved += taken  # not `+= await`: that would add to the value read before the wait
        return self.room()

    def set_buffered(self, size: int) -> None:
        self.buffered = size
        self._trim()

    def start_serving(self, size: int) -> None:
        """A complete request of `size` bytes left the receive buffer for a request task."""
        self.serving += size

    def done_serving(self, size: int) -> None:
        self.serving -= size
        self._trim()

    def _trim(self) -> None:
        needed = max(self.buffered, self.pending) + self.serving
        surplus = self.reserved - max(0, needed - self.free)
        if surplus > 0:
            self.reserved -= surplus
            self.pool.give(surplus)

    def close(self) -> None:
        if self.reserved:
            self.pool.give(self.reserved)
            self.reserved = 0


class Ticket:
    """Room for one answer frame in an OutputQueue, reserved before the frame is built."""

    __slots__ = ("size", "pooled", "queued")

    def __init__(self, size: int, pooled: bool) -> None:
        self.size = size
        self.pooled = pooled
        self.queued = False


class OutputQueue:
    """One connection's answer frames not yet written to its socket.

    At most `limit` bytes are queued or reserved (one frame of any size is
    admitted when the queue is empty); a producer beyond that waits until
    the sender has written enough. The first FREE_OUTPUT bytes are free; a
    frame that does not fit them is charged to the answers pool.
    """

    def __init__(self, pool: BytePool, limit: int, free: int = FREE_OUTPUT) -> None:
        self.pool = pool
        self.limit = limit
        self.free = free
        self.queued = 0          # bytes reserved or queued, not yet written
        self.free_used = 0
        self.closed = False
        self._frames: deque[tuple[tuple[bytes, ...], Ticket]] = deque()
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def reserve(self, size: int) -> Ticket:
        """Room for a frame of `size` bytes: waits for this queue, then (beyond the free part) the pool."""
        while self.queued and self.queued + size > self.limit:
            await self._changed.wait()
        self.queued += size
        if self.free_used + size <= self.free:
            self.free_used += size
            await trio.lowlevel.cancel_shielded_checkpoint()
            return Ticket(size, False)
        try:
            await self.pool.take(size)
        except BaseException:
            self.queued -= size
            self._notify()
            raise
        return Ticket(size, True)

    def queue(self, ticket: Ticket, *parts: bytes) -> None:
        """Hand a built frame (its parts, written in order) to the sender under `ticket`."""
        actual = sum(len(part) for part in parts)
        if actual != ticket.size:  # built larger or smaller than reserved: settle the difference
            self._resize(ticket, actual)
        ticket.queued = True
        self._frames.append((parts, ticket))
        self._notify()

    def queue_now(self, *parts: bytes) -> None:
        """Queue a frame without waiting (HELLO answers, final error frames: small, never refused)."""
        size = sum(len(part) for part in parts)
        self.queued += size
        if self.free_used + size <= self.free:
            self.free_used += size
            ticket = Ticket(size, False)
        else:
            self.pool.force(size)
            ticket = Ticket(size, True)
        self.queue(ticket, *parts)

    def cancel(self, ticket: Ticket) -> None:
        """Give back a reservation whose frame was never queued."""
        if not ticket.queued:
            self._release(ticket)

    def _resize(self, ticket: Ticket, size: int) -> None:
        change = size - ticket.size
        self.queued += change
        if ticket.pooled:
            if change > 0:
                self.pool.force(change)
            else:
                self.pool.give(-change)
        else:
            self.free_used += change
        ticket.size = size

    def _release(self, ticket: Ticket) -> None:
        self.queued -= ticket.size
        if ticket.pooled:
            self.pool.give(ticket.size)
        else:
            self.free_used -= ticket.size
        ticket.size = 0
        self._notify()

    # ----------------------------------------------------------- sender side

    async def next_batch(self) -> list[tuple[tuple[bytes, ...], Ticket]]:
        """The next frames to write (small ones coalesced); [] once closed and empty."""
        while not self._frames:
            if self.closed:
                return []
            await self._changed.wait()
        batch = [self._frames.popleft()]
        size = batch[0][1].size
        while self._frames and len(batch) < COALESCE_FRAMES:
            following = self._frames[0][1].size
            if size + following > COALESCE_BYTES:
                break
            batch.append(self._frames.popleft())
            size += following
        return batch

    def written(self, ticket: Ticket) -> None:
        self._release(ticket)

    def close(self) -> None:
        """No more frames: the sender stops once the queue is empty."""
        self.closed = True
        self._notify()

    def discard(self) -> None:
        """The connection is over: give back what was never written."""
        self.closed = True
        while self._frames:
            self._release(self._frames.popleft()[1])
