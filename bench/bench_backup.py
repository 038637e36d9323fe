"""B10, backup while serving: backup throughput, and how much it slows concurrent writes.

Builds a store of --records records (one group-signing writer, batches of 10,000),
then runs --writers threads of durable 100-record writes for --duration seconds
three times: alone, while full backups of the store (each to a new destination)
run back to back, and alone again (the two alone runs are averaged). Prints the backup rate (bytes copied / time, MiB/s), the write
rate in both runs and the slowdown, beside the targets (≥ 200 MB/s, ≤ 20 %).
Each backup is `stemedb backup --data DIR --to NEW --json` in its own process at
nice 10, as stemedb-backup.service runs it (its time includes the interpreter's
start, so the rate is a lower bound); the writers are this process's. `--records 1000000` is the B10 size; run it on an idle machine.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import stemedb
from stemedb.backup.copy import backup
from stemedb.engine import database


def write_load(db, seconds, writers, backing_up):
    signer = stemedb.Signer.from_seed(b"w" * 32)
    writer = db.writer(signer)
    written = [0] * writers
    stop = time.perf_counter() + seconds

    def run(index):
        n = 0
        while time.perf_counter() < stop:
            writer.put_many([stemedb.Assertion(f"load-{index}-{n}", "p", i) for i in range(100)])
            written[index] += 100
            n += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    copies = backing_up() if backing_up else []
    for thread in threads:
        thread.join()
    return sum(written) / seconds, copies


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--dir", default=None, help="parent of the temporary directory")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="stemedb-bench-backup-", dir=args.dir)
    try:
        db = database.open(os.path.join(root, "data"))
        bulk = db.writer(stemedb.Signer.from_seed(b"b" * 32))
        for start in range(0, args.records, 10_000):
            bulk.put_many([stemedb.Assertion(f"s{i}", "p", f"object {i}")
                           for i in range(start, min(start + 10_000, args.records))])
        before, _ = write_load(db, args.duration, args.writers, None)

        def backups():
            copies = []
            stop = time.perf_counter() + args.duration
            while time.perf_counter() < stop:
                dest = os.path.join(root, f"dest-{len(copies)}")
                started = time.perf_counter()
                # What stemedb-backup.service runs: another process, at nice 10.
                done = subprocess.run([sys.executable, "-m", "stemedb", "backup", "--data", db.path,
                                       "--to", dest, "--json"], capture_output=True, text=True,
                                      check=True, preexec_fn=lambda: os.nice(10))
                copies.append((json.loads(done.stdout)["copied_bytes"],
                               time.perf_counter() - started))
                shutil.rmtree(dest)
            return copies

        during, copies = write_load(db, args.duration, args.writers, backups)
        after, _ = write_load(db, args.duration, args.writers, None)
        alone = (before + after) / 2      # either side of the backups: warm-up and growth even out
        started = time.perf_counter()
        quiet = backup(db.path, os.path.join(root, "dest-quiet"))
        quiet_seconds = time.perf_counter() - started
        db.close()
        copied = sum(b for b, _ in copies)
        spent = sum(t for _, t in copies)
        print(f"store: {args.records:,} records; {len(copies)} full backup(s) of "
              f"{copies[0][0] / 2**20:,.1f} MiB during {args.duration:g} s of writes")
        # The target is in MB/s (10⁶ bytes); MiB/s beside it.
        print(f"backup rate while writing: {copied / 1e6 / spent:,.0f} MB/s "
              f"({copied / 2**20 / spent:,.0f} MiB/s)   (target ≥ 200 MB/s)")
        print(f"backup rate, no writes, in-process: {quiet.bytes / 1e6 / quiet_seconds:,.0f} MB/s "
              f"({quiet.bytes / 2**20:,.1f} MiB)")
        print(f"writes: {alone:,.0f} records/s alone, {during:,.0f} during backups: "
              f"{100 * (1 - during / alone):.0f} % slower   (target ≤ 20 %)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
