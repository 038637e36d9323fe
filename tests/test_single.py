"""The one-call query (stemedb._single) answers as the general path does, field for field.

`db.query(s, p)` with a Recency, Confidence or Consensus lens and no filter
runs stemedb._single; any other query, a store with a materialised view and
a winner whose fields are not the pair asked for (a key collision) run the
general path. Random stores (ties on times and confidences, revisions,
lifecycles, epochs, votes, several batches) are asked every pair both ways.
"""

from __future__ import annotations

import random
import threading

import pytest

import stemedb
from stemedb import Assertion, Lifecycle, SourceClass, Vote, _codec
from stemedb import query as q
from stemedb.lenses import get_lens
from stemedb.lenses._state import state_of
from stemedb.lenses.base import DEFAULT_FILTERS

T0 = 1_700_000_000_000_000
SIGNERS = [stemedb.Signer.from_seed(bytes([i + 1]) * 32) for i in range(4)]
SUBJECTS = ["aspirin", "ibuprofen", "paracetamol"]
PREDICATES = ["treats", "causes", "interacts_with"]
LENSES = ["recency", "confidence", "consensus"]


def random_store(db, seed: int) -> None:
    rng = random.Random(seed)
    epoch = stemedb.Epoch("e1", "first", timestamp=T0).sign(SIGNERS[0])
    db.put_many([epoch])
    made: list[Assertion] = []
    for _batch in range(rng.randint(1, 4)):
        records = []
        for _ in range(rng.randint(1, 25)):
            if made and rng.random() < 0.15:     # a revision (some change the lifecycle)
                parent = rng.choice(made)
                record = parent.revise(lifecycle=rng.choice(list(Lifecycle)),
                                       confidence=rng.choice((0.0, 0.5, 1.0)),
                                       timestamp=T0 + rng.randint(0, 5))
            else:
                record = Assertion(
                    rng.choice(SUBJECTS), rng.choice(PREDICATES), rng.choice(["a", "b", "c", 1.5, True]),
                    confidence=rng.choice((0.0, 0.25, 0.5, 0.5, 1.0, rng.random())),
                    timestamp=T0 + rng.randint(0, 5), source_class=rng.choice(list(SourceClass)),
                    lifecycle=rng.choice(list(Lifecycle)),
                    epoch=epoch.id if rng.random() < 0.2 else None)
            record = record.sign(rng.choice(SIGNERS))
            made.append(record)
            records.append(record)
            if rng.random() < 0.2:
                records.append(Vote(record.id, rng.choice((1.0, -1.0)), timestamp=T0 + 9).sign(SIGNERS[1]))
        db.put_many(records)


def general(db, subject: str, predicate: str, lens: str):
    """The general path's answer (what query() ran for every query before stemedb._single)."""
    context = q._context(db, state_of(db), DEFAULT_FILTERS)
    return q._resolve_pair(context, get_lens(lens), subject, predicate)


def same_answer(fast, slow) -> None:
    assert type(fast) is type(slow)
    assert fast.to_dict() == slow.to_dict()
    assert fast.winner == slow.winner and fast.contributions == slow.contributions
    assert repr(fast.confidence) == repr(slow.confidence)            # bit for bit
    assert repr(fast.conflict_score) == repr(slow.conflict_score)
    assert fast.filters is slow.filters is DEFAULT_FILTERS and fast.analysis is None


@pytest.fixture
def db(tmp_path):
    with stemedb.open(tmp_path / "db", durability="none") as database:
        yield database


@pytest.fixture
def no_general_path(monkeypatch):
    """Fail any query that reaches the general path's pair resolution."""
    monkeypatch.setattr(q, "_compute_pair", _refuse)


@pytest.mark.parametrize("seed", range(40))
def test_every_pair_answers_as_the_general_path(tmp_path, seed, monkeypatch):
    with stemedb.open(tmp_path / "db", durability="none") as db:
        random_store(db, seed)
        real = q._compute_pair
        for lens in LENSES:
            for subject in SUBJECTS:
                for predicate in PREDICATES + ["never_used"]:
                    monkeypatch.setattr(q, "_compute_pair", _refuse)
                    fast = db.query(subject, predicate, lens=lens)
                    monkeypatch.setattr(q, "_compute_pair", real)
                    same_answer(fast, general(db, subject, predicate, lens))


def _refuse(*args, **kwargs):
    raise AssertionError("the general path ran")


def test_an_empty_store_and_an_empty_pair(db, no_general_path):
    r = db.query("aspirin", "treats")
    assert r.winner is None and r.candidates_count == 0 and r.contributions == []
    assert r.confidence == 0.0 and r.conflict_score == 0.0 and r.lens == "recency"
    db.put_many([Assertion("aspirin", "treats", "x", timestamp=T0).sign(SIGNERS[0])])
    assert db.query("aspirin", "causes").winner is None
    assert db.query("aspirin", "treats").value == "x"   # the write before is seen


def test_writes_after_a_query_are_seen_and_old_answers_keep_their_snapshot(db, no_general_path):
    first = Assertion("aspirin", "treats", "x", timestamp=T0, confidence=0.5).sign(SIGNERS[0])
    db.put_many([first])
    before = db.query("aspirin", "treats", lens="consensus")
    for i in range(3000):   # past the query index's linear-scan window: the tail is rebuilt
        db.put_many([Assertion("aspirin", "treats", "y", timestamp=T0 + i + 1,
                               confidence=0.5).sign(SIGNERS[i % 4])])
    after = db.query("aspirin", "treats", lens="consensus")
    assert after.value == "y" and after.candidates_count == 3001
    # the earlier answer's contributions come from its own snapshot, built when first read
    assert [c.assertion_id for c in before.contributions] == [first.id]


def test_which_queries_take_which_path(db, monkeypatch):
    db.put_many([Assertion("aspirin", "treats", "x", timestamp=T0).sign(SIGNERS[0])])
    calls = []
    real = q._compute_pair

    def counting(*args, **kwargs):
        calls.append(args[1].name)
        return real(*args, **kwargs)

    monkeypatch.setattr(q, "_compute_pair", counting)
    one_call = [{}, {"lens": "consensus"}, {"lens": "Recency"}, {"lens": stemedb.lenses.Confidence()},
                {"lifecycle": "any"}]
    general_path = [{"lens": "skeptic"}, {"lifecycle": "approved"}, {"lifecycle": ["proposed"]},
                    {"as_of": T0 + 10}, {"decay": True}, {"now": T0}, {"epoch": bytes(32)},
                    {"audit": True, "agent": "dr-house"}]
    for kwargs in one_call + general_path:
        before = len(calls)
        answer = db.query("aspirin", "treats", **kwargs)
        assert len(calls) - before == (kwargs in general_path), kwargs
        if kwargs in one_call:
            assert answer.value == "x"
    assert isinstance(db.query("aspirin"), dict)     # the whole subject: the general path


def test_a_materialised_view_answers_through_the_general_path(db):
    db.put_many([Assertion("aspirin", "treats", "x", timestamp=T0).sign(SIGNERS[0])])
    q.materialize(db, "recency")
    state = state_of(db)
    assert q._single_query(state).answer(db, state, "aspirin", "treats", 0, "recency") is None
    assert db.query("aspirin", "treats").value == "x"


def test_a_key_collision_falls_back_to_the_confirmed_general_path(db, monkeypatch):
    """ibuprofen's keys made equal to aspirin's: the one-call query decodes aspirin's claim as
    the winner, sees that it is not the pair asked for and answers None; the general path
    confirms the candidates on their fields and finds none of them is ibuprofen's."""
    claim = Assertion("aspirin", "treats", "x", timestamp=T0).sign(SIGNERS[0])
    db.put_many([claim])
    real_pair, real_subject = _codec.pair_key, _codec.subject_key
    monkeypatch.setattr(_codec, "pair_key", lambda s, p: real_pair("aspirin", p))
    monkeypatch.setattr(_codec, "subject_key", lambda s: real_subject("aspirin"))
    monkeypatch.setattr(q, "_KEYS", {})
    state = state_of(db)
    assert q._single_query(state).answer(db, state, "ibuprofen", "treats", 0, "recency") is None
    r = db.query("ibuprofen", "treats")
    assert r.winner is None and r.candidates_count == 0
    assert db.query("aspirin", "treats").winner == claim


def test_queries_beside_a_writer_see_whole_batches(db):
    """Readers on three threads while a writer grows the pair (and the columns) batch by batch:
    every answer counts a whole number of batches and names the newest claim of them."""
    batch = 40
    stop = threading.Event()
    errors: list[BaseException] = []

    def read() -> None:
        try:
            while not stop.is_set():
                r = db.query("aspirin", "treats")
                n = r.candidates_count
                assert n % batch == 0, n
                if n:
                    assert r.winner.timestamp == T0 + n - 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for thread in readers:
        thread.start()
    try:
        for k in range(60):
            db.put_many([Assertion("aspirin", "treats", f"v{k}", timestamp=T0 + k * batch + i)
                         .sign(SIGNERS[i % 4]) for i in range(batch)])
    finally:
        stop.set()
        for thread in readers:
            thread.join()
    assert not errors, errors[0]
    assert db.query("aspirin", "treats").candidates_count == 60 * batch


def test_db_query_is_the_compiled_front_and_keeps_the_methods_contract(db):
    from stemedb import _single
    assert isinstance(db.query, _single.QueryFront)
    db.put_many([Assertion("aspirin", "treats", "x", timestamp=T0).sign(SIGNERS[0])])
    with pytest.raises(ValueError, match="lens: 'no-such-lens', expected one of"):
        db.query("aspirin", "treats", lens="no-such-lens")
    with pytest.raises(ValueError, match="subject: expected a non-empty str"):
        db.query("", "treats")
    with pytest.raises(ValueError, match="predicate: expected a non-empty str"):
        db.query("aspirin", 7)
    with pytest.raises(TypeError):
        db.query("aspirin", "treats", "recency")          # lens is keyword-only, as before
    assert db.query("aspirin", predicate="treats").value == "x"
    assert db.query(subject="aspirin", predicate="treats", lens="recency").value == "x"


def test_a_lens_name_registered_again_is_seen_by_the_front(db):
    from stemedb import lenses
    db.put_many([Assertion("aspirin", "treats", "x", timestamp=T0, confidence=0.5).sign(SIGNERS[0]),
                 Assertion("aspirin", "treats", "y", timestamp=T0 + 1, confidence=0.25).sign(SIGNERS[1])])
    assert db.query("aspirin", "treats", lens="recency").value == "y"
    lenses.register("recency", lenses.Confidence)      # the name now means another lens
    try:
        r = db.query("aspirin", "treats", lens="recency")
        assert r.value == "x" and r.lens == "confidence"
    finally:
        lenses.register("recency", lenses.Recency)
    assert db.query("aspirin", "treats", lens="recency").value == "y"
