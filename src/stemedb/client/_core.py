"""The protocol core both clients drive: bytes in, events out, no I/O (the h11 shape).

Owns: one connection's protocol state (docs/protocol.md) — the HELLO it
sends and the Session its answer gives, request ids (counting up from 2,
wrapping, never 0 nor one still in flight), the pending map of requests in
flight, cutting the server's bytes into frames (the compiled FrameReader),
collecting a streamed answer's frames until one without MORE, turning ERROR
frames into the StemeError of their code, and failing every pending request
when the connection ends (a frame with request id 0 is the server closing
it). Must never: touch a socket, a thread, a lock, an event loop or a clock:
the blocking driver (blocking.py, a socket and a reader thread) and the
anyio driver (aio.py, a stream and a reader task) do the I/O and call in
here; the blocking driver serialises its calls with its own lock. What to
do after a failure (reconnect, failover, resend) is stemedb.client._policy.

Error handling: `receive` raises ConnectionLost (with the server's error)
for a closing error frame, ProtocolError for a frame the client cannot
accept; the driver then calls `lost(error)`, which returns every pending
Exchange failed with a ConnectionLost.
"""

from __future__ import annotations

from stemedb import _protocol
from stemedb.client._wire import Session, check_hello, error_from_frame, hello_payload
from stemedb.errors import ConnectionLost, ProtocolError

HELLO_ID = 1
HANDSHAKE_FRAME = _protocol.DEFAULT_PREAUTH_FRAME * 16  # a HELLO answer is far smaller


class Exchange:
    """One request and its answer: the payloads of its frames, or the error that ended it.

    Drivers subclass it to add what they wait on (a threading or anyio
    Event); the core calls nothing itself — it returns the exchanges that
    finished, and the driver wakes their waiters.
    """

    __slots__ = ("request_id", "opcode", "payloads", "error", "done")

    def __init__(self, opcode: int) -> None:
        self.request_id = 0
        self.opcode = opcode
        self.payloads: list[bytes] = []
        self.error: BaseException | None = None
        self.done = False

    def result(self) -> list[bytes]:
        """The answer's payloads (one per frame), or the error raised."""
        if self.error is not None:
            raise self.error
        return self.payloads


class ClientCore:
    """The protocol state of one client connection. Feed it bytes; it tells what finished."""

    def __init__(self, token: str | None, name: str) -> None:
        self.token = token
        self.name = name
        self.session: Session | None = None
        self.error: BaseException | None = None
        self._reader = _protocol.FrameReader(HANDSHAKE_FRAME, from_server=True)
        self._pending: dict[int, Exchange] = {}
        self._next_id = HELLO_ID + 1

    # ------------------------------------------------------------ handshake

    def hello(self) -> bytes:
        """The HELLO frame to send first."""
        payload = hello_payload(self.token, self.name)
        return bytes(_protocol.frame_header(_protocol.HELLO, 0, HELLO_ID, len(payload))) + payload

    def receive_hello(self, data: bytes) -> Session | None:
        """Feed handshake bytes: the Session once the HELLO answer is complete, else None.

        Raises the error a refusal stands for (AuthError, UnsupportedVersion, …).
        """
        self._reader.feed(data)
        frame = self._reader.next()
        if frame is None:
            return None
        session = check_hello(frame.opcode, frame.payload, self.token)
        self._reader.max_payload = session.max_frame
        self.session = session
        return session

    # ------------------------------------------------------------- requests

    def request(self, opcode: int, payload: bytes, flags: int = 0) -> tuple[Exchange, bytes]:
        """Register a request: (its Exchange, the frame to send). `flags`: the request flags
        (ACKS_ONE / ACKS_ALL on a write, else 0)."""
        return self.request_exchange(Exchange(opcode), payload, flags)

    def request_exchange(self, exchange: Exchange, payload: bytes, flags: int = 0) -> tuple[Exchange, bytes]:
        """Register a request whose Exchange the driver made (a subclass it can wait on)."""
        if self.error is not None:
            raise ConnectionLost(f"connection lost: {self.error}")
        opcode = exchange.opcode
        exchange.request_id = self._allocate()
        self._pending[exchange.request_id] = exchange
        header = _protocol.frame_header(opcode, flags, exchange.request_id, len(payload))
        return exchange, bytes(header) + payload

    def _allocate(self) -> int:
        for _ in range(len(self._pending) + 2):
            request_id = self._next_id
            self._next_id = (self._next_id + 1) & 0xFFFFFFFF or 1
            if request_id not in self._pending:
                return request_id
        raise ProtocolError("no free request id")  # unreachable: at most max_inflight are pending

    def forget(self, exchange: Exchange) -> None:
        """Stop waiting for an answer (a timed-out request): a late answer is dropped."""
        self._pending.pop(exchange.request_id, None)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    # -------------------------------------------------------------- answers

    def receive(self, data: bytes) -> list[Exchange]:
        """Feed the server's bytes; the exchanges they finished, in the order they finished."""
        self._reader.feed(data)
        finished: list[Exchange] = []
        for frame in self._reader.frames():
            exchange = self._deliver(frame)
            if exchange is not None:
                finished.append(exchange)
        return finished

    def _deliver(self, frame: _protocol.Frame) -> Exchange | None:
        if frame.request_id == 0:  # about the connection, not one request: it is closing
            if frame.opcode == _protocol.ERROR:
                raise ConnectionLost(f"the server closed the connection: {error_from_frame(frame.payload)}")
            raise ProtocolError(f"unexpected frame {frame!r} with request id 0")
        exchange = self._pending.get(frame.request_id)
        if exchange is None:
            return None  # the answer to a request given up on
        if frame.opcode == _protocol.ERROR:
            exchange.error = error_from_frame(frame.payload)
        elif frame.opcode != exchange.opcode:
            raise ProtocolError(f"request {frame.request_id} was {exchange.opcode:#04x}, "
                                f"answered with opcode {frame.opcode:#04x}")
        else:
            exchange.payloads.append(frame.payload)
        if frame.more and frame.opcode != _protocol.ERROR:
            return None
        del self._pending[frame.request_id]
        exchange.done = True
        return exchange

    def lost(self, error: BaseException) -> list[Exchange]:
        """The connection ended: every pending exchange, failed with a ConnectionLost."""
        if self.error is None:
            self.error = error
        failure = error if isinstance(error, ConnectionLost) else ConnectionLost(f"connection lost: {error}")
        pending, self._pending = list(self._pending.values()), {}
        for exchange in pending:
            exchange.error = failure
            exchange.done = True
        return pending
