"""GCRA limiter, quotas and the server configuration, without a server."""

from __future__ import annotations

import pathlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stemedb import _protocol
from stemedb.errors import AuthError, RateLimited
from stemedb.server import ConfigError, ServerConfig, Token, hash_token
from stemedb.server.auth import Authenticator, is_loopback
from stemedb.server.limits import RateLimiter, RequestLimits, acquire_all

EXAMPLE = pathlib.Path(__file__).parent.parent / "examples" / "stemedb.toml"


@given(
    rate=st.floats(0.5, 1000),
    burst=st.floats(1, 50),
    steps=st.lists(st.tuples(st.floats(0, 2), st.integers(1, 3)), min_size=1, max_size=120),
)
def test_gcra_never_admits_more_than_rate_times_window_plus_burst(rate, burst, steps):
    limiter = RateLimiter(rate, burst)
    now = 0.0
    admitted: list[tuple[float, int]] = []
    for gap, cost in steps:
        now += gap * gap  # many tiny gaps (bursts) and some long pauses
        if limiter.acquire("k", now, cost) == 0.0:
            admitted.append((now, cost))
    for i in range(len(admitted)):
        total = 0
        for j in range(i, len(admitted)):
            total += admitted[j][1]
            window = admitted[j][0] - admitted[i][0]
            assert total <= rate * window + burst + 1e-6


def test_gcra_burst_then_steady_rate_and_retry_after():
    limiter = RateLimiter(10.0, 5.0)
    assert [limiter.acquire("a", 0.0) for _ in range(5)] == [0.0] * 5
    wait = limiter.acquire("a", 0.0)
    assert wait == pytest.approx(0.1)
    assert limiter.acquire("a", 0.1) == 0.0  # exactly when told
    assert limiter.acquire("b", 0.0) == 0.0  # keys are independent
    assert limiter.acquire("a", 0.1, cost=6) == float("inf")  # never fits the burst


def test_acquire_all_is_all_or_nothing():
    first, second = RateLimiter(1.0, 2.0), RateLimiter(1.0, 1.0)
    assert acquire_all([(first, "x", 1.0), (second, "x", 1.0)], 0.0) == 0.0
    assert acquire_all([(first, "x", 1.0), (second, "x", 1.0)], 0.0) > 0.0
    # The refusal charged nothing: `first` still has one unit of burst left.
    assert first.acquire("x", 0.0) == 0.0


def test_idle_keys_are_forgotten():
    limiter = RateLimiter(100.0, 1.0, max_keys=10)
    for i in range(50):
        limiter.acquire(i, float(i))
    assert len(limiter) <= 11


def test_request_limits_and_quotas():
    settings = ServerConfig.from_dict({
        "rate_limits": {"client": {"rate": 1, "burst": 2}, "operations": {"put": {"rate": 1, "burst": 1}}},
        "quotas": {"default_tier": "low", "tiers": {"low": {"rate": 1, "burst": 3},
                                                   "high": {"rate": 100, "burst": 1000}},
                   "signers": {"aa" * 32: "high"}},
    })
    limits = RequestLimits(settings)
    limits.admit("c", "put", 0.0)
    with pytest.raises(RateLimited) as refused:
        limits.admit("c", "put", 0.0)
    assert refused.value.retry_after == pytest.approx(1.0)
    limits.admit("c", "get", 0.0)  # the client's burst of 2 had one unit left
    with pytest.raises(RateLimited):
        limits.admit("c", "get", 0.0)
    limits.charge_writes({b"\xaa" * 32: 500, b"\x01" * 32: 3}, 0.0)
    with pytest.raises(RateLimited, match="low"):
        limits.charge_writes({b"\xaa" * 32: 1, b"\x01" * 32: 1}, 0.0)
    limits.charge_writes({b"\xaa" * 32: 1}, 0.0)  # the refused batch charged nobody
    with pytest.raises(RateLimited, match="smaller batches"):
        limits.charge_writes({b"\x02" * 32: 4}, 10.0)


def test_example_config_loads():
    settings = ServerConfig.load(EXAMPLE)
    assert settings.listen == "127.0.0.1:7440" and settings.http == "127.0.0.1:7441"
    assert {t.name: t.role for t in settings.tokens} == {
        "ingest": _protocol.ROLE_WRITE, "dashboard": _protocol.ROLE_READ, "operator": _protocol.ROLE_ADMIN}
    assert settings.tokens[1].expires is not None
    assert settings.quota_default_tier == "standard" and len(settings.signer_tiers) == 1
    assert not settings.protected_mode and settings.database == {"durability": "sync"}


@pytest.mark.parametrize("document, message", [
    ({"limits": {"max_frmae": 5}}, "limits.max_frmae: unknown key"),
    ({"limits": {"max_frame": -1}}, "limits.max_frame: expected a positive integer"),
    ({"limits": {"preauth_frame": 100}}, "at least 1100"),
    ({"tokens": [{"name": "a", "role": "root", "token": "x" * 20}]}, "tokens[0].role"),
    ({"tokens": [{"name": "a", "role": "read", "token": "short"}]}, "tokens[0].token"),
    ({"tokens": [{"name": "a", "role": "read"}]}, "exactly one of token"),
    ({"tokens": [{"name": "a", "role": "read", "sha256": "00"}]}, "64 hex digits"),
    ({"quotas": {"default_tier": "gold"}}, "quotas.default_tier"),
    ({"quotas": {"tiers": {"t": {"rate": 1}}, "signers": {"zz": "t"}}}, "public key"),
    ({"server": {"listen": "nowhere"}}, "host:port"),
    ({"tls": {"cert": "a.pem"}}, "both cert and key"),
    ({"rate_limits": {"operations": {"teleport": {"rate": 1}}}}, "unknown operation"),
])
def test_config_errors_name_the_key(document, message):
    with pytest.raises(ConfigError) as error:
        ServerConfig.from_dict(document)
    assert message in str(error.value)


def test_authenticator_tokens_expiry_and_roles():
    tokens = [Token("r", _protocol.ROLE_READ, hash_token("read-token-0123456789")),
              Token("x", _protocol.ROLE_ADMIN, hash_token("expired-token-0123456789"), expires=100.0)]
    auth = Authenticator(tokens, clock=lambda: 200.0)
    assert auth.authenticate("read-token-0123456789").role == _protocol.ROLE_READ
    with pytest.raises(AuthError, match="unknown"):
        auth.authenticate("read-token-012345678")
    with pytest.raises(AuthError, match="expired"):
        auth.authenticate("expired-token-0123456789")
    assert auth.anonymous(("127.0.0.1", 1)) is None  # tokens configured: no anonymous access
    principal = auth.authenticate("read-token-0123456789")
    Authenticator.authorize(principal, _protocol.GET)
    for opcode in (_protocol.PUT, _protocol.AUDIT, 0x40):
        with pytest.raises(AuthError, match="needs the"):
            Authenticator.authorize(principal, opcode)


@pytest.mark.parametrize("peer, loopback", [
    (("127.0.0.1", 1), True), (("127.1.2.3", 1), True), (("::1", 1, 0, 0), True),
    (("::ffff:127.0.0.1", 1, 0, 0), True), ("", True), ("/run/stemedb.sock", True),
    (("10.0.0.1", 1), False), (("::ffff:10.0.0.1", 1, 0, 0), False), (("fe80::1%eth0", 1, 0, 1), False),
    (None, False), (("localhost", 1), False),
])
def test_is_loopback(peer, loopback):
    assert is_loopback(peer) is loopback


def test_every_operation_can_be_rate_limited_by_its_name():
    """[rate_limits.operations] keys are the pipeline's operation names, for both doors."""
    from stemedb.server import config, http, pipeline

    names = {op.name for op in pipeline.OPERATIONS.values()} | {pipeline.operation_of(0x40).name}
    assert names == set(config.OPERATIONS)
    assert {op.name for op in http.ROUTES.values()} <= names
    settings = ServerConfig.from_dict({"rate_limits": {"operations": {"vote": {"rate": 1, "burst": 1}}}})
    limits = RequestLimits(settings)
    limits.admit("client", pipeline.OPERATIONS[_protocol.VOTE].name, 0.0)
    with pytest.raises(RateLimited):
        limits.admit("client", "vote", 0.0)
