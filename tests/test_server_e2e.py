"""End to end: a real server process, three kinds of writers, SIGKILL, restart, nothing acked lost."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

import stemedb
from stemedb.client import connect, connect_async

SRC = str(pathlib.Path(stemedb.__file__).resolve().parent.parent)
SIGNER = stemedb.Signer.from_seed(b"\x21" * 32)


def start_server(data: pathlib.Path) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen(
        [sys.executable, "-m", "stemedb.server", "--data", str(data), "--listen", "127.0.0.1:0",
         "--http", "127.0.0.1:0", "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = process.stdout.readline() if process.stdout else ""
    if not line:
        process.kill()
        raise AssertionError(f"server did not start: {process.stderr.read() if process.stderr else ''}")
    return process, json.loads(line)


class Writers:
    """Write through the blocking writer, the async client and the JSON API until stopped."""

    def __init__(self, address: dict[str, Any]) -> None:
        self.url = f"stemedb://{address['listen']}"
        self.http = f"http://{address['http']}"
        self.acked: dict[str, list[bytes]] = {"blocking": [], "async": [], "http": []}
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._guard, args=(target,), daemon=True)
                        for target in (self._blocking, self._async, self._http)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def _guard(self, target: Any) -> None:
        try:
            target()
        except Exception:  # noqa: BLE001 - the server was killed under us: expected
            pass

    def _blocking(self) -> None:
        with connect(self.url, retries=0, timeout=10) as client:
            writer = client.writer(SIGNER, linger=0.001, max_records=500)
            round_ = 0
            while not self.stop.is_set():
                records = [stemedb.Assertion(f"blocking-{round_}", "n", i) for i in range(500)]
                round_ += 1
                for ticket in writer.submit_many(records):
                    self.acked["blocking"].append(ticket.result(10))

    def _async(self) -> None:
        async def run() -> None:
            async with connect_async(self.url, retries=0, timeout=10) as client:
                round_ = 0
                while not self.stop.is_set():
                    records = [stemedb.Assertion(f"async-{round_}", "n", i).sign(SIGNER) for i in range(20)]
                    round_ += 1
                    self.acked["async"].extend(await client.put_many(records))

        asyncio.run(run())

    def _http(self) -> None:
        round_ = 0
        while not self.stop.is_set():
            records = [stemedb.Assertion(f"http-{round_}", "n", i).sign(SIGNER) for i in range(10)]
            round_ += 1
            body = json.dumps({"records": [r.encode().hex() for r in records]}).encode()
            request = urllib.request.Request(f"{self.http}/v1/assert", data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as answer:
                ids = json.loads(answer.read())["ids"]
            self.acked["http"].extend(bytes.fromhex(i) for i in ids)


def test_acknowledged_writes_survive_sigkill_and_restart(tmp_path):
    data = tmp_path / "data"
    process, address = start_server(data)
    writers = Writers(address)
    try:
        writers.start()
        deadline = time.monotonic() + 120  # a hang guard: the writers reach 50 each long before
        while min(len(v) for v in writers.acked.values()) < 50 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        process.send_signal(signal.SIGKILL)  # mid-write: every writer has requests in flight
        process.wait(10)
    finally:
        writers.join()
        if process.poll() is None:
            process.kill()
    acked = {name: list(ids) for name, ids in writers.acked.items()}
    total = sum(len(ids) for ids in acked.values())
    assert all(len(ids) >= 50 for ids in acked.values()), {k: len(v) for k, v in acked.items()}

    process, address = start_server(data)
    try:
        with connect(f"stemedb://{address['listen']}") as client:
            everything = [i for ids in acked.values() for i in ids]
            found = client.get_many(everything)
            missing = sum(1 for record in found if record is None)
            assert all(r is None or r.id == i for r, i in zip(found, everything))
        with urllib.request.urlopen(f"http://{address['http']}/health", timeout=10) as answer:
            health = json.loads(answer.read())
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    print(f"\ne2e: {total} acknowledged writes (blocking writer {len(acked['blocking'])}, async client "
          f"{len(acked['async'])}, JSON API {len(acked['http'])}); SIGKILL mid-write; after restart "
          f"{total - missing} found, {missing} lost; store holds {health['records']} records")
    assert missing == 0
    assert health["records"] >= total


def test_stemedb_serve_command(tmp_path):
    """`stemedb serve` itself (the command users run): serves, stops on SIGTERM, data kept."""
    data, log = tmp_path / "data", tmp_path / "serve.log"
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, "-m", "stemedb", "serve", "--data", str(data), "--listen", "127.0.0.1:0",
               "--http", "127.0.0.1:0"]
    record = stemedb.Assertion("served", "by", "the command").sign(SIGNER)
    for round_ in range(2):
        with open(log, "w") as errors:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True, env=env)
        try:
            line = process.stdout.readline() if process.stdout else ""
            assert line, f"stemedb serve did not start: {log.read_text()}"
            address = json.loads(line)
            with connect(f"stemedb://{address['listen']}") as client:
                if round_ == 0:
                    assert client.put(record) == record.id
                assert client.get(record.id) == record  # after the restart: read back from disk
                assert client.stats()["records"] == 1
            with urllib.request.urlopen(f"http://{address['http']}/health", timeout=10) as answer:
                assert json.loads(answer.read()) == {"status": "ok", "records": 1}
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0, log.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
    assert "protected mode" in log.read_text()  # the command's own logging reaches stderr
