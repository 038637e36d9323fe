"""One seed of the cluster simulation: a scenario drawn from the seed, then the checks after heal.

Owns: `run_seed(seed, base)` — draws the cluster (3 or 4 nodes, replication
factor, partitions, ack policy, push queue bounds), runs clients writing
through random nodes while a chaos task drops, delays, duplicates and tampers
with frames, cuts the network and crashes nodes (power loss) and restarts
them; then heals everything, lets anti-entropy converge, and checks the
properties of docs/replication.md, "Simulation": every replica of each
partition has the same fingerprint, holds every write acknowledged under the
policy, and nothing unverified was stored. Must never: use the wall clock,
threads, or randomness not drawn from the seed (trio's scheduler is made
deterministic and seeded too, as pytest-trio does under Hypothesis).

Error handling: a violated property raises SimulationFailure whose message
names the seed, the property, and the command that replays it.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing

from stemedb.errors import StemeError
from stemedb.replication.cluster import ClusterFile
from stemedb.replication.placement import GLOBAL, scope_of
from stemedb.replication.reconcile import WHOLE_STORE

from .cluster import SimCluster
from .forgery import Tamperer
from .network import SimNetwork
from .workload import Workload

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

REPLAY = "STEMEDB_SIM_SEED={seed} python -m pytest tests/test_cluster_sim.py::test_replay_seed -s"


class SimulationFailure(AssertionError):
    pass


@dataclass
class SimReport:
    seed: int
    nodes: int = 0
    replication_factor: int = 0
    partitions: int = 0
    writes: int = 0
    acked: int = 0
    acked_records: int = 0
    crashes: int = 0
    cuts: int = 0
    frames: int = 0
    dropped: int = 0
    duplicated: int = 0
    delayed: int = 0
    tampered: int = 0
    forged_refusals: int = 0
    push_dropped: int = 0
    repaired: int = 0           # records moved by the convergence rounds after heal
    passes: int = 0
    virtual_seconds: float = 0.0
    digest: str = ""
    events: list[str] = field(default_factory=list)


@dataclass
class Scenario:
    """What a seed draws before anything runs."""

    nodes: int
    replication_factor: int
    partitions: int
    acks: str
    push_queue_records: int
    chaos_seconds: float
    tamper: bool

    @classmethod
    def draw(cls, rng: random.Random) -> Scenario:
        nodes = 4 if rng.random() < 0.2 else 3
        factor = 3 if nodes == 3 and rng.random() < 0.2 else 2
        return cls(nodes=nodes, replication_factor=factor, partitions=rng.choice([4, 8, 16]),
                   acks=rng.choice(["1", "all"]),
                   push_queue_records=rng.choice([4, 1000, 100_000]),
                   chaos_seconds=rng.uniform(6, 12), tamper=rng.random() < 0.4)

    def cluster_file(self) -> ClusterFile:
        lines = ['name = "sim"', "version = 1", f"replication_factor = {self.replication_factor}",
                 f"partitions = {self.partitions}", f'acks = "{self.acks}"']
        for i in range(self.nodes):
            lines += ["[[nodes]]", f'id = "n{i + 1}"', f'address = "10.0.0.{i + 1}:7451"']
        lines += ["[replication]", "heartbeat_interval = 1.0", "suspect_after = 3.0",
                  "down_after = 8.0", "anti_entropy_interval = 4.0", "anti_entropy_jitter = 0.25",
                  f"push_queue_records = {self.push_queue_records}", "write_timeout = 2.0"]
        return ClusterFile.parse("\n".join(lines) + "\n", source="<simulation>")


@contextlib.contextmanager
def deterministic_scheduling(seed: int) -> Iterator[None]:
    """trio's run loop in its deterministic mode (the one pytest-trio uses under Hypothesis)."""
    run = trio._core._run
    saved = run._ALLOW_DETERMINISTIC_SCHEDULING, run._r.getstate()
    run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]
    run._r.seed(seed)
    try:
        yield
    finally:
        run._ALLOW_DETERMINISTIC_SCHEDULING = saved[0]  # type: ignore[misc]
        run._r.setstate(saved[1])


def run_seed(seed: int, base: str, *, keep: bool = False) -> SimReport:
    """Run one seed in a fresh directory under `base`; raises SimulationFailure."""
    work = os.path.join(base, f"seed-{seed}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    report = SimReport(seed)
    try:
        with deterministic_scheduling(seed):
            trio.run(_scenario, seed, work, report, clock=trio.testing.MockClock(autojump_threshold=0))
    except BaseExceptionGroup as group:  # trio's strict nurseries wrap a lone SimulationFailure
        raise _sole_error(group) from None
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return report


def _sole_error(error: BaseException) -> BaseException:
    """The one error inside (nested) groups of one; else the group."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


async def _scenario(seed: int, work: str, report: SimReport) -> None:
    rng = random.Random(seed)
    scenario = Scenario.draw(rng)
    cluster_file = scenario.cluster_file()
    report.nodes, report.replication_factor = scenario.nodes, scenario.replication_factor
    report.partitions = scenario.partitions
    tamperer = Tamperer()
    acked: dict[bytes, tuple[str, int]] = {}
    async with trio.open_nursery() as root:
        network = SimNetwork(random.Random(rng.getrandbits(64)), root, forge=tamperer)
        cluster = SimCluster(cluster_file, network, work, random.Random(rng.getrandbits(64)))
        workload = Workload(random.Random(rng.getrandbits(64)))
        try:
            await cluster.start(root)
            with trio.move_on_after(scenario.chaos_seconds):
                async with trio.open_nursery() as chaos:
                    chaos.start_soon(_clients, cluster, workload, acked, report,
                                     random.Random(rng.getrandbits(64)), chaos)
                    chaos.start_soon(_chaos, cluster, network, scenario, report,
                                     random.Random(rng.getrandbits(64)), root)
            network.faults.clear()
            network.heal()
            for node in cluster.nodes.values():
                await node.restart(root)
            await trio.sleep(cluster_file.replication.suspect_after + 1)
            await _converge(cluster, report, seed)
            _check(cluster, acked, workload, tamperer, report, seed)
            report.virtual_seconds = trio.current_time()
            report.frames, report.dropped = network.frames, network.dropped
            report.duplicated, report.delayed = network.duplicated, network.delayed
            report.tampered = network.tampered
            report.digest = network.digest()
            for sim_node in cluster.nodes.values():
                report.crashes += sim_node.crashes
                if sim_node.node is not None:
                    status = sim_node.node.status()
                    report.forged_refusals += sum(status["forged"].values())
                    report.push_dropped += sum(q["dropped_records"] for q in status["push"].values())
        finally:
            root.cancel_scope.cancel()
            cluster.close()


async def _clients(cluster: SimCluster, workload: Workload, acked: dict[bytes, tuple[str, int]],
                   report: SimReport,
                   rng: random.Random, nursery: trio.Nursery) -> None:
    names = sorted(cluster.nodes)

    async def one(node_name: str, acks: str | None) -> None:
        batch = workload.batch()
        report.writes += 1
        try:
            result = await cluster.nodes[node_name].write(batch, acks, timeout=5.0)
        except StemeError:
            return
        report.acked += 1
        partitions = cluster.placement.record_partitions(batch.blob, batch.offsets)
        for record_id, partition in zip(batch.ids, partitions.tolist()):
            acked[bytes(record_id)] = (result.acks, partition)
            report.acked_records += 1

    while True:
        await trio.sleep(rng.uniform(0.05, 0.5))
        nursery.start_soon(one, rng.choice(names), rng.choice([None, "1", "all"]))


async def _chaos(cluster: SimCluster, network: SimNetwork, scenario: Scenario, report: SimReport,
                 rng: random.Random, root: trio.Nursery) -> None:
    names = sorted(cluster.nodes)
    faults = network.faults
    while True:
        await trio.sleep(rng.uniform(0.5, 3.0))
        event = rng.choice(["faults", "faults", "calm", "cut", "crash", "restart"])
        now = f"{trio.current_time():.3f}"
        if event == "faults":
            faults.drop = rng.choice([0.0, 0.02, 0.1, 0.3])
            faults.duplicate = rng.choice([0.0, 0.05, 0.2])
            faults.delay = rng.choice([0.0, 0.2, 0.6])
            faults.delay_max = rng.choice([0.05, 0.5, 2.5])
            faults.tamper = rng.choice([0.0, 0.02, 0.1]) if scenario.tamper else 0.0
            report.events.append(f"{now} faults {faults}")
        elif event == "calm":
            faults.clear()
            report.events.append(f"{now} calm")
        elif event == "cut":
            shuffled = rng.sample(names, len(names))
            split = rng.randint(1, len(names) - 1)
            network.heal()
            network.cut(set(shuffled[:split]), set(shuffled[split:]))
            report.cuts += 1
            report.events.append(f"{now} cut {sorted(shuffled[:split])} | {sorted(shuffled[split:])}")
        elif event == "crash":
            victim = cluster.nodes[rng.choice(names)]
            report.events.append(f"{now} crash {victim.node_id}")
            await victim.crash()
        else:
            for node in cluster.nodes.values():
                if not node.running:
                    report.events.append(f"{now} restart {node.node_id}")
                    await node.restart(root)
                    break
            else:
                network.heal()
                report.events.append(f"{now} heal")


async def _converge(cluster: SimCluster, report: SimReport, seed: int, passes: int = 8) -> None:
    """Anti-entropy rounds between every pair until one full pass moves nothing."""
    names = sorted(cluster.nodes)
    for number in range(1, passes + 1):
        moved, failed = 0, []
        for a in names:
            for b in names:
                if a < b:
                    node = cluster.nodes[a].node
                    assert node is not None
                    result = await node.anti_entropy.sync_now(b)
                    moved += result.moved
                    if not result.ok:
                        failed.append(f"{a}-{b}: {result.error}")
        report.repaired += moved
        report.passes = number
        if not moved and not failed:
            return
    raise SimulationFailure(_failure(seed, f"anti-entropy did not converge in {passes} passes after heal "
                                           f"(last pass moved {moved} records; failures: {failed})",
                                     cluster, report))


def _check(cluster: SimCluster, acked: dict[bytes, tuple[str, int]], workload: Workload,
           tamperer: Tamperer,
           report: SimReport, seed: int) -> None:
    placement = cluster.placement
    stores = {name: node.store for name, node in cluster.nodes.items()}
    problems: list[str] = []
    for partition in [GLOBAL, *range(placement.partitions)]:
        scope = scope_of(partition)
        replicas = placement.replicas(partition)
        prints = {name: stores[name].fingerprint(scope) for name in replicas}  # type: ignore[union-attr]
        if len(set(prints.values())) != 1:
            counts = {name: stores[name].count(scope) for name in replicas}  # type: ignore[union-attr]
            problems.append(f"partition {partition}: replicas disagree (counts {counts})")
        for name in sorted(set(stores) - set(replicas)):
            if stores[name].count(scope):  # type: ignore[union-attr]
                problems.append(f"partition {partition}: {name} is not a replica but holds "
                                f"{stores[name].count(scope)} of its records")  # type: ignore[union-attr]
    held = {name: store.ids_of_scope(WHOLE_STORE) for name, store in stores.items()}  # type: ignore[union-attr]
    for record_id, (policy, partition) in acked.items():
        missing = [n for n in placement.replicas(partition) if record_id not in held[n]]
        if missing:
            problems.append(f"acked (acks={policy}) record {record_id.hex()[:16]} of partition "
                            f"{partition} missing on {missing}")
    for name, ids in held.items():
        forged = ids & tamperer.forged_ids
        if forged:
            problems.append(f"{name} stored {len(forged)} forged records")
        stray = ids - workload.generated
        if stray:
            problems.append(f"{name} stored {len(stray)} records no client wrote")
    if problems:
        raise SimulationFailure(_failure(seed, "; ".join(problems[:8]), cluster, report))


def _failure(seed: int, problem: str, cluster: SimCluster, report: SimReport) -> str:
    history = {name: node.history for name, node in cluster.nodes.items()}
    return (f"simulation seed {seed}: {problem}\n  replay: {REPLAY.format(seed=seed)}\n"
            f"  events: {report.events[-12:]}\n  nodes: {history}")


def summary(reports: list[SimReport]) -> dict[str, Any]:
    keys = ("writes", "acked", "acked_records", "crashes", "cuts", "frames", "dropped", "duplicated",
            "delayed", "tampered", "forged_refusals", "push_dropped", "repaired")
    out: dict[str, Any] = {"seeds": len(reports)}
    for key in keys:
        out[key] = sum(getattr(r, key) for r in reports)
    out["virtual_seconds"] = round(sum(r.virtual_seconds for r in reports), 1)
    return out
