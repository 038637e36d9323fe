"""Throughput of BLAKE3 over many record-sized inputs.

Compares the `blake3` package called once per item (the reference) with
stemedb._hash.blake3_many and blake3_concat (1 and 2 threads), on inputs of
random length 150..260 bytes, and prints hashes per second.

    python setup.py build_ext --inplace -q && PYTHONPATH=src python bench/bench_hash.py
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from itertools import pairwise

import blake3
import numpy as np

from stemedb import _hash


def best_time(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1_000_000, help="number of inputs")
    parser.add_argument("--repeat", type=int, default=3, help="runs per method; the best counts")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(150, 261, size=args.n)
    offsets = np.zeros(args.n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    buffer = rng.integers(0, 256, size=int(offsets[-1]), dtype=np.uint8).tobytes()
    items = [buffer[a:b] for a, b in pairwise(offsets.tolist())]

    def reference() -> list[bytes]:
        return [blake3.blake3(item).digest() for item in items]

    expected = np.frombuffer(b"".join(reference()), dtype=np.uint8).reshape(args.n, 32)
    methods: list[tuple[str, Callable[[], np.ndarray | list[bytes]]]] = [
        ("blake3 package, per item", reference),
        ("_hash.blake3_many", lambda: _hash.blake3_many(items)),
        ("_hash.blake3_concat threads=1", lambda: _hash.blake3_concat(buffer, offsets, threads=1)),
        ("_hash.blake3_concat threads=2", lambda: _hash.blake3_concat(buffer, offsets, threads=2)),
    ]
    for name, fn in methods[1:]:
        if not np.array_equal(fn(), expected):
            raise SystemExit(f"{name} disagrees with the blake3 package")

    print(f"{args.n:,} inputs of 150..260 bytes ({len(buffer) / args.n:.0f} on average), "
          f"best of {args.repeat}")
    print(f"{'method':<32}{'seconds':>10}{'hashes/s':>14}{'vs reference':>14}")
    reference_rate = None
    for name, fn in methods:
        seconds = best_time(fn, args.repeat)
        rate = args.n / seconds
        reference_rate = reference_rate or rate
        print(f"{name:<32}{seconds:>10.3f}{rate:>14,.0f}{rate / reference_rate:>13.1f}x")


if __name__ == "__main__":
    main()
