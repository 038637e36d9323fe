"""The async client, on anyio: the same operations from trio or asyncio code.

    async with stemedb.client.connect_async("stemedb://host:7440", token=...) as client:
        record_id = await client.put(record)

Owns: one connection at a time with a reader task (answers are matched to
requests by request id, so any number of tasks may have requests in flight:
pipelining), per-request timeouts, reconnection with retry (requests are
idempotent), and the async group-signing writer. Must never: block the event
loop (large batches are signed in a worker thread).

Resource handling: the client's task group (entered by ``async with``) owns
the reader and writer tasks; leaving the block closes the connection and
cancels them.
Error handling: as the blocking client — error frames become the StemeError
class that owns their code (stemedb.errors), RequestTimeout, ConnectionLost;
connecting is retried only after retry_safe refusals.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

import anyio
import anyio.abc

from stemedb import _protocol
from stemedb.client._wire import (
    CLIENT_NAME,
    Session,
    check_hello,
    error_from_frame,
    get_payloads,
    hello_payload,
    id_array,
    ids_from,
    parse_url,
    query_payload,
    query_result,
    records_batches,
    records_from,
    scan_payload,
    signed_batch,
)
from stemedb.errors import (
    ClientClosed,
    ConnectionLost,
    InvalidRecord,
    NotFound,
    ProtocolError,
    RequestTimeout,
    SignatureError,
    StemeError,
)
from stemedb.records import Envelope, Signer

RECEIVE_BYTES = 256 * 1024
SIGN_IN_THREAD = 256  # batches at least this large are signed off the event loop


class _Waiter:
    """One pending answer (a request's frames, or a writer record's ID)."""

    __slots__ = ("event", "payloads", "value", "error", "request_id")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.payloads: list[bytes] = []
        self.value: Any = None
        self.error: BaseException | None = None
        self.request_id = 0

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value if self.value is not None else self.payloads


class _AsyncConnection:
    def __init__(self, stream: anyio.abc.ByteStream, session: Session,
                 reader: _protocol.FrameReader) -> None:
        self.stream = stream
        self.session = session
        self.reader = reader
        self.error: BaseException | None = None
        self._pending: dict[int, _Waiter] = {}
        self._next_id = 2
        self._send_lock = anyio.Lock()

    async def start(self, opcode: int, payload: bytes) -> _Waiter:
        if self.error is not None:
            raise ConnectionLost(f"connection lost: {self.error}")
        waiter = _Waiter()
        waiter.request_id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF or 1
        self._pending[waiter.request_id] = waiter
        try:
            async with self._send_lock:
                await self.stream.send(_protocol.frame_header(opcode, 0, waiter.request_id,
                                                              len(payload)) + payload)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            await self.fail(ConnectionLost(f"connection lost while sending: {exc}"))
            raise ConnectionLost(f"connection lost while sending: {exc}") from None
        return waiter

    def forget(self, waiter: _Waiter) -> None:
        self._pending.pop(waiter.request_id, None)

    async def read_loop(self) -> None:
        try:
            while True:
                try:
                    data = await self.stream.receive(RECEIVE_BYTES)
                except anyio.EndOfStream:
                    raise ConnectionLost("the server closed the connection") from None
                self.reader.feed(data)
                for frame in self.reader.frames():
                    self._deliver(frame)
        except anyio.get_cancelled_exc_class():
            await self.fail(ConnectionLost("the client closed the connection"))
            raise
        except BaseException as exc:  # noqa: B036 - every pending request must hear about it
            if not isinstance(exc, StemeError):
                exc = ConnectionLost(f"connection lost: {exc}")
            await self.fail(exc)

    def _deliver(self, frame: _protocol.Frame) -> None:
        if frame.request_id == 0:
            if frame.opcode == _protocol.ERROR:
                raise ConnectionLost(f"the server closed the connection: {error_from_frame(frame.payload)}")
            raise ProtocolError(f"unexpected frame {frame!r} with request id 0")
        waiter = self._pending.get(frame.request_id)
        if waiter is None:
            return
        if frame.opcode == _protocol.ERROR:
            waiter.error = error_from_frame(frame.payload)
        else:
            waiter.payloads.append(frame.payload)
        if not frame.more or frame.opcode == _protocol.ERROR:
            del self._pending[frame.request_id]
            waiter.event.set()

    async def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        pending, self._pending = self._pending, {}
        for waiter in pending.values():
            waiter.error = error if isinstance(error, ConnectionLost) else ConnectionLost(str(error))
            waiter.event.set()
        with anyio.CancelScope(shield=True):
            await anyio.aclose_forcefully(self.stream)


class AsyncClient:
    """An anyio client; use ``async with connect_async(url, token=...) as client``."""

    def __init__(self, url: str = "stemedb://127.0.0.1:7440", *, token: str | None = None,
                 timeout: float = 30.0, connect_timeout: float = 10.0,
                 ssl_context: ssl.SSLContext | None = None, reconnect: bool = True,
                 retries: int = 3, name: str = CLIENT_NAME) -> None:
        self.address = parse_url(url)
        self.token = token
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.ssl_context = ssl_context
        if self.address.tls and ssl_context is None:
            self.ssl_context = ssl.create_default_context()
        self.reconnect = reconnect
        self.retries = retries
        self.name = name
        self.reconnects = 0
        self._conn: _AsyncConnection | None = None
        self._connect_lock: anyio.Lock | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._closed = False

    async def __aenter__(self) -> AsyncClient:
        self._connect_lock = anyio.Lock()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        try:
            await self._connection()
        except BaseException:
            self._tg.cancel_scope.cancel()
            await self._tg.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        await self.aclose()
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        # The body's exception is not the task group's: handed to it, anyio 4 would raise it
        # wrapped in an ExceptionGroup. It propagates as itself once this returns.
        await self._tg.__aexit__(None, None, None)
        return None

    async def aclose(self) -> None:
        self._closed = True
        if self._conn is not None:
            await self._conn.fail(ConnectionLost("the client closed the connection"))

    @property
    def session(self) -> Session:
        if self._conn is None:
            raise ClientClosed("not connected: use `async with connect_async(...) as client`")
        return self._conn.session

    async def _open(self) -> _AsyncConnection:
        with anyio.fail_after(self.connect_timeout):
            stream: anyio.abc.ByteStream
            if self.ssl_context is not None:
                stream = await anyio.connect_tcp(self.address.host, self.address.port, tls=True,
                                                 ssl_context=self.ssl_context,
                                                 tls_standard_compatible=False)
            else:
                stream = await anyio.connect_tcp(self.address.host, self.address.port)
            try:
                payload = hello_payload(self.token, self.name)
                await stream.send(_protocol.frame_header(_protocol.HELLO, 0, 1, len(payload)) + payload)
                reader = _protocol.FrameReader(_protocol.DEFAULT_PREAUTH_FRAME * 16, from_server=True)
                frame = None
                while frame is None:
                    try:
                        reader.feed(await stream.receive(RECEIVE_BYTES))
                    except anyio.EndOfStream:
                        raise ConnectionLost("the server closed the connection during the handshake") from None
                    frame = reader.next()
                session = check_hello(frame.opcode, frame.payload, self.token)
                reader.max_payload = session.max_frame
            except BaseException:
                await anyio.aclose_forcefully(stream)
                raise
        return _AsyncConnection(stream, session, reader)

    async def _connection(self) -> _AsyncConnection:
        conn = self._conn
        if conn is not None and conn.error is None:
            return conn
        if self._tg is None or self._connect_lock is None:
            raise ClientClosed("not connected: use `async with connect_async(...) as client`")
        async with self._connect_lock:
            if self._closed:
                raise ClientClosed("the client is closed")
            conn = self._conn
            if conn is not None and conn.error is None:
                return conn
            attempt = 0
            while True:
                try:
                    conn = await self._open()
                    break
                except ssl.SSLCertVerificationError:
                    raise
                except (OSError, StemeError, anyio.BrokenResourceError) as exc:
                    if isinstance(exc, StemeError) and not exc.retry_safe:
                        raise  # e.g. a refused token: trying again cannot help
                    attempt += 1
                    if not self.reconnect or attempt > self.retries:
                        raise ConnectionLost(f"cannot connect to {self.address}: {exc}") from None
                    await anyio.sleep(min(0.05 * 2 ** attempt, 1.0))
            if self._conn is not None:
                self.reconnects += 1
            self._conn = conn
            self._tg.start_soon(conn.read_loop)
            return conn

    async def _requests(self, opcode: int, payloads: Sequence[bytes],
                        timeout: float | None = None) -> list[list[bytes]]:
        attempt = 0
        limit = self.timeout if timeout is None else timeout
        while True:
            conn = await self._connection()
            waiters: list[_Waiter] = []
            try:
                for payload in payloads:
                    waiters.append(await conn.start(opcode, payload))
                try:
                    with anyio.fail_after(limit):
                        for waiter in waiters:
                            await waiter.event.wait()
                except TimeoutError:
                    for waiter in waiters:
                        conn.forget(waiter)
                    raise RequestTimeout(
                        f"no answer from {self.address} within {limit:g} s; writes are idempotent, "
                        "retrying is safe") from None
                return [waiter.result() for waiter in waiters]
            except ConnectionLost:
                attempt += 1
                if not self.reconnect or attempt > self.retries or self._closed:
                    raise
                await anyio.sleep(min(0.02 * 2 ** attempt, 1.0))

    async def _request(self, opcode: int, payload: bytes, timeout: float | None = None) -> list[bytes]:
        return (await self._requests(opcode, [payload], timeout))[0]

    # ------------------------------------------------------------ operations

    async def ping(self, timeout: float | None = None) -> float:
        started = time.perf_counter()
        await self._request(_protocol.PING, b"", timeout)
        return time.perf_counter() - started

    async def put(self, record: Any, *, timeout: float | None = None) -> bytes:
        return (await self.put_many([record], timeout=timeout))[0]

    async def put_many(self, records: Iterable[Any], *, envelope: Envelope | Sequence[Envelope] | None = None,
                       timeout: float | None = None) -> list[bytes]:
        return await self._put(_protocol.PUT, list(records), envelope, timeout)

    async def _put(self, opcode: int, records: list[Any], envelope: Any, timeout: float | None) -> list[bytes]:
        envelopes = 0 if envelope is None else (1 if isinstance(envelope, Envelope) else len(envelope))
        await self._connection()
        payloads = records_batches(records, envelope, self.session.max_frame)
        answers = await self._requests(opcode, payloads, timeout)
        return ids_from([payload for answer in answers for payload in answer])[envelopes:]

    async def vote(self, vote: Any, *, timeout: float | None = None) -> bytes:
        return (await self._put(_protocol.VOTE, [vote], None, timeout))[0]

    async def epoch(self, epoch: Any, *, timeout: float | None = None) -> bytes:
        return (await self._put(_protocol.EPOCH, [epoch], None, timeout))[0]

    async def get(self, record_id: bytes, *, timeout: float | None = None) -> Any:
        record = (await self.get_many([record_id], timeout=timeout))[0]
        if record is None:
            raise NotFound(f"no record with ID {bytes(record_id).hex()}")
        return record

    async def get_many(self, ids: Any, *, timeout: float | None = None) -> list[Any]:
        array = id_array(ids)
        await self._connection()
        answers = await self._requests(_protocol.GET, get_payloads(array, self.session.max_frame), timeout)
        return records_from([p for answer in answers for p in answer], allow_absent=True)[:len(array)]

    async def query(self, subject: str, predicate: str | None = None, *, lens: str | None = None,
                    timeout: float | None = None, **filters: Any) -> dict[str, Any]:
        payload = query_payload(subject, predicate, lens, filters)
        return query_result((await self._request(_protocol.QUERY, payload, timeout))[0])

    async def scan(self, subject: str | None = None, predicate: str | None = None, *,
                   kind: str | None = None, limit: int = 10_000,
                   timeout: float | None = None) -> list[Any]:
        payloads = await self._request(_protocol.SCAN, scan_payload(subject, predicate, kind, limit), timeout)
        return records_from(payloads, allow_absent=False)

    async def stats(self, *, timeout: float | None = None) -> dict[str, Any]:
        payload = (await self._request(_protocol.STATS, b"", timeout))[0]
        return dict(json.loads(_protocol.decode_text(payload)))

    async def audit(self, limit: int = 100, *, timeout: float | None = None) -> Any:
        payload = (await self._request(_protocol.AUDIT, _protocol.encode_u32(limit), timeout))[0]
        return json.loads(_protocol.decode_text(payload))

    def writer(self, signer: Signer, *, linger: float = 0.002, max_records: int = 4096,
               max_batches_in_flight: int = 16) -> AsyncWriter:
        return AsyncWriter(self, signer, linger=linger, max_records=max_records,
                           max_batches_in_flight=max_batches_in_flight)


class AsyncWriter:
    """Group signing for async code: `await writer.put(record)` returns its ID once durable.

    Records put by any number of tasks are gathered for up to `linger`
    seconds or `max_records`, signed with one envelope, and sent as one
    pipelined PUT (see ClientWriter). The flusher task runs in the client's
    task group.
    """

    def __init__(self, client: AsyncClient, signer: Signer, *, linger: float = 0.002,
                 max_records: int = 4096, max_batches_in_flight: int = 16) -> None:
        if not isinstance(signer, Signer):
            raise TypeError(f"writer() expects a stemedb.Signer, got {type(signer).__name__}")
        self.client = client
        self.signer = signer
        self.linger = linger
        self.max_records = max_records
        self.batches_sent = 0
        self._pending: list[tuple[Any, _Waiter]] = []
        self._wakeup: anyio.Event | None = None
        self._slots = anyio.Semaphore(max_batches_in_flight)
        self._running = False
        self._unanswered = 0
        self._idle: anyio.Event | None = None

    def _queue(self, record: Any) -> _Waiter:
        if not hasattr(record, "_with_proof") or isinstance(record, Envelope):
            raise InvalidRecord(f"expected an Assertion, Vote or Epoch, got {type(record).__name__}")
        if record.signers not in ((), (self.signer.public_key,)):
            raise SignatureError("the record declares other signers than the writer's")
        if not self._running:
            if self.client._tg is None:
                raise ClientClosed("not connected: use `async with connect_async(...) as client`")
            self._running = True
            self._wakeup = anyio.Event()
            self.client._tg.start_soon(self._flusher)
        waiter = _Waiter()
        self._pending.append((record, waiter))
        self._unanswered += 1
        assert self._wakeup is not None
        self._wakeup.set()
        return waiter

    async def put(self, record: Any) -> bytes:
        """Store one record (signed with the batch it joins); its ID once durable."""
        waiter = self._queue(record)
        await waiter.event.wait()
        return bytes(waiter.result())

    async def put_many(self, records: Iterable[Any]) -> list[bytes]:
        waiters = [self._queue(record) for record in records]
        out = []
        for waiter in waiters:
            await waiter.event.wait()
            out.append(bytes(waiter.result()))
        return out

    async def flush(self) -> None:
        """Wait until everything put so far has been answered."""
        while self._unanswered:
            self._idle = anyio.Event()
            await self._idle.wait()

    async def _flusher(self) -> None:
        assert self.client._tg is not None
        while True:
            assert self._wakeup is not None
            await self._wakeup.wait()
            self._wakeup = anyio.Event()
            while self._pending:
                if len(self._pending) < self.max_records:
                    await anyio.sleep(self.linger)
                batch = self._pending[:self.max_records]
                del self._pending[:self.max_records]
                await self._slots.acquire()
                self.client._tg.start_soon(self._send, batch)

    async def _send(self, batch: list[tuple[Any, _Waiter]]) -> None:
        try:
            records = [record for record, _ in batch]
            await self.client._connection()
            max_frame = self.client.session.max_frame
            if len(records) >= SIGN_IN_THREAD:
                payload = await anyio.to_thread.run_sync(signed_batch, records, self.signer, max_frame)
            else:
                payload = signed_batch(records, self.signer, max_frame)
            answers = await self.client._requests(_protocol.PUT, [payload])
            ids = ids_from(answers[0])[1:]  # the envelope's ID comes first
            self.batches_sent += 1
            for (_, waiter), record_id in zip(batch, ids):
                waiter.value = record_id
            if len(ids) < len(batch):
                raise ProtocolError("the server returned too few IDs")
        except Exception as exc:
            for _, waiter in batch:
                if waiter.value is None:
                    waiter.error = exc
        finally:
            self._slots.release()
            for _, waiter in batch:
                waiter.event.set()
            self._unanswered -= len(batch)
            if not self._unanswered and self._idle is not None:
                self._idle.set()


def connect_async(url: str = "stemedb://127.0.0.1:7440", *, token: str | None = None,
                  **options: Any) -> AsyncClient:
    """An AsyncClient to enter with ``async with`` (see AsyncClient for options)."""
    return AsyncClient(url, token=token, **options)


__all__ = ["AsyncClient", "AsyncWriter", "connect_async"]
