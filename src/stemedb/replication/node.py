"""One cluster node's replication: heartbeats, push, anti-entropy, forwarded writes.

Owns: `ClusterNode`, which puts the parts together for one node of a
cluster file — the membership table fed by heartbeats and by every frame a
peer sends, a push queue and a link per peer, the anti-entropy scheduler and
responder, the write path (`write`: verify, plan by placement and ack
policy, store and forward, push), and the answers to peers' PING, PUT, PUSH
and SYNC (`serve`). Must never: acknowledge a write before it is durable on
the replicas the policy names, store a record that did not verify, push a
record that came from a peer (push carries only writes this node accepted or
was forwarded as primary; anti-entropy repairs the rest), or call the store
on the event loop (`run_blocking`).

The same object runs under real sockets and in the simulation: the caller
supplies `connect(peer) -> stream`, hands every accepted peer connection to
`serve(stream)`, and chooses `run_blocking` (trio.to_thread.run_sync, or
antientropy.run_inline in the simulation) and the random source.

Error handling: `write` raises SignatureError / InvalidRecord for a bad batch
(nothing stored anywhere), Unavailable when the policy cannot be met (some
replicas may hold the records: retrying is safe, records are
content-addressed), StorageFull / DurabilityError from this node's store.
A peer that sends a forged record is refused, logged by name and counted in
`forged`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import trio

from stemedb.errors import InvalidRecord, ProtocolError, SignatureError, StemeError, Unavailable
from stemedb.records import Envelope
from stemedb.replication import framing
from stemedb.replication.antientropy import AntiEntropy, Mover, Responder, RunBlocking
from stemedb.replication.cluster import ClusterFile
from stemedb.replication.framing import Frame, Hello, RecordBatch
from stemedb.replication.membership import (
    LivenessSettings,
    Membership,
    PeerState,
    Transition,
    run_heartbeats,
)
from stemedb.replication.placement import Placement
from stemedb.replication.push import PushBatch, PushQueue
from stemedb.replication.routing import WritePlan, plan_write, push_shares, with_envelopes
from stemedb.replication.store import ReplicaStore, Verified
from stemedb.replication.transport import Connect, PeerLink, serve_peer

log = logging.getLogger("stemedb.replication")

FORGED = (SignatureError, InvalidRecord)


@dataclass
class WriteResult:
    """Where a write was stored before it was acknowledged."""

    acks: str
    stored_on: dict[str, int]       # node → records of the batch it confirmed
    deferred: dict[str, int]        # node → records queued for it (acks=all, replica not up)


class ClusterNode:
    """The replication side of one node (see the module docstring)."""

    def __init__(self, cluster: ClusterFile, node_id: str, store: ReplicaStore, connect: Connect, *,
                 run_blocking: RunBlocking = trio.to_thread.run_sync, rng: random.Random | None = None,
                 clock: Callable[[], float] = trio.current_time) -> None:
        self.cluster = cluster
        self.node_id = node_id
        self.store = store
        self.connect = connect
        self.run_blocking = run_blocking
        self.rng = rng or random.Random()
        self.clock = clock
        settings = cluster.replication
        self.placement = Placement(cluster)
        self.peers = cluster.peers_of(node_id)
        self.liveness = LivenessSettings(settings.heartbeat_interval, settings.suspect_after,
                                         settings.down_after, ping_timeout=settings.suspect_after)
        self.membership = Membership(self.peers, self.liveness, clock)
        self.queues = {peer: PushQueue(peer, settings.push_queue_records, settings.push_queue_bytes,
                                       clock=clock) for peer in self.peers}
        self.mover = Mover(store, run_blocking)
        self.responder = Responder(node_id, self.placement, self.mover, clock)
        self.anti_entropy = AntiEntropy(node_id, self.placement, self.mover, self._sync_exchange,
                                        interval=settings.anti_entropy_interval,
                                        jitter=settings.anti_entropy_jitter, rng=self.rng,
                                        is_live=self.membership.is_up)
        self.hello = Hello(cluster.name, cluster.version, node_id)
        self.links: dict[str, PeerLink] = {}
        self.forged: dict[str, int] = {}
        self.deferred_members = 0       # pushed members whose envelope had not arrived (repaired later)
        self.membership.listeners.append(self._on_transition)

    # ------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run heartbeats, push drains and anti-entropy until cancelled."""
        async with trio.open_nursery() as nursery:
            for peer in self.peers:
                self.links[peer] = PeerLink(peer, self.hello, self.connect, nursery,
                                            hello_timeout=self.cluster.replication.write_timeout,
                                            on_heard=self.membership.heard,
                                            on_failed=self.membership.failed)
                nursery.start_soon(self.queues[peer].run, self._push_sender(peer))
            nursery.start_soon(run_heartbeats, self.membership, self._ping)
            nursery.start_soon(self.anti_entropy.run)
            task_status.started()

    def _on_transition(self, transition: Transition) -> None:
        queue = self.queues[transition.peer]
        if transition.new is PeerState.UP:
            queue.peer_up()
            self.anti_entropy.trigger(transition.peer)
        elif transition.new is PeerState.DOWN:
            queue.peer_down()

    # --------------------------------------------------------------- client

    async def write(self, batch: RecordBatch, acks: str | None = None) -> WriteResult:
        """Store a client's batch in the cluster under `acks` ("1" or "all"; default the file's)."""
        acks = acks or self.cluster.acks
        if acks not in ("1", "all"):
            raise InvalidRecord(f'acks: {acks!r}, expected "1" or "all"')
        verified = await self._verify_write(batch)
        proofs = {r.envelope for r in (verified.records[bytes(i)] for i in verified.others.ids)
                  if getattr(r, "envelope", None) is not None}
        if proofs:
            # Members of envelopes stored earlier: their envelopes travel with them, so a
            # replica that has not received the envelope yet can still verify them.
            stored = await self.run_blocking(self.store.read_ids, sorted(proofs))
            verified = await self._verify_write(framing.concat([batch, stored]))
        batch = concat_verified(verified)
        partitions = self.placement.record_partitions(batch.blob, batch.offsets)
        envelope_of = envelope_positions(verified, batch)
        result = WriteResult(acks, {}, {})
        failed: set[str] = set()
        pending = np.arange(len(batch), dtype=np.int64)
        while len(pending):
            plan = plan_write(self.placement, self.node_id, partitions[pending], envelope_of_subset(
                envelope_of, pending), acks, self.membership.state, frozenset(failed))
            if len(plan.unplaced):
                raise Unavailable(f"no replica is up for {len(plan.unplaced)} of the records "
                                  f"(tried: {', '.join(sorted(failed)) or 'none up'}); retry later")
            outcomes = await self._send_plan(batch, verified, pending, plan, partitions)
            retry = []
            for node, error in outcomes.items():
                if error is None:
                    result.stored_on[node] = len(plan.required[node])
                    continue
                if acks == "all":
                    raise Unavailable(f"replica {node} did not confirm the write ({error}); some "
                                      "replicas may hold it, retrying is safe") from None
                failed.add(node)
                retry.append(pending[plan.required[node]])
            for node, positions in plan.deferred.items():
                share = batch.select(pending[positions])
                if self.queues[node].offer(PushBatch(share)):
                    result.deferred[node] = len(share)
            pending = with_envelopes(np.concatenate(retry), envelope_of) if retry else pending[:0]
        return result

    async def _verify_write(self, batch: RecordBatch) -> Verified:
        verified: Verified = await self.run_blocking(self.store.verify, batch)
        if len(verified.waiting):
            raise SignatureError(f"record {bytes(verified.waiting.ids[0]).hex()}: its envelope is neither in "
                                 "the batch nor stored; send members with their envelope")
        return verified

    async def _send_plan(self, batch: RecordBatch, verified: Verified, pending: np.ndarray,
                         plan: WritePlan, partitions: np.ndarray) -> dict[str, str | None]:
        """Carry out one plan: each target in its own task; node → None, or why it failed."""
        outcomes: dict[str, str | None] = {}

        async def one(node: str) -> None:
            positions = pending[plan.sends[node]]
            share = batch.select(positions)
            try:
                if node == self.node_id:
                    await self.run_blocking(self.store.store, verified_subset(verified, share))
                    if plan.push[node]:
                        self._push(share, partitions[positions], verified.records, include_global=True)
                else:
                    await self.links[node].request(framing.PUT, framing.encode_put(share, push=plan.push[node]),
                                                   self.cluster.replication.write_timeout)
                outcomes[node] = None
            except StemeError as exc:
                if node == self.node_id:
                    log.warning("storing a write on this node failed: %s", exc)
                outcomes[node] = f"{type(exc).__name__}: {exc}"

        async with trio.open_nursery() as nursery:
            for node in plan.sends:
                nursery.start_soon(one, node)
        return outcomes

    def _push(self, batch: RecordBatch, partitions: np.ndarray, records: dict[bytes, Any], *,
              include_global: bool) -> None:
        envelope_of = _envelope_rows(batch, records)
        for peer, positions in push_shares(self.placement, self.node_id, partitions, envelope_of,
                                           include_global=include_global).items():
            share = batch.select(positions)
            self.queues[peer].offer(PushBatch(share))

    # ---------------------------------------------------------------- peers

    async def _ping(self, peer: str) -> None:
        await self.links[peer].request(framing.PING, b"", self.liveness.ping_timeout)

    def _push_sender(self, peer: str) -> Callable[[PushBatch], Any]:
        async def send(pushed: PushBatch) -> None:
            await self.links[peer].request(framing.PUSH, framing.encode_records(pushed.batch),
                                           self.cluster.replication.write_timeout)
        return send

    async def _sync_exchange(self, peer: str, request: framing.SyncRequest) -> framing.SyncAnswer:
        payload = await self.links[peer].request(framing.SYNC, framing.encode_sync_request(request),
                                                 self.cluster.replication.write_timeout)
        return framing.decode_sync_answer(payload)

    async def serve(self, stream: trio.abc.Stream) -> None:
        """Answer one peer's connection until it closes."""
        await serve_peer(stream, self.hello, self._accept_hello, self._handle,
                         on_frame=self.membership.heard)

    def _accept_hello(self, hello: Hello) -> None:
        if hello.cluster != self.cluster.name or hello.node not in self.peers:
            raise ProtocolError(f"HELLO from {hello.node!r} of cluster {hello.cluster!r}: not a peer of "
                                f"{self.node_id} in cluster {self.cluster.name!r}")
        if hello.version != self.cluster.version:
            log.warning("peer %s runs cluster file version %d, this node %d", hello.node,
                        hello.version, self.cluster.version)

    async def _handle(self, peer: str, frame: Frame) -> bytes:
        try:
            if frame.kind == framing.PING:
                return frame.payload[:framing.MAX_PING]
            if frame.kind == framing.PUT:
                batch, push = framing.decode_put(frame.payload)
                return framing.encode_counts(await self._forwarded(batch, push))
            if frame.kind == framing.PUSH:
                return framing.encode_counts(*await self._pushed(framing.decode_records(frame.payload)))
            if frame.kind == framing.SYNC:
                request = framing.decode_sync_request(frame.payload)
                return framing.encode_sync_answer(await self.responder.handle(peer, request))
        except FORGED as exc:
            self.forged[peer] = self.forged.get(peer, 0) + 1
            log.warning("peer %s sent a forged record in %s; refused, nothing of it stored: %s", peer,
                        framing.KIND_NAMES[frame.kind], exc)
            raise
        raise ProtocolError(f"{framing.KIND_NAMES[frame.kind]} is not a request between nodes")

    async def _forwarded(self, batch: RecordBatch, push: bool) -> int:
        verified = await self._verify_write(batch)
        stored: int = await self.run_blocking(self.store.store, verified)
        if push:
            self._push(batch, self.placement.record_partitions(batch.blob, batch.offsets),
                       verified.records, include_global=False)
        return stored

    async def _pushed(self, batch: RecordBatch) -> tuple[int, int]:
        verified: Verified = await self.run_blocking(self.store.verify, batch)
        stored: int = await self.run_blocking(self.store.store, verified)
        # A member whose envelope has not arrived (its push was dropped) waits for anti-entropy,
        # which sends envelope and member in one session.
        self.deferred_members += len(verified.waiting)
        return stored, len(verified.waiting)

    # --------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        """Peer states, push queues and anti-entropy figures (for `cluster status` and metrics)."""
        stats = self.anti_entropy.stats
        return {
            "node": self.node_id,
            "cluster": self.cluster.name,
            "version": self.cluster.version,
            "peers": self.membership.snapshot(),
            "push": {peer: queue.figures() for peer, queue in self.queues.items()},
            "anti_entropy": {"rounds": stats.rounds, "failed_rounds": stats.failed_rounds,
                             "records_sent": stats.records_sent,
                             "records_received": stats.records_received,
                             "bytes_sent": stats.bytes_sent, "bytes_received": stats.bytes_received},
            "forged": {p: self.forged.get(p, 0) + stats.forged.get(p, 0)
                       for p in sorted(set(self.forged) | set(stats.forged))},
            "deferred_members": self.deferred_members,
        }


def concat_verified(verified: Verified) -> RecordBatch:
    """The verified batch in store order: envelopes, their members, the rest."""
    return framing.concat([verified.envelopes, verified.batch_members, verified.others])


def envelope_positions(verified: Verified, batch: RecordBatch) -> np.ndarray:
    """For each record of `batch`: the position of the batch envelope that proves it, or -1."""
    return _envelope_rows(batch, verified.records)


def _envelope_rows(batch: RecordBatch, records: dict[bytes, Any]) -> np.ndarray:
    decoded = [records[bytes(i)] for i in batch.ids]
    position = {bytes(batch.ids[i]): i for i, r in enumerate(decoded) if isinstance(r, Envelope)}
    return np.array([position.get(r.envelope, -1) if getattr(r, "envelope", None) else -1
                     for r in decoded], dtype=np.int64)


def envelope_of_subset(envelope_of: np.ndarray, pending: np.ndarray) -> np.ndarray:
    """envelope_of re-indexed for the sub-batch `pending` (envelopes outside it: -1)."""
    where = np.full(len(envelope_of), -1, dtype=np.int64)
    where[pending] = np.arange(len(pending))
    proofs = envelope_of[pending]
    return np.where(proofs >= 0, where[np.maximum(proofs, 0)], -1)


def verified_subset(verified: Verified, share: RecordBatch) -> Verified:
    """The parts of `verified` whose IDs are in `share`."""
    wanted = {bytes(i) for i in share.ids}

    def keep(part: RecordBatch) -> RecordBatch:
        rows = np.array([k for k, i in enumerate(part.ids) if bytes(i) in wanted], dtype=np.int64)
        return part.select(rows)

    return Verified(keep(verified.envelopes), keep(verified.batch_members), keep(verified.others),
                    RecordBatch.empty(), verified.records)

