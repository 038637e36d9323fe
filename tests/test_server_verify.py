"""VERIFY: a running server scrubs the store it serves (docs/protocol.md, "VERIFY").

The scrub is `Database.verify()` run by the server, so damage made on disk
while the server runs — a flipped byte in a record frame — is found and
named, through the clients and through `stemedb verify --url` (exit 1),
while a read token is refused and the server goes on serving.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import trio
from test_server_support import SIGNER, background_server, claims

import stemedb
from stemedb import _protocol, _segment
from stemedb.client import connect, connect_async
from stemedb.errors import Forbidden
from stemedb.server import ServerConfig, Token, hash_token

SRC = str(pathlib.Path(stemedb.__file__).resolve().parent.parent)
ADMIN_TOKEN = "admin-token-0123456789"
READ_TOKEN = "read-token-0123456789"


def cli_verify(url: str, token: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
               STEMEDB_TOKEN=token)
    return subprocess.run([sys.executable, "-m", "stemedb", "verify", "--url", url, "--json"],
                          capture_output=True, text=True, env=env, timeout=120)


def flip_a_record_byte(data: pathlib.Path) -> pathlib.Path:
    """Flip one byte inside the first record frame of the first segment (on disk, under the server)."""
    segment = sorted((data / "segments").glob("*.seg"))[0]
    offset = _segment.HEADER_SIZE + 100
    fd = os.open(segment, os.O_RDWR)
    try:
        byte = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([byte[0] ^ 0xFF]), offset)
    finally:
        os.close(fd)
    return segment


def test_verify_scrubs_the_served_store_and_names_damage(tmp_path):
    settings = ServerConfig(listen="127.0.0.1:0", http=None, tokens=[
        Token("ops", _protocol.ROLE_ADMIN, hash_token(ADMIN_TOKEN)),
        Token("reader", _protocol.ROLE_READ, hash_token(READ_TOKEN))])
    records = claims(300)
    with background_server(tmp_path / "data", settings) as server:
        with connect(server.url, token=ADMIN_TOKEN) as client:
            client.put_many(records)
            report = client.verify(timeout=60)
            assert report == stemedb.VerifyReport(ok=True, records_checked=300, problems=[], damage=[])
            assert report == server.db.verify()          # the embedded call's report, field for field
        with connect(server.url, token=READ_TOKEN) as reader, pytest.raises(Forbidden):
            reader.verify()
        clean = cli_verify(server.url, ADMIN_TOKEN)
        assert clean.returncode == 0, clean.stderr
        assert json.loads(clean.stdout)["records_checked"] == 300

        segment = flip_a_record_byte(tmp_path / "data")
        with connect(server.url, token=ADMIN_TOKEN) as client:
            damaged = client.verify(timeout=60)
            assert not damaged and not damaged.ok and damaged.records_checked < 300
            assert any(str(segment) in problem for problem in damaged.problems), damaged
            assert damaged.problems == server.db.verify().problems
            assert client.ping() > 0                      # still serving
        refused = cli_verify(server.url, ADMIN_TOKEN)
        assert refused.returncode == 1
        assert json.loads(refused.stdout)["problems"] == damaged.problems


def test_the_async_client_asks_for_the_scrub(tmp_path):
    with background_server(tmp_path / "data") as server:
        with connect(server.url) as client:
            client.put_many(claims(20, signer=SIGNER))

        async def main() -> stemedb.VerifyReport:
            async with connect_async(server.url) as client:
                return await client.verify(timeout=60)

        report = trio.run(main)
    assert report.ok and report.records_checked == 20 and report.problems == []
