"""The operations both front doors serve, run against the embedded Database.

Owns: what a PUT / GET / QUERY / SCAN / STATS / AUDIT does with the store
(reading the headers of written records for their kind and write quotas,
handing the bytes to `db.put_encoded`, turning a Resolution into JSON), and the mapping from
StemeDB exceptions to protocol error codes. Every method here blocks (it
decodes, verifies or waits for a group commit): the front doors call them
through `trio.to_thread.run_sync`, never on the event loop.

Error handling: exceptions propagate unchanged; `error_code(exc)` names the
protocol error code, message and retry-after for any of them. Nothing is
written when a batch is refused (quota, invalid record, bad signature).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from stemedb import _codec, _protocol
from stemedb.errors import (
    AuthError,
    CorruptionError,
    DurabilityError,
    InvalidRecord,
    NotFound,
    ProtocolError,
    RateLimited,
    SignatureError,
    StemeError,
    StorageFull,
    Unavailable,
)
from stemedb.records import RecordKind
from stemedb.server.limits import RequestLimits

log = logging.getLogger("stemedb.server")

KIND_CODES: dict[str, int] = {"assertion": RecordKind.ASSERTION, "vote": RecordKind.VOTE,
                              "epoch": RecordKind.EPOCH, "envelope": RecordKind.ENVELOPE}
KIND_NAMES = {code: name for name, code in KIND_CODES.items()}
MAX_CONTRIBUTING = 1000  # contributing records sent with a query answer, at most


class ServiceError(StemeError):
    """A refusal with an explicit protocol error code (e.g. unsupported, invalid request)."""

    def __init__(self, code: int, message: str, *, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after = retry_after


def error_code(exc: BaseException) -> tuple[int, str, float]:
    """(protocol error code, message for the client, retry-after seconds) for an exception."""
    if isinstance(exc, ServiceError):
        return exc.code, str(exc), exc.retry_after
    if isinstance(exc, _protocol.FrameError):
        return int(exc.code), str(exc), 0.0
    table: tuple[tuple[type[BaseException], int], ...] = (
        (RateLimited, _protocol.E_RATE_LIMITED),
        (AuthError, _protocol.E_FORBIDDEN),
        (InvalidRecord, _protocol.E_INVALID_RECORD),
        (SignatureError, _protocol.E_SIGNATURE),
        (NotFound, _protocol.E_NOT_FOUND),
        (StorageFull, _protocol.E_STORAGE_FULL),
        (DurabilityError, _protocol.E_DURABILITY),
        (CorruptionError, _protocol.E_CORRUPTION),
        (Unavailable, _protocol.E_UNAVAILABLE),
        (ProtocolError, _protocol.E_PROTOCOL),
    )
    for kind, code in table:
        if isinstance(exc, kind):
            retry = exc.retry_after if isinstance(exc, RateLimited) else 0.0
            return code, str(exc), retry
    if isinstance(exc, StemeError):
        return _protocol.E_UNAVAILABLE if "closed" in str(exc) else _protocol.E_INTERNAL, str(exc), 0.0
    if isinstance(exc, (ValueError, TypeError)):
        return _protocol.E_INVALID_REQUEST, str(exc), 0.0
    log.error("internal error while serving a request", exc_info=exc)
    return _protocol.E_INTERNAL, f"internal error ({type(exc).__name__}); see the server log", 0.0


class Service:
    """Database operations with quotas; blocking, thread-safe (the Database is)."""

    def __init__(self, db: Any, limits: RequestLimits) -> None:
        self.db = db
        self.limits = limits

    # ---------------------------------------------------------------- writes

    def put_encoded(self, blob: Any, offsets: np.ndarray, now: float,
                    expect_kind: int | None = None) -> np.ndarray:
        """Store a batch of encoded records; returns their IDs (n, 32) in request order.

        The bytes go to the engine as they arrived (`Database.put_encoded`):
        one durable batch, or nothing if any record is refused. Envelopes in
        the batch prove the members that name them; other records must be
        individually signed or members of an envelope already stored. Before
        that, only the records' headers are read here: for the kind a VOTE /
        EPOCH request allows, and for the signers' write quotas. Acknowledged
        (returned) only once durable.
        """
        if expect_kind is not None or self.limits.has_quotas:
            kinds, signers = _codec.record_heads(blob, offsets)
            others = kinds != RecordKind.ENVELOPE
            if expect_kind is not None:
                wrong = np.flatnonzero(others & (kinds != expect_kind))
                if len(wrong):
                    index = int(wrong[0])
                    raise ServiceError(_protocol.E_INVALID_REQUEST,
                                       f"records[{index}]: expected a {KIND_NAMES[expect_kind]}, "
                                       f"got a {KIND_NAMES.get(int(kinds[index]), '?')}")
            if self.limits.has_quotas:
                self._charge(signers[others], now)
        kind = RecordKind(expect_kind) if expect_kind is not None else None
        return self.db.put_encoded(blob, offsets, kind=kind)

    def _charge(self, signers: np.ndarray, now: float) -> None:
        """Charge each first signer's records to its write quota (a record without signers: b"")."""
        keys, counts = np.unique(signers, axis=0, return_counts=True)
        by_signer = {(bytes(key) if key.any() else b""): int(count) for key, count in zip(keys, counts)}
        try:
            self.limits.charge_writes(by_signer, now)
        except RateLimited as exc:
            raise ServiceError(_protocol.E_QUOTA_EXCEEDED, str(exc), retry_after=exc.retry_after) from None

    # ----------------------------------------------------------------- reads

    def get_encoded(self, ids: np.ndarray) -> tuple[bytes, np.ndarray]:
        """(blob, offsets) of the stored records for `ids`; an absent ID has an empty slice."""
        blob, offsets, _rows = self.db.get_encoded_many(ids)
        return blob, offsets

    def encoded_lengths(self, ids: np.ndarray) -> np.ndarray:
        """Bytes of the stored record for each of `ids` (0 where absent), without reading any.

        The lengths come from the store's in-memory columns, under the lock
        its own reads take; the engine offers no public call for them yet.
        """
        array = np.ascontiguousarray(ids, dtype=np.uint8).reshape(-1, 32)
        db = self.db
        with db._state_lock:
            state = db.state
            rows = np.asarray(state.lookup_many(array), dtype=np.int64)
            lengths = state.columns.arrays["length"][np.maximum(rows, 0)].astype(np.int64)
        lengths[rows < 0] = 0
        return lengths

    def plan_get(self, ids: np.ndarray, target: int, max_frame: int) -> list[tuple[int, int, int]]:
        """The frames of a GET answer: (first, end, payload bytes) spans of `ids`, see frame_spans."""
        return frame_spans(self.encoded_lengths(ids), target, max_frame)

    def get_record(self, record_id: bytes) -> Any:
        return self.db.get(record_id)

    def _query_function(self) -> Any:
        """The store's `query`, or None for a store object without one."""
        return getattr(self.db, "query", None)

    def query(self, subject: str, predicate: str | None, lens: str | None,
              options: dict[str, Any], agent: str | None = None) -> tuple[dict[str, Any], list[Any]]:
        """(JSON-ready resolution, contributing records: the winner first).

        `options` are the resolution engine's filters. With "audit": true the
        query is recorded under `agent` (the authenticated principal; a client
        cannot name another).
        """
        query = self._query_function()
        if query is None:
            raise ServiceError(_protocol.E_UNSUPPORTED,
                               "queries are not available: this build has no resolution engine")
        if not subject:
            raise ServiceError(_protocol.E_INVALID_REQUEST, "subject: required")
        kwargs = dict(options)
        if "agent" in kwargs:
            raise ServiceError(_protocol.E_INVALID_REQUEST, "options: agent is set by the server")
        if kwargs.get("audit"):
            kwargs["agent"] = agent
        if lens:
            kwargs["lens"] = lens
        try:
            result = query(subject, predicate or None, **kwargs)
        except TypeError as exc:
            raise ServiceError(_protocol.E_INVALID_REQUEST, f"query: {exc}") from None
        records: dict[bytes, Any] = {}
        wanted: list[bytes] = []
        _collect_records(result, records, wanted, depth=0)
        missing = [i for i in dict.fromkeys(wanted) if i not in records][:MAX_CONTRIBUTING]
        if missing:
            for record in self.db.get_many(missing):
                if record is not None:
                    records[record.id] = record
        return jsonable(result), list(records.values())

    def scan(self, subject: str | None, predicate: str | None, kind: int,
             limit: int) -> Iterator[list[Any]]:
        """Chunks of stored records (write order), at most `limit` in all."""
        records = self.db.scan(subject or None, predicate or None,
                               kind=KIND_NAMES[kind] if kind else None)
        chunk: list[Any] = []
        sent = 0
        for record in records:
            if sent >= limit:
                break
            chunk.append(record)
            sent += 1
            if len(chunk) >= 4096:
                yield chunk
                chunk = []
        yield chunk

    def stats(self) -> dict[str, Any]:
        return dict(self.db.stats())

    def audit(self, limit: int) -> Any:
        """The last `limit` recorded queries."""
        audit = getattr(self.db, "audit", None)
        if audit is None:
            raise ServiceError(_protocol.E_UNSUPPORTED, "this store keeps no audit log")
        return jsonable(audit(limit=limit))


def frame_spans(lengths: np.ndarray, target: int, max_frame: int) -> list[tuple[int, int, int]]:
    """Cut records of these lengths into record batches: (first, end, payload bytes) each.

    Records first..end-1 go in one batch of about `target` payload bytes at
    most; a record too large for that gets a batch of its own. There is at
    least one span, even for no records. A record that cannot fit a
    `max_frame` payload is refused (invalid_request) before anything is read.
    """
    total = 4 + 4 * len(lengths) + int(lengths.sum())
    if total <= target:
        return [(0, len(lengths), total)]
    spans: list[tuple[int, int, int]] = []
    first, size = 0, 4
    for index, length in enumerate(lengths.tolist()):
        entry = 4 + length
        if 4 + entry > max_frame:
            raise ServiceError(_protocol.E_INVALID_REQUEST,
                               f"ids[{index}]: the record is {length} bytes, more than a "
                               f"{max_frame}-byte frame holds")
        if size + entry > target and index > first:
            spans.append((first, index, size))
            first, size = index, 4
        size += entry
    spans.append((first, len(lengths), size))
    return spans


def record_json(record: Any) -> dict[str, Any]:
    """A JSON view of any record (assertions field by field; others with their encoding)."""
    to_dict = getattr(record, "to_dict", None)
    if to_dict is not None:
        return dict(to_dict())
    return {"kind": type(record).__name__.lower(), "id": record.id.hex(),
            "timestamp": record.timestamp, "signers": [k.hex() for k in record.signers],
            "encoded": record.encode().hex()}


def jsonable(value: Any, depth: int = 0) -> Any:
    """A JSON-ready copy: dataclasses and objects with to_dict() → dicts, bytes → hex, enums → names."""
    if depth > 32:
        return repr(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, enum.Enum):
        return value.name.lower()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, _codec.Record):
        return record_json(value)
    if isinstance(value, np.generic):
        return jsonable(value.item(), depth + 1)
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist(), depth + 1)
    if isinstance(value, dict):
        return {str(jsonable(k, depth + 1)): jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v, depth + 1) for v in value]
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return jsonable(to_dict(), depth + 1)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name), depth + 1) for f in dataclasses.fields(value)}
    if hasattr(value, "__dict__"):
        return {k: jsonable(v, depth + 1) for k, v in vars(value).items() if not k.startswith("_")}
    return repr(value)


def _collect_records(value: Any, out: dict[bytes, Any], wanted: list[bytes], depth: int) -> None:
    """Records reachable from a query result (winners), and IDs of contributing assertions."""
    if depth > 8 or value is None or isinstance(value, (str, bytes, int, float, bool, enum.Enum)):
        return
    if isinstance(value, _codec.Record):
        out.setdefault(value.id, value)
        return
    assertion_id = getattr(value, "assertion_id", None)
    if isinstance(assertion_id, bytes) and not isinstance(value, _codec.Record):
        wanted.append(assertion_id)
        return
    if isinstance(value, dict):
        children: Any = value.values()
    elif isinstance(value, (list, tuple)):
        children = value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        children = [getattr(value, f.name) for f in dataclasses.fields(value)]
    else:  # result objects (e.g. a Resolution with __slots__): their winner and contributions
        children = [getattr(value, name, None) for name in ("winner", "contributions")]
        if hasattr(value, "__dict__"):
            children += list(vars(value).values())
    for child in children:
        _collect_records(child, out, wanted, depth + 1)


def parse_options(text: str) -> dict[str, Any]:
    """QUERY options: a JSON object (or empty)."""
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ServiceError(_protocol.E_INVALID_REQUEST, f"options: not JSON ({exc.msg})") from None
    if not isinstance(options, dict):
        raise ServiceError(_protocol.E_INVALID_REQUEST, "options: expected a JSON object")
    if "lens" in options:
        raise ServiceError(_protocol.E_INVALID_REQUEST, "options: the lens has its own field")
    return options
