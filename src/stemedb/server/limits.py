"""Rate limits and write quotas (GCRA).

Owns: the Generic Cell Rate Algorithm limiter (one theoretical arrival time
per key: O(1) memory per active key, exact burst semantics), the per-client
and per-operation request limits, and per-signer write quotas by trust tier.
Must never: read a clock itself — every call is given `now`, so tests drive it
with trio's MockClock and the server with trio.current_time().

Guarantee (tests/test_server_limits.py checks it): over any window of length
T, a key is admitted at most rate × T + burst units.

Thread safety: a lock guards each limiter, because write quotas are charged
from the worker thread that decodes a batch.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterable
from typing import Any

from stemedb.errors import QuotaExceeded, RateLimited
from stemedb.server.auth import Peer
from stemedb.server.config import RateSpec, ServerConfig


class RateLimiter:
    """GCRA: admits `cost` units per key at `rate` per second with a `burst` allowance."""

    def __init__(self, rate: float, burst: float, *, max_keys: int = 100_000) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = float(rate)
        self.burst = float(burst)
        self.interval = 1.0 / self.rate           # seconds per unit
        self.tolerance = self.burst * self.interval  # how far ahead of now a key may run
        self.max_keys = max_keys
        self._tat: dict[Hashable, float] = {}      # theoretical arrival time per key
        self._lock = threading.Lock()

    @classmethod
    def from_spec(cls, spec: RateSpec) -> RateLimiter:
        return cls(spec.rate, spec.burst)

    def wait_time(self, key: Hashable, now: float, cost: float = 1.0) -> float:
        """Seconds until `cost` units would be admitted (0.0: admitted now); charges nothing."""
        with self._lock:
            return self._wait(key, now, cost)

    def _wait(self, key: Hashable, now: float, cost: float) -> float:
        if cost > self.burst:
            return float("inf")
        tat = max(self._tat.get(key, now), now)
        excess = tat + cost * self.interval - now - self.tolerance
        return excess if excess > 1e-12 else 0.0

    def _charge(self, key: Hashable, now: float, cost: float) -> None:
        self._tat[key] = max(self._tat.get(key, now), now) + cost * self.interval
        if len(self._tat) > self.max_keys:
            self._forget_idle(now)

    def acquire(self, key: Hashable, now: float, cost: float = 1.0) -> float:
        """Admit and charge `cost` units, returning 0.0; or return the wait and charge nothing."""
        with self._lock:
            wait = self._wait(key, now, cost)
            if wait == 0.0:
                self._charge(key, now, cost)
            return wait

    def _forget_idle(self, now: float) -> None:
        # A key whose TAT has passed behaves exactly like an unknown key: drop it.
        for key in [k for k, tat in self._tat.items() if tat <= now]:
            del self._tat[key]
        if len(self._tat) > self.max_keys:  # still full of busy keys: forget the least busy half
            for key, _ in sorted(self._tat.items(), key=lambda kv: kv[1])[: len(self._tat) // 2]:
                del self._tat[key]

    def __len__(self) -> int:
        return len(self._tat)


def acquire_all(charges: Iterable[tuple[RateLimiter, Hashable, float]], now: float) -> float:
    """Charge every (limiter, key, cost) or none: 0.0 if all admitted, else the longest wait."""
    charges = list(charges)
    locks = sorted({id(limiter): limiter for limiter, _, _ in charges}.values(), key=id)
    for limiter in locks:
        limiter._lock.acquire()
    try:
        wait = max((limiter._wait(key, now, cost) for limiter, key, cost in charges), default=0.0)
        if wait == 0.0:
            for limiter, key, cost in charges:
                limiter._charge(key, now, cost)
        return wait
    finally:
        for limiter in reversed(locks):
            limiter._lock.release()


class RequestLimits:
    """The server's limits: per client, per (client, operation), and per signer (quotas)."""

    def __init__(self, config: ServerConfig) -> None:
        self.client = RateLimiter.from_spec(config.client_rate) if config.client_rate else None
        self.operations = {op: RateLimiter.from_spec(spec) for op, spec in config.operation_rates.items()}
        self.tiers = {tier: RateLimiter.from_spec(spec) for tier, spec in config.quota_tiers.items()}
        self.signer_tiers = dict(config.signer_tiers)
        self.default_tier = config.quota_default_tier
        # Failed authentications per peer address: a burst of 10, then one a second.
        self.auth_failures = RateLimiter(1.0, 10.0)

    def admit(self, client: Hashable, operation: str, now: float) -> None:
        """Charge one request; RateLimited (with retry_after) if a limit is exhausted."""
        charges: list[tuple[RateLimiter, Hashable, float]] = []
        if self.client is not None:
            charges.append((self.client, client, 1.0))
        limiter = self.operations.get(operation)
        if limiter is not None:
            charges.append((limiter, client, 1.0))
        if not charges:
            return
        wait = acquire_all(charges, now)
        if wait:
            raise RateLimited(f"rate limit for {operation!r} exceeded; retry in {wait:.3f} s",
                              retry_after=wait)

    def check_auth_failures(self, peer: Peer, now: float) -> None:
        """RateLimited while a peer address has failed authentication too often."""
        wait = self.auth_failures.wait_time(_host(peer), now)
        if wait:
            raise RateLimited(f"too many failed authentications from this address; retry in {wait:.1f} s",
                              retry_after=wait)

    def auth_failed(self, peer: Peer, now: float) -> None:
        self.auth_failures.acquire(_host(peer), now)

    @property
    def has_quotas(self) -> bool:
        return bool(self.tiers)

    def tier_of(self, signer: bytes) -> str | None:
        return self.signer_tiers.get(signer, self.default_tier)

    def charge_writes(self, records_by_signer: dict[bytes, int], now: float) -> None:
        """Charge each signer's records to its tier's quota, all or nothing (else QuotaExceeded)."""
        if not self.tiers:
            return
        charges: list[tuple[RateLimiter, Any, float]] = []
        for signer, count in records_by_signer.items():
            tier = self.tier_of(signer)
            if tier is None:
                continue  # no tier and no default tier: unlimited
            charges.append((self.tiers[tier], signer, float(count)))
        wait = acquire_all(charges, now)
        if wait:
            worst = max(charges, key=lambda c: c[0]._wait(c[1], now, c[2]))
            signer = worst[1]
            tier = self.tier_of(signer)
            if wait == float("inf"):
                raise QuotaExceeded(
                    f"write quota: {int(worst[2])} records by signer {signer.hex()[:16]}… exceed "
                    f"the {tier!r} tier's burst of {worst[0].burst:g}; send smaller batches",
                    retry_after=1.0)
            raise QuotaExceeded(f"write quota of signer {signer.hex()[:16]}… ({tier!r} tier) "
                              f"exhausted; retry in {wait:.3f} s", retry_after=wait)


def _host(peer: Peer) -> Hashable:
    return peer[0] if isinstance(peer, tuple) else peer
