"""Links over the binary protocol to a real server: HELLO, NODE_HELLO, pipelined requests,
errors through the one error table, timeouts, reconnects.

No sockets: `connect` hands out one end of a memory stream pair and serves
the other with the production server (stemedb.server.Server.handle_stream),
whose replication side is a stand-in that answers SYNC_WITH after the delay
its payload names; under trio's MockClock.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

import stemedb
from stemedb import _protocol
from stemedb.errors import (
    Forbidden,
    ProtocolError,
    SignatureError,
    StorageFull,
    Unavailable,
    Unsupported,
)
from stemedb.replication import framing
from stemedb.replication.antientropy import run_inline
from stemedb.replication.framing import NodeHello
from stemedb.replication.transport import Link
from stemedb.server import Server, ServerConfig, Token, hash_token

CLUSTER = "demo"
LOOPBACK = ("127.0.0.1", 40000)
ASK = _protocol.SYNC_WITH   # an opcode the stand-in answers: its payload says how


class Replication:
    """Node "n2": answers ASK with its payload after the delay the payload names (tenths of s)."""

    server_flags = _protocol.SERVER_REPLICATION | _protocol.SERVER_CLUSTER

    def __init__(self, name: str = "n2") -> None:
        self.hello = NodeHello(CLUSTER, 1, name)
        self.heard_from: list[str] = []
        self.callers: list[str | None] = []

    def accept_node(self, hello: NodeHello) -> NodeHello:
        if hello.cluster != CLUSTER:
            raise Forbidden(f"NODE_HELLO from cluster {hello.cluster!r}")
        return self.hello

    def heard(self, peer: str) -> None:
        self.heard_from.append(peer)

    async def handle_peer_request(self, peer, opcode, payload, *, client=""):
        self.callers.append(peer)
        if payload.startswith(b"full"):
            raise StorageFull("disk full")
        if payload.startswith(b"forged"):
            raise SignatureError("records[0]: bad signature")
        if payload.startswith(b"hang"):
            await trio.sleep_forever()
        await trio.sleep(int(payload or b"0") / 10)
        return payload


class Door:
    """A server on memory streams; `connect(peer)` opens one connection to it."""

    def __init__(self, nursery, tmp_path, replication=None, config=None):
        self.nursery = nursery
        self.db = stemedb.open(tmp_path / f"store{id(self)}")
        self.server = Server(self.db, config or ServerConfig(), replication=replication,
                             run_blocking=run_inline)
        self.streams: list[trio.abc.Stream] = []

    async def connect(self, peer):
        client, server = trio.testing.memory_stream_pair()
        self.streams.append(client)
        self.nursery.start_soon(self.server.handle_stream, server, LOOPBACK)
        return client

    def close(self):
        self.db.close()


def run(main):
    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def link(door, nursery, **options):
    return Link("n2", door.connect, nursery, node_hello=NodeHello(CLUSTER, 1, "n1"), **options)


def test_requests_are_pipelined_and_answered_out_of_order(tmp_path):
    async def main():
        async with trio.open_nursery() as nursery:
            replication = Replication()
            door = Door(nursery, tmp_path, replication)
            peer = link(door, nursery)
            done: list[tuple[float, bytes]] = []

            async def ask(delay: bytes):
                answer = await peer.request(ASK, delay, 5.0)
                done.append((trio.current_time(), answer))

            async with trio.open_nursery() as asks:
                for delay in (b"30", b"10", b"20"):
                    asks.start_soon(ask, delay)
            assert [answer for _, answer in done] == [b"10", b"20", b"30"]
            assert [round(t - done[0][0], 3) for t, _ in done] == [0.0, 1.0, 2.0]
            assert peer.connections == 1 and peer.peer_hello == NodeHello(CLUSTER, 1, "n2")
            assert peer.session is not None and peer.session.cluster and peer.session.replication
            assert replication.callers == ["n1"] * 3 and "n1" in replication.heard_from
            nursery.cancel_scope.cancel()
        door.close()
    run(main)


def test_errors_come_back_as_their_class_and_the_link_goes_on(tmp_path):
    async def main():
        async with trio.open_nursery() as nursery:
            door = Door(nursery, tmp_path, Replication())
            peer = link(door, nursery)
            with pytest.raises(StorageFull, match="disk full"):
                await peer.request(ASK, b"full", 5.0)
            with pytest.raises(SignatureError, match="bad signature"):
                await peer.request(ASK, b"forged", 5.0)
            assert await peer.request(_protocol.PING, b"", 5.0) == b""
            assert peer.connections == 1
            nursery.cancel_scope.cancel()
        door.close()
    run(main)


def test_an_unanswered_request_times_out_and_a_late_answer_is_ignored(tmp_path):
    async def main():
        async with trio.open_nursery() as nursery:
            door = Door(nursery, tmp_path, Replication())
            peer = link(door, nursery)
            await peer.connected()
            started = trio.current_time()
            with pytest.raises(Unavailable, match=r"n2 did not answer SYNC_WITH within 2 s"):
                await peer.request(ASK, b"hang", 2.0)
            assert trio.current_time() - started == pytest.approx(2.0)
            with pytest.raises(Unavailable, match=r"within 0.5 s"):
                await peer.request(ASK, b"9", 0.5)       # answered at 0.9 s: too late
            await trio.sleep(1.0)                         # the late answer arrives ...
            assert await peer.request(ASK, b"1", 5.0) == b"1"   # ... and is not taken for this
            nursery.cancel_scope.cancel()
        door.close()
    run(main)


def test_a_broken_connection_fails_its_requests_and_the_next_request_reconnects(tmp_path):
    async def main():
        async with trio.open_nursery() as nursery:
            door = Door(nursery, tmp_path, Replication())
            heard, failed = [], []
            peer = link(door, nursery, on_heard=heard.append, on_failed=failed.append)
            assert await peer.request(_protocol.PING, b"", 5.0) == b""

            async def break_it():
                await trio.sleep(0.5)
                await door.streams[0].aclose()

            nursery.start_soon(break_it)
            with pytest.raises(Unavailable, match="connection to n2 lost"):
                await peer.request(ASK, b"hang", 5.0)
            assert await peer.request(_protocol.PING, b"", 5.0) == b""
            assert peer.connections == 2 and heard.count("n2") >= 3 and failed == []
            nursery.cancel_scope.cancel()
        door.close()
    run(main)


def test_connect_failures_are_unavailable_and_reported():
    async def refuse(peer):
        raise OSError("connection refused")

    async def main():
        async with trio.open_nursery() as nursery:
            failed = []
            peer = Link("n2", refuse, nursery, node_hello=NodeHello(CLUSTER, 1, "n1"),
                        on_failed=failed.append)
            with pytest.raises(Unavailable, match="cannot connect to n2: connection refused"):
                await peer.request(_protocol.PING, b"", 1.0)
            assert failed == ["n2"]
    run(main)


def test_a_peer_of_another_cluster_or_name_is_refused(tmp_path):
    async def main():
        async with trio.open_nursery() as nursery:
            wrong_name = Door(nursery, tmp_path, Replication(name="n7"))
            with pytest.raises(Unavailable, match=r"n2 answered as node 'n7' of cluster 'demo'"):
                await link(wrong_name, nursery).request(_protocol.PING, b"", 1.0)
            other = Door(nursery, tmp_path, Replication())
            stranger = Link("n2", other.connect, nursery, node_hello=NodeHello("elsewhere", 1, "n1"))
            with pytest.raises(Unavailable, match="did not complete HELLO: NODE_HELLO from cluster "
                                                  "'elsewhere'"):
                await stranger.request(_protocol.PING, b"", 1.0)
            nursery.cancel_scope.cancel()
        wrong_name.close()
        other.close()
    run(main)


def test_node_opcodes_need_the_replica_or_admin_role_and_a_server_without_replication_says_so(tmp_path):
    """Peers authenticate like clients: a read token may not send SYNC, a replica token may; a
    server with `server.sync = false` answers `unsupported`."""
    secret, reader = "replica-token-0123456789", "read-token-0123456789"
    tokens = [Token("node", _protocol.ROLE_REPLICA, hash_token(secret)),
              Token("viewer", _protocol.ROLE_READ, hash_token(reader))]

    async def main():
        async with trio.open_nursery() as nursery:
            door = Door(nursery, tmp_path, Replication(), ServerConfig(tokens=tokens))
            replica = link(door, nursery, token=secret)
            assert await replica.request(_protocol.SYNC, b"1", 5.0) == b"1"
            with pytest.raises(Forbidden, match="sync_with needs the admin role; 'node' has replica"):
                await replica.request(_protocol.SYNC_WITH, b"1", 5.0)
            assert replica.session.role == _protocol.ROLE_REPLICA
            viewer = Link("n2", door.connect, nursery, token=reader)
            with pytest.raises(Forbidden, match="sync needs the replica role; 'viewer' has read"):
                await viewer.request(_protocol.SYNC, b"", 5.0)
            config = ServerConfig()
            config.sync = False
            plain = Door(nursery, tmp_path, None, config)
            other = Link("plain", plain.connect, nursery)
            assert not (await other.connected()).replication
            with pytest.raises(Unsupported, match="SYNC is not served by this server: replication is "
                                                  r"off on this server \(server.sync = false\)"):
                await other.request(_protocol.SYNC, b"", 5.0)
            nursery.cancel_scope.cancel()
        door.close()
        plain.close()
    run(main)


def test_a_peer_that_breaks_the_framing_is_answered_protocol_and_dropped(tmp_path):
    async def main():
        async with trio.open_nursery() as nursery:
            door = Door(nursery, tmp_path, Replication())
            plain = Link("n2", door.connect, nursery)
            await plain.connected()
            with pytest.raises(ProtocolError, match="node_hello: NODE_HELLO: cluster at byte 1 runs "
                                                    "past the end"):
                await plain.request(_protocol.NODE_HELLO, b"\x05ab", 5.0)
            assert await plain.request(_protocol.PING, b"", 5.0) == b""   # on a new connection
            assert plain.connections == 2
            peer = link(door, nursery)
            with pytest.raises(ProtocolError, match="NODE_HELLO sent twice"):
                await peer.request(_protocol.NODE_HELLO, framing.encode_node_hello(
                    NodeHello(CLUSTER, 1, "n1")), 5.0)
            nursery.cancel_scope.cancel()
        door.close()
    run(main)
