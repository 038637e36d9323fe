"""The blocking client: `stemedb.client.connect("stemedb://host:port", token=...)`.

Owns: one TCP (or TLS) connection at a time to one of its nodes (a URL,
several, or a cluster file's), a reader thread that matches answers to
requests by request id (so any number of threads can have requests in
flight on the one connection: pipelining), per-request timeouts, reconnection
and failover on the schedule of stemedb.client._policy (every node in turn,
backoff, a time window), resending what is safe to resend (every write is
idempotent — records are content-addressed — and reads change nothing; an
audited query is not resent once sent), and the group-signing writer. Its
methods are the embedded Database's (docs/protocol.md, "Python clients").
Must never: hold the send lock while waiting for an answer, or run user code
in the reader thread.

Resource handling: a Client owns its socket and reader thread; `close()` (or
the context manager) closes both. A ClientWriter owns one flusher thread;
`close()` flushes and stops it.
Error handling: error frames become the StemeError class that owns their
code (stemedb.errors); RequestTimeout when no answer arrives in time;
ConnectionLost (an Unavailable) when the connection broke and the reconnect
window passed. Connecting goes on after failures whose class is retry_safe
(too many connections, unavailable, timeouts) and socket errors, never after
the others (a refused token, a protocol error).
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from stemedb import _protocol
from stemedb.client._core import ClientCore, Exchange
from stemedb.client._policy import (
    Nodes,
    ReconnectPlan,
    Resend,
    RetryPolicy,
    connect_refusal_is_final,
    resend_after,
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


class _PlainTransport:
    """A connected socket; `send` is thread-safe, `recv` is for the reader thread only."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()

    def send(self, *parts: bytes) -> None:
        with self._send_lock:
            for part in parts:
                self.sock.sendall(part)

    def recv(self) -> bytes:
        return self.sock.recv(RECEIVE_BYTES)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class _TlsTransport(_PlainTransport):
    """TLS through an SSLObject and memory BIOs: the socket is read and written by
    different threads, which an SSLSocket does not allow; ciphertext is written
    under the send lock in the order it was produced."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, hostname: str) -> None:
        super().__init__(sock)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname=hostname)
        self._tls_lock = threading.Lock()
        while not self._handshake_step():
            self._flush()
            data = sock.recv(RECEIVE_BYTES)
            if not data:
                raise ConnectionLost("the server closed the connection during the TLS handshake")
            self._incoming.write(data)
        self._flush()

    def _handshake_step(self) -> bool:
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    def _flush(self) -> None:
        with self._tls_lock:
            out = self._outgoing.read()
        if out:
            self.sock.sendall(out)

    def send(self, *parts: bytes) -> None:
        with self._send_lock:
            with self._tls_lock:
                for part in parts:
                    self._tls.write(part)
                out = self._outgoing.read()
            self.sock.sendall(out)

    def recv(self) -> bytes:
        while True:
            with self._tls_lock:
                try:
                    data = self._tls.read(RECEIVE_BYTES)
                except ssl.SSLWantReadError:
                    data = b""
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    return b""
                produced = self._outgoing.pending
            if produced:  # e.g. a TLS 1.3 key update answer
                with self._send_lock:
                    self._flush()
            if data:
                return data
            raw = self.sock.recv(RECEIVE_BYTES)
            if not raw:
                return b""
            with self._tls_lock:
                self._incoming.write(raw)


class _Call(Exchange):
    """One request in flight (a core Exchange) that a thread can wait for."""

    __slots__ = ("event", "callback")

    def __init__(self, opcode: int, callback: Callable[[_Call], None] | None = None) -> None:
        super().__init__(opcode)
        self.event = threading.Event()
        self.callback = callback


class _Connection:
    """The socket driver of one connected, authenticated ClientCore: a reader thread feeds it.

    Every call into the core is made under `_lock` (threads start requests
    while the reader thread delivers answers); waiters are woken outside it.
    """

    def __init__(self, transport: _PlainTransport, core: ClientCore) -> None:
        assert core.session is not None
        self.transport = transport
        self.core = core
        self.session: Session = core.session
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read_loop, name="stemedb-client-reader", daemon=True)
        self._thread.start()

    @property
    def error(self) -> BaseException | None:
        return self.core.error

    def start(self, opcode: int, payload: bytes, callback: Callable[[_Call], None] | None = None,
              flags: int = 0) -> _Call:
        call = _Call(opcode, callback)
        with self._lock:
            _exchange, frame = self.core.request_exchange(call, payload, flags)
        try:
            self.transport.send(frame)
        except OSError as exc:
            self._break(ConnectionLost(f"connection lost while sending: {exc}"))
            raise ConnectionLost(f"connection lost while sending: {exc}") from None
        return call

    def forget(self, call: _Call) -> None:
        with self._lock:
            self.core.forget(call)

    def _read_loop(self) -> None:
        try:
            while True:
                data = self.transport.recv()
                if not data:
                    raise ConnectionLost("the server closed the connection")
                with self._lock:
                    finished = self.core.receive(data)
                _wake(finished)
        except BaseException as exc:  # noqa: B036 - the reader thread must report everything
            if not isinstance(exc, StemeError):
                exc = ConnectionLost(f"connection lost: {exc}")
            self._break(exc)

    def _break(self, error: BaseException) -> None:
        with self._lock:
            failed = self.core.lost(error)
        _wake(failed)
        self.transport.close()

    def close(self) -> None:
        self._break(ConnectionLost("the client closed the connection"))


def _wake(exchanges: list[Exchange]) -> None:
    for exchange in exchanges:
        assert isinstance(exchange, _Call)
        exchange.event.set()
        if exchange.callback is not None:
            exchange.callback(exchange)


class Client:
    """A blocking, thread-safe client; many threads may call it at once (their requests pipeline).

    Resource handling: owns one connection (reopened on demand after a loss);
    close() it, or use ``with connect(...) as client``.
    """

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
        self._conn: _Connection | None = None
        self._conn_lock = threading.Lock()
        self._closed = False
        self._connection()

    # ------------------------------------------------------------ connection

    @property
    def address(self) -> Address:
        """The node this client uses (or last used)."""
        return self.nodes.current

    @property
    def session(self) -> Session:
        """The server's HELLO answer (protocol version, role, limits)."""
        return self._connection().session

    def _open(self, address: Address) -> _Connection:
        sock = socket.create_connection((address.host, address.port), timeout=self.connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            transport: _PlainTransport
            if self.ssl_context is not None:
                transport = _TlsTransport(sock, self.ssl_context, address.host)
            else:
                transport = _PlainTransport(sock)
            core = ClientCore(self.token, self.name)
            transport.send(core.hello())
            while core.session is None:
                data = transport.recv()
                if not data:
                    raise ConnectionLost("the server closed the connection during the handshake")
                core.receive_hello(data)
            sock.settimeout(None)
            return _Connection(transport, core)
        except BaseException:
            sock.close()
            raise

    def _connection(self) -> _Connection:
        """The open connection, or a new one: every node in turn, with backoff (_policy)."""
        conn = self._conn
        if conn is not None and conn.error is None:
            return conn
        with self._conn_lock:
            if self._closed:
                raise ClientClosed("the client is closed")
            conn = self._conn
            if conn is not None and conn.error is None:
                return conn
            plan = ReconnectPlan(self.nodes, self.policy, time.monotonic())
            while True:
                address, delay = plan.next_attempt(time.monotonic())
                if delay:
                    time.sleep(delay)
                try:
                    conn = self._open(address)
                    break
                except ssl.SSLCertVerificationError:
                    raise
                except (OSError, StemeError) as exc:
                    if connect_refusal_is_final(exc):
                        raise  # e.g. a refused token: trying again cannot help
                    plan.failed(address, exc)
            self.nodes.worked(address)
            if self._conn is not None:
                self.reconnects += 1
            self._conn = conn
            return conn

    def _requests(self, opcode: int, payloads: Sequence[bytes], timeout: float | None = None, *,
                  idempotent: bool = True, flags: int = 0) -> list[list[bytes]]:
        """Send every payload (pipelined), wait for all answers; resent whole after a lost
        connection or an unavailable node, while the policy allows (_policy.resend_after)."""
        limit = self.timeout if timeout is None else timeout
        resend = Resend(self.policy, idempotent=idempotent)
        while True:
            conn = self._connection()
            calls: list[_Call] = []
            try:
                for payload in payloads:
                    calls.append(conn.start(opcode, payload, flags=flags))
                deadline = time.monotonic() + limit
                for call in calls:
                    if not call.event.wait(max(deadline - time.monotonic(), 0.0)):
                        for pending in calls:
                            conn.forget(pending)
                        raise RequestTimeout(
                            f"no answer from {self.address} within {limit:g} s "
                            f"({_protocol.OPCODE_NAMES.get(opcode, opcode)}); writes are idempotent, "
                            "retrying is safe")
                return [call.result() for call in calls]
            except (ConnectionLost, Unavailable) as exc:
                delay = resend.after(exc, sent=bool(calls), now=time.monotonic(), closed=self._closed)
                if delay:
                    time.sleep(delay)

    def _request(self, opcode: int, payload: bytes, timeout: float | None = None) -> list[bytes]:
        return self._requests(opcode, [payload], timeout)[0]

    def close(self) -> None:
        with self._conn_lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<stemedb.Client {self.address}>"

    # ------------------------------------------------------------ operations

    def ping(self, timeout: float | None = None) -> float:
        """Round-trip time in seconds."""
        started = time.perf_counter()
        self._request(_protocol.PING, b"", timeout)
        return time.perf_counter() - started

    def put(self, record: Any, *, acks: str | None = None, timeout: float | None = None) -> bytes:
        """Store one signed record; returns its ID once it is durable."""
        return self.put_many([record], acks=acks, timeout=timeout)[0]

    def put_many(self, records: Iterable[Any], *, envelope: Envelope | Sequence[Envelope] | None = None,
                 acks: str | None = None, timeout: float | None = None) -> list[bytes]:
        """Store individually signed records, or `members` proven by `envelope`; IDs in order.

        Returns once every record is durable. Large batches travel as several
        pipelined frames (a batch proven by envelopes must fit one frame).
        `acks` ("1" or "all"; None: the cluster file's default) chooses, on a
        cluster node, when the answer comes: durable on one replica of each
        record's partition, or on every live one (docs/replication.md). A
        single server is its only replica: both mean durable there.
        """
        return self._put(_protocol.PUT, list(records), envelope, timeout, acks)

    def _put(self, opcode: int, records: list[Any], envelope: Any, timeout: float | None,
             acks: str | None = None) -> list[bytes]:
        flags = acks_flag(acks)
        envelopes = 0 if envelope is None else (1 if isinstance(envelope, Envelope) else len(envelope))
        payloads = records_batches(records, envelope, self.session.max_frame)
        answers = self._requests(opcode, payloads, timeout, flags=flags)
        ids = ids_from([payload for answer in answers for payload in answer])
        return ids[envelopes:]

    def vote(self, vote: Any, *, acks: str | None = None, timeout: float | None = None) -> bytes:
        """Store one signed Vote; returns its ID once durable (`acks` as in put_many)."""
        return self._put(_protocol.VOTE, [of_kind(vote, Vote, "vote")], None, timeout, acks)[0]

    def epoch(self, epoch: Any, *, acks: str | None = None, timeout: float | None = None) -> bytes:
        """Store one signed Epoch; returns its ID once durable (`acks` as in put_many)."""
        return self._put(_protocol.EPOCH, [of_kind(epoch, Epoch, "epoch")], None, timeout, acks)[0]

    def get(self, record_id: bytes, *, timeout: float | None = None) -> Any:
        """The record with this ID; NotFound if the server has none."""
        record = self.get_many([record_id], timeout=timeout)[0]
        if record is None:
            raise NotFound(f"no record with ID {bytes(record_id).hex()}")
        return record

    def get_many(self, ids: Any, *, timeout: float | None = None) -> list[Any]:
        """Records for many IDs (a list of 32-byte IDs or an (n, 32) uint8 array); None where absent."""
        array = id_array(ids)
        answers = self._requests(_protocol.GET, get_payloads(array, self.session.max_frame), timeout)
        return records_from([payload for answer in answers for payload in answer], allow_absent=True)[:len(array)]

    def query(self, subject: str, predicate: str | None = None, *, lens: Any = "recency",
              lifecycle: Any = "any", epoch: Any = None, as_of: int | None = None,
              decay: bool = False, now: int | None = None, audit: bool = False,
              timeout: float | None = None) -> Resolution | dict[str, Resolution]:
        """Resolve claims as `Database.query` does (same arguments, defaults and result types).

        A Resolution, or with predicate=None a mapping predicate → Resolution.
        `lens` is a name, a Lens object or a Lens class. There is no `agent`:
        the server records the token's name. Raises Unsupported if the
        server has no resolution engine.
        """
        payload = query_request(subject, predicate, lens, lifecycle, epoch, as_of, decay, now, audit)
        # An audited query appends to the audit log: not resent once sent (it could count twice).
        return query_resolution(self._requests(_protocol.QUERY, [payload], timeout, idempotent=not audit)[0])

    def scan(self, subject: str | None = None, predicate: str | None = None, *,
             kind: str | None = None, limit: int | None = None,
             timeout: float | None = None) -> Scanned:
        """Stored records in write order, by subject and/or predicate and kind (an iterator).

        One SCAN: at most `limit` records, and at most MAX_SCAN (1,000,000)
        when `limit` is None (the embedded scan has no limit).
        """
        wanted = _protocol.MAX_SCAN if limit is None else limit
        payloads = self._request(_protocol.SCAN, scan_payload(subject, predicate, kind, wanted), timeout)
        return Scanned(records_from(payloads, allow_absent=False))

    def stats(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The store's figures (as `Database.stats`), and the server's under "server"."""
        return dict(json.loads(_protocol.decode_text(self._request(_protocol.STATS, b"", timeout)[0])))

    def audit(self, agent: Any = None, since: int | None = None, limit: int | None = 100, *,
              timeout: float | None = None) -> list[dict[str, Any]]:
        """Recorded queries, oldest first, as `Database.audit` (admin role)."""
        wanted = audit_limit(agent, since, limit)
        entries = json.loads(_protocol.decode_text(
            self._request(_protocol.AUDIT, _protocol.encode_u32(wanted), timeout)[0]))
        return audit_entries(entries, agent, since, limit)

    def verify(self, *, timeout: float | None = None) -> VerifyReport:
        """The server scrubs its store (`Database.verify`: every checksum, ID, footer and file)
        and answers its report (admin role). A large store takes a while: give a `timeout` to
        match (about a second per GB)."""
        return verify_report(self._request(_protocol.VERIFY, b"", timeout)[0])

    def writer(self, signer: Signer, *, linger: float = 0.002, max_records: int = 4096,
               max_batches_in_flight: int = 16, acks: str | None = None) -> ClientWriter:
        """A group-signing writer: see ClientWriter (`acks` as in put_many, for all its batches)."""
        return ClientWriter(self, signer, linger=linger, max_records=max_records,
                            max_batches_in_flight=max_batches_in_flight, acks=acks)


class WriteTicket:
    """The pending result of one ClientWriter.submit(): `result(timeout)` gives the record's ID.

    Lighter than a concurrent.futures.Future (one per batch is waited on, not
    one per record), so a single thread can keep many thousands of writes in flight.
    """

    __slots__ = ("_batch", "_index")

    def __init__(self, batch: _Batch, index: int) -> None:
        self._batch = batch
        self._index = index

    def done(self) -> bool:
        return self._batch.event.is_set()

    def result(self, timeout: float | None = None) -> bytes:
        """The ID once the record is durable; raises what refused its batch, or RequestTimeout."""
        if not self._batch.event.wait(timeout):
            raise RequestTimeout(f"writer: no answer within {timeout:g} s; resending is safe")
        if self._batch.error is not None:
            raise self._batch.error
        assert self._batch.ids is not None
        return self._batch.ids[self._index]


class _Batch:
    """Records gathered for one envelope; answered together."""

    __slots__ = ("records", "event", "ids", "error", "tries", "outage")

    def __init__(self) -> None:
        self.records: list[Any] = []
        self.event = threading.Event()
        self.ids: list[bytes] | None = None
        self.error: BaseException | None = None
        self.tries = 0
        self.outage: float | None = None  # when its first send was cut off


class ClientWriter:
    """Group signing on the client: unsigned records in, durable IDs out.

    Records submitted from any number of threads are gathered for up to
    `linger` seconds or `max_records` records, signed with ONE envelope by
    `signer` (one Ed25519 signature per batch), and sent as one PUT; batches
    are pipelined (up to `max_batches_in_flight` unanswered). `put(record)`
    returns the record's ID once the server has made it durable;
    `submit(record)` returns a WriteTicket for the same, so one thread can
    keep many writes in flight. A batch cut off by a lost connection is
    re-signed and resent (records are content-addressed: resending is safe).

    Resource handling: owns a flusher thread; `close()` sends what is queued,
    waits for the answers and stops it.
    """

    def __init__(self, client: Client, signer: Signer, *, linger: float = 0.002,
                 max_records: int = 4096, max_batches_in_flight: int = 16, acks: str | None = None) -> None:
        if not isinstance(signer, Signer):
            raise TypeError(f"writer() expects a stemedb.Signer, got {type(signer).__name__}")
        self._flags = acks_flag(acks)
        self.client = client
        self.signer = signer
        self.linger = linger
        self.max_records = max_records
        self.batches_sent = 0
        self._open = _Batch()
        self._sealed: list[_Batch] = []   # full batches, and batches to resend, in order
        self._unanswered: set[_Batch] = set()
        self._cond = threading.Condition()
        self._slots = threading.Semaphore(max_batches_in_flight)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="stemedb-client-writer", daemon=True)
        self._thread.start()

    def _check(self, record: Any) -> None:
        if not hasattr(record, "_with_proof") or isinstance(record, Envelope):
            raise InvalidRecord(f"expected an Assertion, Vote or Epoch, got {type(record).__name__}")
        if record.signers not in ((), (self.signer.public_key,)):
            raise SignatureError("the record declares other signers than the writer's")

    def submit(self, record: Any) -> WriteTicket:
        """Queue an unsigned record (or one declaring only this signer); a ticket for its ID."""
        self._check(record)
        with self._cond:
            if self._closed:
                raise ClientClosed("the writer is closed")
            batch = self._open
            batch.records.append(record)
            if len(batch.records) == 1:
                self._unanswered.add(batch)
                self._cond.notify_all()
            if len(batch.records) >= self.max_records:
                self._seal()
            return WriteTicket(batch, len(batch.records) - 1)

    def submit_many(self, records: Iterable[Any]) -> list[WriteTicket]:
        """Queue many records at once (cheaper than submit() one by one)."""
        records = list(records)
        for record in records:
            self._check(record)
        tickets: list[WriteTicket] = []
        with self._cond:
            if self._closed:
                raise ClientClosed("the writer is closed")
            start = 0
            while start < len(records):
                batch = self._open
                if not batch.records:
                    self._unanswered.add(batch)
                take = min(self.max_records - len(batch.records), len(records) - start)
                first = len(batch.records)
                batch.records.extend(records[start:start + take])
                tickets.extend(WriteTicket(batch, first + i) for i in range(take))
                start += take
                if len(batch.records) >= self.max_records:
                    self._seal()
            self._cond.notify_all()
        return tickets

    def _seal(self) -> None:  # holding _cond
        self._sealed.append(self._open)
        self._open = _Batch()
        self._cond.notify_all()

    def put(self, record: Any, *, timeout: float | None = None) -> bytes:
        """Store one record, signed with the batch it joins; returns its ID once durable."""
        return self.submit(record).result(self.client.timeout if timeout is None else timeout)

    def put_many(self, records: Iterable[Any], *, timeout: float | None = None) -> list[bytes]:
        """Store many records (signed in batches of max_records); their IDs once all are durable."""
        limit = self.client.timeout if timeout is None else timeout
        return [ticket.result(limit) for ticket in self.submit_many(records)]

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything submitted so far has been answered."""
        deadline = time.monotonic() + (self.client.timeout if timeout is None else timeout)
        with self._cond:
            waiting = list(self._unanswered)
            self._cond.notify_all()
        for batch in waiting:
            if not batch.event.wait(max(deadline - time.monotonic(), 0.0)):
                raise RequestTimeout("writer: answers still missing at the flush timeout")

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
        try:
            self.flush()
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            self._thread.join()

    def __enter__(self) -> ClientWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_batch(self) -> _Batch | None:
        with self._cond:
            while True:
                if self._sealed:
                    return self._sealed.pop(0)
                if self._open.records:
                    break
                if self._closed:
                    return None
                self._cond.wait()
            deadline = time.monotonic() + self.linger
            while not self._sealed and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._sealed:
                return self._sealed.pop(0)
            batch = self._open
            self._open = _Batch()
            return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._slots.acquire()
            self._send(batch)

    def _send(self, batch: _Batch) -> None:
        try:
            conn = self.client._connection()
            payload = signed_batch(batch.records, self.signer, conn.session.max_frame)
            conn.start(_protocol.PUT, payload, callback=lambda call: self._answered(batch, call),
                       flags=self._flags)
            self.batches_sent += 1
        except BaseException as exc:  # noqa: B036 - every waiter must hear about it
            self._slots.release()
            if not (resend_after(exc, sent=False, idempotent=True) and self._requeue(batch)):
                self._settle(batch, error=exc)

    def _requeue(self, batch: _Batch) -> bool:
        """Put a batch cut off by a lost connection (or an unavailable node) back in front of the
        queue, to be re-signed and resent while the reconnect window lasts."""
        now = time.monotonic()
        batch.outage = now if batch.outage is None else batch.outage
        batch.tries += 1
        if self.client._closed or not self.client.policy.may_continue(batch.outage, now, batch.tries):
            return False
        with self._cond:
            self._sealed.insert(0, batch)
            self._cond.notify_all()
        return True

    def _answered(self, batch: _Batch, call: _Call) -> None:
        """Runs in the reader thread: settle the batch (or requeue it)."""
        self._slots.release()
        if call.error is not None and resend_after(call.error, sent=True, idempotent=True) \
                and self._requeue(batch):
            return
        if call.error is not None:
            self._settle(batch, error=call.error)
            return
        try:
            ids = ids_from(call.payloads)[1:]  # the envelope's ID comes first
            if len(ids) != len(batch.records):
                raise ProtocolError(f"the server returned {len(ids)} IDs for {len(batch.records)} records")
        except Exception as exc:
            self._settle(batch, error=exc)
            return
        self._settle(batch, ids=ids)

    def _settle(self, batch: _Batch, *, ids: list[bytes] | None = None,
                error: BaseException | None = None) -> None:
        batch.ids = ids
        batch.error = error
        batch.event.set()
        with self._cond:
            self._unanswered.discard(batch)


def connect(url: str | Sequence[str] | None = "stemedb://127.0.0.1:7440", *, token: str | None = None,
            **options: Any) -> Client:
    """Open a blocking client: `url` one URL or several, or `cluster=` a cluster file (see Client
    for the options: timeout, ssl_context, reconnect, reconnect_window, retries)."""
    return Client(url, token=token, **options)


__all__ = ["Client", "ClientWriter", "WriteTicket", "connect"]
