"""Peer links over trio memory streams: HELLO, pipelined requests, errors, timeouts, reconnects.

No sockets: `connect` hands out one end of a memory stream pair and serves
the other with `serve_peer`, under trio's MockClock.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from stemedb.errors import ProtocolError, SignatureError, StorageFull, Unavailable
from stemedb.replication import framing
from stemedb.replication.framing import Hello
from stemedb.replication.transport import PeerLink, serve_peer

CLUSTER = "demo"


class Server:
    """A peer "n2" that answers PING with its payload after the delay the payload names."""

    def __init__(self, nursery, *, name="n2", cluster=CLUSTER):
        self.nursery = nursery
        self.hello = Hello(cluster, 1, name)
        self.streams: list[trio.abc.Stream] = []
        self.handled: list[bytes] = []
        self.frames_from: list[str] = []

    def accept(self, hello):
        if hello.cluster != CLUSTER:
            raise ProtocolError(f"HELLO from cluster {hello.cluster!r}")

    async def handle(self, peer, frame):
        self.handled.append(frame.payload)
        if frame.payload.startswith(b"full"):
            raise StorageFull("disk full")
        if frame.payload.startswith(b"forged"):
            raise SignatureError("records[0]: bad signature")
        if frame.payload.startswith(b"hang"):
            await trio.sleep_forever()
        await trio.sleep(int(frame.payload or b"0") / 10)
        return frame.payload

    async def connect(self, peer):
        client, server = trio.testing.memory_stream_pair()
        self.streams.append(client)
        self.nursery.start_soon(serve_peer, server, self.hello, self.accept, self.handle)
        return client


def run(main):
    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def link(server, nursery, **options):
    return PeerLink("n2", Hello(CLUSTER, 1, "n1"), server.connect, nursery, **options)


def test_requests_are_pipelined_and_answered_out_of_order():
    async def main():
        async with trio.open_nursery() as nursery:
            server = Server(nursery)
            peer = link(server, nursery)
            done: list[tuple[float, bytes]] = []

            async def ask(delay: bytes):
                answer = await peer.request(framing.PING, delay, 5.0)
                done.append((trio.current_time(), answer))

            async with trio.open_nursery() as asks:
                for delay in (b"30", b"10", b"20"):
                    asks.start_soon(ask, delay)
            assert [answer for _, answer in done] == [b"10", b"20", b"30"]
            assert [round(t, 3) for t, _ in done] == [1.0, 2.0, 3.0]
            assert peer.connections == 1 and peer.peer_hello == Hello(CLUSTER, 1, "n2")
            nursery.cancel_scope.cancel()
    run(main)


def test_errors_come_back_as_their_class_and_the_link_goes_on():
    async def main():
        async with trio.open_nursery() as nursery:
            server = Server(nursery)
            peer = link(server, nursery)
            with pytest.raises(StorageFull, match="disk full"):
                await peer.request(framing.PING, b"full", 5.0)
            with pytest.raises(SignatureError, match="bad signature"):
                await peer.request(framing.PING, b"forged", 5.0)
            assert await peer.request(framing.PING, b"", 5.0) == b""
            assert peer.connections == 1
            nursery.cancel_scope.cancel()
    run(main)


def test_an_unanswered_request_times_out_and_a_late_answer_is_ignored():
    async def main():
        async with trio.open_nursery() as nursery:
            server = Server(nursery)
            peer = link(server, nursery)
            started = trio.current_time()
            with pytest.raises(Unavailable, match=r"n2 did not answer PING within 2 s"):
                await peer.request(framing.PING, b"hang", 2.0)
            assert trio.current_time() - started == pytest.approx(2.0)
            with pytest.raises(Unavailable, match=r"within 0.5 s"):
                await peer.request(framing.PING, b"9", 0.5)       # answered at 0.9 s: too late
            await trio.sleep(1.0)                                 # the late answer arrives ...
            assert await peer.request(framing.PING, b"1", 5.0) == b"1"   # ... and is not taken for this
            nursery.cancel_scope.cancel()
    run(main)


def test_a_broken_connection_fails_its_requests_and_the_next_request_reconnects():
    async def main():
        async with trio.open_nursery() as nursery:
            server = Server(nursery)
            heard, failed = [], []
            peer = link(server, nursery, on_heard=heard.append, on_failed=failed.append)
            assert await peer.request(framing.PING, b"", 5.0) == b""

            async def break_it():
                await trio.sleep(0.5)
                await server.streams[0].aclose()

            nursery.start_soon(break_it)
            with pytest.raises(Unavailable, match="connection to n2 lost"):
                await peer.request(framing.PING, b"hang", 5.0)
            assert await peer.request(framing.PING, b"", 5.0) == b""
            assert peer.connections == 2 and heard.count("n2") >= 3 and failed == []
            nursery.cancel_scope.cancel()
    run(main)


def test_connect_failures_are_unavailable_and_reported():
    async def refuse(peer):
        raise OSError("connection refused")

    async def main():
        async with trio.open_nursery() as nursery:
            failed = []
            peer = PeerLink("n2", Hello(CLUSTER, 1, "n1"), refuse, nursery, on_failed=failed.append)
            with pytest.raises(Unavailable, match="cannot connect to n2: connection refused"):
                await peer.request(framing.PING, b"", 1.0)
            assert failed == ["n2"]
    run(main)


def test_a_peer_of_another_cluster_or_name_is_refused():
    async def main():
        async with trio.open_nursery() as nursery:
            wrong_name = Server(nursery, name="n7")
            with pytest.raises(Unavailable, match=r"n2 answered as node 'n7' of cluster 'demo'"):
                await link(wrong_name, nursery).request(framing.PING, b"", 1.0)
            other = Server(nursery)
            stranger = PeerLink("n2", Hello("elsewhere", 1, "n1"), other.connect, nursery)
            with pytest.raises(Unavailable, match="did not complete HELLO: HELLO from cluster 'elsewhere'"):
                await stranger.request(framing.PING, b"", 1.0)
            nursery.cancel_scope.cancel()
    run(main)


def test_serve_peer_wants_hello_first_and_drops_a_peer_that_breaks_the_framing():
    async def main():
        async with trio.open_nursery() as nursery:
            server = Server(nursery)
            client = await server.connect("n2")
            await client.send_all(framing.encode_frame(framing.PING, 1, b""))
            reader = framing.FrameParser()
            data = await client.receive_some()
            reader.feed(data)
            frame = reader.next()
            assert frame.kind == framing.ERROR and "the first message must be HELLO" in \
                framing.decode_error(frame.payload)[1]
            assert await client.receive_some() == b""           # and the connection is closed
            second = await server.connect("n2")
            await second.send_all(framing.encode_frame(framing.HELLO, 1, framing.encode_hello(
                Hello(CLUSTER, 1, "n1"))))
            await second.send_all(b"GET / HTTP/1.1\r\n\r\n")
            chunks = b""
            while True:
                data = await second.receive_some()
                if not data:
                    break
                chunks += data
            parsed = framing.FrameParser()
            parsed.feed(chunks)
            kinds = [f.kind for f in parsed.frames()]
            assert kinds == [framing.HELLO, framing.ERROR]
            nursery.cancel_scope.cancel()
    run(main)
