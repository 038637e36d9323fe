"""Liveness: up → suspect → down from unanswered questions, up again when heard from.

The state machine is fed explicit times; the heartbeat driver runs under
trio's MockClock, with PINGs that answer, hang or fail, and the transition
times are checked against the times the questions were recorded to go out.
"""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from stemedb.errors import Unavailable
from stemedb.replication.membership import (
    LivenessSettings,
    Membership,
    PeerLiveness,
    PeerState,
    run_heartbeats,
)

UP, SUSPECT, DOWN = PeerState.UP, PeerState.SUSPECT, PeerState.DOWN


def test_a_peer_is_down_until_heard_from_then_up():
    peer = PeerLiveness("b", LivenessSettings())
    assert peer.state is DOWN
    assert peer.asked(0.0) is None and peer.tick(100.0) is None     # never heard: stays down
    transition = peer.heard(100.5)
    assert (transition.old, transition.new, transition.at) == (DOWN, UP, 100.5)


def test_silence_counts_from_the_first_unanswered_question():
    peer = PeerLiveness("b", LivenessSettings(suspect_after=2.0, down_after=6.0))
    peer.heard(0.0)
    assert peer.asked(10.0) is None          # ten quiet seconds nobody asked about: not judged
    assert peer.asked(10.5) is None and peer.silence(11.0) == 1.0
    assert peer.tick(11.999) is None
    assert peer.tick(12.0).new is SUSPECT
    assert peer.asked(14.0) is None          # a later question does not restart the count
    assert peer.tick(15.999) is None
    transition = peer.tick(16.0)
    assert (transition.old, transition.new, transition.at) == (SUSPECT, DOWN, 16.0)
    assert peer.tick(99.0) is None
    assert peer.heard(99.5).new is UP and peer.silence(100.0) == 0.0


def test_a_failed_connection_makes_an_up_peer_suspect_at_once():
    peer = PeerLiveness("b", LivenessSettings(suspect_after=2.0, down_after=6.0))
    peer.heard(0.0)
    assert peer.failed(1.0).new is SUSPECT
    assert peer.tick(6.9) is None
    assert peer.tick(7.0).new is DOWN         # down_after counted from the failure
    assert peer.failed(8.0) is None           # already down


def test_settings_are_checked():
    with pytest.raises(ValueError, match="heartbeat_interval < suspect_after < down_after"):
        LivenessSettings(heartbeat_interval=0.5, suspect_after=6.0, down_after=2.0)
    with pytest.raises(ValueError, match="ping_timeout 0 must be positive"):
        LivenessSettings(ping_timeout=0)


def test_listeners_see_every_transition_in_order_and_one_failing_does_not_stop_others(caplog):
    now = [0.0]
    membership = Membership(["b", "c"], LivenessSettings(), clock=lambda: now[0])
    seen = []

    def broken(transition):
        raise RuntimeError("listener bug")

    membership.listeners += [broken, seen.append]
    with caplog.at_level(logging.ERROR, logger="stemedb.replication"):
        membership.heard("b")
        now[0] = 1.0
        membership.asked("b")
        now[0] = 3.0
        membership.tick()
        membership.heard("c")
    assert [(t.peer, t.old, t.new, t.at) for t in seen] == [
        ("b", DOWN, UP, 0.0), ("b", UP, SUSPECT, 3.0), ("c", DOWN, UP, 3.0)]
    assert caplog.text.count("membership listener failed") == 3
    assert membership.up_peers() == ["c"] and membership.is_down("b") is False
    assert membership.snapshot()["b"] == {"state": "suspect", "last_heard": 0.0, "silence": 2.0}
    membership.heard("not-a-peer")            # frames from unknown ids are ignored
    assert membership.transitions == 3


async def drive(ping, seconds, peers=("a", "b", "c")):
    membership = Membership(list(peers), LivenessSettings())
    transitions = []
    membership.listeners.append(transitions.append)
    with trio.move_on_after(seconds):
        await run_heartbeats(membership, ping)
    return membership, transitions


def test_heartbeats_under_a_mock_clock():
    asked: dict[str, list[float]] = {"a": [], "b": [], "c": []}

    async def ping(peer):
        now = trio.current_time()
        asked[peer].append(now)
        if peer == "c":
            raise Unavailable("connection refused")
        if peer == "b" and now >= 3.0:
            await trio.sleep_forever()       # b stops answering at t = 3

    async def main():
        return await drive(ping, 12.0)

    membership, transitions = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert membership.state("a") is UP and membership.state("c") is DOWN
    assert membership.state("b") is DOWN
    b = [(t.new, t.at) for t in transitions if t.peer == "b"]
    first_unanswered = min(t for t in asked["b"] if t >= 3.0)
    assert first_unanswered == 3.0
    # Down by when the tick after the deadline runs; suspect likewise (ticks every 0.5 s).
    assert b[0] == (UP, 0.0)
    assert b[1][0] is SUSPECT and first_unanswered + 2.0 <= b[1][1] < first_unanswered + 2.5
    assert b[2][0] is DOWN and first_unanswered + 6.0 <= b[2][1] < first_unanswered + 6.5
    assert [t.new for t in transitions if t.peer == "c"] == []   # never heard: never up
    # Every peer is asked every 0.5 s; b's hanging PINGs do not delay its later questions.
    assert asked["b"][:8] == [0.5 * i for i in range(8)]
    assert asked["a"][-1] == 11.5


def test_a_peer_heard_from_recently_is_not_pinged():
    pinged: list[float] = []

    async def ping(peer):
        pinged.append(trio.current_time())

    async def main():
        membership = Membership(["a"], LivenessSettings(heartbeat_interval=1.0, suspect_after=2.0,
                                                        down_after=3.0))

        async def traffic():
            while True:               # a push or sync frame from a every 0.25 s
                membership.heard("a")
                await trio.sleep(0.25)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(traffic)
            await trio.sleep(0.1)
            with trio.move_on_after(5.0):
                await run_heartbeats(membership, ping)
            nursery.cancel_scope.cancel()
        return membership

    membership = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert membership.state("a") is UP
    assert pinged == []
