"""The one exception hierarchy of StemeDB.

Owns: every error type a user can catch. Each class says in one line what
happened and, where there is one, what to do about it. Must never: import
anything from the rest of the package (every other module imports this one).
"""

from __future__ import annotations

__all__ = [
    "StemeError",
    "InvalidRecord",
    "SignatureError",
    "NotFound",
    "CorruptionError",
    "StorageFull",
    "DurabilityError",
    "ProtocolError",
    "AuthError",
    "RateLimited",
    "Unavailable",
    "DatabaseClosed",
]


class StemeError(Exception):
    """Base class of every error StemeDB raises on purpose."""


class InvalidRecord(StemeError, ValueError):
    """A record, or its encoding, breaks a rule; the message names the field and the rule.

    Nothing was written. Fix the named field and try again.
    """


class SignatureError(StemeError):
    """A signature or envelope proof is missing or does not verify; the record is refused."""


class NotFound(StemeError, KeyError):
    """No record with that ID is stored here."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain message
        return str(self.args[0]) if self.args else "not found"


class CorruptionError(StemeError):
    """Stored bytes failed their checksum or ID check; the record is not served.

    The message names the file, the offset and what failed. Run `stemedb verify`
    for a full report; restore the damaged record from a replica or a backup.
    """

    def __init__(self, message: str, *, path: str | None = None, offset: int | None = None):
        super().__init__(message)
        self.path = path
        self.offset = offset


class StorageFull(StemeError, OSError):
    """The disk has no room for more data; reads keep working. Free space, then write again."""


class DurabilityError(StemeError, OSError):
    """An fsync failed, so durability can no longer be promised.

    The store refuses every write until it is closed and reopened (recovery then
    re-reads what actually reached the disk). Nothing that was not acknowledged
    should be assumed stored.
    """


class ProtocolError(StemeError):
    """A peer sent bytes that break the wire protocol."""


class AuthError(StemeError):
    """Missing, wrong or insufficient credentials for the operation."""


class RateLimited(StemeError):
    """Too many requests; retry after `retry_after` seconds."""

    def __init__(self, message: str, *, retry_after: float = 0.0):
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(StemeError):
    """The service or a replica needed for the request is not reachable right now; retry later."""


class DatabaseClosed(StemeError):
    """The Database was closed (by its owner) and serves nothing more; open it again to go on.

    A server whose store is closed (it is shutting down) answers `unavailable`.
    """
