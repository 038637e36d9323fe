"""The simulated network: trio memory streams between nodes, through a seeded fault injector.

Owns: `SimNetwork` — which nodes listen, the connections between them, and
the faults applied to every frame crossing a connection: drop, delay (hence
reorder), duplicate, tamper (a forged record substituted in a PUT, PUSH or
SYNC frame), and cuts between groups of nodes (frames across a cut vanish,
connecting across it fails). Must never: read the wall clock, use threads,
or draw randomness from anything but its seeded `random.Random`, so one seed
gives one run.

The injector cuts frames with the production parser of the binary protocol
(stemedb._protocol.FrameReader; requests one way, answers the other):
faults act on whole frames, as a lossy network under a retrying transport
would. Everything it delivers is recorded in `trace`
(time, sender, receiver, kind, bytes), which two runs of one seed must
reproduce exactly.

Resource handling: a connection is two one-way memory streams whose send
hooks route each frame synchronously (delayed frames wait in tasks of the
network's nursery); `disconnect(node)` closes every connection of a node
(its peers see the streams end or break, as after a crash).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio
import trio.testing

from stemedb import _protocol
from stemedb._protocol import Frame

# Frames between nodes may be up to twice max_frame (stemedb.server.connection.NODE_FRAME_FACTOR).
MAX_PAYLOAD = 2 * _protocol.DEFAULT_MAX_FRAME

Serve = Callable[[trio.abc.Stream], Awaitable[None]]


@dataclass
class Faults:
    """Probabilities per frame, and the largest delay in seconds."""

    drop: float = 0.0
    duplicate: float = 0.0
    delay: float = 0.0          # probability that a frame is delayed ...
    delay_max: float = 0.0      # ... by up to this many seconds
    tamper: float = 0.0

    def clear(self) -> None:
        self.drop = self.duplicate = self.delay = self.delay_max = self.tamper = 0.0


@dataclass
class _Connection:
    source: str
    target: str
    ends: list[trio.testing.MemorySendStream | trio.testing.MemoryReceiveStream] = field(
        default_factory=list)


class SimNetwork:
    """Nodes by id; `connect(source, target)` returns a stream to `target`'s server."""

    def __init__(self, rng: random.Random, nursery: trio.Nursery,
                 forge: Callable[[Frame, random.Random, str, str], Frame | None] | None = None) -> None:
        self.rng = rng
        self.nursery = nursery
        self.forge = forge
        self.faults = Faults()
        self.servers: dict[str, tuple[Serve, trio.Nursery]] = {}
        self.cuts: set[frozenset[str]] = set()
        self.connections: list[_Connection] = []
        self.trace = hashlib.blake2b(digest_size=16)
        self.frames = 0
        self.dropped = 0
        self.duplicated = 0
        self.delayed = 0
        self.tampered = 0

    # ------------------------------------------------------------- topology

    def listen(self, node: str, serve: Serve, nursery: trio.Nursery) -> None:
        """`node` accepts connections; each is served by `serve` in `nursery` (the node's)."""
        self.servers[node] = (serve, nursery)

    def unlisten(self, node: str) -> None:
        self.servers.pop(node, None)

    def disconnect(self, node: str) -> None:
        """Break every connection from or to `node`."""
        for connection in [c for c in self.connections if node in (c.source, c.target)]:
            self._close(connection)

    def cut(self, group: set[str], others: set[str]) -> None:
        """Frames between `group` and `others` vanish; connecting across fails."""
        for a in group:
            for b in others:
                self.cuts.add(frozenset((a, b)))

    def heal(self) -> None:
        self.cuts.clear()

    def is_cut(self, a: str, b: str) -> bool:
        return frozenset((a, b)) in self.cuts

    # ----------------------------------------------------------- connecting

    def connector(self, source: str) -> Callable[[str], Awaitable[trio.abc.Stream]]:
        async def connect(target: str) -> trio.abc.Stream:
            return await self.connect(source, target)
        return connect

    async def connect(self, source: str, target: str) -> trio.abc.Stream:
        await trio.sleep(0.001)   # a connection takes a moment, even on loopback
        if self.is_cut(source, target) or target not in self.servers:
            raise OSError(f"simulated network: {target} is unreachable from {source}")
        serve, server_nursery = self.servers[target]
        connection = _Connection(source, target)
        to_server = self._direction(connection, source, target, from_server=False)
        to_client = self._direction(connection, target, source, from_server=True)
        self.connections.append(connection)
        server_nursery.start_soon(serve, trio.StapledStream(to_client[0], to_server[1]))
        return trio.StapledStream(to_server[0], to_client[1])

    def _direction(self, connection: _Connection, source: str, target: str, *, from_server: bool
                   ) -> tuple[trio.testing.MemorySendStream, trio.testing.MemoryReceiveStream]:
        """One direction of a connection: what `source` sends is cut into frames and routed."""
        sender = trio.testing.MemorySendStream()
        receiver = trio.testing.MemoryReceiveStream()
        parser = _protocol.FrameReader(MAX_PAYLOAD, from_server=from_server)

        async def carry() -> None:
            try:
                data = sender.get_data_nowait()
            except trio.WouldBlock:
                return
            if not data:
                return
            parser.feed(data)
            for frame in parser.frames():
                self._route(frame, source, target, receiver)

        def closed() -> None:
            receiver.put_eof()

        sender.send_all_hook = carry
        sender.close_hook = closed
        connection.ends += [sender, receiver]
        return sender, receiver

    def _close(self, connection: _Connection) -> None:
        if connection in self.connections:
            self.connections.remove(connection)
        for end in connection.ends:
            end.close()

    # -------------------------------------------------------------- faults

    def _route(self, frame: Frame, source: str, target: str,
               receiver: trio.testing.MemoryReceiveStream) -> None:
        faults, rng = self.faults, self.rng
        self.frames += 1
        if self.is_cut(source, target) or rng.random() < faults.drop:
            self.dropped += 1
            return
        if self.forge is not None and rng.random() < faults.tamper:
            forged = self.forge(frame, rng, source, target)
            if forged is not None:
                self.tampered += 1
                frame = forged
        copies = 2 if rng.random() < faults.duplicate else 1
        self.duplicated += copies - 1
        data = _protocol.encode_frame(frame.opcode, frame.flags, frame.request_id, frame.payload)
        for _ in range(copies):
            delay = rng.uniform(0, faults.delay_max) if rng.random() < faults.delay else 0.0
            if delay:
                self.delayed += 1
                self.nursery.start_soon(self._deliver_later, data, source, target, receiver, delay)
            else:
                self._deliver(data, source, target, receiver)

    async def _deliver_later(self, data: bytes, source: str, target: str,
                             receiver: trio.testing.MemoryReceiveStream, delay: float) -> None:
        await trio.sleep(delay)
        if self.is_cut(source, target):
            self.dropped += 1
            return
        self._deliver(data, source, target, receiver)

    def _deliver(self, data: bytes, source: str, target: str,
                 receiver: trio.testing.MemoryReceiveStream) -> None:
        self.trace.update(f"{trio.current_time():.6f} {source}>{target} {data[2]} {len(data)};".encode())
        try:
            receiver.put_data(data)
        except trio.ClosedResourceError:
            pass   # the receiving end is gone; like a packet to a closed socket

    def digest(self) -> str:
        return self.trace.hexdigest()
