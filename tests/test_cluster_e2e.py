"""End to end: three real `stemedb serve --cluster` processes on loopback.

Writes go through every node while one node is SIGKILLed and later
restarted on its data directory; the others keep taking writes and
answering reads of every subject; after the restart `stemedb cluster status`
(the command an operator runs) must show every partition's replicas
agreeing, and every acknowledged write must be readable through every node.
The cluster file's default is acks = "all": an acknowledged write is durable
on every replica that was up, so while one node is down each acknowledged
record is on a live node (docs/replication.md, "Acknowledgements").
Also `stemedb sync` between two standalone stores, both directions.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import anyio
import pytest

import stemedb
from stemedb.client import connect, connect_async

SRC = str(pathlib.Path(stemedb.__file__).resolve().parent.parent)
SIGNER = stemedb.Signer.from_seed(b"\x31" * 32)
NODES = ("n1", "n2", "n3")
GUARD = 120.0   # seconds: a hang guard only; every wait below ends far sooner on a working cluster
REPLICATION = ("heartbeat_interval = 0.2\nsuspect_after = 1.0\ndown_after = 2.0\n"
               "anti_entropy_interval = 2.0\nwrite_timeout = 3.0\n")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def environment() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))


def stemedb_command(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stemedb", *args], capture_output=True, text=True,
                          env=environment(), timeout=timeout)


class Cluster:
    def __init__(self, base: pathlib.Path, acks: str = "all", replication: str = REPLICATION) -> None:
        self.base = base
        ports = free_ports(len(NODES))
        self.addresses = {node: f"127.0.0.1:{port}" for node, port in zip(NODES, ports)}
        self.file = base / "cluster.toml"
        self.file.write_text(
            f'name = "e2e"\nversion = 1\nreplication_factor = 2\npartitions = 8\nacks = "{acks}"\n'
            + "".join(f'[[nodes]]\nid = "{n}"\naddress = "{a}"\n' for n, a in self.addresses.items())
            + "[replication]\n" + replication)
        self.processes: dict[str, subprocess.Popen[str]] = {}

    def url(self, node: str) -> str:
        return f"stemedb://{self.addresses[node]}"

    def start(self, node: str) -> dict[str, Any]:
        log = open(self.base / f"{node}.log", "a")
        process = subprocess.Popen(
            [sys.executable, "-m", "stemedb", "serve", "--data", str(self.base / node), "--cluster",
             str(self.file), "--node", node], stdout=subprocess.PIPE, stderr=log, text=True,
            env=environment())
        log.close()
        line = process.stdout.readline() if process.stdout else ""
        if not line:
            process.kill()
            raise AssertionError(f"{node} did not start: {(self.base / f'{node}.log').read_text()}")
        self.processes[node] = process
        return json.loads(line)

    def kill(self, node: str) -> None:
        process = self.processes.pop(node)
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def stop(self) -> None:
        for process in self.processes.values():
            process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        self.processes.clear()

    def status(self) -> dict[str, Any]:
        answer = stemedb_command("cluster", "status", "--cluster", str(self.file), "--json")
        assert answer.stdout, answer.stderr
        report: dict[str, Any] = json.loads(answer.stdout)
        assert answer.returncode == (0 if report["agree"] else 1)
        return report

    def wait_until(self, condition: Any, what: str) -> Any:
        deadline = time.monotonic() + GUARD
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {GUARD:.0f} s: {what}")
            time.sleep(0.3)


class Writers:
    """One writer per node: batches of 10 signed assertions, acknowledged IDs kept by node."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.acked: dict[str, list[bytes]] = {node: [] for node in NODES}
        self.subjects: set[str] = set()
        self.failures: dict[str, int] = dict.fromkeys(NODES, 0)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._write, args=(node,), daemon=True) for node in NODES]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def count(self, node: str) -> int:
        with self.lock:
            return len(self.acked[node])

    def _write(self, node: str) -> None:
        round_ = 0
        while not self.stop.is_set():
            try:
                with connect(self.cluster.url(node), retries=0, timeout=10) as client:
                    while not self.stop.is_set():
                        round_ += 1
                        records = [stemedb.Assertion(f"{node}-subject-{(round_ * 10 + i) % 97}", "reading",
                                                     round_ * 10 + i).sign(SIGNER) for i in range(10)]
                        ids = client.put_many(records)
                        with self.lock:
                            self.acked[node].extend(ids)
                            self.subjects.update(r.subject for r in records)
            except stemedb.StemeError:
                # Not acknowledged (the node is down, or a replica did not confirm in time):
                # nothing to keep; try again.
                with self.lock:
                    self.failures[node] += 1
                time.sleep(0.2)


def test_three_nodes_sigkill_one_during_writes_restart_and_replicas_agree(tmp_path):
    cluster = Cluster(tmp_path)
    writers = Writers(cluster)
    try:
        for node in NODES:
            announced = cluster.start(node)
            assert (announced["cluster"], announced["node"], announced["listen"]) == (
                "e2e", node, cluster.addresses[node])
        cluster.wait_until(lambda: all(s == "up" for s in cluster.status()["states"].values()),
                           "every node up")
        writers.start()
        cluster.wait_until(lambda: min(writers.count(n) for n in NODES) >= 100, "100 writes per node")
        cluster.kill("n3")                       # mid-write: n3's writer has a batch in flight
        before_kill = {n: writers.count(n) for n in NODES}
        cluster.wait_until(lambda: all(writers.count(n) >= before_kill[n] + 200 for n in ("n1", "n2")),
                           "200 more writes through each live node")
        down_view = cluster.status()
        assert "unreachable" in down_view["nodes"]["n3"]
        assert {down_view["nodes"][n]["peers"]["n3"]["state"] for n in ("n1", "n2")} <= {"suspect", "down"}

        # Reads while n3 is down: every acknowledged record, and a query of every subject,
        # through each live node.
        with writers.lock:
            acked_now = [i for ids in writers.acked.values() for i in ids]
            subjects = sorted(writers.subjects)
        for node in ("n1", "n2"):
            with connect(cluster.url(node), timeout=30) as client:
                found = client.get_many(acked_now)
                lost = [i.hex() for i, r in zip(acked_now, found) if r is None]
                assert lost == [], f"{len(lost)} acknowledged records not readable through {node}"
                for subject in subjects:
                    answer = client.query(subject, "reading")
                    assert answer.winner is not None and answer.winner.subject == subject

        cluster.start("n3")                      # the same data directory: it catches up by itself
        cluster.wait_until(lambda: min(writers.count(n) for n in NODES) >= before_kill["n3"] + 50,
                           "writes through the restarted node")
        writers.join()
        report = cluster.wait_until(lambda: (lambda r: r if r["agree"] else None)(cluster.status()),
                                    "stemedb cluster status showing every replica agreeing")
        acked = [i for ids in writers.acked.values() for i in ids]
        for node in NODES:
            with connect(cluster.url(node), timeout=30) as client:
                found = client.get_many(acked)
                assert [r.id for r in found if r is not None] == [i for i, r in zip(acked, found) if r]
                lost = sum(1 for r in found if r is None)
                assert lost == 0, f"{lost} of {len(acked)} acknowledged writes not readable through {node}"
        held = {n: report["nodes"][n]["records"] for n in NODES}
        print(f"\ncluster e2e: {len(acked)} acknowledged writes "
              f"({', '.join(f'{n} {len(writers.acked[n])}' for n in NODES)}), failed batches "
              f"{writers.failures}; n3 SIGKILLed after {before_kill['n3']} of its writes; after restart "
              f"the replicas agree; records held {held}")
        assert sum(held.values()) >= 2 * len(set(acked))   # replication factor 2
    finally:
        writers.stop.set()
        cluster.stop()


def test_the_client_chooses_the_acknowledgement_per_request(tmp_path):
    """The cluster file says acks = "1"; a client's `acks="all"` overrides it for one request.

    n3 is frozen (SIGSTOP) but still counted up by the others (suspect_after is
    long): a batch with subjects on every partition is then acknowledged with
    acks="1" (each record durable on one live replica) and refused with
    acks="all" (n3 never confirms), through put_many and through the writer;
    after SIGCONT n3 catches up and the replicas agree.
    """
    cluster = Cluster(tmp_path, acks="1", replication=(
        "heartbeat_interval = 0.2\nsuspect_after = 60.0\ndown_after = 120.0\n"
        "anti_entropy_interval = 1.0\nwrite_timeout = 1.5\n"))
    try:
        for node in NODES:
            cluster.start(node)
        cluster.wait_until(lambda: all(s == "up" for s in cluster.status()["states"].values()),
                           "every node up")

        def batch(tag: str) -> list[Any]:
            return [stemedb.Assertion(f"acks-{i}", "reading", tag).sign(SIGNER) for i in range(40)]

        with connect(cluster.url("n1"), retries=0, timeout=30) as client:
            with pytest.raises(stemedb.InvalidRequest, match="acks: expected"):
                client.put_many(batch("bad"), acks="2")
            assert client.put_many(batch("all, every node up"), acks="all")
            cluster.processes["n3"].send_signal(signal.SIGSTOP)
            try:
                acked = client.put_many(batch("one"), acks="1")
                assert len(acked) == 40
                with pytest.raises(stemedb.Unavailable, match="n3 did not confirm"):
                    client.put_many(batch("all, n3 frozen"), acks="all")
                writer = client.writer(SIGNER, acks="all")
                ticket = writer.submit(stemedb.Assertion("acks-writer", "reading", 1))
                with pytest.raises(stemedb.Unavailable, match="n3 did not confirm"):
                    ticket.result(30)
                writer.close()
                assert client.put_many(batch("default"))     # the file's acks = "1"

                async def through_the_async_client() -> None:
                    async with connect_async(cluster.url("n1"), retries=0, timeout=30) as aclient:
                        assert len(await aclient.put_many(batch("async one"), acks="1")) == 40
                        with pytest.raises(stemedb.Unavailable, match="n3 did not confirm"):
                            await aclient.put_many(batch("async all"), acks="all")
                anyio.run(through_the_async_client)
            finally:
                cluster.processes["n3"].send_signal(signal.SIGCONT)
            report = cluster.wait_until(lambda: (lambda r: r if r["agree"] else None)(cluster.status()),
                                        "the replicas agreeing after n3 thaws")
            assert report["agree"]
        with connect(cluster.url("n3"), timeout=30) as client:
            assert all(r is not None for r in client.get_many(acked))
    finally:
        for process in cluster.processes.values():
            process.send_signal(signal.SIGCONT)
        cluster.stop()


def test_stemedb_sync_between_two_standalone_stores(tmp_path):
    signer = stemedb.Signer.from_seed(b"\x32" * 32)
    mine = [stemedb.Assertion(f"local-{i}", "p", i).sign(signer) for i in range(30)]
    theirs = [stemedb.Assertion(f"remote-{i}", "p", i).sign(signer) for i in range(40)]
    local = tmp_path / "local"
    db = stemedb.open(local)
    db.put_many(mine)
    db.close()
    (port,) = free_ports(1)
    server = subprocess.Popen([sys.executable, "-m", "stemedb", "serve", "--data", str(tmp_path / "remote"),
                               "--listen", f"127.0.0.1:{port}"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=environment())
    try:
        assert server.stdout is not None and server.stdout.readline()
        with connect(f"stemedb://127.0.0.1:{port}") as client:
            client.put_many(theirs)
        first = stemedb_command("sync", "--data", str(local), "--peer", f"stemedb://127.0.0.1:{port}",
                                "--json")
        assert first.returncode == 0, first.stderr
        figures = json.loads(first.stdout)
        assert (figures["received"], figures["sent"], figures["error"]) == (40, 30, None)
        assert figures["round_trips"] >= 1 and figures["bytes_sent"] > figures["record_bytes_sent"] > 0
        again = json.loads(stemedb_command("sync", "--data", str(local), "--peer",
                                           f"127.0.0.1:{port}", "--json").stdout)
        assert (again["received"], again["sent"], again["round_trips"]) == (0, 0, 1)
        with connect(f"stemedb://127.0.0.1:{port}") as client:
            assert all(r is not None for r in client.get_many([r.id for r in mine]))
        text = stemedb_command("sync", "--data", str(local), "--peer", f"127.0.0.1:{port}", "--pull")
        assert text.returncode == 0 and "received      0 records" in text.stdout
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    db = stemedb.open(local)
    try:
        assert all(r.id in db for r in theirs) and len(db) == 70
    finally:
        db.close()


def test_stemedb_sync_to_a_server_that_does_not_answer_is_one_line(tmp_path):
    (port,) = free_ports(1)
    answer = stemedb_command("sync", "--data", str(tmp_path / "d"), "--peer", f"127.0.0.1:{port}")
    assert answer.returncode == 1
    assert answer.stderr.strip().count("\n") == 0 and f"127.0.0.1:{port}" in answer.stderr


@pytest.mark.parametrize("bad", ["http://x:1", "stemedb://"])
def test_stemedb_sync_refuses_a_bad_peer_url(tmp_path, bad):
    answer = stemedb_command("sync", "--data", str(tmp_path / "d"), "--peer", bad)
    assert answer.returncode == 2 and "--peer" in answer.stderr


def test_sighup_reloads_the_cluster_file_and_sync_with_runs_a_round_on_demand(tmp_path):
    """A node re-reads its cluster file on SIGHUP (version raised, a node added); `stemedb sync
    --url NODE --peer OTHER` runs an anti-entropy round between two nodes now."""
    cluster = Cluster(tmp_path)
    extra_port = free_ports(1)[0]
    text = cluster.file.read_text()
    two_nodes = text.split('[[nodes]]\nid = "n3"')[0] + "[replication]" + text.split("[replication]")[1]
    cluster.file.write_text(two_nodes)
    try:
        for node in ("n1", "n2"):
            cluster.start(node)
        with connect(cluster.url("n1")) as client:
            ids = client.put_many([stemedb.Assertion(f"hup-{i}", "p", i).sign(SIGNER) for i in range(20)])
        on_demand = stemedb_command("sync", "--url", cluster.url("n1"), "--peer", "n2", "--json")
        assert on_demand.returncode == 0, on_demand.stderr
        figures = json.loads(on_demand.stdout)
        assert (figures["node"], figures["ok"], figures["error"]) == ("n2", True, None)
        cluster.file.write_text(two_nodes.replace("version = 1", "version = 2").replace(
            "[replication]", f'[[nodes]]\nid = "n3"\naddress = "127.0.0.1:{extra_port}"\n[replication]'))
        cluster.processes["n1"].send_signal(signal.SIGHUP)

        def version_of_n1() -> int:
            with connect(cluster.url("n1")) as client:
                return int(client.stats()["server"]["cluster"]["version"])

        assert cluster.wait_until(lambda: version_of_n1() == 2, "n1 running version 2")
        assert cluster.processes["n1"].poll() is None          # reloaded, not stopped
        with connect(cluster.url("n2")) as client:
            assert all(r is not None for r in client.get_many(ids))
    finally:
        cluster.stop()
