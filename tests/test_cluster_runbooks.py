"""The cluster runbooks of docs/operations/, run as written (on free ports instead of 7451-7463).

Each runbook's ```sh blocks run in order, in one working directory, through
bash with a `stemedb` on PATH that runs this tree's package: first
one-node-to-three (records are written to the single server before it
becomes node n1), then add-a-node, then replace-a-failed-node (after n3 is
SIGKILLed, its data directory is wiped and it is rebuilt; then it moves to a
new address). After each runbook every record written must be readable
through every node and `stemedb cluster status` must exit 0 (replicas agree).
Marked slow: it starts and restarts nine server processes.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys

import pytest

import stemedb
from stemedb import _protocol
from stemedb.client import connect

ROOT = pathlib.Path(__file__).resolve().parent.parent
SRC = str(pathlib.Path(stemedb.__file__).resolve().parent.parent)
RUNBOOKS = ROOT / "docs" / "operations"
PORTS = ("7451", "7452", "7453", "7454", "7463")
SIGNER = stemedb.Signer.from_seed(b"\x33" * 32)


def shell_blocks(name: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", (RUNBOOKS / name).read_text(), re.DOTALL)


def free_ports(count: int) -> list[str]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [str(sock.getsockname()[1]) for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


class Operator:
    def __init__(self, workdir: pathlib.Path) -> None:
        self.workdir = workdir
        self.ports = dict(zip(PORTS, free_ports(len(PORTS))))
        bin_dir = workdir / "bin"
        bin_dir.mkdir()
        wrapper = bin_dir / "stemedb"
        wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m stemedb "$@"\n')
        wrapper.chmod(0o755)
        self.env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{pathlib.Path(sys.executable).parent}"
                        f"{os.pathsep}{os.environ['PATH']}",
                        PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def address(self, port: str) -> str:
        return f"127.0.0.1:{self.ports[port]}"

    def run(self, block: str) -> None:
        for documented, free in self.ports.items():
            block = block.replace(documented, free)
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=self.workdir, env=self.env,
                              capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, f"{block}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"

    def kill_all(self) -> None:
        for pid_file in self.workdir.glob("*.pid"):
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass

    def nodes(self) -> list[str]:
        text = (self.workdir / "cluster.toml").read_text()
        return re.findall(r'address = "([^"]+)"', text)

    def check(self, ids: list[bytes]) -> dict:
        for address in self.nodes():
            with connect(f"stemedb://{address}", timeout=30) as client:
                found = client.get_many(ids)
                assert sum(1 for r in found if r is None) == 0, f"records missing through {address}"
        status = subprocess.run(["stemedb", "cluster", "status", "--cluster", "cluster.toml", "--json"],
                                cwd=self.workdir, env=self.env, capture_output=True, text=True, timeout=60)
        report: dict = json.loads(status.stdout)
        assert status.returncode == 0 and report["agree"]
        return report


@pytest.mark.slow
def test_the_cluster_runbooks_work_as_written(tmp_path):
    operator = Operator(tmp_path)
    try:
        first, *rest = shell_blocks("one-node-to-three.md")
        operator.run(first)
        records = [stemedb.Assertion(f"patient-{i}", "reading", i).sign(SIGNER) for i in range(300)]
        with connect(f"stemedb://{operator.address('7451')}") as client:
            ids = client.put_many(records)
        for block in rest:
            operator.run(block)
        report = operator.check(ids)
        assert sorted(report["nodes"]) == ["n1", "n2", "n3"]
        for block in shell_blocks("add-a-node.md"):
            operator.run(block)
        report = operator.check(ids)
        assert sorted(report["nodes"]) == ["n1", "n2", "n3", "n4"] and report["version"] == 2
        assert report["nodes"]["n4"]["records"] > 0
        os.kill(int((tmp_path / "n3.pid").read_text()), signal.SIGKILL)   # n3 fails
        for block in shell_blocks("replace-a-failed-node.md"):
            operator.run(block)
        report = operator.check(ids)
        assert report["version"] == 3 and report["nodes"]["n3"]["address"] == operator.address("7463")
        assert report["nodes"]["n3"]["records"] > 0
    finally:
        operator.kill_all()


def test_the_deploy_example_is_one_cluster_of_three_nodes_the_compose_file_starts():
    """deploy/cluster: both cluster files load and agree; compose runs each node with its id.
    (Docker cannot run here: the compose file itself is checked as text.)"""
    from stemedb.replication.cluster import ClusterFile
    from stemedb.server import ServerConfig

    deploy = ROOT / "deploy" / "cluster"
    compose_file = ClusterFile.load(deploy / "cluster.toml")
    loopback = ClusterFile.load(deploy / "cluster-loopback.toml")
    assert compose_file.node_ids == loopback.node_ids == ("n1", "n2", "n3")
    assert (compose_file.replication_factor, compose_file.partitions, compose_file.acks) == (
        loopback.replication_factor, loopback.partitions, loopback.acks) == (2, 256, "all")
    assert [n.address for n in loopback.nodes] == ["127.0.0.1:7451", "127.0.0.1:7452", "127.0.0.1:7453"]
    compose = (deploy / "compose.yaml").read_text()
    for node in compose_file.nodes:
        assert node.address == f"{node.id}:7440"
        assert re.search(rf"^  {node.id}:\n", compose, re.MULTILINE), node.id
        assert (f'"--cluster", "/etc/stemedb/cluster.toml", "--node", "{node.id}"' in compose
                and f"{node.id}-data:/var/lib/stemedb" in compose)
    assert "./cluster.toml:/etc/stemedb/cluster.toml:ro" in compose
    ServerConfig.load(deploy / "stemedb.toml")
    environment = dict(line.split("=", 1) for line in (deploy / "example.env").read_text().splitlines()
                       if line and not line.startswith("#"))
    assert set(environment) == {"STEMEDB_CLUSTER_TOKEN", "STEMEDB_TOKENS"}
    config = ServerConfig.resolve(deploy / "stemedb.toml", environ=environment)
    assert [t.role for t in config.tokens] == [_protocol.ROLE_REPLICA] and config.cluster_token
