"""B7 of BENCHMARKS.md, in process: set reconciliation between two stores' engine trees.

    PYTHONPATH=src python bench/bench_sync.py [--records 1000000] [--runs 5]
        [--gaps 1,100,10000] [--json out.json] [--dir /tmp] [--keep]

Two stores are built from the bench workload (bench/workload.py, batch-signed
in envelopes of --chunk records, not timed): the source with all n records,
and for each gap d and each shape a replica lacking d of them — "newest"
(the d records with the highest keys: a replica that stopped d writes ago)
or "random" (d records drawn uniformly). The production reconciliation
session (`stemedb.replication.reconcile.Reconciler`, both directions, the
replica initiating, over scope 0: the whole store) runs between the two
stores' engine-kept trees (`Database.reconcile_items` under
`Database.reconcile_lock()`), in one process, messages handed over in
memory. Reported per (d, shape), median of --runs sessions (a fresh salt
each) with min–max: round trips, reconciliation bytes each way (messages
only; the records themselves are not counted), CPU seconds of each side
(thread time of its steps), and the bytes of "send every ID" (32 B × n, one
way) in the same run. Every session is checked: the source finds exactly the
d missing records and the replica finds none.

The other half of B7 — the catch-up rate of an empty replica over loopback
(≥ 200 K records/s) — belongs to the networked cluster bench; `catch_up()`
below is the in-process hook it can call or compare with: it runs a session
and moves the records through the replication intake, as anti-entropy does.

Targets at n = 1 M: d = 1 in ≤ 3 round trips and ≤ 2 KB; d = 100 ≤ 5 KB
(newest), ≤ 100 KB (random); d = 10 000 ≤ 330 KB (newest), ≤ 1 MB (random).
Bytes are both directions together. Smaller --records runs are smoke runs:
the targets are stated for 1 M and are not judged below it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from workload import agent_signers, generate  # noqa: E402

import stemedb  # noqa: E402
from stemedb.replication.reconcile import WHOLE_STORE, Reconciler, run_in_memory  # noqa: E402

TARGETS = {  # (d, shape) → (bytes both ways, round trips or None); BENCHMARKS.md B7, n = 1 M
    (1, "newest"): (2_000, 3), (1, "random"): (2_000, 3),
    (100, "newest"): (5_000, None), (100, "random"): (100_000, None),
    (10_000, "newest"): (330_000, None), (10_000, "random"): (1_000_000, None),
}
TARGET_RECORDS = 1_000_000


def say(text: str) -> None:
    print(text, flush=True)


class EngineItems:
    """The ItemSource of a session over one Database: its engine-kept trees."""

    def __init__(self, db: Any) -> None:
        self.db = db

    def items(self, scope: int) -> Any:
        return self.db.reconcile_items(scope)


@dataclass
class TimedSide:
    """One side of a session; each step runs under its store's reconcile lock and is timed."""

    reconciler: Reconciler
    db: Any
    cpu: float = 0.0
    sent_rows: list[np.ndarray] = field(default_factory=list)

    def start(self) -> tuple[bytes, dict[int, np.ndarray]]:
        return self._timed(self.reconciler.start)

    def receive(self, message: bytes) -> tuple[bytes | None, dict[int, np.ndarray]]:
        return self._timed(self.reconciler.receive, message)

    def _timed(self, step: Callable[..., Any], *args: Any) -> Any:
        started = time.thread_time()
        with self.db.reconcile_lock():
            out = step(*args)
        self.cpu += time.thread_time() - started
        return out


def session(replica: Any, source: Any, scopes: list[int],
            deliver: Callable[[TimedSide, dict[int, np.ndarray]], None] | None = None,
            ) -> tuple[int, TimedSide, TimedSide]:
    """One two-way session, the replica initiating: (round trips, replica side, source side)."""
    salt = os.urandom(8)
    ours = TimedSide(Reconciler(EngineItems(replica), scopes, True, True, salt=salt), replica)
    theirs = TimedSide(Reconciler(EngineItems(source), scopes, True, True, salt=salt), source)

    def collect(side: TimedSide, sends: dict[int, np.ndarray]) -> None:
        side.sent_rows.extend(sends.values())
        if deliver is not None:
            deliver(side, sends)

    round_trips = run_in_memory(ours, theirs, collect)  # type: ignore[arg-type]
    return round_trips, ours, theirs


def catch_up(source: Any, replica: Any, placement: Any = None) -> dict[str, Any]:
    """Bring `replica` up to `source` in process: a session, then the records through intake.

    The hook for the catch-up half of B7: the same Reconciler, EngineStore
    reads and Intake (verify and store in one engine call, members held
    until their envelope arrives) as anti-entropy, minus the network.
    Scopes: the whole store, or with `placement` the global partition and
    every partition. Returns records moved, seconds, round trips and bytes.
    """
    from stemedb.replication.store import EngineStore, Intake

    source_store, replica_store = EngineStore(source, placement), EngineStore(replica, placement)
    scopes = [WHOLE_STORE] if placement is None else [1] + [2 + p for p in range(placement.partitions)]
    started = time.perf_counter()
    pending: list[np.ndarray] = []

    def deliver(side: TimedSide, sends: dict[int, np.ndarray]) -> None:
        if side.db is source:
            pending.extend(sends.values())

    round_trips, ours, theirs = session(replica, source, scopes, deliver)
    rows = np.unique(np.concatenate(pending)) if pending else np.zeros(0, dtype=np.int64)
    moved = 0
    if len(rows):
        intake = Intake(replica_store)
        # Envelopes first (as the global partition goes first on the wire), in frames.
        kinds = source.view.column("kind")[rows]
        rows = np.concatenate([rows[kinds == stemedb.RecordKind.ENVELOPE],
                               rows[kinds != stemedb.RecordKind.ENVELOPE]])
        for start in range(0, len(rows), 10_000):
            intake.accept(source_store.read_rows(rows[start:start + 10_000]))
        intake.finish()
        moved = intake.stored
    return {"records": moved, "seconds": time.perf_counter() - started, "round_trips": round_trips,
            "bytes_to_source": ours.reconciler.stats.bytes_sent,
            "bytes_to_replica": theirs.reconciler.stats.bytes_sent}


# ------------------------------------------------------------------------ the bench

def build_source(path: str, n: int, chunk: int) -> Any:
    started = time.perf_counter()
    plain = [r._with_proof((), (), None) for r in generate(n, votes=False, signers=1).assertions]
    agents = agent_signers(8)
    db = stemedb.open(path, durability="none")
    for k, start in enumerate(range(0, n, chunk)):
        members, envelope = agents[k % len(agents)].sign_batch(plain[start:start + chunk])
        db.put_many(members, envelope=envelope)
    say(f"  source: {len(db):,} records in {time.perf_counter() - started:.1f} s (not timed)")
    return db


def build_replica(path: str, source: Any, missing: np.ndarray) -> Any:
    """A store holding every record of `source` but the record numbers `missing`."""
    keep = np.ones(len(source), dtype=bool)
    keep[missing] = False
    kinds = source.view.column("kind")
    rows = np.flatnonzero(keep)
    rows = np.concatenate([rows[kinds[rows] == stemedb.RecordKind.ENVELOPE],
                           rows[kinds[rows] != stemedb.RecordKind.ENVELOPE]])
    db = stemedb.open(path, durability="none")
    for start in range(0, len(rows), 200_000):
        part = rows[start:start + 200_000]
        blob, offsets = source.view.gather(part)
        db.put_encoded(blob, offsets)
    return db


def gap(source: Any, d: int, shape: str, rng: np.random.Generator) -> np.ndarray:
    """Record numbers of the d records the replica lacks (members only: envelopes stay)."""
    with source.reconcile_lock():
        tree, _, _ = source.reconcile_items(WHOLE_STORE)
        order = tree.rows()
    kinds = source.view.column("kind")
    order = order[kinds[order] != stemedb.RecordKind.ENVELOPE]
    if shape == "newest":
        return np.sort(order[-d:]).astype(np.int64)
    return np.sort(rng.choice(order, size=d, replace=False)).astype(np.int64)


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure(source: Any, replica: Any, missing: np.ndarray, runs: int) -> dict[str, Any]:
    results: dict[str, list[float]] = {k: [] for k in ("round_trips", "bytes_to_source",
                                                       "bytes_to_replica", "bytes_total",
                                                       "cpu_replica_s", "cpu_source_s")}
    source_ids = source.view.column("id")
    wanted = {bytes(source_ids[r]) for r in missing}
    for _ in range(runs):
        round_trips, ours, theirs = session(replica, source, [WHOLE_STORE])
        found = np.concatenate(theirs.sent_rows) if theirs.sent_rows else np.zeros(0, np.int64)
        got = {bytes(source_ids[r]) for r in found}
        if got != wanted or any(len(rows) for rows in ours.sent_rows):
            raise SystemExit(f"session found {len(got)} of {len(wanted)} missing records (and the "
                             f"replica {sum(len(r) for r in ours.sent_rows)} the source lacks): wrong")
        up, down = ours.reconciler.stats.bytes_sent, theirs.reconciler.stats.bytes_sent
        for key, value in (("round_trips", round_trips), ("bytes_to_source", up),
                           ("bytes_to_replica", down), ("bytes_total", up + down),
                           ("cpu_replica_s", ours.cpu), ("cpu_source_s", theirs.cpu)):
            results[key].append(float(value))
    return {key: spread(values) for key, values in results.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=TARGET_RECORDS)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--gaps", default="1,100,10000", help="comma-separated d values")
    parser.add_argument("--shapes", default="newest,random")
    parser.add_argument("--chunk", type=int, default=100_000, help="records per envelope")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("--dir", default="/tmp", help="parent of the temporary store directory")
    parser.add_argument("--keep", action="store_true", help="keep the stores")
    args = parser.parse_args(argv)
    gaps = [int(x) for x in args.gaps.split(",") if x]
    shapes = [x for x in args.shapes.split(",") if x]
    if any(d < 1 or d >= args.records for d in gaps) or args.runs < 1:
        parser.error("every gap must be in 1..records-1, and --runs at least 1")
    if any(s not in ("newest", "random") for s in shapes):
        parser.error("--shapes: newest and/or random")
    root = tempfile.mkdtemp(prefix="stemedb-bench-sync-", dir=args.dir)
    rng = np.random.default_rng(args.seed)
    say(f"B7 in process: n = {args.records:,}, gaps {gaps}, {args.runs} runs; stores in {root}")
    rows_out = []
    source = build_source(os.path.join(root, "source"), args.records, args.chunk)
    try:
        for d in gaps:
            for shape in shapes:
                missing = gap(source, d, shape, rng)
                path = os.path.join(root, f"replica-{d}-{shape}")
                replica = build_replica(path, source, missing)
                try:
                    figures = measure(source, replica, missing, args.runs)
                finally:
                    replica.close()
                    if not args.keep:
                        shutil.rmtree(path, ignore_errors=True)
                limit, trips = TARGETS.get((d, shape), (None, None))
                judged = args.records == TARGET_RECORDS and limit is not None
                met = None if not judged else (
                    figures["bytes_total"]["median"] <= limit
                    and (trips is None or figures["round_trips"]["median"] <= trips))
                row = {"d": d, "shape": shape, "n": args.records, **figures,
                       "every_id_bytes": 32 * args.records, "target_bytes": limit,
                       "target_round_trips": trips, "met": met}
                rows_out.append(row)
                b, t = figures["bytes_total"], figures["round_trips"]
                say(f"  d={d:>6} {shape:<6}  round trips {t['median']:.0f} ({t['min']:.0f}–{t['max']:.0f})"
                    f"  bytes {b['median']:,.0f} ({b['min']:,.0f}–{b['max']:,.0f})"
                    f" [→source {figures['bytes_to_source']['median']:,.0f}, "
                    f"→replica {figures['bytes_to_replica']['median']:,.0f}]"
                    f"  cpu replica {figures['cpu_replica_s']['median'] * 1e3:.1f} ms, "
                    f"source {figures['cpu_source_s']['median'] * 1e3:.1f} ms"
                    f"  vs every ID {32 * args.records:,} B"
                    + ("" if met is None else f"  target ≤ {limit:,} B: {'yes' if met else 'NO'}"))
    finally:
        source.close()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if args.records != TARGET_RECORDS:
        say(f"  (smoke run at {args.records:,} records: targets are for {TARGET_RECORDS:,})")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"bench": "B7", "records": args.records, "runs": args.runs, "rows": rows_out}, out,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
