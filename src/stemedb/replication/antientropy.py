"""Anti-entropy: reconciliation sessions with peers, and when to run them.

Owns: the session protocol over SYNC messages (docs/replication.md,
"Anti-entropy"): the initiator's side (`run_session`), the responder's side
(`Responder`, one state per open session, duplicate steps answered again
from a cache, the directions the initiator asked for), the outboxes that
carry the records each side found the other lacking, and the scheduler
(`AntiEntropy`): which peers this node initiates with (the lower node id of a
pair initiates; one session per peer covers every partition the two share
plus the global partition), every `interval` × (1 ± jitter) seconds, as soon
as a peer turns up, and on demand; and the hand-off of records this node
holds in partitions it does not replicate (after a placement change, or a
store that joined a cluster with all its data) to the replicas of those
partitions, in sessions that only send.
Must never: store a record without verifying it (every record goes through
`Intake`), send bytes itself (`exchange` is injected), or run a blocking store
call on the event loop (`run_blocking` is injected: trio.to_thread.run_sync in
production, an inline call in the simulation).

A session starts with one 16-byte fingerprint per scope (the whole scope),
so a round between two nodes that agree costs one message each way however
many partitions they share; scopes that differ then proceed as range-based
reconciliation does (reconcile.py), one more half round trip than starting
with the split.

Error handling: a session that fails (the peer is unreachable, answers an
error, breaks the protocol or sends a forged record) ends; what it already
stored stays (it was verified). A forged record is logged naming the peer
and counted in `forged`. The scheduler retries at the next round.
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio

from stemedb import _reconcile
from stemedb.errors import InvalidRecord, ProtocolError, SignatureError, StemeError
from stemedb.replication.framing import (
    SYNC_DONE,
    SYNC_END,
    SYNC_PULL,
    SYNC_PUSH,
    SYNC_START,
    RecordBatch,
    SyncAnswer,
    SyncRequest,
)
from stemedb.replication.placement import Placement, partition_of_scope, scope_of
from stemedb.replication.reconcile import GLOBAL_PARTITION, WHOLE_STORE, Reconciler, encode_message
from stemedb.replication.store import Intake, ReplicaStore

log = logging.getLogger("stemedb.replication")

RunBlocking = Callable[..., Awaitable[Any]]
Exchange = Callable[[str, SyncRequest], Awaitable[SyncAnswer]]

# A range list of one range up to infinity holding a 16-byte fingerprint: the
# infinite bound is the varint 0, the head byte carries the mode in its top 3 bits
# (docs/protocol.md, "Range list"; stemedb._reconcile.MODES).
WHOLE_RANGE_FINGERPRINT = b"\x00" + bytes([_reconcile.MODES["fingerprint16"] << 5])
FRAME_RECORDS = 4096            # records one SYNC frame carries at most
FRAME_BYTES = 8 << 20           # record bytes one SYNC frame carries at most (one record may exceed it)
SESSION_IDLE = 120.0            # a responder forgets a session not continued for this long
MAX_SESSIONS = 256              # open responder sessions at most (the oldest is forgotten)


async def run_inline(function: Callable[..., Any], *args: Any) -> Any:
    """The simulation's run-blocking hook: the call runs on the event loop, in order."""
    await trio.lowlevel.checkpoint()
    return function(*args)


def probe_message(store: ReplicaStore, scopes: list[int], salt: bytes) -> bytes:
    """The first message of a session: one fingerprint of each whole scope. Hold store.lock."""
    blocks = []
    for scope in scopes:
        tree, timestamps, ids = store.items(scope)
        blocks.append((scope, WHOLE_RANGE_FINGERPRINT
                       + tree.fingerprint((0, b""), None, timestamps, ids, salt, 16)))
    return encode_message(blocks)


@dataclass
class SessionResult:
    """What one session did, from this side's point of view."""

    peer: str
    scopes: int
    round_trips: int = 0
    bytes_sent: int = 0             # reconciliation messages (range lists), records not counted
    bytes_received: int = 0
    records_sent: int = 0
    records_received: int = 0
    record_bytes_sent: int = 0      # the records themselves (IDs and encodings)
    record_bytes_received: int = 0
    records_stored: int = 0         # offered to the store (already held ones are skipped there)
    wire_bytes_sent: int = 0        # everything on the connection, when the caller counted it
    wire_bytes_received: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def moved(self) -> int:
        return self.records_sent + self.records_received

    def to_dict(self) -> dict[str, Any]:
        """The figures `stemedb sync --json` prints (docs/cli.md)."""
        return {"peer": self.peer, "scopes": self.scopes, "ok": self.ok, "error": self.error,
                "round_trips": self.round_trips, "received": self.records_received,
                "sent": self.records_sent, "stored": self.records_stored,
                "bytes_sent": self.wire_bytes_sent or self.bytes_sent + self.record_bytes_sent,
                "bytes_received": (self.wire_bytes_received
                                   or self.bytes_received + self.record_bytes_received),
                "message_bytes_sent": self.bytes_sent, "message_bytes_received": self.bytes_received,
                "record_bytes_sent": self.record_bytes_sent,
                "record_bytes_received": self.record_bytes_received}


class Outbox:
    """Record numbers to send to the peer, envelopes before the members they prove.

    Envelopes (the global partition's records, and the envelopes among a
    whole-store scope's) go ahead of everything else queued, so a receiver
    rarely holds members back waiting for their envelope: in (timestamp, ID)
    order an envelope, signed after its members were made, comes after them.
    `envelopes(rows)` says which rows are envelopes (the store's kind column).
    """

    def __init__(self, envelopes: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        self._envelopes = envelopes
        self._first: list[np.ndarray] = []
        self._rest: list[np.ndarray] = []
        self._queue = np.zeros(0, dtype=np.int64)   # merged, sent from `_at` on
        self._at = 0

    def add(self, sends: dict[int, np.ndarray]) -> None:
        for scope, rows in sends.items():
            rows = np.asarray(rows, np.int64)
            if not len(rows):
                continue
            if scope == GLOBAL_PARTITION:
                self._first.append(rows)
            elif scope == WHOLE_STORE and self._envelopes is not None:
                mask = self._envelopes(rows)
                self._first.append(rows[mask])
                self._rest.append(rows[~mask])
            else:
                self._rest.append(rows)

    def __bool__(self) -> bool:
        return bool(self._first or self._rest) or self._at < len(self._queue)

    def _queued(self) -> np.ndarray:
        if self._first or self._rest:   # new rows: envelopes ahead of what was queued before
            self._queue = np.concatenate(self._first + [self._queue[self._at:]] + self._rest)
            self._first, self._rest, self._at = [], [], 0
        return self._queue[self._at:]

    def peek(self, limit: int = FRAME_RECORDS) -> np.ndarray:
        return self._queued()[:limit]

    def take(self, count: int) -> np.ndarray:
        rows = self._queued()[:count]
        self._at += len(rows)
        return rows


class Mover:
    """The blocking store work of a session, run through the run-blocking hook."""

    def __init__(self, store: ReplicaStore, run_blocking: RunBlocking = trio.to_thread.run_sync) -> None:
        self.store = store
        self.run_blocking = run_blocking

    async def probe(self, scopes: list[int], salt: bytes) -> bytes:
        return await self.run_blocking(self._locked, probe_message, self.store, scopes, salt)  # type: ignore[no-any-return]

    async def step(self, reconciler: Reconciler, message: bytes) -> tuple[bytes | None, dict[int, np.ndarray]]:
        return await self.run_blocking(self._locked, reconciler.receive, message)  # type: ignore[no-any-return]

    def _locked(self, function: Callable[..., Any], *args: Any) -> Any:
        with self.store.lock:
            return function(*args)

    async def take(self, outbox: Outbox) -> RecordBatch:
        """The next frame's worth of records from `outbox`: at most FRAME_RECORDS, and
        FRAME_BYTES of record bytes unless a single record is larger."""
        if not outbox:
            return RecordBatch.empty()
        candidates = outbox.peek()
        sizes = np.cumsum(self.store.record_sizes(candidates))
        count = max(1, int(np.searchsorted(sizes, FRAME_BYTES, side="right")))
        batch = await self.run_blocking(self.store.read_rows, outbox.take(count))
        return batch  # type: ignore[no-any-return]

    async def accept(self, intake: Intake, batch: RecordBatch) -> int:
        if not len(batch):
            return 0
        return await self.run_blocking(intake.accept, batch)  # type: ignore[no-any-return]

    async def finish(self, intake: Intake) -> None:
        await self.run_blocking(intake.finish)


FORGED = (SignatureError, InvalidRecord)


async def run_session(peer: str, scopes: list[int], exchange: Exchange, mover: Mover, *,
                      session: int, salt: bytes, can_send: bool = True,
                      can_receive: bool = True) -> SessionResult:
    """One reconciliation session with `peer`, this side initiating; never raises for the peer's faults.

    Ends when the peer answered DONE to a step after which this side had no
    records left to send. Errors are in the result: a forged record in an
    answer is refused (nothing of its batch stored) and ends the session.
    """
    if not (can_send or can_receive):
        raise ValueError("run_session: the session must send, receive, or both")
    result = SessionResult(peer=peer, scopes=len(scopes))
    reconciler = Reconciler(mover.store, list(scopes), can_send=can_send, can_receive=can_receive,
                            salt=salt)
    outbox, intake = Outbox(mover.store.envelope_mask), Intake(mover.store)
    storing = _Storing(mover, intake)
    step = 0
    flags = SYNC_START | (0 if can_send else SYNC_PULL) | (0 if can_receive else SYNC_PUSH)
    try:
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            try:
                message: bytes | None = await mover.probe(list(scopes), salt)
                while True:
                    records = await mover.take(outbox)
                    if not outbox:
                        flags |= SYNC_END
                    request = SyncRequest(session, step, flags, message or b"", records, salt, tuple(scopes))
                    result.bytes_sent += len(request.message)
                    result.records_sent += len(records)
                    result.record_bytes_sent += records.size + 36 * len(records)
                    answer = await exchange(peer, request)
                    result.round_trips += 1
                    if answer.step != step:
                        raise ProtocolError(f"SYNC answer: step {answer.step}, expected {step}")
                    if len(answer.records) and not can_receive:
                        raise ProtocolError(f"SYNC answer: {len(answer.records)} records in a session that "
                                            "only sends")
                    result.bytes_received += len(answer.message)
                    result.records_received += len(answer.records)
                    result.record_bytes_received += answer.records.size + 36 * len(answer.records)
                    # The previous answer's records are stored while this one travelled; this
                    # one's are stored while the next step travels (one batch at a time, in order).
                    await storing.start(nursery, answer.records)
                    message = None
                    if answer.message:
                        message, sends = await mover.step(reconciler, answer.message)
                        outbox.add(sends)
                    if answer.flags & SYNC_DONE and flags & SYNC_END and message is None and not outbox:
                        break
                    step, flags = step + 1, 0
                await storing.wait()
            except Exception as exc:   # raised here, not as a group from the nursery
                failure = exc
        if failure is not None:
            raise failure
        result.records_stored += storing.stored
        await mover.finish(intake)
    except FORGED as exc:
        result.error = f"forged record: {exc}"
        log.warning("anti-entropy with %s: the peer sent a forged record, refused, session ended: %s",
                    peer, exc)
    except (StemeError, OSError, trio.BrokenResourceError, trio.ClosedResourceError,
            trio.TooSlowError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        log.info("anti-entropy with %s ended early: %s", peer, result.error)
    # Members held until their envelope arrived were stored after the answer that brought them.
    result.records_stored = max(result.records_stored, storing.stored, intake.stored)
    return result


class _Storing:
    """Stores a session's received batches one at a time, each while the next step travels.

    `start(nursery, batch)` waits for the batch before it (raising what
    refused it: a forged record ends the session one step later, with
    nothing of its own batch stored) and begins storing `batch`; `wait()`
    waits for the last one.
    """

    def __init__(self, mover: Mover, intake: Intake) -> None:
        self.mover = mover
        self.intake = intake
        self.stored = 0
        self._done: trio.Event | None = None
        self._error: BaseException | None = None

    async def start(self, nursery: trio.Nursery, batch: RecordBatch) -> None:
        await self.wait()
        if not len(batch):
            return
        done = self._done = trio.Event()

        async def store() -> None:
            try:
                self.stored += await self.mover.accept(self.intake, batch)
            except (*FORGED, StemeError, OSError) as exc:
                self._error = exc
            finally:
                done.set()

        nursery.start_soon(store)

    async def wait(self) -> None:
        if self._done is not None:
            await self._done.wait()
            self._done = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


@dataclass
class _Open:
    reconciler: Reconciler
    outbox: Outbox
    intake: Intake
    step: int
    answer: SyncAnswer | None
    touched: float


AllowedScopes = Callable[[str, SyncRequest], "set[int]"]


class Responder:
    """The answering side of every session peers open with this node.

    `allowed(peer, start)` names the scopes `peer` may open with the START
    step `start`; by default the node rule (`node_scopes`).
    """

    def __init__(self, node_id: str, placement: Placement, mover: Mover,
                 clock: Callable[[], float] = trio.current_time,
                 allowed: AllowedScopes | None = None) -> None:
        self.node_id = node_id
        self.placement = placement
        self.mover = mover
        self.clock = clock
        self.allowed = allowed or (lambda peer, start: node_scopes(self.placement, self.node_id, peer,
                                                                   start))
        self.sessions: dict[tuple[str, int], _Open] = {}
        self.closed: OrderedDict[tuple[str, int], tuple[int, SyncAnswer]] = OrderedDict()
        self.answered = 0

    async def handle(self, peer: str, request: SyncRequest) -> SyncAnswer:
        """Answer one SYNC step; raises ProtocolError / SignatureError / InvalidRecord to refuse it.

        A repeat of the step answered last (the network duplicated it, or the
        answer was lost and the initiator's transport resent it) gets the same
        answer again, also just after the session closed; a stale repeat of an
        earlier step is refused without disturbing the session.
        """
        key = (peer, request.session)
        self._expire()
        state = self.sessions.get(key)
        if state is None and key in self.closed:
            step, answer = self.closed[key]
            if request.step == step:
                return answer
            raise ProtocolError(f"SYNC: session {request.session} with {peer} has ended")
        if request.flags & SYNC_START and state is None:
            state = self._open(peer, request)
        elif state is None:
            raise ProtocolError(f"SYNC: no open session {request.session} with {peer} (it ended or "
                                "this node restarted); start a new one")
        state.touched = self.clock()
        if request.step == state.step and state.answer is not None:
            return state.answer      # a duplicate of the step answered last: same answer
        if request.step <= state.step:
            raise ProtocolError(f"SYNC: step {request.step} of session {request.session} was "
                                "answered already (a stale duplicate)")
        if request.step != state.step + 1:
            self.sessions.pop(key, None)
            raise ProtocolError(f"SYNC: step {request.step} of session {request.session}, expected "
                                f"{state.step + 1}")
        try:
            answer = await self._answer(state, request)
        except BaseException:
            self.sessions.pop(key, None)
            raise
        state.step, state.answer = request.step, answer
        self.answered += 1
        if answer.flags & SYNC_DONE and request.flags & SYNC_END:
            self.sessions.pop(key, None)
            self.closed[key] = (request.step, answer)
            while len(self.closed) > MAX_SESSIONS:
                self.closed.popitem(last=False)
        return answer

    def _open(self, peer: str, request: SyncRequest) -> _Open:
        allowed = self.allowed(peer, request)
        for scope in request.scopes:
            if scope not in allowed:
                raise ProtocolError(f"SYNC: scope {scope} is not one {peer} may reconcile with "
                                    f"{self.node_id} (cluster version {self.placement.cluster.version})")
        if len(self.sessions) >= MAX_SESSIONS:
            oldest = min(self.sessions, key=lambda k: self.sessions[k].touched)
            del self.sessions[oldest]
        # The initiator's directions, seen from here: PULL means this side takes nothing.
        reconciler = Reconciler(self.mover.store, list(request.scopes),
                                can_send=not request.flags & SYNC_PUSH,
                                can_receive=not request.flags & SYNC_PULL, salt=request.salt)
        state = _Open(reconciler, Outbox(self.mover.store.envelope_mask), Intake(self.mover.store), -1, None,
                      self.clock())
        self.sessions[(peer, request.session)] = state
        return state

    async def _answer(self, state: _Open, request: SyncRequest) -> SyncAnswer:
        if len(request.records) and not state.reconciler.can_receive:
            raise ProtocolError(f"SYNC: {len(request.records)} records in a session that only pulls")
        await self.mover.accept(state.intake, request.records)
        message = b""
        if request.message:
            reply, sends = await self.mover.step(state.reconciler, request.message)
            state.outbox.add(sends)
            message = reply or b""
        records = await self.mover.take(state.outbox)
        done = state.reconciler.done and not state.outbox
        if done and request.flags & SYNC_END:
            await self.mover.finish(state.intake)
        return SyncAnswer(request.step, SYNC_DONE if done else 0, message, records)

    def _expire(self) -> None:
        now = self.clock()
        for key in [k for k, s in self.sessions.items() if now - s.touched > SESSION_IDLE]:
            del self.sessions[key]


def node_scopes(placement: Placement, node_id: str, peer: str, start: SyncRequest) -> set[int]:
    """The scopes node `peer` may open with this node: the global partition and the partitions
    both replicate; in a session that only sends (a hand-off), any partition this node replicates."""
    if peer not in placement.cluster.node_ids:
        return set()
    if start.flags & SYNC_PUSH:
        return {GLOBAL_PARTITION} | {scope_of(p) for p in placement.partitions_of(node_id)}
    return {GLOBAL_PARTITION} | {scope_of(p) for p in placement.shared_partitions(node_id, peer)}


def stray_scopes(store: ReplicaStore, placement: Placement, node_id: str) -> list[int]:
    """Scopes of partitions this node holds records of but does not replicate (call in a thread)."""
    held = set(placement.partitions_of(node_id))
    stray = []
    with store.lock:
        for partition in range(placement.partitions):
            if partition not in held and len(store.items(scope_of(partition))[0]):
                stray.append(scope_of(partition))
    return stray


@dataclass
class AntiEntropyStats:
    rounds: int = 0
    failed_rounds: int = 0
    handoffs: int = 0               # sessions handing off records of partitions this node left
    records_sent: int = 0
    records_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    record_bytes_sent: int = 0
    record_bytes_received: int = 0
    forged: dict[str, int] = field(default_factory=dict)   # peer → sessions ended by a forged record


class AntiEntropy:
    """When this node reconciles with whom; drives `run_session`.

    `rng` draws the jitter, session ids and salts (seeded in the
    simulation, so a run replays exactly). Peers can be added and removed
    while it runs (a cluster-file reload); `placement` may be replaced.
    """

    def __init__(self, node_id: str, placement: Placement, mover: Mover, exchange: Exchange, *,
                 interval: float = 30.0, jitter: float = 0.2, rng: random.Random | None = None,
                 is_live: Callable[[str], bool] = lambda peer: True) -> None:
        if interval <= 0 or not 0 <= jitter < 1:
            raise ValueError(f"anti-entropy: interval {interval} must be positive and jitter {jitter} "
                             "in [0, 1)")
        self.node_id = node_id
        self.placement = placement
        self.mover = mover
        self.exchange = exchange
        self.interval = interval
        self.jitter = jitter
        self.rng = rng or random.Random()
        self.is_live = is_live
        self.stats = AntiEntropyStats()
        self.last: dict[str, SessionResult] = {}
        self._locks: dict[str, trio.Lock] = {}
        self._triggers: dict[str, trio.Event] = {}
        self._loops: dict[str, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None

    def initiates_with(self, peer: str) -> bool:
        """Each pair reconciles once per round: the node with the lower id starts it."""
        return self.node_id < peer

    def peers(self) -> list[str]:
        """The peers this node starts the rounds with."""
        return [p for p in self.placement.cluster.peers_of(self.node_id) if self.initiates_with(p)]

    def scopes_with(self, peer: str) -> list[int]:
        return [GLOBAL_PARTITION] + [scope_of(p) for p in self.placement.shared_partitions(self.node_id, peer)]

    def trigger(self, peer: str) -> None:
        """Run a round with `peer` soon (it just turned up, or an operator asked)."""
        event = self._triggers.get(peer)
        if event is not None:
            event.set()

    def next_wait(self) -> float:
        return self.interval * (1 + self.jitter * (2 * self.rng.random() - 1))

    async def sync_now(self, peer: str, *, can_send: bool = True,
                       can_receive: bool = True) -> SessionResult:
        """One session with `peer` now (either side may ask), after any running one ends."""
        return await self._session(peer, self.scopes_with(peer), can_send, can_receive)

    async def hand_off(self, peer: str) -> SessionResult | None:
        """Send `peer` what this node holds of partitions `peer` replicates and this node does not
        (None when there is nothing to hand off). The global partition rides along, so the
        envelopes of handed-off members reach the peer first."""
        stray = await self.mover.run_blocking(stray_scopes, self.mover.store, self.placement,
                                              self.node_id)
        scopes = [s for s in stray if peer in self.placement.replicas(partition_of_scope(s))]
        if not scopes:
            return None
        self.stats.handoffs += 1
        return await self._session(peer, [GLOBAL_PARTITION, *scopes], True, False)

    async def _session(self, peer: str, scopes: list[int], can_send: bool,
                       can_receive: bool) -> SessionResult:
        lock = self._locks.setdefault(peer, trio.Lock())
        async with lock:
            session = self.rng.getrandbits(64)
            salt = self.rng.getrandbits(64).to_bytes(8, "little")
            result = await run_session(peer, scopes, self.exchange, self.mover, session=session,
                                       salt=salt, can_send=can_send, can_receive=can_receive)
        self._count(result)
        return result

    def _count(self, result: SessionResult) -> None:
        stats = self.stats
        stats.rounds += 1
        stats.failed_rounds += not result.ok
        stats.records_sent += result.records_sent
        stats.records_received += result.records_received
        stats.bytes_sent += result.bytes_sent
        stats.bytes_received += result.bytes_received
        stats.record_bytes_sent += result.record_bytes_sent
        stats.record_bytes_received += result.record_bytes_received
        if result.error and result.error.startswith("forged"):
            stats.forged[result.peer] = stats.forged.get(result.peer, 0) + 1
        self.last[result.peer] = result

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Rounds with every peer, forever (see add_peer)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for peer in self.placement.cluster.peers_of(self.node_id):
                self.add_peer(peer)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def add_peer(self, peer: str) -> None:
        """Start rounds with `peer` (sessions if this node initiates with it; hand-offs in any case)."""
        if self._nursery is None or peer in self._loops:
            return
        scope = self._loops[peer] = trio.CancelScope()
        self._triggers[peer] = trio.Event()
        self._nursery.start_soon(self._peer_loop, peer, scope)

    def remove_peer(self, peer: str) -> None:
        scope = self._loops.pop(peer, None)
        if scope is not None:
            scope.cancel()
        self._triggers.pop(peer, None)

    async def _peer_loop(self, peer: str, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                with trio.move_on_after(self.next_wait()):
                    await self._triggers[peer].wait()
                self._triggers[peer] = trio.Event()
                if not self.is_live(peer):
                    continue
                if self.initiates_with(peer):
                    await self.sync_now(peer)
                await self.hand_off(peer)
