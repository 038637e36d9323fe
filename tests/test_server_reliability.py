"""RELIABILITY.md rows for the network layer: bad-frames, huge-frame, idle-flood, rate-limit, auth.

Each test prints its figure (run with -s to see them).
"""

from __future__ import annotations

import random
import struct
import time
import tracemalloc
from typing import Any

import pytest
import trio
from test_server_support import SIGNER, Driver, claims, config, error_of, record_batch, served

import stemedb
from stemedb import _protocol
from stemedb.server import RateSpec, Server, ServerConfig, Token, hash_token
from stemedb.server.config import Limits

P = _protocol


@pytest.fixture
def db(tmp_path):
    with stemedb.open(tmp_path / "data") as store:
        yield store


def header(opcode: int, flags: int, request_id: int, length: int, magic: bytes = b"SD") -> bytes:
    return magic + struct.pack("<BBII", opcode, flags, request_id, length)


def hello(token: str = "", low: int = 1, high: int = 1) -> bytes:
    return P.encode_frame(P.HELLO, 0, 1, P.encode_hello(low, high, "test", token))


# (name, bytes sent after the (optional) HELLO, say hello first?, expected error code or None
#  for "closed without an answer", fatal?)
BAD_FRAMES: list[tuple[str, bytes, bool, int | None, bool]] = [
    ("http-request-instead-of-hello", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False, P.E_PROTOCOL, True),
    ("bad-magic", header(P.PING, 0, 2, 0, magic=b"XD"), True, P.E_PROTOCOL, True),
    ("unknown-opcode", header(0x33, 0, 2, 0), True, P.E_PROTOCOL, True),
    ("error-opcode-from-client", header(P.ERROR, 0, 2, 0), True, P.E_PROTOCOL, True),
    ("reserved-flag-bits", header(P.PING, 0x80, 2, 0), True, P.E_PROTOCOL, True),
    ("response-flag-on-request", header(P.PING, P.RESPONSE, 2, 0), True, P.E_PROTOCOL, True),
    ("length-lie-then-eof", header(P.PING, 0, 2, 100) + b"0123456789", True, None, True),
    ("truncated-header-then-eof", header(P.PING, 0, 2, 0)[:7], True, None, True),
    ("batch-count-beyond-payload", P.encode_frame(P.PUT, 0, 2, struct.pack("<I", 1000)), True, P.E_PROTOCOL, True),
    ("batch-lengths-overrun", P.encode_frame(P.PUT, 0, 2, struct.pack("<II", 1, 50) + b"x" * 10),
     True, P.E_PROTOCOL, True),
    ("batch-trailing-bytes", P.encode_frame(P.PUT, 0, 2, struct.pack("<II", 1, 2) + b"xyz"),
     True, P.E_PROTOCOL, True),
    ("batch-zero-length-record", P.encode_frame(P.PUT, 0, 2, struct.pack("<II", 1, 0)), True, P.E_PROTOCOL, True),
    ("get-ids-not-multiple-of-32", P.encode_frame(P.GET, 0, 2, struct.pack("<I", 1) + b"x" * 33),
     True, P.E_PROTOCOL, True),
    ("get-too-many-ids", P.encode_frame(P.GET, 0, 2, struct.pack("<I", 70000)), True, P.E_PROTOCOL, True),
    ("hello-twice", hello(), True, P.E_PROTOCOL, True),
    ("hello-trailing-bytes", P.encode_frame(P.HELLO, 0, 1, P.encode_hello(1, 1, "t", "") + b"!"),
     False, P.E_PROTOCOL, True),
    ("hello-invalid-utf8", P.encode_frame(P.HELLO, 0, 1, struct.pack("<HHB", 1, 1, 2) + b"\xff\xfe"
                                          + struct.pack("<H", 0)), False, P.E_PROTOCOL, True),
    ("hello-unsupported-version", hello(low=2, high=3), False, P.E_UNSUPPORTED_VERSION, True),
    ("put-before-hello", P.encode_frame(P.PUT, 0, 1, record_batch(claims(1))), False, P.E_AUTH_REQUIRED, True),
    ("auth-before-hello", P.encode_frame(P.AUTH, 0, 1, P.encode_auth("x" * 20)), False, P.E_AUTH_REQUIRED, True),
    # Well-framed values over a documented limit: invalid_request, and the connection goes on.
    ("ping-too-long", P.encode_frame(P.PING, 0, 2, b"x" * 2000), True, P.E_INVALID_REQUEST, False),
    ("get-more-than-max-get-ids", P.encode_frame(P.GET, 0, 2, struct.pack("<I", P.MAX_GET_IDS + 1)
                                                 + bytes(32 * (P.MAX_GET_IDS + 1))),
     True, P.E_INVALID_REQUEST, False),
    ("scan-limit-above-max-scan", P.encode_frame(P.SCAN, 0, 2, P.encode_scan("", "", 0, 2_000_000)),
     True, P.E_INVALID_REQUEST, False),
    ("scan-kind-5", P.encode_frame(P.SCAN, 0, 2, P.encode_scan("", "", 1, 0)[:-5] + b"\x05" + b"\0" * 4),
     True, P.E_INVALID_REQUEST, False),
    ("hello-token-too-long", P.encode_frame(P.HELLO, 0, 1, struct.pack("<HHB", 1, 1, 1) + b"t"
                                            + struct.pack("<H", P.MAX_TOKEN + 1) + b"x" * (P.MAX_TOKEN + 1)),
     False, P.E_AUTH_FAILED, True),
    ("stats-with-payload", P.encode_frame(P.STATS, 0, 2, b"x"), True, P.E_PROTOCOL, True),
    ("scan-unknown-kind", P.encode_frame(P.SCAN, 0, 2, P.encode_scan("", "", 1, 0)[:-5] + b"\x09" + b"\0" * 4),
     True, P.E_INVALID_REQUEST, False),
    ("query-truncated", P.encode_frame(P.QUERY, 0, 2, b"\x05\x00ab"), True, P.E_PROTOCOL, True),
    ("bad-signature", P.encode_frame(P.PUT, 0, 2, record_batch([
        claims(1)[0]._with_proof((SIGNER.public_key,), ((0, bytes(64)),), None)])), True, P.E_SIGNATURE, False),
    ("undecodable-record", P.encode_frame(P.PUT, 0, 2, struct.pack("<II", 1, 7) + b"\x01\x09\x07\0\0\0\0"),
     True, P.E_INVALID_RECORD, False),
    ("unsigned-record", P.encode_frame(P.PUT, 0, 2, record_batch(claims(1, signer=None))), True, P.E_SIGNATURE, False),
]


def counted(counter: Any) -> dict[str, int]:
    """A labelled prometheus Counter's totals by its one label (zeros left out)."""
    return {sample.labels[next(iter(sample.labels))]: int(sample.value)
            for metric in counter.collect() for sample in metric.samples
            if sample.name.endswith("_total") and sample.value}


@pytest.mark.trio
async def test_bad_frames(db):
    """Each malformed input: an error frame, then close (or a per-request error); nothing stored.

    Any exception escaping the server would end the `served` nursery and fail
    the test; the bystander shows the server still serves after every case.
    """
    server = Server(db, config())
    async with served(server) as bystander:
        await bystander.hello()
        for index, (name, data, say_hello, code, fatal) in enumerate(BAD_FRAMES):
            before = len(db)
            async with served(server) as client:
                if say_hello:
                    assert (await client.hello()).opcode == P.HELLO
                await client.send_raw(data)
                if code is None:
                    await client.stream.send_eof()  # the peer half-closes mid-frame
                    assert await client.rest() == [], name  # closed without an answer
                else:
                    first = await client.frame()
                    assert error_of(first)[0] == code, (name, error_of(first))
                    if fatal:
                        assert await client.rest() == [], name  # closed right after the error frame
                    else:
                        assert (await client.call(P.PING, b"ok")).payload == b"ok", name
            assert len(db) == before, f"{name}: the store changed"
            # Other clients are unaffected: the bystander still writes and reads.
            record = claims(1, prefix=f"bystander-{index}-")[0]
            put = await bystander.call(P.PUT, record_batch([record]))
            assert put.opcode == P.PUT and len(db) == before + 1
            assert (await bystander.call(P.GET, P.encode_ids([record.id]))).opcode == P.GET
    closing = (P.E_PROTOCOL, P.E_FRAME_TOO_LARGE, P.E_UNSUPPORTED_VERSION)
    expected: dict[str, int] = {}
    for _, _, _, code, fatal in BAD_FRAMES:
        if fatal and code in closing:
            label = P.ERROR_CODES[code][0]
            expected[label] = expected.get(label, 0) + 1
    protocol_errors = counted(server.metrics.protocol_errors)
    print(f"\nbad-frames: {len(BAD_FRAMES)} cases, no server crash; connections closed for "
          f"protocol violations {sum(protocol_errors.values())} ({protocol_errors})")
    assert protocol_errors == expected


@pytest.mark.trio
async def test_huge_frames_are_refused_before_allocation(db):
    server = Server(db, config())
    cases = [
        ("4 GiB before auth", header(P.PUT, 0, 1, 0xFFFFFFFF), False),
        ("4 GiB after auth", header(P.PUT, 0, 2, 0xFFFFFFFF), True),
        ("5 KB HELLO before auth", header(P.HELLO, 0, 1, 5000) + b"x" * 5000, False),
        ("17 MiB PUT after auth", header(P.PUT, 0, 2, 17 << 20) + b"x" * 65536, True),
    ]
    tracemalloc.start()
    try:
        worst = 0
        for name, data, authenticated in cases:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            async with served(server) as client:
                if authenticated:
                    await client.hello()
                await client.send_raw(data)
                code, _, message = error_of(await client.frame())
                assert code == P.E_FRAME_TOO_LARGE, (name, message)
                assert await client.rest() == []
            growth = tracemalloc.get_traced_memory()[1] - base
            worst = max(worst, growth)
    finally:
        tracemalloc.stop()
    print(f"\nhuge-frame: {len(cases)} cases refused from the header; peak memory growth "
          f"{worst / 1024:.0f} KiB (declared up to 4 GiB)")
    assert worst < 2 << 20


def token_config(**overrides: Any) -> ServerConfig:
    settings = ServerConfig(listen=None, http=None)
    settings.tokens = [
        Token("reader", P.ROLE_READ, hash_token("read-token-0123456789")),
        Token("writer", P.ROLE_WRITE, hash_token("write-token-0123456789")),
        Token("admin", P.ROLE_ADMIN, hash_token("admin-token-0123456789")),
        Token("old", P.ROLE_ADMIN, hash_token("expired-token-0123456789"), expires=time.time() - 1),
    ]
    for key, value in overrides.items():
        setattr(settings, key, value)
    return settings


@pytest.mark.trio
async def test_auth_refusals(db):
    server = Server(db, token_config())
    stored = claims(1, prefix="stored")[0]
    db.put(stored)
    seen: dict[str, int] = {}  # refusals the clients received, by error name

    def saw(code: int) -> None:
        name = P.ERROR_CODES[code][0]
        seen[name] = seen.get(name, 0) + 1

    async def closed_with(client: Any, code: int) -> None:
        frames = await client.rest()
        assert len(frames) == 1 and error_of(frames[0])[0] == code, frames
        saw(code)

    # Wrong, expired and missing credentials.
    for token in ("wrong-token-0123456789", "expired-token-0123456789"):
        async with served(server) as client:
            await client.send_raw(hello(token))
            await closed_with(client, P.E_AUTH_FAILED)
    for opcode, payload in ((P.GET, P.encode_ids([stored.id])), (P.PUT, record_batch(claims(1))),
                            (P.STATS, b"")):
        async with served(server) as client:
            answer = await client.hello()
            assert P.decode_hello_ok(answer.payload)[1:3] == (P.ROLE_NONE, P.SERVER_AUTH_REQUIRED
                                                              | P.SERVER_REPLICATION)
            await client.send(opcode, payload)
            await closed_with(client, P.E_AUTH_REQUIRED)
    async with served(server) as client:
        await client.hello()
        await client.send(P.AUTH, P.encode_auth("wrong-token-0123456789"))
        await closed_with(client, P.E_AUTH_FAILED)
    # Role escalation: refused per request, connection kept.
    escalations = {
        "read-token-0123456789": [P.PUT, P.VOTE, P.EPOCH, P.AUDIT, 0x40, 0x44],
        "write-token-0123456789": [P.AUDIT, 0x40, 0x43],
    }
    for token, opcodes in escalations.items():
        async with served(server) as client:
            role = P.decode_hello_ok((await client.hello(token)).payload)[1]
            assert role in (P.ROLE_READ, P.ROLE_WRITE)
            for opcode in opcodes:
                payload = record_batch(claims(1, prefix="escalate")) if opcode in (P.PUT, P.VOTE, P.EPOCH) else b""
                code, _, message = error_of(await client.call(opcode, payload))
                assert code == P.E_FORBIDDEN, message
                saw(code)
            get = await client.call(P.GET, P.encode_ids([stored.id]))
            assert get.opcode == P.GET  # what the role allows still works
    # The admin token may do everything (replication is merely not offered yet).
    async with served(server) as client:
        await client.hello("admin-token-0123456789")
        assert error_of(await client.call(0x40))[0] == P.E_UNSUPPORTED
    # Re-authentication upgrades a connection only with a valid token of that role.
    async with served(server) as client:
        await client.hello("read-token-0123456789")
        assert P.decode_role((await client.call(P.AUTH, P.encode_auth("write-token-0123456789"))).payload) == 2
        assert (await client.call(P.PUT, record_batch(claims(1, prefix="legit")))).opcode == P.PUT
    assert len(db) == 2  # the stored record and the legitimate write: nothing else
    assert seen == {"auth_failed": 3, "auth_required": 3, "forbidden": 9}
    rejected = counted(server.metrics.rejected)
    rejected.pop("unsupported")  # the admin's replication request above
    print(f"\nauth: {sum(seen.values())} refusals seen by clients, {sum(rejected.values())} "
          f"counted by the server; 0 unauthorised reads or writes")
    assert rejected == seen


@pytest.mark.trio
async def test_protected_mode_serves_loopback_only(db):
    server = Server(db, config())
    for peer in (("127.0.0.1", 5), ("::1", 5, 0, 0), ("::ffff:127.0.0.1", 5, 0, 0), ("127.8.9.10", 1)):
        async with served(server, peer) as client:
            assert P.decode_hello_ok((await client.hello()).payload)[1] == P.ROLE_ADMIN
    for peer in (("10.0.0.5", 5), ("192.168.1.2", 9), ("2001:db8::1", 5, 0, 0), None):
        async with served(server, peer) as client:
            await client.send_raw(hello())
            frames = await client.rest()
            code, _, message = error_of(frames[0])
            assert code == P.E_AUTH_FAILED and "protected mode" in message and len(frames) == 1


def admitted_overshoot(times: list[float], rate: float, burst: float) -> float:
    """max over windows [t_i, t_j] of admitted - (rate * (t_j - t_i) + burst)."""
    worst = float("-inf")
    for i in range(len(times)):
        for j in range(i, len(times)):
            worst = max(worst, (j - i + 1) - (rate * (times[j] - times[i]) + burst))
    return worst


@pytest.mark.trio
async def test_rate_limit_under_a_mock_clock(db, autojump_clock):
    rate, burst = 20.0, 5.0
    settings = config()
    settings.client_rate = RateSpec(rate, burst)
    server = Server(db, settings)
    rng = random.Random(1234)
    admitted: list[float] = []
    limited = 0
    async with served(server) as client:
        await client.hello()
        started = trio.current_time()
        for _ in range(600):
            if rng.random() < 0.1:
                await trio.sleep(rng.uniform(0.1, 1.5))  # a pause, then a burst
            else:
                await trio.sleep(rng.expovariate(60.0))
            frame = await client.call(P.PING)
            if frame.opcode == P.PING:
                admitted.append(trio.current_time())
            else:
                code, retry_ms, _ = error_of(frame)
                assert code == P.E_RATE_LIMITED and retry_ms > 0
                limited += 1
        elapsed = trio.current_time() - started
    overshoot = admitted_overshoot(admitted, rate, burst)
    print(f"\nrate-limit: {len(admitted) + limited} requests over {elapsed:.1f} s (mock clock), "
          f"{len(admitted)} admitted, {limited} limited; overshoot {max(overshoot, 0):.3f} (bound "
          f"rate {rate:g}/s × T + burst {burst:g})")
    assert limited > 0 and overshoot <= 1e-6


@pytest.mark.trio
async def test_per_operation_limit_leaves_other_operations_alone(db, mock_clock):
    # A mock clock that stands still (no autojump: GET runs in a worker thread, which an
    # autojump clock would skip over): however slow the machine, no PING slot comes back
    # by itself. A per-operation limit (PING at 1/s, burst 1) leaves the other operations alone.
    settings = config()
    settings.operation_rates = {"ping": RateSpec(1.0, 1.0)}
    per_operation = Server(db, settings)
    outcomes = []
    async with served(per_operation) as client:
        await client.hello()
        for _ in range(6):
            frame = await client.call(P.PING)
            outcomes.append(frame.opcode == P.PING)
            assert (await client.call(P.GET, P.encode_ids([bytes(32)]))).opcode == P.GET
        retry_ms = error_of(await client.call(P.PING))[1]
        assert abs(retry_ms - 1000) <= 1  # no time has passed since the one admitted PING
        mock_clock.jump(0.5)
        assert abs(error_of(await client.call(P.PING))[1] - 500) <= 1
        mock_clock.jump(0.5)
        assert (await client.call(P.PING)).opcode == P.PING
    assert outcomes == [True] + [False] * 5


@pytest.mark.trio
async def test_handshake_idle_and_slowloris_timeouts(db, autojump_clock):
    server = Server(db, config(handshake_timeout=5.0, idle_timeout=30.0))
    async with served(server) as silent:
        started = trio.current_time()
        frames = await silent.rest()
        assert error_of(frames[0])[0] == P.E_TIMEOUT
        assert 5.0 <= trio.current_time() - started < 6.0
    async with served(server) as idle:
        await idle.hello()
        started = trio.current_time()
        frames = await idle.rest()
        assert error_of(frames[0])[0] == P.E_TIMEOUT
        assert 30.0 <= trio.current_time() - started < 31.0
    async with served(server) as slow:
        data = hello()
        started = trio.current_time()
        closed_at = None
        for byte in data:  # one byte a second: bytes are not progress, frames are
            try:
                await slow.send_raw(bytes([byte]))
            except trio.BrokenResourceError:
                break
            await trio.sleep(1.0)
            if server.connections == set():
                closed_at = trio.current_time()
                break
        assert closed_at is not None and closed_at - started <= 6.5
    assert len(server.connections) == 0


async def until(condition: Any, what: str) -> None:
    """Wait in real time (trio's mock clock stands still) until `condition()` holds."""
    deadline = time.monotonic() + 60  # a hang guard, not a measurement
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        await trio.to_thread.run_sync(time.sleep, 0.002)


@pytest.mark.trio
async def test_idle_flood_is_reclaimed_and_capped(db, mock_clock):
    """Real TCP: a flood of idle and byte-trickling connections against a small cap.

    Trio's clock is a MockClock that stands still until the test jumps it: all
    connections are accepted at the same instant of trio time, so exactly
    those beyond the cap are refused, and the rest time out exactly at the
    handshake timeout, however long the machine took to open them.
    """
    flood, cap, handshake = 100, 60, 1.0
    settings = ServerConfig(listen="127.0.0.1:0", http=None)
    settings.limits = Limits(max_connections=cap, handshake_timeout=handshake, idle_timeout=30.0)
    server = Server(db, settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        host, port = server.listen_address.split(":")
        good = await trio.open_tcp_stream(host, int(port))
        good_client = Driver(good)
        await good_client.hello()
        latencies: list[float] = []
        stop = trio.Event()

        async def measure() -> None:
            while not stop.is_set():
                started = time.perf_counter()
                assert (await good_client.call(P.PING)).opcode == P.PING
                latencies.append(time.perf_counter() - started)
                await trio.to_thread.run_sync(time.sleep, 0.005)  # real time: trio's clock stands still

        nursery.start_soon(measure)
        streams = []
        outcomes: list[tuple[int, float]] = []
        flood_started = trio.current_time()
        async with trio.open_nursery() as watchers:
            for i in range(flood):
                stream = await trio.open_tcp_stream(host, int(port))
                streams.append(stream)
                watchers.start_soon(watch, stream, outcomes)
                if i % 3 == 0:
                    watchers.start_soon(trickle, stream)
            await until(lambda: len(outcomes) == flood - (cap - 1), "the connections over the cap refused")
            assert {code for code, _ in outcomes} == {P.E_TOO_MANY_CONNECTIONS}
            assert len(server.connections) == cap  # the good client and the 59 admitted
            pings_before = len(latencies)
            # The clock moves in steps of 0.1 s (the tricklers send a byte each); short of
            # the handshake timeout nothing is reclaimed.
            for step in range(1, 10):
                mock_clock.jump(flood_started + step * 0.1 - trio.current_time())
                await trio.to_thread.run_sync(time.sleep, 0.02)
                assert len(server.connections) == cap, f"reclaimed early, at {step * 0.1:.1f} s"
            await until(lambda: len(latencies) > pings_before, "a ping answered while the flood holds 59 slots")
            mock_clock.jump(flood_started + handshake - trio.current_time())
            await until(lambda: len(outcomes) == flood, "every flood connection closed")
            watchers.cancel_scope.cancel()  # tricklers cut off mid-HELLO sleep on trio's clock
        refused = sum(1 for code, _ in outcomes if code == P.E_TOO_MANY_CONNECTIONS)
        timed_out = [at - flood_started for code, at in outcomes if code == P.E_TIMEOUT]
        assert refused == flood - (cap - 1) and len(timed_out) == cap - 1, outcomes
        assert all(abs(at - handshake) < 1e-9 for at in timed_out)  # trio time stood still since
        await until(lambda: len(server.connections) == 1, "the flood connections reclaimed")
        reclaimed = trio.current_time() - flood_started
        pings_during = len(latencies) - pings_before
        await until(lambda: len(latencies) > pings_during + pings_before, "one more ping answered")
        again = Driver(await trio.open_tcp_stream(host, int(port)))
        assert (await again.hello()).opcode == P.HELLO
        stop.set()
        await again.stream.aclose()
        for stream in streams:
            await stream.aclose()
        await good.aclose()
        server.shutdown()
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    print(f"\nidle-flood: {flood} connections ({flood // 3 + 1} trickling a byte per 0.1 s) against "
          f"a cap of {cap}: {refused} refused cleanly, the rest reclaimed {reclaimed:.2f} s of trio "
          f"time after they opened (handshake timeout {handshake:.1f} s); a well-behaved client's "
          f"ping p99 {p99 * 1000:.1f} ms over {len(latencies)} pings ({pings_during} during the flood)")
    assert abs(reclaimed - handshake) < 1e-9
    # Wall time, but with a margin of hundreds: a loopback ping that waits as long as the
    # server's handshake timeout means the flood starved the event loop.
    assert p99 < handshake


async def trickle(stream: trio.SocketStream) -> None:
    data = hello()
    try:
        for byte in data:
            await stream.send_all(bytes([byte]))
            await trio.sleep(0.1)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def watch(stream: trio.SocketStream, outcomes: list[tuple[int, float]]) -> None:
    """Record the error code a flood connection was closed with, and when (trio time)."""
    data = await receive_all(stream)
    code = P.decode_error(data[12:])[0] if data.startswith(b"SD\x7f") else -1
    outcomes.append((code, trio.current_time()))


async def receive_all(stream: trio.SocketStream) -> bytes:
    chunks = []
    try:
        while True:
            data = await stream.receive_some(4096)
            if not data:
                break
            chunks.append(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
        pass
    return b"".join(chunks)


@pytest.mark.trio
async def test_write_quotas_by_trust_tier(db):
    trusted, untrusted = SIGNER, stemedb.Signer.from_seed(b"\x09" * 32)
    settings = config()
    settings.quota_tiers = {"trusted": RateSpec(1000.0, 5000.0), "standard": RateSpec(1.0, 20.0)}
    settings.quota_default_tier = "standard"
    settings.signer_tiers = {trusted.public_key: "trusted"}
    server = Server(db, settings)
    async with served(server) as client:
        await client.hello()
        members, envelope = untrusted.sign_batch([stemedb.Assertion(f"u{i}", "p", i) for i in range(15)])
        assert (await client.call(P.PUT, record_batch([envelope, *members]))).opcode == P.PUT
        members, envelope = untrusted.sign_batch([stemedb.Assertion(f"v{i}", "p", i) for i in range(15)])
        code, retry_ms, message = error_of(await client.call(P.PUT, record_batch([envelope, *members])))
        assert code == P.E_QUOTA_EXCEEDED and retry_ms > 0 and "standard" in message
        members, envelope = trusted.sign_batch([stemedb.Assertion(f"w{i}", "p", i) for i in range(500)])
        assert (await client.call(P.PUT, record_batch([envelope, *members]))).opcode == P.PUT
    assert len(db) == 16 + 501


@pytest.mark.trio
async def test_failed_authentications_are_throttled_per_address(db, autojump_clock):
    server = Server(db, token_config())
    codes = []
    for _ in range(14):
        async with served(server, ("192.0.2.7", 1)) as client:
            await client.send_raw(hello("wrong-token-0123456789"))
            codes.append(error_of((await client.rest())[0])[0])
    assert codes[:10] == [P.E_AUTH_FAILED] * 10 and set(codes[10:]) == {P.E_RATE_LIMITED}
    async with served(server, ("192.0.2.8", 1)) as other:  # another address is not affected
        assert P.decode_hello_ok((await other.hello("read-token-0123456789")).payload)[1] == P.ROLE_READ
    await trio.sleep(5)  # one attempt a second comes back
    async with served(server, ("192.0.2.7", 1)) as client:
        assert P.decode_hello_ok((await client.hello("read-token-0123456789")).payload)[1] == P.ROLE_READ
