"""The trio server over memory streams: handshake, operations, pipelining, streaming, shutdown.

Reliability rows (bad-frames, huge-frame, idle-flood, rate-limit, auth) are in
test_server_reliability.py; the HTTP side door in test_server_http.py.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing
from test_server_support import (
    LOOPBACK,
    SIGNER,
    claims,
    config,
    error_of,
    record_batch,
    served,
)

import stemedb
from stemedb import _protocol
from stemedb.server import Server


@pytest.fixture
def db(tmp_path):
    with stemedb.open(tmp_path / "data") as store:
        yield store


def ids_of(frame: _protocol.Frame) -> list[bytes]:
    array = _protocol.decode_ids(frame.payload)
    return [bytes(row) for row in array]


@pytest.mark.trio
async def test_hello_put_get_ping_stats(db):
    server = Server(db, config())
    async with served(server) as client:
        hello = await client.hello()
        version, role, flags, max_frame, max_inflight, name = _protocol.decode_hello_ok(hello.payload)
        assert (version, role, name) == (1, _protocol.ROLE_ADMIN, "stemedb")
        assert flags & _protocol.SERVER_PROTECTED_MODE and not flags & _protocol.SERVER_AUTH_REQUIRED
        records = claims(3)
        put = await client.call(_protocol.PUT, record_batch(records))
        assert put.opcode == _protocol.PUT and put.flags == _protocol.RESPONSE
        assert ids_of(put) == [r.id for r in records]
        assert all(r.id in db for r in records)
        get = await client.call(_protocol.GET, _protocol.encode_ids([records[1].id, bytes(32)]))
        blob, offsets = _protocol.decode_record_batch(get.payload, True)
        assert list(np.diff(offsets)) == [len(records[1].encode()), 0]
        assert stemedb.decode(bytes(blob[offsets[0]:offsets[1]])) == records[1]
        pong = await client.call(_protocol.PING, b"abc")
        assert pong.payload == b"abc"
        stats = json.loads(_protocol.decode_text((await client.call(_protocol.STATS)).payload))
        assert stats["records"] == 3 and stats["server"]["protected_mode"] is True


@pytest.mark.trio
async def test_frames_trickled_one_byte_at_a_time(db):
    """memory_stream_pump(max_bytes=1)-style: every receive on both sides returns one byte."""
    server = Server(db, config())
    members, envelope = SIGNER.sign_batch([stemedb.Assertion(f"t{i}", "p", i) for i in range(5)])
    async with served(server, trickle=True) as client:
        await client.hello()
        put = await client.call(_protocol.PUT, record_batch([envelope, *members]))
        assert ids_of(put) == [envelope.id, *(m.id for m in members)]
        get = await client.call(_protocol.GET, _protocol.encode_ids([m.id for m in members]))
        blob, offsets = _protocol.decode_record_batch(get.payload)
        assert stemedb.decode_many(blob, offsets) == members
        assert (await client.call(_protocol.PING, b"x" * 100)).payload == b"x" * 100
    assert server.metrics.requests.labels(door="binary", op="put")._value.get() == 1


@pytest.mark.trio
async def test_pipelined_requests_are_answered_out_of_order(db):
    """A PUT held in its commit does not hold back the PINGs sent after it."""
    server = Server(db, config())
    release = threading.Event()
    real_put = server.service.put_encoded

    def slow_put(*args: Any) -> Any:
        release.wait(10)
        return real_put(*args)

    server.service.put_encoded = slow_put  # type: ignore[method-assign]
    async with served(server) as client:
        await client.hello()
        records = claims(2)
        put_id = await client.send(_protocol.PUT, record_batch(records))
        ping_ids = [await client.send(_protocol.PING, bytes([i])) for i in range(5)]
        answered = [(await client.frame()).request_id for _ in ping_ids]
        assert answered == ping_ids  # all five PINGs overtook the PUT
        release.set()
        put = await client.frame()
        assert put.request_id == put_id and ids_of(put) == [r.id for r in records]


@pytest.mark.trio
async def test_envelope_batches_and_stored_envelopes(db):
    server = Server(db, config())
    async with served(server) as client:
        await client.hello()
        members, envelope = SIGNER.sign_batch([stemedb.Assertion(f"e{i}", "p", i) for i in range(4)])
        # The envelope may come after its members.
        put = await client.call(_protocol.PUT, record_batch([*members[:2], envelope]))
        assert ids_of(put) == [members[0].id, members[1].id, envelope.id]
        # Members of an envelope stored earlier, mixed with an individually signed record.
        single = claims(1, prefix="solo")[0]
        put = await client.call(_protocol.PUT, record_batch([members[2], single, members[3]]))
        assert ids_of(put) == [members[2].id, single.id, members[3].id]
        assert len(db) == 6


@pytest.mark.trio
async def test_refused_batches_change_nothing_and_keep_the_connection(db):
    server = Server(db, config())
    good = claims(2)
    forged = stemedb.Assertion("forged", "p", 1).sign(SIGNER)
    tampered = forged._with_proof(forged.signers, ((0, bytes(64)),), None)
    garbage = b"\x01\x01\x07\x00\x00\x00\x00"
    async with served(server) as client:
        await client.hello()
        code, _, message = error_of(await client.call(_protocol.PUT, record_batch([good[0], tampered])))
        assert code == _protocol.E_SIGNATURE and "records[1]" in message
        code, _, message = error_of(await client.call(
            _protocol.PUT, bytes(_protocol.encode_record_batch(garbage, [0, len(garbage)]))))
        assert code == _protocol.E_INVALID_RECORD and "record 0" in message
        unsigned = claims(1, signer=None)
        code, _, _ = error_of(await client.call(_protocol.PUT, record_batch(unsigned)))
        assert code == _protocol.E_SIGNATURE
        vote = stemedb.Vote(good[0].id, 1.0).sign(SIGNER)
        code, _, message = error_of(await client.call(_protocol.VOTE, record_batch([good[1]])))
        assert code == _protocol.E_INVALID_REQUEST and "expected a vote" in message
        assert len(db) == 0
        assert ids_of(await client.call(_protocol.VOTE, record_batch([vote]))) == [vote.id]
        epoch = stemedb.Epoch("2024").sign(SIGNER)
        assert ids_of(await client.call(_protocol.EPOCH, record_batch([epoch]))) == [epoch.id]
        assert len(db) == 2


@pytest.mark.trio
async def test_large_answers_stream_in_several_frames(db):
    server = Server(db, config(max_frame=64 * 1024, preauth_frame=4096, max_http_body=64 * 1024))
    records = claims(3000)
    db.put_many(records)
    async with served(server) as client:
        await client.hello()
        request_id = await client.send(_protocol.SCAN, _protocol.encode_scan("", "p", 1, 0))
        frames = []
        while True:
            frame = await client.frame()
            assert frame.request_id == request_id and len(frame.payload) <= 64 * 1024
            frames.append(frame)
            if not frame.more:
                break
        assert len(frames) > 3
        scanned = []
        for frame in frames:
            blob, offsets = _protocol.decode_record_batch(frame.payload)
            scanned.extend(stemedb.decode_many(blob, offsets))
        assert scanned == records
        # 1,500 records of ~150 bytes answer one GET of 48 KB in several 64 KiB frames.
        request_id = await client.send(_protocol.GET, _protocol.encode_ids([r.id for r in records[:1500]]))
        got, frames = [], 0
        while True:
            frame = await client.frame()
            assert frame.request_id == request_id
            frames += 1
            blob, offsets = _protocol.decode_record_batch(frame.payload, True)
            got.extend(stemedb.decode_many(blob, offsets))
            if not frame.more:
                break
        assert got == records[:1500] and frames > 1
        # A GET above the frame limit is a protocol violation: refused from its header.
        await client.send(_protocol.GET, _protocol.encode_ids([r.id for r in records]))
        assert error_of(await client.frame())[0] == _protocol.E_FRAME_TOO_LARGE
        assert await client.rest() == []


def filtered_claims() -> tuple[list[Any], list[Any]]:
    """Two approved claims at t=1, 2; one newer but only proposed, one approved but after as_of=5.

    With lifecycle=approved and as_of=5 the recency winner is the t=2 claim:
    the filters reached the real engine.
    """
    def claim(value: str, t: int, lifecycle: stemedb.Lifecycle) -> Any:
        return stemedb.Assertion("aspirin", "treats", stemedb.Ref(value), timestamp=t,
                                 lifecycle=lifecycle).sign(SIGNER)

    approved = stemedb.Lifecycle.APPROVED
    return ([claim("headache", 1, approved), claim("fever", 2, approved)],
            [claim("cough", 3, stemedb.Lifecycle.PROPOSED), claim("pain", 9, approved)])


class QueryingDatabase:
    """The real store, recording the arguments of each query() before the real engine answers it."""

    def __init__(self, db: Any) -> None:
        self._db = db
        self.calls: list[tuple[Any, ...]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)

    def query(self, subject: str, predicate: str | None = None, **options: Any) -> Any:
        lens = options.pop("lens", None)
        self.calls.append((subject, predicate, lens, dict(options)))
        if lens is not None:
            options["lens"] = lens
        return self._db.query(subject, predicate, **options)


@pytest.mark.trio
async def test_query_carries_lens_and_filters(db):
    records, excluded = filtered_claims()
    db.put_many(records + excluded)
    querying = QueryingDatabase(db)
    server = Server(querying, config())
    async with served(server) as client:
        await client.hello()
        options = json.dumps({"lifecycle": "approved", "as_of": 5, "decay": True})
        frame = await client.call(_protocol.QUERY, _protocol.encode_query("aspirin", "treats", "recency", options))
        text, blob, offsets = _protocol.decode_query_result(frame.payload)
        result = json.loads(text)
        assert result["winner"]["id"] == records[1].id.hex() and result["candidates_count"] == 2
        assert result["lens"] == "recency" and result["subject"] == "aspirin"
        got = stemedb.decode_many(blob, offsets)
        assert got[0] == records[1] and set(got) == set(records)  # the winner first, then contributors
        assert querying.calls[-1] == ("aspirin", "treats", "recency",
                                      {"lifecycle": "approved", "as_of": 5, "decay": True})
        bad = await client.call(_protocol.QUERY, _protocol.encode_query("aspirin", "", "nope", ""))
        assert error_of(bad)[0] == _protocol.E_INVALID_REQUEST
        bad = await client.call(_protocol.QUERY, _protocol.encode_query("aspirin", "", "", "[1]"))
        assert error_of(bad)[0] == _protocol.E_INVALID_REQUEST
    assert server.metrics.query_seconds.labels("recency")._sum.get() > 0


@pytest.mark.trio
async def test_graceful_shutdown_answers_requests_in_flight(db):
    server = Server(db, config())
    entered, release = threading.Event(), threading.Event()
    real_put = server.service.put_encoded

    def held_put(*args: Any) -> Any:
        entered.set()
        release.wait(10)
        return real_put(*args)

    server.service.put_encoded = held_put  # type: ignore[method-assign]
    records = claims(4)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        async with served(server, nursery=nursery) as client:
            await client.hello()
            request_id = await client.send(_protocol.PUT, record_batch(records))
            await trio.to_thread.run_sync(entered.wait)
            server.shutdown()
            late = await client.send(_protocol.PING)  # sent after shutdown: never read
            release.set()
            frames = await client.rest()
        assert [f.request_id for f in frames] == [request_id]
        assert ids_of(frames[0]) == [r.id for r in records]
        assert late not in [f.request_id for f in frames]
    assert server.stopped.is_set() and all(r.id in db for r in records)


@pytest.mark.trio
async def test_backpressure_stops_reading_at_max_inflight(db):
    server = Server(db, config(max_inflight=2))
    release = threading.Event()
    real_get = server.service.get_encoded
    calls = threading.Semaphore(0)
    started: list[int] = []

    def held_get(ids: Any) -> Any:
        started.append(1)
        calls.release()
        release.wait(30)
        return real_get(ids)

    server.service.get_encoded = held_get  # type: ignore[method-assign]
    async with served(server) as client:
        await client.hello()
        sent = [await client.send(_protocol.GET, _protocol.encode_ids([bytes(32)])) for _ in range(5)]
        for _ in range(2):
            assert await trio.to_thread.run_sync(calls.acquire, True, 30)
        await trio.testing.wait_all_tasks_blocked()  # the reader went as far as it will go
        (connection,) = server.connections
        assert connection.inflight == 2 and len(started) == 2  # the third request waits unserved
        release.set()
        answered = sorted([(await client.frame()).request_id for _ in sent])
        assert answered == sent


@pytest.mark.trio
async def test_client_that_closes_mid_request_does_not_disturb_others(db):
    server = Server(db, config())
    async with trio.open_nursery() as nursery:
        async with served(server, nursery=nursery) as rude:
            await rude.hello()
            await rude.send(_protocol.PUT, record_batch(claims(50, prefix="rude")))
        async with served(server, nursery=nursery) as polite:
            await polite.hello()
            put = await polite.call(_protocol.PUT, record_batch(claims(2, prefix="polite")))
            assert put.opcode == _protocol.PUT
    assert len(server.connections) == 0


@pytest.mark.trio
async def test_query_through_the_resolution_engine(db):
    other = stemedb.Signer.from_seed(b"\x03" * 32)
    records = [stemedb.Assertion("aspirin", "treats", stemedb.Ref("headache"), timestamp=1).sign(SIGNER),
               stemedb.Assertion("aspirin", "treats", stemedb.Ref("fever"), timestamp=2).sign(other)]
    db.put_many(records)
    server = Server(db, config())
    async with served(server) as client:
        await client.hello()
        frame = await client.call(_protocol.QUERY, _protocol.encode_query("aspirin", "treats", "recency", ""))
        text, blob, offsets = _protocol.decode_query_result(frame.payload)
        result = json.loads(text)
        assert result["winner"]["id"] == records[1].id.hex() and result["candidates_count"] == 2
        got = stemedb.decode_many(blob, offsets)
        assert got[0] == records[1] and set(got) == set(records)  # the winner first, then contributors
        frame = await client.call(_protocol.QUERY, _protocol.encode_query(
            "aspirin", "treats", "skeptic", json.dumps({"audit": True})))
        analysis = json.loads(_protocol.decode_query_result(frame.payload)[0])["analysis"]
        assert analysis["status"] == "Contested"
        spoof = await client.call(_protocol.QUERY, _protocol.encode_query(
            "aspirin", "", "", json.dumps({"audit": True, "agent": "someone-else"})))
        assert error_of(spoof)[0] == _protocol.E_INVALID_REQUEST
        entries = json.loads(_protocol.decode_text(
            (await client.call(_protocol.AUDIT, _protocol.encode_u32(10))).payload))
        assert len(entries) == 1 and entries[0]["agent"] == server.auth.anonymous(LOOPBACK).name


@pytest.mark.trio
async def test_a_live_server_answers_the_wire_vectors(db):
    """The request frames of tests/vectors/protocol.json, byte for byte, get the vectors' answers."""
    import pathlib

    document = json.loads((pathlib.Path(__file__).parent / "vectors" / "protocol.json").read_text())
    vectors = {v["name"]: v for v in document["vectors"]}
    server = Server(db, config())
    async with served(server) as client:
        await client.hello()
        for name in ("put-request", "get-request", "vote-request", "epoch-request", "ping-request"):
            await client.send_raw(bytes.fromhex(vectors[name]["hex"]))
            answer = await client.frame()
            assert answer is not None
            expected = vectors[name.replace("-request", "-response")]
            raw = _protocol.encode_frame(answer.opcode, answer.flags, answer.request_id, answer.payload)
            assert raw.hex() == expected["hex"], name
        put = vectors["put-request"]["fields"]["records"][0]
        claim = stemedb.decode(bytes.fromhex(put))
        await client.call(_protocol.QUERY, _protocol.encode_query(
            claim.subject, claim.predicate, "recency", json.dumps({"audit": True})))
        await client.send_raw(bytes.fromhex(vectors["audit-request"]["hex"]))
        answer = await client.frame()
    assert answer is not None and (answer.opcode, answer.flags, answer.request_id) == (
        _protocol.AUDIT, _protocol.RESPONSE, vectors["audit-response"]["request_id"])
    (entry,) = json.loads(_protocol.decode_text(answer.payload))
    (example,) = json.loads(vectors["audit-response"]["fields"]["text"])
    assert entry.keys() == example.keys() and entry["filters"].keys() == example["filters"].keys()
    assert entry["results"]["treats"].keys() == example["results"]["treats"].keys()
    assert (entry["subject"], entry["lens"], entry["results"]["treats"]["winner"]) == (
        example["subject"], example["lens"], example["results"]["treats"]["winner"])
