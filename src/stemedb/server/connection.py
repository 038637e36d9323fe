"""One binary-protocol connection: handshake, reader loop, pipelined requests, sender.

Owns: the per-connection state machine of docs/protocol.md (HELLO, then
authentication, then requests), the reader loop that cuts frames out of the
receive buffer with the compiled FrameReader, one task per request (many in
flight, answered by request id, possibly out of order), the sender task that
writes queued answers (small ones coalesced into one `send_all`, large ones in
slices), GET answers streamed frame by frame from the store, and the
handshake, idle and send timeouts. Must never: run a database call on the
event loop (they go through the Service in worker threads), read more frames
while `max_inflight` requests are unanswered or while its request bytes
cannot be reserved from the server's budget, build an answer frame before
its bytes are reserved (GET) or queue one without reserving them (the rest),
or keep serving a client after it broke the protocol.

Resource handling: `run()` owns the stream until it returns; the caller
closes it (Server.handle_stream does, with a lingering close so the final
error frame reaches the client). Request tasks live in a nursery inside
`run()`, so no task outlives the connection; on return every byte the
connection held of the buffer budget is given back (stemedb.server.buffers).
Error handling: a protocol violation (FrameError, a frame out of order, a
failed authentication, a timeout) sends one error frame with request id 0 (or
the offending frame's) and ends the connection; any error of one request is
answered with an error frame for that request and the connection goes on.
`BrokenResourceError` (the peer went away) ends the connection quietly; a
client whose socket takes nothing for `send_timeout` while answers wait is
disconnected (it cannot read an error frame either).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from stemedb import _codec, _protocol
from stemedb.errors import AuthError, RateLimited
from stemedb.records import RecordKind
from stemedb.server.auth import Authenticator, Principal, describe_peer
from stemedb.server.buffers import COALESCE_BYTES, SEND_SLICE, InputAccount, OutputQueue
from stemedb.server.service import ServiceError, error_code, frame_spans, parse_options

if TYPE_CHECKING:
    from stemedb.server.app import Server

log = logging.getLogger("stemedb.server")

RECEIVE_BYTES = 256 * 1024      # one receive_some at most; frames larger than this arrive in pieces
MIN_RECEIVE = 16 * 1024         # less room than this in the request allowance: reserve more first
ANSWER_FRAME = 1 << 20          # GET and SCAN answers are streamed in frames of about this size
CLOSE_GRACE = 5.0               # seconds to flush the last responses of a closing connection
DEFAULT_SCAN_LIMIT = 10_000
# Batches at least this large are decoded and verified by at most `bulk_threads` threads:
# that work holds the GIL, and more threads only contend for it (measured: 16 threads
# ingest big batches at half the rate of 2). Small writes mostly wait for the fsync, so
# many of them in flight make bigger group commits.
BULK_RECORDS = 256

Handler = Callable[["Connection", int, Any], Awaitable[None]]


class PendingFrame:
    """The declared size of the frame being received, noted as soon as its header is in.

    The compiled FrameReader validates headers and cuts frames; it does not
    say how long the frame it is waiting for will be. The connection needs
    that to reserve the whole frame from the budget before reading more of
    it, so this keeps the few bytes needed to read the length field itself.
    `update` is called once per received chunk, after every complete frame
    has been taken out: the pending frame then starts `buffered` bytes before
    the end of what was received, inside `carry` + the chunk.
    """

    def __init__(self) -> None:
        self.size = 0               # header + payload of the pending frame; 0 until its header is in
        self._of_frame = -1         # frames_read when it was noted (it is pending until that changes)
        self._carry = b""           # the start of a pending frame whose header is incomplete

    def update(self, chunk: bytes, buffered: int, frames_read: int) -> None:
        window = self._carry + chunk if self._carry else chunk
        if buffered < _protocol.FRAME_HEADER:
            self._carry = bytes(window[len(window) - buffered:]) if buffered else b""
            self.size = 0
            return
        self._carry = b""
        if self._of_frame != frames_read:
            start = len(window) - buffered
            header = window[start:start + _protocol.FRAME_HEADER]
            self.size = _protocol.FRAME_HEADER + int.from_bytes(header[8:12], "little")
            self._of_frame = frames_read

    def remaining(self, buffered: int) -> int:
        """Bytes of the pending frame still to come (0 if its size is not known)."""
        return max(0, self.size - buffered)


class Connection:
    """Serves one client over any trio Stream (TCP, TLS, or a memory stream in tests)."""

    def __init__(self, server: Server, stream: trio.abc.Stream, peer: Any) -> None:
        self.server = server
        self.stream = stream
        self.peer = peer
        limits = server.config.limits
        self.reader = _protocol.FrameReader(limits.preauth_frame)
        self.principal: Principal | None = None
        self.hello_done = False
        self.inflight = 0
        self.slots = trio.Semaphore(limits.max_inflight)
        self.input = InputAccount(server.budget.requests)
        self.output = OutputQueue(server.budget.answers, limits.output_buffer)
        self.fatal: str | None = None
        self.requests_served = 0
        self._receive_scope: trio.CancelScope | None = None
        self._requests: trio.Nursery | None = None
        self._handed_off = False  # the frame just dispatched now belongs to a request task
        self._pending = PendingFrame()

    # ------------------------------------------------------------- lifecycle

    def stop_reading(self) -> None:
        """Graceful shutdown: read no more requests; those in flight are still answered."""
        if self._receive_scope is not None:
            self._receive_scope.cancel()

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as outer:
                outer.start_soon(self._send_loop, outer.cancel_scope)
                try:
                    async with trio.open_nursery() as requests:
                        self._requests = requests
                        await self._read_loop()
                        if self.fatal is not None:  # drop the work of a client that broke the protocol
                            requests.cancel_scope.cancel()
                finally:
                    self.output.close()
                    outer.cancel_scope.deadline = min(outer.cancel_scope.deadline,
                                                      trio.current_time() + CLOSE_GRACE)
        finally:
            self.output.discard()
            self.input.close()

    async def _send_loop(self, scope: trio.CancelScope) -> None:
        timeout = self.server.config.limits.send_timeout
        while batch := await self.output.next_batch():
            try:
                parts = [part for frame, _ticket in batch for part in frame]
                if len(parts) > 1 and sum(len(part) for part in parts) <= COALESCE_BYTES:
                    parts = [b"".join(parts)]
                for part in parts:
                    view = memoryview(part)
                    for start in range(0, len(view), SEND_SLICE):
                        with trio.move_on_after(timeout) as timer:
                            try:
                                await self.stream.send_all(view[start:start + SEND_SLICE])
                            except (trio.BrokenResourceError, trio.ClosedResourceError):
                                scope.cancel()  # the peer is gone: nobody will read the answers
                                return
                        if timer.cancelled_caught:  # the client stopped reading its answers
                            self.server.metrics.rejected.labels("slow_reader").inc()
                            log.info("closing connection from %s: it took no answer bytes for %g s "
                                     "(%d bytes queued)", describe_peer(self.peer), timeout,
                                     self.output.queued)
                            scope.cancel()
                            return
            finally:  # written, or never to be: either way these bytes are no longer held
                for _frame, ticket in batch:
                    self.output.written(ticket)

    async def _read_loop(self) -> None:
        limits = self.server.config.limits
        deadline = trio.current_time() + limits.handshake_timeout
        if isinstance(self.stream, trio.SSLStream):
            with trio.move_on_at(deadline):
                try:
                    await self.stream.do_handshake()
                except trio.BrokenResourceError as exc:
                    log.info("TLS handshake with %s failed: %s", describe_peer(self.peer), exc)
                    return
            if trio.current_time() >= deadline:
                self.server.metrics.rejected.labels("handshake_timeout").inc()
                return
        chunk = b""  # the last bytes received, until the pending frame's size is noted from them
        while not self.server.draining:
            try:
                frame = self.reader.next()
            except _protocol.FrameError as exc:
                self._fail(int(exc.code), str(exc), int(exc.request_id))
                return
            if frame is not None:
                size = len(frame.payload)
                self.input.start_serving(size)  # held by the request from now on, not the buffer
                self.input.set_buffered(self.reader.buffered)
                self._handed_off = False
                try:
                    keep_going = await self._dispatch(frame)
                finally:
                    if not self._handed_off:
                        self.input.done_serving(size)
                if not keep_going:
                    return
                if self.principal is not None:  # a complete frame, once authenticated, is activity
                    deadline = trio.current_time() + limits.idle_timeout
                continue
            self._pending.update(chunk, self.reader.buffered, self.reader.frames_read)
            chunk = b""
            self.input.expect(self._pending.size)
            with trio.CancelScope(deadline=deadline) as scope:
                self._receive_scope = scope
                if self.server.draining:
                    scope.cancel()
                # Backpressure: beyond its free allowance, a connection reads only what it has
                # reserved from the server's request budget, a whole frame at a time; waiting
                # here leaves the client's bytes in the socket.
                wanted = max(MIN_RECEIVE, self._pending.remaining(self.reader.buffered))
                room = await self.input.make_room(wanted)
                try:
                    data = await self.stream.receive_some(min(RECEIVE_BYTES, room))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
            self._receive_scope = None
            if scope.cancelled_caught:
                if self.server.draining:
                    return
                if self.principal is None:
                    self._fail(_protocol.E_TIMEOUT, "handshake not completed within "
                               f"{limits.handshake_timeout:g} s", reason="handshake_timeout")
                    return
                if self.inflight:  # waiting for our own answers is not idleness
                    deadline = trio.current_time() + limits.idle_timeout
                    continue
                self._fail(_protocol.E_TIMEOUT, f"idle for {limits.idle_timeout:g} s; closing",
                           reason="idle_timeout")
                return
            if not data:
                return
            self.reader.feed(data)
            self.input.set_buffered(self.reader.buffered)
            chunk = data

    # --------------------------------------------------------------- replies

    def _fail(self, code: int, message: str, request_id: int = 0, *, reason: str | None = None) -> None:
        """Queue one error frame and mark the connection for closing (never blocks)."""
        self.fatal = message
        name = _protocol.ERROR_CODES.get(code, ("error", True))[0]
        self.server.metrics.rejected.labels(reason or name).inc()
        if code in (_protocol.E_PROTOCOL, _protocol.E_FRAME_TOO_LARGE, _protocol.E_UNSUPPORTED_VERSION):
            self.server.metrics.protocol_errors.labels(name).inc()
        log.info("closing connection from %s: %s", describe_peer(self.peer), message)
        payload = _protocol.encode_error(code, 0, message)
        frame = _protocol.frame_header(_protocol.ERROR, _protocol.RESPONSE, request_id, len(payload))
        self.output.queue_now(frame + payload)

    async def reply(self, opcode: int, request_id: int, payload: bytes, *, more: bool = False) -> None:
        """Queue one answer frame, waiting for room in this connection's queue and the budget."""
        header = _response_header(opcode, request_id, len(payload), more)
        ticket = await self.output.reserve(len(header) + len(payload))
        self.output.queue(ticket, header, payload)

    async def reply_error(self, request_id: int, code: int, message: str, retry_after: float = 0.0) -> None:
        retry_ms = min(int(retry_after * 1000) + (1 if retry_after > 0 else 0), 0xFFFFFFFF)
        await self.reply(_protocol.ERROR, request_id, _protocol.encode_error(code, retry_ms, message))

    # -------------------------------------------------------------- dispatch

    async def _dispatch(self, frame: _protocol.Frame) -> bool:
        """Handle one frame; False ends the connection."""
        opcode = frame.opcode
        if opcode == _protocol.HELLO:
            return self._hello(frame)
        if not self.hello_done:
            self._fail(_protocol.E_AUTH_REQUIRED, "send HELLO first", frame.request_id,
                       reason="auth_required")
            return False
        if opcode == _protocol.AUTH:
            return await self._auth(frame)
        if self.principal is None:
            self._fail(_protocol.E_AUTH_REQUIRED, "authenticate first (AUTH with a token)",
                       frame.request_id, reason="auth_required")
            return False
        server = self.server
        try:
            Authenticator.authorize(self.principal, opcode)
        except AuthError as exc:
            server.metrics.rejected.labels("forbidden").inc()
            await self.reply_error(frame.request_id, _protocol.E_FORBIDDEN, str(exc))
            return True
        entry = HANDLERS.get(opcode)
        if entry is None:  # replication opcodes: reserved, not served by this build
            server.metrics.rejected.labels("unsupported").inc()
            await self.reply_error(frame.request_id, _protocol.E_UNSUPPORTED,
                                   f"{_protocol.OPCODE_NAMES.get(opcode, hex(opcode))} is not "
                                   "served by this server")
            return True
        operation, parse, handler = entry
        try:
            server.limits.admit(self.principal.name, operation, trio.current_time())
        except RateLimited as exc:
            server.metrics.rejected.labels("rate_limited").inc()
            await self.reply_error(frame.request_id, _protocol.E_RATE_LIMITED, str(exc), exc.retry_after)
            return True
        try:
            args = parse(frame.payload)
        except _protocol.FrameError as exc:
            self._fail(int(exc.code), f"{operation}: {exc}", frame.request_id)
            return False
        acquired = False
        with trio.move_on_after(server.config.limits.idle_timeout):
            await self.slots.acquire()  # backpressure: no more reading while max_inflight are open
            acquired = True
        if not acquired:
            self._fail(_protocol.E_TIMEOUT, "the client does not read its answers", reason="slow_reader")
            return False
        self.inflight += 1
        assert self._requests is not None
        self._requests.start_soon(self._serve, operation, handler, frame.request_id, args, len(frame.payload))
        self._handed_off = True
        return True

    async def _serve(self, operation: str, handler: Handler, request_id: int, args: Any,
                     size: int) -> None:
        started = time.perf_counter()
        metrics = self.server.metrics
        try:
            await handler(self, request_id, args)
        except Exception as exc:
            code, message, retry_after = error_code(exc)
            metrics.request_errors.labels(operation, _protocol.ERROR_CODES.get(code, ("error",))[0]).inc()
            if code in (_protocol.E_RATE_LIMITED, _protocol.E_QUOTA_EXCEEDED):
                metrics.rejected.labels("quota" if operation in ("put", "vote", "epoch") else "rate_limited").inc()
            await self.reply_error(request_id, code, message, retry_after)
        finally:
            self.inflight -= 1
            self.requests_served += 1
            self.slots.release()
            self.input.done_serving(size)
            metrics.requests.labels(operation, "binary").inc()
            metrics.request_seconds.labels(operation).observe(time.perf_counter() - started)

    # ------------------------------------------------------------- handshake

    def _hello(self, frame: _protocol.Frame) -> bool:
        if self.hello_done:
            self._fail(_protocol.E_PROTOCOL, "HELLO sent twice", frame.request_id)
            return False
        try:
            min_version, max_version, _client, token = _protocol.decode_hello(frame.payload)
        except _protocol.FrameError as exc:
            self._fail(int(exc.code), f"HELLO: {exc}", frame.request_id)
            return False
        if max_version < _protocol.MIN_PROTOCOL_VERSION or min_version > _protocol.PROTOCOL_VERSION:
            self._fail(_protocol.E_UNSUPPORTED_VERSION,
                       f"client speaks versions {min_version}..{max_version}; this server speaks "
                       f"{_protocol.MIN_PROTOCOL_VERSION}..{_protocol.PROTOCOL_VERSION}",
                       frame.request_id)
            return False
        version = min(max_version, _protocol.PROTOCOL_VERSION)
        self.hello_done = True
        auth = self.server.auth
        try:
            principal = self._authenticate(token) if token else auth.anonymous(self.peer)
        except RateLimited as exc:
            self._fail(_protocol.E_RATE_LIMITED, str(exc), frame.request_id, reason="auth_throttled")
            return False
        except AuthError as exc:
            self._fail(_protocol.E_AUTH_FAILED, str(exc), frame.request_id, reason="auth_failed")
            return False
        flags = 0
        if principal is None:
            flags |= _protocol.SERVER_AUTH_REQUIRED
        else:
            self._authenticated(principal)
        if auth.protected_mode:
            flags |= _protocol.SERVER_PROTECTED_MODE
        if self.server.config.tls:
            flags |= _protocol.SERVER_TLS
        limits = self.server.config.limits
        payload = _protocol.encode_hello_ok(version, principal.role if principal else 0, flags,
                                            limits.max_frame, limits.max_inflight, self.server.config.name)
        header = _protocol.frame_header(_protocol.HELLO, _protocol.RESPONSE, frame.request_id, len(payload))
        self.output.queue_now(header + payload)
        return True

    async def _auth(self, frame: _protocol.Frame) -> bool:
        try:
            token = _protocol.decode_auth(frame.payload)
            principal = self._authenticate(token)
        except _protocol.FrameError as exc:
            self._fail(int(exc.code), f"AUTH: {exc}", frame.request_id)
            return False
        except RateLimited as exc:
            self._fail(_protocol.E_RATE_LIMITED, str(exc), frame.request_id, reason="auth_throttled")
            return False
        except AuthError as exc:
            self._fail(_protocol.E_AUTH_FAILED, str(exc), frame.request_id, reason="auth_failed")
            return False
        self._authenticated(principal)
        await self.reply(_protocol.AUTH, frame.request_id, _protocol.encode_role(principal.role))
        return True

    def _authenticate(self, token: str) -> Principal:
        """The token's principal; failures are counted per peer address and throttled."""
        limits, now = self.server.limits, trio.current_time()
        limits.check_auth_failures(self.peer, now)
        try:
            return self.server.auth.authenticate(token)
        except AuthError:
            limits.auth_failed(self.peer, now)
            raise

    def _authenticated(self, principal: Principal) -> None:
        self.principal = principal
        self.reader.max_payload = self.server.config.limits.max_frame


# ---------------------------------------------------------------- handlers
# Each opcode: (operation name for limits and metrics, payload parser run on
# the event loop — its FrameError is a protocol violation —, async handler).

def _parse_ping(payload: bytes) -> bytes:
    if len(payload) > _protocol.MAX_PING:
        raise _protocol.FrameError(f"PING: {len(payload)} bytes, the limit is {_protocol.MAX_PING}")
    return payload


async def _ping(conn: Connection, request_id: int, payload: bytes) -> None:
    await conn.reply(_protocol.PING, request_id, payload)


def _put_handler(opcode: int, kind: int | None) -> Handler:
    async def handle(conn: Connection, request_id: int, batch: tuple[Any, np.ndarray]) -> None:
        blob, offsets = batch
        server = conn.server
        server.metrics.put_records.observe(len(offsets) - 1)
        limiter = server.bulk_limiter if len(offsets) - 1 >= BULK_RECORDS else server.write_limiter
        ids = await trio.to_thread.run_sync(server.service.put_encoded, blob, offsets,
                                            trio.current_time(), kind, limiter=limiter)
        await conn.reply(opcode, request_id, _protocol.encode_ids(ids))
    return handle


def _parse_get(payload: bytes) -> np.ndarray:
    return _protocol.decode_ids(payload, _protocol.MAX_GET_IDS)


async def _get(conn: Connection, request_id: int, ids: np.ndarray) -> None:
    """Stream the answer: plan frames from the stored lengths, then read each only once it has room.

    At most one frame of this answer is built and not yet queued at any time,
    so a GET naming 65,536 large records costs the server one frame, not the
    whole answer; a client that stops reading stops the reading from the store.
    """
    server = conn.server
    max_frame = server.config.limits.max_frame
    spans = await trio.to_thread.run_sync(server.service.plan_get, ids, answer_frame(conn), max_frame,
                                          limiter=server.read_limiter)
    for index, (first, end, size) in enumerate(spans):
        more = index < len(spans) - 1
        ticket = await conn.output.reserve(_protocol.FRAME_HEADER + size)
        try:
            blob, offsets = await trio.to_thread.run_sync(server.service.get_encoded, ids[first:end],
                                                          limiter=server.read_limiter)
        except BaseException:
            conn.output.cancel(ticket)
            raise
        payload = _protocol.encode_record_batch(blob, offsets)
        if len(payload) <= max_frame:  # larger only if records were stored since the plan
            conn.output.queue(ticket, _response_header(_protocol.GET, request_id, len(payload), more),
                              payload)
            continue
        conn.output.cancel(ticket)
        await send_record_batches(conn, _protocol.GET, request_id, blob, offsets, final=not more)


def answer_frame(conn: Connection) -> int:
    """The payload size GET and SCAN answers are cut to (a larger record gets a frame of its own)."""
    return min(ANSWER_FRAME, conn.server.config.limits.max_frame)


def _response_header(opcode: int, request_id: int, length: int, more: bool) -> bytes:
    flags = _protocol.RESPONSE | (_protocol.MORE if more else 0)
    return bytes(_protocol.frame_header(opcode, flags, request_id, length))


async def send_record_batches(conn: Connection, opcode: int, request_id: int, blob: Any,
                              offsets: np.ndarray, *, final: bool) -> None:
    """Answer with record batches of about ANSWER_FRAME bytes; MORE on all but a final last one."""
    spans = frame_spans(np.diff(offsets), answer_frame(conn), conn.server.config.limits.max_frame)
    for index, (first, end, _size) in enumerate(spans):
        payload = _protocol.encode_record_batch(blob, offsets[first:end + 1])
        last = final and index == len(spans) - 1
        await conn.reply(opcode, request_id, payload, more=not last)


async def _query(conn: Connection, request_id: int, args: tuple[str, str, str, str]) -> None:
    subject, predicate, lens, options_text = args
    options = parse_options(options_text)
    server = conn.server
    started = time.perf_counter()
    agent = conn.principal.name if conn.principal is not None else None
    result, records = await trio.to_thread.run_sync(server.service.query, subject, predicate, lens,
                                                    options, agent, limiter=server.read_limiter)
    server.metrics.query_seconds.labels(lens or "default").observe(time.perf_counter() - started)
    blob, offsets, _ids = _codec.encode_many(records)
    payload = _protocol.encode_query_result(json.dumps(result), blob, offsets)
    if len(payload) > server.config.limits.max_frame:
        raise ServiceError(_protocol.E_INVALID_REQUEST,
                           f"the result is {len(payload)} bytes, above the frame limit; narrow the query")
    await conn.reply(_protocol.QUERY, request_id, payload)


async def _scan(conn: Connection, request_id: int, args: tuple[str, str, int, int]) -> None:
    subject, predicate, kind, limit = args
    limit = min(limit or DEFAULT_SCAN_LIMIT, _protocol.MAX_SCAN)
    server = conn.server
    chunks = server.service.scan(subject, predicate, kind, limit)
    while True:
        chunk = await trio.to_thread.run_sync(next, chunks, None, limiter=server.read_limiter)
        if chunk is None:
            break
        if chunk:
            blob, offsets, _ids = _codec.encode_many(chunk)
            await send_record_batches(conn, _protocol.SCAN, request_id, blob, offsets, final=False)
    await conn.reply(_protocol.SCAN, request_id, _protocol.encode_record_batch(b"", [0]))


async def _stats(conn: Connection, request_id: int, _args: None) -> None:
    server = conn.server
    stats = await trio.to_thread.run_sync(server.service.stats, limiter=server.read_limiter)
    stats["server"] = server.describe()
    await conn.reply(_protocol.STATS, request_id, _protocol.encode_text(json.dumps(stats, default=str)))


async def _audit(conn: Connection, request_id: int, limit: int) -> None:
    server = conn.server
    entries = await trio.to_thread.run_sync(server.service.audit, limit or 100,
                                            limiter=server.read_limiter)
    await conn.reply(_protocol.AUDIT, request_id, _protocol.encode_text(json.dumps(entries)))


def _parse_batch(payload: bytes) -> tuple[Any, np.ndarray]:
    return _protocol.decode_record_batch(payload)  # type: ignore[no-any-return]


def _parse_empty(payload: bytes) -> None:
    _protocol.decode_empty(payload, "STATS")


def _parse_audit(payload: bytes) -> int:
    return int(_protocol.decode_u32(payload, "AUDIT limit"))


HANDLERS: dict[int, tuple[str, Callable[[bytes], Any], Handler]] = {
    _protocol.PING: ("ping", _parse_ping, _ping),
    _protocol.PUT: ("put", _parse_batch, _put_handler(_protocol.PUT, None)),
    _protocol.VOTE: ("vote", _parse_batch, _put_handler(_protocol.VOTE, RecordKind.VOTE)),
    _protocol.EPOCH: ("epoch", _parse_batch, _put_handler(_protocol.EPOCH, RecordKind.EPOCH)),
    _protocol.GET: ("get", _parse_get, _get),
    _protocol.QUERY: ("query", _protocol.decode_query, _query),
    _protocol.SCAN: ("scan", _protocol.decode_scan, _scan),
    _protocol.STATS: ("stats", _parse_empty, _stats),
    _protocol.AUDIT: ("audit", _parse_audit, _audit),
}
