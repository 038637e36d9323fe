"""The buffer budget, per-connection answer queues and streamed GETs (stemedb.server.buffers).

Unit tests of the pools and accounts, then the server with memory streams: a
client that stops reading is held to its output limit and disconnected after
the send timeout (MockClock, no wall-clock waits), a GET whose records grew
after it was planned still answers within the frame limit, and the HTTP door
keeps a connection after refusing a request it did not have to read a body of.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import time
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from test_server_support import LOOPBACK, SIGNER, Driver, background_server, claims, config, served

import stemedb
from stemedb import _protocol as P
from stemedb.server import ConfigError, Limits, Server, ServerConfig, Token, hash_token
from stemedb.server.buffers import BytePool, InputAccount, OutputQueue


@pytest.fixture
def db(tmp_path):
    with stemedb.open(tmp_path / "db") as database:
        yield database


# ---------------------------------------------------------------- the pools


@pytest.mark.trio
async def test_pool_serves_waiters_in_arrival_order():
    pool = BytePool("answers", 100)
    assert await pool.take(60) == 60
    granted: list[str] = []

    async def take(name: str, size: int) -> None:
        await pool.take(size)
        granted.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take, "large", 50)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(take, "small", 10)  # would fit now, but waits behind "large"
        await trio.testing.wait_all_tasks_blocked()
        assert granted == [] and pool.waiting == 2 and pool.used == 60
        pool.give(10)  # room for the head of the line only
        await trio.testing.wait_all_tasks_blocked()
        assert granted == ["large"] and pool.waiting == 1 and pool.used == 100
        pool.give(50)
    assert granted == ["large", "small"] and pool.used == 60 and pool.peak == 100
    with pytest.raises(ValueError, match="capacity is 100"):
        await pool.take(101)


@pytest.mark.trio
async def test_a_cancelled_waiter_lets_the_next_one_in():
    pool = BytePool("requests", 100)
    await pool.take(60)
    granted: list[str] = []
    head = trio.CancelScope()

    async def cancelled() -> None:
        with head:
            await pool.take(50)
            granted.append("cancelled")

    async def following() -> None:
        await pool.take(30)
        granted.append("following")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cancelled)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(following)  # 60 + 30 fits, but it queues behind the 50
        await trio.testing.wait_all_tasks_blocked()
        assert granted == [] and pool.waiting == 2
        head.cancel()
    assert granted == ["following"] and pool.used == 90 and pool.waiting == 0


@pytest.mark.trio
async def test_input_account_reserves_a_whole_frame_and_gives_it_back():
    pool = BytePool("requests", 10_000)
    account = InputAccount(pool, free=100)
    assert await account.make_room(50) == 100 and pool.used == 0  # within the free allowance
    account.expect(5_000)
    room = await account.make_room(5_000)
    assert room >= 5_000 and pool.used == account.reserved >= 4_900
    account.set_buffered(3_000)  # part of the frame in: the reservation for the rest stays
    assert account.reserved >= 4_900
    account.start_serving(5_000)
    account.set_buffered(0)
    account.expect(0)
    assert pool.used == 4_900  # the request being served still holds its bytes
    account.done_serving(5_000)
    assert pool.used == 0 and account.reserved == 0
    account.expect(300)
    await account.make_room(300)
    account.close()
    assert pool.used == 0


@pytest.mark.trio
async def test_bytes_given_back_while_a_reservation_waits_stay_given_back():
    mib = 1 << 20
    pool = BytePool("requests", 2 * mib)
    account = InputAccount(pool, free=0)
    account.start_serving(mib)
    await account.make_room(1)  # a request being served holds 1 MiB (+1 byte of room)
    other = await pool.take(pool.capacity - pool.used)  # the rest of the pool is someone else's
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(account.make_room, mib)  # waits: the pool is full
            await trio.testing.wait_all_tasks_blocked()
            account.done_serving(mib)  # gives its 1 MiB back while that wait goes on
    assert account.reserved == pool.used - other  # what it holds is what the pool lent it
    pool.give(other)
    account.close()
    assert pool.used == 0


@pytest.mark.trio
async def test_output_queue_bounds_one_connection_and_charges_the_pool():
    pool = BytePool("answers", 10_000)
    queue = OutputQueue(pool, limit=1_000, free=100)
    small = await queue.reserve(80)
    assert not small.pooled and pool.used == 0
    queue.queue(small, b"s" * 80)
    big = await queue.reserve(600)
    assert big.pooled and pool.used == 600
    queue.queue(big, b"b" * 600)
    reserved: list[int] = []

    async def third() -> None:
        ticket = await queue.reserve(600)  # 80 + 600 + 600 > 1,000: waits for the sender
        reserved.append(ticket.size)
        queue.queue(ticket, b"c" * 600)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(third)
        await trio.testing.wait_all_tasks_blocked()
        assert reserved == [] and queue.queued == 680
        batch = await queue.next_batch()
        assert [parts for parts, _ in batch] == [(b"s" * 80,), (b"b" * 600,)]  # coalesced
        for _parts, ticket in batch:
            queue.written(ticket)
    assert reserved == [600] and queue.queued == 600 and pool.used == 600
    queue.discard()
    assert queue.queued == 0 and pool.used == 0
    empty = OutputQueue(pool, limit=1_000, free=100)
    alone = await empty.reserve(5_000)  # larger than the limit: admitted when the queue is empty
    empty.cancel(alone)
    assert pool.used == 0 and empty.queued == 0


@given(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=12), data=st.data())
def test_pending_frame_size_is_known_once_its_header_is_in(sizes, data):
    """FrameReader.pending_size: what the connection reserves before reading more of a frame."""
    stream = b"".join(P.encode_frame(P.PING, 0, i + 1, bytes(n)) for i, n in enumerate(sizes))
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=30))))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    reader, fed, starts = P.FrameReader(1 << 20), 0, []
    assert reader.pending_size == 0
    offset = 0
    for n in sizes:  # where each frame begins in the stream
        starts.append(offset)
        offset += P.FRAME_HEADER + n
    for chunk in chunks:
        reader.feed(chunk)
        fed += len(chunk)
        while reader.next() is not None:
            pass
        begin = fed - reader.buffered
        if reader.buffered >= P.FRAME_HEADER:
            assert reader.pending_size == P.FRAME_HEADER + sizes[starts.index(begin)]
        else:
            assert reader.pending_size == 0
    assert reader.buffered == 0 and reader.pending_size == 0


def test_budget_must_hold_the_largest_frame_in_each_half(tmp_path):
    with pytest.raises(ConfigError, match="limits.buffer_budget"):
        ServerConfig.from_dict({"limits": {"buffer_budget": 8 << 20}})
    settings = ServerConfig.from_dict({"limits": {"buffer_budget": 40 << 20, "output_buffer": 1 << 20,
                                                  "send_timeout": 5}})
    assert (settings.limits.buffer_budget, settings.limits.output_buffer,
            settings.limits.send_timeout) == (40 << 20, 1 << 20, 5.0)
    small = ServerConfig(listen=None, http=None)
    small.limits = Limits(buffer_budget=1 << 20)
    with stemedb.open(tmp_path / "db") as database, pytest.raises(ConfigError, match="at least"):
        Server(database, small)


# ------------------------------------------------- a client that stops reading


@contextlib.asynccontextmanager
async def lockstep(server: Server) -> AsyncIterator[Driver]:
    """A Driver whose every send waits for the server to read it, and the reverse."""
    client_side, server_side = trio.testing.lockstep_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_stream, server_side, LOOPBACK)
        try:
            yield Driver(client_side)
        finally:
            await client_side.aclose()


async def settle(predicate: Callable[[], bool], what: str) -> None:
    """Let the server run (its worker threads too) until `predicate` holds; the mock clock stays put."""
    deadline = time.monotonic() + 20
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await trio.sleep(0)


@pytest.mark.trio
async def test_a_client_that_stops_reading_is_held_to_its_limit_then_closed(db, mock_clock):
    record = stemedb.Assertion("s", "blob", "x" * 100_000, timestamp=1).sign(SIGNER)
    db.put(record)
    server = Server(db, config(output_buffer=256 * 1024, send_timeout=5.0))
    async with lockstep(server) as client:
        await client.hello()
        for request_id in range(100, 120):
            await client.send(P.GET, P.encode_ids([record.id]), request_id)
        await settle(lambda: len(server.connections) == 1, "the connection")
        conn = next(iter(server.connections))
        await settle(lambda: conn.inflight + conn.requests_served == 20, "20 GETs read")
        frame = P.FRAME_HEADER + 8 + len(record.encode())
        await settle(lambda: conn.output.queued >= 2 * frame and conn.inflight == 18,
                     "two answers queued, the other GETs parked")
        for _ in range(200):  # and so they stay: the queue is full and nobody reads
            await trio.sleep(0)
        assert conn.output.queued == 2 * frame <= 256 * 1024 and conn.inflight == 18
        assert server.budget.answers.used == 2 * frame
        mock_clock.jump(5.1)  # the send timeout: the socket took nothing for 5 s
        await settle(lambda: not server.connections, "the connection to close")
    assert server.budget.answers.used == 0 and server.budget.requests.used == 0
    assert server.metrics.rejected.labels("slow_reader")._value.get() == 1


@pytest.mark.trio
async def test_get_of_records_stored_after_its_plan_still_fits_the_frame_limit(db):
    records = claims(600)
    db.put_many(records)
    server = Server(db, config(max_frame=64 * 1024, preauth_frame=4096, max_http_body=64 * 1024))
    # The plan is made from lengths read first; here it sees every record as absent (one tiny
    # frame), as it would if all of them were stored between planning and reading.
    server.service.encoded_lengths = lambda ids: np.zeros(len(ids), dtype=np.int64)  # type: ignore[method-assign]
    async with served(server) as client:
        await client.hello()
        request_id = await client.send(P.GET, P.encode_ids([r.id for r in records]))
        got, frames = [], 0
        while True:
            frame = await client.frame()
            assert frame is not None and frame.request_id == request_id and frame.opcode == P.GET
            assert len(frame.payload) <= 64 * 1024
            frames += 1
            blob, offsets = P.decode_record_batch(frame.payload, True)
            got.extend(stemedb.decode_many(blob, offsets))
            if not frame.more:
                break
    assert got == records and frames > 1
    assert server.budget.answers.used == 0


# ------------------------------------------------------------------- HTTP


def test_http_keeps_the_connection_after_refusing_a_request_without_a_body(tmp_path):
    settings = ServerConfig(listen=None, http="127.0.0.1:0")
    settings.tokens = [Token("writer", P.ROLE_WRITE, hash_token("write-token-0123456789"))]
    with background_server(tmp_path / "data", settings) as running:
        connection = http.client.HTTPConnection(running.server.http_address, timeout=10)
        connection.request("GET", "/v1/stats")
        refused = connection.getresponse()
        assert refused.status == 401 and refused.getheader("connection") is None
        refused.read()
        connection.request("GET", "/health")  # the same connection goes on
        assert connection.getresponse().status == 200
        connection.close()
        # A chunked body is reserved at the body limit and read like any other.
        record = claims(1)[0]
        body = json.dumps({"records": [record.encode().hex()]}).encode()
        connection = http.client.HTTPConnection(running.server.http_address, timeout=10)
        connection.request("POST", "/v1/assert", body=iter([body[:10], body[10:]]),
                           headers={"Authorization": "Bearer write-token-0123456789"},
                           encode_chunked=True)
        answer = connection.getresponse()
        assert answer.status == 200 and json.loads(answer.read())["ids"] == [record.id.hex()]
        connection.request("GET", "/metrics")
        metrics = connection.getresponse().read().decode()
        connection.close()
        assert len(running.db) == 1
        assert 'stemedb_buffer_bytes{pool="requests"} 0.0' in metrics
        assert 'stemedb_buffer_waiting{pool="answers"} 0.0' in metrics
        assert running.server.budget.requests.used == 0


def test_protocol_doc_states_the_memory_limits_the_code_uses():
    import pathlib

    from stemedb.server import buffers, connection, http

    doc = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    rows = {}
    for line in doc[doc.index("## Limits"):doc.index("## Security")].splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4:
            rows[cells[0].strip("`")] = cells[1].replace(",", "")
    defaults = Limits()
    assert int(rows["buffer budget"]) == defaults.buffer_budget
    assert int(rows["output buffer"]) == defaults.output_buffer
    assert float(rows["send timeout"].removesuffix(" s")) == defaults.send_timeout
    assert int(rows["ANSWER_FRAME"]) == connection.ANSWER_FRAME
    assert int(rows["max HTTP head"]) == http.MAX_HEAD
    text = " ".join(doc.split())
    assert buffers.FREE_INPUT == 64 * 1024 and "64 KiB of request bytes (`FREE_INPUT`)" in text
    assert buffers.FREE_OUTPUT == 64 * 1024 and "64 KiB of answers (`FREE_OUTPUT`)" in text
