"""The conformance suite for driver writers (docs/protocol.md, "Conformance").

tests/vectors/conversations.json is replayed by tests/vectors/conform.py
against live servers (protected mode, and with a write token), twice (the
conversations are idempotent), and shown to fail when an expectation is not
met. The project's own clients pass it too: their request encoders build the
conversations' request payloads byte for byte, and their calls, made against
a live server, return what the conversations' answers hold.
"""

from __future__ import annotations

import json
import pathlib
import struct
import subprocess
import sys
from typing import Any

import anyio
import pytest
from test_server_support import background_server

import stemedb
from stemedb import _protocol
from stemedb.client import connect, connect_async
from stemedb.client._wire import (
    get_payloads,
    id_array,
    query_payload,
    records_batches,
    scan_payload,
)
from stemedb.errors import InvalidRequest, SignatureError
from stemedb.server import ServerConfig, Token, hash_token

VECTORS = pathlib.Path(__file__).resolve().parent / "vectors"
CONFORM = VECTORS / "conform.py"
DOCUMENT = json.loads((VECTORS / "conversations.json").read_text())
CONVERSATIONS = {conversation["name"]: conversation for conversation in DOCUMENT["conversations"]}
WRITE_TOKEN = "conformance-writer-0123456789"


def conform(address: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(CONFORM), address, "--timeout", "60", *extra],
                          capture_output=True, text=True, timeout=600)


def frames(conversation: str) -> dict[int, tuple[int, bytes]]:
    """The request frames a conversation sends: request id → (opcode, payload)."""
    out = {}
    for step in CONVERSATIONS[conversation]["steps"]:
        if isinstance(step.get("send"), str):
            raw = bytes.fromhex(step["send"])
            _magic, opcode, _flags, request_id, length = struct.unpack_from("<2sBBII", raw)
            out[request_id] = (opcode, raw[12:12 + length])
    return out


def answers(conversation: str) -> dict[int, bytes]:
    """The exact answer payloads a conversation expects: request id → payload."""
    out = {}
    for step in CONVERSATIONS[conversation]["steps"]:
        for expect in step.get("expect_any_order", [step.get("expect", {})]):
            if "payload" in expect:
                out[expect["request_id"]] = bytes.fromhex(expect["payload"])
    return out


def batch_records(payload: bytes) -> list[Any]:
    blob, offsets = _protocol.decode_record_batch(payload, True)
    return [stemedb.decode(bytes(blob[a:b])) if b > a else None for a, b in zip(offsets[:-1], offsets[1:])]


def test_every_conversation_passes_against_a_live_server_twice(tmp_path):
    with background_server(tmp_path / "data") as running:
        for _ in range(2):
            result = conform(str(running.server.listen_address))
            assert result.returncode == 0, result.stdout + result.stderr
            assert result.stdout.count("\nok   ") + result.stdout.startswith("ok   ") == len(CONVERSATIONS)


def test_the_runner_authenticates_with_a_token(tmp_path):
    settings = ServerConfig(listen="127.0.0.1:0", http=None)
    settings.tokens = [Token("writer", _protocol.ROLE_WRITE, hash_token(WRITE_TOKEN))]
    with background_server(tmp_path / "data", settings) as running:
        address = str(running.server.listen_address)
        assert conform(address, "--token", WRITE_TOKEN).returncode == 0
        refused = conform(address, "--token", "wrong-token-0123456789", "--only", "ping")
    assert refused.returncode == 1 and "FAIL ping" in refused.stdout


def test_the_runner_fails_when_an_answer_differs(tmp_path):
    """A conversation expecting another echo, and one expecting a close that does not come."""
    tampered = json.loads(json.dumps(DOCUMENT))
    for conversation in tampered["conversations"]:
        if conversation["name"] == "ping":
            conversation["steps"][2]["expect"]["payload"] = b"abd".hex()
        if conversation["name"] == "get-absent":
            conversation["steps"].append({"expect_closed": True})
    path = tmp_path / "tampered.json"
    path.write_text(json.dumps(tampered))
    with background_server(tmp_path / "data") as running:
        result = conform(str(running.server.listen_address), "--vectors", str(path), "--timeout", "2")
    assert result.returncode == 1
    failed = sorted(line.split()[1].rstrip(":") for line in result.stdout.splitlines()
                    if line.startswith("FAIL "))
    assert failed == ["get-absent", "ping"], result.stdout


def test_the_clients_build_the_conversations_requests_byte_for_byte():
    sent = frames("query")
    assert query_payload("conformance:query", "treats", "recency", {"lifecycle": "approved"}) == sent[3][1]
    scans = frames("scan")
    assert scan_payload("conformance:scan", None, "assertion", 0) == scans[3][1]
    assert scan_payload("conformance:scan", None, None, 2) == scans[4][1]
    put = frames("read-your-writes")[2][1]
    assert records_batches(batch_records(put), None, _protocol.DEFAULT_MAX_FRAME) == [put]
    get = frames("get-absent")[2][1]
    assert get_payloads(id_array([get[4:36]]), _protocol.DEFAULT_MAX_FRAME) == [get]


def expected_results() -> dict[str, Any]:
    """What the clients must return, read off the conversations' answers."""
    ryw, query = answers("read-your-writes"), answers("query")
    text, blob, offsets = _protocol.decode_query_result(query[3])
    return {
        "put_ids": [bytes(row) for row in _protocol.decode_ids(ryw[2])],
        "record": batch_records(ryw[3])[0],
        "absent": batch_records(answers("get-absent")[2]),
        "query_put": batch_records(frames("query")[2][1]),
        "query": json.loads(text),
        "query_records": stemedb.decode_many(blob, offsets),
        "scan_put": batch_records(frames("scan")[2][1]),
        "unsigned": batch_records(frames("refused-records")[2][1]),
    }


def test_the_blocking_client_passes_the_conversations(tmp_path):
    want = expected_results()
    with background_server(tmp_path / "data") as running, connect(running.url) as client:
        assert client.put_many([want["record"]]) == want["put_ids"]
        assert client.get_many(want["put_ids"]) == [want["record"]]
        assert client.get_many([b"\xee" * 32]) == want["absent"]
        client.put_many(want["query_put"])
        answer = client.query("conformance:query", "treats", lens="recency", lifecycle="approved")
        assert answer.to_dict() == want["query"]
        assert [answer.winner] == want["query_records"]
        client.put_many(want["scan_put"])
        assert list(client.scan("conformance:scan", kind="assertion")) == want["scan_put"]
        assert list(client.scan("conformance:scan", limit=2)) == want["scan_put"][:2]
        with pytest.raises(InvalidRequest):
            client.query("conformance:query", "treats", lens="no-such-lens")
        with pytest.raises(SignatureError):
            client.put_many(want["unsigned"])
        assert client.ping() >= 0


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_the_async_client_passes_the_conversations(tmp_path, backend):
    want = expected_results()

    async def main(url: str) -> None:
        async with connect_async(url) as client:
            assert await client.put_many([want["record"]]) == want["put_ids"]
            assert await client.get_many(want["put_ids"]) == [want["record"]]
            assert await client.get_many([b"\xee" * 32]) == want["absent"]
            await client.put_many(want["query_put"])
            answer = await client.query("conformance:query", "treats", lens="recency", lifecycle="approved")
            assert answer.to_dict() == want["query"]
            assert [answer.winner] == want["query_records"]
            await client.put_many(want["scan_put"])
            assert list(await client.scan("conformance:scan", kind="assertion")) == want["scan_put"]
            with pytest.raises(InvalidRequest):
                await client.query("conformance:query", "treats", lens="no-such-lens")
            with pytest.raises(SignatureError):
                await client.put_many(want["unsigned"])

    with background_server(tmp_path / "data") as running:
        anyio.run(main, running.url, backend=backend)
