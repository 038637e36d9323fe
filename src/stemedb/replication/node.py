"""One cluster node's replication: heartbeats, push, anti-entropy, forwarded writes and reads.

Owns: `ClusterNode`, which puts the parts together for one node of a
cluster file — the membership table fed by heartbeats and by every frame a
peer sends, a push queue and a link per peer, the anti-entropy scheduler and
responders, the write path (`write`: verify, plan by placement and ack
policy, store and forward, push), the replicas a read goes to (`read_order`,
`forward`, `fetch`), the answers to the replication opcodes peers and
operators send (`handle_peer_request`, called by the server's request
pipeline), the status `stemedb cluster status` shows, and applying a
reloaded cluster file (`reload`). Must never: acknowledge a write before it
is durable on the replicas the policy names, store a record that did not
verify, push a record that came from a peer (push carries only writes this
node accepted or was forwarded as primary; anti-entropy repairs the rest), or
call the store on the event loop (`run_blocking`).

The same object runs under real sockets and in the simulation: the caller
supplies `connect(peer) -> stream`, hands the replication requests of the
server's connections to `handle_peer_request`, and chooses `run_blocking`
(trio.to_thread.run_sync, or antientropy.run_inline in the simulation) and
the random source.

Error handling: `write` raises SignatureError / InvalidRecord for a bad batch
(nothing stored anywhere), Unavailable when the policy cannot be met (some
replicas may hold the records: retrying is safe, records are
content-addressed), StorageFull / DurabilityError from this node's store.
A peer that sends a forged record is refused, logged by name and counted in
`forged`. `handle_peer_request` raises the refusal the server answers with
(FrameError for a malformed payload closes the connection).
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import trio

from stemedb import _codec, _protocol
from stemedb.errors import (
    Forbidden,
    InvalidRecord,
    ProtocolError,
    SignatureError,
    StemeError,
    Unavailable,
    Unsupported,
)
from stemedb.records import RecordKind
from stemedb.replication import framing
from stemedb.replication.antientropy import AntiEntropy, Mover, Responder, RunBlocking, stray_scopes
from stemedb.replication.cluster import ClusterChange, ClusterFile, ClusterFileError, compare
from stemedb.replication.framing import NodeHello, RecordBatch, SyncWith
from stemedb.replication.membership import (
    LivenessSettings,
    Membership,
    PeerState,
    Transition,
    run_heartbeats,
)
from stemedb.replication.placement import GLOBAL, Placement, scope_of
from stemedb.replication.push import DELAY_SAMPLES, PushBatch, PushQueue, sample_quantiles
from stemedb.replication.reconcile import WHOLE_STORE
from stemedb.replication.routing import (
    WritePlan,
    plan_write,
    push_shares,
    read_order,
    with_envelopes,
)
from stemedb.replication.store import PROBE_SALT, ReplicaStore, Verified
from stemedb.replication.transport import Connect, Link

log = logging.getLogger("stemedb.replication")

FORGED = (SignatureError, InvalidRecord)
ACK_POLICIES = ("1", "all")
# Replication requests only a cluster node sends (after NODE_HELLO).
NODE_ONLY = {_protocol.REPLICA_PUT: "REPLICA_PUT", _protocol.PUSH: "PUSH"}
SyncWithServer = Callable[[SyncWith, Mover], Awaitable[Any]]


@dataclass
class WriteResult:
    """Where a write was stored before it was acknowledged."""

    acks: str
    stored_on: dict[str, int]       # node → records of the batch it confirmed
    deferred: dict[str, int]        # node → records queued for it (acks=all, replica not up)


def liveness_of(cluster: ClusterFile) -> LivenessSettings:
    settings = cluster.replication
    return LivenessSettings(settings.heartbeat_interval, settings.suspect_after, settings.down_after,
                            ping_timeout=settings.suspect_after)


class ClusterNode:
    """The replication side of one node (see the module docstring)."""

    server_flags = _protocol.SERVER_REPLICATION | _protocol.SERVER_CLUSTER

    def __init__(self, cluster: ClusterFile, node_id: str, store: ReplicaStore, connect: Connect, *,
                 token: str = "", run_blocking: RunBlocking = trio.to_thread.run_sync,
                 rng: random.Random | None = None, clock: Callable[[], float] = trio.current_time,
                 sync_with_server: SyncWithServer | None = None,
                 load_cluster: Callable[[], ClusterFile] | None = None) -> None:
        cluster.node(node_id)
        self.cluster = cluster
        self.node_id = node_id
        self.store = store
        self.connect = connect
        self.token = token
        self.run_blocking = run_blocking
        self.rng = rng or random.Random()
        self.clock = clock
        self.sync_with_server = sync_with_server
        self.load_cluster = load_cluster
        self.placement = Placement(cluster)
        self.liveness = liveness_of(cluster)
        self.membership = Membership(cluster.peers_of(node_id), self.liveness, clock)
        self.queues = {peer: self._new_queue(peer) for peer in cluster.peers_of(node_id)}
        self.mover = Mover(store, run_blocking)
        self.responder = Responder(node_id, self.placement, self.mover, clock)
        # Sessions of `stemedb sync` (not a node): the whole store, scope 0.
        self.client_responder = Responder(node_id, self.placement, self.mover, clock,
                                          allowed=lambda peer, start: {WHOLE_STORE})
        settings = cluster.replication
        self.anti_entropy = AntiEntropy(node_id, self.placement, self.mover, self._sync_exchange,
                                        interval=settings.anti_entropy_interval,
                                        jitter=settings.anti_entropy_jitter, rng=self.rng,
                                        is_live=self.membership.is_up)
        self.links: dict[str, Link] = {}
        self.forged: dict[str, int] = {}
        self.deferred_members = 0       # pushed members whose envelope had not arrived (repaired later)
        # Pushes received: seconds waiting for a worker thread, seconds storing (verify + commit).
        self.intake_waits: deque[float] = deque(maxlen=DELAY_SAMPLES)
        self.intake_runs: deque[float] = deque(maxlen=DELAY_SAMPLES)
        self.reloads = 0
        self._drains: dict[str, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self.membership.listeners.append(self._on_transition)

    @property
    def peers(self) -> tuple[str, ...]:
        return self.cluster.peers_of(self.node_id)

    @property
    def hello(self) -> NodeHello:
        return NodeHello(self.cluster.name, self.cluster.version, self.node_id)

    def _new_queue(self, peer: str) -> PushQueue:
        settings = self.cluster.replication
        return PushQueue(peer, settings.push_queue_records, settings.push_queue_bytes, clock=self.clock,
                         window=settings.push_window)

    # ------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run heartbeats, push drains and anti-entropy until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for peer in self.peers:
                self._start_peer(peer)
            nursery.start_soon(run_heartbeats, self.membership, self._ping)
            await nursery.start(self.anti_entropy.run)
            task_status.started()

    def _start_peer(self, peer: str) -> None:
        assert self._nursery is not None
        self.links[peer] = Link(peer, self.connect, self._nursery, token=self.token,
                                node_hello=self.hello, client_name=f"stemedb-node/{self.node_id}",
                                hello_timeout=self.cluster.replication.write_timeout,
                                on_heard=self.membership.heard, on_failed=self.membership.failed)
        scope = self._drains[peer] = trio.CancelScope()
        self._nursery.start_soon(self._drain, peer, scope)

    async def _drain(self, peer: str, scope: trio.CancelScope) -> None:
        with scope:
            await self.queues[peer].run(self._push_sender(peer))

    def _on_transition(self, transition: Transition) -> None:
        queue = self.queues.get(transition.peer)
        if queue is None:
            return
        if transition.new is PeerState.UP:
            queue.peer_up()
            self.anti_entropy.trigger(transition.peer)
        elif transition.new is PeerState.DOWN:
            queue.peer_down()

    def address_of(self, peer: str) -> tuple[str, int]:
        """Where `peer` listens, by the cluster file in force now."""
        node = self.cluster.node(peer)
        return node.host, node.port

    # --------------------------------------------------------------- writes

    async def write(self, batch: RecordBatch, acks: str | None = None) -> WriteResult:
        """Store a client's batch in the cluster under `acks` ("1" or "all"; default the file's)."""
        acks = acks or self.cluster.acks
        if acks not in ACK_POLICIES:
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
        placement = self.placement
        partitions = placement.record_partitions(batch.blob, batch.offsets)
        envelope_of = envelope_rows(batch)
        result = WriteResult(acks, {}, {})
        failed: set[str] = set()
        pending = np.arange(len(batch), dtype=np.int64)
        while len(pending):
            plan = plan_write(placement, self.node_id, partitions[pending], envelope_of_subset(
                envelope_of, pending), acks, self._state, frozenset(failed))
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
                queue = self.queues.get(node)
                if queue is not None and queue.offer(PushBatch(share)):
                    result.deferred[node] = len(share)
            pending = with_envelopes(np.concatenate(retry), envelope_of) if retry else pending[:0]
        return result

    def _state(self, node: str) -> PeerState:
        return self.membership.state(node) if node in self.membership.peers else PeerState.DOWN

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
                        self._push(share, partitions[positions], include_global=True)
                else:
                    await self._link(node).request(_protocol.REPLICA_PUT,
                                                   framing.encode_replica_put(share, push=plan.push[node]),
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

    def _push(self, batch: RecordBatch, partitions: np.ndarray, *, include_global: bool) -> None:
        envelope_of = envelope_rows(batch)
        for peer, positions in push_shares(self.placement, self.node_id, partitions, envelope_of,
                                           include_global=include_global).items():
            queue = self.queues.get(peer)
            if queue is not None:
                queue.offer(PushBatch(batch.select(positions)))

    def _link(self, node: str) -> Link:
        link = self.links.get(node)
        if link is None:
            raise Unavailable(f"{node} is not a peer of {self.node_id} (cluster version "
                              f"{self.cluster.version})")
        return link

    # ---------------------------------------------------------------- reads

    def read_order(self, subject: str) -> list[str]:
        """The replicas a read of `subject` tries, best first (this node first when it is one)."""
        return read_order(self.placement, self.placement.subject_partition(subject), self.node_id,
                          self._state)

    def others_to_ask(self) -> list[str]:
        """Every other node a read by ID may ask: up ones first, then suspect ones, never down ones."""
        order = [p for p in self.peers if self._state(p) is PeerState.UP]
        return order + [p for p in self.peers if self._state(p) is PeerState.SUSPECT]

    async def forward(self, node: str, opcode: int, payload: bytes) -> list[bytes]:
        """A read request served by `node` (which serves it locally): its answer frames' payloads."""
        return await self._link(node).request_frames(opcode, payload, self.cluster.replication.read_timeout)

    async def fetch(self, ids: np.ndarray) -> dict[bytes, bytes]:
        """The records with these IDs that other nodes hold: ID → encoded bytes (absent IDs left out).

        Each node is asked for what is still missing, up nodes first; one that
        fails is skipped (its records may be on another).
        """
        found: dict[bytes, bytes] = {}
        missing = np.ascontiguousarray(ids, dtype=np.uint8).reshape(-1, 32)
        for node in self.others_to_ask():
            if not len(missing):
                break
            try:
                frames = await self.forward(node, _protocol.GET, _protocol.encode_ids(missing))
            except StemeError as exc:
                log.info("GET forwarded to %s failed: %s", node, exc)
                continue
            answers = [_protocol.decode_record_batch(f, True) for f in frames]
            records = [bytes(blob[offsets[i]:offsets[i + 1]]) for blob, offsets in answers
                       for i in range(len(offsets) - 1)]
            if len(records) != len(missing):
                log.warning("%s answered a GET of %d IDs with %d records", node, len(missing), len(records))
                continue
            still = []
            for record_id, data in zip(missing, records):
                if data:
                    found[bytes(record_id)] = data
                else:
                    still.append(record_id)
            missing = np.array(still, dtype=np.uint8).reshape(-1, 32)
        return found

    # ---------------------------------------------------------------- peers

    async def _ping(self, peer: str) -> None:
        await self._link(peer).request(_protocol.PING, b"", self.liveness.ping_timeout)

    def _push_sender(self, peer: str) -> Callable[[PushBatch], Any]:
        async def send(pushed: PushBatch) -> None:
            await self._link(peer).request(_protocol.PUSH, framing.encode_records(pushed.batch),
                                           self.cluster.replication.write_timeout)
        return send

    async def _sync_exchange(self, peer: str, request: framing.SyncRequest) -> framing.SyncAnswer:
        payload = await self._link(peer).request(_protocol.SYNC, framing.encode_sync_request(request),
                                                 self.cluster.replication.write_timeout)
        return framing.decode_sync_answer(payload)

    def accept_node(self, hello: NodeHello) -> NodeHello:
        """A connection says it is node `hello.node`: refused unless it is a peer of this cluster."""
        if hello.cluster != self.cluster.name or hello.node not in self.peers:
            raise Forbidden(f"NODE_HELLO from {hello.node!r} of cluster {hello.cluster!r}: not a peer of "
                            f"{self.node_id} in cluster {self.cluster.name!r} (version {self.cluster.version})")
        if hello.version != self.cluster.version:
            log.warning("peer %s runs cluster file version %d, this node %d", hello.node,
                        hello.version, self.cluster.version)
        return self.hello

    def heard(self, peer: str) -> None:
        """A request arrived from node `peer`: it is alive."""
        self.membership.heard(peer)

    async def handle_peer_request(self, peer: str | None, opcode: int, payload: bytes, *,
                                  client: str = "") -> bytes:
        """Answer one replication request; `peer` is the node it came from (after its NODE_HELLO),
        None for a client (`client` names it: sessions of `stemedb sync`, operators)."""
        name = str(_protocol.OPCODE_NAMES.get(opcode, hex(opcode))).upper()
        try:
            if opcode == _protocol.SYNC:
                request = framing.decode_sync_request(payload)
                if peer is None:
                    answer = await self.client_responder.handle(client, request)
                else:
                    answer = await self.responder.handle(peer, request)
                return framing.encode_sync_answer(answer)
            if opcode == _protocol.SYNC_WITH:
                return framing.encode_json(await self._sync_with(framing.decode_sync_with(payload)))
            if opcode == _protocol.CLUSTER_STATUS:
                framing.decode_empty(payload, "CLUSTER_STATUS")
                return framing.encode_json(await self.status_report())
            if opcode == _protocol.CLUSTER_RELOAD:
                framing.decode_empty(payload, "CLUSTER_RELOAD")
                return framing.encode_json(await self.reload_file())
            if opcode in NODE_ONLY and peer is None:
                raise Forbidden(f"{name} is sent by cluster nodes only (after NODE_HELLO)")
            if opcode == _protocol.REPLICA_PUT:
                batch, push = framing.decode_replica_put(payload)
                return framing.encode_counts(await self._forwarded(batch, push))
            if opcode == _protocol.PUSH:
                return framing.encode_counts(*await self._pushed(framing.decode_push(payload)))
        except FORGED as exc:
            who = peer or client or "a client"
            self.forged[who] = self.forged.get(who, 0) + 1
            log.warning("peer %s sent a forged record in %s; refused, nothing of it stored: %s", who,
                        name, exc)
            raise
        raise Unsupported(f"{name} is not served by this version")

    async def _forwarded(self, batch: RecordBatch, push: bool) -> int:
        # Verified and stored in one engine call (a forged record refuses the whole batch).
        stored, waiting = await self.run_blocking(self.store.accept, batch)
        if len(waiting):
            # A forwarding node sends envelopes with their members: this one broke that rule.
            raise SignatureError(f"record {bytes(waiting.ids[0]).hex()}: its envelope is neither in "
                                 "the batch nor stored; send members with their envelope")
        if push:
            self._push(batch, self.placement.record_partitions(batch.blob, batch.offsets),
                       include_global=False)
        return int(stored)

    async def _pushed(self, batch: RecordBatch) -> tuple[int, int]:
        arrived = time.perf_counter()
        began = 0.0

        def accept() -> tuple[int, RecordBatch]:
            nonlocal began
            began = time.perf_counter()
            return self.store.accept(batch)

        stored, waiting = await self.run_blocking(accept)
        self.intake_waits.append(began - arrived)
        self.intake_runs.append(time.perf_counter() - began)
        # A member whose envelope has not arrived (its push was dropped) waits for anti-entropy,
        # which sends envelope and member in one session.
        self.deferred_members += len(waiting)
        return int(stored), len(waiting)

    async def _sync_with(self, request: SyncWith) -> dict[str, Any]:
        """`stemedb sync --url` against this node: a session with a peer node, or another server."""
        peer = self._node_named(request.peer)
        if peer is not None:
            result = await self.anti_entropy.sync_now(peer, can_send=request.push,
                                                      can_receive=request.pull)
            return {**result.to_dict(), "node": peer}
        if self.sync_with_server is None:
            raise Unsupported(f"{request.peer} is not a node of cluster {self.cluster.name!r}, and "
                              "this node does not sync with other servers")
        answer: dict[str, Any] = await self.sync_with_server(request, self.mover)
        return answer

    def _node_named(self, peer: str) -> str | None:
        """The node id `peer` names: an id of this cluster, or a node's address (host:port, URL)."""
        if peer in self.peers:
            return peer
        address = peer.split("://", 1)[-1].rstrip("/")
        for node in self.cluster.nodes:
            if node.id != self.node_id and node.address == address:
                return node.id
        return None

    # --------------------------------------------------------------- reload

    async def reload_file(self) -> dict[str, Any]:
        """Re-read the cluster file this node was started with and apply it (CLUSTER_RELOAD, SIGHUP)."""
        if self.load_cluster is None:
            raise Unsupported("this node was not started from a cluster file")
        cluster = await trio.to_thread.run_sync(self.load_cluster)
        change = await self.reload(cluster)
        return {"node": self.node_id, "version": self.cluster.version, "added": list(change.added),
                "removed": list(change.removed), "readdressed": list(change.readdressed),
                "placement_changed": change.placement_changed}

    async def reload(self, cluster: ClusterFile) -> ClusterChange:
        """Take a new version of the cluster file: placement, peers, addresses and settings.

        ClusterFileError (nothing changed) if the file cannot replace the
        running one (another cluster, another partition count, a version not
        raised) or no longer lists this node. Anti-entropy then moves the
        partitions that moved; a round with every peer starts at once.
        """
        change = compare(self.cluster, cluster)
        if self.node_id not in cluster.node_ids:
            raise ClusterFileError(f"{cluster.source}: this node {self.node_id!r} is not in the file; "
                                   "stop it instead of reloading it")
        if change.empty:
            return change
        self.cluster = cluster
        self.placement = Placement(cluster)
        for part in (self.responder, self.client_responder, self.anti_entropy):
            part.placement = self.placement
        self.liveness = liveness_of(cluster)
        self.membership.configure(self.liveness)
        settings = cluster.replication
        self.anti_entropy.interval = settings.anti_entropy_interval
        self.anti_entropy.jitter = settings.anti_entropy_jitter
        for peer in change.removed:
            await self._stop_peer(peer)
        for peer in change.added:
            self.membership.add(peer)
            self.queues[peer] = self._new_queue(peer)
            if self._nursery is not None:
                self._start_peer(peer)
                self.anti_entropy.add_peer(peer)
        for peer in change.readdressed:
            if peer in self.links:
                await self.links[peer].close()   # the next request connects to the new address
        for peer, queue in self.queues.items():
            queue.max_records, queue.max_bytes = settings.push_queue_records, settings.push_queue_bytes
            if peer in self.links:
                self.links[peer].node_hello = self.hello
        self.reloads += 1
        log.info("cluster file version %d taken: added %s, removed %s, readdressed %s", cluster.version,
                 list(change.added), list(change.removed), list(change.readdressed))
        for peer in self.peers:
            self.anti_entropy.trigger(peer)
        return change

    async def _stop_peer(self, peer: str) -> None:
        self.anti_entropy.remove_peer(peer)
        scope = self._drains.pop(peer, None)
        if scope is not None:
            scope.cancel()
        link = self.links.pop(peer, None)
        if link is not None:
            await link.close()
        self.queues.pop(peer, None)
        self.membership.remove(peer)

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
                             "handoffs": stats.handoffs,
                             "records_sent": stats.records_sent,
                             "records_received": stats.records_received,
                             "bytes_sent": stats.bytes_sent, "bytes_received": stats.bytes_received,
                             "record_bytes_sent": stats.record_bytes_sent,
                             "record_bytes_received": stats.record_bytes_received},
            "forged": {p: self.forged.get(p, 0) + stats.forged.get(p, 0)
                       for p in sorted(set(self.forged) | set(stats.forged))},
            "deferred_members": self.deferred_members,
            "intake": _intake_figures(self.intake_waits, self.intake_runs),
        }

    async def status_report(self) -> dict[str, Any]:
        """`status()` plus what the store holds: records, partitions held, and each held scope's
        count and fingerprint (equal on every replica that holds the same records)."""
        report = self.status()
        report["address"] = self.cluster.node(self.node_id).address
        report.update(await self.run_blocking(store_figures, self.store, self.placement, self.node_id))
        return report


def store_figures(store: ReplicaStore, placement: Placement, node_id: str) -> dict[str, Any]:
    """Records held, partitions replicated, and each held scope's count and fingerprint (blocking)."""
    held = placement.partitions_of(node_id)
    scopes: dict[str, dict[str, Any]] = {}
    with store.lock:
        tree = store.items(WHOLE_STORE)[0]
        records = len(tree)
        for partition in (GLOBAL, *held):
            tree, timestamps, ids = store.items(scope_of(partition))
            fingerprint = tree.fingerprint((0, b""), None, timestamps, ids, PROBE_SALT)
            scopes["global" if partition == GLOBAL else str(partition)] = {
                "count": len(tree), "fingerprint": fingerprint.hex()}
    stray = {str(scope - scope_of(0)): 0 for scope in stray_scopes(store, placement, node_id)}
    with store.lock:
        for key in stray:
            stray[key] = len(store.items(scope_of(int(key)))[0])
    return {"records": records, "partitions": list(held), "scopes": scopes, "stray": stray}


def concat_verified(verified: Verified) -> RecordBatch:
    """The verified batch in store order: envelopes, their members, the rest."""
    return framing.concat([verified.envelopes, verified.batch_members, verified.others])


def envelope_rows(batch: RecordBatch) -> np.ndarray:
    """For each record of `batch`: the position of the batch envelope its proof names, or -1.

    From the encoded bytes (the kind column and each record's envelope proof),
    without decoding the records.
    """
    rows = np.full(len(batch), -1, dtype=np.int64)
    if not len(batch):
        return rows
    lengths = np.diff(batch.offsets).astype(np.uint32)
    kinds = _codec.extract_columns(batch.blob, batch.offsets[:-1], lengths)["kind"]
    envelopes = np.flatnonzero(kinds == RecordKind.ENVELOPE)
    if not len(envelopes):
        return rows
    claimed, _signers, single = _codec.envelope_proofs(batch.blob, batch.offsets)
    ids = np.ascontiguousarray(batch.ids, dtype=np.uint8)
    for position in envelopes:
        rows[single & (claimed == ids[position]).all(axis=1)] = position
    return rows


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


__all__ = ["ClusterNode", "WriteResult", "ProtocolError", "store_figures"]


def _intake_figures(waits: deque[float], runs: deque[float]) -> dict[str, float | int | None]:
    """p50 / p99 of the pushes received: waiting for a worker thread, and storing them."""
    wait, run = sample_quantiles(waits), sample_quantiles(runs)
    return {"samples": len(runs),
            "wait_p50_seconds": wait[0] if wait else None, "wait_p99_seconds": wait[1] if wait else None,
            "store_p50_seconds": run[0] if run else None, "store_p99_seconds": run[1] if run else None}
