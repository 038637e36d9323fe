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
import mmap
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

import stemedb
from stemedb import _codec, _lines
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
    with IDs ids[i] and the columns `_codec.validate_many` found, from lines
    numbers[i], in line order; `assertions` are
    readable lines, still unsigned. `bad` lists the stretch's bad lines;
    `end` is the number of bytes of the file read up to the end of the
    stretch. While the chunk is being checked it also holds the stretch's
    text (for the bad lines' entries); check_stream drops it before yielding.
    """

    numbers: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    blob: bytes = b""
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))
    ids: np.ndarray = field(default_factory=lambda: np.empty((0, 32), dtype=np.uint8))
    kinds: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint8))
    proofs: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint8))
    columns: dict[str, np.ndarray] = field(default_factory=dict)   # validate_many's, one row each
    assertion_numbers: list[int] = field(default_factory=list)
    assertions: list[Any] = field(default_factory=list)
    bad: list[BadLine] = field(default_factory=list)
    lines: int = 0
    end: int = 0
    assertion_bytes: int = 0     # text of the `assertions` lines (what holding them costs, roughly)
    _text: Callable[[int], bytes] | None = None

    @property
    def count(self) -> int:
        """Encoded records."""
        return len(self.numbers)

    @property
    def records(self) -> int:
        return self.count + len(self.assertions)

    @property
    def raw_bytes(self) -> int:
        return len(self.blob)

    def raw(self, row: int) -> bytes:
        return self.blob[int(self.offsets[row]):int(self.offsets[row + 1])]

    def line(self, number: int) -> bytes:
        """The text of line `number` (while the chunk holds its stretch's text)."""
        assert self._text is not None, "the chunk's text was released"
        return self._text(number)

    def encoded(self, rows: np.ndarray | None = None) -> tuple[bytes, np.ndarray]:
        """The encoded records (those of `rows`, sorted, or all) as one blob and its offsets."""
        if rows is None:
            return self.blob, self.offsets
        return _select(self.blob, self.offsets, rows)

    def keep(self, mask: np.ndarray) -> None:
        """Keep only the encoded records where `mask` is true (after _validate set their IDs)."""
        self._keep_bytes(mask)
        self.ids, self.kinds, self.proofs = self.ids[mask], self.kinds[mask], self.proofs[mask]
        self.columns = {name: values[mask] for name, values in self.columns.items()}

    def _keep_bytes(self, mask: np.ndarray) -> None:
        self.blob, self.offsets = _select(self.blob, self.offsets, np.flatnonzero(mask))
        self.numbers = self.numbers[mask]


def _select(blob: bytes, offsets: np.ndarray, rows: np.ndarray) -> tuple[bytes, np.ndarray]:
    """The records `rows` (ascending) of blob/offsets, as a blob and offsets of their own."""
    if len(rows) == len(offsets) - 1:   # ascending and distinct: all of them
        return blob, offsets
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    kept = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=kept[1:])
    where = np.repeat(starts - kept[:-1], lengths) + np.arange(int(kept[-1]), dtype=np.int64)
    return np.frombuffer(blob, dtype=np.uint8)[where].tobytes(), kept


READ_BYTES = 1 << 24    # bytes of the file read at a time


def stretches(stream: IO[bytes], chunk_lines: int) -> Iterator[tuple[dict[str, Any], bytes, int, int]]:
    """The file `chunk_lines` lines at a time, each stretch scanned by _lines.scan.

    Yields (the scan, the bytes it was made of, the number of its first line
    from 1, bytes of the file read up to its end). A regular file is scanned
    in place through a read-only mapping (no copy of its text); a pipe is read
    READ_BYTES at a time.
    """
    mapping = _mapped(stream)
    if mapping is not None:
        # The scan releases the GIL: the next stretch is scanned on a second thread while the
        # caller checks this one (at most two stretches' scans are held).
        from concurrent.futures import Future, ThreadPoolExecutor

        with mapping, ThreadPoolExecutor(1, thread_name_prefix="stemedb-import-scan") as pool:
            at = 0
            number = 1
            ahead: Future[dict[str, Any]] | None = pool.submit(_lines.scan, mapping, at,
                                                               chunk_lines, True)
            while ahead is not None:
                scanned = ahead.result()
                at += int(scanned["consumed"])
                ahead = pool.submit(_lines.scan, mapping, at, chunk_lines, True) \
                    if at < len(mapping) else None
                yield scanned, mapping, number, at   # type: ignore[misc]
                number += int(scanned["lines"])
        return
    buffer = b""
    at = 0          # where the next stretch starts in buffer
    newlines = 0    # newlines in buffer[at:]
    ended = False
    number = 1
    position = 0
    while True:
        if not ended and newlines < chunk_lines:
            pieces = [buffer[at:]]
            while not ended and newlines < chunk_lines:
                more = stream.read(READ_BYTES)
                if not more:
                    ended = True
                    break
                newlines += more.count(b"\n")
                pieces.append(more)
            buffer = b"".join(pieces)
            at = 0
        if at >= len(buffer):
            return
        scanned = _lines.scan(buffer, at, chunk_lines, ended)
        consumed = int(scanned["consumed"])
        if not consumed:  # cannot happen (a full stretch, or the file's end, is in buffer)
            raise AssertionError("the line scan took nothing")
        position += consumed
        yield scanned, buffer, number, position
        number += int(scanned["lines"])
        newlines -= int(scanned["lines"])     # each line taken ended with one (but a file's last)
        at += consumed


def _mapped(stream: IO[bytes]) -> mmap.mmap | None:
    """A read-only mapping of the rest of `stream` if it is a non-empty regular file at offset 0."""
    try:
        fd = stream.fileno()
        info = os.fstat(fd)
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None
    if not stat.S_ISREG(info.st_mode) or info.st_size == 0 or stream.tell() != 0:
        return None
    return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)


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


def parse_stretch(scanned: dict[str, Any], text: bytes, first: int, *, can_sign: bool) -> Chunk:
    """A scanned stretch → a Chunk: each line's record bytes or unsigned assertion, or why it has none.

    The scan has decoded the export lines; every other line is parsed here,
    one at a time, as JSON (the scan leaves to this path whatever it does not
    read exactly as the JSON parser would).
    """
    kinds, starts, ends = scanned["kinds"], scanned["starts"], scanned["ends"]
    numbers = scanned["index"] + first

    def line(number: int) -> bytes:
        row = int(np.searchsorted(numbers, number))
        return text[int(starts[row]):int(ends[row])]

    chunk = Chunk(lines=len(kinds), _text=line)
    fast = kinds == _lines.LINE_RECORD
    chunk.numbers = numbers[fast]
    chunk.blob, chunk.offsets = scanned["blob"], scanned["offsets"]
    claims, claimed = scanned["claims"], scanned["claimed"].astype(bool)
    wrong: dict[int, str] = {}      # number → a claimed id that is not 64 hex digits
    others = np.flatnonzero(~fast)
    if len(others):
        extra: list[tuple[int, bytes, str | None]] = []
        for row in others.tolist():
            number = int(numbers[row])
            found = _parse_line(chunk, number, text[int(starts[row]):int(ends[row])], can_sign)
            if found is not None:
                extra.append((number, *found))
        if extra:
            chunk.numbers, chunk.blob, chunk.offsets, claims, claimed = _merged(
                chunk, claims, claimed, extra, wrong)
    _validate(chunk, claims, claimed, wrong)
    return chunk


def _parse_line(chunk: Chunk, number: int, line: bytes, can_sign: bool) -> tuple[bytes, str | None] | None:
    """A line the scan left: (its record bytes, the id it claims), or None (an assertion, or bad)."""
    try:
        document = _loads(line)
    except _JSON_ERRORS as exc:
        chunk.bad.append(BadLine(number, f"line {number}: not JSON ({exc})", _shown(line)))
        return None
    if not isinstance(document, dict):
        chunk.bad.append(BadLine(number, f"line {number}: expected a JSON object", _shown(line)))
        return None
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
            chunk.assertion_bytes += len(line)
            return None
        record_id = document.get("id")
        if record_id is not None and not isinstance(record_id, str):
            raise stemedb.InvalidRecord(f"line {number}: id: expected 64 hex digits")
    except stemedb.InvalidRecord as exc:
        chunk.bad.append(BadLine(number, str(exc), _shown(line)))
        return None
    return raw, record_id


def _merged(chunk: Chunk, claims: np.ndarray, claimed: np.ndarray,
            extra: list[tuple[int, bytes, str | None]],
            wrong: dict[int, str]) -> tuple[np.ndarray, bytes, np.ndarray, np.ndarray, np.ndarray]:
    """The scan's records and those parsed here, in line order (numbers, blob, offsets, claims)."""
    raws = [chunk.raw(row) for row in range(chunk.count)] + [raw for _, raw, _ in extra]
    numbers = np.concatenate([chunk.numbers, np.array([n for n, _, _ in extra], dtype=np.int64)])
    more_claims = np.zeros((len(extra), 32), dtype=np.uint8)
    more_claimed = np.zeros(len(extra), dtype=bool)
    for row, (number, _, text) in enumerate(extra):
        if text is None:
            continue
        more_claimed[row] = True
        try:
            value = bytes.fromhex(text)
        except ValueError:
            value = b""
        if len(value) == 32:
            more_claims[row] = np.frombuffer(value, dtype=np.uint8)
        else:
            wrong[number] = text
    order = np.argsort(numbers, kind="stable")
    raws = [raws[row] for row in order.tolist()]
    offsets = np.zeros(len(raws) + 1, dtype=np.int64)
    np.cumsum([len(raw) for raw in raws], out=offsets[1:])
    return (numbers[order], b"".join(raws), offsets,
            np.concatenate([claims, more_claims])[order], np.concatenate([claimed, more_claimed])[order])


def _raw_bytes(document: dict[str, Any], number: int) -> bytes | None:
    """The record bytes a line carries (`raw` in base64, or put's `encoded` in hex), if any."""
    if "raw" in document:
        raw = document["raw"]
        try:
            if not isinstance(raw, str):
                raise ValueError
            return binascii.a2b_base64(raw, strict_mode=True)
        except (ValueError, binascii.Error):
            raise stemedb.InvalidRecord(f"line {number}: raw: expected base64 record bytes") from None
    if "encoded" in document:
        try:
            return bytes.fromhex(document["encoded"])
        except (TypeError, ValueError):
            raise stemedb.InvalidRecord(f"line {number}: encoded: expected hex record bytes") from None
    return None


def _validate(chunk: Chunk, claims: np.ndarray, claimed: np.ndarray, wrong: dict[int, str]) -> None:
    """Canonical bytes and the IDs the lines claim; the bad ones leave the chunk."""
    try:
        ids, columns = _codec.validate_many(chunk.blob, chunk.offsets)
    except stemedb.InvalidRecord:  # find every bad one: record by record
        good = np.zeros(chunk.count, dtype=bool)
        for row, number in enumerate(chunk.numbers.tolist()):
            raw = chunk.raw(row)
            try:
                _codec.validate_many(raw, np.array([0, len(raw)], dtype=np.int64))
                good[row] = True
            except stemedb.InvalidRecord as exc:
                reason = str(exc).removeprefix("record 0: ").removeprefix("records[0]: ")
                chunk.bad.append(BadLine(number, f"line {number}: raw: not a record ({reason})",
                                         _shown(chunk.line(number))))
        chunk._keep_bytes(good)      # (no IDs yet: they come from the validation below)
        claims, claimed = claims[good], claimed[good]
        ids, columns = _codec.validate_many(chunk.blob, chunk.offsets)
    chunk.ids, chunk.columns = ids, columns
    chunk.kinds = np.asarray(columns["kind"], dtype=np.uint8)
    chunk.proofs = np.asarray(columns["proof"], dtype=np.uint8)
    matches = ~claimed | (claims == ids).all(axis=1)
    for number in wrong:
        row = int(np.searchsorted(chunk.numbers, number))
        if row < chunk.count and chunk.numbers[row] == number:
            matches[row] = False
    if not matches.all():
        for row in np.flatnonzero(~matches).tolist():
            number = int(chunk.numbers[row])
            line = chunk.line(number)
            text = wrong.get(number) or _loads(line).get("id")
            chunk.bad.append(BadLine(number, f"line {number}: id {text} is not the ID of its "
                                     f"raw bytes ({bytes(ids[row]).hex()})", _shown(line)))
        chunk.keep(matches)


# ------------------------------------------------------------------ import: CSV

CSV_REQUIRED = ("subject", "predicate", "object")
CSV_IGNORED = ("id", "signers")    # export writes them; rows are signed anew with --key
OBJECT_TAGS = {name: tag for tag, name in OBJECT_TYPES.items()}


def csv_stream(stream: IO[bytes], *, chunk_lines: int) -> Iterator[Chunk]:
    """CSV rows of assertions (a header first, the columns of export's CSV), `chunk_lines` rows a chunk.

    Each row becomes an unsigned assertion, or a BadLine numbered by the
    line the row starts on. A header that names an unknown column, or lacks
    subject, predicate or object, raises InvalidRecord (nothing is read).
    """
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
    reader = csv.reader(text)
    try:
        try:
            header = next(reader)
        except StopIteration:
            return
        columns = _csv_columns(header)
        chunk = Chunk()
        start = reader.line_num + 1
        for row in reader:
            number = start
            start = reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            chunk.lines += 1
            shown = _csv_text(row).rstrip("\n")
            try:
                chunk.assertions.append(_csv_assertion(columns, row, number))
                chunk.assertion_numbers.append(number)
                chunk.assertion_bytes += len(shown)
            except stemedb.InvalidRecord as exc:
                chunk.bad.append(BadLine(number, str(exc), shown))
            if chunk.lines == chunk_lines:
                chunk.end = stream.tell() if stream.seekable() else 0
                yield chunk
                chunk = Chunk()
        if chunk.lines:
            chunk.end = stream.tell() if stream.seekable() else 0
            yield chunk
    except UnicodeDecodeError as exc:
        raise stemedb.InvalidRecord(f"line {reader.line_num + 1}: not UTF-8 ({exc.reason})") from None
    except csv.Error as exc:
        raise stemedb.InvalidRecord(f"line {reader.line_num}: not CSV ({exc})") from None
    finally:
        text.detach()


def _csv_columns(header: list[str]) -> list[str]:
    names = [name.strip() for name in header]
    unknown = [name for name in names if name not in CSV_COLUMNS]
    if unknown:
        raise stemedb.InvalidRecord(
            f"line 1: unknown column(s) {', '.join(repr(n) for n in unknown)}; the header names "
            f"columns of {', '.join(CSV_COLUMNS)} (export --format csv writes them all)")
    missing = [name for name in CSV_REQUIRED if name not in names]
    if missing:
        raise stemedb.InvalidRecord(f"line 1: the header lacks column(s) {', '.join(missing)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise stemedb.InvalidRecord(f"line 1: column(s) {', '.join(repeated)} named twice")
    return names


def _csv_assertion(columns: list[str], row: list[str], number: int) -> Any:
    """An unsigned assertion from one CSV row: cells become put's fields (empty: the default)."""
    if len(row) != len(columns):
        raise stemedb.InvalidRecord(f"line {number}: {len(row)} cells, but the header names "
                                    f"{len(columns)} columns")
    cells = {name: cell for name, cell in zip(columns, row) if name not in CSV_IGNORED}
    kind = cells.pop("object_type", "").strip().lower() or "text"
    if kind not in OBJECT_TAGS:
        raise stemedb.InvalidRecord(f"line {number}: object_type: {kind!r} is not one of "
                                    f"{', '.join(OBJECT_TAGS)}")
    fields: dict[str, Any] = {"subject": cells.pop("subject"), "predicate": cells.pop("predicate"),
                              "object": _csv_object(cells.pop("object"), kind, number)}
    for name, cell in cells.items():
        cell = cell.strip()
        if not cell:
            continue
        if name == "confidence":
            try:
                fields[name] = float(cell)
            except ValueError:
                raise stemedb.InvalidRecord(f"line {number}: confidence: {cell!r} is not a "
                                            "number") from None
        elif name == "vector":
            try:
                fields[name] = json.loads(cell)
            except json.JSONDecodeError:
                raise stemedb.InvalidRecord(f"line {number}: vector: expected [a,b,…], got "
                                            f"{cell!r}") from None
        else:
            fields[name] = cell
    return record_from_json(json.dumps(fields), number)


def _csv_object(cell: str, kind: str, number: int) -> Any:
    """The object cell as put's JSON value for its object_type (text unless the row says)."""
    if kind == "text":
        return cell
    value = cell.strip()
    if kind == "number":
        try:
            result = float(value)
        except ValueError:
            result = float("nan")
        if result != result or result in (float("inf"), float("-inf")):
            raise stemedb.InvalidRecord(f"line {number}: object: {cell!r} is not a finite number "
                                        "(object_type number)")
        return result
    if kind == "boolean":
        if value.lower() not in ("true", "false"):
            raise stemedb.InvalidRecord(f"line {number}: object: {cell!r} is not true or false "
                                        "(object_type boolean)")
        return value.lower() == "true"
    if kind == "ref":
        return {"ref": value}
    return {"bytes": value}


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

    def check(self, chunk: Chunk) -> None:
        """Move the chunk's unprovable records to chunk.bad."""
        if not chunk.count:
            return
        proofs = chunk.proofs
        good = np.ones(chunk.count, dtype=bool)
        reasons: dict[int, str] = {}
        for row in np.flatnonzero(proofs != PROOF_ENVELOPE).tolist():
            reason = self._signed(chunk, row)
            if reason is not None:
                good[row] = False
                reasons[row] = reason
        members = np.flatnonzero(proofs == PROOF_ENVELOPE)
        if len(members):
            claimed, signers, single = _codec.envelope_proofs(chunk.blob, chunk.offsets)
            reasons.update(self._members(chunk, members, claimed[members], signers[members],
                                         single[members]))
            good[list(reasons)] = False
        for row, reason in sorted(reasons.items()):
            number = int(chunk.numbers[row])
            chunk.bad.append(BadLine(number, f"line {number}: {reason}", _shown(chunk.line(number))))
        if not good.all():
            chunk.keep(good)

    def _signed(self, chunk: Chunk, row: int) -> str | None:
        record = stemedb.decode(chunk.raw(row))
        record_id = bytes(chunk.ids[row])
        if not record.is_signed:
            return "its raw record is unsigned: sign it (stemedb put --key), or give its fields alone"
        try:
            record.verify()
        except stemedb.SignatureError as exc:
            if isinstance(record, stemedb.Envelope):
                self._envelopes[record_id] = int(chunk.numbers[row])
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
    for scanned, text, first, position in stretches(stream, chunk_lines):
        chunk = parse_stretch(scanned, text, first, can_sign=can_sign)
        checker.check(chunk)
        chunk.bad.sort(key=lambda bad: bad.number)
        chunk.end = position
        chunk._text = None      # the stretch's text is not held beyond its check
        yield chunk
