"""B3 of BENCHMARKS.md: (subject, predicate) queries resolved by a lens, and the conflict scan, vs SQLite.

    PYTHONPATH=src python bench/bench_query.py [--records 1000000] [--runs 5]
        [--uniform 20000] [--hot 1000] [--json out.json] [--dir /tmp] [--keep]

The store holds the workload of bench/workload.py (assertions with one
signer each, batch-signed per agent with put_many + envelopes; 20 % votes;
32 epochs). SQLite holds the same assertions in one table keyed by ID with
an index on (subject, predicate) (BENCHMARKS.md), WAL mode, a 256 MiB page
cache and a memory map of the whole file (reads as cheap as SQLite gets).
Neither side's build is timed.

Query sets, drawn once per invocation with a fixed seed:
  uniform  (subject, predicate) pairs drawn uniformly among the stored pairs
           (most hold a handful of claims);
  empty    a stored subject with a predicate nobody used (no claim at all);
  hot      pairs drawn as the records are (Zipf-skewed subjects: most queries
           hit pairs with thousands of claims).
Before them, --runs times: a new process with an empty numba cache (a fresh
install) opens the store and times its first db.query (and, for information,
import + open).

Per query set, in each run (ours and SQLite alternate):
  SQLite plain      SELECT body ... WHERE subject=? AND predicate=? (fetchall)
  SQLite recency    ... ORDER BY ts DESC, id LIMIT 1
  SQLite consensus  ... GROUP BY object ORDER BY SUM(confidence) DESC,
                    MAX(ts) DESC LIMIT 1, then the winning claim's latest row
  ours              db.query(s, p, lens=...) one call each (winner decoded);
                    query_many (all pairs of the set in one call, winners
                    decoded, contributions on demand); query_encoded (one
                    call, winners returned encoded and checksum-checked, as
                    SQLite's rows are: what a server sends on).
Conflict scan: conflicts(top=100) (scores of every pair, sorted, 100 named)
vs the same in SQL (GROUP BY subject, predicate, object; entropy with ln();
ORDER BY score DESC LIMIT 100), and the full listings (fetchall / top=None).

Every figure is the median of --runs runs (min-max) after a warm-up; each
ratio is the median of the per-run ratios. Targets (per call, db.query with
the lens against SQLite's plain indexed query): existing pairs (uniform)
>= 3x, empty pairs >= 2x, hot pairs >= 10x; the first query on a fresh
install <= 50 ms; conflict scan >= 5x SQLite's GROUP BY. The batch forms
(query_many, query_encoded) are shown for information.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
from workload import chunks, generate  # noqa: E402

import stemedb  # noqa: E402
from stemedb import query as q  # noqa: E402

CHUNK = 50_000
PART = 1_000_000  # above this many records the workload is generated and loaded in parts
SQL_CONFLICTS = """
WITH g AS (SELECT subject, predicate, object, SUM(confidence) AS w
           FROM assertions GROUP BY subject, predicate, object),
     t AS (SELECT subject, predicate, SUM(w) AS tw, SUM(w > 0) AS k
           FROM g GROUP BY subject, predicate HAVING SUM(w > 0) > 1)
SELECT g.subject, g.predicate, -SUM((g.w / t.tw) * ln(g.w / t.tw)) / ln(t.k) AS score,
       COUNT(*) AS claims
FROM g JOIN t ON g.subject = t.subject AND g.predicate = t.predicate
WHERE g.w > 0
GROUP BY g.subject, g.predicate
ORDER BY score DESC
"""


def say(text: str) -> None:
    print(text, flush=True)


# ------------------------------------------------------------------- stores

def build_ours(path: str, parts: Iterable[Any]) -> None:
    """Load the workload's parts (epochs first, then each part's assertions and votes), not timed."""
    db = stemedb.open(path, durability="none")
    try:
        first = True
        for workload in parts:
            by_key = {a.public_key: a for a in workload.agents}
            if first:
                members, envelope = workload.agents[0].sign_batch(workload.epochs)
                db.put_many(members, envelope=envelope)
                first = False
            for records in (workload.assertions, workload.votes):
                for start in range(0, len(records), CHUNK):
                    groups: dict[bytes, list[Any]] = defaultdict(list)
                    for record in records[start:start + CHUNK]:
                        groups[record.signers[0]].append(record)
                    signed = [by_key[key].sign_batch(group) for key, group in groups.items()]
                    db.put_many([m for ms, _ in signed for m in ms], envelope=[e for _, e in signed])
        db.checkpoint()
    finally:
        db.close()


def workload_parts(records: int) -> Iterator[Any]:
    """The workload in parts: one generate() up to a million records, else 1 M chunks (fits in memory)."""
    if records <= PART:
        yield generate(records, signers=1)
    else:
        yield from chunks(records, PART, signers=1)


def object_text(value: Any) -> str:
    """A typed text form: equal claims, equal text (as the object key of our columns)."""
    if isinstance(value, stemedb.Ref):
        return "r:" + value.entity
    if isinstance(value, bool):
        return f"b:{int(value)}"
    if isinstance(value, float):
        return "n:" + value.hex()
    if isinstance(value, bytes):
        return "x:" + value.hex()
    return "t:" + value


def sqlite_open(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA cache_size=-262144")
    conn.execute("PRAGMA mmap_size=4294967296")
    return conn


def create_sqlite(path: str) -> sqlite3.Connection:
    conn = sqlite_open(path)
    conn.execute("CREATE TABLE assertions (id BLOB PRIMARY KEY, subject TEXT, predicate TEXT, "
                 "object TEXT, confidence REAL, ts INTEGER, source_class INTEGER, lifecycle INTEGER, "
                 "signer BLOB, body BLOB)")
    return conn


def fill_sqlite(conn: sqlite3.Connection, records: list[Any]) -> None:
    for start in range(0, len(records), CHUNK):
        part = records[start:start + CHUNK]
        blob, offsets, ids = stemedb.encode_many(part)
        view = memoryview(blob)
        rows = [(bytes(ids[i]), a.subject, a.predicate, object_text(a.object), a.confidence,
                 a.timestamp, int(a.source_class), int(a.lifecycle), a.signers[0],
                 bytes(view[offsets[i]:offsets[i + 1]])) for i, a in enumerate(part)]
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO assertions VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
        conn.execute("COMMIT")


def finish_sqlite(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE INDEX assertions_sp ON assertions (subject, predicate)")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("ANALYZE")
    conn.close()


# ------------------------------------------------------------------ queries

class QuerySets:
    """The query sets, drawn with a fixed seed while the workload's parts stream past."""

    def __init__(self, records: int, hot: int, seed: int = 7) -> None:
        self.rng = np.random.default_rng(seed)
        self.hot_at = np.sort(self.rng.integers(0, records, hot))  # record numbers the hot set draws
        self.pairs: set[tuple[str, str]] = set()
        self.hot: list[tuple[str, str]] = []
        self.seen = 0

    def add(self, records: list[Any]) -> None:
        self.pairs.update((a.subject, a.predicate) for a in records)
        end = self.seen + len(records)
        lo, hi = np.searchsorted(self.hot_at, [self.seen, end])
        self.hot += [(records[i - self.seen].subject, records[i - self.seen].predicate)
                     for i in self.hot_at[lo:hi]]
        self.seen = end

    def sets(self, uniform: int) -> dict[str, list[tuple[str, str]]]:
        pairs = sorted(self.pairs)
        subjects = sorted({subject for subject, _ in pairs})
        hot = list(self.hot)
        self.rng.shuffle(hot)  # in draw order, not record order
        return {
            "uniform": [pairs[i] for i in self.rng.integers(0, len(pairs), uniform)],
            # pairs with no claim at all: a known subject, a predicate nobody used
            "empty": [(subjects[i], "predicate_without_claims")
                      for i in self.rng.integers(0, len(subjects), uniform)],
            "hot": hot,
        }


# B3's targets for one db.query per call, against SQLite's plain indexed select of the same pair.
PER_CALL_TARGETS = {"uniform": 3, "empty": 2, "hot": 10}
FIRST_QUERY_TARGET_S = 0.050


def first_query_fresh(path: str, pair: tuple[str, str]) -> tuple[float, float]:
    """(import + open, first query) in a new process with an empty numba cache (a fresh install)."""
    code = ("import sys, time; t0 = time.perf_counter(); import stemedb; db = stemedb.open(sys.argv[1]); "
            "t1 = time.perf_counter(); db.query(sys.argv[2], sys.argv[3]); t2 = time.perf_counter(); "
            "print(t1 - t0, t2 - t1); db.close()")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        out = subprocess.run([sys.executable, "-c", code, path, *pair], env=env, check=True,
                             capture_output=True, text=True).stdout.split()
    return float(out[0]), float(out[1])


def sqlite_plain(conn: sqlite3.Connection, pairs: list[tuple[str, str]]) -> int:
    sql = "SELECT body FROM assertions WHERE subject = ? AND predicate = ?"
    return sum(len(conn.execute(sql, pair).fetchall()) for pair in pairs)


def sqlite_recency(conn: sqlite3.Connection, pairs: list[tuple[str, str]]) -> list[bytes | None]:
    sql = ("SELECT id, body FROM assertions WHERE subject = ? AND predicate = ? "
           "ORDER BY ts DESC, id LIMIT 1")
    out = []
    for pair in pairs:
        row = conn.execute(sql, pair).fetchone()
        out.append(row[0] if row else None)
    return out


def sqlite_consensus(conn: sqlite3.Connection, pairs: list[tuple[str, str]]) -> list[bytes | None]:
    group = ("SELECT object, SUM(confidence) AS w, MAX(ts) AS t, SUM(SUM(confidence)) OVER () "
             "FROM assertions WHERE subject = ? AND predicate = ? "
             "GROUP BY object ORDER BY w DESC, t DESC LIMIT 1")
    latest = ("SELECT id, body FROM assertions WHERE subject = ? AND predicate = ? AND object = ? "
              "ORDER BY ts DESC, id LIMIT 1")
    out = []
    for subject, predicate in pairs:
        best = conn.execute(group, (subject, predicate)).fetchone()
        if best is None:
            out.append(None)
            continue
        out.append(conn.execute(latest, (subject, predicate, best[0])).fetchone()[0])
    return out


def ours_single(db: Any, pairs: list[tuple[str, str]], lens: str) -> list[bytes | None]:
    out = []
    query = db.query   # what an embedding service calls (the compiled front, stemedb._single)
    for subject, predicate in pairs:
        winner = query(subject, predicate, lens=lens).winner
        out.append(winner.id if winner is not None else None)
    return out


def ours_many(db: Any, pairs: list[tuple[str, str]], lens: str) -> list[bytes | None]:
    return [r.winner.id if r.winner is not None else None for r in q.query_many(db, pairs, lens=lens)]


# ------------------------------------------------------------------ results

class Series:
    def __init__(self) -> None:
        self.values: list[float] = []

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def text(self, unit: str) -> str:
        if unit == "/s":
            return f"{human(self.median)} ({human(min(self.values))}-{human(max(self.values))})"
        return f"{self.median:.3g} ({min(self.values):.3g}-{max(self.values):.3g})"

    def as_dict(self) -> dict[str, Any]:
        return {"median": self.median, "min": min(self.values), "max": max(self.values),
                "runs": self.values}


def human(value: float) -> str:
    for div, suffix in ((1e6, " M"), (1e3, " K")):
        if value >= div:
            return f"{value / div:.3g}{suffix}"
    return f"{value:.3g}"


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


# -------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--uniform", type=int, default=20_000, help="queries in the uniform set")
    parser.add_argument("--hot", type=int, default=1_000, help="queries in the hot set")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--dir", default=None, help="where to build the stores (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the stores")
    args = parser.parse_args()

    base = tempfile.mkdtemp(prefix="stemedb-bench-query-", dir=args.dir)
    try:
        run(args, base)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            say(f"stores kept in {base}")


def run(args: argparse.Namespace, base: str) -> None:
    say(f"B3 query bench: {args.records:,} assertions, {args.runs} runs, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}")
    ours_path, sqlite_path = os.path.join(base, "ours"), os.path.join(base, "sqlite.db")
    started = time.perf_counter()
    conn = create_sqlite(sqlite_path)
    picked = QuerySets(args.records, args.hot)
    built = {"generate": 0.0, "sqlite": 0.0}

    def parts() -> Iterator[Any]:  # each part also goes to SQLite and the query sets
        clock = time.perf_counter()
        for workload in workload_parts(args.records):
            built["generate"] += time.perf_counter() - clock
            clock = time.perf_counter()
            fill_sqlite(conn, workload.assertions)
            picked.add(workload.assertions)
            built["sqlite"] += time.perf_counter() - clock
            yield workload
            clock = time.perf_counter()

    build_ours(ours_path, parts())
    clock = time.perf_counter()
    finish_sqlite(conn)
    built["sqlite"] += time.perf_counter() - clock
    total = time.perf_counter() - started
    say(f"  generated the workload in {built['generate']:.1f} s, built the SQLite table in "
        f"{built['sqlite']:.1f} s and our store in {total - built['generate'] - built['sqlite']:.1f} s "
        "(not timed)")
    sets = picked.sets(args.uniform)
    gc.collect()
    gc.freeze()

    fresh = Series()
    opened = Series()
    for _ in range(args.runs):
        open_s, first_s = first_query_fresh(ours_path, sets["uniform"][1])
        opened.add(open_s)
        fresh.add(first_s)
    say(f"  fresh process, empty numba cache: import + open {opened.median * 1e3:.0f} ms, "
        f"first query {fresh.median * 1e3:.0f} ms (median of {args.runs})")
    started = time.perf_counter()
    q.warm_up()
    warm = time.perf_counter() - started
    db = stemedb.open(ours_path)
    conn = sqlite_open(sqlite_path)
    extra: dict[str, Any] = {"jit_warm_up_s": warm}
    try:
        first, _ = timed(lambda: q.query(db, *sets["uniform"][0]))
        extra["first_query_s"] = first
        say(f"  JIT warm-up {warm:.2f} s; first query after open (builds the query index) {first * 1e3:.0f} ms")
        check_answers(db, conn, sets, extra)
        rows = [{"set": "fresh", "metric": "first query after open, new process, no JIT cache",
                 "unit": "s", "value": fresh.as_dict(), "text": fresh.text("s"),
                 "target": f"<= {FIRST_QUERY_TARGET_S * 1e3:.0f} ms",
                 "met": fresh.median <= FIRST_QUERY_TARGET_S},
                {"set": "fresh", "metric": "import stemedb + open (info)", "unit": "s",
                 "value": opened.as_dict(), "text": opened.text("s")}]
        rows += bench_queries(args, db, conn, sets)
        rows += bench_conflicts(args, db, conn)
    finally:
        conn.close()
        db.close()
    print_table(rows)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"records": args.records, "runs": args.runs, "rows": rows, "extra": extra},
                      handle, indent=1)


def check_answers(db: Any, conn: sqlite3.Connection, sets: dict[str, list[tuple[str, str]]],
                  extra: dict[str, Any]) -> None:
    """Not timed: both sides answer the same question (winners compared on a sample)."""
    sample = sets["uniform"][:2000] + sets["hot"][:200]
    recency = sum(a == b for a, b in zip(ours_many(db, sample, "recency"), sqlite_recency(conn, sample)))
    encoded = q.query_encoded(db, sample, lens="recency")
    assert [bytes(i) if f else None for i, f in zip(encoded.winner_ids, encoded.found)] == \
        ours_many(db, sample, "recency"), "query_encoded and query_many disagree"
    consensus = sum(a == b for a, b in zip(ours_many(db, sample, "consensus"),
                                           sqlite_consensus(conn, sample)))
    extra["same_winner"] = {"recency": recency / len(sample), "consensus": consensus / len(sample)}
    say(f"  same winner as SQLite on {len(sample)} pairs: Recency {recency / len(sample):.1%}, "
        f"Consensus {consensus / len(sample):.1%} (float sums vs our exact fixed-point sums can "
        "break near-ties differently)")


def bench_queries(args: argparse.Namespace, db: Any, conn: sqlite3.Connection,
                  sets: dict[str, list[tuple[str, str]]]) -> list[dict[str, Any]]:
    rows = []
    for name, pairs in sets.items():
        say(f"  {name} set: {len(pairs):,} queries, mean {sqlite_plain(conn, pairs[:500]) / min(500, len(pairs)):.0f} "
            "rows per pair (first 500)")
        workloads: dict[str, Callable[[list[tuple[str, str]]], Any]] = {
            "SQLite plain": lambda some: sqlite_plain(conn, some),
            "SQLite recency": lambda some: sqlite_recency(conn, some),
            "SQLite consensus": lambda some: sqlite_consensus(conn, some),
            "ours recency": lambda some: ours_single(db, some, "recency"),
            "ours consensus": lambda some: ours_single(db, some, "consensus"),
            "ours recency, query_many": lambda some: ours_many(db, some, "recency"),
            "ours consensus, query_many": lambda some: ours_many(db, some, "consensus"),
            "ours recency, query_encoded": lambda some: q.query_encoded(db, some, lens="recency"),
            "ours consensus, query_encoded": lambda some: q.query_encoded(db, some, lens="consensus"),
        }
        for function in workloads.values():  # warm-up: a tenth of the set each
            function(pairs[: max(1, len(pairs) // 10)])
        rates = {label: Series() for label in workloads}
        for index in range(args.runs):
            for label, function in workloads.items():
                seconds, _ = timed(lambda function=function, pairs=pairs: function(pairs))
                rates[label].add(len(pairs) / seconds)
            say(f"    run {index + 1}: " + ", ".join(f"{label} {human(rates[label].values[-1])}/s"
                                                      for label in workloads))
        plain = rates["SQLite plain"]
        for label, series in rates.items():
            row: dict[str, Any] = {"set": name, "metric": label, "unit": "queries/s",
                                   "value": series.as_dict(), "text": series.text("/s")}
            if label.startswith("ours"):
                lens = "recency" if "recency" in label else "consensus"
                row["vs_plain"] = ratio(series, plain)
                row["vs_same_sql"] = ratio(series, rates[f"SQLite {lens}"])
                if label in ("ours recency", "ours consensus"):   # the targets are per call
                    row["target"] = f">= {PER_CALL_TARGETS[name]}x SQLite plain"
                    row["met"] = row["vs_plain"]["median"] >= PER_CALL_TARGETS[name]
            rows.append(row)
    return rows


def ratio(ours: Series, peer: Series) -> dict[str, Any]:
    values = [a / b for a, b in zip(ours.values, peer.values)]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def bench_conflicts(args: argparse.Namespace, db: Any, conn: sqlite3.Connection) -> list[dict[str, Any]]:
    workloads: dict[str, Callable[[], Any]] = {
        "SQLite GROUP BY, top 100": lambda: conn.execute(SQL_CONFLICTS + " LIMIT 100").fetchall(),
        "ours conflicts(top=100)": lambda: q.conflicts(db, top=100),
        "SQLite GROUP BY, all": lambda: conn.execute(SQL_CONFLICTS).fetchall(),
        "ours conflicts(), all": lambda: q.conflicts(db),
    }
    ours_top, sql_top = q.conflicts(db, top=100), conn.execute(SQL_CONFLICTS + " LIMIT 100").fetchall()
    say(f"  conflict scan: {len(q.conflicts(db)):,} contested pairs; top score ours "
        f"{ours_top[0].conflict_score:.6f} / SQLite {sql_top[0][2]:.6f}")
    times = {label: Series() for label in workloads}
    for index in range(args.runs):
        for label, function in workloads.items():
            seconds, _ = timed(function)
            times[label].add(seconds)
        say(f"    run {index + 1}: " + ", ".join(f"{label} {times[label].values[-1]:.3f} s"
                                                  for label in workloads))
    rows = []
    for label, series in times.items():
        row: dict[str, Any] = {"set": "whole store", "metric": label, "unit": "s",
                               "value": series.as_dict(), "text": series.text("s")}
        if label.startswith("ours"):
            peer = times["SQLite GROUP BY, top 100" if "top" in label else "SQLite GROUP BY, all"]
            speedups = [p / o for o, p in zip(series.values, peer.values)]
            row["vs_sql"] = {"median": statistics.median(speedups), "min": min(speedups),
                             "max": max(speedups)}
            row["target"] = ">= 5x SQLite GROUP BY"
            row["met"] = row["vs_sql"]["median"] >= 5
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    say("")
    say(f"{'set':12s} {'metric':32s} {'ours / peer (median, min-max)':36s} ratio        target")
    for row in rows:
        verdict = ("   " + ("met" if row["met"] else "MISSED") + f" ({row['target']})") if "met" in row else ""
        if "vs_plain" in row:
            r, s = row["vs_plain"], row["vs_same_sql"]
            extra = (f"{r['median']:.1f}x plain ({r['min']:.1f}-{r['max']:.1f}); "
                     f"{s['median']:.1f}x same SQL{verdict}")
        elif "met" in row and "vs_sql" not in row:
            extra = verdict.strip()
        elif "vs_sql" in row:
            r = row["vs_sql"]
            extra = f"{r['median']:.1f}x ({r['min']:.1f}-{r['max']:.1f})   {'met' if row['met'] else 'MISSED'}"
        else:
            extra = ""
        unit = "/s" if row["unit"] == "queries/s" else " s"
        say(f"{row['set']:12s} {row['metric']:32s} {row['text'] + unit:36s} {extra}")


if __name__ == "__main__":
    main()
