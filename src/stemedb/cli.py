"""The `stemedb` command.

Owns: argument parsing and human/JSON output for every subcommand. Must never:
hold logic that the Python API does not also offer (each command is a thin
layer over stemedb's public functions).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

import stemedb

DEFAULT_DATA = os.environ.get("STEMEDB_DATA", os.path.join(os.path.expanduser("~"), ".stemedb", "data"))


def _demo(args: argparse.Namespace) -> int:
    """Create, sign, encode, decode and verify a few records, showing each step."""
    alice = stemedb.Signer.from_seed(b"\x01" * 32)
    bob = stemedb.Signer.from_seed(b"\x02" * 32)
    out = sys.stdout
    print("StemeDB demo: claims, not facts.\n", file=out)
    print(f"signers: alice {alice.public_key.hex()[:16]}…  bob {bob.public_key.hex()[:16]}…\n",
          file=out)
    claims = [
        stemedb.Assertion("aspirin", "treats", stemedb.Ref("headache"), confidence=0.9,
                          source_class="clinical", lifecycle="approved").sign(alice),
        stemedb.Assertion("aspirin", "treats", stemedb.Ref("headache"), confidence=0.4,
                          source_class="anecdotal").sign(bob),
        stemedb.Assertion("aspirin", "max_daily_mg", 4000, confidence=0.8,
                          source_class="regulatory").sign(alice),
    ]
    for claim in claims:
        data = claim.encode()
        back = stemedb.decode(data)
        back.verify()
        assert back == claim
        print(f"{claim.subject} — {claim.predicate} — {claim.object!r}", file=out)
        print(f"  id         {claim.id.hex()}", file=out)
        print(f"  encoded    {len(data)} bytes: {data[:24].hex()}…", file=out)
        print(f"  source     {claim.source_class.name.lower()}, confidence {claim.confidence:.2f}, "
              f"lifecycle {claim.lifecycle.name.lower()}", file=out)
        print("  signature  verified\n", file=out)
    vote = stemedb.Vote(claims[0], 1.0).sign(bob)
    vote.verify()
    print(f"bob votes for {claims[0].id.hex()[:16]}…: vote id {vote.id.hex()[:16]}…", file=out)
    members, envelope = alice.sign_batch(
        [stemedb.Assertion(f"sensor-{i}", "reading", 20.0 + i) for i in range(1000)]
    )
    stemedb.verify_batch(envelope, members)
    print(f"signed batch: 1000 records under one signature (envelope {envelope.id.hex()[:16]}…), "
          "verified\n", file=out)
    if args.json:
        print(json.dumps([c.to_dict() for c in claims], indent=1), file=out)
    return 0


class Progress:
    """A one-line progress indicator on stderr (only when stderr is a terminal)."""

    def __init__(self, label: str, total: int | None = None, *, enabled: bool | None = None) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.started = time.perf_counter()
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._last = 0.0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and now - self._last > 0.2:
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self.done / max(now - self.started, 1e-9)
        if self.total:
            width = 30
            filled = int(width * self.done / self.total)
            bar = "#" * filled + "-" * (width - filled)
            sys.stderr.write(f"\r{self.label} [{bar}] {self.done:,}/{self.total:,} ({rate:,.0f}/s)")
        else:
            sys.stderr.write(f"\r{self.label} {self.done:,} ({rate:,.0f}/s)")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            sys.stderr.write("\n")


def _keygen(args: argparse.Namespace) -> int:
    """Write a new Ed25519 signing key, readable by its owner only."""
    signer = stemedb.Signer.generate()
    document = {"type": "ed25519", "seed": signer.seed.hex(), "public_key": signer.public_key.hex()}
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if args.force else os.O_EXCL)
    try:
        fd = os.open(args.output, flags, 0o600)
    except FileExistsError:
        raise stemedb.StemeError(f"{args.output} exists; pass --force to overwrite it") from None
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)
        json.dump(document, handle)
        handle.write("\n")
    print(signer.public_key.hex())
    return 0


def load_signer(path: str) -> stemedb.Signer:
    """The Signer in a key file written by `stemedb keygen`."""
    try:
        with open(path) as handle:
            document = json.load(handle)
        return stemedb.Signer.from_seed(bytes.fromhex(document["seed"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise stemedb.StemeError(f"{path}: not a StemeDB key file ({exc})") from None


def _object_from_json(value: Any, line: int) -> Any:
    if isinstance(value, dict):
        if set(value) == {"ref"}:
            return stemedb.Ref(value["ref"])
        if set(value) == {"bytes"}:
            try:
                return bytes.fromhex(value["bytes"])
            except (TypeError, ValueError):
                raise stemedb.InvalidRecord(f"line {line}: object: bytes must be hex") from None
        raise stemedb.InvalidRecord(f"line {line}: object: expected a value, {{\"ref\": …}} or {{\"bytes\": hex}}")
    return value


ASSERTION_FIELDS = {"subject", "predicate", "object", "confidence", "timestamp", "source_class",
                    "lifecycle", "source_hash", "parent_hash", "epoch", "visual_hash", "vector"}
HEX_FIELDS = ("source_hash", "parent_hash", "epoch", "visual_hash")


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
    value = _object_from_json(fields.pop("object"), line)
    try:
        return stemedb.Assertion(fields.pop("subject"), fields.pop("predicate"), value, **fields)
    except stemedb.InvalidRecord as exc:
        raise stemedb.InvalidRecord(f"line {line}: {exc}") from None


def _batches(stream: TextIO, size: int) -> Iterator[list[tuple[int, str]]]:
    batch: list[tuple[int, str]] = []
    for number, text in enumerate(stream, start=1):
        if text.strip():
            batch.append((number, text))
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _put(args: argparse.Namespace) -> int:
    """Store JSON Lines of assertions, signed in batches with one envelope each."""
    signer = load_signer(args.key) if args.key else None
    stream = sys.stdin if args.input in (None, "-") else open(args.input)
    total = stored = 0
    failures = 0
    progress = Progress("put")
    with stemedb.open(args.data) as db:
        for batch in _batches(stream, args.batch):
            try:
                records = [record_from_json(text, number) for number, text in batch]
                signed = [r for r in records if r.is_signed]
                unsigned = [r for r in records if not r.is_signed]
                if unsigned and signer is None:
                    raise stemedb.SignatureError(
                        f"line {batch[records.index(unsigned[0])][0]}: unsigned record and no --key given")
                if signed:
                    db.put_many(signed)
                if unsigned:
                    assert signer is not None
                    members, envelope = signer.sign_batch(unsigned)
                    db.put_many(members, envelope=envelope)
                stored += len(records)
            except (stemedb.InvalidRecord, stemedb.SignatureError) as exc:
                failures += 1
                print(f"stemedb put: batch of lines {batch[0][0]}-{batch[-1][0]} not written: {exc}",
                      file=sys.stderr)
            total += len(batch)
            progress.advance(len(batch))
    progress.finish()
    summary = {"lines": total, "stored": stored, "failed_batches": failures}
    print(json.dumps(summary) if args.json else
          f"stored {stored:,} of {total:,} records ({failures} batch(es) refused)")
    return 1 if failures else 0


def _get(args: argparse.Namespace) -> int:
    try:
        record_id = bytes.fromhex(args.id)
    except ValueError:
        raise stemedb.InvalidRecord(f"ID: {args.id!r} is not hex") from None
    with stemedb.open(args.data) as db:
        record = db.get(record_id)
    if args.json or not isinstance(record, stemedb.Assertion):
        print(json.dumps(_record_json(record), indent=1))
    else:
        print(f"{record.subject} — {record.predicate} — {record.object!r}")
        print(f"  confidence {record.confidence:.3f}  {record.source_class.name.lower()}  "
              f"{record.lifecycle.name.lower()}  at {record.timestamp} µs")
        print(f"  id {record.id.hex()}")
    return 0


def _record_json(record: Any) -> dict[str, Any]:
    if isinstance(record, stemedb.Assertion):
        return record.to_dict()
    return {"kind": type(record).__name__.lower(), "id": record.id.hex(),
            "timestamp": record.timestamp, "signers": [k.hex() for k in record.signers],
            "encoded": record.encode().hex()}


def _stats(args: argparse.Namespace) -> int:
    with stemedb.open(args.path) as db:
        stats = db.stats()
    if args.json:
        print(json.dumps(stats, indent=1, default=str))
        return 0
    print(f"store       {stats['path']}")
    print(f"records     {stats['records']:,}  " + "  ".join(f"{k} {v:,}" for k, v in stats["by_kind"].items()))
    print(f"segments    {stats['segments']} × {stats['segment_size'] >> 20} MiB, "
          f"{stats['used_bytes'] / 2**20:,.1f} MiB used")
    print("index RAM   " + ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in stats["index_bytes"].items()))
    recovery = stats["recovery"]
    print(f"last open   {recovery['seconds'] * 1000:.1f} ms, {recovery['records_replayed']:,} records "
          f"replayed, {recovery['torn_bytes_dropped']} torn bytes dropped")
    for problem in recovery["problems"]:
        print(f"problem     {problem}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    with stemedb.open(args.path) as db:
        report = db.verify()
    seconds = time.perf_counter() - started
    if args.json:
        print(json.dumps({"ok": report.ok, "records_checked": report.records_checked,
                          "problems": report.problems, "seconds": seconds}, indent=1))
    else:
        for problem in report.problems:
            print(f"PROBLEM  {problem}")
        print(f"{'OK' if report.ok else 'DAMAGED'}: {report.records_checked:,} records checked "
              f"in {seconds:.2f} s, {len(report.problems)} problem(s)")
    return 0 if report.ok else 1


def _query(args: argparse.Namespace) -> int:
    """Resolve a subject (and predicate) through a lens."""
    from stemedb import query as query_module

    with stemedb.open(args.path) as db:
        result = db.query(args.subject, args.predicate, lens=args.lens, lifecycle=args.lifecycle,
                          as_of=args.as_of, decay=args.decay, now=args.now,
                          audit=args.audit, agent=args.agent)
        if args.json:
            if isinstance(result, dict):
                print(json.dumps({k: v.to_dict() for k, v in result.items()}, indent=1))
            else:
                print(json.dumps(result.to_dict(), indent=1))
        else:
            print(query_module.render(result))
    return 0


def _conflicts(args: argparse.Namespace) -> int:
    """The disagreement dashboard: the most contested (subject, predicate) pairs."""
    from stemedb import query as query_module

    with stemedb.open(args.path) as db:
        rows = db.conflicts(args.top, min_score=args.min_score)
    if args.json:
        print(json.dumps([row.to_dict() for row in rows], indent=1))
    else:
        print(query_module.render(rows))
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Serve a store over the network (binary protocol, optional HTTP side door) until a signal."""
    import logging

    from stemedb.server import serve

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(args.data, listen=args.listen, http=args.http, config=args.config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stemedb", description=stemedb.__doc__)
    parser.add_argument("--version", action="version", version=f"stemedb {stemedb.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="create, sign, encode and verify a few records")
    demo.add_argument("--json", action="store_true", help="also print the records as JSON")
    demo.set_defaults(handler=_demo)

    keygen = commands.add_parser("keygen", help="write a new signing key file (owner-only)")
    keygen.add_argument("output", help="key file to create")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing file")
    keygen.set_defaults(handler=_keygen)

    put = commands.add_parser("put", help="store JSON Lines of assertions")
    put.add_argument("input", nargs="?", help="JSON Lines file (default: standard input)")
    put.add_argument("--data", default=DEFAULT_DATA, help=f"data directory (default {DEFAULT_DATA})")
    put.add_argument("--key", help="key file to sign unsigned records with (one envelope per batch)")
    put.add_argument("--batch", type=int, default=10_000, help="records per durable batch")
    put.add_argument("--json", action="store_true", help="print the summary as JSON")
    put.set_defaults(handler=_put)

    get = commands.add_parser("get", help="print the record with an ID")
    get.add_argument("id", help="record ID in hex")
    get.add_argument("--data", default=DEFAULT_DATA, help="data directory")
    get.add_argument("--json", action="store_true")
    get.set_defaults(handler=_get)

    stats = commands.add_parser("stats", help="counts, sizes and recovery figures of a store")
    stats.add_argument("path", nargs="?", default=DEFAULT_DATA, help="data directory")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(handler=_stats)

    query = commands.add_parser("query", help="resolve a subject (and predicate) through a lens")
    query.add_argument("path", help="data directory")
    query.add_argument("subject")
    query.add_argument("predicate", nargs="?", help="omit to resolve every predicate of the subject")
    query.add_argument("--lens", default="recency",
                       help="recency, confidence, consensus, vote_consensus, authority, skeptic, "
                            "epoch_aware, layered, constraints (default recency)")
    query.add_argument("--lifecycle", default="any", help="any, approved, or a stage")
    query.add_argument("--as-of", type=int, help="time travel: only claims at or before this µs time")
    query.add_argument("--decay", action="store_true", help="decay confidence by source-class half-life")
    query.add_argument("--now", type=int, help="the time decay is measured from (µs; default now)")
    query.add_argument("--audit", action="store_true", help="record this query in the audit log")
    query.add_argument("--agent", help="who is asking (for the audit log)")
    query.add_argument("--json", action="store_true")
    query.set_defaults(handler=_query)

    conflicts = commands.add_parser("conflicts", help="the most contested (subject, predicate) pairs")
    conflicts.add_argument("path", nargs="?", default=DEFAULT_DATA, help="data directory")
    conflicts.add_argument("--top", type=int, default=20)
    conflicts.add_argument("--min-score", type=float, default=0.0)
    conflicts.add_argument("--json", action="store_true")
    conflicts.set_defaults(handler=_conflicts)

    serve = commands.add_parser("serve", help="serve a store over the network until SIGINT/SIGTERM")
    serve.add_argument("--data", default=DEFAULT_DATA, help=f"data directory (default {DEFAULT_DATA})")
    serve.add_argument("--listen", help="binary protocol host:port (default: the config's, else 127.0.0.1:7440)")
    serve.add_argument("--http", help="HTTP side door host:port (default: the config's, else off)")
    serve.add_argument("--config", help="TOML configuration file (see examples/stemedb.toml)")
    serve.set_defaults(handler=_serve)

    verify = commands.add_parser("verify", help="scrub every checksum and ID of a store")
    verify.add_argument("path", nargs="?", default=DEFAULT_DATA, help="data directory")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(handler=_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except stemedb.StemeError as exc:
        print(f"stemedb: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
