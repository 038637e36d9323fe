"""Peer connections over any trio stream: requests and answers matched by request id.

Owns: `PeerLink`, this node's connection to one peer (opened on first use
with a HELLO, reopened after it breaks, many requests in flight, each bounded
by a timeout, answers matched by request id so late or duplicated answers
are ignored), and `serve_peer`, the loop that answers one peer's
connection (HELLO first, then one task per request). Must never: interpret a
payload (the node's handler does), or block the event loop. Both sides take
any trio Stream: TCP in production, the simulated network in the tests.

Resource handling: a PeerLink's reader task runs in the nursery it was given
and closes its stream when it ends; `serve_peer` owns its stream until it
returns and closes it.
Error handling: a link that cannot connect, breaks, or gets no answer in time
raises Unavailable naming the peer; an ERROR answer raises the error class
of its code (framing.error_from_code). A peer that breaks the framing is
disconnected. `serve_peer` answers a failed request with an ERROR frame and
goes on; only a framing violation or a bad HELLO ends the connection.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from stemedb.errors import ProtocolError, StemeError, Unavailable
from stemedb.replication import framing
from stemedb.replication.framing import Frame, Hello

log = logging.getLogger("stemedb.replication")

RECEIVE_BYTES = 256 * 1024
Connect = Callable[[str], Awaitable[trio.abc.Stream]]
Handler = Callable[[str, Frame], Awaitable[bytes]]
STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@dataclass
class _Slot:
    stream: trio.abc.Stream
    event: trio.Event
    frame: Frame | None = None
    error: StemeError | None = None


class PeerLink:
    """Requests from this node to one peer."""

    def __init__(self, peer: str, hello: Hello, connect: Connect, nursery: trio.Nursery, *,
                 hello_timeout: float = 5.0, max_payload: int = framing.DEFAULT_MAX_PAYLOAD,
                 on_heard: Callable[[str], None] = lambda peer: None,
                 on_failed: Callable[[str], None] = lambda peer: None) -> None:
        self.peer = peer
        self.hello = hello
        self.connect = connect
        self.nursery = nursery
        self.hello_timeout = hello_timeout
        self.max_payload = max_payload
        self.on_heard = on_heard
        self.on_failed = on_failed
        self.peer_hello: Hello | None = None
        self.connections = 0
        self._stream: trio.abc.Stream | None = None
        self._pending: dict[int, _Slot] = {}
        self._ids = itertools.count(1)
        self._connect_lock = trio.Lock()
        self._send_lock = trio.Lock()

    async def request(self, kind: int, payload: bytes, timeout: float) -> bytes:
        """Send one request and return the answer's payload; Unavailable if none came in time."""
        stream = await self._connection()
        return await self._exchange(stream, kind, payload, timeout)

    async def _connection(self) -> trio.abc.Stream:
        async with self._connect_lock:
            if self._stream is not None:
                return self._stream
            try:
                stream = await self.connect(self.peer)
            except (Unavailable, *STREAM_ERRORS) as exc:
                self.on_failed(self.peer)
                raise Unavailable(f"cannot connect to {self.peer}: {exc}") from None
            self._stream = stream
            self.connections += 1
            self.nursery.start_soon(self._read, stream)
            try:
                payload = await self._exchange(stream, framing.HELLO, framing.encode_hello(self.hello),
                                               self.hello_timeout)
                self.peer_hello = framing.decode_hello(payload)
            except StemeError as exc:
                self._drop(stream, f"HELLO failed: {exc}")
                raise Unavailable(f"{self.peer} did not complete HELLO: {exc}") from None
            except BaseException:
                self._drop(stream, "HELLO cancelled")   # never reuse a connection without HELLO
                raise
            if self.peer_hello.node != self.peer or self.peer_hello.cluster != self.hello.cluster:
                self._drop(stream, f"it says it is {self.peer_hello.node} of {self.peer_hello.cluster}")
                raise Unavailable(f"{self.peer} answered as node {self.peer_hello.node!r} of cluster "
                                  f"{self.peer_hello.cluster!r}; check the cluster file's addresses")
            return stream

    async def _exchange(self, stream: trio.abc.Stream, kind: int, payload: bytes, timeout: float) -> bytes:
        request_id = next(self._ids) & 0xFFFFFFFF
        slot = _Slot(stream, trio.Event())
        self._pending[request_id] = slot
        name = framing.KIND_NAMES[kind]
        try:
            try:
                async with self._send_lock:
                    await stream.send_all(framing.encode_frame(kind, request_id, payload))
            except STREAM_ERRORS as exc:
                self._drop(stream, str(exc) or type(exc).__name__)
            with trio.move_on_after(timeout):
                await slot.event.wait()
        finally:
            self._pending.pop(request_id, None)
        if slot.error is not None:
            raise slot.error
        if slot.frame is None:
            raise Unavailable(f"{self.peer} did not answer {name} within {timeout:g} s")
        self.on_heard(self.peer)
        if slot.frame.kind == framing.ERROR:
            raise framing.error_from_code(*framing.decode_error(slot.frame.payload))
        if slot.frame.kind != kind:
            raise ProtocolError(f"{self.peer} answered {name} with {framing.KIND_NAMES[slot.frame.kind]}")
        return slot.frame.payload

    async def _read(self, stream: trio.abc.Stream) -> None:
        parser = framing.FrameParser(self.max_payload)
        reason = "the peer closed the connection"
        try:
            while True:
                data = await stream.receive_some(RECEIVE_BYTES)
                if not data:
                    break
                parser.feed(data)
                for frame in parser.frames():
                    if not frame.is_response:
                        raise ProtocolError(f"{self.peer} sent a request over this node's link")
                    slot = self._pending.get(frame.request_id)
                    if slot is not None and slot.frame is None and slot.stream is stream:
                        slot.frame = frame
                        slot.event.set()
        except (ProtocolError, *STREAM_ERRORS) as exc:
            reason = str(exc) or type(exc).__name__
        finally:
            self._drop(stream, reason, close=False)
            await trio.aclose_forcefully(stream)

    def _drop(self, stream: trio.abc.Stream, reason: str, *, close: bool = True) -> None:
        """Forget a connection; its requests fail now, the next request reconnects.

        Closing it (in a task of its own) also ends its reader's wait.
        """
        if self._stream is stream:
            self._stream = None
            log.debug("link to %s dropped: %s", self.peer, reason)
            if close:
                self.nursery.start_soon(trio.aclose_forcefully, stream)
        for slot in self._pending.values():
            if slot.stream is stream and slot.frame is None and slot.error is None:
                slot.error = Unavailable(f"connection to {self.peer} lost: {reason}")
                slot.event.set()


async def serve_peer(stream: trio.abc.Stream, hello: Hello, accept: Callable[[Hello], None],
                     handler: Handler, *, max_payload: int = framing.DEFAULT_MAX_PAYLOAD,
                     on_frame: Callable[[str], None] = lambda peer: None) -> None:
    """Answer one peer's connection until it closes; `accept(hello)` raises to refuse the peer."""
    parser = framing.FrameParser(max_payload)
    send_lock = trio.Lock()
    peer: str | None = None

    async def answer(frame: Frame, payload: bytes, kind: int) -> None:
        async with send_lock:
            await stream.send_all(framing.encode_frame(kind, frame.request_id, payload, response=True))

    async def one(peer_id: str, frame: Frame, connection: trio.CancelScope) -> None:
        try:
            try:
                payload = await handler(peer_id, frame)
            except StemeError as exc:
                await answer(frame, framing.encode_error(framing.error_code(exc), str(exc)), framing.ERROR)
                return
            await answer(frame, payload, frame.kind)
        except STREAM_ERRORS:
            connection.cancel()  # the stream broke: the connection ends, as when a read fails

    # Every error is handled inside the nursery: one that left it would arrive wrapped in an
    # ExceptionGroup (trio's strict exception groups), where `except` cannot match it.
    try:
        async with trio.open_nursery() as nursery:
            try:
                try:
                    while True:
                        data = await stream.receive_some(RECEIVE_BYTES)
                        if not data:
                            break
                        parser.feed(data)
                        for frame in parser.frames():
                            if frame.is_response:
                                raise ProtocolError("a peer sent an answer where requests are expected")
                            if peer is None:
                                peer = await _greet(frame, hello, accept, answer)
                                continue
                            on_frame(peer)
                            nursery.start_soon(one, peer, frame, nursery.cancel_scope)
                except StemeError as exc:
                    log.warning("peer %s refused: %s; disconnected", peer or "?", exc)
                    await answer(Frame(framing.ERROR, 0, 0, b""),
                                 framing.encode_error(framing.error_code(exc), str(exc)), framing.ERROR)
            except (_Refused, *STREAM_ERRORS):
                pass
            nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


async def _greet(frame: Frame, hello: Hello, accept: Callable[[Hello], None],
                 answer: Callable[[Frame, bytes, int], Awaitable[None]]) -> str:
    """The first frame must be a HELLO `accept` takes; a refusal answers that frame, then closes."""
    try:
        if frame.kind != framing.HELLO:
            raise ProtocolError(f"the first message must be HELLO, got {framing.KIND_NAMES[frame.kind]}")
        theirs = framing.decode_hello(frame.payload)
        accept(theirs)
    except StemeError as exc:
        log.warning("connection refused: %s", exc)
        await answer(frame, framing.encode_error(framing.error_code(exc), str(exc)), framing.ERROR)
        raise _Refused() from None
    await answer(frame, framing.encode_hello(hello), framing.HELLO)
    return theirs.node


class _Refused(Exception):
    """The peer's HELLO was refused and answered; the connection ends."""
