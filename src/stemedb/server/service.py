"""The operations both front doors serve, run against the embedded Database.

Owns: what a PUT / GET / QUERY / SCAN / STATS / AUDIT does with the store
(reading the headers of written records for their kind and write quotas,
handing the bytes to `db.put_encoded`, turning a Resolution into JSON). Every
method here blocks (it verifies or waits for a group commit): the request
pipeline (stemedb.server.pipeline) runs them in worker threads, never on the
event loop. Must never: know which door a request came through, or keep an
error code of its own (refusals are the classes of stemedb.errors).

Error handling: exceptions propagate to the pipeline, which answers them
through the one error table; arguments the query engine refuses (ValueError,
TypeError) become InvalidRequest here, where they are known to be the
caller's. Nothing is written when a batch is refused (quota, invalid record,
bad signature).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from stemedb import _codec
from stemedb._codec import Record
from stemedb.database import Database
from stemedb.errors import InvalidRequest, StemeError
from stemedb.records import RecordKind
from stemedb.server.limits import RequestLimits

KIND_CODES: dict[str, int] = {"assertion": RecordKind.ASSERTION, "vote": RecordKind.VOTE,
                              "epoch": RecordKind.EPOCH, "envelope": RecordKind.ENVELOPE}
KIND_NAMES = {code: name for name, code in KIND_CODES.items()}
MAX_CONTRIBUTING = 1000  # contributing records sent with a query answer, at most

Blob = bytes | bytearray | memoryview  # encoded records back to back, cut by an offsets array
IdArray = np.ndarray[tuple[int, int], np.dtype[np.uint8]]
JSON = dict[str, Any]


class Service:
    """Database operations with quotas; blocking, thread-safe (the Database is)."""

    def __init__(self, db: Database, limits: RequestLimits) -> None:
        self.db = db
        self.limits = limits

    # ---------------------------------------------------------------- writes

    def put_encoded(self, blob: Blob, offsets: np.ndarray, now: float,
                    expect_kind: int | None = None) -> np.ndarray:
        """Store a batch of encoded records; returns their IDs (n, 32) in request order.

        The bytes go to the engine as they arrived (`Database.put_encoded`):
        one durable batch, or nothing if any record is refused. Envelopes in
        the batch prove the members that name them; other records must be
        individually signed or members of an envelope already stored. Before
        that, only the records' headers are read here (`check_write`).
        Acknowledged (returned) only once durable.
        """
        self.check_write(blob, offsets, now, expect_kind)
        kind = RecordKind(expect_kind) if expect_kind is not None else None
        ids: np.ndarray = self.db.put_encoded(blob, offsets, kind=kind)
        return ids

    def check_write(self, blob: Blob, offsets: np.ndarray, now: float,
                    expect_kind: int | None = None) -> None:
        """The checks of a write that read only the records' headers: the kind a VOTE / EPOCH
        request allows, and the signers' write quotas (charged here)."""
        if expect_kind is not None or self.limits.has_quotas:
            kinds, signers = _codec.record_heads(blob, offsets)
            others = kinds != RecordKind.ENVELOPE
            if expect_kind is not None:
                wrong = np.flatnonzero(others & (kinds != expect_kind))
                if len(wrong):
                    index = int(wrong[0])
                    raise InvalidRequest(f"records[{index}]: expected {_a(KIND_NAMES[expect_kind])}, "
                                         f"got {_a(KIND_NAMES.get(int(kinds[index]), 'unknown kind'))}")
            if self.limits.has_quotas:
                self._charge(signers[others], now)

    def cluster_batch(self, blob: Blob, offsets: np.ndarray, now: float,
                      expect_kind: int | None = None) -> tuple[bytes, np.ndarray, np.ndarray]:
        """A write for a cluster node: `check_write`, then the records as (blob, offsets, IDs),
        the IDs hashed from their bytes (the node verifies every record before storing it)."""
        self.check_write(blob, offsets, now, expect_kind)
        offsets = np.asarray(offsets, dtype=np.int64)
        start = int(offsets[0]) if len(offsets) else 0
        data = bytes(memoryview(blob)[start:int(offsets[-1])]) if len(offsets) else b""
        ids: np.ndarray = _codec.hash_encoded(blob, offsets)
        return data, offsets - start, ids

    def _charge(self, signers: np.ndarray, now: float) -> None:
        """Charge each first signer's records to its write quota (a record without signers: b"")."""
        keys, counts = np.unique(signers, axis=0, return_counts=True)
        by_signer = {(bytes(key) if key.any() else b""): int(count) for key, count in zip(keys, counts)}
        self.limits.charge_writes(by_signer, now)  # raises QuotaExceeded

    # ----------------------------------------------------------------- reads

    def get_encoded(self, ids: IdArray) -> tuple[bytes, np.ndarray]:
        """(blob, offsets) of the stored records for `ids`; an absent ID has an empty slice."""
        blob, offsets, _rows = self.db.get_encoded_many(ids)
        return blob, offsets

    def encoded_lengths(self, ids: IdArray) -> np.ndarray:
        """Bytes of the stored record for each of `ids` (0 where absent), without reading any."""
        lengths: np.ndarray = np.maximum(self.db.encoded_lengths(ids), 0)
        return lengths

    def plan_get(self, ids: IdArray, target: int, max_frame: int) -> list[tuple[int, int, int]]:
        """The frames of a GET answer: (first, end, payload bytes) spans of `ids`, see frame_spans."""
        return frame_spans(self.encoded_lengths(ids), target, max_frame)

    def get_record(self, record_id: bytes) -> Record:
        """The record with this ID (NotFound if there is none)."""
        record: Record = self.db.get(record_id)
        return record

    def query(self, subject: str, predicate: str | None, lens: str | None,
              options: JSON, agent: str | None = None) -> tuple[Any, list[Record]]:
        """(JSON-ready resolution, contributing records: the winner first).

        `options` are the resolution engine's filters. With "audit": true the
        query is recorded under `agent` (the authenticated principal; a client
        cannot name another).
        """
        if not subject:
            raise InvalidRequest("subject: required")
        kwargs = dict(options)
        if "agent" in kwargs:
            raise InvalidRequest("options: agent is set by the server")
        if kwargs.get("audit"):
            kwargs["agent"] = agent
        parameters = kwargs.pop("lens_parameters", None)
        if parameters is not None and not lens:
            raise InvalidRequest("options: lens_parameters needs a lens name")
        try:
            if parameters is not None:
                from stemedb.lenses import from_wire  # with the query engine: loaded on first query

                kwargs["lens"] = from_wire(lens or "", parameters)
            elif lens:
                kwargs["lens"] = lens
            result = self.db.query(subject, predicate or None, **kwargs)
        except StemeError:
            raise
        except ValueError as exc:  # the query engine refusing the caller's filters or lens
            raise InvalidRequest(str(exc)) from None
        except TypeError as exc:  # an option the query engine does not take
            raise InvalidRequest(f"query: {exc}") from None
        records: dict[bytes, Record] = {}
        wanted: list[bytes] = []
        _collect_records(result, records, wanted, depth=0)
        missing = [i for i in dict.fromkeys(wanted) if i not in records][:MAX_CONTRIBUTING]
        if missing:
            for record in self.db.get_many(missing):
                if record is not None:
                    records[record.id] = record
        return jsonable(result), list(records.values())

    def scan(self, subject: str | None, predicate: str | None, kind: int,
             limit: int) -> Iterator[list[Record]]:
        """Chunks of stored records (write order), at most `limit` in all."""
        records = self.db.scan(subject or None, predicate or None,
                               kind=KIND_NAMES[kind] if kind else None)
        chunk: list[Record] = []
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

    def stats(self) -> JSON:
        return dict(self.db.stats())

    def verify(self) -> JSON:
        """The scrub of `Database.verify()` on the served store, as the CLI prints it."""
        report = self.db.verify()
        return {"ok": report.ok, "records_checked": report.records_checked,
                "problems": list(report.problems), "scope": "segments"}

    def audit(self, limit: int) -> list[JSON]:
        """The last `limit` recorded queries."""
        entries: list[JSON] = jsonable(self.db.audit(limit=limit))
        return entries


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
            raise InvalidRequest(f"ids[{index}]: the record is {length} bytes, more than a "
                                 f"{max_frame}-byte frame holds")
        if size + entry > target and index > first:
            spans.append((first, index, size))
            first, size = index, 4
        size += entry
    spans.append((first, len(lengths), size))
    return spans


def _a(noun: str) -> str:
    """The noun with its indefinite article: "a vote", "an epoch", "an assertion"."""
    return f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}"


def record_json(record: Record) -> JSON:
    """A JSON view of any record (assertions field by field; others with their encoding)."""
    to_dict = getattr(record, "to_dict", None)
    if to_dict is not None:
        return dict(to_dict())  # an Assertion: field by field
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


def _collect_records(value: Any, out: dict[bytes, Record], wanted: list[bytes], depth: int) -> None:
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


def parse_options(text: str) -> JSON:
    """QUERY options: a JSON object (or empty)."""
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"options: not JSON ({exc.msg})") from None
    if not isinstance(options, dict):
        raise InvalidRequest("options: expected a JSON object")
    if "lens" in options:
        raise InvalidRequest("options: the lens has its own field")
    return options
