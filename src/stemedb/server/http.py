"""The HTTP side door: /health, /ready, /metrics and a small JSON API, on h11.

Owns: one HTTP/1.1 connection at a time per task (keep-alive, no
pipelining — h11 parses, this module never does), routing, bearer-token
authentication with the same tokens, roles and rate limits as the binary
protocol, and the JSON shapes of docs/protocol.md ("HTTP side door"). A
request is decided from its head: size (16 KiB), framing, route, token, role
and rate limit are all checked before one byte of its body is read. Must
never: parse HTTP itself, call the database or parse a body on the event
loop, read a body it is going to refuse, accept a body larger than
`limits.max_http_body` (refused from Content-Length, before reading it, when
declared), or hold body bytes beyond its free allowance that it has not
reserved from the server's request budget (stemedb.server.buffers).

Resource handling: `run()` owns the stream until it returns; the caller
closes it. The budget reserved for a body is given back once it is answered.
Error handling: a malformed or smuggling request gets 400 (an oversized head
431) and the connection is closed; a refusal made before a declared body was
read closes the connection too (the unread body cannot be skipped safely);
every refusal is JSON {"error": name, "message": …} with the matching status
(401, 403, 404, 413, 429 with Retry-After, 501, 503, …).
"""

from __future__ import annotations

import json
import logging
import math
import time
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import h11
import numpy as np
import trio

from stemedb import _protocol
from stemedb.errors import AuthError, NotFound, RateLimited
from stemedb.records import RecordKind
from stemedb.server.auth import Authenticator, Principal
from stemedb.server.buffers import FREE_OUTPUT, SEND_SLICE, InputAccount
from stemedb.server.metrics import CONTENT_TYPE
from stemedb.server.service import ServiceError, error_code, record_json

if TYPE_CHECKING:
    from stemedb.server.app import Server

log = logging.getLogger("stemedb.server.http")

MAX_HEAD = 16 * 1024           # request line and headers
RECEIVE_BYTES = 64 * 1024      # one receive_some at most
MIN_RECEIVE = 16 * 1024        # less room than this in the request allowance: reserve more first

STATUS = {
    _protocol.E_PROTOCOL: 400, _protocol.E_INVALID_REQUEST: 400, _protocol.E_INVALID_RECORD: 400,
    _protocol.E_SIGNATURE: 400, _protocol.E_AUTH_REQUIRED: 401, _protocol.E_AUTH_FAILED: 401,
    _protocol.E_FORBIDDEN: 403, _protocol.E_NOT_FOUND: 404, _protocol.E_FRAME_TOO_LARGE: 413,
    _protocol.E_RATE_LIMITED: 429, _protocol.E_QUOTA_EXCEEDED: 429, _protocol.E_UNSUPPORTED: 501,
    _protocol.E_UNAVAILABLE: 503, _protocol.E_TOO_MANY_CONNECTIONS: 503, _protocol.E_TIMEOUT: 408,
    _protocol.E_STORAGE_FULL: 507,
}

# (method, path) -> (operation, opcode whose role it needs)
ROUTES: dict[tuple[str, str], tuple[str, int]] = {
    ("POST", "/v1/assert"): ("put", _protocol.PUT),
    ("POST", "/v1/vote"): ("vote", _protocol.VOTE),
    ("POST", "/v1/epoch"): ("epoch", _protocol.EPOCH),
    ("GET", "/v1/query"): ("query", _protocol.QUERY),
    ("GET", "/v1/skeptic"): ("query", _protocol.QUERY),
    ("GET", "/v1/audit"): ("audit", _protocol.AUDIT),
    ("GET", "/v1/stats"): ("stats", _protocol.STATS),
    ("GET", "/v1/records"): ("get", _protocol.GET),
}
OPEN_ROUTES = {"/health", "/ready", "/metrics"}


class HttpError(Exception):
    """An HTTP refusal: status, short name, message, optional Retry-After."""

    def __init__(self, status: int, name: str, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.status = status
        self.name = name
        self.retry_after = retry_after


Response = tuple[int, list[tuple[str, str]], bytes]


def json_response(status: int, document: Any, headers: list[tuple[str, str]] | None = None) -> Response:
    body = json.dumps(document, default=str).encode()
    return status, [("content-type", "application/json")] + (headers or []), body


def error_response(exc: HttpError) -> Response:
    headers = []
    if exc.retry_after > 0:
        headers.append(("retry-after", str(max(1, math.ceil(exc.retry_after)))))
    if exc.status == 401:
        headers.append(("www-authenticate", 'Bearer realm="stemedb"'))
    return json_response(exc.status, {"error": exc.name, "message": str(exc),
                                      "retry_after": exc.retry_after or None}, headers)


def http_error_for(exc: BaseException) -> HttpError:
    code, message, retry_after = error_code(exc)
    name = _protocol.ERROR_CODES.get(code, ("internal", False))[0]
    return HttpError(STATUS.get(code, 500), name, message, retry_after)


def _refusal(exc: BaseException) -> HttpError:
    """The HTTP answer for an exception raised while admitting or serving a request."""
    if isinstance(exc, HttpError):
        return exc
    if isinstance(exc, RateLimited):
        return HttpError(429, "rate_limited", str(exc), exc.retry_after)
    if isinstance(exc, AuthError):
        return HttpError(403, "forbidden", str(exc))
    return http_error_for(exc)


def _declares_body(request: h11.Request) -> bool:
    length = _header(request.headers, b"content-length")
    return _header(request.headers, b"transfer-encoding") is not None or (
        length is not None and length.strip() not in ("", "0"))


def decode_write_body(body: bytes | bytearray) -> tuple[bytes, np.ndarray, bool]:
    """(blob, offsets, one-record form) of a /v1/assert body; HttpError 400 says what is wrong."""
    usage = 'expected {"records": ["<hex>", …]} or {"encoded": "<hex>"}'
    try:
        document = json.loads(body or b"null")
    except RecursionError:
        raise HttpError(400, "invalid_request", f"body: JSON nested too deeply; {usage}") from None
    except ValueError as exc:
        raise HttpError(400, "invalid_request", f"body: not JSON ({exc})") from None
    single = isinstance(document, dict) and "encoded" in document and "records" not in document
    if single:
        encoded = [document["encoded"]]
    elif isinstance(document, dict) and isinstance(document.get("records"), list):
        encoded = document["records"]
    else:
        raise HttpError(400, "invalid_request", f"body: {usage}")
    parts = []
    for index, item in enumerate(encoded):
        try:
            parts.append(bytes.fromhex(item))
        except (TypeError, ValueError):
            raise HttpError(400, "invalid_request", f"records[{index}]: expected hex") from None
        if not parts[-1]:
            raise HttpError(400, "invalid_request", f"records[{index}]: empty")
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(p) for p in parts])
    return b"".join(parts), offsets, single


class HttpConnection:
    """Serves HTTP/1.1 requests on one stream until it closes, idles out, or the server drains."""

    def __init__(self, server: Server, stream: trio.abc.Stream, peer: Any) -> None:
        self.server = server
        self.stream = stream
        self.peer = peer
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.input = InputAccount(server.budget.requests)
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
        limits = self.server.config.limits
        deadline = trio.current_time() + limits.handshake_timeout
        while not self.server.draining:
            try:
                request = await self._read_head(deadline)
                if request is None:
                    return
                started = time.perf_counter()
                response, close = await self._handle(request, deadline)
            except HttpError as exc:  # the request itself is unreadable: answer and close
                self._count_refusal(exc)
                await self._send(error_response(exc), close=True)
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            finally:
                self.input.set_buffered(0)  # the body, if any, is no longer held
            target = request.target.decode("latin-1")
            self.server.metrics.request_seconds.labels(_route_label(target)).observe(
                time.perf_counter() - started)
            close = close or self.server.draining
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

    async def _next_event(self, deadline: float, *, waiting_for_head: bool) -> Any:
        """The next h11 event, receiving (within the request budget) until there is one."""
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise HttpError(exc.error_status_hint, "bad_request", str(exc)) from None
            if event is not h11.NEED_DATA:
                return event
            with trio.CancelScope(deadline=deadline) as scope:
                self._receive_scope = scope
                if self.server.draining and waiting_for_head:
                    scope.cancel()
                room = await self.input.make_room(MIN_RECEIVE)
                data = await self.stream.receive_some(min(RECEIVE_BYTES, room))
            self._receive_scope = None
            if scope.cancelled_caught:
                if waiting_for_head and not self._fed:
                    return None  # idle keep-alive connection, or draining: close quietly
                raise HttpError(408, "timeout", "request not received in time")
            self._fed += len(data)
            try:
                self.h11.receive_data(data)
            except h11.RemoteProtocolError as exc:
                raise HttpError(400, "bad_request", str(exc)) from None

    async def _read_head(self, deadline: float) -> h11.Request | None:
        """The next request's head, checked for size and framing before any of its body is read."""
        event = await self._next_event(deadline, waiting_for_head=True)
        if event is None or isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None
        assert isinstance(event, h11.Request), event
        head = self._fed - len(self.h11.trailing_data[0])
        if head > MAX_HEAD:
            raise HttpError(431, "headers_too_large",
                            f"request line and headers of {head} bytes; the limit is {MAX_HEAD}")
        if _header(event.headers, b"transfer-encoding") is not None and \
                _header(event.headers, b"content-length") is not None:
            # RFC 9112 section 6.1: such a message may be framed differently by an intermediary,
            # which lets a request hide inside another one's body. Refused, and the stream closed.
            raise HttpError(400, "bad_request", "both Content-Length and Transfer-Encoding are set; "
                            "send one of them (RFC 9112 section 6.1)")
        return event

    async def _read_body(self, deadline: float, expected: int) -> bytearray:
        """The body of the current request, at most limits.max_http_body bytes, held within the budget.

        The `expected` bytes (its Content-Length, or the limit for a chunked
        body) are reserved before any is read, in one wait: bodies that each
        held part of a reservation and waited for the rest would deadlock.
        """
        limit = self.server.config.limits.max_http_body
        body = bytearray()
        if expected:
            self.input.expect(expected)
            with trio.move_on_at(deadline) as waited:
                await self.input.make_room(expected)
            if waited.cancelled_caught:
                raise HttpError(408, "timeout", "request not received in time (the server is busy)")
        while True:
            event = await self._next_event(deadline, waiting_for_head=False)
            if isinstance(event, h11.Data):
                body += event.data
                self.input.set_buffered(len(body))
                if len(body) > limit:
                    raise HttpError(413, "too_large", f"body above the limit of {limit} bytes")
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
            principal = self._admit(method, path, headers)
        except Exception as exc:
            refusal = _refusal(exc)
            self._count_refusal(refusal)
            if _declares_body(request):  # not read, so the stream cannot carry another request
                return error_response(refusal), True
            await self._read_body(deadline, 0)  # nothing but the end of the message
            return error_response(refusal), False
        declared = _header(request.headers, b"content-length")
        limit = self.server.config.limits.max_http_body
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HttpError(413, "too_large", f"body of {declared} bytes; the limit is {limit}")
        if declared is not None and declared.isdigit():
            expected = int(declared)
        else:
            expected = limit if _declares_body(request) else 0
        try:
            body = await self._read_body(deadline, expected)
        finally:
            self.input.expect(0)
        return await self._respond(method, path, query, principal, body), False

    def _admit(self, method: str, path: str, headers: dict[str, str]) -> Principal | None:
        """Who may make this request, decided from its head alone (None for the open routes).

        Raises HttpError (404, 405, 401), AuthError (403) or RateLimited (429).
        """
        server = self.server
        if server.auth.protected_mode:
            server.auth.anonymous(self.peer)  # refuses non-loopback peers on every route
        if path in OPEN_ROUTES:
            if method not in ("GET", "HEAD"):
                raise HttpError(405, "method_not_allowed", f"{path} answers GET")
            return None
        route_path = "/v1/records" if path.startswith("/v1/records/") else path
        route = ROUTES.get((method, route_path))
        if route is None:
            if any(p == route_path for _, p in ROUTES):
                raise HttpError(405, "method_not_allowed", f"{method} is not allowed on {path}")
            raise HttpError(404, "not_found", f"no route {path}")
        operation, opcode = route
        principal = self._principal(headers)
        Authenticator.authorize(principal, opcode)
        server.limits.admit(principal.name, operation, trio.current_time())
        return principal

    async def _respond(self, method: str, path: str, query: str, principal: Principal | None,
                       body: bytearray) -> Response:
        server = self.server
        try:
            if principal is None:
                response = await self._open_route(path)
            else:
                response = await self._api(method, path, query, principal, body)
            server.metrics.requests.labels(path if path in OPEN_ROUTES else "api", "http").inc()
            return response
        except Exception as exc:
            refusal = _refusal(exc)
            self._count_refusal(refusal)
            return error_response(refusal)

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
        pool = self.server.budget.answers
        charged = min(len(data), pool.capacity) if len(data) > FREE_OUTPUT else 0
        if charged:
            await pool.take(charged)
        try:
            view = memoryview(data)
            for start in range(0, len(view), SEND_SLICE):
                with trio.move_on_after(self.server.config.limits.send_timeout) as timer:
                    try:
                        await self.stream.send_all(view[start:start + SEND_SLICE])
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return False
                if timer.cancelled_caught:  # the client takes nothing: abandon the answer
                    self.server.metrics.rejected.labels("slow_reader").inc()
                    return False
        finally:
            if charged:
                pool.give(charged)
        return True

    # ------------------------------------------------------------- routing

    def _count_refusal(self, exc: HttpError) -> None:
        self.server.metrics.rejected.labels(exc.name if exc.status in (401, 403, 413, 429) else
                                            f"http_{exc.status}").inc()

    async def _open_route(self, path: str) -> Response:
        server = self.server
        if path == "/metrics":
            text = await trio.to_thread.run_sync(server.metrics.render, limiter=server.read_limiter)
            return 200, [("content-type", CONTENT_TYPE)], text
        stats = await trio.to_thread.run_sync(server.service.stats, limiter=server.read_limiter)
        failed = bool(stats.get("failed"))
        if path == "/health":
            status = "failed" if failed else ("draining" if server.draining else "ok")
            return json_response(503 if failed else 200,
                                 {"status": status, "records": stats["records"]})
        ready = not failed and not server.draining
        return json_response(200 if ready else 503, {"ready": ready, "draining": server.draining,
                                                     "failed": failed})

    def _principal(self, headers: dict[str, str]) -> Principal:
        auth = self.server.auth
        credentials = headers.get("authorization", "")
        scheme, _, token = credentials.partition(" ")
        if credentials:
            if scheme.lower() != "bearer" or not token.strip():
                raise HttpError(401, "auth_failed", "expected Authorization: Bearer <token>")
            self.server.limits.check_auth_failures(self.peer, trio.current_time())
            try:
                return auth.authenticate(token.strip())
            except AuthError as exc:
                self.server.limits.auth_failed(self.peer, trio.current_time())
                raise HttpError(401, "auth_failed", str(exc)) from None
        principal = auth.anonymous(self.peer)
        if principal is None:
            raise HttpError(401, "auth_required", "send Authorization: Bearer <token>")
        return principal

    async def _api(self, method: str, path: str, query: str, principal: Principal,
                   body: bytearray) -> Response:
        server = self.server
        route_path = "/v1/records" if path.startswith("/v1/records/") else path
        operation, _opcode = ROUTES[(method, route_path)]
        params = dict(parse_qsl(query, keep_blank_values=True))
        if method == "POST":
            return await self._write(operation, body)
        if operation == "query":
            return await self._query(params, principal.name, skeptic=path == "/v1/skeptic")
        if operation == "audit":
            limit = _int_param(params, "limit", 100)
            entries = await trio.to_thread.run_sync(server.service.audit, limit,
                                                    limiter=server.read_limiter)
            return json_response(200, {"entries": entries})
        if operation == "stats":
            stats = await trio.to_thread.run_sync(server.service.stats, limiter=server.read_limiter)
            stats["server"] = server.describe()
            return json_response(200, stats)
        return await self._get(path[len("/v1/records/"):])

    async def _write(self, operation: str, body: bytearray) -> Response:
        kind = {"vote": RecordKind.VOTE, "epoch": RecordKind.EPOCH}.get(operation)
        server = self.server
        # Parsing a large body is CPU work: it runs in the worker thread that then waits for the commit.
        ids, single = await trio.to_thread.run_sync(self._decode_and_put, body, trio.current_time(), kind,
                                                    limiter=server.write_limiter)
        hex_ids = [bytes(row).hex() for row in ids]
        if single:
            return json_response(200, {"id": hex_ids[0], "ids": hex_ids})
        return json_response(200, {"ids": hex_ids})

    def _decode_and_put(self, body: bytearray, now: float, kind: int | None) -> tuple[np.ndarray, bool]:
        """(IDs, whether the body was the one-record form) of a write body; blocking."""
        blob, offsets, single = decode_write_body(body)
        self.server.metrics.put_records.observe(len(offsets) - 1)
        return self.server.service.put_encoded(blob, offsets, now, kind), single

    async def _query(self, params: dict[str, str], agent: str, *, skeptic: bool) -> Response:
        subject = params.pop("subject", "")
        if not subject:
            raise HttpError(400, "invalid_request", "subject: required")
        predicate = params.pop("predicate", "")
        lens = "skeptic" if skeptic else params.pop("lens", "")
        options = {key: _param_value(value) for key, value in params.items()}
        server = self.server
        started = time.perf_counter()
        result, records = await trio.to_thread.run_sync(server.service.query, subject, predicate,
                                                        lens, options, agent, limiter=server.read_limiter)
        server.metrics.query_seconds.labels(lens or "default").observe(time.perf_counter() - started)
        return json_response(200, {"result": result, "records": [record_json(r) for r in records]})

    async def _get(self, hex_id: str) -> Response:
        try:
            record_id = bytes.fromhex(hex_id)
        except ValueError:
            record_id = b""
        if len(record_id) != 32:
            raise HttpError(400, "invalid_request", "record ID: expected 64 hex digits")
        server = self.server
        try:
            record = await trio.to_thread.run_sync(server.service.get_record, record_id,
                                                   limiter=server.read_limiter)
        except NotFound as exc:
            raise HttpError(404, "not_found", str(exc)) from None
        document = record_json(record)
        document["encoded"] = record.encode().hex()
        return json_response(200, document)


def _route_label(target: str) -> str:
    """A bounded metrics label for a request target."""
    path = target.partition("?")[0]
    if path.startswith("/v1/records/"):
        path = "/v1/records"
    known = path in OPEN_ROUTES or any(p == path for _, p in ROUTES)
    return f"http:{path}" if known else "http:other"


def _header(headers: Any, name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _int_param(params: dict[str, str], name: str, default: int) -> int:
    value = params.get(name)
    if value is None:
        return default
    if not value.isdigit():
        raise ServiceError(_protocol.E_INVALID_REQUEST, f"{name}: expected a non-negative integer")
    return int(value)


def _param_value(text: str) -> Any:
    """Query-string values: JSON scalars where they parse (true, 12, 0.5), else the string."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (bool, int, float)) or value is None else text
