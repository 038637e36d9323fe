"""The one path every request of both front doors takes: authorize → admit → run → metrics.

Owns: the operations the server serves (the name rate limits and metrics know
them by, the role each needs, whether it writes and what it may write), the
authentication of a presented token (failures throttled per address), the
admission of a request (its role, then the per-client and per-operation rate
limits), the worker-thread limiters every blocking call goes through (reads;
writes; large write batches), and running a request: its work, its metrics
under one label scheme (`door`, `op`), and whatever it raised turned into a
Refusal through the one error table (stemedb.errors). The binary protocol
(connection.py) and the HTTP side door (http.py) call it with a Caller (door,
peer, principal) and get from the server only a DoorContext: this module,
the limits, the buffer budget and the metrics — never the Server. On a
cluster node it also routes what the doors ask (docs/replication.md,
"Writes", "Reads"): writes through the node's write path under the
request's ack policy, reads and queries of a subject to a live replica of
its partition (forwarded when this node is not one), records by ID from this
node first, then the others; and it hands the replication opcodes to the
replication side (`Replication`: the ClusterNode, or a standalone server's
sync responder). A request that came from another node (after its
NODE_HELLO) is always served here, never forwarded again.

Admission and running are two calls because both doors decide a request
before reading or decoding its payload: a door calls `admit` as soon as it
knows who asks for what, then `run` once it holds the payload. The bytes a
door holds for a request (the buffer budget, stemedb.server.buffers) are
reserved by the door as they arrive, before there is a request to admit.

Must never: block the event loop (blocking calls go through `call`, in a
worker thread, or the injected `run_blocking` of the simulation); read or
write a socket; raise from `run` (a failed request is a Refusal for the door
to answer).

Error handling: `authenticate` and `admit` raise the refusal (AuthError,
RateLimited, Forbidden, Unsupported), counted in
stemedb_requests_rejected_total; `run` returns the Refusal of whatever the
work raised — an unexpected exception is logged with its traceback and
answered `internal` without its details.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import numpy as np
import trio

from stemedb import _codec, _protocol
from stemedb._codec import Record
from stemedb.errors import (
    AuthError,
    AuthRequired,
    QuotaExceeded,
    RateLimited,
    Refusal,
    StemeError,
    Unavailable,
    Unsupported,
    refusal,
)
from stemedb.logs import ACCESS_LOGGER
from stemedb.records import RecordKind
from stemedb.server.auth import Authenticator, Peer, Principal, describe_peer
from stemedb.server.buffers import BufferBudget
from stemedb.server.config import Limits
from stemedb.server.limits import RequestLimits
from stemedb.server.metrics import ServerMetrics
from stemedb.server.service import JSON, Blob, Service

if TYPE_CHECKING:
    from stemedb.replication.framing import NodeHello
    from stemedb.replication.node import ClusterNode

Door = Literal["binary", "http"]
T = TypeVar("T")

access_log = logging.getLogger(ACCESS_LOGGER)
CANCELLED = "cancelled"  # the access log's status of a request whose work was cancelled: no answer

# Write batches at least this large are decoded and verified by at most `bulk_threads`
# threads: that work holds the GIL, and more threads only contend for it (measured: 16
# threads ingest big batches at half the rate of 2). Small writes mostly wait for the
# fsync, so many of them in flight make bigger group commits.
BULK_RECORDS = 256


@dataclass(frozen=True)
class Operation:
    """What a request asks for, as rate limits, roles, worker pools and metrics see it."""

    name: str                        # metrics label `op`; [rate_limits.operations] key
    opcode: int | None               # its binary opcode, whose role it needs; None: an open route
    writes: bool = False             # runs in the write pools (else the read pool)
    kind: RecordKind | None = None   # a write of records of this kind only (VOTE, EPOCH)
    served: bool = True              # False: answered `unsupported` (`why` says what is missing)
    replication: bool = False        # a replication opcode (0x40-0x4F), handed to the replication side
    cluster_only: bool = False       # ... served by cluster nodes only
    why: str = ""


OPERATIONS: dict[int, Operation] = {op.opcode: op for op in (
    Operation("ping", _protocol.PING),
    Operation("put", _protocol.PUT, writes=True),
    Operation("vote", _protocol.VOTE, writes=True, kind=RecordKind.VOTE),
    Operation("epoch", _protocol.EPOCH, writes=True, kind=RecordKind.EPOCH),
    Operation("get", _protocol.GET),
    Operation("query", _protocol.QUERY),
    Operation("scan", _protocol.SCAN),
    Operation("stats", _protocol.STATS),
    Operation("audit", _protocol.AUDIT),
    Operation("verify", _protocol.VERIFY),
    Operation("node_hello", _protocol.NODE_HELLO, replication=True, cluster_only=True),
    Operation("sync", _protocol.SYNC, replication=True),
    Operation("replica_put", _protocol.REPLICA_PUT, replication=True, cluster_only=True),
    Operation("push", _protocol.PUSH, replication=True, cluster_only=True),
    Operation("sync_with", _protocol.SYNC_WITH, replication=True),
    Operation("cluster_status", _protocol.CLUSTER_STATUS, replication=True, cluster_only=True),
    Operation("cluster_reload", _protocol.CLUSTER_RELOAD, replication=True, cluster_only=True),
) if op.opcode is not None}
# The HTTP door's open routes: no token, no role, no rate limit (load balancers, Prometheus).
HEALTH = Operation("health", None)
READY = Operation("ready", None)
METRICS = Operation("metrics", None)


def operation_of(opcode: int, server_flags: int = 0) -> Operation:
    """The operation of a request opcode, as a server with these replication `server_flags`
    (SERVER_REPLICATION, SERVER_CLUSTER) serves it; reserved opcodes are answered `unsupported`."""
    known = OPERATIONS.get(opcode)
    if known is None:
        return Operation("replication", opcode, served=False, why="a reserved replication opcode")
    if not known.replication:
        return known
    if not server_flags & _protocol.SERVER_REPLICATION:
        return Operation(known.name, opcode, served=False, replication=True,
                         why="replication is off on this server (server.sync = false)")
    if known.cluster_only and not server_flags & _protocol.SERVER_CLUSTER:
        return Operation(known.name, opcode, served=False, replication=True, cluster_only=True,
                         why="it is not a cluster node (stemedb serve --cluster)")
    return known


class Replication(Protocol):
    """What serves the replication opcodes: a ClusterNode, or a standalone server's sync side."""

    server_flags: int     # SERVER_REPLICATION, and SERVER_CLUSTER on a cluster node

    def accept_node(self, hello: NodeHello) -> NodeHello: ...
    def heard(self, peer: str) -> None: ...
    async def handle_peer_request(self, peer: str | None, opcode: int, payload: bytes, *,
                                  client: str = "") -> bytes: ...


@dataclass(frozen=True)
class Caller:
    """Who asks, through which door: all the pipeline is told of a request's origin."""

    door: Door
    peer: Peer
    principal: Principal | None  # None only on the HTTP door's open routes
    node: str | None = None      # the cluster node the request came from (after NODE_HELLO)

    @property
    def label(self) -> str:
        """How replication names a caller that is not a node (logs, sync sessions)."""
        name = self.principal.name if self.principal is not None else "-"
        return f"{name}@{describe_peer(self.peer)}"


class Pipeline:
    """Authorize, admit, run in a worker thread, measure; for every request of both doors."""

    def __init__(self, service: Service, auth: Authenticator, limits: RequestLimits,
                 metrics: ServerMetrics, *, write_threads: int, bulk_threads: int,
                 read_threads: int, describe: Callable[[], JSON], access: bool = False,
                 replication: Replication | None = None, cluster: ClusterNode | None = None,
                 run_blocking: Callable[..., Awaitable[Any]] | None = None) -> None:
        self.service = service
        self.access = access
        self.auth = auth
        self.limits = limits
        self.metrics = metrics
        self.replication = replication
        self.cluster = cluster
        self._run_blocking = run_blocking
        self._threads = {"write": write_threads, "bulk": bulk_threads, "read": read_threads}
        self._limiters: dict[str, trio.CapacityLimiter] = {}
        self._describe = describe

    @property
    def server_flags(self) -> int:
        """The HELLO answer's replication flags (docs/protocol.md, "HELLO")."""
        return self.replication.server_flags if self.replication is not None else 0

    def operation(self, opcode: int) -> Operation:
        """The operation a request opcode is, as this server serves it."""
        return operation_of(opcode, self.server_flags)

    # -------------------------------------------------------- who is asking

    def authenticate(self, peer: Peer, token: str) -> Principal:
        """The token's principal; failures are counted per peer address and throttled.

        Raises RateLimited (without checking the token) while the address has
        failed too often, AuthError for an unknown or expired token.
        """
        now = trio.current_time()
        self.limits.check_auth_failures(peer, now)
        try:
            return self.auth.authenticate(token)
        except AuthError:
            self.limits.auth_failed(peer, now)
            raise

    def anonymous(self, peer: Peer) -> Principal | None:
        """The principal of a client without a token (protected mode), None if it needs one."""
        return self.auth.anonymous(peer)

    @property
    def protected_mode(self) -> bool:
        return self.auth.protected_mode

    # ------------------------------------------------------------ admission

    def admit(self, caller: Caller, operation: Operation) -> None:
        """Let the request in, or raise its refusal: Forbidden, Unsupported, RateLimited."""
        if operation.opcode is None:
            return  # an open route
        try:
            if caller.principal is None:
                raise AuthRequired(f"{operation.name} needs an authenticated client")
            Authenticator.authorize(caller.principal, operation.opcode)
            if not operation.served:
                name = _protocol.OPCODE_NAMES.get(operation.opcode, hex(operation.opcode))
                raise Unsupported(f"{name.upper()} is not served by this server: {operation.why}")
            if caller.principal.role != _protocol.ROLE_REPLICA:
                # Cluster nodes are not rate-limited: heartbeats and pushes must not queue
                # behind a client's allowance (their writes were charged where they came in).
                self.limits.admit(caller.principal.name, operation.name, trio.current_time())
        except StemeError as exc:
            self.metrics.rejected.labels(exc.name).inc()
            self._answered(caller, operation, exc.name, None, 0)
            raise

    # --------------------------------------------------------------- running

    async def run(self, caller: Caller, operation: Operation,
                  work: Callable[[], Awaitable[T]], *, size: int = 0) -> T | Refusal:
        """Do an admitted request's `work`: its answer, or the Refusal of what it raised.

        `size` is the request's payload in bytes (the access log's `bytes`).
        """
        started = time.perf_counter()
        status = CANCELLED  # replaced unless the work is cancelled (shutdown, client gone)
        try:
            answer = await work()
            status = "ok"
            return answer
        except Exception as exc:
            failure = refusal(exc)
            status = failure.name
            if issubclass(failure.error, RateLimited):
                self.metrics.rejected.labels(
                    "quota" if issubclass(failure.error, QuotaExceeded) else failure.name).inc()
            return failure
        finally:
            self._answered(caller, operation, status, time.perf_counter() - started, size)

    def _answered(self, caller: Caller, operation: Operation, status: str, seconds: float | None,
                  size: int) -> None:
        """Count a request (seconds None: refused before it ran) and write its access-log line."""
        labels = {"door": caller.door, "op": operation.name}
        self.metrics.requests.labels(**labels).inc()
        if status not in ("ok", CANCELLED):
            self.metrics.request_errors.labels(error=status, **labels).inc()
        if seconds is not None:
            self.metrics.request_seconds.labels(**labels).observe(seconds)
        if self.access:
            principal = caller.principal.name if caller.principal is not None else "-"
            access_log.info("%s %s %s", caller.door, operation.name, status, extra={
                "door": caller.door, "op": operation.name, "peer": describe_peer(caller.peer),
                "principal": principal, "status": status, "bytes": size,
                "duration_ms": round((seconds or 0.0) * 1000, 3)})

    async def call(self, operation: Operation, function: Callable[..., T], *args: Any,
                   records: int = 0) -> T:
        """`function(*args)` in a worker thread of the operation's pool.

        Reads share the read pool; writes of at least BULK_RECORDS `records`
        go to the small bulk pool, other writes to the write pool.
        """
        if self._run_blocking is not None:
            inline: T = await self._run_blocking(function, *args)
            return inline
        pool = "read"
        if operation.writes:
            pool = "bulk" if records >= BULK_RECORDS else "write"
        result: T = await trio.to_thread.run_sync(function, *args, limiter=self._limiter(pool))
        return result

    def _limiter(self, pool: str) -> trio.CapacityLimiter:
        # Created on first use: a CapacityLimiter belongs to the trio run that made it.
        limiter = self._limiters.get(pool)
        if limiter is None:
            limiter = self._limiters[pool] = trio.CapacityLimiter(self._threads[pool])
        return limiter

    # ------------------------------------- operations both doors serve alike

    async def put(self, operation: Operation, blob: Blob, offsets: np.ndarray, *,
                  acks: str | None = None) -> np.ndarray:
        """Store a write request's encoded records (only `operation.kind` if it has one); IDs.

        On a cluster node the records go through its write path under `acks`
        ("1", "all"; None: the cluster file's default); a single server
        stores them here, durable, whatever `acks` says.
        """
        count = len(offsets) - 1
        self.metrics.put_records.observe(count)
        if self.cluster is None:
            return await self.call(operation, self.service.put_encoded, blob, offsets,
                                   trio.current_time(), operation.kind, records=count)
        from stemedb.replication.framing import RecordBatch

        data, offsets, ids = await self.call(operation, self.service.cluster_batch, blob, offsets,
                                             trio.current_time(), operation.kind, records=count)
        await self.cluster.write(RecordBatch(data, offsets, ids), acks)
        return ids

    async def query(self, caller: Caller, operation: Operation, subject: str, predicate: str,
                    lens: str, options: JSON) -> tuple[Any, list[Record]]:
        """(JSON-ready resolution, contributing records); audited under the caller's name.

        On a cluster node that does not replicate the subject's partition the
        query is forwarded to a live replica (the audit keeps the caller's name).
        """
        agent = caller.principal.name if caller.principal is not None else None
        if caller.node is not None and "agent" in options:
            agent = str(options.pop("agent"))  # forwarded: audited under the original caller
        target = self.read_target(caller, subject)
        started = time.perf_counter()
        if target is None:
            answer = await self.call(operation, self.service.query, subject, predicate, lens,
                                     options, agent)
        else:
            answer = await self._forward_query(target, subject, predicate, lens,
                                               {**options, "agent": agent} if options.get("audit") else options)
        self.metrics.query_seconds.labels(lens or "default").observe(time.perf_counter() - started)
        return answer

    def read_target(self, caller: Caller, subject: str) -> list[str] | None:
        """None when this server answers a read of `subject` itself; else the replicas to
        forward it to, best first (Unavailable when no replica of its partition is live)."""
        if self.cluster is None or caller.node is not None or not subject:
            return None
        order = self.cluster.read_order(subject)
        if order and order[0] == self.cluster.node_id:
            return None
        if not order:
            partition = self.cluster.placement.subject_partition(subject)
            raise Unavailable(f"no replica of partition {partition} (subject {subject!r}) is up; "
                              "retry later")
        return order

    async def forward(self, targets: list[str], opcode: int, payload: bytes) -> list[bytes]:
        """A read served by the first of `targets` that answers: its answer frames' payloads."""
        assert self.cluster is not None
        failures = []
        for node in targets:
            try:
                return await self.cluster.forward(node, opcode, payload)
            except Unavailable as exc:
                failures.append(f"{node}: {exc}")
        raise Unavailable(f"no replica answered ({'; '.join(failures)}); retry later")

    async def _forward_query(self, targets: list[str], subject: str, predicate: str, lens: str,
                             options: JSON) -> tuple[Any, list[Record]]:
        payload = _protocol.encode_query(subject, predicate, lens, json.dumps(options) if options else "")
        (answer,) = await self.forward(targets, _protocol.QUERY, payload)
        text, blob, offsets = _protocol.decode_query_result(answer)
        return json.loads(text), _codec.decode_many(blob, offsets)

    async def fetch_missing(self, ids: np.ndarray, found: np.ndarray) -> dict[bytes, bytes]:
        """On a cluster node: records this node lacks (`found` < 0) that other nodes hold."""
        if self.cluster is None or not (found < 0).any():
            return {}
        return await self.cluster.fetch(np.ascontiguousarray(ids[found < 0]))

    async def stats(self, operation: Operation) -> JSON:
        """The store's figures, with the server's own under "server"."""
        stats = await self.call(operation, self.service.stats)
        stats["server"] = self._describe()
        return stats


@dataclass
class DoorContext:
    """All a front end is given of the server: the pipeline and what it must bound itself by.

    `draining` is set by the server when it shuts down: the doors then read no
    more requests and answer the ones in flight.
    """

    pipeline: Pipeline
    limits: Limits
    budget: BufferBudget
    metrics: ServerMetrics
    server_name: str
    tls: bool
    draining: bool = False
