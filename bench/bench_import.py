"""`stemedb import` from JSON Lines vs put_many of the same records vs SQLite executemany (B10).

    PYTHONPATH=src python bench/bench_import.py [--records 1000000] [--runs 3] [--dir /tmp]

The records are bench/workload.py's assertions (~200 canonical bytes),
batch-signed by one agent in envelopes of --chunk records, as `put --key`
and writers store them. They are written once to a store and exported with
`stemedb export` (the export is timed too). Each run then, alternately,
into a fresh directory:
  import   `stemedb import FILE --data DIR` in this process: parse every
           line, check it (base64, canonical bytes, ID, envelope membership,
           one signature per envelope), then store (put_encoded, durability
           sync), with the count of new records;
  put_many db.put_many(members, envelope=env) per chunk, from record objects
           already in memory (no parsing: the engine's own ceiling);
  sqlite   executemany of (id, subject, predicate, raw bytes) rows, one
           transaction per chunk, WAL with synchronous=FULL (as bench_storage).
Rates are records per second (the envelopes counted); ratios are the medians
of the per-run ratios. Target (BENCHMARKS.md B10): import ≥ 200 K records/s.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import pathlib
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import workload  # noqa: E402

import stemedb  # noqa: E402
from stemedb.cli import main  # noqa: E402

TARGET = 200_000


def build_source(path: str, records: int, chunk: int) -> tuple[list, int]:
    """A store of `records` batch-signed assertions; the (members, envelope) chunks and the count."""
    signer = workload.agent_signers(1)[0]
    assertions = workload.generate(records, votes=False, signers=0).assertions
    chunks = [signer.sign_batch(assertions[i:i + chunk]) for i in range(0, records, chunk)]
    with stemedb.open(path) as db:
        for members, envelope in chunks:
            db.put_many(members, envelope=envelope)
        count = len(db)
    return chunks, count


def run_cli(*argv: str) -> str:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    if code != 0:
        raise SystemExit(f"stemedb {' '.join(argv)} failed ({code}): {err.getvalue()}")
    return out.getvalue()


def time_import(dump: str, target: str, expected: int) -> float:
    started = time.perf_counter()
    summary = run_cli("import", dump, "--data", target, "--json")
    seconds = time.perf_counter() - started
    if f'"new": {expected},' not in summary:
        raise SystemExit(f"import stored something else than {expected} new records: {summary}")
    return seconds


def time_put_many(chunks: list, target: str) -> float:
    with stemedb.open(target) as db:
        started = time.perf_counter()
        for members, envelope in chunks:
            db.put_many(members, envelope=envelope)
        return time.perf_counter() - started


def time_sqlite(rows: list[list[tuple]], target: str) -> float:
    os.makedirs(target)
    conn = sqlite3.connect(os.path.join(target, "db.sqlite"), isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE records (id BLOB PRIMARY KEY, subject TEXT, predicate TEXT, body BLOB)")
        started = time.perf_counter()
        for chunk in rows:
            conn.execute("BEGIN")
            conn.executemany("INSERT INTO records VALUES (?, ?, ?, ?)", chunk)
            conn.execute("COMMIT")
        return time.perf_counter() - started
    finally:
        conn.close()


def sqlite_rows(chunks: list) -> list[list[tuple]]:
    out = []
    for members, envelope in chunks:
        rows = [(envelope.id, None, None, envelope.encode())]
        rows += [(m.id, m.subject, m.predicate, m.encode()) for m in members]
        out.append(rows)
    return out


def spread(values: list[float]) -> str:
    return f"{statistics.median(values) / 1e3:,.0f} K/s ({min(values) / 1e3:,.0f}–{max(values) / 1e3:,.0f})"


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=10_000, help="records per envelope")
    parser.add_argument("--dir", default="/tmp", help="parent of the temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="bench-import-", dir=args.dir)
    try:
        source = os.path.join(root, "source")
        chunks, count = build_source(source, args.records, args.chunk)
        dump = os.path.join(root, "records.jsonl")
        started = time.perf_counter()
        run_cli("export", "--data", source, "--out", dump)
        export_seconds = time.perf_counter() - started
        rows = sqlite_rows(chunks)
        print(f"{args.records:,} assertions + {len(chunks):,} envelopes = {count:,} records; "
              f"JSON Lines {os.path.getsize(dump) / 2**20:,.0f} MiB; export {count / export_seconds / 1e3:,.0f} K/s")
        rates: dict[str, list[float]] = {"import": [], "put_many": [], "sqlite": []}
        for run in range(args.runs):
            seconds = {
                "import": time_import(dump, os.path.join(root, f"import-{run}"), count),
                "put_many": time_put_many(chunks, os.path.join(root, f"put-{run}")),
                "sqlite": time_sqlite(rows, os.path.join(root, f"sqlite-{run}")),
            }
            for name, value in seconds.items():
                rates[name].append(count / value)
                shutil.rmtree(os.path.join(root, {"import": "import", "put_many": "put",
                                                  "sqlite": "sqlite"}[name] + f"-{run}"))
            print(f"run {run + 1}: import {rates['import'][-1] / 1e3:,.0f} K/s, put_many "
                  f"{rates['put_many'][-1] / 1e3:,.0f} K/s, SQLite {rates['sqlite'][-1] / 1e3:,.0f} K/s")
        to_put = [i / p for i, p in zip(rates["import"], rates["put_many"])]
        to_sqlite = [i / s for i, s in zip(rates["import"], rates["sqlite"])]
        imported = statistics.median(rates["import"])
        print()
        print("| metric | rate (median, min–max) | ratio | target | met |")
        print("|---|---|---|---|---|")
        print(f"| import from JSON Lines | {spread(rates['import'])} | | ≥ {TARGET // 1000} K/s | "
              f"{'yes' if imported >= TARGET else 'no'} |")
        print(f"| put_many of the same records | {spread(rates['put_many'])} | import / put_many "
              f"{statistics.median(to_put):.2f}× | | |")
        print(f"| SQLite executemany, WAL FULL | {spread(rates['sqlite'])} | import / SQLite "
              f"{statistics.median(to_sqlite):.2f}× | | |")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main_bench()
