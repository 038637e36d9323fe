"""Throughput and memory of the in-memory indexes (stemedb._index).

IdIndex: inserts and batched lookups (hits and misses) of random 32-byte IDs,
against a Python dict of bytes -> int built and probed in the same run; bytes
per record. PostingIndex: appends of one key per record drawn from 20 K keys,
batched gets, bytes per record. Goals: batched lookup >= 10 M/s, IdIndex
<= 24 bytes per record.

    python setup.py build_ext --inplace -q && PYTHONPATH=src python bench/bench_index.py
    PYTHONPATH=src python bench/bench_index.py --records 10000000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import numpy as np

from stemedb import _index


def best_time(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def in_batches(n: int, batch: int) -> list[slice]:
    return [slice(start, min(start + batch, n)) for start in range(0, n, batch)]


def dict_bytes(table: dict[bytes, int]) -> int:
    """Memory of the dict, its keys and (non-cached) int values."""
    return (sys.getsizeof(table) + sum(sys.getsizeof(k) for k in table)
            + sum(sys.getsizeof(v) for v in table.values() if v > 256))


def bench_id_index(ids: np.ndarray, hits: np.ndarray, misses: np.ndarray, batch: int,
                   repeat: int) -> dict[str, float]:
    n = len(ids)
    recnos = np.arange(n, dtype=np.uint32)
    batches = in_batches(n, batch)
    index = _index.IdIndex()
    start = time.perf_counter()
    for part in batches:
        index.insert_many(ids[part], recnos[part], ids)
    insert_seconds = time.perf_counter() - start
    if len(index) != n or not np.array_equal(index.lookup_many(ids, ids), recnos):
        raise SystemExit("IdIndex lost IDs")

    def lookup(queries: np.ndarray) -> None:
        for part in batches:
            index.lookup_many(queries[part], ids)

    return {"insert": n / insert_seconds,
            "hits": n / best_time(lambda: lookup(hits), repeat),
            "misses": n / best_time(lambda: lookup(misses), repeat),
            "bytes": index.memory_bytes() / n}


def bench_dict(ids: np.ndarray, hits: np.ndarray, misses: np.ndarray,
               repeat: int) -> dict[str, float]:
    """The peer: a dict of bytes -> int, probed once per ID (as Python code would)."""
    n = len(ids)
    keys = [bytes(row) for row in ids]
    hit_keys = [bytes(row) for row in hits]
    miss_keys = [bytes(row) for row in misses]
    start = time.perf_counter()
    table = dict(zip(keys, range(n)))
    insert_seconds = time.perf_counter() - start
    get = table.get
    return {"insert": n / insert_seconds,
            "hits": n / best_time(lambda: [get(k, -1) for k in hit_keys], repeat),
            "misses": n / best_time(lambda: [get(k, -1) for k in miss_keys], repeat),
            "bytes": dict_bytes(table) / n}


def bench_postings(n: int, keys: int, batch: int, repeat: int,
                   rng: np.random.Generator) -> dict[str, float]:
    """One key per record from `keys` distinct ones; get_many of 1 000 keys."""
    recnos = np.arange(n, dtype=np.uint32)
    key_pool = rng.integers(0, 2**64, keys, dtype=np.uint64)
    record_keys = key_pool[rng.integers(0, keys, n)]
    postings = _index.PostingIndex()
    start = time.perf_counter()
    for part in in_batches(n, batch):
        postings.add_many(record_keys[part], recnos[part])
    add_seconds = time.perf_counter() - start
    probe = key_pool[rng.integers(0, keys, 1000)]
    fetched = int(postings.get_many(probe)[1][-1])
    return {"add": n / add_seconds,
            "get": fetched / best_time(lambda: postings.get_many(probe), repeat),
            "bytes": postings.memory_bytes() / n,
            "bytes_reloaded": _index.PostingIndex.from_state(postings.state()).memory_bytes() / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000, help="IDs / records (10 M: 10000000)")
    parser.add_argument("--batch", type=int, default=100_000, help="IDs per insert_many / lookup_many call")
    parser.add_argument("--keys", type=int, default=20_000, help="distinct PostingIndex keys")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each read; the best counts")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    n = args.records
    rng = np.random.default_rng(args.seed)
    ids = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    hits = ids[rng.permutation(n)]
    misses = rng.integers(0, 256, (n, 32), dtype=np.uint8)

    ours = bench_id_index(ids, hits, misses, args.batch, args.repeat)
    peer = bench_dict(ids, hits, misses, args.repeat)
    postings = bench_postings(n, args.keys, args.batch, args.repeat, rng)

    print(f"{n:,} random IDs, batches of {args.batch:,}, best of {args.repeat} for reads")
    print(f"{'operation':<34}{'ours/s':>14}{'dict/s':>14}{'ratio':>9}")
    for what, name in [("IdIndex insert (from empty)", "insert"), ("IdIndex lookup, hits", "hits"),
                       ("IdIndex lookup, misses", "misses")]:
        print(f"{what:<34}{ours[name]:>14,.0f}{peer[name]:>14,.0f}{ours[name] / peer[name]:>8.1f}x")
    print(f"{'PostingIndex add':<34}{postings['add']:>14,.0f}")
    print(f"{'PostingIndex get_many, records':<34}{postings['get']:>14,.0f}")
    print(f"{'memory, bytes per record':<34}{'ours':>14}{'dict':>14}")
    print(f"{'IdIndex':<34}{ours['bytes']:>14.1f}{peer['bytes']:>14.1f}")
    print(f"{f'PostingIndex, {args.keys:,} keys':<34}{postings['bytes']:>14.1f}"
          f"{'':>14}  ({postings['bytes_reloaded']:.1f} after from_state)")
    goals = {"lookup >= 10 M/s": min(ours["hits"], ours["misses"]) >= 10e6,
             "IdIndex <= 24 B/record": ours["bytes"] <= 24}
    print("goals: " + ", ".join(f"{k}: {'met' if ok else 'MISSED'}" for k, ok in goals.items()))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"records": n, "batch": args.batch, "keys": args.keys, "IdIndex": ours,
                       "dict": peer, "PostingIndex": postings, "goals": goals}, out, indent=1)


if __name__ == "__main__":
    main()
