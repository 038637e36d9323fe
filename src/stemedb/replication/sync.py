"""Reconciling whole stores: `stemedb sync`, and the SYNC side of a server that is not a cluster node.

Owns: `sync_with_server` — one reconciliation session of a whole store
(scope 0) with a server named by its URL, over a Link: this side initiates,
both directions or one (`stemedb sync --data DIR --peer URL`, and
SYNC_WITH on a server); `StoreSync`, what a single server answers to the
replication opcodes (SYNC on its whole store, SYNC_WITH; the cluster-only
ones are `unsupported` there); and `standalone_placement`, the placement of
a store outside any cluster (one node, one partition). Must never: store a
record that did not verify (every record goes through the store's intake),
or build the store's reconciliation trees before someone asks for a session
(a single server that is never synced pays nothing).

Resource handling: `StoreSync` owns the EngineStore it builds on first use;
`close()` releases it. `sync_with_server` owns its Link and closes it.
Error handling: an unreachable peer or a failed HELLO raises Unavailable; a
peer without replication (an older server, or `server.sync = false`) raises
Unsupported saying so. A session that fails midway returns its result with
`error` set (what it stored stays: it was verified); a forged record ends it
and is logged naming the peer.
"""

from __future__ import annotations

import logging
import random
import sys
from typing import Any
from urllib.parse import urlsplit

import trio

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

from stemedb import _protocol
from stemedb.client._wire import Address, parse_url
from stemedb.errors import Forbidden, InvalidRequest, Unsupported
from stemedb.replication import framing
from stemedb.replication.antientropy import (
    Mover,
    Responder,
    RunBlocking,
    SessionResult,
    run_session,
)
from stemedb.replication.cluster import ClusterFile
from stemedb.replication.framing import NodeHello, SyncWith
from stemedb.replication.placement import Placement
from stemedb.replication.reconcile import WHOLE_STORE
from stemedb.replication.store import EngineStore
from stemedb.replication.transport import Connect, Link, sole_error, tcp_connector

log = logging.getLogger("stemedb.replication")

SESSION_TIMEOUT = 60.0   # seconds one SYNC step may take (a frame of 4,096 records verified and stored)


def parse_peer(url: str) -> Address:
    """stemedb://host:port, stemedbs://host:port (TLS), or host:port; ValueError otherwise.

    The clients' URL rule (`client._wire.parse_url`), except that a peer must
    name its host (a client's URL without one means 127.0.0.1).
    """
    if not urlsplit(url if "://" in url else "stemedb://" + url).hostname:
        raise ValueError(f"{url!r}: expected stemedb://host:port or stemedbs://host:port")
    return parse_url(url)


def standalone_placement() -> Placement:
    """The placement of a store outside any cluster: scope 0 is all a session may use."""
    return Placement(ClusterFile.parse('name = "standalone"\nversion = 1\nreplication_factor = 1\n'
                                       'partitions = 1\n[[nodes]]\nid = "local"\n'
                                       'address = "127.0.0.1:7440"\n', source="<standalone>"))


async def sync_with_server(url: str, mover: Mover, *, token: str = "", pull: bool = True,
                           push: bool = True, rng: random.Random | None = None,
                           connect: Connect | None = None,
                           timeout: float = SESSION_TIMEOUT) -> SessionResult:
    """One session of the whole store behind `mover` with the server at `url`; this side initiates.

    The result counts round trips, records each way, reconciliation bytes and
    record bytes apart; `wire_bytes_sent` / `wire_bytes_received` are
    everything that crossed the connection (frames, HELLO included).
    """
    address = parse_peer(url)
    rng = rng or random.SystemRandom()
    connect = connect or tcp_connector(lambda _peer: (address.host, address.port, address.tls))
    try:
        return await _session(address, mover, connect, token, pull, push, rng, timeout)
    except BaseExceptionGroup as group:   # the nursery around one session: its one error
        raise sole_error(group) from None


async def _session(address: Address, mover: Mover, connect: Connect, token: str, pull: bool,
                   push: bool, rng: random.Random, timeout: float) -> SessionResult:
    async with trio.open_nursery() as nursery:
        link = Link(str(address), connect, nursery, token=token, client_name="stemedb-sync",
                    hello_timeout=timeout)
        try:
            session = await link.connected()
            if not session.replication:
                raise Unsupported(f"{address} does not serve replication (an older server, or "
                                  "server.sync = false there)")

            async def exchange(peer: str, request: framing.SyncRequest) -> framing.SyncAnswer:
                answer = await link.request(_protocol.SYNC, framing.encode_sync_request(request), timeout)
                return framing.decode_sync_answer(answer)

            result = await run_session(str(address), [WHOLE_STORE], exchange, mover,
                                       session=rng.getrandbits(64),
                                       salt=rng.getrandbits(64).to_bytes(8, "little"),
                                       can_send=push, can_receive=pull)
            result.wire_bytes_sent, result.wire_bytes_received = link.bytes_sent, link.bytes_received
        finally:
            await link.close()
            nursery.cancel_scope.cancel()
    return result


class StoreSync:
    """The replication side of a single server: SYNC of its whole store, and SYNC_WITH."""

    server_flags = _protocol.SERVER_REPLICATION

    def __init__(self, db: Any, *, run_blocking: RunBlocking = trio.to_thread.run_sync) -> None:
        self.db = db
        self.placement = standalone_placement()
        self.run_blocking = run_blocking
        self.store: EngineStore | None = None
        self._mover: Mover | None = None
        self._responder: Responder | None = None
        self._lock = trio.Lock()

    async def _ready(self) -> tuple[Mover, Responder]:
        async with self._lock:
            if self._mover is None or self._responder is None:
                # Building the store's trees reads every record's key: once, in a thread.
                self.store = await self.run_blocking(EngineStore, self.db, self.placement)
                self._mover = Mover(self.store, self.run_blocking)
                self._responder = Responder("local", self.placement, self._mover,
                                            allowed=lambda peer, start: {WHOLE_STORE})
            return self._mover, self._responder

    def accept_node(self, hello: NodeHello) -> NodeHello:
        raise Unsupported(f"NODE_HELLO from {hello.node!r}: this server is not a cluster node "
                          "(stemedb serve --cluster)")

    def heard(self, peer: str) -> None:
        return None

    async def handle_peer_request(self, peer: str | None, opcode: int, payload: bytes, *,
                                  client: str = "") -> bytes:
        if opcode == _protocol.SYNC:
            request = framing.decode_sync_request(payload)
            _mover, responder = await self._ready()
            return framing.encode_sync_answer(await responder.handle(client, request))
        if opcode == _protocol.SYNC_WITH:
            sync_with = framing.decode_sync_with(payload)
            mover, _responder = await self._ready()
            return framing.encode_json(await sync_with_request(sync_with, mover))
        if opcode in (_protocol.REPLICA_PUT, _protocol.PUSH):
            raise Forbidden("this server is not a cluster node")
        raise Unsupported("this server is not a cluster node (stemedb serve --cluster)")

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None


async def sync_with_request(request: SyncWith, mover: Mover) -> dict[str, Any]:
    """SYNC_WITH naming another server: one whole-store session with it; the figures as JSON."""
    try:
        parse_peer(request.peer)
    except ValueError as exc:
        raise InvalidRequest(f"peer: {exc}") from None
    result = await sync_with_server(request.peer, mover, token=request.token, pull=request.pull,
                                    push=request.push)
    return result.to_dict()
