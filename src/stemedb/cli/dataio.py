"""`stemedb export` and `stemedb import`: a store's records out to JSON Lines (or CSV) and back.

Owns: choosing what to export (filters, and the envelopes the chosen
members need), writing it; reading an import file (JSON Lines, or CSV rows
of assertions signed with --key) twice — first every line is checked, then,
if none is bad (or --skip-bad), the good ones are stored in batches —
counting new and already-present records, the reject file, and progress.
Must never: store anything of a file with a bad line unless --skip-bad,
report a record as stored before the store acknowledged it, or leave a
half-written --out file under its final name.

Resource handling: the checked records of the first pass are held in
memory up to RETAIN_BYTES of record bytes (and text of rows to sign); a
larger file is read again for the second pass (standard input cannot be,
and is refused beyond that).
Error handling: bad lines are listed on stderr (every one, with its number
and reason) and in --rejects; a refusal of the store stops the command with
how many records were stored before it; Ctrl-C waits for the batch in
flight, then says how many were stored (exit 130).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any

import numpy as np

import stemedb
from stemedb.cli.core import (
    EXIT_OK,
    CliError,
    Interrupted,
    UsageError,
    add_json_option,
    add_target_options,
    describe,
    report,
    writes_finish_first,
)
from stemedb.cli.formats import parse_time
from stemedb.cli.keys import load_signer
from stemedb.cli.records import KINDS
from stemedb.cli.target import LocalStore

if TYPE_CHECKING:  # imported where used: every command loads this module to register import
    from stemedb.cli import jsonl

CHUNK_LINES = 50_000            # lines checked, then stored, at a time (one durable batch each)
SIGN_BATCH = 10_000             # readable lines signed under one envelope (put's default batch)
RETAIN_BYTES = 512 * 1024 * 1024    # record bytes held between the two passes before re-reading
PROGRESS_SECONDS = 10.0         # between progress lines when stderr is not a terminal


def register(commands: Any) -> None:
    export = commands.add_parser(
        "export", help="write records as JSON Lines (every kind, byte for byte) or CSV",
        description="Write stored records in write order, one per line: JSON Lines with each "
        "record's exact bytes (raw, base64) and its readable fields, or CSV of assertions. "
        "A member's envelope is written before it, even when filters leave the envelope out.")
    export.add_argument("-s", "--subject", help="only records about this subject")
    export.add_argument("-p", "--predicate", help="only records with this predicate")
    export.add_argument("-k", "--kind", choices=KINDS, help="only records of this kind")
    export.add_argument("--since", metavar="TIME", help="only records with timestamp ≥ TIME")
    export.add_argument("--until", metavar="TIME", help="only records with timestamp < TIME")
    export.add_argument("-o", "--out", metavar="FILE", help="write here (default: standard output)")
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl",
                        help="jsonl (default: every kind, importable) or csv (assertions' fields only)")
    add_target_options(export)
    export.set_defaults(handler=run_export)

    load = commands.add_parser(
        "import", help="store the records of a JSON Lines file (stemedb export's, or put's) or "
        "the assertions of a CSV file",
        description="Check every line of FILE, then store its records in batches. Lines carry "
        "a record's bytes (raw, as export writes them) or an assertion's fields, signed with "
        "--key; CSV rows are assertions' fields, signed with --key. A file with any bad line "
        "stores nothing unless --skip-bad.")
    load.add_argument("input", metavar="FILE", help="JSON Lines or CSV file ('-': standard input)")
    load.add_argument("--format", choices=("jsonl", "csv"), default=None,
                      help="the file's format (default: csv for a name ending in .csv, else jsonl)")
    add_target_options(load)
    load.add_argument("--key", help="key file to sign lines without raw with (one envelope per "
                      f"{SIGN_BATCH:,} lines)")
    load.add_argument("--skip-bad", action="store_true",
                      help="store the good lines even if some are bad (each is listed)")
    load.add_argument("--rejects", metavar="FILE",
                      help="write each bad line here as JSON: line, reason, input")
    add_json_option(load, "print one JSON object at the end: lines, records, new, "
                    "already_present, rejected")
    load.set_defaults(handler=run_import)


# ------------------------------------------------------------------ export

def run_export(args: argparse.Namespace, context: Any) -> int:
    since = parse_time(args.since, "--since") if args.since is not None else None
    until = parse_time(args.until, "--until") if args.until is not None else None
    if args.format == "csv" and args.kind not in (None, "assertion"):
        raise UsageError(f"--format csv holds assertions only; export {args.kind}s as jsonl")
    store = context.store()
    with _output(args.out) as out:
        counts = _export(store, out, args, since, until)
    where = args.out if args.out is not None else "standard output"
    pulled = f" ({counts['envelopes']:,} envelopes their members need)" if counts["envelopes"] else ""
    report(args.command, f"exported {counts['records']:,} records{pulled} to {where}")
    return EXIT_OK


@contextlib.contextmanager
def _output(path: str | None) -> Iterator[IO[str]]:
    """Standard output, or `path` written under a temporary name and renamed when complete."""
    if path is None:
        yield sys.stdout
        return
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as out:
        try:
            yield out
            out.flush()
            os.fsync(out.fileno())
        except BaseException:
            out.close()
            os.unlink(partial)
            raise
    os.replace(partial, path)


def _export(store: Any, out: IO[str], args: argparse.Namespace, since: int | None,
            until: int | None) -> dict[str, int]:
    from stemedb.cli import jsonl

    csv = args.format == "csv"
    kind = "assertion" if csv else args.kind
    counts = {"records": 0, "envelopes": 0}
    written: set[bytes] = set()   # envelopes written (each once, before its first member)
    if csv:
        out.write(jsonl.csv_header())
    for record in store.scan(args.subject, args.predicate, kind):
        if since is not None and record.timestamp < since:
            continue
        if until is not None and record.timestamp >= until:
            continue
        if csv:
            out.write(jsonl.csv_row(record))
            counts["records"] += 1
            continue
        if isinstance(record, stemedb.Envelope):
            if record.id in written:
                continue
            written.add(record.id)
        elif record.envelope is not None and record.envelope not in written:
            out.write(jsonl.export_line(store.get(record.envelope)) + "\n")
            written.add(record.envelope)
            counts["envelopes"] += 1
        out.write(jsonl.export_line(record) + "\n")
        counts["records"] += 1
    return counts


# ------------------------------------------------------------------ import

class Tally:
    """What import has done: lines read, records stored (new or already there), lines rejected."""

    def __init__(self) -> None:
        self.lines = 0
        self.new = 0
        self.already_present = 0
        self.rejected = 0

    @property
    def stored(self) -> int:
        return self.new + self.already_present

    def summary(self) -> dict[str, int]:
        return {"lines": self.lines, "records": self.stored, "new": self.new,
                "already_present": self.already_present, "rejected": self.rejected}


def run_import(args: argparse.Namespace, context: Any) -> int:
    key = args.key if args.key is not None else context.default_key
    if args.format is None:
        args.format = "csv" if args.input.lower().endswith(".csv") else "jsonl"
    if args.format == "csv" and not key:
        raise UsageError("CSV rows carry no signature: give --key KEYFILE to sign them "
                         "(stemedb keygen makes one)")
    signer = load_signer(key) if key else None
    from_stdin = args.input == "-"
    if from_stdin and context.interactive_stdin:
        raise UsageError("import in the shell reads a file: import FILE")
    size = None if from_stdin else os.path.getsize(args.input)
    store = context.store(write=True)
    rejects = open(args.rejects, "w", encoding="utf-8") if args.rejects else None
    try:
        tally = Tally()
        checked, bad = _check_pass(args, store, signer is not None, size, tally)
        for line in bad:
            report(args.command, line.reason)
            if rejects is not None:
                rejects.write(json.dumps(line.document(), ensure_ascii=False) + "\n")
        tally.rejected = len(bad)
        if bad and not args.skip_bad:
            raise CliError(f"{len(bad):,} of {tally.lines:,} lines are bad (listed above); nothing "
                           "stored: fix them, or pass --skip-bad to store the rest")
        _store_pass(args, store, signer, checked, size, tally)
    finally:
        if rejects is not None:
            rejects.close()
    if args.json:
        print(json.dumps(tally.summary()))
    else:
        print(f"stored {tally.stored:,} records: {tally.new:,} new, {tally.already_present:,} "
              f"already present; {tally.rejected:,} lines rejected")
    return EXIT_OK


def _open_input(path: str) -> Any:
    return open(path, "rb") if path != "-" else getattr(sys.stdin, "buffer", sys.stdin)


def _chunks(args: argparse.Namespace, stream: IO[bytes], store: Any, can_sign: bool) -> Iterator[Any]:
    """The input's checked chunks: JSON Lines (proven against the file and `store`) or CSV rows."""
    from stemedb.cli import jsonl

    try:
        if args.format == "csv":
            yield from jsonl.csv_stream(stream, chunk_lines=CHUNK_LINES)
        else:
            yield from jsonl.check_stream(stream, jsonl.Checker(store.get), can_sign=can_sign,
                                          chunk_lines=CHUNK_LINES)
    except stemedb.InvalidRecord as exc:   # the file as a whole (a CSV header, not UTF-8)
        raise CliError(f"{args.input}: {exc}") from None


def _check_pass(args: argparse.Namespace, store: Any, can_sign: bool, size: int | None,
                tally: Tally) -> tuple[list[jsonl.Chunk] | None, list[jsonl.BadLine]]:
    """Check every line: the chunks to store (None: too large to hold, read again) and the bad lines."""
    retained: list[jsonl.Chunk] | None = []
    held = 0
    bad: list[jsonl.BadLine] = []
    progress = Progress(args.command, "checked", size)
    stream = _open_input(args.input)
    try:
        for chunk in _chunks(args, stream, store, can_sign):
            tally.lines += chunk.lines
            bad.extend(chunk.bad)
            if retained is not None:
                held += chunk.raw_bytes + chunk.assertion_bytes
                retained.append(chunk)
                if held > RETAIN_BYTES:
                    if args.input == "-":
                        raise CliError(f"standard input holds more than {RETAIN_BYTES >> 20} MiB of "
                                       "records, more than import holds while it checks them: "
                                       "give the file's name instead")
                    retained = None  # read again for the second pass
            progress.update(chunk.end, tally.lines)
    except KeyboardInterrupt:
        raise Interrupted(f"nothing stored (checked {tally.lines:,} lines)") from None
    finally:
        progress.close()
        if args.input != "-":
            stream.close()
    return retained, bad


def _store_pass(args: argparse.Namespace, store: Any, signer: stemedb.Signer | None,
                checked: list[jsonl.Chunk] | None, size: int | None, tally: Tally) -> None:
    """Store the checked chunks (or the file read and checked again), one batch each."""
    progress = Progress(args.command, "stored", size)
    writer = BatchWriter(store, signer)
    stream = None
    try:
        if checked is None:
            stream = _open_input(args.input)
            chunks: Any = _chunks(args, stream, store, signer is not None)
        else:
            chunks = checked
        for chunk in chunks:
            with writes_finish_first():
                try:
                    writer.write(chunk, tally)
                except stemedb.StemeError as exc:
                    raise CliError(f"{describe(exc)} ({tally.stored:,} records stored before it; "
                                   "importing again is safe)") from None
            progress.update(chunk.end, tally.stored)
    except KeyboardInterrupt:
        raise Interrupted(f"stored {tally.stored:,} records so far ({tally.new:,} new); importing "
                          "again is safe") from None
    finally:
        progress.close()
        if stream is not None:
            stream.close()


class BatchWriter:
    """Stores chunks through the embedded Database's put_encoded, or a server's PUT."""

    def __init__(self, store: Any, signer: stemedb.Signer | None) -> None:
        self.store = store
        self.signer = signer
        self.local = isinstance(store, LocalStore)

    def present(self, ids: np.ndarray) -> np.ndarray:
        if not len(ids):
            return np.zeros(0, dtype=bool)
        if self.local:
            return np.asarray(self.store.db.encoded_lengths(ids) >= 0)
        return np.array(self.store.present([bytes(row) for row in ids]), dtype=bool)

    def write(self, chunk: jsonl.Chunk, tally: Tally) -> None:
        """Store the chunk's records; count each unique record once, as new or already present."""
        if len(chunk.ids):
            first = _first_rows(chunk.ids)
            present = self.present(chunk.ids[first])
            wanted = first[~present]
            tally.already_present += len(chunk.ids) - len(wanted)
            if len(wanted):
                self._put_encoded(chunk, wanted)
                tally.new += len(wanted)
        for start in range(0, len(chunk.assertions), SIGN_BATCH):
            self._put_signed(chunk.assertions[start:start + SIGN_BATCH], tally)

    def _put_encoded(self, chunk: jsonl.Chunk, rows: np.ndarray) -> None:
        blob, offsets = chunk.encoded(rows)   # rows are distinct and sorted
        if self.local:
            # The check pass validated these bytes; the engine checks their proofs again.
            columns = {name: values[rows] for name, values in chunk.columns.items()}
            self.store.db.put_validated(blob, offsets, chunk.ids[rows], columns)
            return
        # The server proves each PUT frame on its own: envelopes go first, in their own request.
        records = stemedb.decode_many(blob, offsets)
        envelopes = [record for record in records if isinstance(record, stemedb.Envelope)]
        if envelopes:
            self.store.put_many(envelopes)
        rest = [record for record in records if not isinstance(record, stemedb.Envelope)]
        if rest:
            self.store.put_many(rest)

    def _put_signed(self, assertions: list[Any], tally: Tally) -> None:
        """Sign with --key (only those not stored yet: a re-import makes no new envelope)."""
        assert self.signer is not None
        members, envelope = self.signer.sign_batch(assertions)
        ids = stemedb.ids_of(members)
        first = _first_rows(ids)
        present = self.present(ids[first])
        wanted = [assertions[int(row)] for row in first[~present]]
        tally.already_present += len(assertions) - len(wanted)
        if not wanted:
            return
        if len(wanted) != len(assertions):
            members, envelope = self.signer.sign_batch(wanted)
        self.store.put_many(members, envelope=envelope)
        tally.new += len(wanted)


def _first_rows(ids: np.ndarray) -> np.ndarray:
    """The row of each distinct ID's first occurrence in (n, 32) `ids`, ascending."""
    prefixes = np.ascontiguousarray(ids[:, :8]).view("<u8").ravel()
    if len(np.unique(prefixes)) == len(prefixes):   # distinct prefixes: distinct IDs (the usual case)
        return np.arange(len(ids))
    _unique, first = np.unique(ids.view("V32").ravel(), return_index=True)
    first.sort()
    return first


class Progress:
    """Percentage, rate and ETA: a tqdm bar on a terminal, a line every PROGRESS_SECONDS otherwise."""

    def __init__(self, command: str, verb: str, total_bytes: int | None) -> None:
        self.command = command
        self.verb = verb
        self.total = total_bytes
        self.started = time.monotonic()
        self.last_line = self.started
        self.bar: Any = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ModuleNotFoundError:  # the client-only install: the periodic lines instead
                return
            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=verb,
                            file=sys.stderr, leave=False)

    def update(self, position: int, count: int) -> None:
        now = time.monotonic()
        if self.bar is not None:
            self.bar.n = position
            self.bar.set_postfix_str(f"{count:,} records, {count / max(now - self.started, 1e-9):,.0f}/s",
                                     refresh=True)
            return
        if now - self.last_line >= PROGRESS_SECONDS:
            self.last_line = now
            report(self.command, self.line(position, count, now - self.started))

    def line(self, position: int, count: int, elapsed: float) -> str:
        rate = count / elapsed if elapsed > 0 else 0.0
        text = f"{self.verb} {count:,} records, {rate:,.0f}/s"
        if self.total and position:
            fraction = min(position / self.total, 1.0)
            remaining = elapsed * (1 - fraction) / fraction
            text += f", {fraction:.0%} of the file, {remaining:,.0f} s to go"
        return text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


__all__ = ["register", "run_export", "run_import"]
