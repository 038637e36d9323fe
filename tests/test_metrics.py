"""Metric hygiene (issue 13, item 7): what a live server's /metrics exports, under which names and
labels; no `_created` series; process and Python collectors; build info; the engine figures the
collector forwards; the registration API of archival and the cluster; the documented list.
And the side door's security (item 9): TLS on the HTTP door, the /metrics token, tokens never
named to unauthenticated peers, new tokens."""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import pathlib
import platform
import re
import ssl
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from prometheus_client.parser import text_string_to_metric_families
from test_server_support import SIGNER, background_server, claims, error_of, record_batch, served

import stemedb
from stemedb import _protocol
from stemedb.client import connect
from stemedb.server import Server, ServerConfig, Token, hash_token
from stemedb.server.auth import Authenticator, new_token
from stemedb.server.metrics import (
    ArchiveStatus,
    DatabaseCollector,
    PeerStatus,
    ServerMetrics,
    SyncTotals,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
OPERATIONS = ROOT / "docs" / "operations.md"
READ_TOKEN = "read-token-0123456789"

Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """({family: type}, {sample name: [(labels, value)]}) of a Prometheus text exposition."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    matches = [v for found, v in samples.get(name, []) if found == labels]
    assert len(matches) == 1, (name, labels, samples.get(name))
    return matches[0]


def scrape(base: str) -> str:
    connection = http.client.HTTPConnection(base.removeprefix("http://"), timeout=10)
    connection.request("GET", "/metrics")
    response = connection.getresponse()
    body = response.read().decode()
    connection.close()
    assert response.status == 200, body
    return body


@pytest.fixture
def live(tmp_path: pathlib.Path) -> Iterator[Any]:
    with background_server(tmp_path / "data") as running:
        yield running


def test_live_scrape_names_labels_and_no_created_series(live):
    records = claims(4)
    with connect(live.url) as client:
        client.put_many(records[:3])
        client.put(records[3])
        client.query("s0", "p", lens="recency")
        with pytest.raises(stemedb.InvalidRequest):
            client.query("s0", "p", lens="no-such-lens")
    scrape(live.http)  # one scrape counted before the one read below
    text = scrape(live.http)
    types, samples = parse(text)

    assert not [name for name in samples if name.endswith("_created")]
    assert "_created" not in text
    for family in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds",
                   "python_info", "python_gc_objects_collected"):
        assert family in types, family
    assert value(samples, "stemedb_build_info", version=stemedb.__version__,
                 python=platform.python_version(), protocol=str(_protocol.PROTOCOL_VERSION)) == 1

    # One label scheme: the request counter, the latency histogram and the error counter.
    assert {frozenset(labels) for labels, _ in samples["stemedb_requests_total"]} == {
        frozenset({"door", "op"})}
    assert {frozenset(labels) - {"le"} for labels, _ in samples["stemedb_request_seconds_bucket"]} == {
        frozenset({"door", "op"})}
    assert {frozenset(labels) for labels, _ in samples["stemedb_request_errors_total"]} == {
        frozenset({"door", "op", "error"})}
    assert value(samples, "stemedb_requests_total", door="binary", op="put") == 2
    assert value(samples, "stemedb_requests_total", door="binary", op="query") == 2
    assert value(samples, "stemedb_request_errors_total", door="binary", op="query",
                 error="invalid_request") == 1
    assert value(samples, "stemedb_request_seconds_count", door="binary", op="put") == 2
    assert value(samples, "stemedb_requests_total", door="http", op="metrics") == 1
    assert value(samples, "stemedb_query_seconds_count", lens="recency") == 1

    assert value(samples, "stemedb_writes_total") == 4
    assert value(samples, "stemedb_records") == 4
    assert value(samples, "stemedb_group_commit_batches_total") == 2
    assert value(samples, "stemedb_store_up") == 1 and value(samples, "stemedb_store_failed") == 0
    size = value(samples, "stemedb_filesystem_size_bytes")
    assert 0 < value(samples, "stemedb_filesystem_avail_bytes") <= size
    assert value(samples, "stemedb_connections", door="http") >= 1  # this scrape's own connection
    assert types["stemedb_wal_fsync_seconds"] == "histogram"
    # Archival and the cluster registered nothing: their metrics are not exported at all.
    assert not [name for name in types if "archive" in name or "replication" in name
                or name == "stemedb_node_up"]


def test_every_exported_metric_is_documented(live):
    """docs/operations.md's metric table lists exactly what a server exports (and what
    archival, the cluster and the engine's coming figures add), with the right type."""
    with connect(live.url) as client:
        client.put(claims(1)[0])
    live.server.metrics.track_archive(lambda: ArchiveStatus(0.0, 1.0, 0, 0))
    live.server.metrics.track_cluster("n1", lambda: {"n2": PeerStatus(True, 0.0)}, SyncTotals)
    types, _ = parse(scrape(live.http))
    exported = {name: kind for name, kind in types.items() if name.startswith("stemedb_")}
    exported["stemedb_group_commit_batch_records"] = "histogram"  # once the engine reports it
    exported["stemedb_envelopes_written"] = "counter"             # likewise
    documented = {}
    for match in re.finditer(r"^\| `(stemedb_\w+)` \| (counter|gauge|histogram) \|",
                             OPERATIONS.read_text(), re.MULTILINE):
        name, kind = match.groups()
        documented[name.removesuffix("_total") if kind == "counter" else name] = kind
    assert documented == exported


@pytest.mark.trio
async def test_requests_refused_at_admission_are_requests_with_an_error(tmp_path):
    """A role refusal is counted once as a request of its door and op, once as its error."""
    settings = ServerConfig(listen=None, http=None,
                            tokens=[Token("reader", _protocol.ROLE_READ, hash_token(READ_TOKEN))])
    with stemedb.open(tmp_path / "data") as db:
        server = Server(db, settings)
        async with served(server) as client:
            await client.hello(READ_TOKEN)
            answer = await client.call(_protocol.PUT, record_batch(claims(1, signer=SIGNER)))
            assert answer.opcode == _protocol.ERROR
            assert (await client.call(_protocol.PING, b"x")).opcode == _protocol.PING
        _, samples = parse(server.metrics.render().decode())
    assert value(samples, "stemedb_requests_total", door="binary", op="put") == 1
    assert value(samples, "stemedb_request_errors_total", door="binary", op="put",
                 error="forbidden") == 1
    assert value(samples, "stemedb_requests_total", door="binary", op="ping") == 1
    assert value(samples, "stemedb_requests_rejected_total", reason="forbidden") == 1
    refused_latency = [labels for labels, _ in samples.get("stemedb_request_seconds_count", [])
                       if labels.get("op") == "put"]
    assert refused_latency == []  # it never ran: no latency


def _stats(**writes: Any) -> dict[str, Any]:
    base = {"batches": 4, "records_written": 10, "bytes_written": 999, "fsyncs": 4,
            "fsync_mean_ms": 2.0, "fsync_histogram_ms": {"1": 1, "5": 3, "inf": 0},
            "max_records_per_batch": 5, "max_writers_per_batch": 2, "write_errors": 0}
    base.update(writes)
    return {"path": None, "records": 10, "by_kind": {"assertion": 8, "envelope": 2}, "segments": 1,
            "disk_bytes": 1, "used_bytes": 1, "index_bytes": 1, "failed": False, "writes": base,
            "recovery": {"seconds": 0.0, "records_replayed": 0, "torn_bytes_dropped": 0}}


def _collect(stats: dict[str, Any]) -> Samples:
    metrics = ServerMetrics(lambda: stats)
    return parse(metrics.render().decode())[1]


def test_fsync_histogram_is_cumulative_in_seconds():
    samples = _collect(_stats())
    buckets = {labels["le"]: v for labels, v in samples["stemedb_wal_fsync_seconds_bucket"]}
    assert buckets == {"0.001": 1, "0.005": 4, "+Inf": 4}
    assert value(samples, "stemedb_wal_fsync_seconds_sum") == pytest.approx(0.008)


def test_until_the_engine_reports_them_the_mean_batch_size_stays_and_envelopes_are_writes():
    samples = _collect(_stats())
    assert value(samples, "stemedb_group_commit_batch_records_mean") == 2.5
    assert "stemedb_group_commit_batch_records_bucket" not in samples
    assert value(samples, "stemedb_writes_total") == 10
    assert "stemedb_envelopes_written_total" not in samples


def test_engine_batch_histogram_and_envelope_count_are_exported_when_reported():
    samples = _collect(_stats(batch_records_histogram={"1": 1, "4": 2, "16": 1, "inf": 0},
                              envelopes_written=2))
    buckets = {labels["le"]: v for labels, v in samples["stemedb_group_commit_batch_records_bucket"]}
    assert buckets == {"1.0": 1, "4.0": 3, "16.0": 4, "+Inf": 4}
    assert value(samples, "stemedb_group_commit_batch_records_count") == 4
    assert value(samples, "stemedb_group_commit_batch_records_sum") == 10
    assert "stemedb_group_commit_batch_records_mean" not in samples  # the histogram replaces it
    assert value(samples, "stemedb_writes_total") == 8
    assert value(samples, "stemedb_envelopes_written_total") == 2


def test_a_failing_store_is_store_up_0_and_the_scrape_still_answers():
    def broken() -> dict[str, Any]:
        raise stemedb.DatabaseClosed("closed")

    samples = parse(ServerMetrics(broken).render().decode())[1]
    assert value(samples, "stemedb_store_up") == 0
    assert "stemedb_records" not in samples and "process_cpu_seconds_total" in samples
    assert list(DatabaseCollector(broken).collect())[0].name == "stemedb_store_up"


def test_archive_and_cluster_register_their_sources():
    metrics = ServerMetrics()
    status = {"archive": ArchiveStatus(lag_seconds=12.5, last_success_unix=1_700_000_000.0,
                                       archived_bytes=4096, failures=1)}
    metrics.track_archive(lambda: status["archive"])
    metrics.track_cluster("n1", lambda: {"n3": PeerStatus(up=False, lag_seconds=None),
                                         "n2": PeerStatus(up=True, lag_seconds=0.25)})
    samples = parse(metrics.render().decode())[1]
    assert value(samples, "stemedb_archive_lag_seconds") == 12.5
    assert value(samples, "stemedb_archive_last_success_timestamp_seconds") == 1_700_000_000.0
    assert value(samples, "stemedb_archived_bytes_total") == 4096
    assert value(samples, "stemedb_archive_failures_total") == 1
    assert {labels["node"]: v for labels, v in samples["stemedb_node_up"]} == {
        "n1": 1, "n2": 1, "n3": 0}
    assert samples["stemedb_replication_lag_seconds"] == [({"peer": "n2"}, 0.25)]
    status["archive"] = ArchiveStatus(0.0, None, 8192, 1)  # read again at every scrape
    samples = parse(metrics.render().decode())[1]
    assert value(samples, "stemedb_archive_lag_seconds") == 0
    assert "stemedb_archive_last_success_timestamp_seconds" not in samples


def test_a_failing_source_is_left_out_of_the_scrape(caplog):
    def broken() -> ArchiveStatus:
        raise RuntimeError("archiver crashed")

    metrics = ServerMetrics()
    metrics.track_archive(broken)
    samples = parse(metrics.render().decode())[1]
    assert "stemedb_archive_lag_seconds" not in samples and "stemedb_build_info" in samples
    assert "archive's metrics source failed" in caplog.text


# ------------------------------------------------------------------ side-door security (item 9)

METRICS_TOKEN = "metrics-scraper-token-0123456789"


def http_get(address: str, path: str, *, token: str | None = None,
             context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], str]:
    host, _, port = address.rpartition(":")
    connection: http.client.HTTPConnection
    if context is not None:
        connection = http.client.HTTPSConnection(host, int(port), timeout=10, context=context)
    else:
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return (response.status, {k.lower(): v for k, v in response.getheaders()},
                response.read().decode())
    finally:
        connection.close()


def tls_settings(tmp_path: pathlib.Path, **document: Any) -> tuple[ServerConfig, trustme.CA]:
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "server.pem", tmp_path / "server-key.pem"
    certificate.private_key_and_cert_chain_pem.write_to_path(str(cert))
    certificate.private_key_pem.write_to_path(str(key))
    settings = ServerConfig.from_dict({"server": {"listen": "127.0.0.1:0", "http": "127.0.0.1:0"},
                                       "tls": {"cert": str(cert), "key": str(key)}, **document})
    return settings, authority


def test_with_tls_configured_the_http_door_serves_tls_only(tmp_path):
    settings, authority = tls_settings(tmp_path)
    context = ssl.create_default_context()
    authority.configure_trust(context)
    with background_server(tmp_path / "data", settings) as running:
        address = running.server.http_address
        status, _, body = http_get(address, "/health", context=context)
        assert status == 200 and json.loads(body) == {"status": "ok", "records": 0}
        status, _, text = http_get(address, "/metrics", context=context)
        assert status == 200 and "stemedb_build_info" in text
        with pytest.raises((http.client.HTTPException, OSError)):  # a clear request gets nothing
            http_get(address, "/health")
        assert running.server.describe()["tls"] is True
        untrusted = ssl.create_default_context()  # a client that does not trust the server's CA
        with pytest.raises(ssl.SSLCertVerificationError):
            http_get(address, "/health", context=untrusted)
        status, _, _ = http_get(address, "/ready", context=context)  # the door still serves
        assert status == 200


def test_metrics_token_required_when_configured(tmp_path):
    api_token = "ingest-api-token-0123456789"
    settings = ServerConfig.from_dict({
        "server": {"listen": "127.0.0.1:0", "http": "127.0.0.1:0"},
        "tokens": [{"name": "ingest-secret-name", "role": "admin", "sha256": hash_token(api_token).hex()}],
        "http": {"metrics_token_sha256": [hash_token(METRICS_TOKEN).hex()]}})
    with background_server(tmp_path / "data", settings) as running:
        address = running.server.http_address
        status, headers, body = http_get(address, "/metrics")
        assert status == 401 and headers["www-authenticate"] == 'Bearer realm="stemedb"'
        assert json.loads(body)["error"] == "auth_required"
        for wrong in ("wrong-token-0123456789", api_token):  # an API token is not a metrics token
            status, _, body = http_get(address, "/metrics", token=wrong)
            assert status == 401 and json.loads(body)["error"] == "auth_failed", body
            assert json.loads(body)["message"] == "unknown token"
        status, _, text = http_get(address, "/metrics", token=METRICS_TOKEN)
        assert status == 200
        _, samples = parse(text)
        assert value(samples, "stemedb_requests_rejected_total", reason="auth_required") == 1
        assert value(samples, "stemedb_requests_rejected_total", reason="auth_failed") == 2
        status, _, _ = http_get(address, "/health")  # the other open routes stay open
        assert status == 200
    assert "ingest-secret-name" not in body


def test_metrics_token_failures_are_throttled_per_address(tmp_path):
    settings = ServerConfig.from_dict({"server": {"listen": None, "http": "127.0.0.1:0"},
                                       "http": {"metrics_token_sha256": hash_token(METRICS_TOKEN).hex()}})
    clock = trio.testing.MockClock(rate=0)  # time stands still: no failure is forgiven meanwhile
    with background_server(tmp_path / "data", settings, clock=clock) as running:
        address = running.server.http_address
        for _ in range(10):
            assert http_get(address, "/metrics", token="guess-0123456789abcdef")[0] == 401
        status, headers, body = http_get(address, "/metrics", token=METRICS_TOKEN)
        assert status == 429 and json.loads(body)["error"] == "rate_limited" and "retry-after" in headers
        running.advance(2.0)
        assert http_get(address, "/metrics", token=METRICS_TOKEN)[0] == 200


def test_metrics_open_without_a_configured_token(live):
    assert http_get(live.server.http_address, "/metrics")[0] == 200


@pytest.mark.trio
async def test_an_expired_token_is_not_named_to_the_peer(tmp_path, caplog):
    expired = "expired-token-0123456789"
    settings = ServerConfig(listen=None, http=None, tokens=[
        Token("payroll-importer", _protocol.ROLE_WRITE, hash_token(expired), expires=1.0)])
    with stemedb.open(tmp_path / "data") as db, caplog.at_level(logging.INFO):
        server = Server(db, settings)
        async with served(server, ("10.1.2.3", 5555)) as client:
            await client.send(_protocol.HELLO, _protocol.encode_hello(1, 1, "test", expired))
            frames = await client.rest()
        code, _, message = error_of(frames[-1])
        assert code == _protocol.E_AUTH_FAILED and message == "token has expired"
        client_side, server_side = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.handle_http, server_side, ("10.1.2.3", 5556))
            await client_side.send_all(b"GET /v1/stats HTTP/1.1\r\nHost: x\r\n"
                                       b"Authorization: Bearer " + expired.encode() + b"\r\n\r\n")
            answer = b""
            while not answer.endswith(b"}"):
                answer += await client_side.receive_some(65536)
            await client_side.aclose()
    assert answer.startswith(b"HTTP/1.1 401 ") and b'"message": "token has expired"' in answer
    assert b"payroll" not in answer
    assert "refused the expired token 'payroll-importer'" in caplog.text  # the operator learns it


def test_new_token_and_its_sha256_work_in_a_config():
    token, digest = new_token()
    other, _ = new_token()
    assert token != other and token.startswith("sdb_") and len(token) >= 40
    assert digest == hashlib.sha256(token.encode()).hexdigest()
    settings = ServerConfig.from_dict({"tokens": [{"name": "new", "role": "read", "sha256": digest}],
                                       "http": {"metrics_token_sha256": digest}})
    auth = Authenticator(settings.tokens, metrics_tokens=settings.metrics_tokens)
    assert auth.authenticate(token).name == "new"
    auth.authenticate_scraper(token)
    with pytest.raises(stemedb.AuthError, match="unknown token"):
        auth.authenticate_scraper(other)
