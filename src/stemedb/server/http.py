"""The HTTP side door: /health, /ready, /metrics and a small JSON API, on h11.

Owns: one HTTP/1.1 connection at a time per task (keep-alive, no
pipelining — h11 parses, this module never does; under TLS when the server
has [tls], the stream it is given is already a TLS stream), routing,
bearer-token authentication with the same tokens, roles and rate limits as
the binary protocol, the /metrics token ([http] metrics_token_sha256: the
scrape route is open without one), and the JSON shapes of docs/protocol.md
("HTTP side door"). A request is decided from its head: size (16 KiB),
framing, route, token, role and rate limit are all checked before one byte
of its body is read. Must never: parse HTTP itself, call the database or parse a body on the event
loop, read a body it is going to refuse, accept a body larger than
`limits.max_http_body` (refused from Content-Length, before reading it, when
declared), or hold body bytes beyond its free allowance that it has not
reserved from the server's request budget (stemedb.server.buffers).

Every request goes through the request pipeline (stemedb.server.pipeline:
authorize, admit, run in a worker thread, metrics); the door is given a
DoorContext, not the Server.

Resource handling: `run()` owns the stream until it returns; the caller
closes it. The budget reserved for a body is given back once it is answered.
Error handling: every refusal is an error class of stemedb.errors, answered
as JSON {"error": name, "message": …} with the class's HTTP status (the one
error table: 400, 401, 403, 404, 405, 408, 413, 429 with Retry-After, 431,
500, 501, 503, 507). A malformed or smuggling request (400), an oversized
head (431) or body (413), or one not received in time (408) is answered and
the connection closed; a refusal made before a declared body was read closes
the connection too (the unread body cannot be skipped safely).
"""

from __future__ import annotations

import json
import logging
import math
from functools import partial
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl

import h11
import numpy as np
import trio

from stemedb import _protocol
from stemedb.errors import (
    AuthError,
    AuthRequired,
    ConnectionTimeout,
    FrameTooLarge,
    HeadersTooLarge,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    ProtocolError,
    Refusal,
    StemeError,
    Unsupported,
    refusal,
)
from stemedb.server.auth import Peer, Principal
from stemedb.server.buffers import FREE_OUTPUT, SEND_SLICE, InputAccount
from stemedb.server.metrics import CONTENT_TYPE
from stemedb.server.pipeline import (
    HEALTH,
    METRICS,
    OPERATIONS,
    READY,
    Caller,
    DoorContext,
    Operation,
)
from stemedb.server.service import JSON, record_json

log = logging.getLogger("stemedb.server.http")

MAX_HEAD = 16 * 1024           # request line and headers
RECEIVE_BYTES = 64 * 1024      # one receive_some at most
MIN_RECEIVE = 16 * 1024        # less room than this in the request allowance: reserve more first

# (method, path) -> the operation, whose role, rate limit and metrics label the route shares
ROUTES: dict[tuple[str, str], Operation] = {
    ("POST", "/v1/assert"): OPERATIONS[_protocol.PUT],
    ("POST", "/v1/vote"): OPERATIONS[_protocol.VOTE],
    ("POST", "/v1/epoch"): OPERATIONS[_protocol.EPOCH],
    ("GET", "/v1/query"): OPERATIONS[_protocol.QUERY],
    ("GET", "/v1/skeptic"): OPERATIONS[_protocol.QUERY],
    ("GET", "/v1/audit"): OPERATIONS[_protocol.AUDIT],
    ("GET", "/v1/stats"): OPERATIONS[_protocol.STATS],
    ("GET", "/v1/records"): OPERATIONS[_protocol.GET],
}
OPEN_ROUTES = {"/health": HEALTH, "/ready": READY, "/metrics": METRICS}

Response = tuple[int, list[tuple[str, str]], bytes]


def json_response(status: int, document: Any, headers: list[tuple[str, str]] | None = None) -> Response:
    body = json.dumps(document, default=str).encode()
    return status, [("content-type", "application/json")] + (headers or []), body


def error_response(answer: Refusal) -> Response:
    """The JSON refusal: the error class's status and name (stemedb.errors' table)."""
    headers = []
    if answer.retry_after > 0:
        headers.append(("retry-after", str(max(1, math.ceil(answer.retry_after)))))
    if answer.http_status == 401:
        headers.append(("www-authenticate", 'Bearer realm="stemedb"'))
    return json_response(answer.http_status, {"error": answer.name, "message": answer.message,
                                              "retry_after": answer.retry_after or None}, headers)


def _declares_body(request: h11.Request) -> bool:
    length = _header(request.headers, b"content-length")
    return _header(request.headers, b"transfer-encoding") is not None or (
        length is not None and length.strip() not in ("", "0"))


def _malformed(exc: h11.RemoteProtocolError) -> StemeError:
    """The refusal of a request h11 could not parse, with the status h11 suggests."""
    if exc.error_status_hint == 431:   # h11's buffer limit: its own words do not name the limit
        return HeadersTooLarge(f"request line and headers over the limit of {MAX_HEAD} bytes ({exc})")
    if exc.error_status_hint == 501:
        return Unsupported(f"{exc}; send a chunked or Content-Length body")
    return ProtocolError(str(exc))


def decode_write_body(body: bytes | bytearray) -> tuple[bytes, np.ndarray, bool]:
    """(blob, offsets, one-record form) of a /v1/assert body; InvalidRequest says what is wrong."""
    usage = 'expected {"records": ["<hex>", …]} or {"encoded": "<hex>"}'
    try:
        document = json.loads(body or b"null")
    except RecursionError:
        raise InvalidRequest(f"body: JSON nested too deeply; {usage}") from None
    except ValueError as exc:
        raise InvalidRequest(f"body: not JSON ({exc})") from None
    single = isinstance(document, dict) and "encoded" in document and "records" not in document
    if single:
        encoded = [document["encoded"]]
    elif isinstance(document, dict) and isinstance(document.get("records"), list):
        encoded = document["records"]
    else:
        raise InvalidRequest(f"body: {usage}")
    parts = []
    for index, item in enumerate(encoded):
        try:
            parts.append(bytes.fromhex(item))
        except (TypeError, ValueError):
            raise InvalidRequest(f"records[{index}]: expected hex") from None
        if not parts[-1]:
            raise InvalidRequest(f"records[{index}]: empty")
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(p) for p in parts])
    return b"".join(parts), offsets, single


class HttpConnection:
    """Serves HTTP/1.1 requests on one stream until it closes, idles out, or the server drains."""

    def __init__(self, door: DoorContext, stream: trio.abc.Stream, peer: Peer) -> None:
        self.door = door
        self.pipeline = door.pipeline
        self.limits = door.limits
        self.stream = stream
        self.peer = peer
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.input = InputAccount(door.budget.requests)
        self._fed = 0  # bytes given to h11 since the current request began (the head's size)
        self._receive_scope: trio.CancelScope | None = None

    def stop_reading(self) -> None:
        if self._receive_scope is not None:
            self._receive_scope.cancel()

    async def run(self) -> None:
        try:
            await self._serve_requests()
        finally:
            self.input.close()

    async def _serve_requests(self) -> None:
        limits = self.limits
        deadline = trio.current_time() + limits.handshake_timeout
        while not self.door.draining:
            try:
                request = await self._read_head(deadline)
                if request is None:
                    return
                response, close = await self._handle(request, deadline)
            except StemeError as exc:  # the request itself is unreadable: answer and close
                answer = refusal(exc)
                self._count_refusal(answer)
                await self._send(error_response(answer), close=True)
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            finally:
                self.input.set_buffered(0)  # the body, if any, is no longer held
            close = close or self.door.draining
            if not await self._send(response, close=close, head=request.method == b"HEAD") or close:
                return
            if self.h11.our_state is h11.MUST_CLOSE:
                return
            try:
                self.h11.start_next_cycle()
            except h11.ProtocolError:
                return
            self._fed = len(self.h11.trailing_data[0])  # a pipelined next request already received
            deadline = trio.current_time() + limits.idle_timeout

    # ------------------------------------------------------------- reading

    async def _next_event(self, deadline: float, *, waiting_for_head: bool) -> Any:  # an h11 event
        """The next h11 event, receiving (within the request budget) until there is one."""
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise _malformed(exc) from None
            if event is not h11.NEED_DATA:
                return event
            with trio.CancelScope(deadline=deadline) as scope:
                self._receive_scope = scope
                if self.door.draining and waiting_for_head:
                    scope.cancel()
                room = await self.input.make_room(MIN_RECEIVE)
                data = await self.stream.receive_some(min(RECEIVE_BYTES, room))
            self._receive_scope = None
            if scope.cancelled_caught:
                if waiting_for_head and not self._fed:
                    return None  # idle keep-alive connection, or draining: close quietly
                raise ConnectionTimeout("request not received in time")
            self._fed += len(data)
            try:
                self.h11.receive_data(bytes(data))  # trio types receive_some as bytes | bytearray
            except h11.RemoteProtocolError as exc:
                raise _malformed(exc) from None

    async def _read_head(self, deadline: float) -> h11.Request | None:
        """The next request's head, checked for size and framing before any of its body is read."""
        event = await self._next_event(deadline, waiting_for_head=True)
        if event is None or isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None
        assert isinstance(event, h11.Request), event
        head = self._fed - len(self.h11.trailing_data[0])
        if head > MAX_HEAD:
            raise HeadersTooLarge(f"request line and headers of {head} bytes; the limit is {MAX_HEAD}")
        if _header(event.headers, b"transfer-encoding") is not None and \
                _header(event.headers, b"content-length") is not None:
            # RFC 9112 section 6.1: such a message may be framed differently by an intermediary,
            # which lets a request hide inside another one's body. Refused, and the stream closed.
            raise ProtocolError("both Content-Length and Transfer-Encoding are set; "
                                "send one of them (RFC 9112 section 6.1)")
        return event

    async def _read_body(self, deadline: float, expected: int) -> bytearray:
        """The body of the current request, at most limits.max_http_body bytes, held within the budget.

        The `expected` bytes (its Content-Length, or the limit for a chunked
        body) are reserved before any is read, in one wait: bodies that each
        held part of a reservation and waited for the rest would deadlock.
        """
        limit = self.limits.max_http_body
        body = bytearray()
        if expected:
            self.input.expect(expected)
            with trio.move_on_at(deadline) as waited:
                await self.input.make_room(expected)
            if waited.cancelled_caught:
                raise ConnectionTimeout("request not received in time (the server is busy)")
        while True:
            event = await self._next_event(deadline, waiting_for_head=False)
            if isinstance(event, h11.Data):
                body += event.data
                self.input.set_buffered(len(body))
                if len(body) > limit:
                    raise FrameTooLarge(f"body above the limit of {limit} bytes")
            elif isinstance(event, h11.EndOfMessage):
                return body
            else:  # the client went away in the middle of its body
                raise trio.BrokenResourceError("connection closed during the request body")

    # ------------------------------------------------------------- answering

    async def _handle(self, request: h11.Request, deadline: float) -> tuple[Response, bool]:
        """(response, close the connection after it) for one request whose head was read."""
        method = request.method.decode("ascii", "replace")
        target = request.target.decode("latin-1")
        path, _, query = target.partition("?")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
        try:
            operation, caller = self._decide(method, path, headers)
        except StemeError as exc:
            if _declares_body(request):  # not read, so the stream cannot carry another request
                return error_response(refusal(exc)), True
            await self._read_body(deadline, 0)  # nothing but the end of the message
            return error_response(refusal(exc)), False
        declared = _header(request.headers, b"content-length")
        limit = self.limits.max_http_body
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise FrameTooLarge(f"body of {declared} bytes; the limit is {limit}")
        if declared is not None and declared.isdigit():
            expected = int(declared)
        else:
            expected = limit if _declares_body(request) else 0
        try:
            body = await self._read_body(deadline, expected)
        finally:
            self.input.expect(0)
        outcome = await self.pipeline.run(caller, operation,
                                          partial(self._respond, operation, method, path, query,
                                                  caller, body), size=len(body))
        if isinstance(outcome, Refusal):
            return error_response(outcome), False
        return outcome, False

    def _decide(self, method: str, path: str, headers: dict[str, str]) -> tuple[Operation, Caller]:
        """The request's operation and caller, decided from its head alone, and admitted.

        Raises NotFound, MethodNotAllowed, AuthRequired or AuthError (401) —
        counted here — or the pipeline's admission refusals (403, 429, …).
        """
        try:
            if self.pipeline.protected_mode:
                self.pipeline.anonymous(self.peer)  # refuses non-loopback peers on every route
            operation = _route(method, path)
            if operation is METRICS and self.pipeline.auth.metrics_protected:
                self._scraper(headers)
            principal = self._principal(headers) if operation.opcode is not None else None
        except StemeError as exc:
            self._count_refusal(refusal(exc))
            raise
        caller = Caller("http", self.peer, principal)
        self.pipeline.admit(caller, operation)
        return operation, caller

    def _principal(self, headers: dict[str, str]) -> Principal:
        token = _bearer_token(headers)
        if token is not None:
            return self.pipeline.authenticate(self.peer, token)
        principal = self.pipeline.anonymous(self.peer)
        if principal is None:
            raise AuthRequired("send Authorization: Bearer <token>")
        return principal

    def _scraper(self, headers: dict[str, str]) -> None:
        """Admit a /metrics request that must carry a metrics token ([http] metrics_token_sha256).

        AuthRequired without a token, AuthError for a wrong one; failures are
        throttled per address like every other authentication. The messages
        name no configured token.
        """
        token = _bearer_token(headers)
        if token is None:
            raise AuthRequired("/metrics needs Authorization: Bearer <metrics token>")
        limits = self.pipeline.limits
        now = trio.current_time()
        limits.check_auth_failures(self.peer, now)
        try:
            self.pipeline.auth.authenticate_scraper(token)
        except AuthError:
            limits.auth_failed(self.peer, now)
            raise

    async def _send(self, response: Response, *, close: bool = False, head: bool = False) -> bool:
        status, headers, body = response
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return False
        headers = headers + [("content-length", str(len(body))), ("server", "stemedb")]
        if close:
            headers.append(("connection", "close"))
        try:
            reason = HTTPStatus(status).phrase.encode() if status in HTTPStatus._value2member_map_ else b""
            data = self.h11.send(h11.Response(status_code=status, headers=headers, reason=reason))
            if not head:  # a HEAD answer has the headers of the GET answer and no body
                data = (data or b"") + (self.h11.send(h11.Data(data=body)) or b"")
            data += self.h11.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            return False
        # The answer counts against the budget until written; beyond the free allowance it
        # waits for room like the binary protocol's answers do.
        pool = self.door.budget.answers
        charged = min(len(data), pool.capacity) if len(data) > FREE_OUTPUT else 0
        if charged:
            await pool.take(charged)
        try:
            view = memoryview(data)
            for start in range(0, len(view), SEND_SLICE):
                with trio.move_on_after(self.limits.send_timeout) as timer:
                    try:
                        await self.stream.send_all(view[start:start + SEND_SLICE])
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return False
                if timer.cancelled_caught:  # the client takes nothing: abandon the answer
                    self.door.metrics.rejected.labels("slow_reader").inc()
                    return False
        finally:
            if charged:
                pool.give(charged)
        return True

    def _count_refusal(self, answer: Refusal) -> None:
        self.door.metrics.rejected.labels(answer.name).inc()

    # ------------------------------------------------------------- routing

    async def _respond(self, operation: Operation, method: str, path: str, query: str,
                       caller: Caller, body: bytearray) -> Response:
        """The answer to an admitted request (run by the pipeline)."""
        pipeline = self.pipeline
        if operation is METRICS:
            text = await pipeline.call(operation, self.door.metrics.render)
            return 200, [("content-type", CONTENT_TYPE)], text
        if operation in (HEALTH, READY):
            return await self._health(operation)
        params = dict(parse_qsl(query, keep_blank_values=True))
        if method == "POST":
            return await self._write(operation, body)
        if operation.name == "query":
            return await self._query(operation, params, caller, skeptic=path == "/v1/skeptic")
        if operation.name == "audit":
            limit = _int_param(params, "limit", 100)
            entries = await pipeline.call(operation, pipeline.service.audit, limit)
            return json_response(200, {"entries": entries})
        if operation.name == "stats":
            return json_response(200, await pipeline.stats(operation))
        return await self._get(operation, path[len("/v1/records/"):])

    async def _health(self, operation: Operation) -> Response:
        stats = await self.pipeline.call(operation, self.pipeline.service.stats)
        failed = bool(stats.get("failed"))
        draining = self.door.draining
        if operation is HEALTH:
            status = "failed" if failed else ("draining" if draining else "ok")
            return json_response(503 if failed else 200, {"status": status, "records": stats["records"]})
        ready = not failed and not draining
        return json_response(200 if ready else 503, {"ready": ready, "draining": draining,
                                                     "failed": failed})

    async def _write(self, operation: Operation, body: bytearray) -> Response:
        # Parsing a large body is CPU work: it runs in a worker thread of the write pool.
        blob, offsets, single = await self.pipeline.call(operation, decode_write_body, body)
        ids = await self.pipeline.put(operation, blob, offsets)
        hex_ids = [bytes(row).hex() for row in ids]
        if single:
            return json_response(200, {"id": hex_ids[0], "ids": hex_ids})
        return json_response(200, {"ids": hex_ids})

    async def _query(self, operation: Operation, params: dict[str, str], caller: Caller, *,
                     skeptic: bool) -> Response:
        subject = params.pop("subject", "")
        if not subject:
            raise InvalidRequest("subject: required")
        predicate = params.pop("predicate", "")
        lens = "skeptic" if skeptic else params.pop("lens", "")
        options: JSON = {key: _param_value(value) for key, value in params.items()}
        result, records = await self.pipeline.query(caller, operation, subject, predicate, lens,
                                                    options)
        return json_response(200, {"result": result, "records": [record_json(r) for r in records]})

    async def _get(self, operation: Operation, hex_id: str) -> Response:
        try:
            record_id = bytes.fromhex(hex_id)
        except ValueError:
            record_id = b""
        if len(record_id) != 32:
            raise InvalidRequest("record ID: expected 64 hex digits")
        record = await self.pipeline.call(operation, self.pipeline.service.get_record, record_id)
        document = record_json(record)
        document["encoded"] = record.encode().hex()
        return json_response(200, document)


def _route(method: str, path: str) -> Operation:
    """The operation a method and path ask for; NotFound or MethodNotAllowed otherwise."""
    if path in OPEN_ROUTES:
        if method not in ("GET", "HEAD"):
            raise MethodNotAllowed(f"{path} answers GET")
        return OPEN_ROUTES[path]
    route_path = "/v1/records" if path.startswith("/v1/records/") else path
    operation = ROUTES.get((method, route_path))
    if operation is None:
        if any(p == route_path for _, p in ROUTES):
            raise MethodNotAllowed(f"{method} is not allowed on {path}")
        raise NotFound(f"no route {path}")
    return operation


def _bearer_token(headers: dict[str, str]) -> str | None:
    """The token of an `Authorization: Bearer` header; None without one; AuthError if malformed."""
    credentials = headers.get("authorization", "")
    if not credentials:
        return None
    scheme, _, token = credentials.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("expected Authorization: Bearer <token>")
    return token.strip()


def _header(headers: Any, name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            text: str = value.decode("latin-1")
            return text
    return None


def _int_param(params: dict[str, str], name: str, default: int) -> int:
    value = params.get(name)
    if value is None:
        return default
    if not value.isdigit():
        raise InvalidRequest(f"{name}: expected a non-negative integer")
    return int(value)


def _param_value(text: str) -> Any:
    """Query-string values: JSON scalars where they parse (true, 12, 0.5), else the string."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (bool, int, float)) or value is None else text
