"""The blocking client and the async client (trio and asyncio), against a real server on loopback."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import anyio
import pytest
import trio
import trio.testing
import trustme
from test_server_support import OTHER, SIGNER, BackgroundServer, background_server, claims

import stemedb
from stemedb import ConnectionLost, RequestTimeout, Unsupported, _protocol
from stemedb.client import connect, connect_async
from stemedb.errors import AuthError, InvalidRecord, NotFound, RateLimited, SignatureError
from stemedb.server import RateSpec, ServerConfig, Token, hash_token


@pytest.fixture
def running(tmp_path):
    with background_server(tmp_path / "data", ServerConfig(listen="127.0.0.1:0", http=None)) as server:
        yield server


def test_blocking_client_operations(running):
    with connect(running.url) as client:
        assert client.session.role_name == "admin" and client.session.protected_mode
        assert client.ping() > 0
        records = claims(5)
        assert client.put(records[0]) == records[0].id
        assert client.put_many(records[1:]) == [r.id for r in records[1:]]
        members, envelope = SIGNER.sign_batch([stemedb.Assertion(f"m{i}", "p", i) for i in range(10)])
        assert client.put_many(members, envelope=envelope) == [m.id for m in members]
        assert client.get(records[2].id) == records[2]
        assert client.get_many([records[0].id, bytes(32), members[3].id]) == [records[0], None, members[3]]
        with pytest.raises(NotFound):
            client.get(bytes(32))
        vote = stemedb.Vote(records[0].id, 1.0).sign(OTHER)
        epoch = stemedb.Epoch("2024").sign(SIGNER)
        assert client.vote(vote) == vote.id and client.epoch(epoch) == epoch.id
        assert [r.subject for r in client.scan(predicate="p", kind="assertion", limit=3)] == ["s0", "s1", "s2"]
        assert client.stats()["records"] == 18
        answer = client.query("s0", "p", lens="recency", lifecycle="any")
        assert isinstance(answer, stemedb.Resolution)
        assert answer.winner == records[0] and answer.value == records[0].object
        assert client.audit() == []  # nothing audited yet
        client.query("s1", "p", lens="consensus", audit=True)
        (entry,) = client.audit(limit=5)
        assert (entry["subject"], entry["predicate"], entry["agent"]) == ("s1", "p", "local:127.0.0.1")
        assert entry["lens"].startswith("consensus") and entry["results"]["p"]["winner"] == records[1].id.hex()
        tampered = records[0]._with_proof(records[0].signers, ((0, bytes(64)),), None)
        with pytest.raises(SignatureError):
            client.put(tampered)
        with pytest.raises(SignatureError):
            client.put(claims(1, signer=None)[0])
        assert client.ping() > 0  # refusals do not break the connection
    assert len(running.db) == 18


def stored_envelopes(db: stemedb.Database) -> list[Any]:
    return list(db.scan(kind="envelope"))


def test_writer_signs_each_batch_with_one_envelope(running):
    with connect(running.url) as client, client.writer(SIGNER, linger=0.005) as writer:
        results: dict[int, bytes] = {}

        def work(thread: int) -> None:
            for i in range(25):
                record = stemedb.Assertion(f"t{thread}", "n", i)
                results[thread * 100 + i] = writer.put(record)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        threaded_batches = writer.batches_sent
        tickets = writer.submit_many([stemedb.Assertion("bulk", "n", i) for i in range(3000)])
        bulk = [ticket.result(30) for ticket in tickets]
        with pytest.raises(SignatureError):
            writer.submit(stemedb.Assertion("x", "y", 1, signers=[OTHER.public_key]))
        with pytest.raises(InvalidRecord):
            writer.submit(b"not a record")
    assert len(set(results.values())) == 400 and len(set(bulk)) == 3000
    # Nothing was waiting when the bulk submit came: its 3,000 records are one batch.
    assert writer.batches_sent == threaded_batches + 1
    stored = running.db.get_many(list(results.values()) + bulk)
    assert all(r is not None and r.signers == (SIGNER.public_key,) and r.envelope for r in stored)
    envelopes = stored_envelopes(running.db)
    assert len(envelopes) == writer.batches_sent  # one envelope, one signature, per batch
    assert sorted(len(e.members) for e in envelopes)[-1] == 3000
    assert sum(len(e.members) for e in envelopes) == 3400
    for envelope in envelopes:
        stemedb.verify_batch(envelope, running.db.get_many(list(envelope.members)))
    print(f"\nwriter: 3,400 records from 16 threads + one bulk submit in {writer.batches_sent} signed batches")


def test_writer_groups_records_that_arrive_while_a_batch_is_in_flight(running):
    """16 puts, 15 of them while the first batch is held on the server: at most 3 batches."""
    entered, release = threading.Event(), threading.Event()
    real_put = running.server.service.put_encoded

    def held_put(*args: Any) -> Any:
        if not entered.is_set():
            entered.set()
            release.wait(30)
        return real_put(*args)

    running.server.service.put_encoded = held_put
    ids: list[bytes] = []
    lock = threading.Lock()
    with connect(running.url) as client, client.writer(SIGNER, linger=0, max_batches_in_flight=1) as writer:

        def put(i: int) -> None:
            record_id = writer.put(stemedb.Assertion("held", "n", i))
            with lock:
                ids.append(record_id)

        first = threading.Thread(target=put, args=(0,))
        first.start()
        assert entered.wait(30)
        others = [threading.Thread(target=put, args=(i,)) for i in range(1, 16)]
        for thread in others:
            thread.start()
        deadline = time.monotonic() + 30  # a hang guard, not a measurement
        while sum(len(batch.records) for batch in writer._unanswered) < 16:
            assert time.monotonic() < deadline, "the writers never queued"
            time.sleep(0.001)
        release.set()
        for thread in [first, *others]:
            thread.join()
    # The first batch, then what the flusher took before its slot was free, then the rest.
    assert 2 <= writer.batches_sent <= 3 and len(set(ids)) == 16
    envelopes = stored_envelopes(running.db)
    assert len(envelopes) == writer.batches_sent
    assert sorted(m for e in envelopes for m in e.members) == sorted(ids)


def test_timeouts_and_reconnect(running):
    with connect(running.url, timeout=10, retries=5) as client:
        release = threading.Event()
        real_get = running.server.service.get_encoded

        def stalled(ids: Any) -> Any:
            release.wait(10)
            return real_get(ids)

        running.server.service.get_encoded = stalled
        try:
            with pytest.raises(RequestTimeout):
                client.get_many([bytes(32)], timeout=0.3)
        finally:
            release.set()
            running.server.service.get_encoded = real_get
        assert client.ping() > 0  # the late answer is ignored, the connection still works
        # Break the connection under the client: the next request reconnects and is retried.
        client._conn.transport.sock.shutdown(2)
        record = claims(1, prefix="after-reconnect")[0]
        assert client.put(record) == record.id
        assert client.reconnects == 1
        with client.writer(SIGNER) as writer:
            first = writer.put(stemedb.Assertion("w", "p", 1))
            client._conn.transport.sock.shutdown(2)
            second = writer.put(stemedb.Assertion("w", "p", 2))
        stored = running.db.get_many([first, second])
        assert [r.object if r is not None else None for r in stored] == [1, 2]  # both acknowledged: both kept
    with pytest.raises(ConnectionLost):
        connect("stemedb://127.0.0.1:1", retries=1, connect_timeout=0.5)


def test_tokens_and_rate_limits_through_the_client(tmp_path):
    """The server runs on a mock clock that stands still: the limit is exact, whatever the load."""
    settings = ServerConfig(listen="127.0.0.1:0", http=None)
    settings.tokens = [Token("reader", _protocol.ROLE_READ, hash_token("read-token-0123456789")),
                       Token("writer", _protocol.ROLE_WRITE, hash_token("write-token-0123456789"))]
    settings.operation_rates = {"ping": RateSpec(1.0, 1.0)}
    with background_server(tmp_path / "data", settings, clock=trio.testing.MockClock()) as server:
        with pytest.raises(AuthError, match="requires a token"):
            connect(server.url)
        with pytest.raises(AuthError, match="unknown token"):
            connect(server.url, token="wrong-token-0123456789")
        with connect(server.url, token="read-token-0123456789") as reader:
            with pytest.raises(AuthError, match="needs the write role"):
                reader.put(claims(1)[0])
            reader.ping()
            with pytest.raises(RateLimited) as limited:
                reader.ping()
            assert limited.value.retry_after == pytest.approx(1.0, abs=1e-3)  # 1/s, no time passed
            server.advance(limited.value.retry_after * 0.5)
            with pytest.raises(RateLimited) as still:
                reader.ping()
            assert still.value.retry_after == pytest.approx(0.5, abs=1e-3)
            server.advance(still.value.retry_after)
            assert reader.ping() > 0
        with connect(server.url, token="write-token-0123456789") as writer:
            assert writer.put(claims(1)[0])
        assert len(server.db) == 1


def tls_server_config(tmp_path: Any) -> tuple[ServerConfig, Any]:
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "server.pem", tmp_path / "server-key.pem"
    certificate.private_key_and_cert_chain_pem.write_to_path(str(cert))
    certificate.private_key_pem.write_to_path(str(key))
    settings = ServerConfig.from_dict({"server": {"listen": "127.0.0.1:0"},
                                       "tls": {"cert": str(cert), "key": str(key)}})
    return settings, authority


def test_tls(tmp_path):
    import ssl

    settings, authority = tls_server_config(tmp_path)
    with background_server(tmp_path / "data", settings) as server:
        context = ssl.create_default_context()
        authority.configure_trust(context)
        url = f"stemedbs://{server.server.listen_address}"
        with connect(url, ssl_context=context) as client:
            assert client.session.server_flags & _protocol.SERVER_TLS
            records = claims(200)
            assert client.put_many(records) == [r.id for r in records]
            assert client.get_many([r.id for r in records]) == records
            with client.writer(SIGNER) as writer:
                writer.put_many([stemedb.Assertion("tls", "p", i) for i in range(500)])

        async def over_tls() -> None:
            async with connect_async(url, ssl_context=context) as client:
                assert await client.get(records[0].id) == records[0]

        trio.run(over_tls)
        with pytest.raises(ssl.SSLError):  # an untrusted certificate is refused
            connect(url, retries=0)
        assert len(server.db) == 701  # 700 records and the writer's envelope


async def exercise_async_client(url: str) -> None:
    async with connect_async(url) as client:
        assert (await client.ping()) > 0
        records = claims(4, prefix="async")
        assert await client.put(records[0]) == records[0].id
        assert await client.put_many(records[1:]) == [r.id for r in records[1:]]
        assert await client.get_many([records[1].id, bytes(32)]) == [records[1], None]
        with pytest.raises(NotFound):
            await client.get(bytes(32))
        vote = stemedb.Vote(records[0].id, 0.5).sign(OTHER)
        assert await client.vote(vote) == vote.id
        assert list(await client.scan(subject="async0")) == [records[0]]
        assert (await client.stats())["records"] >= 5
        epoch = stemedb.Epoch(f"{records[0].subject}-epoch").sign(SIGNER)
        assert await client.epoch(epoch) == epoch.id
        assert await client.get(epoch.id) == epoch
        with pytest.raises(InvalidRecord, match="epoch: expected a stemedb.Epoch, got Assertion"):
            await client.epoch(records[1])
        answer = await client.query("async0", "p", lens="recency", audit=True)
        assert answer.winner == records[0]
        entries = await client.audit(limit=10)
        assert [(e["subject"], e["lens"]) for e in entries[:1]] == [("async0", "recency")]
        with pytest.raises(Unsupported):
            await client._request(0x40, b"", None)  # replication: not offered yet
        writer = client.writer(SIGNER)
        ids: list[bytes] = []

        async def one(i: int) -> None:
            ids.append(await writer.put(stemedb.Assertion("task", "n", i)))

        async with anyio.create_task_group() as group:
            for i in range(200):
                group.start_soon(one, i)
        ids.extend(await writer.put_many([stemedb.Assertion("bulk", "n", i) for i in range(1000)]))
        await writer.flush()
        assert len(set(ids)) == 1200 and writer.batches_sent < 100
        members = await client.get_many(ids[:5])
        assert all(m.envelope is not None for m in members)


@pytest.mark.trio
async def test_async_client_under_trio(tmp_path):
    settings = ServerConfig(listen="127.0.0.1:0", http=None)
    server = await trio.to_thread.run_sync(BackgroundServer, tmp_path / "data", settings)
    try:
        await exercise_async_client(server.url)
    finally:
        await trio.to_thread.run_sync(server.stop)


def test_async_client_under_asyncio(running):
    asyncio.run(exercise_async_client(running.url))
    assert len(running.db) >= 1205


def test_async_timeouts_and_reconnect(running):
    async def scenario() -> None:
        async with connect_async(running.url, timeout=10) as client:
            release = threading.Event()
            real_get = running.server.service.get_encoded

            def stalled(ids: Any) -> Any:
                release.wait(10)
                return real_get(ids)

            running.server.service.get_encoded = stalled
            try:
                with pytest.raises(RequestTimeout):
                    await client.get_many([bytes(32)], timeout=0.3)
            finally:
                release.set()
                running.server.service.get_encoded = real_get
            await anyio.aclose_forcefully(client._conn.stream)
            await anyio.sleep(0.05)
            assert await client.ping() > 0
            assert client.reconnects == 1

    anyio.run(scenario, backend="trio")
    time.sleep(0)
