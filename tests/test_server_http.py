"""The HTTP side door (h11): health, readiness, metrics and the JSON API, over real sockets."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

import pytest
import trio.testing
from test_server_support import SIGNER, background_server, claims

import stemedb
from stemedb import _protocol
from stemedb.server import RateSpec, Server, ServerConfig, Token, hash_token


def request(base: str, method: str, path: str, body: Any = None, token: str | None = None,
            raw: bytes | None = None) -> tuple[int, dict[str, str], Any]:
    host = base.removeprefix("http://")
    connection = http.client.HTTPConnection(host, timeout=10)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    connection.request(method, path, body=data, headers=headers)
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    content_type = response.getheader("content-type", "")
    document = json.loads(payload) if "json" in content_type else payload.decode()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, document


@pytest.fixture
def protected(tmp_path):
    with background_server(tmp_path / "data") as running:
        yield running


def test_health_ready_and_metrics(protected):
    protected.db.put_many(claims(3))
    status, headers, body = request(protected.http, "GET", "/health")
    assert status == 200 and body == {"status": "ok", "records": 3}
    assert headers["content-type"] == "application/json"
    connection = http.client.HTTPConnection(protected.http.removeprefix("http://"), timeout=10)
    connection.request("HEAD", "/health")
    head = connection.getresponse()
    assert head.status == 200 and head.read() == b"" and int(head.getheader("content-length")) > 0
    connection.close()
    status, _, body = request(protected.http, "GET", "/ready")
    assert status == 200 and body["ready"] is True
    status, headers, text = request(protected.http, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("stemedb_wal_fsync_seconds_bucket", "stemedb_group_commit_batches_total",
                 "stemedb_group_commit_batch_records_mean", "stemedb_writes_total",
                 "stemedb_written_bytes_total", "stemedb_write_errors_total", "stemedb_segments",
                 "stemedb_disk_bytes", "stemedb_recovery_seconds", "stemedb_records 3.0",
                 "stemedb_connections", "stemedb_requests_rejected_total", "stemedb_query_seconds"):
        assert name in text, name
    # One label scheme for both doors: door and op (/health was asked twice: GET and HEAD).
    assert 'stemedb_requests_total{door="http",op="health"} 2.0' in text
    assert 'stemedb_requests_total{door="http",op="ready"} 1.0' in text
    assert 'stemedb_request_seconds_count{door="http",op="ready"} 1.0' in text


@pytest.mark.trio
async def test_protected_mode_refuses_a_remote_peer_with_403_on_every_route(tmp_path):
    """Tokens would not help (none are configured): 403, and the wire's name, auth_failed."""
    with stemedb.open(tmp_path / "data") as db:
        server = Server(db, ServerConfig(listen=None, http=None))
        for path in ("/health", "/v1/stats"):
            client_side, server_side = trio.testing.memory_stream_pair()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.handle_http, server_side, ("10.0.0.5", 5))
                await client_side.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                answer = b""
                while chunk := await client_side.receive_some(65536):
                    answer += chunk
                    if b"\r\n\r\n" in answer and answer.endswith(b"}"):
                        break
                await client_side.aclose()
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 403"), head
            document = json.loads(body)
            assert document["error"] == "auth_failed" and "10.0.0.5" in document["message"]


def test_json_api_write_read_and_refusals(protected):
    records = claims(2)
    status, _, body = request(protected.http, "POST", "/v1/assert",
                              {"records": [r.encode().hex() for r in records]})
    assert status == 200 and body["ids"] == [r.id.hex() for r in records]
    members, envelope = SIGNER.sign_batch([stemedb.Assertion(f"h{i}", "p", i) for i in range(3)])
    status, _, body = request(protected.http, "POST", "/v1/assert",
                              {"records": [r.encode().hex() for r in [envelope, *members]]})
    assert status == 200 and len(body["ids"]) == 4
    vote = stemedb.Vote(records[0].id, 0.5).sign(SIGNER)
    status, _, body = request(protected.http, "POST", "/v1/vote", {"encoded": vote.encode().hex()})
    assert status == 200 and body["id"] == vote.id.hex()
    epoch = stemedb.Epoch("e2024").sign(SIGNER)
    status, _, body = request(protected.http, "POST", "/v1/epoch", {"encoded": epoch.encode().hex()})
    assert status == 200 and body["id"] == epoch.id.hex()
    status, _, body = request(protected.http, "GET", f"/v1/records/{records[1].id.hex()}")
    assert status == 200 and body["subject"] == records[1].subject
    assert stemedb.decode(bytes.fromhex(body["encoded"])) == records[1]
    assert len(protected.db) == 8
    # Refusals change nothing.
    tampered = records[0]._with_proof(records[0].signers, ((0, bytes(64)),), None)
    refusals = [
        ("POST", "/v1/assert", {"records": [tampered.encode().hex()]}, 400, "signature"),
        ("POST", "/v1/assert", {"records": ["zz"]}, 400, "invalid_request"),
        ("POST", "/v1/assert", {"nothing": 1}, 400, "invalid_request"),
        ("POST", "/v1/vote", {"encoded": records[0].encode().hex()}, 400, "invalid_request"),
        ("GET", "/v1/records/" + "00" * 32, None, 404, "not_found"),
        ("GET", "/v1/records/xyz", None, 400, "invalid_request"),
        ("GET", "/v1/query", None, 400, "invalid_request"),
        ("GET", "/v1/nothing", None, 404, "not_found"),
        ("DELETE", "/v1/assert", None, 405, "invalid_request"),  # MethodNotAllowed
    ]
    for method, path, body, expected, name in refusals:
        status, _, answer = request(protected.http, method, path, body)
        assert (status, answer["error"]) == (expected, name), (path, answer)
    status, _, answer = request(protected.http, "POST", "/v1/assert", raw=b"{not json")
    assert status == 400 and answer["error"] == "invalid_request"
    assert len(protected.db) == 8
    status, _, stats = request(protected.http, "GET", "/v1/stats")
    assert status == 200 and stats["records"] == 8 and stats["server"]["protected_mode"]


def test_malformed_http_and_oversized_bodies(tmp_path):
    settings = ServerConfig(listen=None, http="127.0.0.1:0")
    settings.limits.max_http_body = 1000
    with background_server(tmp_path / "data", settings) as running:
        status, _, answer = request(running.http, "POST", "/v1/assert", raw=b"x" * 5000)
        assert status == 413 and answer["error"] == "frame_too_large"
        host, port = running.server.http_address.split(":")
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            raw.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            answer_bytes = raw.recv(4096)
            assert answer_bytes.startswith(b"HTTP/1.1 400")
        assert len(running.db) == 0


def tokens_config(**changes: Any) -> ServerConfig:
    settings = ServerConfig(listen=None, http="127.0.0.1:0")
    settings.tokens = [Token("reader", _protocol.ROLE_READ, hash_token("read-token-0123456789")),
                       Token("writer", _protocol.ROLE_WRITE, hash_token("write-token-0123456789"))]
    for key, value in changes.items():
        setattr(settings, key, value)
    return settings


def test_bearer_tokens_roles_and_rate_limits(tmp_path):
    """The server's mock clock stands still, so the rate limit's answers are exact under any load."""
    settings = tokens_config(operation_rates={"get": RateSpec(1.0, 2.0)})
    with background_server(tmp_path / "data", settings, clock=trio.testing.MockClock()) as running:
        record = claims(1)[0]
        body = {"records": [record.encode().hex()]}
        status, headers, answer = request(running.http, "POST", "/v1/assert", body)
        assert status == 401 and answer["error"] == "auth_required" and "bearer" in headers["www-authenticate"].lower()
        status, _, answer = request(running.http, "POST", "/v1/assert", body, token="wrong-token-0123456789")
        assert status == 401 and answer["error"] == "auth_failed"
        status, _, answer = request(running.http, "POST", "/v1/assert", body, token="read-token-0123456789")
        assert status == 403 and answer["error"] == "forbidden"
        assert len(running.db) == 0
        status, _, answer = request(running.http, "POST", "/v1/assert", body, token="write-token-0123456789")
        assert status == 200 and len(running.db) == 1
        # /health, /ready and /metrics stay open for load balancers and Prometheus.
        assert request(running.http, "GET", "/health")[0] == 200
        path = f"/v1/records/{record.id.hex()}"
        statuses = [request(running.http, "GET", path, token="read-token-0123456789") for _ in range(4)]
        assert [s for s, _, _ in statuses] == [200, 200, 429, 429]  # a burst of 2, then 1/s
        _, headers, answer = statuses[2]
        assert answer["error"] == "rate_limited" and headers["retry-after"] == "1"
        assert answer["retry_after"] == pytest.approx(1.0, abs=1e-3)
        running.advance(answer["retry_after"] * 0.5)
        status, _, early = request(running.http, "GET", path, token="read-token-0123456789")
        assert status == 429 and early["retry_after"] == pytest.approx(0.5, abs=1e-3)
        running.advance(early["retry_after"])
        assert request(running.http, "GET", path, token="read-token-0123456789")[0] == 200


def test_query_and_skeptic_carry_lens_and_filters(protected):
    from test_server import QueryingDatabase, filtered_claims

    records, excluded = filtered_claims()
    protected.db.put_many(records + excluded)
    querying = QueryingDatabase(protected.db)
    protected.server.service.db = querying
    status, _, body = request(protected.http, "GET",
                              "/v1/query?subject=aspirin&predicate=treats&lens=recency&lifecycle=approved"
                              "&as_of=5&decay=true")
    assert status == 200 and body["result"]["winner"]["id"] == records[1].id.hex()
    assert body["result"]["candidates_count"] == 2
    assert [r["id"] for r in body["records"]][0] == records[1].id.hex()
    assert {r["id"] for r in body["records"]} == {r.id.hex() for r in records}
    assert querying.calls[-1] == ("aspirin", "treats", "recency",
                                  {"lifecycle": "approved", "as_of": 5, "decay": True})
    status, _, body = request(protected.http, "GET", "/v1/skeptic?subject=aspirin&predicate=treats")
    assert status == 200 and querying.calls[-1][2] == "skeptic"
    assert body["result"]["lens"].startswith("skeptic") and body["result"]["candidates_count"] == 4
    status, _, body = request(protected.http, "GET", "/v1/query?subject=aspirin&lens=nope")
    assert status == 400 and body["error"] == "invalid_request"


def test_query_through_the_resolution_engine_over_http(protected):
    other = stemedb.Signer.from_seed(b"\x03" * 32)
    records = [stemedb.Assertion("aspirin", "treats", stemedb.Ref("headache"), timestamp=1).sign(SIGNER),
               stemedb.Assertion("aspirin", "treats", stemedb.Ref("fever"), timestamp=2).sign(other)]
    protected.db.put_many(records)
    status, _, body = request(protected.http, "GET", "/v1/query?subject=aspirin&predicate=treats&lens=recency")
    assert status == 200 and body["result"]["winner"]["id"] == records[1].id.hex()
    assert [r["id"] for r in body["records"]][0] == records[1].id.hex()
    status, _, body = request(protected.http, "GET", "/v1/skeptic?subject=aspirin&predicate=treats&audit=true")
    assert status == 200 and body["result"]["analysis"]["status"] == "Contested"
    status, _, body = request(protected.http, "GET", "/v1/audit?limit=5")
    assert status == 200 and len(body["entries"]) == 1 and body["entries"][0]["agent"].startswith("local:")
    status, _, body = request(protected.http, "GET", "/v1/query?subject=aspirin&lens=no-such-lens")
    assert status == 400 and body["error"] == "invalid_request"
