"""Attacks on a real server on loopback (issue 8).

Item 9: in protected mode the per-client rate limit must count per address,
not per connection.
"""

from __future__ import annotations

import time

import trio
from test_server_support import Driver, background_server

from stemedb import _protocol as P
from stemedb.server import RateSpec, ServerConfig


def address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


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
