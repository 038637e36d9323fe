"""B9, B10 and the B7 catch-up rate of BENCHMARKS.md: a three-node cluster on loopback.

    PYTHONPATH=src python bench/bench_cluster.py [--records 100000] [--rate 10000]
        [--seconds 10] [--gap 100000] [--catchup 1000000] [--runs 5] [--only B9,B9t,B10,B7c]
        [--json out.json]

Every server is its own `python -m stemedb serve` process on 127.0.0.1 (durability
"sync"), the cluster three nodes from one cluster file (replication factor 2,
256 partitions). Figures are the median of --runs runs (min-max); the machine's
load average is printed with them.

  B9t  write throughput: --records assertions (the bench/workload.py shape), group-signed
       on the client (one envelope per 500), over 4 connections — to a single server,
       and to the cluster with acks=1 and with acks=all (the connections spread over
       the three nodes); then read back by ID (get_many of 1,000) the same way.
       Target: cluster acks=all writes >= 0.5 x the single server's.
  B9   push lag: writes paced at --rate records/s for --seconds through the three nodes
       (acks=1); the push delay of each batch — queued on the node that stored it to
       confirmed durable by the other replica — as p50 / p99 over every node and peer
       (CLUSTER_STATUS, push.delay_p50_seconds / delay_p99_seconds, the last 10,000
       batches of each queue). Target: p99 <= 100 ms at 10 K writes/s.
  B10  catch-up after a kill: n3 is SIGKILLed, --gap records are written through n1 and
       n2 (acks=1), n3 restarts on its data directory; the time from its restart until
       `stemedb cluster status` shows every replica agreeing. Target: <= 10 s for 100 K.
  B7c  catch-up rate: `stemedb sync --data EMPTY --peer URL --pull` against a single
       server holding --catchup records; records received per second of the command's
       session. Target: >= 200 K records/s at 1 M.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
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

from workload import in_threads  # noqa: E402

import stemedb  # noqa: E402
from stemedb.client import connect  # noqa: E402

CONNECTIONS = 4
READ_BATCH = 1000
WRITE_BATCH = 500
NODES = ("n1", "n2", "n3")
SIGNER = stemedb.Signer.from_seed(b"\x09" * 32)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [int(sock.getsockname()[1]) for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def environment() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(SRC))


def start(args: list[str], log: pathlib.Path) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    with open(log, "a") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "stemedb", "serve", *args], stdout=subprocess.PIPE,
                                   stderr=stderr, text=True, env=environment())
    line = process.stdout.readline() if process.stdout else ""
    if not line:
        process.kill()
        raise RuntimeError(f"the server did not start: {log.read_text()[-2000:]}")
    return process, json.loads(line)


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()


class Single:
    def __init__(self, root: pathlib.Path) -> None:
        self.data = pathlib.Path(tempfile.mkdtemp(prefix="single-", dir=root))
        self.process, announced = start(["--data", str(self.data), "--listen", "127.0.0.1:0"],
                                        root / "single.log")
        self.urls = [f"stemedb://{announced['listen']}"]

    def stop(self) -> None:
        stop(self.process)
        shutil.rmtree(self.data, ignore_errors=True)


class Cluster:
    def __init__(self, root: pathlib.Path, acks: str) -> None:
        self.root = pathlib.Path(tempfile.mkdtemp(prefix=f"cluster-{acks}-", dir=root))
        ports = free_ports(len(NODES))
        self.addresses = {n: f"127.0.0.1:{p}" for n, p in zip(NODES, ports)}
        self.file = self.root / "cluster.toml"
        self.file.write_text(
            f'name = "bench"\nversion = 1\nreplication_factor = 2\npartitions = 256\nacks = "{acks}"\n'
            + "".join(f'[[nodes]]\nid = "{n}"\naddress = "{a}"\n' for n, a in self.addresses.items())
            + "[replication]\nheartbeat_interval = 0.2\nsuspect_after = 1.0\ndown_after = 2.0\n")
        self.processes: dict[str, subprocess.Popen[str]] = {}
        for node in NODES:
            self.start(node)
        self.urls = [f"stemedb://{self.addresses[n]}" for n in NODES]
        self.wait_agreeing(60)

    def start(self, node: str) -> None:
        self.processes[node], _ = start(["--data", str(self.root / node), "--cluster", str(self.file),
                                         "--node", node], self.root / f"{node}.log")

    def kill(self, node: str) -> None:
        process = self.processes.pop(node)
        process.send_signal(signal.SIGKILL)
        process.wait(30)

    def status(self) -> dict[str, Any]:
        from stemedb.cli.cluster import collect

        return collect(str(self.file), "")

    def wait_agreeing(self, limit: float) -> float:
        started = time.perf_counter()
        while True:
            report = self.status()
            if report["agree"] and all(s == "up" for s in report["states"].values()):
                return time.perf_counter() - started
            if time.perf_counter() - started > limit:
                raise RuntimeError(f"the replicas did not agree within {limit:.0f} s")
            time.sleep(0.1)

    def stop(self) -> None:
        for process in self.processes.values():
            stop(process)
        shutil.rmtree(self.root, ignore_errors=True)


def write_all(urls: list[str], records: list[Any]) -> tuple[float, list[bytes]]:
    shares = [records[i::CONNECTIONS] for i in range(CONNECTIONS)]
    clients = [connect(urls[i % len(urls)], timeout=120) for i in range(CONNECTIONS)]
    writers = [client.writer(SIGNER, max_records=WRITE_BATCH) for client in clients]
    ids: list[list[bytes]] = [[] for _ in shares]

    def work(index: int) -> None:
        ids[index] = [ticket.result(120) for ticket in writers[index].submit_many(shares[index])]

    elapsed = in_threads(work, CONNECTIONS)
    for writer, client in zip(writers, clients):
        writer.close()
        client.close()
    return elapsed, [i for share in ids for i in share]


def read_all(urls: list[str], ids: list[bytes]) -> float:
    shares = [ids[i::CONNECTIONS] for i in range(CONNECTIONS)]
    clients = [connect(urls[i % len(urls)], timeout=120) for i in range(CONNECTIONS)]
    missing = [0] * CONNECTIONS

    def work(index: int) -> None:
        share = shares[index]
        for start_at in range(0, len(share), READ_BATCH):
            found = clients[index].get_many(share[start_at:start_at + READ_BATCH])
            missing[index] += sum(1 for r in found if r is None)

    elapsed = in_threads(work, CONNECTIONS)
    for client in clients:
        client.close()
    if sum(missing):
        raise RuntimeError(f"{sum(missing)} records written were not read back")
    return elapsed


def paced_writes(urls: list[str], records: list[Any], rate: float) -> float:
    """Write `records` through every node at `rate` records/s in all (batches of 100); the rate reached."""
    per_thread = [records[i::len(urls)] for i in range(len(urls))]
    batch = 100
    interval = batch * len(urls) / rate

    def work(index: int) -> None:
        with connect(urls[index], timeout=120) as client:
            writer = client.writer(SIGNER, max_records=batch, linger=0.0005)
            share = per_thread[index]
            started = time.perf_counter()
            tickets = []
            for k, first in enumerate(range(0, len(share), batch)):
                delay = started + k * interval - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                tickets += writer.submit_many(share[first:first + batch])
            for ticket in tickets:
                ticket.result(120)
            writer.close()

    return len(records) / in_threads(work, len(urls))


def push_delays(cluster: Cluster) -> tuple[float, float]:
    """The largest p50 and p99 push delay over every node and peer (seconds)."""
    report = cluster.status()
    p50s, p99s = [], []
    for node in report["nodes"].values():
        for queue in node.get("push", {}).values():
            if queue.get("delay_samples"):
                p50s.append(queue["delay_p50_seconds"])
                p99s.append(queue["delay_p99_seconds"])
    if not p99s:
        raise RuntimeError("no push delays reported")
    return max(p50s), max(p99s)


def push_stages(cluster: Cluster) -> dict[str, float]:
    """Where the push delay goes, the largest over every node (and peer), seconds: waiting in the
    sender's queue, the push's round trip, and on the receiver waiting for a thread and storing."""
    report = cluster.status()
    stages: dict[str, float] = {}

    def worst(name: str, value: float | None) -> None:
        if value is not None:
            stages[name] = max(stages.get(name, 0.0), value)

    for node in report["nodes"].values():
        for queue in node.get("push", {}).values():
            worst("queue wait p99", queue.get("wait_p99_seconds"))
            worst("round trip p50", queue.get("send_p50_seconds"))
            worst("round trip p99", queue.get("send_p99_seconds"))
        intake = node.get("intake", {})
        worst("intake thread wait p99", intake.get("wait_p99_seconds"))
        worst("intake store p50", intake.get("store_p50_seconds"))
        worst("intake store p99", intake.get("store_p99_seconds"))
    return stages


def b7_catchup(root: pathlib.Path, records: list[Any]) -> float:
    server = Single(root)
    empty = pathlib.Path(tempfile.mkdtemp(prefix="replica-", dir=root))
    try:
        write_all(server.urls, records)
        done = subprocess.run([sys.executable, "-m", "stemedb", "sync", "--data", str(empty / "store"),
                               "--peer", server.urls[0], "--pull", "--json"], capture_output=True, text=True,
                              env=environment(), timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(done.stderr)
        figures = json.loads(done.stdout)
        if figures["received"] < len(records):
            raise RuntimeError(f"received {figures['received']} of {len(records)}")
        return float(figures["received"] / figures["seconds"])
    finally:
        server.stop()
        shutil.rmtree(empty, ignore_errors=True)


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000, help="B9t records per run")
    parser.add_argument("--rate", type=float, default=10_000, help="B9 writes per second")
    parser.add_argument("--seconds", type=float, default=10, help="B9 seconds of paced writes")
    parser.add_argument("--gap", type=int, default=100_000, help="B10 records written while n3 is down")
    parser.add_argument("--catchup", type=int, default=1_000_000, help="B7c store size")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only", default="B9t,B9,B10,B7c")
    parser.add_argument("--dir", default=None, help="where the stores live (default: the system temp dir)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    import workload

    only = set(args.only.split(","))
    root = pathlib.Path(tempfile.mkdtemp(prefix="bench-cluster-", dir=args.dir))
    print(f"cluster benchmarks: {args.runs} runs, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}, load {os.getloadavg()}")
    results: dict[str, Any] = {"load_before": os.getloadavg()}
    runs: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        runs.setdefault(name, []).append(value)

    def fresh(n: int, seed: int) -> list[Any]:
        return workload.generate(n, seed=seed, votes=False, signers=0).assertions

    try:
        for run in range(1, args.runs + 1):
            if "B9t" in only:
                records = fresh(args.records, 100 + run)
                for name, target in (("single", lambda: Single(root)), ("acks=1", lambda: Cluster(root, "1")),
                                     ("acks=all", lambda: Cluster(root, "all"))):
                    servers = target()
                    try:
                        seconds, ids = write_all(servers.urls, records)
                        add(f"B9t write {name} (records/s)", len(records) / seconds)
                        add(f"B9t read {name} (records/s)", len(ids) / read_all(servers.urls, ids))
                    finally:
                        servers.stop()
                ratio = runs["B9t write acks=all (records/s)"][-1] / runs["B9t write single (records/s)"][-1]
                add("B9t acks=all / single", ratio)
            if "B9" in only:
                cluster = Cluster(root, "1")
                try:
                    reached = paced_writes(cluster.urls, fresh(int(args.rate * args.seconds), 200 + run),
                                           args.rate)
                    p50, p99 = push_delays(cluster)
                    add("B9 writes/s reached", reached)
                    add("B9 push delay p50 (ms)", p50 * 1000)
                    add("B9 push delay p99 (ms)", p99 * 1000)
                    for stage, seconds in push_stages(cluster).items():
                        add(f"B9 stage {stage} (ms)", seconds * 1000)
                finally:
                    cluster.stop()
            if "B10" in only:
                cluster = Cluster(root, "1")
                try:
                    cluster.kill("n3")
                    write_all(cluster.urls[:2], fresh(args.gap, 300 + run))
                    started = time.perf_counter()
                    cluster.start("n3")
                    cluster.wait_agreeing(600)
                    add("B10 catch-up (s)", time.perf_counter() - started)
                finally:
                    cluster.stop()
            if "B7c" in only:
                add("B7c catch-up (records/s)", b7_catchup(root, fresh(args.catchup, 400 + run)))
            print(f"run {run}: " + ", ".join(f"{k} {v[-1]:,.2f}" for k, v in runs.items()), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["figures"] = {name: summary(values) for name, values in runs.items()}
    results["load_after"] = os.getloadavg()
    for name, value in results["figures"].items():
        print(f"{name:<36} {value['median']:>14,.2f}  ({value['min']:,.2f}-{value['max']:,.2f}, "
              f"{value['runs']} runs)")
    print(f"load average before {results['load_before']}, after {results['load_after']}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
