"""Resource-exhaustion and HTTP attacks on a real server process (issue 8, items 6-9).

Every test here runs `python -m stemedb.server` on loopback (one process for the
module, with a 64 MiB buffer budget: 32 MiB for requests, 32 MiB for answers),
attacks it over real sockets, and checks:

- the server's resident memory, read from /proc/PID/status: the peak (VmHWM,
  reset through /proc/PID/clear_refs just before the attack) minus the
  resident size just before, against a bound derived from the configured
  limits (`budget share + fixed slack`), well below what the defect cost;
- a deterministic sign that the defence engaged (the server's own buffer
  figures from STATS, a refusal, a closed connection);
- the ping latency of a well-behaved client on its own connection during the
  attack (p99), against a bound a busy 2-core machine meets but the defect
  (p99 408 ms) did not.

Figures are printed (`pytest -s`); docs/reliability.md quotes them.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import trio
from test_server_support import Driver, background_server

import stemedb
from stemedb import _protocol as P
from stemedb.client import connect
from stemedb.server import RateSpec, ServerConfig

SRC = str(pathlib.Path(stemedb.__file__).resolve().parent.parent)
SIGNER = stemedb.Signer.from_seed(b"\x33" * 32)
TOKEN = "attack-token-0123456789"
MIB = 1 << 20
BUDGET = 64 * MIB                 # limits.buffer_budget of the server under attack
REQUEST_SHARE = BUDGET // 2       # bytes of requests it may hold across connections
ANSWER_SHARE = BUDGET - REQUEST_SHARE
OUTPUT_BUFFER = 4 * MIB           # limits.output_buffer: answers queued per connection
SEND_TIMEOUT = 3.0                # limits.send_timeout
SLACK = 24 * MIB                  # allocator overhead, per-connection allowances, one frame in transit
P99_BOUND = 0.15                  # seconds; the defect measured 0.408 s (0.268 s here)
# On a busy machine every ping is slower, attack or not: the bound grows by twice the p99 the
# same pinger measured just before the attack (1-2 ms on an idle machine, so 0.15 s there).
CONFIG = f"""
[limits]
buffer_budget = {BUDGET}
output_buffer = {OUTPUT_BUFFER}
send_timeout = {SEND_TIMEOUT}
idle_timeout = 60.0

[[tokens]]
name = "operator"
role = "admin"
token = "{TOKEN}"
"""


# ---------------------------------------------------------------- the server


@dataclass
class Running:
    process: subprocess.Popen[str]
    listen: tuple[str, int]
    http: tuple[str, int]
    log: pathlib.Path
    big: Any           # a stored record of about 1 MiB
    small: Any         # a stored record of about 150 bytes

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"stemedb://{self.listen[0]}:{self.listen[1]}"

    def memory(self, field: str) -> int:
        """VmRSS or VmHWM of the server process, in bytes."""
        for line in pathlib.Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"{field} not in /proc/{self.pid}/status")

    def reset_peak(self) -> None:
        pathlib.Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS

    def buffers(self) -> dict[str, Any]:
        with connect(self.url, token=TOKEN, retries=0, timeout=10) as client:
            return dict(client.stats()["server"]["buffers"])

    def server_section(self) -> dict[str, Any]:
        with connect(self.url, token=TOKEN, retries=0, timeout=10) as client:
            return dict(client.stats()["server"])


def address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    base = tmp_path_factory.mktemp("attacks")
    config = base / "stemedb.toml"
    config.write_text(CONFIG)
    log = base / "server.log"
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "stemedb.server", "--data", str(base / "data"), "--config", str(config),
             "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--log-level", "INFO"],
            stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    line = process.stdout.readline() if process.stdout else ""
    if not line:
        process.kill()
        raise AssertionError(f"server did not start: {log.read_text()}")
    announced = json.loads(line)
    big = stemedb.Assertion("attack", "blob", "x" * (1 << 20), timestamp=1).sign(SIGNER)
    small = stemedb.Assertion("attack", "small", 1, timestamp=2).sign(SIGNER)
    running = Running(process, address(announced["listen"]), address(announced["http"]), log, big, small)
    try:
        with connect(running.url, token=TOKEN, timeout=30) as client:
            client.put_many([big, small])
        deadline = time.monotonic() + 60  # let the query kernels' warm-up finish before measuring
        while "warmed up" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


# ------------------------------------------------------- measuring an attack


class Pinger:
    """A well-behaved client: one connection, a ping every 5 ms, latencies recorded."""

    def __init__(self, running: Running) -> None:
        self.client = connect(running.url, token=TOKEN, retries=0, timeout=30)
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.latencies.append(self.client.ping())
            time.sleep(0.005)

    def measure(self, pings: int) -> list[float]:
        return [self.client.ping() for _ in range(pings)]

    def __enter__(self) -> Pinger:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def p99(latencies: list[float]) -> float:
    assert len(latencies) >= 20, f"only {len(latencies)} pings answered"
    return float(np.percentile(latencies, 99))


@dataclass
class Figures:
    before: int
    growth: int
    p99_quiet: float
    p99_attack: float
    pings: int

    def line(self, name: str) -> str:
        return (f"{name}: RSS {self.before / MIB:.0f} MiB before, peak growth {self.growth / MIB:.1f} MiB; "
                f"well-behaved ping p99 {self.p99_quiet * 1000:.1f} ms quiet, "
                f"{self.p99_attack * 1000:.1f} ms under attack ({self.pings} pings)")


def assert_latency_held(figures: Figures) -> None:
    bound = P99_BOUND + 2 * figures.p99_quiet
    assert figures.p99_attack < bound, figures.line(f"p99 (bound {bound * 1000:.0f} ms)")


def under_attack(running: Running, attack: Callable[[], Awaitable[Any]]) -> tuple[Figures, Any]:
    """Run `attack` (a trio coroutine function) beside a pinging client; memory and latency figures."""
    pinger = Pinger(running)
    try:
        quiet = pinger.measure(200)
        before = running.memory("VmRSS")
        running.reset_peak()
        with pinger:
            result = trio.run(attack)
        growth = running.memory("VmHWM") - before
        figures = Figures(before, growth, p99(quiet), p99(pinger.latencies), len(pinger.latencies))
    finally:
        pinger.client.close()
    return figures, result


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


async def binary_client(running: Running) -> Driver:
    driver = Driver(await trio.open_tcp_stream(*running.listen))
    hello = await driver.hello(TOKEN)
    assert hello.opcode == P.HELLO, hello
    return driver


async def read_answer(driver: Driver, request_id: int, frames: int | None = None) -> list[P.Frame]:
    """The frames answering `request_id` (the first `frames` of them, if given)."""
    out = []
    while frames is None or len(out) < frames:
        frame = await driver.frame()
        assert frame is not None, "connection closed in the middle of an answer"
        assert frame.request_id == request_id, frame
        out.append(frame)
        if not frame.more:
            break
    return out


# ----------------------------------------------------------------- item 6


def http_head(path: str, length: int, token: str | None = None, extra: str = "") -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (f"POST {path} HTTP/1.1\r\nHost: stemedb\r\n{auth}Content-Type: application/json\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n").encode()


async def receive_until_closed(stream: trio.SocketStream, limit: int = 1 << 20) -> bytes:
    chunks, total = [], 0
    try:
        while total < limit:
            data = await stream.receive_some(65536)
            if not data:
                break
            chunks.append(data)
            total += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    return b"".join(chunks)


def test_http_refuses_an_unauthenticated_body_from_its_headers(server):
    """Item 6: the token is checked on the request head; an unauthenticated body is never read."""
    answers: list[tuple[bytes, float]] = []

    async def one() -> None:
        stream = await trio.open_tcp_stream(*server.http)
        started = time.perf_counter()
        await stream.send_all(http_head("/v1/assert", 15 * MIB))

        async def body() -> None:  # the attacker keeps sending its body, as fast as it is taken
            piece = b"x" * MIB
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                for _ in range(14):
                    await stream.send_all(piece)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(body)
            with trio.fail_after(8):  # before the fix: no answer until the 10 s handshake timeout
                answer = await receive_until_closed(stream)
            answers.append((answer, time.perf_counter() - started))
            nursery.cancel_scope.cancel()
        await stream.aclose()

    async def attack() -> int:
        rounds = 0
        started = time.perf_counter()
        while rounds < 3 or time.perf_counter() - started < 2.0:  # long enough to measure pings
            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(one)
            rounds += 1
        return rounds

    figures, rounds = under_attack(server, attack)
    print("\n" + figures.line(f"http-unauthenticated-bodies ({rounds} rounds of 20 x 15 MiB declared)"))
    assert len(answers) == 20 * rounds
    for answer, _ in answers:
        head = answer.split(b"\r\n\r\n", 1)[0].lower()
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
        assert b"connection: close" in head and b"www-authenticate: bearer" in head
    assert figures.growth < 8 * MIB, figures.line("growth")
    assert_latency_held(figures)


def test_http_bodies_in_flight_share_the_request_budget(server):
    """Item 6: authenticated bodies in flight are held within the request share of the budget."""
    seen: dict[str, Any] = {}

    async def attack() -> None:
        streams = [await trio.open_tcp_stream(*server.http) for _ in range(20)]
        sent = [0] * len(streams)

        async def send_body(index: int) -> None:
            stream = streams[index]
            await stream.send_all(http_head("/v1/assert", 15 * MIB, TOKEN))
            piece = b"[" * MIB
            with trio.move_on_after(4):  # an unfinished body: 14 of 15 MiB, then nothing
                for _ in range(14):
                    await stream.send_all(piece)
                    sent[index] += len(piece)

        async with trio.open_nursery() as nursery:
            for index in range(len(streams)):
                nursery.start_soon(send_body, index)
        await trio.sleep(0.5)
        seen["buffers"] = await trio.to_thread.run_sync(server.buffers)
        seen["sent"] = sum(sent)
        for stream in streams:
            await stream.aclose()

    figures, _ = under_attack(server, attack)
    requests = seen["buffers"]["requests"]
    print("\n" + figures.line(f"http-bodies-in-flight (20 x 14 MiB sent, {seen['sent'] / MIB:.0f} MiB "
                              f"taken by the kernel or the server; server held {requests['used'] / MIB:.1f} "
                              f"MiB, {requests['waiting']} readers waiting)"))
    assert requests["capacity"] == REQUEST_SHARE
    assert requests["used"] <= REQUEST_SHARE and requests["waiting"] > 0  # backpressure engaged
    assert figures.growth < REQUEST_SHARE + SLACK, figures.line("growth")
    assert_latency_held(figures)
    wait_for(lambda: server.buffers()["requests"]["used"] == 0, 10, "the bodies' budget to come back")


# ----------------------------------------------------------------- item 7


def get_request(ids: list[bytes], request_id: int) -> bytes:
    return P.encode_frame(P.GET, 0, request_id, P.encode_ids(ids))


def test_clients_that_do_not_read_are_bounded_then_disconnected(server):
    """Item 7: four clients pipeline GETs of a 1 MiB record and never read an answer."""
    seen: dict[str, Any] = {}

    async def attack() -> None:
        drivers = [await binary_client(server) for _ in range(4)]
        for driver in drivers:
            await driver.send_raw(b"".join(get_request([server.big.id], 100 + i) for i in range(64)))
        await trio.sleep(1.0)
        seen["buffers"] = await trio.to_thread.run_sync(server.buffers)
        seen["connections"] = (await trio.to_thread.run_sync(server.server_section))["connections"]
        with trio.fail_after(SEND_TIMEOUT + 10):  # before the fix: held until the idle timeout
            while (await trio.to_thread.run_sync(server.server_section))["connections"] > seen["connections"] - 4:
                await trio.sleep(0.1)
        for driver in drivers:
            await driver.stream.aclose()

    figures, _ = under_attack(server, attack)
    answers = seen["buffers"]["answers"]
    print("\n" + figures.line(f"non-reading-clients (4 x 64 GETs of 1 MiB; {answers['used'] / MIB:.1f} MiB "
                              f"of answers queued, disconnected after the {SEND_TIMEOUT:g} s send timeout)"))
    assert answers["used"] <= 4 * (OUTPUT_BUFFER + 2 * MIB)
    assert figures.growth < 4 * (OUTPUT_BUFFER + 2 * MIB) + SLACK, figures.line("growth")
    assert_latency_held(figures)
    assert server.buffers()["answers"]["used"] == 0


def test_get_naming_one_large_record_many_times_streams(server):
    """Item 7: a 16 KiB GET naming the same 1 MiB record 512 times, read by its client."""
    encoded = server.big.encode()

    async def attack() -> tuple[int, int]:
        driver = await binary_client(server)
        driver.reader = P.FrameReader(1 << 25, from_server=True)
        await driver.send_raw(get_request([server.big.id] * 512, 7))
        frames = records = 0
        largest = 0
        while True:
            frame = await driver.frame()
            assert frame is not None and frame.request_id == 7 and frame.opcode == P.GET, frame
            blob, offsets = P.decode_record_batch(frame.payload, True)
            assert bytes(blob[offsets[0]:offsets[1]]) == encoded
            frames += 1
            records += len(offsets) - 1
            largest = max(largest, len(frame.payload))
            if not frame.more:
                break
        await driver.stream.aclose()
        return records, largest

    figures, (records, largest) = under_attack(server, attack)
    print("\n" + figures.line(f"get-512-times-1-MiB (512 MiB streamed, largest frame {largest / MIB:.2f} MiB)"))
    assert records == 512 and largest < 2 * MIB
    assert figures.growth < OUTPUT_BUFFER + 2 * MIB + SLACK, figures.line("growth")
    assert_latency_held(figures)


def test_get_of_the_most_ids_allowed_streams_instead_of_failing(server):
    """Item 7: GET of 65,536 IDs (64 GiB of answer) streams; the client reads for 2 s and leaves."""
    encoded = server.big.encode()

    async def attack() -> int:
        driver = await binary_client(server)
        driver.reader = P.FrameReader(1 << 25, from_server=True)
        await driver.send_raw(get_request([server.big.id] * P.MAX_GET_IDS, 9))
        records = 0
        started = time.perf_counter()
        while time.perf_counter() - started < 2.0:
            frame = (await read_answer(driver, 9, frames=1))[0]
            assert frame.opcode == P.GET, P.decode_error(frame.payload) if frame.opcode == P.ERROR else frame
            assert frame.more
            blob, offsets = P.decode_record_batch(frame.payload, True)
            assert all(bytes(blob[offsets[i]:offsets[i + 1]]) == encoded for i in range(len(offsets) - 1))
            records += len(offsets) - 1
        await driver.stream.aclose()
        return records

    figures, records = under_attack(server, attack)
    print("\n" + figures.line(f"get-65536-ids ({records} records read in 2 s, then the client left)"))
    assert 64 <= records < P.MAX_GET_IDS
    assert figures.growth < OUTPUT_BUFFER + 2 * MIB + SLACK, figures.line("growth")
    assert_latency_held(figures)
    wait_for(lambda: server.buffers()["answers"]["used"] == 0, 10, "the abandoned GET to stop")


def test_unfinished_large_frames_share_the_request_budget(server):
    """Item 7: 20 clients each send 12 MiB of a 16 MiB PUT frame and stop."""
    seen: dict[str, Any] = {}

    async def attack() -> None:
        drivers = [await binary_client(server) for _ in range(20)]

        async def send_part(driver: Driver) -> None:
            await driver.send_raw(P.frame_header(P.PUT, 0, 5, 16 * MIB))
            with trio.move_on_after(4):
                for _ in range(12):
                    await driver.send_raw(b"\0" * MIB)

        async with trio.open_nursery() as nursery:
            for driver in drivers:
                nursery.start_soon(send_part, driver)
        await trio.sleep(0.5)
        seen["buffers"] = await trio.to_thread.run_sync(server.buffers)
        for driver in drivers:
            await driver.stream.aclose()

    figures, _ = under_attack(server, attack)
    requests = seen["buffers"]["requests"]
    print("\n" + figures.line(f"unfinished-frames (20 x 12 MiB of 16 MiB; server held "
                              f"{requests['used'] / MIB:.1f} MiB, {requests['waiting']} readers waiting)"))
    assert requests["used"] <= REQUEST_SHARE and requests["waiting"] > 0
    assert figures.growth < REQUEST_SHARE + SLACK, figures.line("growth")
    assert_latency_held(figures)
    wait_for(lambda: server.buffers()["requests"]["used"] == 0, 10, "the frames' budget to come back")


# ----------------------------------------------------------------- item 8


def http_exchange(running: Running, data: bytes) -> bytes:
    async def run() -> bytes:
        stream = await trio.open_tcp_stream(*running.http)
        chunks: list[bytes] = []
        with trio.move_on_after(5), contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(data)  # a connection left open shows as what arrived in 5 s
            while piece := await stream.receive_some(65536):
                chunks.append(piece)
        await stream.aclose()
        return b"".join(chunks)

    return trio.run(run)


def test_http_request_smuggling_is_refused_and_closed(server):
    """Item 8: Content-Length with Transfer-Encoding is refused with 400 and the connection closed."""
    hidden = f"GET /v1/stats HTTP/1.1\r\nHost: stemedb\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
    smuggler = http_head("/v1/assert", 5, extra="Transfer-Encoding: chunked\r\n") + b"0\r\n\r\n" + hidden
    answer = http_exchange(server, smuggler)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
    assert answer.count(b"HTTP/1.1 ") == 1, answer  # the hidden request is never served
    assert b"transfer-encoding" in answer.lower()


@pytest.mark.parametrize("size", [20_000, 40_000, 60_000])
def test_http_heads_above_16_kib_are_refused(server, size):
    """Item 8: the request head (request line and headers) is limited to 16 KiB."""
    head = f"GET /health HTTP/1.1\r\nHost: stemedb\r\nX-Padding: {'p' * size}\r\n\r\n".encode()
    answer = http_exchange(server, head)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:300]
    assert answer.count(b"HTTP/1.1 ") == 1 and b"16384" in answer


def test_http_head_just_under_the_limit_is_served(server):
    head = (f"GET /health HTTP/1.1\r\nHost: stemedb\r\nX-Padding: {'p' * 15_000}\r\n"
            "Connection: close\r\n\r\n").encode()
    assert http_exchange(server, head).startswith(b"HTTP/1.1 200")


def test_deeply_nested_json_is_a_400_not_a_traceback(server):
    """Item 8: a JSON body nested 100,000 deep is answered 400 naming the problem."""
    body = b"[" * 100_000 + b"]" * 100_000
    before = server.log.read_text()
    answer = http_exchange(server, http_head("/v1/assert", len(body), TOKEN, "Connection: close\r\n") + body)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
    document = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert document["error"] == "invalid_request" and "nested" in document["message"]
    logged = server.log.read_text()[len(before):]
    assert "Traceback" not in logged and "RecursionError" not in logged, logged


# ----------------------------------------------------------------- item 9


def test_protected_mode_rate_limit_is_per_address(tmp_path):
    """Item 9: burst 3, 0.5/s per client; 5 connections from 127.0.0.1 share one allowance."""
    settings = ServerConfig(listen="127.0.0.1:0", http=None)
    settings.client_rate = RateSpec(0.5, 3.0)
    with background_server(tmp_path / "data", settings) as running:
        host, port = address(running.server.listen_address)

        async def run() -> tuple[int, float]:
            drivers = []
            for _ in range(5):
                driver = Driver(await trio.open_tcp_stream(host, port))
                assert (await driver.hello()).opcode == P.HELLO  # protected mode: loopback, no token
                drivers.append(driver)
            admitted = 0
            started = time.perf_counter()
            for _ in range(4):
                for driver in drivers:
                    frame = await driver.call(P.PING)
                    if frame.opcode == P.PING:
                        admitted += 1
                    else:
                        assert P.decode_error(frame.payload)[0] == P.E_RATE_LIMITED
            elapsed = time.perf_counter() - started
            for driver in drivers:
                await driver.stream.aclose()
            return admitted, elapsed

        admitted, elapsed = trio.run(run)
    print(f"\nprotected-mode rate limit: {admitted} of 20 pings admitted over 5 connections in "
          f"{elapsed:.2f} s (burst 3, 0.5/s per address)")
    assert admitted <= 3 + 0.5 * elapsed + 1e-9
    assert admitted >= 3
