"""B5 of BENCHMARKS.md: the server over loopback against redis-server, in the same run.

    PYTHONPATH=src python bench/bench_server.py [--records 100000] [--runs 3]
        [--connections 1,16,64] [--processes 4] [--json out.json]

Both servers run as their own processes on 127.0.0.1; both are durable:
ours with durability="sync" (a write is acknowledged after the fdatasync that
covers it), redis-server with `--appendonly yes --appendfsync always --save ''`
(started here on a free port, in a temporary directory). Every figure is the
median of --runs runs (min-max); ours and Redis alternate inside each run, and
each ratio is the median of the per-run ratios.

  write    --records assertions of the bench/workload.py shape (~200 bytes),
           unsigned, through `client.writer(signer)` — group signing on the
           client (one envelope per batch), pipelined batches, each record
           acknowledged once durable — split over C connections (one thread and
           one client each). Redis: SET of values of the same size, pipelined
           1,000 per round trip (redis-py), over C connections.
  read     the same records read back by ID: `client.get_many` of 1,000 IDs per
           round trip (decoded into record objects) vs redis-py pipelined GET of
           1,000 keys per round trip.
  capacity --processes client processes × 4 connections each, writing through
           writers as above, vs `redis-benchmark -P 16 -c 50 -t set -d 200`
           (C, 50 connections, 16 pipelined commands each).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pathlib
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(SRC))

import redis  # noqa: E402
from workload import in_threads  # noqa: E402

import stemedb  # noqa: E402
from stemedb.client import connect  # noqa: E402

READ_BATCH = 1000
REDIS_PIPELINE = 1000


# --------------------------------------------------------------- processes

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OurServer:
    """`python -m stemedb.server` on a fresh data directory."""

    def __init__(self, root: pathlib.Path) -> None:
        self.data = pathlib.Path(tempfile.mkdtemp(prefix="stemedb-b5-", dir=root))
        env = dict(os.environ, PYTHONPATH=str(SRC))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stemedb.server", "--data", str(self.data), "--listen", "127.0.0.1:0",
             "--log-level", "ERROR"], stdout=subprocess.PIPE, text=True, env=env)
        assert self.process.stdout is not None
        self.url = "stemedb://" + json.loads(self.process.stdout.readline())["listen"]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(120)
        shutil.rmtree(self.data, ignore_errors=True)


class RedisServer:
    """redis-server with every write fsynced before it is acknowledged."""

    def __init__(self, root: pathlib.Path) -> None:
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="redis-b5-", dir=root))
        self.port = free_port()
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
             "--protected-mode", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=self.port).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        config = redis.Redis(port=self.port).config_get("appendfsync")
        assert config["appendfsync"] == "always", config
        self.version = redis.Redis(port=self.port).info()["redis_version"]

    def flush(self) -> None:
        redis.Redis(port=self.port).flushall()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------- workloads

def split(items: list[Any], parts: int) -> list[list[Any]]:
    size = (len(items) + parts - 1) // parts
    return [items[i:i + size] for i in range(0, len(items), size)]


def ours_write(url: str, records: list[Any], connections: int, signer: stemedb.Signer) -> tuple[float, list[bytes]]:
    clients = [connect(url) for _ in range(connections)]
    shares = split(records, connections)
    ids: list[list[bytes]] = [[] for _ in shares]
    writers = [client.writer(signer) for client in clients]

    def work(index: int) -> None:
        ids[index] = [ticket.result(120) for ticket in writers[index].submit_many(shares[index])]

    elapsed = in_threads(work, len(shares))
    for writer, client in zip(writers, clients):
        writer.close()
        client.close()
    return elapsed, [i for share in ids for i in share]


def ours_read(url: str, ids: list[bytes], connections: int) -> float:
    clients = [connect(url) for _ in range(connections)]
    shares = split(ids, connections)
    found = [0] * len(shares)

    def work(index: int) -> None:
        share = shares[index]
        for start in range(0, len(share), READ_BATCH):
            records = clients[index].get_many(share[start:start + READ_BATCH])
            found[index] += sum(1 for r in records if r is not None)

    elapsed = in_threads(work, len(shares))
    for client in clients:
        client.close()
    assert sum(found) == len(ids), (sum(found), len(ids))
    return elapsed


def redis_write(port: int, values: list[bytes], connections: int) -> float:
    pools = [redis.Redis(port=port) for _ in range(connections)]
    keys = [f"rec:{i}" for i in range(len(values))]
    shares = split(list(zip(keys, values)), connections)

    def work(index: int) -> None:
        client = pools[index]
        share = shares[index]
        for start in range(0, len(share), REDIS_PIPELINE):
            pipe = client.pipeline(transaction=False)
            for key, value in share[start:start + REDIS_PIPELINE]:
                pipe.set(key, value)
            pipe.execute()

    return in_threads(work, len(shares))


def redis_read(port: int, count: int, connections: int) -> float:
    pools = [redis.Redis(port=port) for _ in range(connections)]
    shares = split([f"rec:{i}" for i in range(count)], connections)
    found = [0] * len(shares)

    def work(index: int) -> None:
        client = pools[index]
        share = shares[index]
        for start in range(0, len(share), REDIS_PIPELINE):
            pipe = client.pipeline(transaction=False)
            for key in share[start:start + REDIS_PIPELINE]:
                pipe.get(key)
            found[index] += sum(1 for v in pipe.execute() if v is not None)

    elapsed = in_threads(work, len(shares))
    assert sum(found) == count
    return elapsed


def capacity_worker(url: str, count: int, seed: int, connections: int, queue: Any, go: Any) -> None:
    sys.path.insert(0, str(HERE))
    import workload

    records = workload.generate(count, seed=seed, votes=False, signers=0).assertions
    signer = stemedb.Signer.from_seed(seed.to_bytes(4, "little") * 8)
    queue.put("ready")
    go.wait()
    elapsed, ids = ours_write(url, records, connections, signer)
    queue.put((len(ids), elapsed))


def ours_capacity(url: str, processes: int, per_process: int, connections: int) -> float:
    context = multiprocessing.get_context("spawn")
    queue, go = context.Queue(), context.Event()
    workers = [context.Process(target=capacity_worker, args=(url, per_process, 1000 + i, connections, queue, go))
               for i in range(processes)]
    for worker in workers:
        worker.start()
    for _ in workers:
        assert queue.get(timeout=600) == "ready"
    started = time.perf_counter()
    go.set()
    written = sum(queue.get(timeout=600)[0] for _ in workers)
    elapsed = time.perf_counter() - started
    for worker in workers:
        worker.join()
    return written / elapsed


def redis_benchmark(port: int, requests: int) -> float:
    out = subprocess.run(
        ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-P", "16", "-c", "50", "-t", "set",
         "-n", str(requests), "-d", "200", "-q"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"SET: ([\d.]+) requests per second", out.replace("\r", "\n"))
    assert match, out
    return float(match.group(1))


# ------------------------------------------------------------------- report

def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt(value: dict[str, float]) -> str:
    return f"{value['median'] / 1000:8.1f} K/s ({value['min'] / 1000:.1f}-{value['max'] / 1000:.1f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--connections", default="1,16,64")
    parser.add_argument("--processes", type=int, default=4, help="client processes for the capacity row")
    parser.add_argument("--capacity-records", type=int, default=200_000)
    parser.add_argument("--dir", default=None, help="where the stores live (default: the system temp dir)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if shutil.which("redis-server") is None or shutil.which("redis-benchmark") is None:
        print("redis-server and redis-benchmark are needed: apt-get install -y redis-server", file=sys.stderr)
        return 2
    import workload

    root = pathlib.Path(tempfile.mkdtemp(prefix="bench-server-", dir=args.dir))
    connections = [int(c) for c in args.connections.split(",")]
    print(f"B5 server over loopback: {args.records:,} records, {args.runs} runs, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    records = workload.generate(args.records, seed=5, votes=False, signers=0).assertions
    signer = stemedb.Signer.from_seed(b"\x05" * 32)
    sizes = [len(r._with_proof((signer.public_key,), (), bytes(32)).encode()) for r in records[:2000]]
    value_size = int(statistics.mean(sizes))
    values = [os.urandom(value_size) for _ in range(args.records)]
    print(f"record size on the wire: mean {value_size} bytes (Redis values: {value_size} bytes)")
    rows: dict[str, dict[str, list[float]]] = {}

    def add(name: str, ours: float, peer: float) -> None:
        row = rows.setdefault(name, {"ours": [], "peer": [], "ratio": []})
        row["ours"].append(ours)
        row["peer"].append(peer)
        row["ratio"].append(ours / peer)

    redis_server = RedisServer(root)
    try:
        for run in range(args.runs + 1):  # run 0 warms up both
            for count in connections:
                ours = OurServer(root)
                try:
                    write_seconds, ids = ours_write(ours.url, records, count, signer)
                    read_seconds = ours_read(ours.url, ids, count)
                finally:
                    ours.stop()
                redis_server.flush()
                redis_write_seconds = redis_write(redis_server.port, values, count)
                redis_read_seconds = redis_read(redis_server.port, args.records, count)
                if run == 0:
                    continue
                n = args.records
                add(f"write, {count} conn", n / write_seconds, n / redis_write_seconds)
                add(f"read, {count} conn", n / read_seconds, n / redis_read_seconds)
                print(f"  run {run}, {count:2d} conn: ours write {n / write_seconds / 1000:.1f} K/s, "
                      f"read {n / read_seconds / 1000:.1f} K/s; Redis SET {n / redis_write_seconds / 1000:.1f} K/s, "
                      f"GET {n / redis_read_seconds / 1000:.1f} K/s", flush=True)
            if run == 0 or args.processes <= 0:
                continue
            ours = OurServer(root)
            try:
                capacity = ours_capacity(ours.url, args.processes, args.capacity_records // args.processes, 4)
            finally:
                ours.stop()
            redis_server.flush()
            peer = redis_benchmark(redis_server.port, args.capacity_records)
            add(f"capacity, {args.processes} procs", capacity, peer)
            print(f"  run {run}, capacity: ours {capacity / 1000:.1f} K/s ({args.processes} processes × 4 conn); "
                  f"redis-benchmark -P 16 -c 50 SET {peer / 1000:.1f} K/s", flush=True)
    finally:
        redis_server.stop()
        shutil.rmtree(root, ignore_errors=True)

    print(f"\nB5 (median of {args.runs} runs, min-max), durable writes; Redis {redis_server.version} "
          "appendfsync always")
    print(f"{'workload':24s} {'ours':>28s} {'Redis':>28s} {'ratio':>8s}")
    for name, row in rows.items():
        ratio = statistics.median(row["ratio"])
        print(f"{name:24s} {fmt(summary(row['ours'])):>28s} {fmt(summary(row['peer'])):>28s} {ratio:7.2f}x")
    targets = {"write": 3.0, "read": 1.0, "capacity": 1.0}
    print("targets (BENCHMARKS.md): writes ≥ 3× redis-py pipelined SET; reads ≥ 1× pipelined GET; "
          "capacity ≥ redis-benchmark -P 16 -c 50 SET")
    if args.json:
        document = {name: {"ours": summary(row["ours"]), "peer": summary(row["peer"]),
                           "ratio": statistics.median(row["ratio"]),
                           "target": targets[name.split(",")[0]]} for name, row in rows.items()}
        pathlib.Path(args.json).write_text(json.dumps(document, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
