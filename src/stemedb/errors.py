"""The one exception hierarchy of StemeDB, and the one error table, built from it.

Owns: every error type a user can catch, and what each means to a peer: its
protocol error code and name (docs/protocol.md, "Errors"), the HTTP status
the side door answers with, whether the binary protocol closes the connection
after it, and whether sending the same request again may succeed. Each class
says all of this in its own body; the first class to declare a code owns it
(it is the row of the table, and what a client raises for that code), and
any later class with the same code is a variant that must agree on its name
and on closing (it may differ in HTTP status and retry_safe). ERROR_CLASSES
is the table: the server and its HTTP door (`refusal`), the clients
(`error_from_code`), stemedb._protocol's ERROR_CODES and the table in
docs/protocol.md (tests/test_errors.py reads it) all derive from it. Must
never: import anything from the rest of the package (every other module
imports this one), or keep a second list of codes anywhere.

Error handling: `refusal(exc)` maps any exception to its row; an exception
that is not a StemeError is a bug, logged with its traceback to the
"stemedb" logger and answered `internal` without its details.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

__all__ = [
    "StemeError",
    "ProtocolError",
    "FrameError",
    "UnsupportedVersion",
    "FrameTooLarge",
    "HeadersTooLarge",
    "AuthError",
    "AuthRequired",
    "PeerRefused",
    "Forbidden",
    "RateLimited",
    "QuotaExceeded",
    "InvalidRequest",
    "MethodNotAllowed",
    "InvalidRecord",
    "SignatureError",
    "NotFound",
    "Unsupported",
    "StorageFull",
    "DurabilityError",
    "CorruptionError",
    "Unavailable",
    "TooManyConnections",
    "ConnectionTimeout",
    "DatabaseClosed",
    "RequestTimeout",
    "ConnectionLost",
    "ClientClosed",
    "ConfigError",
    "ERROR_CLASSES",
    "Refusal",
    "refusal",
    "error_from_code",
]

log = logging.getLogger("stemedb")

ERROR_CLASSES: dict[int, type[StemeError]] = {}
"""Protocol error code → the class that owns it, in code order once the module is loaded."""


class StemeError(Exception):
    """Base class of every error StemeDB raises on purpose; on the wire, a server bug.

    The class attributes are the error's row of the table (see the module
    docstring); `retry_after` is the wait in seconds a refusal suggests (0: none).
    """

    code: ClassVar[int] = 20
    name: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500
    closes: ClassVar[bool] = False       # the binary protocol closes the connection after it
    retry_safe: ClassVar[bool] = False   # the same request, sent again later, may succeed
    retry_after: float = 0.0

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        owner = ERROR_CLASSES.setdefault(cls.code, cls)
        if owner is not cls and (cls.name, cls.closes) != (owner.name, owner.closes):
            raise TypeError(f"{cls.__name__}: error code {cls.code} is {owner.__name__}'s "
                            f"({owner.name!r}, closes={owner.closes}); a class sharing it must "
                            "agree on name and closes, or declare a code of its own")


ERROR_CLASSES[StemeError.code] = StemeError


# ---------------------------------------------------------------- the wire itself

class ProtocolError(StemeError):
    """A peer sent bytes that break the wire protocol; the connection cannot go on."""

    code = 1
    name = "protocol"
    http_status = 400
    closes = True


class FrameError(ProtocolError):
    """Bytes that break docs/protocol.md, found by the frame codec (stemedb._protocol).

    `request_id` is the offending frame's request id when its header could be
    read, else 0.
    """

    def __init__(self, message: str, *, request_id: int = 0) -> None:
        super().__init__(message)
        self.request_id = request_id


class UnsupportedVersion(ProtocolError):
    """Client and server share no protocol version; upgrade the older side."""

    code = 2
    name = "unsupported_version"


class FrameTooLarge(FrameError):
    """A frame (or an HTTP body) declares more bytes than the limit; send smaller requests."""

    code = 3
    name = "frame_too_large"
    http_status = 413


class HeadersTooLarge(FrameTooLarge):
    """An HTTP request line and headers above 16 KiB."""

    http_status = 431


# ------------------------------------------------------------------ who may ask

class AuthError(StemeError):
    """Missing, wrong or insufficient credentials; itself: an unknown or expired token, or a
    peer that protected mode does not serve."""

    code = 5
    name = "auth_failed"
    http_status = 401
    closes = True


class PeerRefused(AuthError):
    """Protected mode (no tokens configured) serves loopback clients only, and this peer is not
    one; configure [[tokens]] to serve the network. HTTP 403: no credential would help."""

    http_status = 403


class AuthRequired(AuthError):
    """A request before HELLO or without a token where one is needed; pass token=…."""

    code = 4
    name = "auth_required"


class Forbidden(AuthError):
    """The token's role does not allow the operation; use a token with a higher role."""

    code = 6
    name = "forbidden"
    http_status = 403
    closes = False


class RateLimited(StemeError):
    """Too many requests; retry after `retry_after` seconds."""

    code = 7
    name = "rate_limited"
    http_status = 429
    retry_safe = True

    def __init__(self, message: str, *, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QuotaExceeded(RateLimited):
    """A signer's write quota is exhausted; retry after `retry_after` seconds, or send smaller
    batches if one batch exceeds the quota's burst."""

    code = 8
    name = "quota_exceeded"


# ------------------------------------------------------------- what was asked

class InvalidRequest(StemeError, ValueError):
    """Well-framed but unacceptable parameters (a bad filter, a wrong record kind); nothing
    was changed. The message names the parameter."""

    code = 9
    name = "invalid_request"
    http_status = 400


class MethodNotAllowed(InvalidRequest):
    """The HTTP side door serves this path with another method."""

    http_status = 405


class InvalidRecord(StemeError, ValueError):
    """A record, or its encoding, breaks a rule; the message names the field and the rule.

    Nothing was written. Fix the named field and try again.
    """

    code = 10
    name = "invalid_record"
    http_status = 400


class SignatureError(StemeError):
    """A signature or envelope proof is missing or does not verify; the record is refused."""

    code = 11
    name = "signature"
    http_status = 400


class NotFound(StemeError, KeyError):
    """No record with that ID is stored here."""

    code = 12
    name = "not_found"
    http_status = 404

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain message
        return str(self.args[0]) if self.args else "not found"


class Unsupported(StemeError):
    """The server does not offer this operation (e.g. queries on a build without the engine)."""

    code = 13
    name = "unsupported"
    http_status = 501


# ---------------------------------------------------------------- the store

class StorageFull(StemeError, OSError):
    """The disk has no room for more data; reads keep working. Free space, then write again."""

    code = 14
    name = "storage_full"
    http_status = 507


class DurabilityError(StemeError, OSError):
    """An fsync failed, so durability can no longer be promised.

    The store refuses every write until it is closed and reopened (recovery then
    re-reads what actually reached the disk). Nothing that was not acknowledged
    should be assumed stored. The HTTP door answers 503: the store is out of
    service for writes until someone reopens it.
    """

    code = 15
    name = "durability"
    http_status = 503


class CorruptionError(StemeError):
    """Stored bytes failed their checksum or ID check; the record is not served.

    The message names the file, the offset and what failed. Run `stemedb verify`
    for a full report; restore the damaged record from a replica or a backup.
    """

    code = 16
    name = "corruption"
    http_status = 500

    def __init__(self, message: str, *, path: str | None = None, offset: int | None = None):
        super().__init__(message)
        self.path = path
        self.offset = offset


# ------------------------------------------------------------ not right now

class Unavailable(StemeError):
    """The service or a replica needed for the request is not reachable right now; retry later."""

    code = 17
    name = "unavailable"
    http_status = 503
    retry_safe = True


class TooManyConnections(Unavailable):
    """The server's connection cap is reached; it closed this connection. Retry later."""

    code = 18
    name = "too_many_connections"
    closes = True


class ConnectionTimeout(Unavailable, TimeoutError):
    """The server closed the connection on a timeout: handshake not completed in time, idle
    too long, or answers not read. Reconnect (the clients do) and retry."""

    code = 19
    name = "timeout"
    http_status = 408
    closes = True


class DatabaseClosed(StemeError):
    """The Database was closed (by its owner) and serves nothing more; open it again to go on.

    A server whose store is closed (it is shutting down) answers `unavailable`:
    for its clients the store is away, not gone.
    """

    code = Unavailable.code
    name = Unavailable.name
    http_status = Unavailable.http_status


# ------------------------------------------- raised by the clients, never sent

class RequestTimeout(Unavailable, TimeoutError):
    """No answer within the timeout; for a write, it may or may not have been stored.

    Writes are idempotent (records are content-addressed), so retrying is safe.
    """


class ConnectionLost(Unavailable):
    """The connection broke with requests in flight; retrying (writes included) is safe."""


class ClientClosed(StemeError):
    """The client (or its writer) is closed, or was never opened; make a new one."""


class ConfigError(StemeError, ValueError):
    """A server configuration value is invalid; the message names the key and what is expected."""


# ------------------------------------------------------------------ the table

ERROR_CLASSES = dict(sorted(ERROR_CLASSES.items()))


@dataclass(frozen=True)
class Refusal:
    """What a server answers for an exception: the error class, the message and the wait."""

    error: type[StemeError]
    message: str
    retry_after: float = 0.0

    @property
    def code(self) -> int:
        return self.error.code

    @property
    def name(self) -> str:
        return self.error.name

    @property
    def http_status(self) -> int:
        return self.error.http_status

    @property
    def closes(self) -> bool:
        return self.error.closes


def refusal(exc: BaseException) -> Refusal:
    """The answer to `exc`: its class's row, or `internal` (logged) for anything unexpected."""
    if isinstance(exc, StemeError):
        return Refusal(type(exc), str(exc), exc.retry_after)
    log.error("internal error while serving a request", exc_info=exc)
    return Refusal(StemeError, f"internal error ({type(exc).__name__}); see the server log")


def error_from_code(code: int, message: str, retry_after: float = 0.0) -> StemeError:
    """The exception a client raises for an error a server sent: the owner of `code`."""
    owner = ERROR_CLASSES.get(code)
    error = owner(message) if owner is not None else StemeError(
        f"{message} (error code {code}, which this client does not know)")
    error.retry_after = retry_after
    return error
