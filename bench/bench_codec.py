"""Encode + ID and decode throughput: the native batch API vs the pure-Python reference.

    python bench/bench_codec.py [--records 1000000] [--runs 5] [--json out.json]

Workload: bench/workload.py (BENCHMARKS.md). Prints records/s for each path,
the median of --runs runs (min-max), and the ratio to the reference, which is
what one would write without a native core: struct packing plus the `blake3`
package, once per record (timed on a subset, since it is slow).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import blake3  # noqa: E402
from workload import generate  # noqa: E402

import stemedb  # noqa: E402
from stemedb import _codec  # noqa: E402
from stemedb import _reference as reference  # noqa: E402


def rate(fn, count: int, runs: int) -> tuple[float, float, float]:
    fn()  # warm up
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates), min(rates), max(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--reference-records", type=int, default=50_000)
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()

    print(f"generating {args.records:,} assertions …", flush=True)
    records = generate(args.records, votes=False).assertions
    blob, offsets, ids = stemedb.encode_many(records)
    print(f"mean canonical size {len(blob) / len(records):.0f} bytes")
    sample = records[: args.reference_records]
    sample_encoded = [r.encode() for r in sample]

    def reference_encode_id() -> None:
        for r in sample:
            data = reference.encode(r)
            blake3.blake3(data[: int.from_bytes(data[2:6], "little")]).digest()

    def reference_hash_only() -> None:
        for data in sample_encoded:
            blake3.blake3(data[: int.from_bytes(data[2:6], "little")]).digest()

    def reference_decode() -> None:
        for data in sample_encoded:
            reference.decode(data)

    rows = [
        ("encode + ID from objects", lambda: stemedb.encode_many(records), len(records),
         reference_encode_id, len(sample), 1_000_000),
        ("ID from encoded bytes (hash only)", lambda: _codec.hash_encoded(blob, offsets),
         len(records), reference_hash_only, len(sample), 3_000_000),
        ("decode to objects", lambda: stemedb.decode_many(blob, offsets), len(records),
         reference_decode, len(sample), None),
    ]
    results = []
    print(f"\n{'workload':36} {'ours/s':>14} {'reference/s':>14} {'ratio':>8} {'target':>10}")
    for name, ours_fn, ours_n, ref_fn, ref_n, target in rows:
        ours = rate(ours_fn, ours_n, args.runs)
        ref = rate(ref_fn, ref_n, max(1, args.runs // 2))
        met = "" if target is None else ("met" if ours[0] >= target else "MISSED")
        print(f"{name:36} {ours[0]:14,.0f} {ref[0]:14,.0f} {ours[0] / ref[0]:7.1f}x "
              f"{('≥' + format(target, ',')) if target else '':>10} {met}")
        print(f"{'':36} {f'({ours[1]:,.0f}-{ours[2]:,.0f})':>14}")
        results.append({"workload": name, "ours_per_s": ours[0], "ours_min": ours[1],
                        "ours_max": ours[2], "reference_per_s": ref[0], "ratio": ours[0] / ref[0],
                        "target": target})
    assert bytes(ids[0]) == records[0].id
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"records": args.records, "results": results},
                                                      indent=1))


if __name__ == "__main__":
    main()
