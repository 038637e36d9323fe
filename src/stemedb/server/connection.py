"""One binary-protocol connection: handshake, reader loop, pipelined requests, sender.

Owns: the per-connection state machine of docs/protocol.md (HELLO, then
authentication, then requests), the reader loop that cuts frames out of the
receive buffer with the compiled FrameReader, one task per request (many in
flight, answered by request id, possibly out of order), the sender task that
writes queued answers (small ones coalesced into one `send_all`, large ones in
slices), GET answers streamed frame by frame from the store, QUERY and SCAN
answers streamed in frames of about ANSWER_FRAME bytes, and the
handshake, idle and send timeouts, and the order requests take effect in:
a read (GET, QUERY, SCAN, STATS, AUDIT) waits for every write sent before it
on the same connection to be answered, so a connection reads its own writes
(PING and writes are not held back). Every request goes through the request
pipeline (stemedb.server.pipeline: authorize, admit, run in a worker thread,
metrics, errors through the one table); the connection is given a
DoorContext, not the Server. A connection from another cluster node says so
with NODE_HELLO: from then on its requests count as heard from that node,
are served here (never forwarded on), and its frames may be
NODE_FRAME_FACTOR times `max_frame` (a forwarded write carries its records'
IDs); the replication opcodes go to the pipeline's replication side. Must never: run a database call on the event
loop (they go through the pipeline, in worker threads), read more frames
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
answered with an error frame for that request and the connection goes on
(error codes, and which of them close, are stemedb.errors' table).
`BrokenResourceError` (the peer went away) ends the connection quietly; a
client whose socket takes nothing for `send_timeout` while answers wait is
disconnected (it cannot read an error frame either).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import numpy as np
import trio

from stemedb import _codec, _protocol
from stemedb.errors import (
    AuthError,
    AuthRequired,
    ConnectionTimeout,
    FrameError,
    InvalidRequest,
    ProtocolError,
    RateLimited,
    Refusal,
    StemeError,
    UnsupportedVersion,
    refusal,
)
from stemedb.records import RecordKind
from stemedb.server.auth import Peer, Principal, describe_peer
from stemedb.server.buffers import COALESCE_BYTES, SEND_SLICE, InputAccount, OutputQueue
from stemedb.server.pipeline import Caller, DoorContext, Operation
from stemedb.server.service import KIND_NAMES, Blob, IdArray, frame_spans, parse_options

log = logging.getLogger("stemedb.server")

RECEIVE_BYTES = 256 * 1024      # one receive_some at most; frames larger than this arrive in pieces
MIN_RECEIVE = 16 * 1024         # less room than this in the request allowance: reserve more first
ANSWER_FRAME = 1 << 20          # GET and SCAN answers are streamed in frames of about this size
CLOSE_GRACE = 5.0               # seconds to flush the last responses of a closing connection
DEFAULT_SCAN_LIMIT = 10_000
NODE_FRAME_FACTOR = 2           # frames after NODE_HELLO: up to this many times max_frame
ACKS = {0: None, _protocol.ACKS_ONE: "1", _protocol.ACKS_ALL: "all"}

Handler = Callable[["Connection", Operation, int, Any], Awaitable[None]]


class Connection:
    """Serves one client over any trio Stream (TCP, TLS, or a memory stream in tests)."""

    def __init__(self, door: DoorContext, stream: trio.abc.Stream, peer: Peer) -> None:
        self.door = door
        self.pipeline = door.pipeline
        self.limits = door.limits
        self.metrics = door.metrics
        self.stream = stream
        self.peer = peer
        self.reader = _protocol.FrameReader(self.limits.preauth_frame)
        self.principal: Principal | None = None
        self.node: str | None = None       # the cluster node at the other end, after NODE_HELLO
        self.hello_done = False
        self.inflight = 0
        self.slots = trio.Semaphore(self.limits.max_inflight)
        self.input = InputAccount(door.budget.requests)
        self.output = OutputQueue(door.budget.answers, self.limits.output_buffer)
        self.fatal: str | None = None
        self.requests_served = 0
        self._receive_scope: trio.CancelScope | None = None
        self._requests: trio.Nursery | None = None
        self._handed_off = False  # the frame just dispatched now belongs to a request task
        # Writes dispatched and not yet answered, each settled by its request task: a read
        # waits for those sent before it (read your own writes, docs/protocol.md "Ordering").
        self._unsettled_writes: set[trio.Event] = set()

    @property
    def caller(self) -> Caller:
        return Caller("binary", self.peer, self.principal, self.node)

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
        timeout = self.limits.send_timeout
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
                            self.metrics.rejected.labels("slow_reader").inc()
                            log.info("closing connection from %s: it took no answer bytes for %g s "
                                     "(%d bytes queued)", describe_peer(self.peer), timeout,
                                     self.output.queued)
                            scope.cancel()
                            return
            finally:  # written, or never to be: either way these bytes are no longer held
                for _frame, ticket in batch:
                    self.output.written(ticket)

    async def _read_loop(self) -> None:
        limits = self.limits
        deadline = trio.current_time() + limits.handshake_timeout
        if isinstance(self.stream, trio.SSLStream):
            with trio.move_on_at(deadline):
                try:
                    await self.stream.do_handshake()
                except trio.BrokenResourceError as exc:
                    log.info("TLS handshake with %s failed: %s", describe_peer(self.peer), exc)
                    return
            if trio.current_time() >= deadline:
                self.metrics.rejected.labels("handshake_timeout").inc()
                return
        while not self.door.draining and self.fatal is None:
            try:
                frame = self.reader.next()
            except FrameError as exc:
                self._fail(exc, exc.request_id)
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
            pending = self.reader.pending_size  # the frame being received, once its header is in
            self.input.expect(pending)
            with trio.CancelScope(deadline=deadline) as scope:
                self._receive_scope = scope
                if self.door.draining:
                    scope.cancel()
                # Backpressure: beyond its free allowance, a connection reads only what it has
                # reserved from the server's request budget, a whole frame at a time; waiting
                # here leaves the client's bytes in the socket.
                wanted = max(MIN_RECEIVE, pending - self.reader.buffered)
                room = await self.input.make_room(wanted)
                try:
                    data = await self.stream.receive_some(min(RECEIVE_BYTES, room))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
            self._receive_scope = None
            if scope.cancelled_caught:
                if self.door.draining or self.fatal is not None:
                    return
                if self.principal is None:
                    self._fail(ConnectionTimeout("handshake not completed within "
                                                 f"{limits.handshake_timeout:g} s"),
                               reason="handshake_timeout")
                    return
                if self.inflight:  # waiting for our own answers is not idleness
                    deadline = trio.current_time() + limits.idle_timeout
                    continue
                self._fail(ConnectionTimeout(f"idle for {limits.idle_timeout:g} s; closing"),
                           reason="idle_timeout")
                return
            if not data:
                return
            self.reader.feed(data)
            self.input.set_buffered(self.reader.buffered)

    # --------------------------------------------------------------- replies

    def fail_request(self, error: StemeError, request_id: int) -> None:
        """A request task found the client broke the protocol: answer it, stop reading, close."""
        self._fail(error, request_id)
        self.stop_reading()

    def _fail(self, error: StemeError, request_id: int = 0, *, reason: str | None = None) -> None:
        """Queue one error frame and mark the connection for closing (never blocks)."""
        self.fatal = str(error)
        self.metrics.rejected.labels(reason or error.name).inc()
        if isinstance(error, ProtocolError):
            self.metrics.protocol_errors.labels(error.name).inc()
        log.info("closing connection from %s: %s", describe_peer(self.peer), error)
        payload = _protocol.encode_error(error.code, 0, str(error))
        frame = _protocol.frame_header(_protocol.ERROR, _protocol.RESPONSE, request_id, len(payload))
        self.output.queue_now(frame + payload)

    async def reply(self, opcode: int, request_id: int, payload: bytes, *, more: bool = False) -> None:
        """Queue one answer frame, waiting for room in this connection's queue and the budget."""
        header = _response_header(opcode, request_id, len(payload), more)
        ticket = await self.output.reserve(len(header) + len(payload))
        self.output.queue(ticket, header, payload)

    async def reply_refusal(self, request_id: int, answer: Refusal) -> None:
        """Answer one request with an ERROR frame (the connection goes on)."""
        retry_ms = min(int(answer.retry_after * 1000) + (1 if answer.retry_after > 0 else 0), 0xFFFFFFFF)
        await self.reply(_protocol.ERROR, request_id,
                         _protocol.encode_error(answer.code, retry_ms, answer.message))

    # -------------------------------------------------------------- dispatch

    async def _dispatch(self, frame: _protocol.Frame) -> bool:
        """Handle one frame; False ends the connection."""
        opcode = frame.opcode
        if opcode == _protocol.HELLO:
            return self._hello(frame)
        if not self.hello_done:
            self._fail(AuthRequired("send HELLO first"), frame.request_id)
            return False
        if opcode == _protocol.AUTH:
            return await self._auth(frame)
        if self.principal is None:
            self._fail(AuthRequired("authenticate first (AUTH with a token)"), frame.request_id)
            return False
        if self.node is not None and self.pipeline.replication is not None:
            self.pipeline.replication.heard(self.node)
        operation = self.pipeline.operation(opcode)
        try:
            self.pipeline.admit(self.caller, operation)
        except StemeError as exc:
            await self.reply_refusal(frame.request_id, refusal(exc))
            return True
        parse, handler = HANDLERS.get(opcode, (_replication_payload, _replication))  # admitted, so served
        try:
            args = parse(frame.payload)
            if opcode in WRITES:
                args = (*args, ACKS[frame.flags])
        except FrameError as exc:
            self._fail(type(exc)(f"{operation.name}: {exc}", request_id=frame.request_id),
                       frame.request_id)
            return False
        except InvalidRequest as exc:  # well framed, but a value over its limit: refuse, go on
            self.metrics.rejected.labels(exc.name).inc()
            await self.reply_refusal(frame.request_id, refusal(exc))
            return True
        acquired = False
        with trio.move_on_after(self.limits.idle_timeout):
            await self.slots.acquire()  # backpressure: no more reading while max_inflight are open
            acquired = True
        if not acquired:
            self._fail(ConnectionTimeout("the client does not read its answers"), reason="slow_reader")
            return False
        self.inflight += 1
        settled: trio.Event | None = None
        earlier: tuple[trio.Event, ...] = ()
        if operation.writes:
            settled = trio.Event()
            self._unsettled_writes.add(settled)
        elif opcode != _protocol.PING:
            earlier = tuple(self._unsettled_writes)
        assert self._requests is not None
        self._requests.start_soon(self._serve, operation, handler, frame.request_id, args,
                                  len(frame.payload), settled, earlier)
        self._handed_off = True
        return True

    async def _serve(self, operation: Operation, handler: Handler, request_id: int, args: Any,
                     size: int, settled: trio.Event | None, earlier: tuple[trio.Event, ...]) -> None:
        """Run one admitted request: a read first waits for the writes sent before it."""
        try:
            for write in earlier:
                await write.wait()
            outcome = await self.pipeline.run(self.caller, operation,
                                              partial(handler, self, operation, request_id, args),
                                              size=size)
            if isinstance(outcome, Refusal):
                await self.reply_refusal(request_id, outcome)
        finally:
            if settled is not None:  # answered (or failed, or cancelled): reads behind it may go
                settled.set()
                self._unsettled_writes.discard(settled)
            self.inflight -= 1
            self.requests_served += 1
            self.slots.release()
            self.input.done_serving(size)

    # ------------------------------------------------------------- handshake

    def _hello(self, frame: _protocol.Frame) -> bool:
        if self.hello_done:
            self._fail(ProtocolError("HELLO sent twice"), frame.request_id)
            return False
        try:
            _check_token_length(frame.payload, 5 + frame.payload[4] if len(frame.payload) > 4 else None)
            min_version, max_version, _client, token = _protocol.decode_hello(frame.payload)
        except AuthError as exc:
            self._fail(exc, frame.request_id)
            return False
        except FrameError as exc:
            self._fail(type(exc)(f"HELLO: {exc}", request_id=frame.request_id), frame.request_id)
            return False
        if max_version < _protocol.MIN_PROTOCOL_VERSION or min_version > _protocol.PROTOCOL_VERSION:
            self._fail(UnsupportedVersion(
                f"client speaks versions {min_version}..{max_version}; this server speaks "
                f"{_protocol.MIN_PROTOCOL_VERSION}..{_protocol.PROTOCOL_VERSION}"), frame.request_id)
            return False
        version = min(max_version, _protocol.PROTOCOL_VERSION)
        self.hello_done = True
        try:
            principal = self._authenticate(token) if token else self.pipeline.anonymous(self.peer)
        except (AuthError, RateLimited) as exc:
            self._fail(exc, frame.request_id,
                       reason="auth_throttled" if isinstance(exc, RateLimited) else None)
            return False
        flags = self.pipeline.server_flags
        if principal is None:
            flags |= _protocol.SERVER_AUTH_REQUIRED
        else:
            self._authenticated(principal)
        if self.pipeline.protected_mode:
            flags |= _protocol.SERVER_PROTECTED_MODE
        if self.door.tls:
            flags |= _protocol.SERVER_TLS
        payload = _protocol.encode_hello_ok(version, principal.role if principal else 0, flags,
                                            self.limits.max_frame, self.limits.max_inflight,
                                            self.door.server_name)
        header = _protocol.frame_header(_protocol.HELLO, _protocol.RESPONSE, frame.request_id, len(payload))
        self.output.queue_now(header + payload)
        return True

    async def _auth(self, frame: _protocol.Frame) -> bool:
        try:
            _check_token_length(frame.payload, 0)
            token = _protocol.decode_auth(frame.payload)
            principal = self._authenticate(token)
        except FrameError as exc:
            self._fail(type(exc)(f"AUTH: {exc}", request_id=frame.request_id), frame.request_id)
            return False
        except (AuthError, RateLimited) as exc:
            self._fail(exc, frame.request_id,
                       reason="auth_throttled" if isinstance(exc, RateLimited) else None)
            return False
        self._authenticated(principal)
        await self.reply(_protocol.AUTH, frame.request_id, _protocol.encode_role(principal.role))
        return True

    def _authenticate(self, token: str) -> Principal:
        return self.pipeline.authenticate(self.peer, token)

    def _authenticated(self, principal: Principal) -> None:
        self.principal = principal
        self.reader.max_payload = self.limits.max_frame


def _check_token_length(payload: bytes, at: int | None) -> None:
    """Refuse a token longer than MAX_TOKEN (its u16 length at `at`) as auth_failed.

    No configured token is that long, so the answer is the one a wrong token
    gets (and the connection closes, as after any failed authentication).
    """
    if at is None or len(payload) < at + 2:
        return  # truncated: the codec reports it as malformed
    length = int.from_bytes(payload[at:at + 2], "little")
    if length > _protocol.MAX_TOKEN:
        raise AuthError(f"token: {length} bytes, the limit is {_protocol.MAX_TOKEN}")


# ---------------------------------------------------------------- handlers
# Each opcode: (payload parser run on the event loop — its FrameError is a protocol
# violation that closes the connection; its InvalidRequest, a well-framed value over
# a documented limit, is answered `invalid_request` and the connection goes on —,
# async handler run by the pipeline once the request is admitted).

def _parse_ping(payload: bytes) -> bytes:
    if len(payload) > _protocol.MAX_PING:
        raise InvalidRequest(f"PING: {len(payload)} bytes, the limit is {_protocol.MAX_PING}")
    return payload


async def _ping(conn: Connection, _operation: Operation, request_id: int, payload: bytes) -> None:
    await conn.reply(_protocol.PING, request_id, payload)


async def _put(conn: Connection, operation: Operation, request_id: int,
               batch: tuple[Blob, np.ndarray, str | None]) -> None:
    blob, offsets, acks = batch
    ids = await conn.pipeline.put(operation, blob, offsets, acks=acks)
    assert operation.opcode is not None
    await conn.reply(operation.opcode, request_id, _protocol.encode_ids(ids))


def _replication_payload(payload: bytes) -> bytes:
    return payload   # the replication side parses it (framing.py); its FrameError closes


async def _replication(conn: Connection, operation: Operation, request_id: int, payload: bytes) -> None:
    """A replication opcode: NODE_HELLO here, the rest answered by the replication side."""
    replication = conn.pipeline.replication
    assert replication is not None and operation.opcode is not None  # admitted, so served
    try:
        if operation.opcode == _protocol.NODE_HELLO:
            answer = _node_hello(conn, replication, payload)
        else:
            answer = await replication.handle_peer_request(conn.node, operation.opcode, payload,
                                                           client=conn.caller.label)
    except FrameError as exc:
        conn.fail_request(type(exc)(f"{operation.name}: {exc}", request_id=request_id), request_id)
        return
    await conn.reply(operation.opcode, request_id, answer)


def _node_hello(conn: Connection, replication: Any, payload: bytes) -> bytes:
    from stemedb.replication import framing

    if conn.node is not None:
        raise ProtocolError(f"NODE_HELLO sent twice (this connection is node {conn.node}'s)")
    hello = framing.decode_node_hello(payload)
    answer = replication.accept_node(hello)
    conn.node = hello.node
    conn.reader.max_payload = NODE_FRAME_FACTOR * conn.limits.max_frame
    replication.heard(hello.node)
    return framing.encode_node_hello(answer)


def _parse_get(payload: bytes) -> IdArray:
    ids: IdArray = _protocol.decode_ids(payload)
    if len(ids) > _protocol.MAX_GET_IDS:
        raise InvalidRequest(f"GET: {len(ids)} IDs, the limit is {_protocol.MAX_GET_IDS}; "
                             "split the request")
    return ids


def _parse_scan(payload: bytes) -> tuple[str, str, int, int]:
    """(subject, predicate, kind, limit): kind 0 (every kind) or a record kind 1..4."""
    kind_at = None
    if len(payload) >= 2:
        predicate_at = 2 + int.from_bytes(payload[0:2], "little")
        if len(payload) >= predicate_at + 2:
            kind_at = predicate_at + 2 + int.from_bytes(payload[predicate_at:predicate_at + 2], "little")
    if kind_at is not None and len(payload) == kind_at + 5 and payload[kind_at] > max(KIND_NAMES):
        raise InvalidRequest(f"SCAN: kind {payload[kind_at]}; expected 0 (any) or "
                             + ", ".join(f"{code} ({name})" for code, name in sorted(KIND_NAMES.items())))
    subject, predicate, kind, limit = _protocol.decode_scan(payload)
    if limit > _protocol.MAX_SCAN:
        raise InvalidRequest(f"SCAN: limit {limit}, the most is {_protocol.MAX_SCAN} "
                             "(0: the default, 10,000)")
    return subject, predicate, kind, limit


async def _get(conn: Connection, operation: Operation, request_id: int, ids: IdArray) -> None:
    """Stream the answer: plan frames from the stored lengths, then read each only once it has room.

    At most one frame of this answer is built and not yet queued at any time,
    so a GET naming 65,536 large records costs the server one frame, not the
    whole answer; a client that stops reading stops the reading from the store.
    """
    pipeline, service = conn.pipeline, conn.pipeline.service
    max_frame = conn.limits.max_frame
    if pipeline.cluster is not None and conn.node is None:
        lengths = await pipeline.call(operation, service.db.encoded_lengths, ids)
        if (lengths < 0).any():
            await _get_from_cluster(conn, operation, request_id, ids, lengths)
            return
    spans = await pipeline.call(operation, service.plan_get, ids, answer_frame(conn), max_frame)
    for index, (first, end, size) in enumerate(spans):
        more = index < len(spans) - 1
        ticket = await conn.output.reserve(_protocol.FRAME_HEADER + size)
        try:
            blob, offsets = await pipeline.call(operation, service.get_encoded, ids[first:end])
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


async def _get_from_cluster(conn: Connection, operation: Operation, request_id: int, ids: IdArray,
                            lengths: np.ndarray) -> None:
    """A GET on a cluster node naming records it lacks: those are asked of the other nodes.

    The answer is built whole (the streamed path serves GETs this node can
    answer alone), so it holds at most one GET's worth of records.
    """
    pipeline = conn.pipeline
    blob, offsets = await pipeline.call(operation, pipeline.service.get_encoded, ids)
    found = await pipeline.fetch_missing(ids, lengths)
    view = memoryview(blob)
    parts: list[bytes | memoryview] = []
    for index, row in enumerate(ids):
        local = view[int(offsets[index]):int(offsets[index + 1])]
        parts.append(local if len(local) else found.get(bytes(row), b""))
    sizes = np.array([len(part) for part in parts], dtype=np.int64)
    merged = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
    await send_record_batches(conn, _protocol.GET, request_id, b"".join(parts), merged, final=True)


def answer_frame(conn: Connection) -> int:
    """The payload size GET and SCAN answers are cut to (a larger record gets a frame of its own)."""
    return min(ANSWER_FRAME, conn.limits.max_frame)


def _response_header(opcode: int, request_id: int, length: int, more: bool) -> bytes:
    flags = _protocol.RESPONSE | (_protocol.MORE if more else 0)
    return bytes(_protocol.frame_header(opcode, flags, request_id, length))


async def send_record_batches(conn: Connection, opcode: int, request_id: int, blob: Blob,
                              offsets: np.ndarray, *, final: bool) -> None:
    """Answer with record batches of about ANSWER_FRAME bytes; MORE on all but a final last one."""
    spans = frame_spans(np.diff(offsets), answer_frame(conn), conn.limits.max_frame)
    for index, (first, end, _size) in enumerate(spans):
        payload = _protocol.encode_record_batch(blob, offsets[first:end + 1])
        last = final and index == len(spans) - 1
        await conn.reply(opcode, request_id, payload, more=not last)


async def _query(conn: Connection, operation: Operation, request_id: int,
                 args: tuple[str, str, str, str]) -> None:
    subject, predicate, lens, options_text = args
    options = parse_options(options_text)
    result, records = await conn.pipeline.query(conn.caller, operation, subject, predicate, lens,
                                                options)
    blob, offsets, _ids = _codec.encode_many(records)
    text = json.dumps(result)
    payload = _protocol.encode_query_result(text, blob, offsets)
    if len(payload) <= answer_frame(conn):
        await conn.reply(_protocol.QUERY, request_id, payload)
        return
    # Streamed: the result with no records first, then the records in GET-like frames.
    head = _protocol.encode_query_result(text, b"", [0])
    if len(head) > conn.limits.max_frame:
        raise InvalidRequest(f"the result is {len(head)} bytes of JSON, above the "
                             f"{conn.limits.max_frame}-byte frame limit; narrow the query")
    frame_spans(np.diff(offsets), answer_frame(conn), conn.limits.max_frame)  # refuses a record too large
    await conn.reply(_protocol.QUERY, request_id, head, more=True)
    await send_record_batches(conn, _protocol.QUERY, request_id, blob, offsets, final=True)


async def _scan(conn: Connection, operation: Operation, request_id: int,
                args: tuple[str, str, int, int]) -> None:
    subject, predicate, kind, limit = args
    limit = limit or DEFAULT_SCAN_LIMIT
    pipeline = conn.pipeline
    if pipeline.cluster is not None and conn.node is None:
        targets = pipeline.read_target(conn.caller, subject)
        if targets is not None:
            frames = await pipeline.forward(targets, _protocol.SCAN,
                                            _protocol.encode_scan(subject, predicate, kind, limit))
            for index, payload in enumerate(frames):
                await conn.reply(_protocol.SCAN, request_id, payload, more=index < len(frames) - 1)
            return
        if not subject and kind in (0, RecordKind.ASSERTION):
            await _scan_cluster(conn, operation, request_id, predicate, kind, limit)
            return
    chunks = conn.pipeline.service.scan(subject, predicate, kind, limit)
    while True:
        chunk = await conn.pipeline.call(operation, next, chunks, None)
        if chunk is None:
            break
        if chunk:
            blob, offsets, _ids = _codec.encode_many(chunk)
            await send_record_batches(conn, _protocol.SCAN, request_id, blob, offsets, final=False)
    await conn.reply(_protocol.SCAN, request_id, _protocol.encode_record_batch(b"", [0]))


async def _scan_cluster(conn: Connection, operation: Operation, request_id: int, predicate: str,
                        kind: int, limit: int) -> None:
    """A SCAN of assertions without a subject on a cluster node: every node's records, each once.

    This node's first, then each other live node's (records already sent are
    skipped); at most `limit` in all. Records of the global partition (votes,
    epochs, envelopes) are on every node, so those scans stay local.
    """
    pipeline = conn.pipeline
    assert pipeline.cluster is not None
    sent: set[bytes] = set()
    chunks = pipeline.service.scan("", predicate, kind, limit)
    while len(sent) < limit:
        chunk = await pipeline.call(operation, next, chunks, None)
        if chunk is None:
            break
        if chunk:
            blob, offsets, ids = _codec.encode_many(chunk)
            sent.update(bytes(row) for row in ids)
            await send_record_batches(conn, _protocol.SCAN, request_id, blob, offsets, final=False)
    for node in pipeline.cluster.others_to_ask():
        if len(sent) >= limit:
            break
        try:
            frames = await pipeline.cluster.forward(node, _protocol.SCAN,
                                                    _protocol.encode_scan("", predicate, kind, limit))
        except StemeError as exc:
            log.info("SCAN forwarded to %s failed: %s", node, exc)
            continue
        for answer in frames:
            remote, bounds = _protocol.decode_record_batch(answer)
            ids = _codec.hash_encoded(remote, bounds)
            fresh = [i for i, row in enumerate(ids) if bytes(row) not in sent][:limit - len(sent)]
            if not fresh:
                continue
            sent.update(bytes(ids[i]) for i in fresh)
            parts = [bytes(remote[bounds[i]:bounds[i + 1]]) for i in fresh]
            merged = np.concatenate(([0], np.cumsum([len(p) for p in parts]))).astype(np.int64)
            await send_record_batches(conn, _protocol.SCAN, request_id, b"".join(parts), merged,
                                      final=False)
    await conn.reply(_protocol.SCAN, request_id, _protocol.encode_record_batch(b"", [0]))


async def _stats(conn: Connection, operation: Operation, request_id: int, _args: None) -> None:
    stats = await conn.pipeline.stats(operation)
    await conn.reply(_protocol.STATS, request_id, _protocol.encode_text(json.dumps(stats, default=str)))


async def _audit(conn: Connection, operation: Operation, request_id: int, limit: int) -> None:
    entries = await conn.pipeline.call(operation, conn.pipeline.service.audit, limit or 100)
    await conn.reply(_protocol.AUDIT, request_id, _protocol.encode_text(json.dumps(entries)))


async def _verify(conn: Connection, operation: Operation, request_id: int, _args: None) -> None:
    report = await conn.pipeline.call(operation, conn.pipeline.service.verify)
    await conn.reply(_protocol.VERIFY, request_id, _protocol.encode_text(json.dumps(report)))


def _parse_batch(payload: bytes) -> tuple[Blob, np.ndarray]:
    return _protocol.decode_record_batch(payload)


def _parse_empty(payload: bytes) -> None:
    _protocol.decode_empty(payload, "STATS")


def _parse_verify(payload: bytes) -> None:
    _protocol.decode_empty(payload, "VERIFY")


def _parse_audit(payload: bytes) -> int:
    return _protocol.decode_u32(payload, "AUDIT limit")


WRITES = (_protocol.PUT, _protocol.VOTE, _protocol.EPOCH)
HANDLERS: dict[int, tuple[Callable[[bytes], Any], Handler]] = {
    _protocol.PING: (_parse_ping, _ping),
    _protocol.PUT: (_parse_batch, _put),
    _protocol.VOTE: (_parse_batch, _put),
    _protocol.EPOCH: (_parse_batch, _put),
    _protocol.GET: (_parse_get, _get),
    _protocol.QUERY: (_protocol.decode_query, _query),
    _protocol.SCAN: (_parse_scan, _scan),
    _protocol.STATS: (_parse_empty, _stats),
    _protocol.AUDIT: (_parse_audit, _audit),
    _protocol.VERIFY: (_parse_verify, _verify),
}
