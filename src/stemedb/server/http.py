"""The HTTP side door: /health, /ready, /metrics and a small JSON API, on h11.

Owns: one HTTP/1.1 connection at a time per task (keep-alive, no
pipelining — h11 parses, this module never does), routing, bearer-token
authentication with the same tokens, roles and rate limits as the binary
protocol, and the JSON shapes of docs/protocol.md ("HTTP side door"). Must
never: parse HTTP itself, call the database on the event loop, or accept a
body larger than `limits.max_http_body` (refused from Content-Length, before
reading it, when declared).

Resource handling: `run()` owns the stream until it returns; the caller closes it.
Error handling: a malformed request gets 400 and the connection is closed;
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
from stemedb.server.metrics import CONTENT_TYPE
from stemedb.server.service import ServiceError, error_code, record_json

if TYPE_CHECKING:
    from stemedb.server.app import Server

log = logging.getLogger("stemedb.server.http")

MAX_HEAD = 16 * 1024

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


class HttpConnection:
    """Serves HTTP/1.1 requests on one stream until it closes, idles out, or the server drains."""

    def __init__(self, server: Server, stream: trio.abc.Stream, peer: Any) -> None:
        self.server = server
        self.stream = stream
        self.peer = peer
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self._receive_scope: trio.CancelScope | None = None

    def stop_reading(self) -> None:
        if self._receive_scope is not None:
            self._receive_scope.cancel()

    async def run(self) -> None:
        limits = self.server.config.limits
        deadline = trio.current_time() + limits.handshake_timeout
        while not self.server.draining:
            try:
                request = await self._read_request(deadline)
            except HttpError as exc:
                await self._send(error_response(exc), close=True)
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if request is None:
                return
            method, target, headers, body = request
            started = time.perf_counter()
            response = await self._respond(method, target, headers, body)
            self.server.metrics.request_seconds.labels(_route_label(target)).observe(
                time.perf_counter() - started)
            close = self.server.draining
            if not await self._send(response, close=close, head=method == "HEAD") or close:
                return
            if self.h11.our_state is h11.MUST_CLOSE:
                return
            try:
                self.h11.start_next_cycle()
            except h11.ProtocolError:
                return
            deadline = trio.current_time() + limits.idle_timeout

    async def _read_request(self, deadline: float) -> tuple[str, str, dict[str, str], bytes] | None:
        limit = self.server.config.limits.max_http_body
        request: h11.Request | None = None
        body = bytearray()
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise HttpError(exc.error_status_hint, "bad_request", str(exc)) from None
            if event is h11.NEED_DATA:
                with trio.CancelScope(deadline=deadline) as scope:
                    self._receive_scope = scope
                    if self.server.draining and request is None:
                        scope.cancel()
                    data = await self.stream.receive_some(64 * 1024)
                self._receive_scope = None
                if scope.cancelled_caught:
                    if request is None:
                        return None  # idle keep-alive connection, or draining: close quietly
                    raise HttpError(408, "timeout", "request not received in time")
                try:
                    self.h11.receive_data(data)
                except h11.RemoteProtocolError as exc:
                    raise HttpError(400, "bad_request", str(exc)) from None
                continue
            if isinstance(event, h11.Request):
                request = event
                declared = _header(event.headers, b"content-length")
                if declared is not None and declared.isdigit() and int(declared) > limit:
                    raise HttpError(413, "too_large", f"body of {declared} bytes; the limit is {limit}")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > limit:
                    raise HttpError(413, "too_large", f"body above the limit of {limit} bytes")
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
                return (request.method.decode("ascii", "replace"),
                        request.target.decode("latin-1"), headers, bytes(body))
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None

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
        with trio.move_on_after(self.server.config.limits.idle_timeout) as timer:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False
        return not timer.cancelled_caught

    # ------------------------------------------------------------- routing

    async def _respond(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Response:
        path, _, query = target.partition("?")
        server = self.server
        try:
            if server.auth.protected_mode:
                server.auth.anonymous(self.peer)  # refuses non-loopback peers on every route
            if path in OPEN_ROUTES:
                if method not in ("GET", "HEAD"):
                    raise HttpError(405, "method_not_allowed", f"{path} answers GET")
                response = await self._open_route(path)
            else:
                response = await self._api(method, path, query, headers, body)
            server.metrics.requests.labels(path if path in OPEN_ROUTES else "api", "http").inc()
            return response
        except HttpError as exc:
            self._count_refusal(exc)
            return error_response(exc)
        except RateLimited as exc:
            refusal = HttpError(429, "rate_limited", str(exc), exc.retry_after)
            self._count_refusal(refusal)
            return error_response(refusal)
        except AuthError as exc:
            refusal = HttpError(403, "forbidden", str(exc))
            self._count_refusal(refusal)
            return error_response(refusal)
        except Exception as exc:
            refusal = http_error_for(exc)
            self._count_refusal(refusal)
            return error_response(refusal)

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

    async def _api(self, method: str, path: str, query: str, headers: dict[str, str],
                   body: bytes) -> Response:
        route_path = "/v1/records" if path.startswith("/v1/records/") else path
        route = ROUTES.get((method, route_path))
        if route is None:
            if any(p == route_path for _, p in ROUTES):
                raise HttpError(405, "method_not_allowed", f"{method} is not allowed on {path}")
            raise HttpError(404, "not_found", f"no route {path}")
        operation, opcode = route
        principal = self._principal(headers)
        server = self.server
        try:
            Authenticator.authorize(principal, opcode)
        except AuthError as exc:
            raise HttpError(403, "forbidden", str(exc)) from None
        try:
            server.limits.admit(principal.name, operation, trio.current_time())
        except RateLimited as exc:
            raise HttpError(429, "rate_limited", str(exc), exc.retry_after) from None
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

    async def _write(self, operation: str, body: bytes) -> Response:
        try:
            document = json.loads(body or b"null")
        except ValueError as exc:
            raise HttpError(400, "invalid_request", f"body: not JSON ({exc})") from None
        if isinstance(document, dict) and "encoded" in document and "records" not in document:
            encoded = [document["encoded"]]
        elif isinstance(document, dict) and isinstance(document.get("records"), list):
            encoded = document["records"]
        else:
            raise HttpError(400, "invalid_request",
                            'body: expected {"records": ["<hex>", …]} or {"encoded": "<hex>"}')
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
        kind = {"vote": RecordKind.VOTE, "epoch": RecordKind.EPOCH}.get(operation)
        server = self.server
        server.metrics.put_records.observe(len(parts))
        ids = await trio.to_thread.run_sync(server.service.put_encoded, b"".join(parts), offsets,
                                            trio.current_time(), kind, limiter=server.write_limiter)
        hex_ids = [bytes(row).hex() for row in ids]
        if "encoded" in document and "records" not in document:
            return json_response(200, {"id": hex_ids[0], "ids": hex_ids})
        return json_response(200, {"ids": hex_ids})

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
