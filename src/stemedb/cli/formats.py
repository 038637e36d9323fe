"""What the CLI reads and prints: times, float32 values, IDs, records, JSON Lines.

Owns: ISO 8601 ↔ microseconds, the shortest decimal of a float32, the text
and JSON views of records and query results, and parsing `put`'s JSON Lines
into records. Must never: open a store or a connection, or print (commands
print what these functions return).

Error handling: input that cannot be parsed raises InvalidRecord (a record
field) or CliError (a command-line value), naming the value and the expected
form.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from typing import Any

import numpy as np

import stemedb
from stemedb.cli.core import CliError

# ------------------------------------------------------------------ times

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_MAX_US = 2**64 - 1
_ISO = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})"
    r"(?:[T ](?P<hour>\d{2}):(?P<minute>\d{2})(?::(?P<second>\d{2})(?:[.,](?P<fraction>\d{1,9}))?)?"
    r"(?P<zone>Z|z|[+-]\d{2}:?\d{2})?)?$")


def parse_time(text: str, what: str) -> int:
    """Microseconds since the Unix epoch from an integer or an ISO 8601 time.

    ISO forms: `2026-12-01`, `2026-12-01T10:00`, `2026-12-01T10:00:00.25Z`,
    `2026-12-01T12:00:00+02:00`; a time without an offset is UTC. A plain
    integer is taken as microseconds already.
    """
    text = text.strip()
    if re.fullmatch(r"\d+", text):
        value = int(text)
        if value > _MAX_US:
            raise CliError(f"{what}: {text} µs is beyond the largest timestamp (2**64 - 1)")
        return value
    match = _ISO.match(text)
    if match is None:
        raise CliError(f"{what}: {text!r} is not a time; expected ISO 8601 such as "
                       "2026-12-01T10:00:00Z, or microseconds since 1970")
    fraction = match["fraction"] or ""
    if fraction[6:].strip("0"):
        raise CliError(f"{what}: {text!r} is finer than a microsecond")
    try:
        moment = datetime.datetime.fromisoformat(
            f"{match['date']}T{match['hour'] or '00'}:{match['minute'] or '00'}:"
            f"{match['second'] or '00'}.{fraction[:6].ljust(6, '0')}")
        zone = match["zone"]
        if zone is None or zone in "Zz":
            moment = moment.replace(tzinfo=datetime.timezone.utc)
        else:
            minutes = int(zone[1:3]) * 60 + int(zone[-2:])
            offset = datetime.timedelta(minutes=minutes if zone[0] == "+" else -minutes)
            moment = moment.replace(tzinfo=datetime.timezone(offset))
    except ValueError as exc:
        raise CliError(f"{what}: {text!r}: {exc}") from None
    delta = moment - _EPOCH
    value = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    if value < 0:
        raise CliError(f"{what}: {text!r} is before 1970-01-01T00:00:00Z, the earliest timestamp")
    return value


def format_time(microseconds: int) -> str:
    """UTC ISO 8601, with microseconds only when they are not zero (beyond year 9999: the µs)."""
    try:
        moment = _EPOCH + datetime.timedelta(microseconds=int(microseconds))
    except OverflowError:
        return str(microseconds)
    if moment.year > 9999:
        return str(microseconds)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}"
    return text + "Z"


# ------------------------------------------------------------------ floats

FLOAT32_MAX = float(np.finfo(np.float32).max)

def float32_text(value: float) -> str:
    """The shortest decimal that reads back as the same float32 (0.9, not 0.8999999761581421)."""
    return str(np.format_float_positional(np.float32(value), unique=True, trim="-"))


def is_float32(value: float) -> bool:
    """True when `value` is exactly a float32 (as every confidence and weight read from a record is)."""
    return (math.isfinite(value) and abs(value) <= FLOAT32_MAX
            and float(np.float32(value)) == value)


def shown_float(value: float) -> float:
    """`value` as printed: a float32's shortest decimal when `value` is exactly a float32.

    Lossless: a float32 parsed from the shortest decimal is the same float32,
    and a value that is not exactly a float32 (a float64 result) is left alone.
    """
    if not is_float32(value):
        return value
    return float(float32_text(value))


def number_text(value: float) -> str:
    """A number as written: 4000 rather than 4000.0; floats in their shortest form."""
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


# ------------------------------------------------------------------ IDs

ID_HEX = 64
MIN_PREFIX = 4


def id_argument(text: str, what: str = "ID") -> str:
    """A full ID or an ID prefix, as lowercase hex; CliError if it cannot be one."""
    cleaned = text.strip().lower()
    if not re.fullmatch(r"[0-9a-f]*", cleaned) or not cleaned:
        raise CliError(f"{what}: {text!r} is not hex")
    if len(cleaned) > ID_HEX:
        raise CliError(f"{what}: {text!r} is longer than an ID ({ID_HEX} hex digits)")
    if len(cleaned) < MIN_PREFIX:
        raise CliError(f"{what}: {text!r} is too short; give at least {MIN_PREFIX} hex digits of the ID")
    return cleaned


# ------------------------------------------------------------------ JSON output

FLOAT32_KEYS = frozenset({"confidence", "weight", "conflict_score", "share", "vector"})
TIME_KEYS = frozenset({"timestamp", "as_of", "now", "at", "since"})
VERBATIM_KEYS = frozenset({"object", "value"})  # the user's own values: never reformatted


def present(value: Any, key: str | None = None) -> Any:
    """A JSON-ready document with times as ISO 8601 and float32 values in their shortest form."""
    if key in VERBATIM_KEYS:
        return value
    if isinstance(value, dict):
        return {name: present(item, name) for name, item in value.items()}
    if isinstance(value, list):
        return [present(item, key) for item in value]
    if key in FLOAT32_KEYS and isinstance(value, float):
        return shown_float(value)
    if key in TIME_KEYS and isinstance(value, int) and not isinstance(value, bool):
        return format_time(value)
    return value


def dumps(document: Any, *, lines: bool = False) -> str:
    """JSON text of a presented document: indented, or one line (JSON Lines)."""
    if lines:
        return json.dumps(present(document), ensure_ascii=False, separators=(",", ":"))
    return json.dumps(present(document), ensure_ascii=False, indent=1)


def record_document(record: Any) -> dict[str, Any]:
    """Every field of any record kind, JSON-ready (before `present`)."""
    if isinstance(record, stemedb.Assertion):
        return record.to_dict()
    document: dict[str, Any] = {"kind": type(record).__name__.lower(), "id": record.id.hex()}
    if isinstance(record, stemedb.Vote):
        document.update(assertion_id=record.assertion_id.hex(), weight=record.weight)
    elif isinstance(record, stemedb.Epoch):
        document.update(name=record.name, description=record.description,
                        supersedes=[i.hex() for i in record.supersedes],
                        supersession_kind=record.supersession_kind.name.lower())
    elif isinstance(record, stemedb.Envelope):
        document.update(members=[i.hex() for i in record.members])
    document.update(timestamp=record.timestamp, signers=[k.hex() for k in record.signers],
                    signatures=[s.hex() for _, s in record.signatures],
                    envelope=record.envelope.hex() if record.envelope is not None else None)
    return document


# ------------------------------------------------------------------ text output

SHORT_ID = 16


def object_text(value: Any) -> str:
    """An assertion's object as the user would write it."""
    if isinstance(value, stemedb.Ref):
        return f"ref:{value.entity}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return number_text(value)
    if isinstance(value, bytes):
        shown = value[:32].hex()
        return f"0x{shown}…" if len(value) > 32 else f"0x{shown}"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):  # a query result's JSON view of an object
        if set(value) == {"ref"}:
            return f"ref:{value['ref']}"
        if set(value) == {"bytes"}:
            return f"0x{value['bytes']}"
    return json.dumps(value, ensure_ascii=False) if value is not None else "(none)"


def record_line(record: Any) -> str:
    """One line per record, for listings: short ID, time, what it says."""
    head = f"{record.id.hex()[:SHORT_ID]}  {format_time(record.timestamp)}  "
    if isinstance(record, stemedb.Assertion):
        return (head + f"{record.subject} — {record.predicate} — {object_text(record.object)}  "
                f"({float32_text(record.confidence)}, {record.source_class.name.lower()}, "
                f"{record.lifecycle.name.lower()})")
    if isinstance(record, stemedb.Vote):
        return head + f"vote {float32_text(record.weight)} for {record.assertion_id.hex()[:SHORT_ID]}"
    if isinstance(record, stemedb.Epoch):
        return head + f"epoch {record.name}" + (f" — {record.description}" if record.description else "")
    if isinstance(record, stemedb.Envelope):
        return head + f"envelope of {record.member_count} by {record.signer.hex()[:SHORT_ID]}"
    return head + type(record).__name__


def record_text(record: Any) -> str:
    """Several lines describing one record (`get`)."""
    lines = [record_line(record)[SHORT_ID + 2:]]
    if isinstance(record, stemedb.Assertion):
        for name in ("parent_hash", "epoch", "visual_hash"):
            field = getattr(record, name)
            if field is not None:
                lines.append(f"  {name:11s} {field.hex()}")
        if record.vector is not None:
            lines.append("  vector      [" + ", ".join(float32_text(x) for x in record.vector) + "]")
        lines.append(f"  source_hash {record.source_hash.hex()}")
    elif isinstance(record, stemedb.Vote):
        lines.append(f"  assertion   {record.assertion_id.hex()}")
    elif isinstance(record, stemedb.Epoch):
        lines.append(f"  supersedes  {', '.join(i.hex() for i in record.supersedes) or '(none)'}"
                     f"  ({record.supersession_kind.name.lower()})")
    for key in record.signers:
        lines.append(f"  signer      {key.hex()}")
    if record.envelope is not None:
        lines.append(f"  envelope    {record.envelope.hex()}")
    lines.append(f"  id          {record.id.hex()}")
    return "\n".join(lines)


# ------------------------------------------------------------------ JSON Lines input

ASSERTION_FIELDS = frozenset({"subject", "predicate", "object", "confidence", "timestamp",
                              "source_class", "lifecycle", "source_hash", "parent_hash", "epoch",
                              "visual_hash", "vector"})
HEX_FIELDS = ("source_hash", "parent_hash", "epoch", "visual_hash")


def _object_from_json(value: Any, line: int) -> Any:
    if isinstance(value, dict):
        if set(value) == {"ref"}:
            return stemedb.Ref(value["ref"])
        if set(value) == {"bytes"}:
            try:
                return bytes.fromhex(value["bytes"])
            except (TypeError, ValueError):
                raise stemedb.InvalidRecord(f"line {line}: object: bytes must be hex") from None
        raise stemedb.InvalidRecord(
            f"line {line}: object: expected a value, {{\"ref\": …}} or {{\"bytes\": hex}}")
    return value


def _timestamp_from_json(value: Any, line: int) -> Any:
    if isinstance(value, str):
        try:
            return parse_time(value, "timestamp")
        except CliError as exc:
            raise stemedb.InvalidRecord(f"line {line}: {exc}") from None
    return value


def record_from_json(text: str, line: int) -> Any:
    """One JSON Lines entry: an assertion's fields, or {"encoded": hex} of a signed record."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise stemedb.InvalidRecord(f"line {line}: not JSON ({exc.msg})") from None
    if not isinstance(document, dict):
        raise stemedb.InvalidRecord(f"line {line}: expected a JSON object")
    if "encoded" in document:
        try:
            return stemedb.decode(bytes.fromhex(document["encoded"]))
        except (TypeError, ValueError) as exc:
            raise stemedb.InvalidRecord(f"line {line}: encoded: {exc}") from None
    unknown = set(document) - ASSERTION_FIELDS
    if unknown:
        raise stemedb.InvalidRecord(f"line {line}: unknown field(s) {', '.join(sorted(unknown))}")
    missing = {"subject", "predicate", "object"} - set(document)
    if missing:
        raise stemedb.InvalidRecord(f"line {line}: missing field(s) {', '.join(sorted(missing))}")
    fields = dict(document)
    for name in HEX_FIELDS:
        if fields.get(name) is not None:
            try:
                fields[name] = bytes.fromhex(fields[name])
            except (TypeError, ValueError):
                raise stemedb.InvalidRecord(f"line {line}: {name}: expected hex") from None
    if fields.get("timestamp") is not None:
        fields["timestamp"] = _timestamp_from_json(fields["timestamp"], line)
    value = _object_from_json(fields.pop("object"), line)
    try:
        return stemedb.Assertion(fields.pop("subject"), fields.pop("predicate"), value, **fields)
    except stemedb.InvalidRecord as exc:
        raise stemedb.InvalidRecord(f"line {line}: {exc}") from None
