"""Where the clients connect and when they try again: addresses, failover, backoff, retries.

Owns: the list of nodes a client may use (URLs, or a cluster file's nodes —
stemedb.replication.cluster parses it; nothing of the server is imported),
the order they are tried in (the one that last worked first, then the rest
in order), the reconnect schedule (docs/protocol.md, "Reconnecting": every
node once per round, then an exponential backoff with jitter, until
`window` seconds have passed since the outage began or `retries` rounds are
spent), and which failures a request is resent after. Must never: do I/O
or read a clock itself — the blocking and async drivers pass `now` in and
do the sleeping, so one schedule serves both (and tests drive it with
made-up times).

Error handling: `ReconnectPlan.next_attempt` raises ConnectionLost naming
every node tried and the last failure once the schedule is spent;
`resend_after` says whether a failed request may be sent again.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass

from stemedb.client._wire import Address, parse_url
from stemedb.errors import ConnectionLost, RateLimited, RequestTimeout, StemeError, Unavailable


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often a client tries again (docs/protocol.md, "Reconnecting").

    window: seconds from the first failure of an outage during which the
    client keeps reconnecting (the default rides out a server restart of
    several seconds). retries: at most this many reconnect rounds and
    resends of one request per outage (None: as many as fit the window; 0:
    fail at once). The delay before round n (n ≥ 1) is initial × 2^(n−1),
    at most `maximum`, times a random factor in [1 − jitter, 1 + jitter].
    """

    enabled: bool = True
    window: float = 10.0
    retries: int | None = None
    initial: float = 0.05
    maximum: float = 1.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if not self.window >= 0:
            raise ValueError(f"reconnect_window: expected seconds >= 0, got {self.window!r}")
        if self.retries is not None and self.retries < 0:
            raise ValueError(f"retries: expected a count >= 0 or None, got {self.retries!r}")

    def delay(self, round_number: int, rng: random.Random) -> float:
        """Seconds to wait before reconnect round `round_number` (0: the first, no wait)."""
        if round_number <= 0:
            return 0.0
        base = min(self.initial * 2 ** (round_number - 1), self.maximum)
        return base * rng.uniform(1 - self.jitter, 1 + self.jitter)

    def may_continue(self, started: float, now: float, rounds: int) -> bool:
        """Whether an outage that began at `started` may take another round (or resend)."""
        if not self.enabled:
            return False
        if self.retries is not None and rounds > self.retries:
            return False
        return now - started <= self.window


def resend_after(error: BaseException, *, sent: bool, idempotent: bool) -> bool:
    """Whether a request that failed with `error` may be sent again (to this node or another).

    A lost connection or a node that is unavailable (shutting down, too many
    connections, timed out) may have dropped the request: writes are
    idempotent by content addressing, and reads change nothing, so resending
    is safe — except a request that is not idempotent (a QUERY with
    audit=True appends an audit entry) and was already sent. Refusals of the
    request itself (invalid, forbidden, …) are never resent, nor are rate
    limits and quotas: the caller decides when to come back (retry_after);
    nor a RequestTimeout (the server may still be working on it).
    """
    if isinstance(error, (RateLimited, RequestTimeout)):
        return False  # the caller's to retry: after retry_after, or knowing the server may be busy
    if not isinstance(error, (ConnectionLost, Unavailable)):
        return False
    return idempotent or not sent


class Resend:
    """One request's resends during an outage: how long to wait before the next, or no more."""

    def __init__(self, policy: RetryPolicy, *, idempotent: bool = True,
                 rng: random.Random | None = None) -> None:
        self.policy = policy
        self.idempotent = idempotent
        self.rng = rng or random.Random()
        self.started: float | None = None
        self.count = 0

    def after(self, error: BaseException, *, sent: bool, now: float, closed: bool = False) -> float:
        """Seconds to wait before sending again after `error`; raises `error` if it must not be.

        A lost connection is resent at once (connecting again has its own
        schedule); a node that answered `unavailable` is given the backoff.
        """
        if closed or not resend_after(error, sent=sent, idempotent=self.idempotent):
            raise error
        self.started = now if self.started is None else self.started
        self.count += 1
        if not self.policy.may_continue(self.started, now, self.count):
            raise error
        return 0.0 if isinstance(error, ConnectionLost) else self.policy.delay(self.count, self.rng)


def connect_refusal_is_final(error: BaseException) -> bool:
    """A refusal while connecting that no retry can change (a wrong token, no common version)."""
    return isinstance(error, StemeError) and not error.retry_safe


class Nodes:
    """The addresses a client may use, the preferred one first."""

    def __init__(self, addresses: Sequence[Address]) -> None:
        if not addresses:
            raise ValueError("no address to connect to: give a URL, a list of URLs or a cluster file")
        self.addresses = list(dict.fromkeys(addresses))
        self.preferred = 0

    @classmethod
    def of(cls, url: str | Sequence[str] | None, cluster: str | os.PathLike[str] | None,
           tls: bool = False) -> Nodes:
        """From a URL, several URLs, or a cluster file's nodes (then `url`, if given, comes first)."""
        urls: list[str] = []
        if isinstance(url, str):
            urls = [url]
        elif url is not None:
            urls = list(url)
        addresses = [parse_url(u) for u in urls]
        if cluster is not None:
            from stemedb.replication.cluster import ClusterFile

            scheme = "stemedbs" if tls or any(a.tls for a in addresses) else "stemedb"
            addresses += [parse_url(f"{scheme}://{node.address}") for node in ClusterFile.load(cluster).nodes]
        if not addresses:
            addresses = [parse_url("stemedb://127.0.0.1:7440")]
        return cls(addresses)

    @property
    def current(self) -> Address:
        return self.addresses[self.preferred]

    def round(self) -> list[Address]:
        """One reconnect round: the preferred node first, then the others in order."""
        return self.addresses[self.preferred:] + self.addresses[:self.preferred]

    def worked(self, address: Address) -> None:
        self.preferred = self.addresses.index(address)


class ReconnectPlan:
    """One outage's schedule: which node to try next and how long to wait first.

    `next_attempt(now)` gives (address, delay); call `failed(address, error)`
    after a failed attempt, and stop once an attempt works (`Nodes.worked`).
    """

    def __init__(self, nodes: Nodes, policy: RetryPolicy, now: float,
                 rng: random.Random | None = None) -> None:
        self.nodes = nodes
        self.policy = policy
        self.started = now
        self.rng = rng or random.Random()
        self.rounds = 0
        self._queue: list[Address] = nodes.round()
        self.errors: list[tuple[Address, BaseException]] = []

    def next_attempt(self, now: float) -> tuple[Address, float]:
        delay = 0.0
        if not self._queue:
            self.rounds += 1
            if not self.policy.may_continue(self.started, now, self.rounds):
                raise self.exhausted(now)
            delay = self.policy.delay(self.rounds, self.rng)
            self._queue = self.nodes.round()
        return self._queue.pop(0), delay

    def failed(self, address: Address, error: BaseException) -> None:
        self.errors.append((address, error))

    def exhausted(self, now: float) -> ConnectionLost:
        tried = ", ".join(str(a) for a in self.nodes.addresses)
        last = f"{self.errors[-1][1]}" if self.errors else "no attempt"
        return ConnectionLost(f"cannot connect to {tried} (tried for {now - self.started:.1f} s, "
                              f"{self.rounds} round(s)): {last}")
