"""Simulated nodes: a real store and the production replication code, crashable and restartable.

Owns: `SimNode` — one node's store (stemedb.open on its own directory,
through the power-loss file layer of tests/faults.py), its EngineStore and
ClusterNode, the production server (stemedb.server.Server) that answers its
peers' binary-protocol connections and hands the replication opcodes to the
ClusterNode, the cancel scope its tasks run in, and crash / restart / wipe;
and `SimCluster`, the nodes of one cluster file on one SimNetwork. Must
never: call the engine from a thread (the nodes run with the inline
run-blocking hook), or reach into a node other than through its network
address, except to check the outcome.

A crash cancels the node's tasks, breaks its connections, and takes a
crash image of its directory as a power loss at that instant would leave it
(FaultyFiles.crash_image); the restarted node opens that image. The old
store is closed with snapshots disabled (its directory is discarded).

Resource handling: every store is closed by `SimCluster.close()` (or by the
crash that replaces it).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing
from faults import FaultyFiles

import stemedb
from stemedb.errors import Unavailable
from stemedb.replication.antientropy import run_inline
from stemedb.replication.cluster import ClusterFile
from stemedb.replication.framing import RecordBatch
from stemedb.replication.node import ClusterNode, WriteResult
from stemedb.replication.placement import Placement
from stemedb.replication.store import EngineStore
from stemedb.server import Server, ServerConfig

from .network import SimNetwork

SEGMENT_SIZE = 256 << 10
# Every simulated connection comes from loopback: the servers run in protected mode (no
# tokens), where a loopback peer is admin, a role that may send the replication opcodes.
LOOPBACK_PEER = ("127.0.0.1", 0)


@dataclass
class SimNode:
    node_id: str
    cluster: ClusterFile
    placement: Placement
    network: SimNetwork
    base: str
    rng: random.Random
    generation: int = 0
    files: FaultyFiles | None = None
    db: Any = None
    store: EngineStore | None = None
    node: ClusterNode | None = None
    server: Server | None = None
    crashes: int = 0
    _scope: trio.CancelScope | None = None
    _stopped: trio.Event | None = None
    _nursery: trio.Nursery | None = None
    history: list[str] = field(default_factory=list)

    @property
    def path(self) -> str:
        return os.path.join(self.base, f"{self.node_id}.{self.generation}")

    @property
    def running(self) -> bool:
        return self._nursery is not None

    def open_store(self) -> None:
        os.makedirs(self.path, exist_ok=True)
        self.files = FaultyFiles(self.path, sync_for_real=False)
        self.db = stemedb.open(self.path, segment_size=SEGMENT_SIZE, files=self.files)
        self.store = EngineStore(self.db, self.placement)

    async def start(self, nursery: trio.Nursery) -> None:
        if self.db is None:
            self.open_store()
        assert self.store is not None
        self.node = ClusterNode(self.cluster, self.node_id, self.store,
                                self.network.connector(self.node_id), run_blocking=run_inline,
                                rng=random.Random(self.rng.getrandbits(64)))
        self.server = Server(self.db, ServerConfig(name=self.node_id), replication=self.node,
                             run_blocking=run_inline)
        self._stopped = trio.Event()
        await nursery.start(self._run)
        self.history.append(f"{trio.current_time():.3f} start")

    async def _run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        assert self.node is not None and self.server is not None and self._stopped is not None
        server = self.server

        async def serve(stream: trio.abc.Stream) -> None:
            await server.handle_stream(stream, LOOPBACK_PEER)

        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    self.network.listen(self.node_id, serve, nursery)
                    await nursery.start(self.node.run)
                    task_status.started()
        finally:
            self._nursery = None
            self._stopped.set()

    async def server_stream(self) -> trio.abc.Stream:
        """A client's connection to this node's server (from loopback: admin in protected mode)."""
        if not self.running or self._nursery is None or self.server is None:
            raise OSError(f"{self.node_id} is down")
        client, served = trio.testing.memory_stream_pair()
        self._nursery.start_soon(self.server.handle_stream, served, LOOPBACK_PEER)
        return client

    async def crash(self, *, wipe: bool = False) -> None:
        """Power loss: tasks gone, connections broken, the disk as the last syncs left it."""
        if not self.running:
            return
        assert self._scope is not None and self._stopped is not None and self.files is not None
        self.network.unlisten(self.node_id)
        self.network.disconnect(self.node_id)
        self._scope.cancel()
        await self._stopped.wait()
        old_path, old_files = self.path, self.files
        self.generation += 1
        if not wipe:
            old_files.crash_image(self.path, seed=self.rng.getrandbits(32))
        self._close_store(old_files)
        self.crashes += 1
        self.history.append(f"{trio.current_time():.3f} crash{' (wiped)' if wipe else ''} {old_path}")

    async def restart(self, nursery: trio.Nursery) -> None:
        if self.running:
            return
        self.open_store()
        await self.start(nursery)

    def _close_store(self, files: FaultyFiles) -> None:
        # The directory is discarded: skip the shutdown snapshot (tens of file syncs).
        files.fail("write_file", errno=errno.EIO, times=None)
        if self.store is not None:
            self.store.close()
        if self.db is not None:
            self.db.close()
        self.db = self.store = None

    async def write(self, batch: RecordBatch, acks: str | None, timeout: float) -> WriteResult:
        """A client's write through this node; Unavailable if the node is down or dies meanwhile."""
        nursery, node = self._nursery, self.node
        if nursery is None or node is None:
            raise Unavailable(f"{self.node_id} is down")
        outcome: list[Any] = []
        done = trio.Event()

        async def run() -> None:
            try:
                outcome.append(await node.write(batch, acks))
            except Exception as exc:   # the client sees every failure as "not acknowledged"
                outcome.append(exc)
            finally:
                done.set()

        nursery.start_soon(run)
        with trio.move_on_after(timeout):
            await done.wait()
        if not outcome:
            raise Unavailable(f"{self.node_id} did not answer the write in {timeout} s")
        if isinstance(outcome[0], Exception):
            raise outcome[0]
        return outcome[0]  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.files is not None:
            self._close_store(self.files)


class SimCluster:
    """The nodes of one cluster file on one simulated network."""

    def __init__(self, cluster: ClusterFile, network: SimNetwork, base: str, rng: random.Random) -> None:
        self.cluster = cluster
        self.network = network
        self.placement = Placement(cluster)
        self.nodes = {n.id: SimNode(n.id, cluster, self.placement, network, base,
                                    random.Random(rng.getrandbits(64))) for n in cluster.nodes}
        self.nursery: trio.Nursery | None = None

    async def start(self, nursery: trio.Nursery) -> None:
        for node in self.nodes.values():
            await node.start(nursery)

    def close(self) -> None:
        for node in self.nodes.values():
            node.close()


@contextlib.asynccontextmanager
async def running(cluster: ClusterFile, base: str, seed: int = 0) -> AsyncIterator[SimCluster]:
    """A started SimCluster on a fault-free SimNetwork; everything stops on exit."""
    rng = random.Random(seed)
    async with trio.open_nursery() as nursery:
        network = SimNetwork(random.Random(rng.getrandbits(64)), nursery)
        sim = SimCluster(cluster, network, base, random.Random(rng.getrandbits(64)))
        sim.nursery = nursery
        try:
            await sim.start(nursery)
            yield sim
        finally:
            nursery.cancel_scope.cancel()
            sim.close()


async def wait_until(condition: Callable[[], bool], timeout: float = 30.0, step: float = 0.05) -> float:
    """Sleep (simulated time) until `condition()`; returns the time waited; AssertionError on timeout."""
    started = trio.current_time()
    while not condition():
        if trio.current_time() - started > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await trio.sleep(step)
    return trio.current_time() - started
