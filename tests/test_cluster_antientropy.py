"""Anti-entropy sessions between two real stores, and the scheduler that starts them.

Sessions run over the SYNC messages encoded and decoded as on the wire;
after a session both stores hold the union of every shared scope (and
nothing of the scopes they do not share); an idle round is one small
message each way; duplicated steps are answered from the cache; a peer that
sends a forged record is refused and the session ends with nothing forged
stored. The scheduler runs under trio's MockClock.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import trio
import trio.testing
from faults import NoSyncFiles
from sim.forgery import forge

import stemedb
from stemedb import _codec
from stemedb.errors import ProtocolError
from stemedb.replication import framing
from stemedb.replication.antientropy import (
    FRAME_RECORDS,
    AntiEntropy,
    Mover,
    Responder,
    probe_message,
    run_inline,
    run_session,
)
from stemedb.replication.cluster import ClusterFile
from stemedb.replication.framing import RecordBatch, SyncRequest
from stemedb.replication.placement import GLOBAL, Placement, scope_of
from stemedb.replication.reconcile import ALL_SKIP, GLOBAL_PARTITION, decode_message
from stemedb.replication.store import EngineStore

SIGNERS = [stemedb.Signer.from_seed(bytes([0x31 + i]) * 32) for i in range(2)]


def cluster_file(nodes=("n1", "n2", "n3"), factor=2, partitions=16) -> ClusterFile:
    lines = ['name = "t"', "version = 1", f"replication_factor = {factor}", f"partitions = {partitions}"]
    for i, node in enumerate(nodes):
        lines += ["[[nodes]]", f'id = "{node}"', f'address = "h:{i + 1}"']
    return ClusterFile.parse("\n".join(lines) + "\n")


PLACEMENT = Placement(cluster_file())


class Pair:
    """Two nodes' stores (n1 initiates, n2 answers), connected by an in-memory exchange."""

    def __init__(self, tmp_path, placement=PLACEMENT, responder_store=EngineStore):
        self.placement = placement
        self.dbs = [stemedb.open(tmp_path / n, files=NoSyncFiles(), segment_size=1 << 20)
                    for n in ("n1", "n2")]
        self.stores = [EngineStore(self.dbs[0], placement), responder_store(self.dbs[1], placement)]
        self.responder = Responder("n2", placement, Mover(self.stores[1], run_inline))
        self.requests: list[SyncRequest] = []
        self.answers: list[framing.SyncAnswer] = []
        self.duplicate = False
        self.stale: list[str] = []

    async def exchange(self, peer, request):
        assert peer == "n2"
        wire = framing.encode_sync_request(request)
        if self.duplicate and len(self.requests) >= 2:   # a late copy of an older step arrives first
            old = framing.encode_sync_request(self.requests[-2])
            with pytest.raises(ProtocolError, match="answered already") as caught:
                await self.responder.handle("n1", framing.decode_sync_request(old))
            self.stale.append(str(caught.value))
        self.requests.append(framing.decode_sync_request(wire))
        answer = await self.responder.handle("n1", framing.decode_sync_request(wire))
        if self.duplicate:   # the network delivered the request twice; the second answer wins
            answer = await self.responder.handle("n1", framing.decode_sync_request(wire))
        back = framing.decode_sync_answer(framing.encode_sync_answer(answer))
        self.answers.append(back)
        return back

    def session(self, seed=1, scopes=None):
        scopes = scopes or [GLOBAL_PARTITION] + [scope_of(p) for p in
                                                 self.placement.shared_partitions("n1", "n2")]
        rng = random.Random(seed)

        async def main():
            return await run_session("n2", scopes, self.exchange, Mover(self.stores[0], run_inline),
                                     session=rng.getrandbits(64), salt=rng.randbytes(8))
        self.requests, self.answers = [], []
        return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))

    def shared_ids(self, index):
        scopes = [GLOBAL_PARTITION] + [scope_of(p) for p in self.placement.shared_partitions("n1", "n2")]
        return {scope: self.stores[index].ids_of_scope(scope) for scope in scopes}

    def close(self):
        for db in self.dbs:
            db.close()


def write(db, subjects, *, start=0, signer=SIGNERS[0], envelope=True):
    claims = [stemedb.Assertion(s, "p", i, timestamp=5_000 + start + i) for i, s in enumerate(subjects)]
    if envelope:
        members, env = signer.sign_batch(claims, timestamp=4_000 + start)
        db.put_many(members, envelope=env)
        return [env, *members]
    signed = [c.sign(signer) for c in claims]
    db.put_many(signed)
    return signed


def subjects_in(placement, partitions, n, tag="s"):
    """n subjects whose partitions are in `partitions` (round robin)."""
    out, i = [], 0
    wanted = list(partitions)
    while len(out) < n:
        subject = f"{tag}-{i}"
        if placement.subject_partition(subject) == wanted[len(out) % len(wanted)]:
            out.append(subject)
        i += 1
    return out


def test_an_idle_round_is_one_small_message_each_way(tmp_path):
    pair = Pair(tmp_path)
    shared = PLACEMENT.shared_partitions("n1", "n2")
    records = write(pair.dbs[0], subjects_in(PLACEMENT, shared, 40))
    pair.dbs[1].put_many(records[1:], envelope=records[0])
    result = pair.session()
    assert result.ok and result.round_trips == 1 and result.moved == 0
    scopes = 1 + len(shared)
    # Per scope: the scope and length varints, the range head (2 bytes) and a 16-byte fingerprint.
    assert result.bytes_sent == 1 + scopes * 20
    assert result.bytes_received == 1 + scopes * 4           # ALL_SKIP for every scope
    assert all(ranges == ALL_SKIP for _, ranges in decode_message(pair.answers[0].message))
    assert pair.requests[0].flags == framing.SYNC_START | framing.SYNC_END
    assert pair.answers[0].flags == framing.SYNC_DONE
    assert pair.responder.sessions == {}
    pair.close()


def test_a_session_reaches_the_union_of_every_shared_scope_and_nothing_else(tmp_path):
    pair = Pair(tmp_path)
    shared = PLACEMENT.shared_partitions("n1", "n2")
    not_shared = [p for p in range(16) if p not in shared]
    common = write(pair.dbs[0], subjects_in(PLACEMENT, shared, 200, "c"))
    pair.dbs[1].put_many(common[1:], envelope=common[0])
    write(pair.dbs[0], subjects_in(PLACEMENT, shared, 25, "a"), start=1000)
    write(pair.dbs[1], subjects_in(PLACEMENT, shared, 30, "b"), start=2000, signer=SIGNERS[1],
          envelope=False)
    only_a_elsewhere = write(pair.dbs[0], subjects_in(PLACEMENT, not_shared, 10, "x"), start=3000)
    pair.dbs[1].put(stemedb.Vote(common[1].id, 1.0, timestamp=9).sign(SIGNERS[1]))   # version 1: global
    result = pair.session()
    assert result.ok, result.error
    a, b = pair.shared_ids(0), pair.shared_ids(1)
    assert a == b
    assert len(a[GLOBAL_PARTITION]) == 4      # three envelopes of n1's batches... and one vote
    assert result.records_received == 31 and result.records_sent == 25 + 1 + 1
    for record in only_a_elsewhere[1:]:      # not shared: stays where it is
        assert record.id not in pair.dbs[1]
    assert pair.session(seed=2).round_trips == 1
    for scope in a:
        assert pair.stores[0].fingerprint(scope) == pair.stores[1].fingerprint(scope)
    pair.close()


def test_an_empty_replica_is_filled_over_several_frames(tmp_path):
    single = Placement(cluster_file(("n1", "n2"), factor=2, partitions=4))
    pair = Pair(tmp_path, placement=single)
    total = 0
    for chunk in range(6):
        total += len(write(pair.dbs[0], [f"s{i % 97}" for i in range(1000)], start=chunk * 1000))
    result = pair.session()
    assert result.ok and result.records_sent == total == 6006
    frames_with_records = [r for r in pair.requests if len(r.records)]
    assert len(frames_with_records) == -(-total // FRAME_RECORDS)
    assert len(pair.dbs[1]) == total
    assert pair.requests[0].records.size == 0          # the probe carries no records
    pair.close()


def test_frames_are_bounded_by_record_bytes(tmp_path, monkeypatch):
    from stemedb.replication import antientropy

    monkeypatch.setattr(antientropy, "FRAME_BYTES", 20_000)
    single = Placement(cluster_file(("n1", "n2"), factor=2, partitions=4))
    pair = Pair(tmp_path, placement=single)
    records = write(pair.dbs[0], [f"s{i % 13}" for i in range(600)])
    sizes = [len(r.encode()) for r in records]
    result = pair.session()
    assert result.ok and len(pair.dbs[1]) == len(records)
    carried = [r.records for r in pair.requests if len(r.records)]
    assert all(batch.size <= 20_000 for batch in carried)
    assert len(carried) >= sum(sizes) // 20_000 + 1
    pair.close()


def test_duplicated_steps_are_answered_from_the_cache(tmp_path):
    pair = Pair(tmp_path)
    shared = PLACEMENT.shared_partitions("n1", "n2")
    common = write(pair.dbs[0], subjects_in(PLACEMENT, shared, 2000, "c"))
    pair.dbs[1].put_many(common[1:], envelope=common[0])
    write(pair.dbs[0], subjects_in(PLACEMENT, shared, 3, "a"), start=5000)
    write(pair.dbs[1], subjects_in(PLACEMENT, shared, 2, "b"), start=6000)
    pair.duplicate = True
    answered_before = pair.responder.answered
    result = pair.session()
    assert result.ok and pair.shared_ids(0) == pair.shared_ids(1)
    assert pair.responder.answered - answered_before == result.round_trips   # each step processed once
    assert result.round_trips >= 3 and len(pair.stale) == result.round_trips - 2
    pair.close()


def test_the_responder_refuses_steps_out_of_order_unknown_sessions_and_unshared_scopes(tmp_path):
    pair = Pair(tmp_path)
    empty = RecordBatch.empty()
    shared = PLACEMENT.shared_partitions("n1", "n2")
    foreign = next(p for p in range(16) if p not in shared)

    async def main():
        with pytest.raises(ProtocolError, match="no open session 9 with n1"):
            await pair.responder.handle("n1", SyncRequest(9, 3, 0, b"", empty))
        with pytest.raises(ProtocolError, match=f"scope {scope_of(foreign)} is not one n1 may reconcile with n2"):
            await pair.responder.handle("n1", SyncRequest(1, 0, framing.SYNC_START, b"", empty,
                                                          bytes(8), (scope_of(foreign),)))
        with pair.stores[0].lock:
            probe = probe_message(pair.stores[0], [GLOBAL_PARTITION], bytes(8))
        start = SyncRequest(2, 0, framing.SYNC_START, probe, empty, bytes(8), (GLOBAL_PARTITION,))
        answer = await pair.responder.handle("n1", start)
        assert answer.flags == framing.SYNC_DONE       # both empty: done, but END not seen yet
        with pytest.raises(ProtocolError, match="step 5 of session 2, expected 1"):
            await pair.responder.handle("n1", SyncRequest(2, 5, 0, b"", empty))
        assert (("n1", 2) not in pair.responder.sessions)
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    pair.close()


class ForgingStore(EngineStore):
    """A compromised peer's store: what it sends has one record swapped for a forgery."""

    kind = "bad_signature"
    forged: set[bytes] = set()

    def read_rows(self, rows):
        batch = super().read_rows(rows)
        records = _codec.decode_many(batch.blob, batch.offsets)
        index = next(i for i, r in enumerate(records) if isinstance(r, stemedb.Assertion))
        data, sent_as, true_id = forge(records[index], self.kind, random.Random(len(rows)))
        ForgingStore.forged.add(true_id)
        middle = RecordBatch(data, np.array([0, len(data)]), np.frombuffer(sent_as, np.uint8).reshape(1, 32))
        return framing.concat([batch.select(np.arange(index)), middle,
                               batch.select(np.arange(index + 1, len(batch)))])


@pytest.mark.parametrize("kind", ["bad_signature", "wrong_id", "orphan_member"])
def test_a_peer_answering_with_a_forged_record_is_refused_and_named(tmp_path, kind, caplog):
    ForgingStore.kind = kind
    ForgingStore.forged = set()
    pair = Pair(tmp_path, responder_store=ForgingStore)
    shared = PLACEMENT.shared_partitions("n1", "n2")
    write(pair.dbs[1], subjects_in(PLACEMENT, shared, 12), envelope=kind == "orphan_member")
    before = len(pair.dbs[0])
    result = pair.session()
    assert result.error is not None and result.error.startswith("forged record")
    assert "the peer sent a forged record" in caplog.text and "with n2" in caplog.text
    assert ForgingStore.forged and not any(i in pair.dbs[0] for i in ForgingStore.forged)
    if kind == "orphan_member":
        # The honest records around the held-back orphan verified and were kept; the orphan was not.
        assert {r.id for r in pair.dbs[0].scan()} <= {r.id for r in pair.dbs[1].scan()}
    else:
        assert len(pair.dbs[0]) == before          # the whole batch with the forgery was refused
    pair.close()


def test_the_scheduler_pairs_rounds_and_triggers(tmp_path):
    placement = Placement(cluster_file(("n1", "n2", "n3")))
    sessions: list[tuple[float, str]] = []

    async def exchange(peer, request):
        sessions.append((trio.current_time(), peer))
        return framing.SyncAnswer(request.step, framing.SYNC_DONE, b"", RecordBatch.empty())

    db = stemedb.open(tmp_path / "n1", files=NoSyncFiles(), segment_size=1 << 20)
    store = EngineStore(db, placement)
    live = {"n2": True, "n3": False}
    scheduler = AntiEntropy("n1", placement, Mover(store, run_inline), exchange, interval=10.0,
                            jitter=0.2, rng=random.Random(5), is_live=lambda p: live[p])
    assert scheduler.peers() == ["n2", "n3"]
    assert AntiEntropy("n3", placement, scheduler.mover, exchange).peers() == []   # n3 never starts
    assert scheduler.scopes_with("n2") == [GLOBAL_PARTITION] + [
        scope_of(p) for p in placement.shared_partitions("n1", "n2")]

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(scheduler.run)
            await trio.sleep(35.0)
            live["n3"] = True
            scheduler.trigger("n3")
            await trio.sleep(0.001)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    with_n2 = [t for t, p in sessions if p == "n2"]
    gaps = np.diff([0.0] + with_n2)
    assert len(with_n2) == 3 and all(8.0 <= g <= 12.0 for g in gaps), with_n2
    assert [p for _, p in sessions].count("n3") == 1 and sessions[-1] == (35.0, "n3")
    assert scheduler.stats.rounds == 4 and scheduler.last["n3"].ok
    db.close()


def test_probe_is_one_whole_range_fingerprint_per_scope(tmp_path):
    db = stemedb.open(tmp_path / "a", files=NoSyncFiles(), segment_size=1 << 20)
    store = EngineStore(db, PLACEMENT)
    write(db, ["p1", "p2"])
    with store.lock:
        message = probe_message(store, [GLOBAL_PARTITION, scope_of(3)], b"\x07" * 8)
        tree, timestamps, ids = store.items(GLOBAL_PARTITION)
        whole = tree.fingerprint((0, b""), None, timestamps, ids, b"\x07" * 8)
    blocks = decode_message(message)
    assert [scope for scope, _ in blocks] == [GLOBAL_PARTITION, scope_of(3)]
    assert blocks[0][1] == b"\x00\x80" + whole and len(blocks[1][1]) == 18
    assert GLOBAL != GLOBAL_PARTITION
    db.close()


def test_members_that_arrive_before_their_envelope_are_stored_and_counted(tmp_path):
    """A client's envelope is signed after its members, so it sorts after them: members reach an
    empty replica frames before their envelope, are held, stored when it comes, and counted.
    (Between cluster nodes the global partition, envelopes included, goes first; a whole-store
    session — `stemedb sync` — sends in key order.)"""
    from stemedb.replication.reconcile import WHOLE_STORE
    from stemedb.replication.sync import standalone_placement

    pair = Pair(tmp_path, placement=standalone_placement())
    pair.responder.allowed = lambda peer, start: {WHOLE_STORE}
    claims = [stemedb.Assertion(f"s{i % 97}", "p", i, timestamp=5_000 + i) for i in range(FRAME_RECORDS + 500)]
    members, envelope = SIGNERS[0].sign_batch(claims, timestamp=20_000_000)
    pair.dbs[1].put_many(members, envelope=envelope)
    result = pair.session(scopes=[WHOLE_STORE])
    assert result.ok and result.records_received == len(members) + 1
    assert result.records_stored == len(members) + 1 == len(pair.dbs[0])
    pair.close()
