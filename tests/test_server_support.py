"""Shared helpers for the server, client and protocol tests (this module has no tests).

- `Driver`: a raw protocol client over any trio stream (memory streams in
  tests), for sending exactly the bytes a test wants and reading every frame.
- `OneByteStream`: wraps a trio stream so every receive returns at most one
  byte and every send goes out one byte at a time (the frame parsers must not
  care how bytes are chunked).
- `served(server, peer)`: an in-process connection to `Server.handle_stream`
  over a trio memory stream pair.
- `BackgroundServer`: a real server on 127.0.0.1 port 0 in a thread with its
  own trio run, for the blocking client and the HTTP tests. Given a
  `trio.testing.MockClock` (rate 0: time stands still) its rate limits and
  timeouts move only when the test calls `advance(seconds)`, so they do not
  depend on how busy the machine is.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import trio
import trio.testing

import stemedb
from stemedb import _protocol
from stemedb.server import Server, ServerConfig
from stemedb.server.config import Limits

LOOPBACK = ("127.0.0.1", 40000)
SIGNER = stemedb.Signer.from_seed(bytes(range(32)))
OTHER = stemedb.Signer.from_seed(b"\x07" * 32)


def claims(n: int, prefix: str = "s", signer: stemedb.Signer | None = SIGNER) -> list[Any]:
    """n small assertions, signed individually by `signer` (or unsigned when None)."""
    out = []
    for i in range(n):
        record = stemedb.Assertion(f"{prefix}{i}", "p", i, timestamp=1_700_000_000_000_000 + i)
        out.append(record.sign(signer) if signer is not None else record)
    return out


def record_batch(records: list[Any]) -> bytes:
    blob, offsets, _ids = stemedb.encode_many(records)
    return bytes(_protocol.encode_record_batch(blob, offsets))


def config(**limits: Any) -> ServerConfig:
    """A config for tests: no listeners (memory streams) unless given; small limits as asked."""
    settings = ServerConfig(listen=None, http=None)
    settings.limits = Limits(**limits)
    return settings


class OneByteStream(trio.abc.Stream):
    """Delivers and sends one byte per call (trickling both ways)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        for i in range(len(data)):
            await self.inner.send_all(bytes(data[i:i + 1]))

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.inner.receive_some(1)

    async def aclose(self) -> None:
        await self.inner.aclose()


class Driver:
    """Speaks raw frames to a server over a stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.reader = _protocol.FrameReader(1 << 30, from_server=True)
        self.next_id = 1

    async def send(self, opcode: int, payload: bytes = b"", request_id: int | None = None) -> int:
        if request_id is None:
            request_id = self.next_id
            self.next_id += 1
        await self.send_raw(_protocol.encode_frame(opcode, 0, request_id, payload))
        return request_id

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def frame(self) -> _protocol.Frame | None:
        """The next frame, or None at end of stream (or when the stream broke)."""
        while True:
            frame = self.reader.next()
            if frame is not None:
                return frame
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if not data:
                return None
            self.reader.feed(data)

    async def call(self, opcode: int, payload: bytes = b"") -> _protocol.Frame:
        request_id = await self.send(opcode, payload)
        frame = await self.frame()
        assert frame is not None, "connection closed instead of answering"
        assert frame.request_id == request_id, frame
        return frame

    async def hello(self, token: str = "") -> _protocol.Frame:
        return await self.call(_protocol.HELLO, _protocol.encode_hello(1, 1, "test", token))

    async def rest(self) -> list[_protocol.Frame]:
        """Every frame until the server closes the connection."""
        frames = []
        while True:
            frame = await self.frame()
            if frame is None:
                return frames
            frames.append(frame)


def error_of(frame: _protocol.Frame | None) -> tuple[int, int, str]:
    assert frame is not None and frame.opcode == _protocol.ERROR, frame
    return _protocol.decode_error(frame.payload)


@contextlib.asynccontextmanager
async def served(server: Server, peer: Any = LOOPBACK, *, trickle: bool = False,
                 nursery: trio.Nursery | None = None) -> AsyncIterator[Driver]:
    """A Driver connected to `server` through a memory stream pair."""
    client_side, server_side = trio.testing.memory_stream_pair()
    if trickle:
        client_side, server_side = OneByteStream(client_side), OneByteStream(server_side)
    async with trio.open_nursery() as own:
        (nursery or own).start_soon(server.handle_stream, server_side, peer)
        try:
            yield Driver(client_side)
        finally:
            await client_side.aclose()


class BackgroundServer:
    """A real server on loopback, run by trio in a thread; `stop()` shuts it down gracefully."""

    def __init__(self, path: Any, settings: ServerConfig | None = None, *,
                 clock: trio.testing.MockClock | None = None, db: Any = None, **db_options: Any) -> None:
        self.db = db if db is not None else stemedb.open(path, **db_options)
        self.clock = clock
        settings = settings or ServerConfig(listen="127.0.0.1:0", http="127.0.0.1:0")
        self.server = Server(self.db, settings)
        self._token: trio.lowlevel.TrioToken | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="test-server", daemon=True)
        self._thread.start()
        if not self._started.wait(30):
            raise RuntimeError("server did not start")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                await nursery.start(self.server.run)
                self._started.set()

        try:
            trio.run(main, clock=self.clock)
        except BaseException as exc:  # surfaced by __init__ or stop()
            self._error = exc
            self._started.set()

    @property
    def url(self) -> str:
        return f"stemedb://{self.server.listen_address}"

    @property
    def http(self) -> str:
        return f"http://{self.server.http_address}"

    def call(self, fn: Any, *args: Any) -> Any:
        """Run a sync function on the server's event loop."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def advance(self, seconds: float) -> None:
        """Move the server's mock clock forward (on its own event loop)."""
        assert self.clock is not None, "advance() needs a server started with a MockClock"
        self.call(self.clock.jump, seconds)

    def stop(self) -> None:
        if self._thread.is_alive():
            try:
                self.call(self.server.shutdown)
            except trio.RunFinishedError:
                pass
            self._thread.join(60)
        self.db.close()
        if self._error is not None:
            raise self._error


@contextlib.contextmanager
def background_server(path: Any, settings: ServerConfig | None = None, *,
                      clock: trio.testing.MockClock | None = None, db: Any = None,
                      **db_options: Any) -> Iterator[BackgroundServer]:
    running = BackgroundServer(path, settings, clock=clock, db=db, **db_options)
    try:
        yield running
    finally:
        running.stop()
