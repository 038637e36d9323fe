"""What both clients share: addresses, request payloads, response decoding, errors.

Owns: parsing "stemedb://host:port" addresses, turning records into PUT
payloads of at most the server's frame size, decoding GET / QUERY / SCAN
answers into records, and turning error frames into StemeDB exceptions
(through the one error table, stemedb.errors: the class that owns the
frame's code). Must never: do I/O (the blocking and async clients own their
sockets), or define an error class (they all live in stemedb.errors).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from stemedb import _codec, _protocol
from stemedb.errors import (
    AuthRequired,
    InvalidRecord,
    InvalidRequest,
    ProtocolError,
    SignatureError,
    StemeError,
    error_from_code,
)
from stemedb.records import Envelope, RecordKind, Signer
from stemedb.reports import VerifyReport
from stemedb.results import Resolution

DEFAULT_PORT = 7440
CLIENT_NAME = "stemedb-python"
SCAN_KINDS: dict[str | None, int] = {None: 0, **{kind.name.lower(): int(kind) for kind in RecordKind}}


def error_from_frame(payload: bytes) -> StemeError:
    """The exception an ERROR frame stands for: the class that owns its code (stemedb.errors)."""
    code, retry_after_ms, message = _protocol.decode_error(payload)
    return error_from_code(code, message, retry_after_ms / 1000.0)


@dataclass(frozen=True)
class Address:
    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        scheme = "stemedbs" if self.tls else "stemedb"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"


def parse_url(url: str) -> Address:
    """"stemedb://host:port" (or "stemedbs://" for TLS; "host:port" alone also works)."""
    if "://" not in url:
        url = "stemedb://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("stemedb", "stemedbs"):
        raise ValueError(f"{url!r}: expected stemedb://host:port or stemedbs://host:port")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError(f"{url!r}: bad port") from None
    return Address(parts.hostname or "127.0.0.1", port, parts.scheme == "stemedbs")


@dataclass
class Session:
    """What the server said in its HELLO answer."""

    version: int
    role: int
    server_flags: int
    max_frame: int
    max_inflight: int
    server_name: str

    @property
    def role_name(self) -> str:
        return str(_protocol.ROLE_NAMES[self.role])

    @property
    def protected_mode(self) -> bool:
        return bool(self.server_flags & _protocol.SERVER_PROTECTED_MODE)

    @property
    def replication(self) -> bool:
        """The server answers SYNC and SYNC_WITH (docs/protocol.md, "HELLO")."""
        return bool(self.server_flags & _protocol.SERVER_REPLICATION)

    @property
    def cluster(self) -> bool:
        """The server is a node of a cluster (NODE_HELLO, PUSH, REPLICA_PUT, CLUSTER_*)."""
        return bool(self.server_flags & _protocol.SERVER_CLUSTER)


def hello_payload(token: str | None, name: str = CLIENT_NAME) -> bytes:
    return bytes(_protocol.encode_hello(_protocol.MIN_PROTOCOL_VERSION, _protocol.PROTOCOL_VERSION,
                                        name, token or ""))


def check_hello(opcode: int, payload: bytes, token: str | None) -> Session:
    """The Session of a HELLO answer (raises the error an ERROR answer stands for)."""
    if opcode == _protocol.ERROR:
        raise error_from_frame(payload)
    if opcode != _protocol.HELLO:
        raise ProtocolError(f"expected a HELLO answer, got opcode {opcode:#04x}")
    session = Session(*_protocol.decode_hello_ok(payload))
    if session.role == _protocol.ROLE_NONE:
        raise AuthRequired("the server requires a token: connect(..., token=...)")
    return session


def records_batches(records: Sequence[Any], envelope: Envelope | Sequence[Envelope] | None,
                    max_frame: int) -> list[bytes]:
    """PUT payloads, each ≤ max_frame bytes: envelopes first, then the records, in order.

    A batch proven by envelopes is sent whole (the server needs each member
    with its envelope); if it cannot fit one frame, InvalidRecord says so.
    """
    envelopes: list[Any] = []
    if envelope is not None:
        envelopes = [envelope] if isinstance(envelope, Envelope) else list(envelope)
    all_records = [*envelopes, *records]
    if not all_records:
        return [bytes(_protocol.encode_record_batch(b"", [0]))]
    blob, offsets, _ids = _codec.encode_many(all_records)
    spans = _protocol.split_record_batch(blob, offsets, max_frame)
    if envelopes and len(spans) > 1:
        raise InvalidRecord(f"a signed batch of {len(records)} records does not fit one "
                            f"{max_frame}-byte frame; sign smaller batches")
    return [bytes(_protocol.encode_record_batch(blob, offsets[first:end + 1])) for first, end in spans]


def signed_batch(records: Sequence[Any], signer: Signer, max_frame: int) -> bytes:
    """A PUT payload: `records` (unsigned) as members of one envelope signed by `signer`.

    Byte-for-byte what ``signer.sign_batch(records)`` then encoding would give,
    built without a Python object per member (the client's share of group
    signing: encode once, hash the contents, one Ed25519 signature).
    """
    blob, offsets, _ids = _codec.encode_many(records)
    try:
        members, member_offsets = _protocol.envelope_members(blob, offsets, signer.public_key)
    except ValueError as exc:
        raise SignatureError(str(exc)) from None
    ids = _codec.hash_encoded(members, member_offsets)
    envelope = Envelope(signer.public_key, ids).sign(signer)
    _protocol.set_envelope_id(members, member_offsets, envelope.id)
    head = envelope.encode()
    offsets = np.empty(len(member_offsets) + 1, dtype=np.int64)
    offsets[0] = 0
    offsets[1:] = member_offsets + len(head)
    payload = bytes(_protocol.encode_record_batch(head + members, offsets))
    if len(payload) > max_frame:
        raise InvalidRecord(f"a signed batch of {len(records)} records is {len(payload)} bytes, above "
                            f"the server's {max_frame}-byte frames; lower the writer's max_records")
    return payload


ACKS_FLAGS = {None: 0, "1": _protocol.ACKS_ONE, "all": _protocol.ACKS_ALL}


def acks_flag(acks: Any) -> int:
    """The request flag of a write's `acks` (None: the cluster's default; "1" or 1; "all")."""
    key = "1" if acks == 1 and not isinstance(acks, bool) else acks
    if isinstance(key, str) or key is None:
        if key in ACKS_FLAGS:
            return ACKS_FLAGS[key]
    raise InvalidRequest(f"acks: expected \"1\", \"all\" or None (the cluster's default), got {acks!r}")


def verify_report(payload: bytes) -> VerifyReport:
    """A VERIFY answer as the embedded `Database.verify()` returns it (without located `damage`)."""
    document = json.loads(_protocol.decode_text(payload))
    return VerifyReport(bool(document["ok"]), int(document["records_checked"]),
                        [str(problem) for problem in document["problems"]])


def of_kind(record: Any, kind: type, name: str) -> Any:
    """`record` if it is a `kind` (a Vote for vote(), an Epoch for epoch()), as the embedded API checks."""
    if not isinstance(record, kind):
        raise InvalidRecord(f"{name}: expected a stemedb.{kind.__name__}, got {type(record).__name__}")
    return record


def ids_from(payloads: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for payload in payloads:
        raw = np.ascontiguousarray(_protocol.decode_ids(payload)).tobytes()
        out.extend(raw[i:i + 32] for i in range(0, len(raw), 32))
    return out


def id_array(ids: Any) -> np.ndarray:
    if isinstance(ids, np.ndarray):
        return np.ascontiguousarray(ids, dtype=np.uint8).reshape(-1, 32)
    parts = []
    for index, value in enumerate(ids):
        if not isinstance(value, (bytes, bytearray, memoryview)) or len(value) != 32:
            raise InvalidRecord(f"ids[{index}]: expected 32 bytes")
        parts.append(bytes(value))
    if not parts:
        return np.zeros((0, 32), dtype=np.uint8)
    return np.frombuffer(b"".join(parts), dtype=np.uint8).reshape(-1, 32)


def get_payloads(ids: np.ndarray, max_frame: int) -> list[bytes]:
    """GET payloads of at most MAX_GET_IDS IDs and max_frame bytes each."""
    step = max(1, min(_protocol.MAX_GET_IDS, (max_frame - 4) // 32))
    return [bytes(_protocol.encode_ids(ids[i:i + step])) for i in range(0, max(len(ids), 1), step)]


def records_from(payloads: list[bytes], allow_absent: bool) -> list[Any]:
    """Records of record-batch answers, in order; None where a GET found nothing."""
    out: list[Any] = []
    for payload in payloads:
        blob, offsets = _protocol.decode_record_batch(payload, allow_absent)
        lengths = np.diff(offsets)
        present = lengths > 0
        if present.all():
            out.extend(_codec.decode_many(blob, offsets))
            continue
        slots: list[Any] = [None] * len(lengths)
        if present.any():
            starts = offsets[:-1][present]
            ends = offsets[1:][present]
            pieces = b"".join(bytes(blob[s:e]) for s, e in zip(starts, ends))
            local = np.concatenate(([0], np.cumsum(ends - starts)))
            for slot, record in zip(np.nonzero(present)[0], _codec.decode_many(pieces, local)):
                slots[int(slot)] = record
        out.extend(slots)
    return out


def query_payload(subject: str, predicate: str | None, lens: str | None, filters: dict[str, Any]) -> bytes:
    options = json.dumps(filters, default=_json_default) if filters else ""
    return bytes(_protocol.encode_query(subject, predicate or "", lens or "", options))


def query_request(subject: str, predicate: str | None, lens: Any, lifecycle: Any, epoch: Any,
                  as_of: int | None, decay: bool, now: int | None, audit: bool) -> bytes:
    """A QUERY payload for `Database.query`'s arguments; only non-default options are sent.

    `lens` is a name, a Lens object or a Lens class: objects are sent by
    their `wire()` (name and parameters), so the lens engine is never
    imported here. `epoch` is an Epoch, its ID or its hex.
    """
    if not isinstance(subject, str) or not subject:
        raise InvalidRequest(f"subject: expected a non-empty str, got {subject!r}")
    if predicate is not None and (not isinstance(predicate, str) or not predicate):
        raise InvalidRequest(f"predicate: expected a non-empty str or None, got {predicate!r}")
    name, parameters = lens_wire(lens)
    options: dict[str, Any] = {}
    if not (isinstance(lifecycle, str) and lifecycle.lower() == "any"):
        options["lifecycle"] = list(lifecycle) if isinstance(lifecycle, (list, tuple, set, frozenset)) \
            else lifecycle
    if epoch is not None:
        epoch = getattr(epoch, "id", epoch)
        options["epoch"] = bytes(epoch).hex() if isinstance(epoch, (bytes, bytearray, memoryview)) else epoch
    for key, value, default in (("as_of", as_of, None), ("decay", decay, False), ("now", now, None),
                                ("audit", audit, False)):
        if value != default or type(value) is not type(default):
            options[key] = value
    if parameters:
        options["lens_parameters"] = parameters
    return query_payload(subject, predicate, name, options)


def lens_wire(lens: Any) -> tuple[str, dict[str, Any]]:
    """(name, parameters) of a lens given by name, Lens object or Lens class."""
    if lens is None:
        return "", {}
    if isinstance(lens, str):
        return lens, {}
    if isinstance(lens, type):
        lens = lens()
    wire = getattr(lens, "wire", None)
    if not callable(wire):
        raise TypeError(f"lens: expected a name or a stemedb.lenses.Lens, got {type(lens).__name__}")
    name, parameters = wire()
    return str(name), dict(parameters)


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if isinstance(value, enum.Enum):
        return str(value.name).lower()
    raise TypeError(f"cannot send {type(value).__name__} as a query filter")


def query_resolution(payloads: list[bytes]) -> Resolution | dict[str, Resolution]:
    """What `Database.query` returns, rebuilt from a QUERY answer: a Resolution, or a
    mapping predicate → Resolution (docs/schemas/query-result.schema.json)."""
    document = query_result(payloads)
    records = document.pop("records")
    if Resolution.is_document(document):
        return Resolution.from_document(document, records)
    return {predicate: Resolution.from_document(part, records) for predicate, part in document.items()}


class Scanned(Iterator[Any]):
    """The records of a SCAN answer, as an iterator (as `Database.scan` gives); len() is their count."""

    def __init__(self, records: list[Any]) -> None:
        self._count = len(records)
        self._records = iter(records)

    def __iter__(self) -> Scanned:
        return self

    def __next__(self) -> Any:
        return next(self._records)

    def __len__(self) -> int:
        return self._count


def agent_name(agent: Any) -> str | None:
    """The audit log's name for `agent` (as the embedded audit filter reads it)."""
    if agent is None or isinstance(agent, str):
        return agent
    key = getattr(agent, "public_key", agent)
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key).hex()
    raise TypeError(f"agent: expected a str, public key bytes or Signer, got {type(agent).__name__}")


def audit_entries(entries: list[Any], agent: Any, since: int | None, limit: int | None) -> list[Any]:
    """The embedded `audit` filter over entries fetched whole: by agent, since, the last `limit`."""
    name = agent_name(agent)
    kept = [entry for entry in entries if isinstance(entry, dict)
            and (name is None or entry.get("agent") == name)
            and (since is None or entry.get("at", 0) >= since)]
    if limit is not None:
        kept = kept[-limit:] if limit else []
    return kept


def audit_limit(agent: Any, since: int | None, limit: int | None) -> int:
    """The AUDIT request's limit: all entries when filtering here, else the last `limit`."""
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise InvalidRequest(f"limit: expected a count >= 0 or None, got {limit!r}")
    if agent is not None or since is not None or limit is None or limit > 0xFFFFFFFF:
        return 0xFFFFFFFF
    return max(limit, 1)


def query_result(payloads: list[bytes]) -> dict[str, Any]:
    """The resolution as a dict, with the contributing records decoded under "records".

    A large answer is streamed: the first frame holds the result (and maybe
    records), the frames after it more records (docs/protocol.md, "QUERY").
    """
    text, blob, offsets = _protocol.decode_query_result(payloads[0])
    result = json.loads(text)
    document = result if isinstance(result, dict) else {"result": result}
    records = list(_codec.decode_many(blob, offsets)) if len(offsets) > 1 else []
    records += records_from(payloads[1:], allow_absent=False)
    document["records"] = records
    return document


def scan_payload(subject: str | None, predicate: str | None, kind: str | None, limit: int) -> bytes:
    if kind not in SCAN_KINDS:
        raise InvalidRequest(f"kind: {kind!r}, expected one of "
                             f"{', '.join(k for k in SCAN_KINDS if k)}")
    return bytes(_protocol.encode_scan(subject or "", predicate or "", SCAN_KINDS[kind], limit))
