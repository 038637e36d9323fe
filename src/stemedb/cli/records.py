"""`stemedb put`, `get` and `scan` (alias `list`): records in and out.

Owns: reading JSON Lines into signed batches and storing them (printing the
IDs as each batch becomes durable), printing one record, and listing records
with filters and a limit. Must never: report a record as stored before the
store acknowledged it, or write anything of a batch that has a bad line.

Error handling: a bad line refuses its whole batch (one line on stderr,
naming the line; later batches still go, exit 1); any other refusal stops
the command, saying how many records were stored before it. Ctrl-C waits
for the batch in flight to be answered, then says how many were stored.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import IO, Any

import stemedb
from stemedb.cli.core import (
    EXIT_ERROR,
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
from stemedb.cli.formats import dumps, record_document, record_from_json, record_line, record_text
from stemedb.cli.keys import load_signer

KINDS = ("assertion", "vote", "epoch", "envelope")


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def register(commands: Any) -> None:
    put = commands.add_parser("put", help="store JSON Lines of assertions; prints the IDs stored",
                              description="Store one assertion (or {\"encoded\": hex}) per line; "
                              "prints each stored ID as its batch becomes durable.")
    put.add_argument("input", nargs="?", help="JSON Lines file (default: standard input)")
    add_target_options(put)
    put.add_argument("--key", help="key file to sign unsigned records with (one envelope per batch)")
    put.add_argument("--batch", type=positive, default=10_000, help="records per durable batch")
    add_json_option(put, "print one JSON object at the end: ids, new, already_present, refused")
    put.set_defaults(handler=run_put)

    get = commands.add_parser("get", help="print the record with an ID (or a unique ID prefix)")
    get.add_argument("id", help="the record's ID in hex, or at least 4 of its first digits")
    add_target_options(get)
    add_json_option(get)
    get.set_defaults(handler=run_get)

    scan = commands.add_parser("scan", aliases=["list"], help="list stored records in write order",
                               description="List stored records in write order, optionally by "
                               "subject, predicate and kind.")
    scan.add_argument("-s", "--subject", help="only records about this subject")
    scan.add_argument("-p", "--predicate", help="only records with this predicate")
    scan.add_argument("-k", "--kind", choices=KINDS, help="only records of this kind")
    limits = scan.add_mutually_exclusive_group()
    limits.add_argument("-n", "--limit", type=positive, default=100,
                        help="print at most this many (default 100)")
    limits.add_argument("--all", action="store_true", help="print every match")
    add_target_options(scan)
    add_json_option(scan, "print JSON Lines, one record per line")
    scan.set_defaults(handler=run_scan)


# ------------------------------------------------------------------ put

class PutTally:
    """What put has done so far: IDs acknowledged, how many were new, records refused."""

    def __init__(self) -> None:
        self.ids: list[bytes] = []
        self.new = 0
        self.refused = 0

    def summary(self) -> dict[str, Any]:
        return {"ids": [i.hex() for i in self.ids], "new": self.new,
                "already_present": len(self.ids) - self.new, "refused": self.refused}


Line = tuple[int, "str | stemedb.InvalidRecord"]   # its number, and its text or why it has none


def _batches(stream: IO[Any], size: int) -> Iterator[list[Line]]:
    """Numbered non-blank lines, `size` at a time.

    A binary stream is decoded line by line, so that a line that is not
    UTF-8 refuses its batch like any other bad line, naming its number.
    """
    batch: list[Line] = []
    for number, line in enumerate(stream, start=1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                batch.append((number, stemedb.InvalidRecord(f"line {number}: not UTF-8 text "
                                                            f"({exc.reason})")))
                line = ""
        if line.strip():
            batch.append((number, line))
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _record(number: int, text: str | stemedb.InvalidRecord) -> Any:
    if isinstance(text, stemedb.InvalidRecord):
        raise text
    return record_from_json(text, number)


def _prepare(batch: list[Line],
             signer: stemedb.Signer | None) -> list[tuple[list[int], list[Any], Any]]:
    """The batch as writes of (positions in the batch, records, envelope or None).

    Records signed already go first, as they are; the unsigned ones are
    signed as members of one envelope. Signatures are checked here, so that
    a bad one refuses the batch before any of it is written.
    """
    records = [_record(number, text) for number, text in batch]
    signed = [index for index, record in enumerate(records) if record.is_signed]
    unsigned = [index for index, record in enumerate(records) if not record.is_signed]
    if unsigned and signer is None:
        raise stemedb.SignatureError(f"line {batch[unsigned[0]][0]}: unsigned record and no --key given")
    for index in signed:
        if records[index].envelope is None:  # one proven by a stored envelope: the store checks it
            try:
                records[index].verify()
            except stemedb.SignatureError as exc:
                raise stemedb.SignatureError(f"line {batch[index][0]}: {exc}") from None
    writes: list[tuple[list[int], list[Any], Any]] = []
    if signed:
        writes.append((signed, [records[index] for index in signed], None))
    if unsigned:
        assert signer is not None
        members, envelope = signer.sign_batch([records[index] for index in unsigned])
        writes.append((unsigned, members, envelope))
    return writes


def run_put(args: argparse.Namespace, context: Any) -> int:
    """Store JSON Lines of assertions, signed in batches with one envelope each."""
    key = args.key if args.key is not None else context.default_key
    signer = load_signer(key) if key else None
    inline = getattr(args, "inline_input", None)  # put {json} typed in the shell
    if inline is not None:
        return _put_stream(args, context, signer, inline)
    if args.input in (None, "-"):
        if context.interactive_stdin:
            raise UsageError("put in the shell reads a file (put FILE) or JSON after it "
                             "(put {\"subject\": …})")
        return _put_stream(args, context, signer, getattr(sys.stdin, "buffer", sys.stdin))
    with open(args.input, "rb") as stream:
        return _put_stream(args, context, signer, stream)


def _put_stream(args: argparse.Namespace, context: Any, signer: stemedb.Signer | None,
                stream: IO[Any]) -> int:
    store = context.store(write=True)
    tally = PutTally()
    try:
        for batch in _batches(stream, args.batch):
            _put_batch(args, store, signer, batch, tally)
    except KeyboardInterrupt:
        if args.json:
            print(dumps(tally.summary()), flush=True)
        raise Interrupted(f"stored {len(tally.ids):,} so far") from None
    if args.json:
        print(dumps(tally.summary()))
    elif sys.stderr.isatty():
        sys.stderr.write(f"stored {len(tally.ids):,} records ({tally.new:,} new), "
                         f"{tally.refused:,} refused\n")
    return EXIT_ERROR if tally.refused else EXIT_OK


def _put_batch(args: argparse.Namespace, store: Any, signer: stemedb.Signer | None,
               batch: list[Line], tally: PutTally) -> None:
    """Store one batch; its IDs are counted and printed (in line order) once acknowledged."""
    lines = f"lines {batch[0][0]}-{batch[-1][0]}"
    stored: dict[int, bytes] = {}
    with writes_finish_first():
        try:
            for positions, records, envelope in _prepare(batch, signer):
                present = store.present([record.id for record in records])
                stored.update(zip(positions, store.put_many(records, envelope=envelope)))
                tally.new += present.count(False)
        except (stemedb.InvalidRecord, stemedb.SignatureError) as exc:
            refused = len(batch) - len(stored)
            tally.refused += refused
            what = "not written" if not stored else f"{refused} of {len(batch)} records not written"
            report("put", f"error: {lines} {what}: {describe(exc)}")
        except stemedb.StemeError as exc:  # the store or server refuses writes: stop here
            raise CliError(f"{describe(exc)} ({len(tally.ids) + len(stored):,} records stored "
                           f"before it)") from None
        finally:
            ids = [stored[position] for position in sorted(stored)]
            tally.ids.extend(ids)
            if ids and not args.json:
                print("\n".join(i.hex() for i in ids), flush=True)


# ------------------------------------------------------------------ get and scan

def run_get(args: argparse.Namespace, context: Any) -> int:
    store = context.store()
    record = store.get(store.resolve_id(args.id))
    print(dumps(record_document(record)) if args.json else record_text(record))
    return EXIT_OK


def run_scan(args: argparse.Namespace, context: Any) -> int:
    store = context.store()
    limit = None if args.all else args.limit
    shown = 0
    # One more than asked for says whether there are more.
    for record in store.scan(args.subject, args.predicate, args.kind,
                             None if limit is None else limit + 1):
        if limit is not None and shown >= limit:
            report(args.command, f"showing the first {limit:,}; more match "
                   "(raise --limit, or pass --all)")
            break
        print(dumps(record_document(record), lines=True) if args.json else record_line(record))
        shown += 1
    return EXIT_OK
