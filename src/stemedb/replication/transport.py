"""Connections to other servers over the binary protocol: requests and answers matched by request id.

Owns: `Link`, one binary-protocol connection from this side to a server,
opened on first use — HELLO with a token (docs/protocol.md, "HELLO"), then,
between cluster nodes, NODE_HELLO naming both sides — and reopened after it
breaks; many requests in flight, each bounded by a timeout, answers matched by
request id (a streamed answer's frames collected until the one without MORE),
so late or duplicated answers are ignored. Nodes use one Link per peer; the
`stemedb sync` and `stemedb cluster status` commands use one per server.
Also `tcp_connector`, the production way to reach an address (TCP, TLS for
stemedbs:// peers). Must never: interpret a payload (the caller does), or
block the event loop. The serving side is the server's own connection
(stemedb.server.connection), which hands replication requests to the node.

Resource handling: a Link's reader task runs in the nursery it was given
and closes its stream when it ends; `close()` closes the current stream.
Error handling: a link that cannot connect, breaks, or gets no answer in time
raises Unavailable naming the peer; so does a HELLO or NODE_HELLO that fails
(the message says why: an unknown token, another cluster). An ERROR answer
raises the class that owns its code (stemedb.errors.error_from_code, the one
error table). A peer that breaks the framing is disconnected.
"""

from __future__ import annotations

import itertools
import logging
import ssl
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

from stemedb import _protocol
from stemedb.client._wire import Session
from stemedb.errors import (
    AuthRequired,
    FrameError,
    ProtocolError,
    StemeError,
    Unavailable,
    error_from_code,
)
from stemedb.replication import framing
from stemedb.replication.framing import NodeHello

log = logging.getLogger("stemedb.replication")

RECEIVE_BYTES = 256 * 1024
Connect = Callable[[str], Awaitable[trio.abc.Stream]]
STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
# Frames between nodes may be larger than a client's: a forwarded write gains 36 bytes a
# record (its ID and length) over the client's PUT (docs/protocol.md, "Replication").
NODE_FRAME_FACTOR = 2


@dataclass
class _Slot:
    stream: trio.abc.Stream
    event: trio.Event
    payloads: list[bytes] = field(default_factory=list)
    done: bool = False
    error: StemeError | None = None


class Link:
    """Requests from this side to one server (a peer node, or a server named by its URL)."""

    def __init__(self, peer: str, connect: Connect, nursery: trio.Nursery, *, token: str = "",
                 node_hello: NodeHello | None = None, client_name: str = "stemedb-node",
                 hello_timeout: float = 5.0,
                 max_payload: int = NODE_FRAME_FACTOR * _protocol.DEFAULT_MAX_FRAME,
                 on_heard: Callable[[str], None] = lambda peer: None,
                 on_failed: Callable[[str], None] = lambda peer: None) -> None:
        self.peer = peer
        self.connect = connect
        self.nursery = nursery
        self.token = token
        self.node_hello = node_hello
        self.client_name = client_name
        self.hello_timeout = hello_timeout
        self.max_payload = max_payload
        self.on_heard = on_heard
        self.on_failed = on_failed
        self.session: Session | None = None
        self.peer_hello: NodeHello | None = None
        self.connections = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self._stream: trio.abc.Stream | None = None
        self._pending: dict[int, _Slot] = {}
        self._ids = itertools.count(1)
        self._connect_lock = trio.Lock()
        self._send_lock = trio.Lock()

    async def request(self, opcode: int, payload: bytes, timeout: float, *, flags: int = 0) -> bytes:
        """Send one request and return its (one-frame) answer's payload."""
        payloads = await self.request_frames(opcode, payload, timeout, flags=flags)
        if len(payloads) != 1:
            raise ProtocolError(f"{self.peer} answered {_name(opcode)} with {len(payloads)} frames, "
                                "expected one")
        return payloads[0]

    async def request_frames(self, opcode: int, payload: bytes, timeout: float, *,
                             flags: int = 0) -> list[bytes]:
        """Send one request; the payloads of every frame of its answer (MORE collected)."""
        stream = await self._connection()
        return await self._exchange(stream, opcode, payload, timeout, flags)

    async def connected(self) -> Session:
        """Open the connection now (HELLO, and NODE_HELLO for a node); what the server said."""
        await self._connection()
        assert self.session is not None
        return self.session

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            self._fail_pending(stream, "the link was closed")
            await trio.aclose_forcefully(stream)

    # ------------------------------------------------------------ internals

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
                await self._greet(stream)
            except StemeError as exc:
                self._drop(stream, f"HELLO failed: {exc}")
                if isinstance(exc, Unavailable):
                    raise
                raise Unavailable(f"{self.peer} did not complete HELLO: {exc}") from None
            except BaseException:
                self._drop(stream, "HELLO cancelled")   # never reuse a connection without HELLO
                raise
            return stream

    async def _greet(self, stream: trio.abc.Stream) -> None:
        hello = _protocol.encode_hello(_protocol.MIN_PROTOCOL_VERSION, _protocol.PROTOCOL_VERSION,
                                       self.client_name, self.token)
        answer = await self._exchange(stream, _protocol.HELLO, hello, self.hello_timeout, 0)
        self.session = Session(*_protocol.decode_hello_ok(answer[0]))
        if self.session.server_flags & _protocol.SERVER_AUTH_REQUIRED:
            raise AuthRequired(f"{self.peer} requires a token" + (
                " (the one given was refused)" if self.token else "; configure one"))
        if self.node_hello is None:
            return
        answer = await self._exchange(stream, _protocol.NODE_HELLO,
                                      framing.encode_node_hello(self.node_hello), self.hello_timeout, 0)
        self.peer_hello = framing.decode_node_hello(answer[0])
        if self.peer_hello.node != self.peer or self.peer_hello.cluster != self.node_hello.cluster:
            raise Unavailable(f"{self.peer} answered as node {self.peer_hello.node!r} of cluster "
                              f"{self.peer_hello.cluster!r}; check the cluster file's addresses")

    async def _exchange(self, stream: trio.abc.Stream, opcode: int, payload: bytes, timeout: float,
                        flags: int) -> list[bytes]:
        request_id = next(self._ids) & 0xFFFFFFFF or next(self._ids)
        slot = _Slot(stream, trio.Event())
        self._pending[request_id] = slot
        try:
            frame = _protocol.frame_header(opcode, flags, request_id, len(payload))
            try:
                async with self._send_lock:
                    await stream.send_all(frame + payload if len(payload) < 65536 else frame)
                    if len(payload) >= 65536:
                        await stream.send_all(payload)
                self.bytes_sent += len(frame) + len(payload)
            except STREAM_ERRORS as exc:
                self._drop(stream, str(exc) or type(exc).__name__)
            with trio.move_on_after(timeout):
                await slot.event.wait()
        finally:
            self._pending.pop(request_id, None)
        if slot.error is not None:
            raise slot.error
        if not slot.done:
            raise Unavailable(f"{self.peer} did not answer {_name(opcode)} within {timeout:g} s")
        return slot.payloads

    async def _read(self, stream: trio.abc.Stream) -> None:
        reader = _protocol.FrameReader(self.max_payload, from_server=True)
        reason = "the peer closed the connection"
        try:
            while True:
                data = await stream.receive_some(RECEIVE_BYTES)
                if not data:
                    break
                self.bytes_received += len(data)
                reader.feed(data)
                for frame in reader.frames():
                    self._deliver(stream, frame)
        except (FrameError, *STREAM_ERRORS) as exc:
            reason = str(exc) or type(exc).__name__
        finally:
            self._drop(stream, reason, close=False)
            await trio.aclose_forcefully(stream)

    def _deliver(self, stream: trio.abc.Stream, frame: _protocol.Frame) -> None:
        if frame.request_id == 0 and frame.opcode == _protocol.ERROR:
            code, _retry, message = _protocol.decode_error(frame.payload)
            self._fail_pending(stream, f"the peer closed the connection: {message}",
                               error_from_code(code, message))
            return
        slot = self._pending.get(frame.request_id)
        if slot is None or slot.done or slot.stream is not stream:
            return   # late (timed out) or for a connection that was replaced
        self.on_heard(self.peer)
        if frame.opcode == _protocol.ERROR:
            code, retry_ms, message = _protocol.decode_error(frame.payload)
            slot.error = error_from_code(code, message, retry_ms / 1000.0)
            slot.done = True
            if _protocol.ERROR_CODES.get(code, ("", True))[1]:
                # The server closes after an error of this code: the next request must not
                # be sent on this connection, it reconnects.
                slot.event.set()
                self._drop(stream, f"the server closed the connection after: {message}")
                return
        else:
            slot.payloads.append(frame.payload)
            slot.done = not frame.more
        if slot.done:
            slot.event.set()

    def _drop(self, stream: trio.abc.Stream, reason: str, *, close: bool = True) -> None:
        """Forget a connection; its requests fail now, the next request reconnects.

        Closing it (in a task of its own) also ends its reader's wait.
        """
        if self._stream is stream:
            self._stream = None
            log.debug("link to %s dropped: %s", self.peer, reason)
            if close:
                self.nursery.start_soon(trio.aclose_forcefully, stream)
        self._fail_pending(stream, reason)

    def _fail_pending(self, stream: trio.abc.Stream, reason: str,
                      error: StemeError | None = None) -> None:
        for slot in self._pending.values():
            if slot.stream is stream and not slot.done and slot.error is None:
                slot.error = error or Unavailable(f"connection to {self.peer} lost: {reason}")
                slot.done = True
                slot.event.set()


def sole_error(error: BaseException) -> BaseException:
    """The one error inside (nested) exception groups of one — what a nursery around a single
    request raises under trio's strict groups; else `error` itself."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def _name(opcode: int) -> str:
    return str(_protocol.OPCODE_NAMES.get(opcode, f"0x{opcode:02x}")).upper()


def tcp_connector(addresses: Callable[[str], tuple[str, int, bool]],
                  ssl_context: ssl.SSLContext | None = None, *, timeout: float = 5.0) -> Connect:
    """`connect(peer)` over TCP: `addresses(peer)` gives (host, port, tls) — TLS through `ssl_context`
    (the default context, verifying the certificate against the host name, when None)."""

    async def connect(peer: str) -> trio.abc.Stream:
        host, port, tls = addresses(peer)
        with trio.fail_after(timeout):
            try:
                stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
            except trio.TooSlowError:
                raise Unavailable(f"{host}:{port} did not accept within {timeout:g} s") from None
        if tls:
            context = ssl_context or ssl.create_default_context()
            stream = trio.SSLStream(stream, context, server_hostname=host)
        return stream

    return connect
