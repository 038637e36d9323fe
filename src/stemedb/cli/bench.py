"""`stemedb bench`: the headline workloads, ours beside SQLite in the same run.

Owns: a synthetic workload (batch-signed assertions of the benchmark shape:
Zipf-skewed subjects, 50 predicates, mixed objects), three timed workloads —
`write` (durable batches of `--batch` records), `get` (one record by ID per
call) and `query` (one Recency query per call on pairs that exist) — each run
`--runs` times alternating with the same work on SQLite (WAL,
synchronous=FULL, a table keyed by ID with an index on (subject, predicate)),
and the report: median rate, min–max, and ours / SQLite. Must never: write
into a store that holds records (a benchmark's records are permanent in a
grow-only store), or into a server without `--accept-writes`.

Where it runs: a fresh temporary directory by default (removed at the end),
`--data DIR` (a new or empty directory, kept), or `--url URL` (a running
server; SQLite stays in this process, so the ratio includes the network on
our side only — the output says so). Only the command line chooses: the
STEMEDB_DATA / STEMEDB_URL defaults of other commands do not apply here.

The B-table of the project's benchmarks (bench/ in the source tree) is measured
by the scripts there; this command is the quick check an operator runs on a
machine they are about to deploy on. (sqlite3, random and statistics are
imported where they are used: every `stemedb` command loads this module to
register its parser, and a backup's start should not pay for them.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import stemedb
from stemedb.cli.core import EXIT_OK, CliError, UsageError, add_json_option

WORKLOADS = ("write", "get", "query")
SUBJECTS = 20_000
PREDICATES = 50


def register(commands: Any) -> None:
    bench = commands.add_parser(
        "bench", help="the headline workloads (write, get, query) against SQLite in the same run",
        description="Time durable batch writes, point gets and Recency queries on synthetic "
                    "records, alternating with the same work on SQLite; prints ours, SQLite "
                    "and the ratio (median of --runs).")
    bench.add_argument("--data", metavar="DIR", default=argparse.SUPPRESS, help="a new or empty directory for the store "
                       "(kept); default: a temporary directory, removed at the end")
    bench.add_argument("--url", metavar="URL", default=argparse.SUPPRESS, help="a running server to benchmark instead")
    bench.add_argument("--token", metavar="TOKEN", default=argparse.SUPPRESS, help="the server's token (with --url)")
    bench.add_argument("--accept-writes", action="store_true",
                       help="with --url: allow the benchmark's records to be stored on that "
                            "server for good (a store never forgets a record)")
    bench.add_argument("--records", type=int, default=100_000, metavar="N",
                       help="assertions written (default 100000)")
    bench.add_argument("--batch", type=int, default=10_000, metavar="N",
                       help="records per durable batch (default 10000)")
    bench.add_argument("--calls", type=int, default=20_000, metavar="N",
                       help="get and query calls per run (default 20000)")
    bench.add_argument("--runs", type=int, default=5, metavar="N", help="runs per workload (default 5)")
    bench.add_argument("--only", metavar="LIST", default=",".join(WORKLOADS),
                       help=f"comma-separated subset of {','.join(WORKLOADS)}")
    add_json_option(bench, "print one JSON object instead of the table")
    bench.set_defaults(handler=run_bench)


def workloads_of(text: str) -> list[str]:
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [part for part in chosen if part not in WORKLOADS]
    if unknown or not chosen:
        raise UsageError(f"--only {text!r}: expected a comma-separated subset of {','.join(WORKLOADS)}")
    return [name for name in WORKLOADS if name in chosen]


def check_counts(args: argparse.Namespace) -> None:
    for name in ("data", "url", "token"):  # before or after the command; absent: None
        setattr(args, name, getattr(args, name, None))
    for name in ("records", "batch", "calls", "runs"):
        value = getattr(args, name)
        if value < 1:
            raise UsageError(f"--{name} {value}: must be at least 1")
    if args.url is not None and args.data is not None:
        raise UsageError("--data and --url exclude each other: give one")
    if args.token is not None and args.url is None:
        raise UsageError("--token applies to a server: give --url with it")
    if args.url is not None and not args.accept_writes:
        raise UsageError(f"--url {args.url}: the benchmark stores {args.records * args.runs:,} records "
                         "there for good; add --accept-writes if that server is meant for it")


def synthetic(n: int, seed: int, signer: stemedb.Signer) -> tuple[list[Any], list[Any]]:
    """n batch-signed assertions of the benchmark's shape (distinct for each seed)."""
    import random

    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) ** 1.1 for rank in range(SUBJECTS)]
    subjects = rng.choices(range(SUBJECTS), weights=weights, k=n)
    base = 1_700_000_000_000_000 + seed * 10_000_000_000
    records = []
    for i in range(n):
        kind = i % 3
        value: str | float | stemedb.Ref = (f"value {rng.randrange(1000)}" if kind == 0 else
                         rng.random() * 1000 if kind == 1 else stemedb.Ref(f"entity/{rng.randrange(SUBJECTS)}"))
        records.append(stemedb.Assertion(f"entity/{subjects[i]:06d}", f"predicate_{rng.randrange(PREDICATES):02d}",
                                         value, confidence=rng.random(), timestamp=base + i * 1000))
    members, envelope = signer.sign_batch(records)
    return members, [envelope]


class Ours:
    """The store under test: embedded in a directory, or a server over the network."""

    def __init__(self, args: argparse.Namespace, directory: str | None) -> None:
        self.remote = args.url is not None
        if self.remote:
            self.handle: Any = stemedb.connect(args.url, token=args.token)
        else:
            assert directory is not None
            self.handle = stemedb.open(directory, durability="sync")

    def put_many(self, members: list[Any], envelopes: list[Any]) -> None:
        self.handle.put_many(members, envelope=envelopes)

    def get(self, record_id: bytes) -> Any:
        return self.handle.get(record_id)

    def query(self, subject: str, predicate: str) -> Any:
        return self.handle.query(subject, predicate, lens="recency")

    def close(self) -> None:
        self.handle.close()


class Sqlite:
    def __init__(self, path: str) -> None:
        import sqlite3

        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("CREATE TABLE records (id BLOB PRIMARY KEY, subject TEXT, predicate TEXT, "
                          "ts INTEGER, body BLOB)")
        self.conn.execute("CREATE INDEX records_sp ON records (subject, predicate)")

    def put_many(self, members: list[Any]) -> None:
        blob, offsets, ids = stemedb.encode_many(members)
        rows = [(bytes(ids[i]), m.subject, m.predicate, m.timestamp, bytes(blob[offsets[i]:offsets[i + 1]]))
                for i, m in enumerate(members)]
        self.conn.execute("BEGIN")
        self.conn.executemany("INSERT OR IGNORE INTO records VALUES (?,?,?,?,?)", rows)
        self.conn.execute("COMMIT")

    def get(self, record_id: bytes) -> Any:
        row = self.conn.execute("SELECT body FROM records WHERE id = ?", (record_id,)).fetchone()
        if row is None:
            raise CliError(f"SQLite lost record {record_id.hex()}")
        return row[0]

    def query(self, subject: str, predicate: str) -> Any:
        return self.conn.execute("SELECT id, body FROM records WHERE subject = ? AND predicate = ? "
                                 "ORDER BY ts DESC, id LIMIT 1", (subject, predicate)).fetchone()

    def close(self) -> None:
        self.conn.close()


def timed(call: Callable[..., Any], items: list[Any], *, spread: bool = False) -> float:
    """Seconds to call `call` on each item in turn (`spread`: each item is a tuple of arguments)."""
    start = time.perf_counter()
    if spread:
        for item in items:
            call(*item)
    else:
        for item in items:
            call(item)
    return time.perf_counter() - start


def summary(rates: list[float]) -> dict[str, float]:
    import statistics

    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}


def run_bench(args: argparse.Namespace, context: Any) -> int:
    check_counts(args)
    chosen = workloads_of(args.only)
    scratch = tempfile.mkdtemp(prefix="stemedb-bench-")
    directory = None
    try:
        if args.url is None:
            directory = args.data if args.data is not None else os.path.join(scratch, "store")
            if os.path.isdir(directory) and os.listdir(directory):
                raise CliError(f"--data {directory}: not empty; the benchmark needs a new or empty "
                               "directory (its records would stay in that store for good)")
        ours = Ours(args, directory)
        peer = Sqlite(os.path.join(scratch, "sqlite.db"))
        try:
            report = measure(args, chosen, ours, peer)
        finally:
            ours.close()
            peer.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report["where"] = args.url if args.url is not None else (args.data or "a temporary directory")
    if args.json:
        print(json.dumps(report, indent=1))
        return EXIT_OK
    print(f"stemedb bench: {args.records:,} records in batches of {args.batch:,}, {args.calls:,} calls "
          f"per run, {args.runs} runs, on {report['where']}"
          + (" (ours over the network, SQLite in this process)" if args.url is not None else ""))
    print(f"{'workload':<8} {'ours':>14} {'SQLite':>14} {'ratio':>7}   ours min–max")
    for name in chosen:
        row = report["workloads"][name]
        print(f"{name:<8} {row['ours']['median']:>12,.0f}/s {row['sqlite']['median']:>12,.0f}/s "
              f"{row['ratio']:>6.2f}×   {row['ours']['min']:,.0f}–{row['ours']['max']:,.0f}/s")
    return EXIT_OK


def measure(args: argparse.Namespace, chosen: list[str], ours: Ours, peer: Sqlite) -> dict[str, Any]:
    import random
    import statistics

    signer = stemedb.Signer.generate()
    rates: dict[str, dict[str, list[float]]] = {name: {"ours": [], "sqlite": []} for name in chosen}
    written: list[Any] = []
    # Writes run once per run with new records (a content-addressed store ignores a repeat);
    # reads need records, so the first run's are written even when `write` is not measured.
    for run in range(args.runs if "write" in chosen else 1):
        batches = [synthetic(min(args.batch, args.records - start), run * 1_000_003 + start, signer)
                   for start in range(0, args.records, args.batch)]
        ours_time = timed(ours.put_many, batches, spread=True)
        peer_time = timed(peer.put_many, [members for members, _ in batches])
        if "write" in chosen:
            rates["write"]["ours"].append(args.records / ours_time)
            rates["write"]["sqlite"].append(args.records / peer_time)
        if run == 0:
            written = [m for members, _ in batches for m in members]
    rng = random.Random(7)
    ids = [written[rng.randrange(len(written))].id for _ in range(args.calls)]
    pairs = [(m.subject, m.predicate) for m in (written[rng.randrange(len(written))]
                                                for _ in range(args.calls))]
    if "query" in chosen:
        ours.query(*pairs[0])  # the first query compiles the kernels: not part of a run
    for _ in range(args.runs):
        plan: list[tuple[str, Callable[..., Any], Callable[..., Any], list[Any]]] = [
            ("get", ours.get, peer.get, ids), ("query", ours.query, peer.query, pairs)]
        for name, ours_call, peer_call, items in plan:
            if name not in chosen:
                continue
            spread = name == "query"
            ours_time = timed(ours_call, items, spread=spread)
            peer_time = timed(peer_call, items, spread=spread)
            rates[name]["ours"].append(len(items) / ours_time)
            rates[name]["sqlite"].append(len(items) / peer_time)
    return {"records": args.records, "batch": args.batch, "calls": args.calls, "runs": args.runs,
            "workloads": {name: {"ours": summary(r["ours"]), "sqlite": summary(r["sqlite"]),
                                 "ratio": statistics.median(r["ours"]) / statistics.median(r["sqlite"])}
                          for name, r in rates.items()}}
