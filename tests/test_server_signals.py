"""Signals a single server gets: SIGHUP is logged and ignored, SIGTERM drains and stops."""

from __future__ import annotations

import signal
import time

from cli_helpers import Server, clean_environment  # noqa: F401 - autouse fixture

import stemedb


def test_sighup_neither_stops_a_single_server_nor_loses_a_write(tmp_path):
    server = Server(tmp_path / "data")
    try:
        with stemedb.connect(server.url) as client:
            claim = stemedb.Assertion("hup", "is", "harmless").sign(stemedb.Signer.generate())
            client.put(claim)
            server.process.send_signal(signal.SIGHUP)
            log = tmp_path / "data-server.log"
            deadline = time.monotonic() + 30
            while "SIGHUP" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "SIGHUP: a single server has nothing to reload" in log.read_text()
            assert server.process.poll() is None
            assert client.get(claim.id) == claim  # still serving, on the same connection
    finally:
        server.stop()
    assert server.process.returncode == 0
