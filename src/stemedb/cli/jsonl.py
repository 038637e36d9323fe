"""Records as JSON Lines (and flat assertions as CSV), for `stemedb export` and `stemedb import`.

Owns: the export line — the record's exact bytes (`raw`, base64) followed
by its readable fields (`stemedb.cli.formats.record_document`) — and the
CSV row of an assertion; reading import lines into encoded records or
unsigned assertions; and `Checker`, which finds every line the store would
refuse (bytes that are not a canonical record, an `id` the bytes do not
hash to, a signature that does not verify, a member whose envelope is
neither earlier in the file nor stored, or does not list it) before
anything is written. Must never: open a store or a connection, or print.

Error handling: a bad line becomes a `BadLine` (its number, why, its text),
collected rather than raised, so that every bad line of a file can be
listed; nothing here raises for the content of a line.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

import stemedb
from stemedb import _codec
from stemedb.cli.formats import (
    ASSERTION_FIELDS,
    dumps,
    float32_text,
    format_time,
    number_text,
    present,
    record_document,
    record_from_json,
)

try:  # orjson parses an export line about three times as fast as json (bench/bench_import.py)
    import orjson

    _loads: Callable[[bytes], Any] = orjson.loads
    _JSON_ERRORS: tuple[type[Exception], ...] = (orjson.JSONDecodeError,)

    def _dumps(document: Any) -> str:
        """One line of JSON, as formats.dumps(lines=True) writes it (UTF-8, no spaces)."""
        return orjson.dumps(document).decode("utf-8")
except ModuleNotFoundError:  # pragma: no cover - the client-only install
    def _dumps(document: Any) -> str:
        return dumps(document, lines=True)

    def _loads(line: bytes) -> Any:
        return json.loads(line.decode("utf-8"))

    _JSON_ERRORS = (json.JSONDecodeError, UnicodeDecodeError)

PROOF_NONE, PROOF_SIGNATURES, PROOF_ENVELOPE = 0, 1, 2      # docs/format.md, "Proof"
# Fields an export line carries that describe a proof: they mean nothing without `raw`.
PROOF_FIELDS = frozenset({"id", "signers", "signatures", "envelope"})


# ------------------------------------------------------------------ export

def export_line(record: Any) -> str:
    """One JSON Lines entry: `raw` (the record's bytes, base64), then its readable fields."""
    raw = base64.b64encode(record.encode()).decode("ascii")
    readable = _dumps(present(record_document(record)))
    return f'{{"raw":"{raw}",{readable[1:]}'


CSV_COLUMNS = ("id", "subject", "predicate", "object", "object_type", "confidence", "timestamp",
               "source_class", "lifecycle", "source_hash", "parent_hash", "epoch", "visual_hash",
               "vector", "signers")
OBJECT_TYPES = {1: "text", 2: "number", 3: "boolean", 4: "ref", 5: "bytes"}


def csv_header() -> str:
    return _csv_text(CSV_COLUMNS)


def csv_row(assertion: Any) -> str:
    """One CSV row of an assertion: its readable fields; its proof has no column."""
    value = assertion.object
    if isinstance(value, stemedb.Ref):
        text = value.entity
    elif isinstance(value, bytes):
        text = value.hex()
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (int, float)):
        text = number_text(float(value))
    else:
        text = str(value)
    hexes = [getattr(assertion, name) for name in ("parent_hash", "epoch", "visual_hash")]
    vector = ("[" + ",".join(float32_text(x) for x in assertion.vector) + "]"
              if assertion.vector is not None else "")
    return _csv_text((assertion.id.hex(), assertion.subject, assertion.predicate, text,
                      OBJECT_TYPES[assertion.object_tag], float32_text(assertion.confidence),
                      format_time(assertion.timestamp), assertion.source_class.name.lower(),
                      assertion.lifecycle.name.lower(), assertion.source_hash.hex(),
                      *[h.hex() if h is not None else "" for h in hexes], vector,
                      " ".join(key.hex() for key in assertion.signers)))


def _csv_text(cells: Iterable[str]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(list(cells))
    return out.getvalue()


# ------------------------------------------------------------------ import: lines

@dataclass
class BadLine:
    """A line that cannot be stored: its number (from 1), why, and its text."""

    number: int
    reason: str
    text: str

    def document(self) -> dict[str, Any]:
        """The reject file's entry for this line."""
        return {"line": self.number, "reason": self.reason, "input": self.text}


@dataclass
class Chunk:
    """The good lines of one stretch of a file, as the store will take them.

    Encoded records (from `raw` or `encoded`) are blob[offsets[i]:offsets[i+1]]
    with IDs ids[i], in line order; `assertions` are readable lines, still
    unsigned. `bad` lists the stretch's bad lines; `end` is the number of
    bytes of the file read up to the end of the stretch.
    """

    numbers: list[int] = field(default_factory=list)
    raws: list[bytes] = field(default_factory=list)
    ids: np.ndarray = field(default_factory=lambda: np.empty((0, 32), dtype=np.uint8))
    kinds: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint8))
    proofs: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint8))
    assertion_numbers: list[int] = field(default_factory=list)
    assertions: list[Any] = field(default_factory=list)
    bad: list[BadLine] = field(default_factory=list)
    lines: int = 0
    end: int = 0
    _joined: tuple[bytes, np.ndarray, int] | None = None     # blob() of every record, kept

    @property
    def records(self) -> int:
        return len(self.raws) + len(self.assertions)

    @property
    def raw_bytes(self) -> int:
        return sum(len(raw) for raw in self.raws)

    def blob(self, rows: np.ndarray | None = None) -> tuple[bytes, np.ndarray]:
        """The encoded records (those of `rows`, or all) as one blob and its offsets."""
        if rows is None and self._joined is not None and self._joined[2] == len(self.raws):
            return self._joined[0], self._joined[1]
        raws = self.raws if rows is None else [self.raws[row] for row in rows.tolist()]
        offsets = np.zeros(len(raws) + 1, dtype=np.int64)
        np.cumsum([len(raw) for raw in raws], out=offsets[1:])
        blob = b"".join(raws)
        if rows is None:
            self._joined = (blob, offsets, len(raws))
        return blob, offsets

    def keep(self, mask: np.ndarray) -> None:
        """Keep only the encoded records where `mask` is true."""
        self.numbers = [n for n, kept in zip(self.numbers, mask) if kept]
        self.raws = [raw for raw, kept in zip(self.raws, mask) if kept]
        self.ids = self.ids[mask]
        self.kinds = self.kinds[mask]
        self.proofs = self.proofs[mask]
        self._joined = None


READ_HINT = 1 << 22    # bytes of lines read at a time


def numbered_lines(stream: IO[bytes], chunk_lines: int) -> Iterator[tuple[list[tuple[int, bytes]], int]]:
    """(numbered non-blank lines, bytes read so far), `chunk_lines` lines at a time."""
    batch: list[tuple[int, bytes]] = []
    position = 0
    number = 0
    while True:
        lines = stream.readlines(READ_HINT)
        if not lines:
            break
        for line in lines:
            number += 1
            position += len(line)
            if len(line) > 2 or line.strip():
                batch.append((number, line))
            if number % chunk_lines == 0:
                yield batch, position
                batch = []
    if batch or number % chunk_lines:
        yield batch, position


def _shown(line: bytes) -> str:
    return line.decode("utf-8", errors="replace").rstrip("\r\n")


def _readable_assertion(document: dict[str, Any], number: int) -> Any:
    """An unsigned assertion from a line's readable fields (put's fields, and `kind`)."""
    fields = dict(document)
    kind = fields.pop("kind", "assertion")
    if kind != "assertion":
        raise stemedb.InvalidRecord(f"line {number}: a {kind} needs its raw bytes (it cannot be "
                                    "signed from its readable fields); only assertions can")
    proof = sorted(PROOF_FIELDS & set(fields))
    if proof:
        raise stemedb.InvalidRecord(
            f"line {number}: {', '.join(proof)} describe a signed record, but the line has no raw: "
            "give its raw bytes, or remove them to sign the fields with --key")
    unknown = set(fields) - ASSERTION_FIELDS
    if unknown:  # named here, before put's parser, so that the message lists import's fields
        raise stemedb.InvalidRecord(f"line {number}: unknown field(s) {', '.join(sorted(unknown))} "
                                    "(a line is raw, or an assertion's fields)")
    return record_from_json(json.dumps(fields), number)


def parse_lines(lines: list[tuple[int, bytes]], *, can_sign: bool) -> Chunk:
    """Lines → a Chunk: each line's record bytes or unsigned assertion, or why it has none."""
    chunk = Chunk(lines=len(lines))
    claimed: list[str | None] = []
    numbers, raws = chunk.numbers, chunk.raws
    loads, a2b = _loads, binascii.a2b_base64
    for number, line in lines:
        try:
            document = loads(line)
        except _JSON_ERRORS as exc:
            chunk.bad.append(BadLine(number, f"line {number}: not JSON ({exc})", _shown(line)))
            continue
        # The common line, an export's: parsed here without a call per field.
        raw = document.get("raw") if type(document) is dict else None
        record_id = document.get("id") if raw is not None else None
        if type(raw) is str and (record_id is None or type(record_id) is str):
            try:
                numbers.append(number)
                raws.append(a2b(raw, strict_mode=True))
                claimed.append(record_id)
                continue
            except (ValueError, binascii.Error):
                numbers.pop()
        _parse_other(chunk, claimed, number, line, document, can_sign)
    _validate(chunk, lines, claimed)
    return chunk


def _parse_other(chunk: Chunk, claimed: list[str | None], number: int, line: bytes,
                 document: Any, can_sign: bool) -> None:
    """Any line but an export line with a well-formed raw: put's forms, or a mistake."""
    if not isinstance(document, dict):
        chunk.bad.append(BadLine(number, f"line {number}: expected a JSON object", _shown(line)))
        return
    try:
        raw = _raw_bytes(document, number)
        if raw is None:
            assertion = _readable_assertion(document, number)
            if not can_sign:
                raise stemedb.InvalidRecord(
                    f"line {number}: no raw record, and no --key to sign its fields: give "
                    "--key KEYFILE (stemedb keygen makes one)")
            chunk.assertion_numbers.append(number)
            chunk.assertions.append(assertion)
            return
        record_id = document.get("id")
        if record_id is not None and not isinstance(record_id, str):
            raise stemedb.InvalidRecord(f"line {number}: id: expected 64 hex digits")
    except stemedb.InvalidRecord as exc:
        chunk.bad.append(BadLine(number, str(exc), _shown(line)))
        return
    chunk.numbers.append(number)
    chunk.raws.append(raw)
    claimed.append(record_id)


def _raw_bytes(document: dict[str, Any], number: int) -> bytes | None:
    """The record bytes a line carries (`raw` in base64, or put's `encoded` in hex), if any."""
    if "raw" in document:
        raw = document["raw"]
        try:
            if not isinstance(raw, str):
                raise ValueError
            return base64.b64decode(raw, validate=True)
        except (ValueError, binascii.Error):
            raise stemedb.InvalidRecord(f"line {number}: raw: expected base64 record bytes") from None
    if "encoded" in document:
        try:
            return bytes.fromhex(document["encoded"])
        except (TypeError, ValueError):
            raise stemedb.InvalidRecord(f"line {number}: encoded: expected hex record bytes") from None
    return None


def _validate(chunk: Chunk, lines: list[tuple[int, bytes]], claimed: list[str | None]) -> None:
    """Canonical bytes and the IDs the lines claim; the bad ones leave the chunk."""
    blob, offsets = chunk.blob()
    try:
        ids, columns = _codec.validate_many(blob, offsets)
        good = np.ones(len(chunk.raws), dtype=bool)
    except stemedb.InvalidRecord:  # find every bad one: record by record
        text = dict(lines)
        good = np.zeros(len(chunk.raws), dtype=bool)
        for row, (number, raw) in enumerate(zip(chunk.numbers, chunk.raws)):
            try:
                _codec.validate_many(raw, np.array([0, len(raw)], dtype=np.int64))
                good[row] = True
            except stemedb.InvalidRecord as exc:
                reason = str(exc).removeprefix("record 0: ").removeprefix("records[0]: ")
                chunk.bad.append(BadLine(number, f"line {number}: raw: not a record ({reason})",
                                         _shown(text[number])))
        chunk.numbers = [n for n, kept in zip(chunk.numbers, good) if kept]
        chunk.raws = [raw for raw, kept in zip(chunk.raws, good) if kept]
        claimed = [c for c, kept in zip(claimed, good) if kept]
        blob, offsets = chunk.blob()
        ids, columns = _codec.validate_many(blob, offsets)
    chunk.ids = ids
    chunk.kinds = np.asarray(columns["kind"], dtype=np.uint8)
    chunk.proofs = np.asarray(columns["proof"], dtype=np.uint8)
    matches = _claims_match(claimed, ids)
    if not matches.all():
        text = dict(lines)
        for row in np.flatnonzero(~matches).tolist():
            number = chunk.numbers[row]
            chunk.bad.append(BadLine(number, f"line {number}: id {claimed[row]} is not the ID of its "
                                     f"raw bytes ({bytes(ids[row]).hex()})", _shown(text[number])))
        chunk.keep(matches)


def _claims_match(claimed: list[str | None], ids: np.ndarray) -> np.ndarray:
    """Whether each line's `id` (None: no claim) is the ID of its bytes."""
    matches = np.ones(len(claimed), dtype=bool)
    given = [row for row, expected in enumerate(claimed) if expected is not None]
    try:
        expected_ids = np.frombuffer(bytes.fromhex("".join(claimed[row] for row in given)),  # type: ignore[misc]
                                     dtype=np.uint8).reshape(-1, 32)
        if len(expected_ids) == len(given):
            matches[given] = (expected_ids == ids[given]).all(axis=1)
            return matches
    except ValueError:
        pass  # some id is not hex, or not 64 digits: compare them one by one
    for row in given:
        matches[row] = str(claimed[row]).lower() == bytes(ids[row]).hex()
    return matches


# ------------------------------------------------------------------ import: proofs

StoredRecord = Callable[[bytes], "Any | None"]


class Checker:
    """Proves each chunk's records as the store will: signatures and envelope membership.

    Envelopes are remembered across chunks (a member may follow its
    envelope by any distance); one neither earlier in the file nor
    `stored(id)` proves nothing. An envelope on a bad line makes its
    members bad too. Chunks must be checked in file order.
    """

    def __init__(self, stored: StoredRecord) -> None:
        self._stored = stored
        self._envelopes: dict[bytes, Any] = {}          # ID → Envelope, or the line that was bad

    def check(self, chunk: Chunk, lines: list[tuple[int, bytes]]) -> None:
        """Move the chunk's unprovable records to chunk.bad."""
        if not chunk.raws:
            return
        proofs = chunk.proofs
        good = np.ones(len(chunk.raws), dtype=bool)
        reasons: dict[int, str] = {}
        for row in np.flatnonzero(proofs != PROOF_ENVELOPE).tolist():
            reason = self._signed(chunk, row)
            if reason is not None:
                good[row] = False
                reasons[row] = reason
        members = np.flatnonzero(proofs == PROOF_ENVELOPE)
        if len(members):
            claimed, signers, single = _codec.envelope_proofs(*chunk.blob())
            reasons.update(self._members(chunk, members, claimed[members], signers[members],
                                         single[members]))
            good[list(reasons)] = False
        text = dict(lines) if reasons else {}
        for row, reason in sorted(reasons.items()):
            number = chunk.numbers[row]
            chunk.bad.append(BadLine(number, f"line {number}: {reason}", _shown(text[number])))
        if not good.all():
            chunk.keep(good)

    def _signed(self, chunk: Chunk, row: int) -> str | None:
        record = stemedb.decode(chunk.raws[row])
        record_id = bytes(chunk.ids[row])
        if not record.is_signed:
            return "its raw record is unsigned: sign it (stemedb put --key), or give its fields alone"
        try:
            record.verify()
        except stemedb.SignatureError as exc:
            if isinstance(record, stemedb.Envelope):
                self._envelopes[record_id] = chunk.numbers[row]
            return str(exc)
        if isinstance(record, stemedb.Envelope):
            self._envelopes[record_id] = record
        return None

    def _members(self, chunk: Chunk, members: np.ndarray, claimed: np.ndarray, signers: np.ndarray,
                 single: np.ndarray) -> dict[int, str]:
        """Why each unprovable member (row → reason), checked one envelope at a time."""
        reasons: dict[int, str] = {int(row): "not proven by an envelope of its single signer"
                                   for row in members[~single]}
        names, owner = np.unique(claimed.view("V32").ravel(), return_inverse=True)
        for index, name in enumerate(names):
            mine = np.flatnonzero((owner == index) & single)
            if not len(mine):
                continue
            envelope_id = name.tobytes()
            reason = self._envelope_problem(envelope_id)
            if reason is not None:
                reasons.update(dict.fromkeys(members[mine].tolist(), reason))
                continue
            envelope = self._envelopes[envelope_id]
            signer = np.frombuffer(envelope.signer, dtype=np.uint8)
            wrong = mine[~(signers[mine] == signer).all(axis=1)]
            reasons.update(dict.fromkeys(
                members[wrong].tolist(), f"its signer is not the signer of envelope {envelope_id.hex()}"))
            listed = _listed(chunk.ids[members[mine]], envelope.member_array())
            for row in members[mine[~listed]].tolist():
                reasons.setdefault(row, f"not listed in its envelope {envelope_id.hex()}")
        return reasons

    def _envelope_problem(self, envelope_id: bytes) -> str | None:
        envelope = self._envelope(envelope_id)
        named = envelope_id.hex()
        if isinstance(envelope, int):
            return f"its envelope {named} (line {envelope}) is bad"
        if envelope is None:
            return (f"its envelope {named} is neither earlier in the file nor stored "
                    "(export with stemedb export, which writes envelopes before their members)")
        if not isinstance(envelope, stemedb.Envelope):
            return f"its envelope proof names {named}, a stored {type(envelope).__name__.lower()}"
        return None

    def _envelope(self, envelope_id: bytes) -> Any:
        if envelope_id not in self._envelopes:
            try:
                self._envelopes[envelope_id] = self._stored(envelope_id)
            except stemedb.NotFound:
                self._envelopes[envelope_id] = None
        return self._envelopes[envelope_id]


def _listed(ids: np.ndarray, listed: np.ndarray) -> np.ndarray:
    """Whether each of `ids` (n, 32) is among `listed` (m, 32)."""
    # The common case: an export's members follow their envelope's list, in its order.
    start = np.flatnonzero((listed == ids[0]).all(axis=1))
    if len(start) and len(listed) - int(start[0]) >= len(ids):
        run = listed[int(start[0]):int(start[0]) + len(ids)]
        if np.array_equal(run, ids):
            return np.ones(len(ids), dtype=bool)
    return np.isin(ids.view("V32").ravel(), listed.view("V32").ravel())


def check_stream(stream: IO[bytes], checker: Checker, *, can_sign: bool,
                 chunk_lines: int) -> Iterator[Chunk]:
    """The stream's lines, parsed and proven, one Chunk per `chunk_lines` lines."""
    for lines, position in numbered_lines(stream, chunk_lines):
        chunk = parse_lines(lines, can_sign=can_sign)
        checker.check(chunk, lines)
        chunk.bad.sort(key=lambda bad: bad.number)
        chunk.end = position
        yield chunk
