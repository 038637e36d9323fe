"""The async client, on anyio: the same operations from trio or asyncio code.

    async with stemedb.client.connect_async("stemedb://host:7440", token=...) as client:
        record_id = await client.put(record)

Owns: one connection at a time to one of its nodes, with a reader task
(answers are matched to requests by request id, so any number of tasks may
have requests in flight: pipelining), per-request timeouts, reconnection and
failover on the schedule of stemedb.client._policy (resending only what is
safe: see the blocking client), and the async group-signing writer. Its
methods are the embedded Database's, awaited. Must never: block the event
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
import os
import ssl
import time
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

import anyio
import anyio.abc

from stemedb import _protocol
from stemedb.client._core import ClientCore, Exchange
from stemedb.client._policy import (
    Nodes,
    ReconnectPlan,
    Resend,
    RetryPolicy,
    connect_refusal_is_final,
)
from stemedb.client._wire import (
    CLIENT_NAME,
    Address,
    Scanned,
    Session,
    acks_flag,
    audit_entries,
    audit_limit,
    get_payloads,
    id_array,
    ids_from,
    of_kind,
    query_request,
    query_resolution,
    records_batches,
    records_from,
    scan_payload,
    signed_batch,
    verify_report,
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
    Unavailable,
)
from stemedb.records import Envelope, Epoch, Signer, Vote
from stemedb.reports import VerifyReport
from stemedb.results import Resolution

RECEIVE_BYTES = 256 * 1024
SIGN_IN_THREAD = 256  # batches at least this large are signed off the event loop


class _Waiter(Exchange):
    """One request in flight (a core Exchange) that a task can wait for."""

    __slots__ = ("event",)

    def __init__(self, opcode: int) -> None:
        super().__init__(opcode)
        self.event = anyio.Event()


class _AsyncConnection:
    """The anyio driver of one connected, authenticated ClientCore: a reader task feeds it."""

    def __init__(self, stream: anyio.abc.ByteStream, core: ClientCore) -> None:
        assert core.session is not None
        self.stream = stream
        self.core = core
        self.session: Session = core.session
        self._send_lock = anyio.Lock()

    @property
    def error(self) -> BaseException | None:
        return self.core.error

    async def start(self, opcode: int, payload: bytes, flags: int = 0) -> _Waiter:
        waiter = _Waiter(opcode)
        _exchange, frame = self.core.request_exchange(waiter, payload, flags)
        try:
            async with self._send_lock:
                await self.stream.send(frame)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            await self.fail(ConnectionLost(f"connection lost while sending: {exc}"))
            raise ConnectionLost(f"connection lost while sending: {exc}") from None
        return waiter

    def forget(self, waiter: _Waiter) -> None:
        self.core.forget(waiter)

    async def read_loop(self) -> None:
        try:
            while True:
                try:
                    data = await self.stream.receive(RECEIVE_BYTES)
                except anyio.EndOfStream:
                    raise ConnectionLost("the server closed the connection") from None
                _wake(self.core.receive(data))
        except anyio.get_cancelled_exc_class():
            await self.fail(ConnectionLost("the client closed the connection"))
            raise
        except BaseException as exc:  # noqa: B036 - every pending request must hear about it
            if not isinstance(exc, StemeError):
                exc = ConnectionLost(f"connection lost: {exc}")
            await self.fail(exc)

    async def fail(self, error: BaseException) -> None:
        _wake(self.core.lost(error))
        with anyio.CancelScope(shield=True):
            await anyio.aclose_forcefully(self.stream)


def _wake(exchanges: list[Exchange]) -> None:
    for exchange in exchanges:
        assert isinstance(exchange, _Waiter)
        exchange.event.set()


class AsyncClient:
    """An anyio client; use ``async with connect_async(url, token=...) as client``."""

    def __init__(self, url: str | Sequence[str] | None = "stemedb://127.0.0.1:7440", *,
                 token: str | None = None, timeout: float = 30.0, connect_timeout: float = 10.0,
                 ssl_context: ssl.SSLContext | None = None, reconnect: bool = True,
                 retries: int | None = None, reconnect_window: float = 10.0,
                 cluster: str | os.PathLike[str] | None = None, name: str = CLIENT_NAME) -> None:
        self.nodes = Nodes.of(url, cluster, tls=ssl_context is not None)
        self.policy = RetryPolicy(enabled=reconnect, window=reconnect_window, retries=retries)
        self.token = token
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.ssl_context = ssl_context
        if ssl_context is None and any(address.tls for address in self.nodes.addresses):
            self.ssl_context = ssl.create_default_context()
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
    def address(self) -> Address:
        """The node this client uses (or last used)."""
        return self.nodes.current

    @property
    def session(self) -> Session:
        if self._conn is None:
            raise ClientClosed("not connected: use `async with connect_async(...) as client`")
        return self._conn.session

    async def _open(self, address: Address) -> _AsyncConnection:
        with anyio.fail_after(self.connect_timeout):
            stream: anyio.abc.ByteStream
            if self.ssl_context is not None:
                stream = await anyio.connect_tcp(address.host, address.port, tls=True,
                                                 ssl_context=self.ssl_context,
                                                 tls_standard_compatible=False)
            else:
                stream = await anyio.connect_tcp(address.host, address.port)
            try:
                core = ClientCore(self.token, self.name)
                await stream.send(core.hello())
                while core.session is None:
                    try:
                        core.receive_hello(await stream.receive(RECEIVE_BYTES))
                    except anyio.EndOfStream:
                        raise ConnectionLost("the server closed the connection during the handshake") from None
            except BaseException:
                await anyio.aclose_forcefully(stream)
                raise
        return _AsyncConnection(stream, core)

    async def _connection(self) -> _AsyncConnection:
        """The open connection, or a new one: every node in turn, with backoff (_policy)."""
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
            plan = ReconnectPlan(self.nodes, self.policy, time.monotonic())
            while True:
                address, delay = plan.next_attempt(time.monotonic())
                if delay:
                    await anyio.sleep(delay)
                try:
                    conn = await self._open(address)
                    break
                except ssl.SSLCertVerificationError:
                    raise
                except (OSError, StemeError, anyio.BrokenResourceError) as exc:
                    if connect_refusal_is_final(exc):
                        raise  # e.g. a refused token: trying again cannot help
                    plan.failed(address, exc)
            self.nodes.worked(address)
            if self._conn is not None:
                self.reconnects += 1
            self._conn = conn
            self._tg.start_soon(conn.read_loop)
            return conn

    async def _requests(self, opcode: int, payloads: Sequence[bytes], timeout: float | None = None, *,
                        idempotent: bool = True, flags: int = 0) -> list[list[bytes]]:
        """As Client._requests: resent whole while the policy allows (_policy.resend_after)."""
        limit = self.timeout if timeout is None else timeout
        resend = Resend(self.policy, idempotent=idempotent)
        while True:
            conn = await self._connection()
            waiters: list[_Waiter] = []
            try:
                for payload in payloads:
                    waiters.append(await conn.start(opcode, payload, flags))
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
            except (ConnectionLost, Unavailable) as exc:
                delay = resend.after(exc, sent=bool(waiters), now=time.monotonic(), closed=self._closed)
                if delay:
                    await anyio.sleep(delay)

    async def _request(self, opcode: int, payload: bytes, timeout: float | None = None) -> list[bytes]:
        return (await self._requests(opcode, [payload], timeout))[0]

    # ------------------------------------------------------------ operations

    async def ping(self, timeout: float | None = None) -> float:
        started = time.perf_counter()
        await self._request(_protocol.PING, b"", timeout)
        return time.perf_counter() - started

    async def put(self, record: Any, *, acks: str | None = None, timeout: float | None = None) -> bytes:
        return (await self.put_many([record], acks=acks, timeout=timeout))[0]

    async def put_many(self, records: Iterable[Any], *, envelope: Envelope | Sequence[Envelope] | None = None,
                       acks: str | None = None, timeout: float | None = None) -> list[bytes]:
        """As Client.put_many (`acks`: "1", "all", or None for the cluster's default)."""
        return await self._put(_protocol.PUT, list(records), envelope, timeout, acks)

    async def _put(self, opcode: int, records: list[Any], envelope: Any, timeout: float | None,
                   acks: str | None = None) -> list[bytes]:
        flags = acks_flag(acks)
        envelopes = 0 if envelope is None else (1 if isinstance(envelope, Envelope) else len(envelope))
        await self._connection()
        payloads = records_batches(records, envelope, self.session.max_frame)
        answers = await self._requests(opcode, payloads, timeout, flags=flags)
        return ids_from([payload for answer in answers for payload in answer])[envelopes:]

    async def vote(self, vote: Any, *, acks: str | None = None, timeout: float | None = None) -> bytes:
        return (await self._put(_protocol.VOTE, [of_kind(vote, Vote, "vote")], None, timeout, acks))[0]

    async def epoch(self, epoch: Any, *, acks: str | None = None, timeout: float | None = None) -> bytes:
        return (await self._put(_protocol.EPOCH, [of_kind(epoch, Epoch, "epoch")], None, timeout, acks))[0]

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

    async def query(self, subject: str, predicate: str | None = None, *, lens: Any = "recency",
                    lifecycle: Any = "any", epoch: Any = None, as_of: int | None = None,
                    decay: bool = False, now: int | None = None, audit: bool = False,
                    timeout: float | None = None) -> Resolution | dict[str, Resolution]:
        """As Client.query (and `Database.query`): a Resolution or predicate → Resolution."""
        payload = query_request(subject, predicate, lens, lifecycle, epoch, as_of, decay, now, audit)
        answers = await self._requests(_protocol.QUERY, [payload], timeout, idempotent=not audit)
        return query_resolution(answers[0])

    async def scan(self, subject: str | None = None, predicate: str | None = None, *,
                   kind: str | None = None, limit: int | None = None,
                   timeout: float | None = None) -> Scanned:
        """As Client.scan: an iterator over the records (at most MAX_SCAN when limit is None)."""
        wanted = _protocol.MAX_SCAN if limit is None else limit
        payloads = await self._request(_protocol.SCAN, scan_payload(subject, predicate, kind, wanted), timeout)
        return Scanned(records_from(payloads, allow_absent=False))

    async def stats(self, *, timeout: float | None = None) -> dict[str, Any]:
        payload = (await self._request(_protocol.STATS, b"", timeout))[0]
        return dict(json.loads(_protocol.decode_text(payload)))

    async def audit(self, agent: Any = None, since: int | None = None, limit: int | None = 100, *,
                    timeout: float | None = None) -> list[dict[str, Any]]:
        """As Client.audit (and `Database.audit`)."""
        wanted = audit_limit(agent, since, limit)
        payload = (await self._request(_protocol.AUDIT, _protocol.encode_u32(wanted), timeout))[0]
        return audit_entries(json.loads(_protocol.decode_text(payload)), agent, since, limit)

    async def verify(self, *, timeout: float | None = None) -> VerifyReport:
        """As Client.verify: the server's scrub of its store (admin role)."""
        return verify_report((await self._request(_protocol.VERIFY, b"", timeout))[0])

    def writer(self, signer: Signer, *, linger: float = 0.002, max_records: int = 4096,
               max_batches_in_flight: int = 16, acks: str | None = None) -> AsyncWriter:
        return AsyncWriter(self, signer, linger=linger, max_records=max_records,
                           max_batches_in_flight=max_batches_in_flight, acks=acks)


class _Written:
    """One record put through an AsyncWriter: its ID once its batch is durable, or the error."""

    __slots__ = ("event", "value", "error")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.value: bytes | None = None
        self.error: BaseException | None = None

    def result(self) -> bytes:
        if self.error is not None:
            raise self.error
        assert self.value is not None
        return self.value


class AsyncWriter:
    """Group signing for async code: `await writer.put(record)` returns its ID once durable.

    Records put by any number of tasks are gathered for up to `linger`
    seconds or `max_records`, signed with one envelope, and sent as one
    pipelined PUT (see ClientWriter). The flusher task runs in the client's
    task group.
    """

    def __init__(self, client: AsyncClient, signer: Signer, *, linger: float = 0.002,
                 max_records: int = 4096, max_batches_in_flight: int = 16, acks: str | None = None) -> None:
        if not isinstance(signer, Signer):
            raise TypeError(f"writer() expects a stemedb.Signer, got {type(signer).__name__}")
        self._flags = acks_flag(acks)
        self.client = client
        self.signer = signer
        self.linger = linger
        self.max_records = max_records
        self.batches_sent = 0
        self._pending: list[tuple[Any, _Written]] = []
        self._wakeup: anyio.Event | None = None
        self._slots = anyio.Semaphore(max_batches_in_flight)
        self._running = False
        self._unanswered = 0
        self._idle: anyio.Event | None = None
        self._closed = False

    def _queue(self, record: Any) -> _Written:
        if self._closed:
            raise ClientClosed("the writer is closed")
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
        waiter = _Written()
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
        """Store many records (signed in batches of max_records); their IDs once all are durable."""
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

    async def close(self) -> None:
        """Wait for what was put, then refuse further puts (ClientClosed)."""
        self._closed = True
        await self.flush()

    async def __aenter__(self) -> AsyncWriter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

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

    async def _send(self, batch: list[tuple[Any, _Written]]) -> None:
        try:
            records = [record for record, _ in batch]
            await self.client._connection()
            max_frame = self.client.session.max_frame
            if len(records) >= SIGN_IN_THREAD:
                payload = await anyio.to_thread.run_sync(signed_batch, records, self.signer, max_frame)
            else:
                payload = signed_batch(records, self.signer, max_frame)
            answers = await self.client._requests(_protocol.PUT, [payload], flags=self._flags)
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


def connect_async(url: str | Sequence[str] | None = "stemedb://127.0.0.1:7440", *,
                  token: str | None = None, **options: Any) -> AsyncClient:
    """An AsyncClient to enter with ``async with`` (see AsyncClient for options)."""
    return AsyncClient(url, token=token, **options)


__all__ = ["AsyncClient", "AsyncWriter", "connect_async"]
