"""Liveness of the other nodes: up, suspect, down, from heartbeats.

Owns: `PeerLiveness`, a state machine per peer fed with "asked at time t"
(a PING went out) and "heard from at time t" (any answer or request from the
peer arrived), and "failed at time t" (a connection was refused or broke);
`Membership`, the table of every peer with its transition listeners and an
injectable clock; and `run_heartbeats`, the trio task that PINGs every peer
on the schedule (every `heartbeat_interval`, each PING bounded by
`ping_timeout`). Must never: open connections or send bytes itself (the
driver's `ping(peer)` does), or read the wall clock (the clock is injected:
trio's in production, a MockClock in the simulation).

States (docs/replication.md, "Membership and liveness"): a peer is DOWN until
it is first heard from; UP once heard from; SUSPECT once a question has been
unanswered for `suspect_after` seconds (or a connection to it failed); DOWN
once unanswered for `down_after`; UP again as soon as it is heard from. The
silence is counted from the first question not answered, so a peer is never
judged on a period in which nobody asked it anything.

Error handling: a listener that raises is logged and does not stop the others.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from stemedb.errors import Unavailable

log = logging.getLogger("stemedb.replication")


class PeerState(enum.Enum):
    UP = "up"
    SUSPECT = "suspect"
    DOWN = "down"


@dataclass(frozen=True)
class LivenessSettings:
    heartbeat_interval: float = 0.5
    suspect_after: float = 2.0
    down_after: float = 6.0
    ping_timeout: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_interval < self.suspect_after < self.down_after:
            raise ValueError("liveness: expected 0 < heartbeat_interval < suspect_after < down_after, "
                             f"got {self.heartbeat_interval}, {self.suspect_after}, {self.down_after}")
        if self.ping_timeout <= 0:
            raise ValueError(f"liveness: ping_timeout {self.ping_timeout} must be positive")


@dataclass(frozen=True)
class Transition:
    peer: str
    old: PeerState
    new: PeerState
    at: float           # clock seconds


class PeerLiveness:
    """One peer's state, without I/O: feed it events with their times; read `state`."""

    def __init__(self, peer: str, settings: LivenessSettings) -> None:
        self.peer = peer
        self.settings = settings
        self.state = PeerState.DOWN
        self.last_heard: float | None = None
        self.waiting_since: float | None = None   # first question not yet answered
        self.changed_at = 0.0

    def asked(self, now: float) -> Transition | None:
        if self.waiting_since is None:
            self.waiting_since = now
        return self.tick(now)

    def heard(self, now: float) -> Transition | None:
        self.last_heard = now
        self.waiting_since = None
        return self._move(PeerState.UP, now)

    def failed(self, now: float) -> Transition | None:
        """A connection was refused or broke: suspect at once, and counting towards down."""
        if self.waiting_since is None:
            self.waiting_since = now
        if self.state is PeerState.UP:
            return self._move(PeerState.SUSPECT, now)
        return self.tick(now)

    def silence(self, now: float) -> float:
        return 0.0 if self.waiting_since is None else max(0.0, now - self.waiting_since)

    def tick(self, now: float) -> Transition | None:
        """Apply the timeouts at time `now`."""
        if self.state is PeerState.DOWN:
            return None
        silence = self.silence(now)
        if silence >= self.settings.down_after:
            return self._move(PeerState.DOWN, now)
        if silence >= self.settings.suspect_after and self.state is PeerState.UP:
            return self._move(PeerState.SUSPECT, now)
        return None

    def _move(self, state: PeerState, now: float) -> Transition | None:
        if state is self.state:
            return None
        transition = Transition(self.peer, self.state, state, now)
        self.state = state
        self.changed_at = now
        return transition


Listener = Callable[[Transition], None]


class Membership:
    """Every peer's liveness, with listeners called on each transition.

    `clock()` returns seconds (trio.current_time in production and in the
    simulation). Listeners run synchronously, in registration order.
    """

    def __init__(self, peers: tuple[str, ...] | list[str], settings: LivenessSettings | None = None,
                 clock: Callable[[], float] = trio.current_time) -> None:
        self.settings = settings or LivenessSettings()
        self.clock = clock
        self.peers: dict[str, PeerLiveness] = {p: PeerLiveness(p, self.settings) for p in peers}
        self.listeners: list[Listener] = []
        self.transitions = 0

    def add(self, peer: str) -> None:
        """A node joined the cluster file: down until it is heard from."""
        if peer not in self.peers:
            self.peers[peer] = PeerLiveness(peer, self.settings)

    def remove(self, peer: str) -> None:
        """A node left the cluster file: forgotten (no transition is announced)."""
        self.peers.pop(peer, None)

    def configure(self, settings: LivenessSettings) -> None:
        """New timeouts (a reloaded cluster file), for every peer from now on."""
        self.settings = settings
        for live in self.peers.values():
            live.settings = settings

    def state(self, peer: str) -> PeerState:
        return self.peers[peer].state

    def is_up(self, peer: str) -> bool:
        return self.peers[peer].state is PeerState.UP

    def is_down(self, peer: str) -> bool:
        return self.peers[peer].state is PeerState.DOWN

    def up_peers(self) -> list[str]:
        return [p for p, live in self.peers.items() if live.state is PeerState.UP]

    def asked(self, peer: str) -> None:
        if peer in self.peers:
            self._emit(self.peers[peer].asked(self.clock()))

    def heard(self, peer: str) -> None:
        if peer in self.peers:
            self._emit(self.peers[peer].heard(self.clock()))

    def failed(self, peer: str) -> None:
        if peer in self.peers:
            self._emit(self.peers[peer].failed(self.clock()))

    def tick(self) -> None:
        now = self.clock()
        for live in list(self.peers.values()):
            self._emit(live.tick(now))

    def snapshot(self) -> dict[str, dict[str, float | str | None]]:
        """Each peer's state, time of the last answer and current silence (for status and metrics)."""
        now = self.clock()
        return {p: {"state": live.state.value, "last_heard": live.last_heard,
                    "silence": live.silence(now)} for p, live in self.peers.items()}

    def _emit(self, transition: Transition | None) -> None:
        if transition is None:
            return
        self.transitions += 1
        log.info("peer %s: %s -> %s", transition.peer, transition.old.value, transition.new.value)
        for listener in list(self.listeners):
            try:
                listener(transition)
            except Exception:
                log.exception("membership listener failed on %s", transition)


Ping = Callable[[str], Awaitable[object]]


async def run_heartbeats(membership: Membership, ping: Ping) -> None:
    """PING every peer every `heartbeat_interval`, forever; feeds `membership`.

    A peer that is up and was heard from within the last interval (any frame
    counts) is not asked: under traffic, heartbeats cost nothing.

    Each PING runs in its own task bounded by `ping_timeout`, so a slow peer
    does not delay the questions to the others, nor the next question to
    itself. A PING that raises Unavailable, OSError or a trio stream error marks
    a failure; one that times out only leaves the question unanswered.
    """
    async with trio.open_nursery() as nursery:
        while True:
            settings = membership.settings   # a reload may replace them
            now = membership.clock()
            for peer, live in list(membership.peers.items()):
                if live.state is PeerState.UP and live.last_heard is not None \
                        and now - live.last_heard < settings.heartbeat_interval:
                    continue   # heard from within the interval (a push, a sync...): no need to ask
                membership.asked(peer)
                nursery.start_soon(_one_ping, membership, ping, peer)
            membership.tick()
            await trio.sleep(settings.heartbeat_interval)


async def _one_ping(membership: Membership, ping: Ping, peer: str) -> None:
    with trio.move_on_after(membership.settings.ping_timeout):
        try:
            await ping(peer)
        except (Unavailable, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            membership.failed(peer)
            return
        membership.heard(peer)
