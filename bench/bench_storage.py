"""Storage engine end to end: B1, B1s, B2, B4, B4s, B6, B8 of BENCHMARKS.md against SQLite and LMDB.

    PYTHONPATH=src python bench/bench_storage.py [--records 1000000] [--runs 5]
        [--only B1,B1s,B2,B4,B4s,B6,B8] [--json out.json] [--dir /tmp]

Every figure is the median of --runs runs (min-max) after a warm-up; ours and
the peers run alternately inside each run, and each ratio is the median of the
per-run ratios (ours / peer of the same run). Everything written is durable:
ours with durability="sync", SQLite in WAL mode with synchronous=FULL, LMDB
with sync at commit. Stores are created under a temporary directory (in --dir,
default /tmp) that is removed at the end unless --keep is given.

Workloads (the shape of bench/workload.py; records with one signer):
  B1   bulk ingest of batch-signed records: put_many(members, envelope=env) in
       chunks of --chunk records (signed beforehand: signing is the client's
       cost), vs SQLite executemany and LMDB putmulti, one transaction per chunk.
  B1s  bulk ingest of individually signed records through put_many (every
       signature verified), vs one core's PyNaCl verify rate (crypto_sign_open).
  B2   point get, one call each: db.get (decoded) and db.get_encoded (raw)
       (raw bytes) vs LMDB txn.get and SQLite SELECT by ID; batched:
       db.get_encoded_many(numpy ids) (raw) and db.get_many (decoded).
  B4   --threads threads, one unsigned record per call through one shared
       db.writer(signer) (group commit, acked = fsynced), for --duration s,
       vs SQLite single-row commits (one connection behind a lock: best of the
       modes we tried) and LMDB one put + commit per call.
  B4s  the same with individually signed records via db.put(record), vs the
       two-thread PyNaCl verify rate.
  B6   open after close (snapshot), open after kill -9 (tail replay), and open
       with no snapshot (full replay); below 10 M records also a linear
       extrapolation to 10 M, at 10 M the targets apply to the measured opens.
  B8   index memory per record: db.stats()["index_bytes"] and the RssAnon
       growth of opening the store in a fresh process.

The records are generated chunk by chunk (bench/workload.py chunks()) and kept
encoded, about 200 B each, so --records 10000000 fits in this machine's memory;
only the first 500 K are also kept as objects (B1s, B4). Up to 2 M records
B1's inputs are decoded once before the runs; above, each chunk is decoded
just before its call and only the engines' calls are timed (ours, SQLite and
LMDB alike). B2's batched reads ask for at most 2 M random IDs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import lmdb  # noqa: E402
import nacl.bindings  # noqa: E402
import numpy as np  # noqa: E402
from workload import agent_signers, generate  # noqa: E402
from workload import chunks as workload_chunks  # noqa: E402

import stemedb  # noqa: E402

ALL = ("B1", "B1s", "B2", "B4", "B4s", "B6", "B8")
SCALE_RUN = 10_000_000
OBJECTS = 500_000          # records also kept as objects (B1s signs, B4 writes from them)
MATERIALIZE = 2_000_000    # up to this many records B1's inputs are decoded once, ahead of the runs
BATCH_IDS = 2_000_000      # B2's batched reads ask for at most this many IDs (a random sample)


@dataclass
class Batch:
    """One chunk of B1 input, kept encoded: canonical bytes of the members, their IDs, the envelope."""
    blob: bytes
    offsets: np.ndarray
    ids: np.ndarray
    envelope: Any
    subjects: list[str]
    predicates: list[str]

    def members(self) -> list[Any]:
        return stemedb.decode_many(self.blob, self.offsets)

    def rows(self) -> list[tuple[bytes, str, str, bytes]]:
        view, offsets, ids = memoryview(self.blob), self.offsets, self.ids
        return [(bytes(ids[i]), s, p, bytes(view[offsets[i]:offsets[i + 1]]))
                for i, (s, p) in enumerate(zip(self.subjects, self.predicates))]


# --------------------------------------------------------------------- results

@dataclass
class Stat:
    values: list[float]

    @property
    def med(self) -> float:
        return statistics.median(self.values)

    @property
    def lo(self) -> float:
        return min(self.values)

    @property
    def hi(self) -> float:
        return max(self.values)

    def as_dict(self) -> dict[str, Any]:
        return {"median": self.med, "min": self.lo, "max": self.hi, "runs": self.values}


@dataclass
class Row:
    bench: str
    metric: str
    unit: str                      # "/s", "ms", "s", "B/rec", "x"
    ours: Stat
    peer: str | None = None
    peer_stat: Stat | None = None
    ratio: Stat | None = None
    target: str = ""
    met: bool | None = None        # None: no target on this row
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "bench": self.bench, "metric": self.metric, "unit": self.unit,
            "ours": self.ours.as_dict(), "peer": self.peer,
            "peer_value": self.peer_stat.as_dict() if self.peer_stat else None,
            "ratio": self.ratio.as_dict() if self.ratio else None,
            "target": self.target, "met": self.met, "note": self.note,
        }


def human(value: float, unit: str) -> str:
    if unit == "/s":
        for div, suffix in ((1e6, " M"), (1e3, " K")):
            if value >= div:
                return f"{value / div:.3g}{suffix}"
        return f"{value:.3g}"
    if unit == "ms":
        return f"{value:.3g} ms"
    if unit == "s":
        return f"{value:.3g} s"
    if unit == "B/rec":
        return f"{value:.1f} B"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "count":
        return f"{value:,.0f}"
    return f"{value:.3g}"


def span(stat: Stat | None, unit: str) -> str:
    if stat is None:
        return ""
    if len(stat.values) == 1:
        return human(stat.med, unit)
    return f"{human(stat.med, unit)} ({human(stat.lo, unit)}–{human(stat.hi, unit)})"


def ratio_row(bench: str, metric: str, ours: list[float], peer: str, theirs: list[float],
              minimum: float | None, unit: str = "/s", note: str = "") -> Row:
    ratios = [o / t for o, t in zip(ours, theirs)]
    r = Stat(ratios)
    met = None if minimum is None else r.med >= minimum
    target = "" if minimum is None else f"≥ {minimum:g}x {peer.split(' ')[0]}"
    return Row(bench, metric, unit, Stat(ours), peer, Stat(theirs), r, target, met, note)


def abs_row(bench: str, metric: str, ours: list[float], unit: str, bound: float | None,
            at_most: bool = False, note: str = "", target: str | None = None) -> Row:
    s = Stat(ours)
    met = None
    text = ""
    if bound is not None:
        met = s.med <= bound if at_most else s.med >= bound
        text = target or f"{'≤' if at_most else '≥'} {human(bound, unit)}{'/s' if unit == '/s' else ''}"
    return Row(bench, metric, unit, s, target=text, met=met, note=note)


HEADER = (f"{'#':4} {'metric':34} {'ours, median (min–max)':30} {'peer':24} "
          f"{'peer, median (min–max)':28} {'ratio (min–max)':22} {'target':16} met")


def format_row(row: Row) -> str:
    unit = row.unit
    ratio = span(row.ratio, "x")
    met = {True: "yes", False: "NO", None: ""}[row.met]
    line = (f"{row.bench:4} {row.metric:34} {span(row.ours, unit):30} {row.peer or '':24} "
            f"{span(row.peer_stat, unit):28} {ratio:22} {row.target:16} {met}")
    if row.note:
        line += f"   [{row.note}]"
    return line


def markdown(rows: list[Row]) -> str:
    out = ["| # | metric | ours, median (min–max) | peer | peer, median (min–max) | ratio (min–max) | target | met |",
           "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        met = {True: "yes", False: "**no**", None: ""}[row.met]
        metric = row.metric + (f" ({row.note})" if row.note else "")
        out.append(f"| {row.bench} | {metric} | {span(row.ours, row.unit)} | {row.peer or ''} | "
                   f"{span(row.peer_stat, row.unit)} | {span(row.ratio, 'x')} | {row.target} | {met} |")
    return "\n".join(out)


def say(*parts: Any) -> None:
    print(*parts, flush=True)


# ------------------------------------------------------------------------ data

class Context:
    """Lazily built data and stores shared by the workloads of one invocation."""

    def __init__(self, args: argparse.Namespace, base: str) -> None:
        self.args = args
        self.base = base
        self.n = args.records
        self._cache: dict[str, Any] = {}
        self.extra: dict[str, Any] = {}
        self.warnings: list[str] = []

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        say(f"  WARNING: {text}")

    def cached(self, name: str, build: Callable[[], Any]) -> Any:
        if name not in self._cache:
            self._cache[name] = build()
        return self._cache[name]

    def path(self, *parts: str) -> str:
        return os.path.join(self.base, *parts)

    @property
    def agents(self) -> list[stemedb.Signer]:
        return self.cached("agents", agent_signers)

    def _generate(self) -> None:
        """Generate the N records chunk by chunk, batch-sign each chunk and keep it encoded (not timed).

        A chunk of --chunk records is signed by one agent (put_many with its
        envelope is B1's call). Only the encoded bytes are kept, about 200 B a
        record, so 10 M records fit in memory where 10 M record objects did
        not; the first OBJECTS records are also kept as objects (B1s, B4).
        """
        started = time.perf_counter()
        signing = 0.0
        batches: list[Batch] = []
        one_signer: list[Any] = []
        plain: list[Any] = []
        for k, part in enumerate(workload_chunks(self.n, self.args.chunk, votes=False, signers=1)):
            records = part.assertions
            members = [r._with_proof((), (), None) for r in records]
            if len(plain) < OBJECTS:
                one_signer.extend(records[: OBJECTS - len(one_signer)])
                plain.extend(members[: OBJECTS - len(plain)])
            t = time.perf_counter()
            members, envelope = self.agents[k % len(self.agents)].sign_batch(members)
            signing += time.perf_counter() - t
            blob, offsets, ids = stemedb.encode_many(members)
            batches.append(Batch(bytes(blob), np.asarray(offsets), np.asarray(ids), envelope,
                                 [m.subject for m in members], [m.predicate for m in members]))
        self._cache.update(batches=batches, one_signer=one_signer, plain=plain)
        self.extra["batch_sign_per_s"] = self.n / signing
        say(f"  generated and batch-signed {self.n:,} assertions in {len(batches)} envelopes in "
            f"{time.perf_counter() - started:.1f} s (signing {self.n / signing / 1e3:.0f} K/s, "
            "client side, not timed)")

    @property
    def batches(self) -> list[Batch]:
        if "batches" not in self._cache:
            self._generate()
        return self._cache["batches"]

    @property
    def plain(self) -> list[Any]:
        """The first OBJECTS unsigned assertions as objects (declaring no signer: any signer can batch-sign them)."""
        self.batches  # noqa: B018 - generates them
        return self._cache["plain"]

    def materialize(self) -> bool:
        """Whether the B1 inputs are decoded once and kept (up to MATERIALIZE records) or per chunk."""
        return self.n <= MATERIALIZE

    def chunks(self) -> Iterable[tuple[list[Any], Any]]:
        """B1 input for ours: (members, envelope) per chunk.

        Up to MATERIALIZE records they are decoded once and kept, so the timed
        loop runs back to back; above, each chunk is decoded just before its
        put_many and only the put_many calls are timed.
        """
        if self.materialize():
            return self.cached("chunks", lambda: [(b.members(), b.envelope) for b in self.batches])
        return ((b.members(), b.envelope) for b in self.batches)

    def peer_chunks(self) -> Iterable[list[tuple[bytes, str, str, bytes]]]:
        """The same members as (id, subject, predicate, canonical bytes) per chunk, for the peers."""
        if self.materialize():
            return self.cached("peer_chunks", lambda: [b.rows() for b in self.batches])
        return (b.rows() for b in self.batches)

    @property
    def signed(self) -> list[Any]:
        """--signed records, each signed individually by its one declared signer."""
        def build() -> list[Any]:
            self.plain  # noqa: B018 - builds one_signer
            count = min(len(self._cache["one_signer"]), self.args.signed)
            by_key = {a.public_key: a for a in self.agents}
            started = time.perf_counter()
            out = [r.sign(by_key[r.signers[0]]) for r in self._cache["one_signer"][:count]]
            seconds = time.perf_counter() - started
            say(f"  signed {count:,} records one by one in {seconds:.1f} s "
                f"({count / seconds / 1e3:.1f} K/s, client side, not timed)")
            return out
        return self.cached("signed", build)

    @property
    def verify_pairs(self) -> list[tuple[bytes, bytes]]:
        """(signature + message, key) of the signed records, for the PyNaCl baseline."""
        return self.cached("verify_pairs", lambda: [
            (r._signature_entries[0][1] + r.id, r.signers[0]) for r in self.signed])

    @property
    def plain_rows(self) -> list[tuple[bytes, str, str, bytes]]:
        """(id, subject, predicate, canonical bytes) of the plain records, for B4's peers."""
        def build() -> list[tuple[bytes, str, str, bytes]]:
            records = self.plain[:300_000]
            blob, offsets, ids = stemedb.encode_many(records)
            view = memoryview(blob)
            return [(bytes(ids[i]), r.subject, r.predicate, bytes(view[offsets[i]:offsets[i + 1]]))
                    for i, r in enumerate(records)]
        return self.cached("plain_rows", build)

    # -- the stores of --records records kept for B2 / B6 / B8

    def main_store(self, engine: str) -> str:
        key = f"store.{engine}"
        if key not in self._cache:
            path = self.path("main", engine)
            say(f"  building the {engine} store of {self.n:,} records (not timed) …")
            shutil.rmtree(path, ignore_errors=True)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            INGEST[engine](self, path)
            self._cache[key] = path
        return self._cache[key]

    def keep_store(self, engine: str, path: str) -> None:
        """Adopt `path` (a store of all N records) as the main store of `engine`."""
        final = self.path("main", engine)
        shutil.rmtree(final, ignore_errors=True)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.rename(path, final)
        self._cache[f"store.{engine}"] = final


# ------------------------------------------------------------------ the peers

def sqlite_connect(path: str, *, same_thread: bool = True) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=60, check_same_thread=same_thread)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS records "
                 "(id BLOB PRIMARY KEY, subject TEXT, predicate TEXT, body BLOB)")
    conn.execute("CREATE INDEX IF NOT EXISTS records_sp ON records (subject, predicate)")
    return conn


def lmdb_open(path: str, records: int) -> lmdb.Environment:
    # sync=True, metasync=True (the defaults): a commit returns after fsync.
    return lmdb.open(path, map_size=max(1 << 30, records * 2048), subdir=True, sync=True,
                     metasync=True, max_spare_txns=64)


def ingest_ours(ctx: Context, path: str, chunks: Iterable[tuple[list[Any], Any]] | None = None) -> float:
    """Seconds spent in put_many (one call per chunk) loading `chunks` into a new store."""
    db = stemedb.open(path, durability="sync")
    try:
        seconds, expected = 0.0, 0
        put_many, clock = db.put_many, time.perf_counter
        for members, envelope in ctx.chunks() if chunks is None else chunks:
            started = clock()
            put_many(members, envelope=envelope)
            seconds += clock() - started
            expected += len(members) + 1
        if len(db) != expected:
            ctx.warn(f"B1 ours: store holds {len(db)} records after ingest, expected {expected}")
    finally:
        db.close()
    return seconds


def ingest_sqlite(ctx: Context, path: str, chunks: Iterable[list[tuple]] | None = None) -> float:
    """Seconds spent in the transactions (one executemany per chunk)."""
    os.makedirs(path, exist_ok=True)
    conn = sqlite_connect(os.path.join(path, "db.sqlite"))
    try:
        seconds, execute, clock = 0.0, conn.execute, time.perf_counter
        for rows in ctx.peer_chunks() if chunks is None else chunks:
            started = clock()
            execute("BEGIN")
            conn.executemany("INSERT INTO records VALUES (?, ?, ?, ?)", rows)
            execute("COMMIT")
            seconds += clock() - started
        return seconds
    finally:
        conn.close()


def ingest_lmdb(ctx: Context, path: str, chunks: Iterable[list[tuple]] | None = None) -> float:
    """Seconds spent in the write transactions (one putmulti per chunk)."""
    env = lmdb_open(path, ctx.n)
    try:
        seconds, clock = 0.0, time.perf_counter
        for rows in ctx.peer_chunks() if chunks is None else chunks:
            pairs = [(row[0], row[3]) for row in rows]
            started = clock()
            with env.begin(write=True) as txn:
                txn.cursor().putmulti(pairs)
            seconds += clock() - started
        return seconds
    finally:
        env.close()


INGEST = {"ours": ingest_ours, "sqlite": ingest_sqlite, "lmdb": ingest_lmdb}


# ------------------------------------------------------------------ workloads

def bench_b1(ctx: Context) -> list[Row]:
    n = ctx.n
    first = ctx.batches[0]
    if ctx.materialize():
        ctx.chunks(), ctx.peer_chunks()  # decoded once, before any run
    say("  warm-up (one chunk each) …")
    for engine, data in (("ours", [(first.members(), first.envelope)]), ("sqlite", [first.rows()]),
                         ("lmdb", [first.rows()])):
        warm = ctx.path("warm", engine)
        INGEST[engine](ctx, warm, data)
        shutil.rmtree(warm)
    rates: dict[str, list[float]] = {"ours": [], "sqlite": [], "lmdb": []}
    for run in range(ctx.args.runs):
        for engine in rates:
            path = ctx.path(f"b1-{run}", engine)
            seconds = INGEST[engine](ctx, path)
            rates[engine].append(n / seconds)
            if run == ctx.args.runs - 1:
                ctx.keep_store(engine, path)
            else:
                shutil.rmtree(path)
        say(f"  run {run + 1}: ours {rates['ours'][-1] / 1e3:.0f} K/s, SQLite "
            f"{rates['sqlite'][-1] / 1e3:.0f} K/s, LMDB {rates['lmdb'][-1] / 1e3:.0f} K/s")
    chunk = f"chunks of {ctx.args.chunk // 1000} K" + ("" if ctx.materialize() else ", decoded between calls")
    return [
        abs_row("B1", "bulk ingest, batch-signed", rates["ours"], "/s", 1e6, note=chunk),
        ratio_row("B1", "  vs SQLite executemany", rates["ours"], "SQLite WAL FULL", rates["sqlite"], 10),
        ratio_row("B1", "  vs LMDB putmulti", rates["ours"], "LMDB sync", rates["lmdb"], 1.5),
    ]


def verify_rate(pairs: list[tuple[bytes, bytes]], threads: int) -> float:
    """Ed25519 verifications per second with PyNaCl on `threads` threads (no GIL held in C)."""
    open_ = nacl.bindings.crypto_sign_open
    parts = [pairs[i::threads] for i in range(threads)]
    barrier = threading.Barrier(threads + 1)

    def work(part: list[tuple[bytes, bytes]]) -> None:
        barrier.wait()
        for sm, key in part:
            open_(sm, key)

    workers = [threading.Thread(target=work, args=(p,)) for p in parts]
    for w in workers:
        w.start()
    barrier.wait()
    started = time.perf_counter()
    for w in workers:
        w.join()
    return len(pairs) / (time.perf_counter() - started)


def bench_b1s(ctx: Context) -> list[Row]:
    signed = ctx.signed
    pairs = ctx.verify_pairs[: ctx.args.verify_sample]
    size = ctx.args.chunk

    def ours(path: str) -> float:
        db = stemedb.open(path, durability="sync")
        try:
            started = time.perf_counter()
            for start in range(0, len(signed), size):
                db.put_many(signed[start:start + size])
            seconds = time.perf_counter() - started
            if len(db) != len(signed):
                ctx.warn(f"B1s: store holds {len(db)} records, expected {len(signed)}")
        finally:
            db.close()
        shutil.rmtree(path)
        return len(signed) / seconds

    say("  warm-up …")
    verify_rate(pairs[:2000], 1)
    ours(ctx.path("b1s-warm"))
    rates, one_core, two_threads = [], [], []
    for run in range(ctx.args.runs):
        rates.append(ours(ctx.path(f"b1s-{run}")))
        one_core.append(verify_rate(pairs, 1))
        two_threads.append(verify_rate(pairs, 2))
        say(f"  run {run + 1}: ours {rates[-1] / 1e3:.1f} K/s, verify 1 core {one_core[-1] / 1e3:.1f} K/s, "
            f"2 threads {two_threads[-1] / 1e3:.1f} K/s")
    ctx.extra["verify_two_threads"] = two_threads
    note = f"{len(signed) // 1000} K records, 1 signature each"
    return [
        ratio_row("B1s", "bulk ingest, individually signed", rates, "Ed25519 verify, 1 core",
                  one_core, 1.8, note=note),
        ratio_row("B1s", "  (vs 2-thread verify, info)", rates, "Ed25519 verify, 2 thr",
                  two_threads, None),
    ]


def bench_b2(ctx: Context) -> list[Row]:
    ours_path = ctx.main_store("ours")
    sqlite_path = os.path.join(ctx.main_store("sqlite"), "db.sqlite")
    lmdb_path = ctx.main_store("lmdb")
    every_id = np.concatenate([b.ids for b in ctx.batches])
    order = np.random.default_rng(7).permutation(len(every_id))
    all_array = np.ascontiguousarray(every_id[order[:BATCH_IDS]])  # random IDs for the batch reads
    sample = [bytes(row) for row in every_id[order[-min(len(order), ctx.args.gets):]]]
    everything = [bytes(row) for row in all_array]
    decoded_sample = all_array[: min(len(everything), 200_000)]
    del every_id, order

    db = stemedb.open(ours_path, durability="sync")
    env = lmdb_open(lmdb_path, ctx.n)
    conn = sqlite3.connect(sqlite_path)
    try:
        # correctness spot check: the raw bytes are the record's canonical encoding
        blob, offsets, rows = db.get_encoded_many(all_array[:1000])
        with env.begin() as txn:
            for i in range(0, 1000, 97):
                if bytes(blob[offsets[i]:offsets[i + 1]]) != txn.get(bytes(all_array[i])):
                    ctx.warn(f"B2: get_encoded_many bytes of record {i} differ from the stored bytes")
        if (rows < 0).any():
            ctx.warn("B2: get_encoded_many did not find stored IDs")

        def ours_get() -> float:
            get = db.get
            started = time.perf_counter()
            for key in sample:
                get(key)
            return len(sample) / (time.perf_counter() - started)

        def ours_raw() -> float:
            get = db.get_encoded
            started = time.perf_counter()
            for key in sample:
                get(key)
            return len(sample) / (time.perf_counter() - started)

        def lmdb_get() -> float:
            with env.begin() as txn:
                get = txn.get
                started = time.perf_counter()
                for key in sample:
                    get(key)
                return len(sample) / (time.perf_counter() - started)

        def sqlite_get() -> float:
            execute = conn.execute
            query = "SELECT body FROM records WHERE id = ?"
            started = time.perf_counter()
            for key in sample:
                execute(query, (key,)).fetchone()
            return len(sample) / (time.perf_counter() - started)

        def ours_batch() -> float:
            started = time.perf_counter()
            db.get_encoded_many(all_array)
            return len(all_array) / (time.perf_counter() - started)

        def ours_batch_decoded() -> float:
            started = time.perf_counter()
            db.get_many(decoded_sample)
            return len(decoded_sample) / (time.perf_counter() - started)

        def lmdb_batch() -> float:
            with env.begin() as txn:
                started = time.perf_counter()
                txn.cursor().getmulti(everything)
                return len(everything) / (time.perf_counter() - started)

        fns = {"get": ours_get, "raw": ours_raw, "lmdb": lmdb_get, "sqlite": sqlite_get,
               "batch": ours_batch, "batch_decoded": ours_batch_decoded, "lmdb_batch": lmdb_batch}
        say("  warm-up …")
        for fn in fns.values():
            fn()
        rates: dict[str, list[float]] = {k: [] for k in fns}
        for run in range(ctx.args.runs):
            for name, fn in fns.items():
                rates[name].append(fn())
            say(f"  run {run + 1}: " + ", ".join(f"{k} {v[-1] / 1e3:.0f} K/s" for k, v in rates.items()))
    finally:
        db.close()
        env.close()
        conn.close()
    return [
        ratio_row("B2", "get, one call each (decoded)", rates["get"], "LMDB txn.get", rates["lmdb"], 1),
        ratio_row("B2", "  vs SQLite SELECT by id", rates["get"], "SQLite SELECT", rates["sqlite"], None),
        ratio_row("B2", "get_encoded, one call each (raw)", rates["raw"], "LMDB txn.get", rates["lmdb"], 2),
        abs_row("B2", "get_encoded_many(numpy ids) batch", rates["batch"], "/s", 5e6,
                note=f"{len(all_array) // 1000} K ids"),
        ratio_row("B2", "  vs LMDB getmulti (info)", rates["batch"], "LMDB getmulti",
                  rates["lmdb_batch"], None),
        abs_row("B2", "get_many(numpy ids) batch, decoded", rates["batch_decoded"], "/s", None,
                note=f"{len(decoded_sample) // 1000} K ids"),
    ]


def hammer(threads: int, duration: float, work: list[list[Any]],
           call: Callable[[Any], Any]) -> tuple[float, float, float, int]:
    """`threads` threads call `call(item)` over their share until the deadline; (acked/s, p50 ms, p99 ms, n)."""
    barrier = threading.Barrier(threads + 1)
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []
    deadline = [0.0]

    def worker(k: int) -> None:
        mine = latencies[k]
        clock = time.perf_counter
        barrier.wait()
        stop = deadline[0]
        try:
            for item in work[k]:
                started = clock()
                if started >= stop:
                    break
                call(item)
                mine.append(clock() - started)
        except BaseException as exc:  # reported, not swallowed
            errors.append(exc)

    workers = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    deadline[0] = time.perf_counter() + duration
    started = time.perf_counter()
    barrier.wait()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    flat = np.concatenate([np.asarray(x) for x in latencies if x]) if any(latencies) else np.zeros(1)
    p50, p99 = np.percentile(flat, [50, 99]) * 1000
    return len(flat) / elapsed, float(p50), float(p99), len(flat)


def split(items: list[Any], parts: int) -> list[list[Any]]:
    return [items[k::parts] for k in range(parts)]


def peer_single_commits(ctx: Context, engine: str, path: str, rows: list[list[tuple]],
                        duration: float) -> tuple[float, float, float, int]:
    threads = ctx.args.threads
    if engine == "sqlite":
        os.makedirs(path, exist_ok=True)
        file = os.path.join(path, "db.sqlite")
        if ctx.args.sqlite_b4 == "lock":
            conn = sqlite_connect(file, same_thread=False)
            lock = threading.Lock()

            def call(row: tuple) -> None:
                with lock:
                    conn.execute("INSERT INTO records VALUES (?, ?, ?, ?)", row)
            try:
                return hammer(threads, duration, rows, call)
            finally:
                conn.close()
        sqlite_connect(file).close()
        local = threading.local()

        def call(row: tuple) -> None:
            conn = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = sqlite_connect(file)
            conn.execute("INSERT INTO records VALUES (?, ?, ?, ?)", row)
        return hammer(threads, duration, rows, call)
    env = lmdb_open(path, 1 << 19)

    def put(row: tuple) -> None:
        with env.begin(write=True) as txn:
            txn.put(row[0], row[3])
    try:
        return hammer(threads, duration, rows, put)
    finally:
        env.close()


def bench_b4(ctx: Context) -> list[Row]:
    threads, duration = ctx.args.threads, ctx.args.duration
    plain = ctx.plain
    work = split(plain, threads)
    peer_work = split(ctx.plain_rows, threads)
    signer = ctx.agents[0]

    def ours(path: str, seconds: float) -> tuple[float, float, float, int]:
        db = stemedb.open(path, durability="sync")
        try:
            writer = db.writer(signer)
            result = hammer(threads, seconds, work, writer.put)
            stats = db.stats()
            ctx.extra.setdefault("b4_writes", []).append(stats["writes"])
            stored = stats["by_kind"]["assertion"]
            if stored != result[3]:
                ctx.warn(f"B4: {result[3]} puts acked but {stored} records stored")
        finally:
            db.close()
        shutil.rmtree(path)
        return result

    say("  warm-up …")
    ours(ctx.path("b4-warm"), 0.3)
    for engine in ("sqlite", "lmdb"):
        peer_single_commits(ctx, engine, ctx.path("b4-warm-" + engine), peer_work, 0.3)
        shutil.rmtree(ctx.path("b4-warm-" + engine))
    res: dict[str, list[tuple[float, float, float, int]]] = {"ours": [], "sqlite": [], "lmdb": []}
    for run in range(ctx.args.runs):
        res["ours"].append(ours(ctx.path(f"b4-{run}"), duration))
        for engine in ("sqlite", "lmdb"):
            path = ctx.path(f"b4-{run}-{engine}")
            res[engine].append(peer_single_commits(ctx, engine, path, peer_work, duration))
            shutil.rmtree(path)
        say(f"  run {run + 1}: " + ", ".join(
            f"{k} {v[-1][0] / 1e3:.1f} K/s p50 {v[-1][1]:.2f} ms p99 {v[-1][2]:.1f} ms" for k, v in res.items()))
    writes = ctx.extra["b4_writes"][-1]
    fsync_ms = statistics.median(w["fsync_mean_ms"] for w in ctx.extra["b4_writes"][-ctx.args.runs:])
    # Little's law: with one outstanding write per thread, acked/s <= threads / (time per commit)
    # and a commit takes at least one fdatasync.
    batch_note = (f"{writes['records_written'] / max(1, writes['batches']):.0f} rec/batch, "
                  f"fsync {fsync_ms:.2f} ms → ceiling {threads / fsync_ms:.0f} K/s")
    rate = {k: [r[0] for r in v] for k, v in res.items()}
    return [
        abs_row("B4", f"{threads} thr writer.put, acked/s", rate["ours"], "/s", 1e5, note=batch_note),
        ratio_row("B4", "  vs SQLite single-row commits", rate["ours"], f"SQLite FULL ({ctx.args.sqlite_b4})",
                  rate["sqlite"], 15),
        ratio_row("B4", "  vs LMDB put+commit (info)", rate["ours"], "LMDB sync", rate["lmdb"], None),
        abs_row("B4", "  p50 latency", [r[1] for r in res["ours"]], "ms", None),
        abs_row("B4", "  p99 latency", [r[2] for r in res["ours"]], "ms", 5, at_most=True),
        abs_row("B4", "  SQLite p99 latency (info)", [r[2] for r in res["sqlite"]], "ms", None,
                note=f"SQLite p50 {statistics.median(r[1] for r in res['sqlite']):.2f} ms"),
    ]


def bench_b4s(ctx: Context) -> list[Row]:
    threads, duration = ctx.args.threads, ctx.args.duration
    signed = ctx.signed
    work = split(signed, threads)
    pairs = ctx.verify_pairs[: ctx.args.verify_sample]

    def ours(path: str, seconds: float) -> tuple[float, float, float, int]:
        db = stemedb.open(path, durability="sync")
        try:
            result = hammer(threads, seconds, work, db.put)
            if len(db) != result[3]:
                ctx.warn(f"B4s: {result[3]} puts acked but {len(db)} records stored")
            ctx.extra.setdefault("b4s_writes", []).append(db.stats()["writes"])
        finally:
            db.close()
        shutil.rmtree(path)
        return result

    say("  warm-up …")
    ours(ctx.path("b4s-warm"), 0.3)
    verify_rate(pairs[:2000], 2)
    res, two = [], []
    for run in range(ctx.args.runs):
        res.append(ours(ctx.path(f"b4s-{run}"), duration))
        two.append(verify_rate(pairs, 2))
        say(f"  run {run + 1}: ours {res[-1][0] / 1e3:.1f} K/s p50 {res[-1][1]:.2f} ms p99 {res[-1][2]:.1f} ms "
            f"({res[-1][3]:,} acked), verify 2 threads {two[-1] / 1e3:.1f} K/s")
        if res[-1][3] >= len(signed) - threads:
            ctx.warn("B4s ran out of signed records before the deadline; raise --signed")
    writes = ctx.extra["b4s_writes"][-1]
    note = (f"{writes['records_written'] / max(1, writes['batches']):.0f} rec/batch")
    return [
        ratio_row("B4s", f"{threads} thr db.put(signed), acked/s", [r[0] for r in res],
                  "Ed25519 verify, 2 thr", two, 0.8, note=note),
        abs_row("B4s", "  p50 latency", [r[1] for r in res], "ms", None),
        abs_row("B4s", "  p99 latency", [r[2] for r in res], "ms", None),
    ]


def child(argv: list[str]) -> None:
    """Helpers run in a fresh process: `crash STORE TAIL CHUNK` and `rss STORE`."""
    mode, store = argv[0], argv[1]
    if mode == "crash":
        tail, chunk = int(argv[2]), int(argv[3])
        records = [r._with_proof((), (), None)
                   for r in generate(tail, seed=4242, votes=False, signers=1).assertions]
        signer = agent_signers(1)[0]
        batches = [signer.sign_batch(records[s:s + chunk]) for s in range(0, tail, chunk)]
        db = stemedb.open(store, durability="sync")
        before = len(db)
        for members, envelope in batches:
            db.put_many(members, envelope=envelope)
        print(json.dumps({"before": before, "after": len(db)}), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9: no close, no snapshot
    elif mode == "rss":
        gc.collect()
        before = rss_anon()
        started = time.perf_counter()
        db = stemedb.open(store, durability="sync")
        seconds = time.perf_counter() - started
        gc.collect()
        after = rss_anon()
        try:  # how much of the growth is freed heap that glibc kept (not the engine's live memory)
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            trimmed = rss_anon()
        except (OSError, AttributeError):
            trimmed = after
        stats = db.stats()
        columns = {name: [int(a.nbytes), int(a.dtype.itemsize * (a.size // a.shape[0]))]
                   for name, a in db.state.columns.arrays.items()}
        print(json.dumps({"before": before, "after": after, "trimmed": trimmed, "records": stats["records"],
                          "index_bytes": stats["index_bytes"], "seconds": seconds,
                          "capacity": int(db.state.columns.capacity), "columns": columns}), flush=True)
        os._exit(0)  # leave the store exactly as it was


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def run_child(*args: str) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent / "src"), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(HERE / "bench_storage.py"), "_child", *args],
                          capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"child {args[0]} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def timed_open(path: str) -> tuple[float, Any]:
    started = time.perf_counter()
    db = stemedb.open(path, durability="sync")
    wall = time.perf_counter() - started
    report = db.recovery
    db.close()
    return wall, report


def copy_settled(source: str, target: str) -> None:
    """Copy a store and write the copy back to disk before any open is timed.

    So the timed open does not share the disk with the kernel's write-back of
    a multi-GB copy (at 10 M records). Measured: it did not change the rows.
    """
    shutil.copytree(source, target)
    os.sync()


def bench_b6(ctx: Context) -> list[Row]:
    store = ctx.main_store("ours")
    records = run_child("rss", store)["records"]
    scale = SCALE_RUN / records
    say("  open after close …")
    empty = ctx.path("b6-empty")
    timed_open(empty)
    fixed = statistics.median(timed_open(empty)[0] for _ in range(ctx.args.runs))
    shutil.rmtree(empty)
    timed_open(store)  # warm-up (and the snapshot is current)
    closed = [timed_open(store)[0] for _ in range(ctx.args.runs)]

    def extrapolate(seconds: float) -> float:
        """Fixed cost (an empty store's open) + the rest scaled linearly to 10 M records."""
        return fixed + max(0.0, seconds - fixed) * scale

    tail = max(1000, min(ctx.args.chunk, records // 10))
    crashed = ctx.path("b6-crashed")
    shutil.copytree(store, crashed)
    say(f"  kill -9 after writing {tail:,} more records (child process) …")
    info = run_child("crash", crashed, str(tail), str(ctx.args.chunk))
    expected = info["after"]
    crash_wall, replayed, full_wall, full_replayed = [], [], [], []
    for run in range(ctx.args.runs):
        copy = ctx.path(f"b6-{run}")
        copy_settled(crashed, copy)
        wall, report = timed_open(copy)
        crash_wall.append(wall)
        replayed.append(report.records_replayed)
        shutil.rmtree(copy)
        copy_settled(crashed, copy)
        shutil.rmtree(os.path.join(copy, "index"), ignore_errors=True)
        started = time.perf_counter()
        db = stemedb.open(copy, durability="sync")
        full_wall.append(time.perf_counter() - started)
        full_replayed.append(db.recovery.records_replayed)
        if len(db) != expected:
            ctx.warn(f"B6: full replay found {len(db)} records, the crashed writer had {expected}")
        db.close()
        shutil.rmtree(copy)
        say(f"  run {run + 1}: after close {closed[run]:.3f} s; after kill -9 {wall:.3f} s "
            f"({report.records_replayed:,} replayed, {report.snapshot_records:,} from snapshot); "
            f"no snapshot {full_wall[-1]:.3f} s ({full_replayed[-1]:,} replayed)")
        if report.problems:
            ctx.warn(f"B6 recovery problems: {report.problems}")
    shutil.rmtree(crashed)
    tail_only = max(replayed) <= tail + (tail // ctx.args.chunk + 1)
    ctx.extra["b6"] = {"records": records, "tail_written": tail, "after_crash_records": expected,
                       "replayed": replayed, "full_replayed": full_replayed}
    size = f"{records / 1e6:.2g} M"
    measured = records >= SCALE_RUN  # at 10 M the targets apply to the measured opens
    rows = [
        abs_row("B6", f"open after close, {size} rec", closed, "s", 1.0 if measured else None, at_most=True),
        abs_row("B6", f"open after kill -9 (+{tail // 1000} K tail)", crash_wall, "s",
                1.0 if measured else None, at_most=True,
                note=f"replayed {statistics.median(replayed):,.0f} of {expected:,}"),
        Row("B6", "  tail-only replay", "count", Stat([float(max(replayed))]),
            target="tail only", met=tail_only, note=f"max replayed {max(replayed):,} for a {tail:,} tail"),
        abs_row("B6", "open, no snapshot (full replay)", full_wall, "s", None,
                note=f"{statistics.median(full_replayed) / statistics.median(full_wall) / 1e6:.2f} M rec/s "
                     f"→ {SCALE_RUN / (statistics.median(full_replayed) / statistics.median(full_wall)):.1f} s at 10 M"),
    ]
    if not measured:
        rows[1:1] = [abs_row("B6", "  extrapolated to 10 M", [extrapolate(c) for c in closed], "s", 1.0,
                             at_most=True, note=f"empty-store open {fixed * 1000:.1f} ms + linear")]
        rows[4:4] = [abs_row("B6", "  extrapolated to 10 M (+ same tail)",
                             [c - o + extrapolate(o) for c, o in zip(crash_wall, closed)], "s", 1.0,
                             at_most=True, note="open-after-close extrapolated + measured tail replay")]
    return rows


def bench_b8(ctx: Context) -> list[Row]:
    store = ctx.main_store("ours")
    results = [run_child("rss", store) for _ in range(max(1, min(ctx.args.runs, 3)))]
    info = results[-1]
    records = info["records"]
    stats_total = sum(info["index_bytes"].values()) / records
    rss = [(r["after"] - r["before"]) / records for r in results]
    trimmed = [(r["trimmed"] - r["before"]) / records for r in results]
    used = sum(u for _, u in info["columns"].values())
    parts = ", ".join(f"{k} {v / records:.0f}" for k, v in info["index_bytes"].items())
    ctx.extra["b8"] = info
    say(f"  index_bytes per record: {parts}; columns used {used} B/rec at capacity "
        f"{info['capacity']:,} for {records:,} records")
    say("  column widths (B/rec): " + ", ".join(f"{k} {u}" for k, (_, u) in info["columns"].items()))
    return [
        abs_row("B8", "index_bytes / record (stats)", [stats_total], "B/rec", 64, at_most=True, note=parts),
        abs_row("B8", "RssAnon growth of open / record", rss, "B/rec", 64, at_most=True,
                note=f"{records / 1e6:.2g} M records"),
        abs_row("B8", "  same after malloc_trim(0) (info)", trimmed, "B/rec", None,
                note="growth minus freed heap glibc had kept"),
    ]


BENCHES: dict[str, Callable[[Context], list[Row]]] = {
    "B1": bench_b1, "B1s": bench_b1s, "B2": bench_b2, "B4": bench_b4, "B4s": bench_b4s,
    "B6": bench_b6, "B8": bench_b8,
}


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(HERE.parent), "status", "--porcelain"],
                                    capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = "", False
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version, "lmdb": ".".join(map(str, lmdb.version())),
            "py-lmdb": lmdb.__version__, "numpy": np.__version__, "commit": commit + ("+dirty" if dirty else "")}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000, help="store size (100000 for a smoke run)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only", default=",".join(ALL), help="comma-separated subset of " + ",".join(ALL))
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("--dir", default="/tmp", help="parent of the temporary store directory")
    parser.add_argument("--keep", action="store_true", help="keep the stores")
    parser.add_argument("--chunk", type=int, default=100_000, help="B1 records per put_many / transaction")
    parser.add_argument("--signed", type=int, default=50_000, help="individually signed records (B1s, B4s)")
    parser.add_argument("--verify-sample", type=int, default=20_000, help="signatures per baseline run")
    parser.add_argument("--gets", type=int, default=100_000, help="point gets per run (B2)")
    parser.add_argument("--threads", type=int, default=64, help="writer threads (B4, B4s)")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per B4/B4s run")
    parser.add_argument("--sqlite-b4", choices=("lock", "connections"), default="lock",
                        help="B4 SQLite mode: one connection behind a lock (faster here) or one per thread")
    args = parser.parse_args()
    selected = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = [b for b in selected if b not in BENCHES]
    if unknown:
        parser.error(f"--only: unknown {', '.join(unknown)}; choose from {', '.join(ALL)}")
    selected = [b for b in ALL if b in selected]

    base = tempfile.mkdtemp(prefix="stemedb-bench-", dir=args.dir)
    info = machine()
    command = "PYTHONPATH=src python bench/bench_storage.py " + " ".join(sys.argv[1:])
    say(f"{command}\n{info}\nstores in {base}")
    ctx = Context(args, base)
    rows: list[Row] = []
    started = time.perf_counter()
    try:
        ctx.plain  # noqa: B018 - generate before timing anything
        gc.collect()
        gc.freeze()  # the workload's millions of objects are not the engines' garbage
        for name in selected:
            say(f"\n== {name} ==")
            t = time.perf_counter()
            new = BENCHES[name](ctx)
            gc.collect()
            for row in new:
                say(format_row(row))
            say(f"  ({time.perf_counter() - t:.0f} s)")
            rows.extend(new)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    total = time.perf_counter() - started
    say(f"\n{args.records:,} records, {args.runs} runs, durable everywhere, total {total:.0f} s\n")
    say(HEADER)
    for row in rows:
        say(format_row(row))
    missed = [r for r in rows if r.met is False]
    say(f"\ntargets met: {sum(r.met is True for r in rows)}, missed: {len(missed)}"
        + (" (" + ", ".join(f"{r.bench} {r.metric.strip()}" for r in missed) + ")" if missed else ""))
    for text in ctx.warnings:
        say(f"WARNING: {text}")
    if args.json:
        payload = {"command": command, "machine": info, "seconds": total, "args": vars(args),
                   "rows": [r.as_dict() for r in rows], "extra": ctx.extra, "warnings": ctx.warnings,
                   "markdown": markdown(rows)}
        pathlib.Path(args.json).write_text(json.dumps(payload, indent=1, default=str))


if __name__ == "__main__":
    main()
