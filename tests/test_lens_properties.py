"""Property tests: the column fast path agrees with a slow reference over decoded records.

The reference below re-implements every lens rule of docs/query.md in plain
Python over decoded records (no columns, no kernels, no keys): candidates,
revisions, filters, decay, fixed-point sums, trust ranks, epoch chains.
Random stores use small domains so that ties, shared values, revisions,
superseded epochs and votes are common.
"""

from __future__ import annotations

import math
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import stemedb
from stemedb import Assertion, Epoch, Lifecycle, Ref, Vote
from stemedb import query as q
from stemedb.lenses import (
    Authority,
    Confidence,
    Consensus,
    EpochAware,
    Layered,
    Recency,
    Skeptic,
    VoteConsensus,
)

SIGNERS = [stemedb.Signer.from_seed(bytes([0x40 + i]) * 32) for i in range(3)]
SUBJECTS = ["s0", "s1"]
PREDICATES = ["p0", "p1"]
VALUES = ["a", "b", 1.0, True, Ref("a")]
T0 = 1_700_000_000_000_000
DAY_US = 86_400_000_000.0
SCALE = 2.0 ** 32
CAP = 65536.0
ESCALE = 2.0 ** 40
HALF_LIVES = [math.inf, 730.0, 730.0, 365.0, 180.0, 90.0, 30.0]
MULTIPLIERS = [1.0, 0.9, 0.85, 0.6, 0.5, 0.3, 0.1]
LENSES = [Recency(), Confidence(), Consensus(), VoteConsensus(), Authority(), Skeptic(),
          EpochAware(inner=Consensus()), EpochAware(), Layered()]


# ----------------------------------------------------------------- the store

@st.composite
def stores(draw):
    rng = random.Random(draw(st.integers(0, 2**32)))
    size = draw(st.integers(1, 24))
    epochs = []
    for i in range(rng.choice([0, 1, 2, 3, 3])):
        supersedes = [e.id for e in epochs if rng.random() < 0.5]
        if rng.random() < 0.2:
            supersedes.append(bytes([0xEE, i]) * 16)  # an epoch that was never stored
        epochs.append(Epoch(f"e{i}", supersedes=supersedes, timestamp=T0 + rng.randrange(8))
                      .sign(SIGNERS[0]))
    epoch_ids = [e.id for e in epochs] + [bytes([0xEE, 0]) * 16, bytes([0xDD]) * 32]
    assertions = []
    for _ in range(rng.randrange(max(1, size // 2), size + 1)):
        parent = None
        if assertions and rng.random() < 0.25:
            parent = rng.choice(assertions)
        subject = parent.subject if parent is not None and rng.random() < 0.8 else \
            rng.choice(SUBJECTS[:1] * 3 + SUBJECTS)
        predicate = parent.predicate if parent is not None and rng.random() < 0.8 else \
            rng.choice(PREDICATES[:1] * 3 + PREDICATES)
        confidence = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0, rng.random()])
        assertions.append(Assertion(
            subject, predicate, rng.choice(VALUES), confidence=confidence,
            timestamp=T0 + rng.randrange(8) * (DAY_US_INT if rng.random() < 0.3 else 1),
            source_class=rng.randrange(7), lifecycle=rng.randrange(5),
            parent_hash=parent.id if parent is not None else None,
            epoch=rng.choice(epoch_ids) if rng.random() < 0.5 else None,
        ).sign(rng.choice(SIGNERS)))
    votes = []
    for _ in range(rng.randrange(0, size)):
        target = rng.choice(assertions)
        votes.append(Vote(target, rng.choice([-1.0, 0.5, 1.0, 2.0]), timestamp=T0 + rng.randrange(8))
                     .sign(rng.choice(SIGNERS)))
    return epochs + assertions + votes


DAY_US_INT = 86_400_000_000


@st.composite
def filter_sets(draw):
    lifecycle = draw(st.sampled_from(["any", "any", "approved", "proposed", ["proposed", "rejected"]]))
    as_of = draw(st.none() | st.none() | st.integers(0, 8).map(lambda t: T0 + t))
    decay = draw(st.booleans())
    now = T0 + draw(st.integers(0, 400)) * DAY_US_INT if decay else None
    return {"lifecycle": lifecycle, "as_of": as_of, "decay": decay, "now": now}


def open_store(path, records):
    db = stemedb.open(path, durability="none")
    db.put_many(records)
    return db


# ------------------------------------------------------------- the reference

def object_identity(value):
    if isinstance(value, Ref):
        return ("ref", value.entity)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, float):
        return ("number", struct.pack("<d", value))
    if isinstance(value, bytes):
        return ("bytes", value)
    return ("text", value)


def units(weight):
    if not weight > 0.0:
        return 0
    return math.floor(min(weight, CAP) * SCALE + 0.5)


def entropy(values):
    total = sum(values)
    if total <= 0:
        return 0.0
    positive = [v for v in values if v > 0]
    if len(positive) <= 1:
        return 0.0
    accumulated = 0
    for v in positive:
        p = v / total
        accumulated += math.floor(-p * math.log(p) * ESCALE + 0.5)
    return min(max(accumulated / ESCALE / math.log(len(positive)), 0.0), 1.0)


def recency_key(a):
    return (a.timestamp, bytes(255 - b for b in a.id))


STAGES = {"any": set(Lifecycle), "approved": {Lifecycle.APPROVED}, "proposed": {Lifecycle.PROPOSED}}


class Reference:
    def __init__(self, records):
        self.assertions = [r for r in records if isinstance(r, Assertion)]
        self.votes = [r for r in records if isinstance(r, Vote)]
        self.epochs = [r for r in records if isinstance(r, Epoch)]
        self.trust = self._trust()

    # -- candidates

    def visible(self, subject, predicate, as_of):
        pair = [a for a in self.assertions if a.subject == subject and a.predicate == predicate
                and (as_of is None or a.timestamp <= as_of)]
        revised = {a.parent_hash for a in pair if a.parent_hash is not None}
        return [a for a in pair if a.id not in revised]

    def candidates(self, subject, predicate, f):
        stages = set()
        spec = f["lifecycle"]
        for stage in spec if isinstance(spec, list) else [spec]:
            stages |= STAGES.get(stage) or {Lifecycle[stage.upper()]}
        return [a for a in self.visible(subject, predicate, f["as_of"]) if a.lifecycle in stages]

    # -- weights

    @staticmethod
    def effective(a, f):
        value = a.confidence
        if f["decay"]:
            half_life = HALF_LIVES[int(a.source_class)]
            if 0.0 < half_life < math.inf:
                age = f["now"] - float(a.timestamp)
                if age > 0.0:
                    value *= 0.5 ** (age / DAY_US / half_life)
        return value

    def net_votes(self, a, f):
        latest = {}
        for v in self.votes:
            if v.assertion_id != a.id or (f["as_of"] is not None and v.timestamp > f["as_of"]):
                continue
            agent = v.signers[0]
            if agent not in latest or recency_key(v) > recency_key(latest[agent]):
                latest[agent] = v
        total = 0
        for v in latest.values():
            w = max(-CAP, min(CAP, v.weight))
            u = math.floor(abs(w) * SCALE + 0.5)
            total += u if w > 0 else -u
        return total / SCALE if total > 0 else 0.0

    def _trust(self):
        marks = {}
        pairs = {(a.subject, a.predicate) for a in self.assertions}
        default = {"lifecycle": "any", "as_of": None, "decay": False, "now": None}
        for subject, predicate in pairs:
            cand = self.candidates(subject, predicate, default)
            latest = {}
            for a in cand:
                agent = a.signers[0][:8]
                if agent not in latest or recency_key(a) > recency_key(latest[agent]):
                    latest[agent] = a
            if len(latest) < 2:
                continue
            winner, _, _ = self.group_pick(cand, [a.confidence for a in cand])
            for agent, a in latest.items():
                good = object_identity(a.object) == object_identity(winner.object)
                agree, disagree = marks.get(agent, (0, 0))
                marks[agent] = (agree + good, disagree + (not good))
        return {agent: min(max(0.5 + 0.05 * agree - 0.1 * disagree, 0.0), 1.0)
                for agent, (agree, disagree) in marks.items()}

    # -- rules

    @staticmethod
    def claims(cand, weights):
        groups = {}
        for a, w in zip(cand, weights):
            g = groups.setdefault(object_identity(a.object), {"units": 0, "count": 0, "latest": a})
            g["units"] += units(w)
            g["count"] += 1
            if recency_key(a) > recency_key(g["latest"]):
                g["latest"] = a
        return sorted(groups.values(), key=lambda g: (g["units"], recency_key(g["latest"])), reverse=True)

    def conflict(self, cand, weights):
        groups = self.claims(cand, weights)
        values = [g["units"] for g in groups]
        if sum(values) <= 0:
            values = [g["count"] for g in groups]
        return entropy(values)

    def group_pick(self, cand, weights):
        groups = self.claims(cand, weights)
        total = sum(g["units"] for g in groups)
        best = groups[0]
        return best["latest"], (best["units"] / total if total > 0 else 0.0), groups

    def superseded(self, key, as_of):
        visible = [e for e in self.epochs if as_of is None or e.timestamp <= as_of]

        def superseders(epoch_id):
            return [e for e in visible if epoch_id in e.supersedes]

        direct = superseders(key)
        if not direct:
            return False
        reached, stack = {}, list(direct)
        while stack:
            e = stack.pop()
            if e.id in reached:
                continue
            reached[e.id] = e
            following = superseders(e.id)
            if not following:
                return True
            stack.extend(following)
        if key not in reached:
            return True
        return max(reached.values(), key=recency_key).id != key

    def resolve(self, lens, cand, f):
        """(winner or None, confidence, conflict score, candidates count)."""
        if isinstance(lens, EpochAware):
            cand = [a for a in cand if a.epoch is None or not self.superseded(a.epoch, f["as_of"])]
            return self.resolve(lens.inner, cand, f)
        if isinstance(lens, Layered):
            if not cand:
                return None, 0.0, 0.0, 0
            top = min(int(a.source_class) for a in cand)
            winner, confidence, _, _ = self.resolve(lens.inner, [a for a in cand
                                                                 if int(a.source_class) == top], f)
            weights = [self.lens_weight(lens.inner, a, f) for a in cand]
            return winner, confidence, self.conflict(cand, weights), len(cand)
        if not cand:
            return None, 0.0, 0.0, 0
        weights = [self.lens_weight(lens, a, f) for a in cand]
        conflict = self.conflict(cand, weights)
        if isinstance(lens, (Consensus, VoteConsensus, Skeptic)):
            winner, share, _ = self.group_pick(cand, weights)
            return winner, share, conflict, len(cand)
        if isinstance(lens, Recency):
            i = max(range(len(cand)), key=lambda i: recency_key(cand[i]))
        else:
            i = max(range(len(cand)), key=lambda i: (weights[i], recency_key(cand[i])))
        return cand[i], min(max(weights[i], 0.0), 1.0), conflict, len(cand)

    def lens_weight(self, lens, a, f):
        if isinstance(lens, VoteConsensus):
            return self.net_votes(a, f)
        if isinstance(lens, Authority):
            return self.effective(a, f) * MULTIPLIERS[int(a.source_class)] * \
                self.trust.get(a.signers[0][:8], 0.5)
        return self.effective(a, f)


def summary(r):
    return (r.winner.id if r.winner is not None else None, r.confidence, r.conflict_score,
            r.candidates_count)


# ------------------------------------------------------------------ the tests

@settings(max_examples=60)
@given(records=stores(), filters=filter_sets())
def test_fast_path_agrees_with_the_reference(tmp_path_factory, records, filters):
    db = open_store(tmp_path_factory.mktemp("db") / "db", records)
    reference = Reference(records)
    try:
        for subject in SUBJECTS:
            for predicate in PREDICATES:
                cand = reference.candidates(subject, predicate, filters)
                for lens in LENSES:
                    got = q.query(db, subject, predicate, lens=lens, **filters)
                    winner, confidence, conflict, count = reference.resolve(lens, cand, filters)
                    where = f"{lens.describe()} {subject}/{predicate} {filters}"
                    assert got.candidates_count == count, where
                    assert (got.winner.id if got.winner else None) == \
                        (winner.id if winner else None), where
                    assert got.confidence == pytest.approx(confidence, abs=1e-12), where
                    assert got.conflict_score == pytest.approx(conflict, abs=1e-12), where
                    assert 0.0 <= got.confidence <= 1.0 and 0.0 <= got.conflict_score <= 1.0
                    if isinstance(lens, Skeptic) and winner is not None:
                        shares = [c.share for c in got.analysis.claims]
                        assert sum(shares) == pytest.approx(1.0)
                        assert shares == sorted(shares, reverse=True)
    finally:
        db.close()


@settings(max_examples=40)
@given(records=stores(), filters=filter_sets(), seed=st.integers(0, 2**32))
def test_every_lens_is_independent_of_insertion_order(tmp_path_factory, records, filters, seed):
    shuffled = list(records)
    random.Random(seed).shuffle(shuffled)
    one = open_store(tmp_path_factory.mktemp("one") / "db", records)
    two = open_store(tmp_path_factory.mktemp("two") / "db", shuffled)
    try:
        for subject in SUBJECTS:
            for predicate in PREDICATES:
                for lens in LENSES:
                    a = q.query(one, subject, predicate, lens=lens, **filters)
                    b = q.query(two, subject, predicate, lens=lens, **filters)
                    again = q.query(one, subject, predicate, lens=lens, **filters)
                    assert summary(a) == summary(b) == summary(again), lens.describe()
                    assert sorted(a.contributions) == sorted(b.contributions)
        assert q.conflicts(one) == q.conflicts(two)
        assert q.trust_ranks(one) == q.trust_ranks(two)
    finally:
        one.close()
        two.close()


@settings(max_examples=40)
@given(records=stores(), filters=filter_sets(), seed=st.integers(0, 2**32))
def test_lenses_do_not_depend_on_candidate_order(tmp_path_factory, records, filters, seed):
    """Feed each lens its candidates in a shuffled order: same answer."""
    import numpy as np

    from stemedb.lenses._state import state_of
    from stemedb.lenses.base import Candidates, Filters

    db = open_store(tmp_path_factory.mktemp("db") / "db", records)
    try:
        context = q._context(db, state_of(db), Filters.make(**filters))
        for subject in SUBJECTS:
            for predicate in PREDICATES:
                cand = q._pair_candidates(context, subject, predicate)
                shuffled = cand.copy()
                np.random.default_rng(seed).shuffle(shuffled)
                for lens in LENSES:
                    a = lens.resolve(Candidates(context, cand))
                    b = lens.resolve(Candidates(context, shuffled))
                    assert a.winner_row == b.winner_row, lens.describe()
                    assert a.confidence == b.confidence
                    assert (a.conflict_score is None and b.conflict_score is None) or \
                        a.conflict_score == b.conflict_score
    finally:
        db.close()


@settings(max_examples=40)
@given(records=stores())
def test_bulk_paths_agree_with_single_queries(tmp_path_factory, records):
    db = open_store(tmp_path_factory.mktemp("db") / "db", records)
    reference = Reference(records)
    default = {"lifecycle": "any", "as_of": None, "decay": False, "now": None}
    try:
        expected = {}
        for subject in SUBJECTS:
            for predicate in PREDICATES:
                cand = reference.candidates(subject, predicate, default)
                _, _, score, _ = reference.resolve(Consensus(), cand, default)
                if score > 0:
                    expected[(subject, predicate)] = score
        got = {(c.subject, c.predicate): c.conflict_score for c in q.conflicts(db)}
        assert got == pytest.approx(expected, abs=1e-12)
        assert sorted(got.values(), reverse=True) == [c.conflict_score for c in q.conflicts(db)]
        for lens in (Recency(), Confidence(), Consensus(), Authority(), Skeptic(), Layered()):
            singles = {(s, p): summary(q.query(db, s, p, lens=lens))
                       for s in SUBJECTS for p in PREDICATES}
            q.materialize(db, lens)
            served = {(s, p): summary(q.query(db, s, p, lens=lens)) for s in SUBJECTS for p in PREDICATES}
            assert served == singles, lens.describe()
            pairs = [(s, p) for s in SUBJECTS for p in PREDICATES]
            assert [summary(r) for r in q.query_many(db, pairs, lens=lens)] == [singles[x] for x in pairs]
    finally:
        db.close()
