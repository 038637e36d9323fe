"""Read your own writes on a connection (docs/protocol.md, "Ordering on a connection").

A read pipelined behind a write on the same connection sees that write: the
server holds the read until every write sent before it on the connection has
been answered. Reads on other connections, and PINGs, are not held back.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import pytest
import trio
from test_server_support import SIGNER, claims, config, record_batch, served

import stemedb
from stemedb import _protocol
from stemedb.client import connect
from stemedb.server import Server


@pytest.fixture
def db(tmp_path):
    with stemedb.open(tmp_path / "data") as store:
        yield store


def held_puts(server: Server) -> threading.Event:
    """Make every PUT wait in its commit until the returned event is set."""
    release = threading.Event()
    real_put = server.service.put_encoded

    def slow_put(*args: Any) -> Any:
        release.wait(10)
        return real_put(*args)

    server.service.put_encoded = slow_put  # type: ignore[method-assign]
    return release


def found(frame: _protocol.Frame) -> list[bool]:
    _blob, offsets = _protocol.decode_record_batch(frame.payload, True)
    return [bool(length) for length in np.diff(offsets)]


@pytest.mark.trio
async def test_a_get_behind_a_held_put_waits_for_it_and_a_ping_does_not(db):
    server = Server(db, config())
    release = held_puts(server)
    async with served(server) as client:
        await client.hello()
        record = claims(1, prefix="ryw")[0]
        put_id = await client.send(_protocol.PUT, record_batch([record]))
        get_id = await client.send(_protocol.GET, _protocol.encode_ids([record.id]))
        ping_id = await client.send(_protocol.PING, b"p")
        first = await client.frame()
        assert first is not None and first.request_id == ping_id  # PING is not held back
        release.set()
        answers = {frame.request_id: frame for frame in [await client.frame(), await client.frame()]}
        assert set(answers) == {put_id, get_id}
        assert found(answers[get_id]) == [True]


@pytest.mark.trio
async def test_query_and_scan_behind_a_held_put_see_it(db):
    server = Server(db, config())
    release = held_puts(server)
    async with served(server) as client:
        await client.hello()
        record = stemedb.Assertion("ryw-q", "p", 7, timestamp=1_700_000_000_000_000).sign(SIGNER)
        await client.send(_protocol.PUT, record_batch([record]))
        query_id = await client.send(_protocol.QUERY, _protocol.encode_query("ryw-q", "p", "", ""))
        scan_id = await client.send(_protocol.SCAN, _protocol.encode_scan("ryw-q", "", 0, 0))
        with trio.move_on_after(0.2):  # nothing may be answered while the PUT is held
            early = await client.frame()
            pytest.fail(f"answered before the PUT it follows: {early}")
        release.set()
        answers: dict[int, list[_protocol.Frame]] = {}
        while len(answers.get(query_id, [])) < 1 or not answers.get(scan_id) \
                or answers[scan_id][-1].more:
            frame = await client.frame()
            assert frame is not None
            answers.setdefault(frame.request_id, []).append(frame)
        text, _blob, _offsets = _protocol.decode_query_result(answers[query_id][0].payload)
        assert json.loads(text)["winner"]["id"] == record.id.hex()
        scanned = []
        for frame in answers[scan_id]:
            blob, offsets = _protocol.decode_record_batch(frame.payload)
            scanned += stemedb.decode_many(blob, offsets)
        assert scanned == [record]


@pytest.mark.trio
async def test_a_failed_put_releases_the_reads_behind_it(db):
    server = Server(db, config())
    async with served(server) as client:
        await client.hello()
        unsigned = claims(1, prefix="bad", signer=None)[0]
        put_id = await client.send(_protocol.PUT, record_batch([unsigned]))
        get_id = await client.send(_protocol.GET, _protocol.encode_ids([unsigned.id]))
        answers = {frame.request_id: frame for frame in [await client.frame(), await client.frame()]}
        assert answers[put_id].opcode == _protocol.ERROR
        assert found(answers[get_id]) == [False]


def test_pipelined_put_get_pairs_over_tcp_see_every_write(tmp_path):
    """250 PUT→GET pairs pipelined on one socket (the issue saw 32 and 250 misses of 250)."""
    from test_server_support import background_server

    with background_server(tmp_path / "data") as running, connect(running.url) as client:
        conn = client._connection()
        records = claims(250, prefix="pair")
        calls = []
        for record in records:
            calls.append(conn.start(_protocol.PUT, record_batch([record])))
            calls.append(conn.start(_protocol.GET, bytes(_protocol.encode_ids([record.id]))))
        for call in calls:
            assert call.event.wait(60)
        misses = 0
        for call in calls[1::2]:
            _blob, offsets = _protocol.decode_record_batch(call.result()[0], True)
            misses += int(np.diff(offsets)[0] == 0)
        assert misses == 0
