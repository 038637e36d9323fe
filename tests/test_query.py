"""Query engine and lenses on hand-built scenarios: exact winners, confidences and scores."""

from __future__ import annotations

import json
import math
import os
import threading
import time

import numpy as np
import pytest

import stemedb
from stemedb import Assertion, Epoch, Lifecycle, Ref, SourceClass, Vote
from stemedb import query as q
from stemedb.lenses import (
    AGREED,
    CONTESTED,
    UNANIMOUS,
    Authority,
    Candidates,
    Confidence,
    Consensus,
    Constraints,
    EpochAware,
    Layered,
    Lens,
    Outcome,
    Recency,
    Skeptic,
    VoteConsensus,
    get_lens,
)

ALICE = stemedb.Signer.from_seed(b"\x11" * 32)
BOB = stemedb.Signer.from_seed(b"\x12" * 32)
CAROL = stemedb.Signer.from_seed(b"\x13" * 32)
DAY_US = 86_400_000_000
T0 = 1_700_000_000_000_000


def entropy(*weights: float) -> float:
    total = sum(weights)
    shares = [w / total for w in weights if w > 0]
    if len(shares) <= 1:
        return 0.0
    return -sum(p * math.log(p) for p in shares) / math.log(len(shares))


def claim(value, *, subject="aspirin", predicate="treats", signer=ALICE, t=0, c=1.0,
          source=SourceClass.OBSERVATIONAL, lifecycle=Lifecycle.PROPOSED, **fields) -> Assertion:
    return Assertion(subject, predicate, value, confidence=c, timestamp=T0 + t, source_class=source,
                     lifecycle=lifecycle, **fields).sign(signer)


@pytest.fixture
def db(tmp_path):
    with stemedb.open(tmp_path / "db", durability="none") as database:
        yield database


def put(db, *records):
    return db.put_many(list(records))


# ------------------------------------------------------------------ Recency

def test_recency_latest_wins_and_equal_times_fall_to_the_lowest_id(db):
    old, new = claim("headache", t=1, c=0.5), claim("fever", t=2, c=0.25)
    put(db, old, new)
    r = q.query(db, "aspirin", "treats", lens="recency")
    assert r.winner == new and r.value == "fever"
    assert r.confidence == 0.25 and r.candidates_count == 2
    assert r.conflict_score == pytest.approx(entropy(0.5, 0.25), abs=1e-9)
    tied = [claim(f"v{i}", t=5, signer=s) for i, s in enumerate((ALICE, BOB, CAROL))]
    put(db, *tied)
    assert q.query(db, "aspirin", "treats").winner.id == min(a.id for a in tied)


def test_no_candidates(db):
    r = q.query(db, "nothing", "here")
    assert r.winner is None and r.value is None and r.candidates_count == 0
    assert r.confidence == 0.0 and r.conflict_score == 0.0 and r.contributions == []
    assert q.query(db, "nothing") == {}


# --------------------------------------------------------------- Confidence

def test_confidence_highest_wins_ties_to_latest_then_id(db):
    put(db, claim("a", t=1, c=0.5), claim("b", t=2, c=0.75), claim("c", t=3, c=0.25))
    r = q.query(db, "aspirin", "treats", lens="confidence")
    assert r.value == "b" and r.confidence == 0.75
    put(db, claim("d", t=4, c=0.75))
    assert q.query(db, "aspirin", "treats", lens=Confidence()).value == "d"
    twins = [claim(v, t=9, c=0.875, signer=s) for v, s in (("x", ALICE), ("y", BOB))]
    put(db, *twins)
    assert q.query(db, "aspirin", "treats", lens="confidence").winner.id == min(a.id for a in twins)


# ---------------------------------------------------------------- Consensus

def test_consensus_sums_claims_and_reports_the_share(db):
    put(db, claim("headache", t=1, c=0.5), claim("headache", t=2, c=0.25, signer=BOB),
        claim("fever", t=3, c=0.5, signer=CAROL))
    r = q.query(db, "aspirin", "treats", lens="consensus")
    assert r.value == "headache"
    assert r.winner.timestamp == T0 + 2  # the claim's most recent assertion
    assert r.confidence == pytest.approx(0.75 / 1.25)
    assert r.conflict_score == pytest.approx(entropy(0.75, 0.5), abs=1e-9)
    supporters = [c for c in r.contributions if c.supports]
    assert sorted(c.weight for c in supporters) == [0.25, 0.5]
    assert [c.weight for c in r.contributions] == [0.5, 0.5, 0.25]  # heaviest first


def test_consensus_tie_goes_to_the_claim_holding_the_latest_assertion(db):
    put(db, claim("a", t=1, c=0.5), claim("b", t=2, c=0.25), claim("b", t=3, c=0.25, signer=BOB))
    r = q.query(db, "aspirin", "treats", lens="consensus")
    assert r.value == "b" and r.confidence == 0.5 and r.conflict_score == pytest.approx(1.0)


def test_consensus_groups_by_typed_value(db):
    # 1.0 and True and "1" and Ref("1") are four different claims
    put(db, claim(1.0, t=1), claim(True, t=2), claim("1", t=3), claim(Ref("1"), t=4),
        claim(1, t=5, signer=BOB))
    r = q.query(db, "aspirin", "treats", lens="skeptic")
    assert r.value == 1.0 and len(r.analysis.claims) == 4
    assert r.analysis.claims[0].assertions == 2


# ----------------------------------------------------------- VoteConsensus

def test_vote_consensus_counts_each_agents_latest_vote(db):
    a, b = claim("a", t=1), claim("b", t=2, signer=BOB)
    put(db, a, b)
    votes = [
        Vote(a, 1.0, timestamp=T0 + 10).sign(ALICE),
        Vote(a, -1.0, timestamp=T0 + 20).sign(ALICE),   # Alice changed her mind: -1 counts
        Vote(a, 0.5, timestamp=T0 + 11).sign(BOB),
        Vote(b, 0.25, timestamp=T0 + 12).sign(CAROL),
    ]
    put(db, *votes)
    r = q.query(db, "aspirin", "treats", lens="vote_consensus")
    # a: -1 + 0.5 = -0.5 -> floored at 0; b: 0.25
    assert r.value == "b" and r.confidence == 1.0
    # before Alice's change of mind, a had 1.5
    earlier = q.query(db, "aspirin", "treats", lens=VoteConsensus(), as_of=T0 + 15)
    assert earlier.value == "a" and earlier.confidence == pytest.approx(1.5 / 1.75)


def test_vote_consensus_without_votes_falls_back_to_the_latest_claim(db):
    put(db, claim("a", t=1), claim("b", t=2))
    r = q.query(db, "aspirin", "treats", lens="vote_consensus")
    assert r.value == "b" and r.confidence == 0.0


# ---------------------------------------------------------------- Authority

def test_a_regulatory_claim_beats_a_hundred_anecdotal_ones(db):
    regulator = stemedb.Signer.from_seed(b"\x21" * 32)
    crowd = [stemedb.Signer.from_seed(bytes([0x30, i]) * 16) for i in range(100)]
    official = claim("safe", c=0.5, source=SourceClass.REGULATORY, signer=regulator, t=1)
    anecdotes = [claim("unsafe", c=1.0, source=SourceClass.ANECDOTAL, signer=s, t=2 + i)
                 for i, s in enumerate(crowd)]
    put(db, official, *anecdotes)
    assert q.query(db, "aspirin", "treats", lens="consensus").value == "unsafe"
    r = q.query(db, "aspirin", "treats", lens="authority")
    assert r.winner == official
    # the regulator disagrees with the pair's Consensus winner: trust 0.5 - 0.1 = 0.4
    assert r.confidence == pytest.approx(0.5 * 1.0 * 0.4)
    ranks = q.trust_ranks(db)
    assert ranks[regulator.public_key[:8].hex()] == pytest.approx(0.4)
    assert ranks[crowd[0].public_key[:8].hex()] == pytest.approx(0.55)
    weights = {c.assertion_id: c.weight for c in r.contributions}
    assert weights[anecdotes[0].id] == pytest.approx(1.0 * 0.1 * 0.55)


def test_authority_multipliers_and_trust_can_be_changed(db):
    put(db, claim("a", c=1.0, source=SourceClass.EXPERT, t=1),
        claim("b", c=1.0, source=SourceClass.CLINICAL, t=2))
    assert q.query(db, "aspirin", "treats", lens="authority").value == "b"
    lens = Authority(multipliers={"expert": 1.0}, trust=False)
    r = q.query(db, "aspirin", "treats", lens=lens)
    assert r.value == "a" and r.confidence == 1.0
    assert lens.describe() == "authority(multipliers={'expert': 1.0}, trust=False)"
    with pytest.raises(ValueError, match="multipliers"):
        Authority(multipliers={"expert": -1})
    with pytest.raises(KeyError):
        Authority(multipliers={"guru": 1})


def test_trust_rank_accumulates_and_clamps(db):
    # Alice agrees with the consensus on 12 pairs: 0.5 + 12 x 0.05 = 1.1 -> clamped to 1.0.
    # Bob disagrees on all 12: 0.5 - 1.2 -> clamped to 0.0.
    records = []
    for i in range(12):
        records += [claim("yes", predicate=f"p{i}", c=1.0, t=i),
                    claim("yes", predicate=f"p{i}", c=1.0, t=i, signer=CAROL),
                    claim("no", predicate=f"p{i}", c=0.5, t=i, signer=BOB)]
    put(db, *records)
    ranks = q.trust_ranks(db)
    assert ranks[ALICE.public_key[:8].hex()] == 1.0
    assert ranks[BOB.public_key[:8].hex()] == 0.0
    # only the agent's latest claim in a pair counts
    put(db, claim("no", predicate="p0", c=0.01, t=100))
    assert q.trust_ranks(db)[ALICE.public_key[:8].hex()] == pytest.approx(0.5 + 11 * 0.05 - 0.1)


# ------------------------------------------------------------------ Skeptic

def test_two_opposing_equal_weight_clinical_claims_are_contested(db):
    put(db, claim("effective", c=0.9, source=SourceClass.CLINICAL, t=1),
        claim("ineffective", c=0.9, source=SourceClass.CLINICAL, t=2, signer=BOB))
    r = q.query(db, "aspirin", "treats", lens="skeptic")
    analysis = r.analysis
    assert analysis.status == CONTESTED == "Contested"
    assert analysis.conflict_score >= 0.88 and analysis.conflict_score == pytest.approx(1.0)
    assert r.conflict_score == analysis.conflict_score
    assert [c.share for c in analysis.claims] == [0.5, 0.5]
    assert analysis.claims[0].value == "ineffective"  # equal weight: the more recent claim first


def test_skeptic_statuses(db):
    put(db, claim("x", c=0.9, predicate="one", t=1), claim("x", c=0.1, predicate="one", t=2, signer=BOB))
    one = q.query(db, "aspirin", "one", lens="skeptic").analysis
    assert one.status == UNANIMOUS and one.conflict_score == 0.0 and len(one.claims) == 1
    put(db, claim("x", c=0.9, predicate="two", t=1), claim("y", c=0.1, predicate="two", t=2))
    two = q.query(db, "aspirin", "two", lens="skeptic").analysis
    assert two.status == AGREED
    assert two.conflict_score == pytest.approx(entropy(0.9, 0.1), abs=1e-6)
    assert [c.value for c in two.claims] == ["x", "y"]
    assert two.claims[0].share == pytest.approx(0.9, abs=1e-7)
    put(db, claim("x", c=0.75, predicate="three", t=1), claim("y", c=0.25, predicate="three", t=2))
    three = q.query(db, "aspirin", "three", lens="skeptic").analysis
    assert three.status == CONTESTED and three.conflict_score == pytest.approx(0.811278, abs=1e-6)
    assert q.query(db, "aspirin", "none", lens="skeptic").analysis.status == UNANIMOUS


# --------------------------------------------------------------- EpochAware

def put_epochs(db, *epochs):
    signed = [e.sign(ALICE) for e in epochs]
    db.put_many(signed)
    return signed


def test_epoch_aware_drops_a_superseded_epoch(db):
    (e1,) = put_epochs(db, Epoch("guideline-2020", timestamp=T0))
    (e2,) = put_epochs(db, Epoch("guideline-2024", supersedes=[e1], timestamp=T0 + 20))
    stale = claim("400mg", t=9, epoch=e1.id)       # the latest, but in a superseded epoch
    current = claim("300mg", t=3, epoch=e2.id, signer=BOB)
    loose = claim("350mg", t=1, signer=CAROL)        # no epoch: always kept
    put(db, stale, current, loose)
    assert q.query(db, "aspirin", "treats").winner == stale
    r = q.query(db, "aspirin", "treats", lens="epoch_aware")
    assert r.winner == current and r.candidates_count == 2
    assert r.analysis.dropped == 1 and r.analysis.superseded_epochs == [e1.id[:8].hex()]
    # before the new guideline was written, nothing was superseded
    early = q.query(db, "aspirin", "treats", lens=EpochAware(), as_of=T0 + 19)
    assert early.winner == stale and early.analysis.dropped == 0
    inner = q.query(db, "aspirin", "treats", lens=EpochAware(inner=Consensus()))
    assert inner.lens == "epoch_aware(inner=consensus)" and inner.candidates_count == 2


def test_epoch_supersession_follows_chains_and_tolerates_cycles(db):
    e1, e2 = put_epochs(db, Epoch("a", timestamp=T0), Epoch("b", timestamp=T0 + 1))
    (e3,) = put_epochs(db, Epoch("c", supersedes=[e2], timestamp=T0 + 2))
    (e4,) = put_epochs(db, Epoch("d", supersedes=[e3], timestamp=T0 + 3))
    missing = bytes(range(32))                    # an epoch that was never stored
    records = {name: claim(name, t=i, epoch=e.id if e else None, subject=name)
               for i, (name, e) in enumerate([("e1", e1), ("e2", e2), ("e3", e3), ("e4", e4)])}
    records["missing"] = claim("m", subject="missing", epoch=missing)
    put(db, *records.values())
    kept = {name: q.query(db, name, "treats", lens="epoch_aware").winner is not None for name in records}
    assert kept == {"e1": True, "e2": False, "e3": False, "e4": True, "missing": True}
    # a missing epoch that a stored epoch supersedes is dropped
    (e5,) = put_epochs(db, Epoch("e", supersedes=[missing], timestamp=T0 + 5))
    assert q.query(db, "missing", "treats", lens="epoch_aware").winner is None


def test_epoch_cycle_keeps_only_the_latest(db, monkeypatch):
    """A supersession cycle: the latest epoch of the loop survives.

    Content addressing makes real cycles impossible (each ID would have to
    contain the other), but 8-byte keys can collide and bytes can be forged:
    the links are hand-made here.
    """
    e1, e2 = put_epochs(db, Epoch("one", timestamp=T0 + 1), Epoch("two", timestamp=T0 + 2))
    rows = {e.id: int(db.view.lookup(np.frombuffer(e.id, dtype=np.uint8).reshape(1, 32))[0])
            for e in (e1, e2)}
    links = {int.from_bytes(e1.id[:8], "little"): [rows[e2.id]],
             int.from_bytes(e2.id[:8], "little"): [rows[e1.id]]}
    from stemedb.lenses._state import QueryState
    monkeypatch.setattr(QueryState, "superseders", lambda self, context, key: links.get(int(key), []))
    put(db, claim("old", t=1, epoch=e1.id), claim("new", t=0, epoch=e2.id, signer=BOB))
    r = q.query(db, "aspirin", "treats", lens="epoch_aware")
    assert r.value == "new" and r.analysis.dropped == 1


# ------------------------------------------------------------------ Layered

def test_layered_highest_tier_decides_and_every_tier_is_reported(db):
    put(db, claim("safe", c=0.5, source=SourceClass.REGULATORY, t=1),
        claim("risky", c=0.5, source=SourceClass.PEER_REVIEWED, t=2),
        claim("safe", c=0.5, source=SourceClass.PEER_REVIEWED, t=3, signer=BOB),
        *[claim("dangerous", c=1.0, source=SourceClass.ANECDOTAL, t=10 + i, signer=s)
          for i, s in enumerate((ALICE, BOB, CAROL))])
    r = q.query(db, "aspirin", "treats", lens="layered")
    assert r.value == "safe" and r.confidence == 1.0
    tiers = r.analysis.tiers
    assert [t.source_class for t in tiers] == [SourceClass.REGULATORY, SourceClass.PEER_REVIEWED,
                                               SourceClass.ANECDOTAL]
    assert r.analysis.deciding == SourceClass.REGULATORY
    assert tiers[1].conflict_score == pytest.approx(1.0) and tiers[1].candidates_count == 2
    assert tiers[2].winner.object == "dangerous" and tiers[2].conflict_score == 0.0
    # overall conflict: safe 1.0 vs risky 0.5 vs dangerous 3.0
    assert r.conflict_score == pytest.approx(entropy(1.0, 0.5, 3.0), abs=1e-6)
    assert q.query(db, "aspirin", "treats", lens=Layered(inner=Recency())).value == "safe"


# -------------------------------------------------------------- Constraints

def test_constraints_lists_rules_and_contradictions(db):
    ctx = "ward-7"
    put(db, claim("gloves", subject=ctx, predicate="must_use", t=1),
        claim("mask", subject=ctx, predicate="must_use", t=2, c=0.5),
        claim("mask", subject=ctx, predicate="forbidden", t=3, signer=BOB),
        claim("latex", subject=ctx, predicate="forbidden", t=4),
        claim("latex", subject=ctx, predicate="forbidden", t=5, signer=CAROL),
        claim("blue", subject=ctx, predicate="colour", t=6))
    r = q.query(db, ctx, lens="constraints")
    assert r.winner is None and r.candidates_count == 5
    a = r.analysis
    assert [rule.value for rule in a.must_use] == ["gloves", "mask"]
    assert [rule.value for rule in a.forbidden] == ["latex", "mask"]
    assert len(a.forbidden[0].assertion_ids) == 2
    assert a.conflicts == ["mask"]
    assert r.conflict_score == pytest.approx(1 / 3) and r.confidence == pytest.approx(2 / 3)
    only = q.query(db, ctx, "forbidden", lens=Constraints())
    assert only.analysis.must_use == [] and only.candidates_count == 3
    with pytest.raises(ValueError, match="constraints lens reads"):
        q.query(db, ctx, "colour", lens="constraints")


# ------------------------------------------------------------------ filters

def test_time_travel_returns_the_earlier_answer(db):
    put(db, claim("v1", t=10), claim("v2", t=20, signer=BOB))
    assert q.query(db, "aspirin", "treats").value == "v2"
    assert q.query(db, "aspirin", "treats", as_of=T0 + 19).value == "v1"
    assert q.query(db, "aspirin", "treats", as_of=T0 + 20).value == "v2"   # inclusive
    assert q.query(db, "aspirin", "treats", as_of=T0 + 9).winner is None


def test_lifecycle_filter_follows_revisions(db):
    proposed = claim("x", t=1)
    approved = proposed.revise(lifecycle="approved", timestamp=T0 + 2).sign(BOB)
    other = claim("y", t=3, lifecycle=Lifecycle.UNDER_REVIEW, signer=CAROL)
    put(db, proposed, approved, other)
    # the proposed version is replaced by its revision: it is no longer a candidate
    r = q.query(db, "aspirin", "treats", lens="consensus")
    assert r.candidates_count == 2 and {c.assertion_id for c in r.contributions} == {approved.id, other.id}
    assert q.query(db, "aspirin", "treats", lifecycle="approved").winner == approved
    assert q.query(db, "aspirin", "treats", lifecycle=Lifecycle.UNDER_REVIEW).winner == other
    assert q.query(db, "aspirin", "treats", lifecycle=["approved", "under_review"]).winner == other
    assert q.query(db, "aspirin", "treats", lifecycle="proposed").winner is None
    deprecated = approved.revise(lifecycle="deprecated", timestamp=T0 + 4).sign(BOB)
    put(db, deprecated)
    assert q.query(db, "aspirin", "treats", lifecycle="approved").winner is None
    # time travel sees the claim as it stood
    assert q.query(db, "aspirin", "treats", lifecycle="approved", as_of=T0 + 3).winner == approved
    assert q.query(db, "aspirin", "treats", lifecycle="proposed", as_of=T0 + 1).winner == proposed
    with pytest.raises(ValueError, match="lifecycle: 'final', expected one of any, proposed"):
        q.query(db, "aspirin", "treats", lifecycle="final")
    # in a list only stages count: "any" there is named as the mistake, not offered as a choice
    with pytest.raises(ValueError, match="'any' in a list; pass lifecycle='any' alone") as listed:
        q.query(db, "aspirin", "treats", lifecycle=["any", "approved"])
    assert "stages only (proposed" in str(listed.value)
    with pytest.raises(ValueError, match=r"lifecycle: 'final' in the list, expected stages only: proposed") as bad:
        q.query(db, "aspirin", "treats", lifecycle=["approved", "final"])
    assert "any" not in str(bad.value)


def test_epoch_filter(db):
    (e1,) = put_epochs(db, Epoch("e1", timestamp=T0))
    put(db, claim("in", t=1, epoch=e1.id), claim("out", t=2))
    assert q.query(db, "aspirin", "treats", epoch=e1).value == "in"
    assert q.query(db, "aspirin", "treats", epoch=e1.id).value == "in"
    assert q.query(db, "aspirin", "treats", epoch=e1.id.hex()).value == "in"
    assert q.query(db, "aspirin", "treats", epoch=bytes(32)).winner is None


def test_decay_by_source_class_half_life(db):
    now = T0 + 60 * DAY_US
    fresh = claim("fresh", c=0.5, source=SourceClass.ANECDOTAL, t=60 * DAY_US)
    old = claim("old", c=1.0, source=SourceClass.ANECDOTAL, t=0, signer=BOB)           # 2 half-lives
    law = claim("law", c=0.25, source=SourceClass.REGULATORY, t=0, signer=CAROL)        # never decays
    put(db, fresh, old, law)
    r = q.query(db, "aspirin", "treats", lens="consensus", decay=True, now=now)
    weights = {c.assertion_id: c.weight for c in r.contributions}
    assert weights[fresh.id] == 0.5
    assert weights[old.id] == pytest.approx(0.25)
    assert weights[law.id] == 0.25
    assert r.value == "fresh" and r.confidence == pytest.approx(0.5)
    assert q.query(db, "aspirin", "treats", lens="consensus").value == "old"
    clinical = claim("c", c=1.0, source=SourceClass.CLINICAL, t=0, predicate="p")
    put(db, clinical)
    r = q.query(db, "aspirin", "p", lens="confidence", decay=True, now=T0 + 730 * DAY_US)
    assert r.confidence == pytest.approx(0.5)
    # the future does not grow confidence
    assert q.query(db, "aspirin", "p", lens="confidence", decay=True, now=T0 - DAY_US).confidence == 1.0


def test_bad_arguments(db):
    with pytest.raises(ValueError, match="subject"):
        q.query(db, "", "p")
    with pytest.raises(ValueError, match="predicate"):
        q.query(db, "s", "")
    with pytest.raises(ValueError, match="lens"):
        q.query(db, "s", "p", lens="oracle")
    with pytest.raises(TypeError, match="lens"):
        q.query(db, "s", "p", lens=42)
    with pytest.raises(ValueError, match="as_of"):
        q.query(db, "s", "p", as_of=-1)
    with pytest.raises(ValueError, match="epoch"):
        q.query(db, "s", "p", epoch=b"short")
    db.close()
    with pytest.raises(stemedb.StemeError, match="closed"):
        q.query(db, "s", "p")


# -------------------------------------------------------- whole-subject view

def test_query_without_predicate_resolves_every_predicate(db):
    put(db, claim("fever", t=1), claim("headache", t=2, signer=BOB),
        claim("oral", predicate="route", t=3), claim("x", subject="other", t=4))
    result = q.query(db, "aspirin", lens="consensus")
    assert list(result) == ["route", "treats"]
    assert result["treats"].value == "headache" and result["route"].value == "oral"
    assert q.query(db, "aspirin", as_of=T0 + 1)["treats"].value == "fever"
    assert "route" not in q.query(db, "aspirin", as_of=T0 + 2)


# ------------------------------------------------------------- custom lens

class Shortest(Lens):
    """The shortest text wins (ties: lowest ID)."""

    name = "shortest"
    reads = frozenset()

    def resolve(self, candidates: Candidates) -> Outcome:
        if not len(candidates):
            return candidates.outcome(None, 0.0, np.zeros(0))
        records = candidates.records()
        best = min(range(len(records)), key=lambda i: (len(str(records[i].object)), records[i].id))
        weights = np.array([1.0 / len(str(r.object)) for r in records])
        return candidates.outcome(best, 1.0, weights)


def test_custom_lens(db):
    put(db, claim("headache", t=1), claim("flu", t=2), claim("fever", t=3))
    r = q.query(db, "aspirin", "treats", lens=Shortest())
    assert r.value == "flu" and r.confidence == 1.0 and r.lens == "shortest"
    assert 0.0 < r.conflict_score <= 1.0
    from stemedb.lenses import register
    register("shortest", Shortest)
    assert q.query(db, "aspirin", "treats", lens="shortest").value == "flu"
    view = q.materialize(db, "shortest")
    assert len(view) == 1 and q.query(db, "aspirin", "treats", lens="shortest").value == "flu"


def test_lens_names_and_equality():
    assert get_lens("vote-consensus") == VoteConsensus()
    assert get_lens("EpochAware") == EpochAware(inner=Recency())
    assert EpochAware(inner=Consensus()) != EpochAware()
    assert Skeptic(weighting="votes").describe() == "skeptic(weighting='votes')"
    with pytest.raises(ValueError, match="weighting"):
        Skeptic(weighting="vibes")
    assert isinstance(get_lens(Layered), Layered)


# ---------------------------------------------------------- contributions

def test_contributions_carry_id_weight_lifecycle_and_source(db):
    evidence = bytes([7]) * 32
    a = claim("x", t=1, c=0.5, source_hash=evidence, lifecycle=Lifecycle.APPROVED)
    b = claim("y", t=2, c=0.25, signer=BOB)
    put(db, a, b)
    r = q.query(db, "aspirin", "treats", lens="confidence")
    first, second = r.contributions
    assert first == q.Contribution(a.id, 0.5, Lifecycle.APPROVED, evidence, True)
    assert second.assertion_id == b.id and second.supports is False
    out = r.to_dict()
    assert out["winner"]["id"] == a.id.hex() and out["contributions"][0]["source_hash"] == evidence.hex()
    json.dumps(out)


def test_a_key_collision_is_confirmed_on_the_records(db, monkeypatch):
    put(db, claim("a", t=1), claim("b", t=2, signer=BOB))
    calls = []
    real = q._matches

    def first_call_mismatches(record, subject, predicate, filters):
        calls.append(record.id)
        return False if len(calls) == 1 else real(record, subject, predicate, filters)

    monkeypatch.setattr(q, "_matches", first_call_mismatches)
    # as_of: the general path (the one-call path's collision test is in tests/test_single.py)
    r = q.query(db, "aspirin", "treats", as_of=T0 + 10)
    assert r.value == "b" and len(calls) == 1  # the confirmed rerun is trusted


# ------------------------------------------------------- conflicts dashboard

def test_conflicts_lists_contested_pairs_first(db):
    put(db, claim("a", predicate="even", t=1), claim("b", predicate="even", t=2, signer=BOB),
        claim("a", predicate="skewed", t=1, c=0.75), claim("b", predicate="skewed", t=2, c=0.25),
        claim("a", predicate="calm", t=1), claim("a", predicate="calm", t=2, signer=BOB),
        claim("x", subject="z", predicate="even", t=3), claim("y", subject="z", predicate="even", t=4))
    found = q.conflicts(db)
    pairs = [(c.subject, c.predicate) for c in found]
    assert sorted(pairs[:2]) == [("aspirin", "even"), ("z", "even")]   # equal scores: by pair key
    assert pairs[2:] == [("aspirin", "skewed")]
    assert found[0].conflict_score == pytest.approx(1.0) and found[0].claims_count == 2
    assert found[-1].conflict_score == pytest.approx(0.811278, abs=1e-6)
    assert len(q.conflicts(db, top=1)) == 1
    assert [c.predicate for c in q.conflicts(db, min_score=0.9)] == ["even", "even"]
    assert q.conflicts(db, as_of=T0 + 1) == []
    assert found[0].to_dict()["claims_count"] == 2


# ---------------------------------------------------------- materialised views

def test_materialized_view_serves_and_is_invalidated_per_pair(db):
    put(db, claim("a", t=1), claim("a", t=2, signer=BOB), claim("b", t=3, signer=CAROL),
        claim("x", predicate="other", t=1))
    view = q.materialize(db, "consensus")
    assert len(view) == 2 and view.dirty_pairs == 0
    r = q.query(db, "aspirin", "treats", lens="consensus")
    assert r.value == "a" and r.confidence == pytest.approx(2 / 3) and r.candidates_count == 3
    assert r.analysis is None and len(r.contributions) == 3  # computed on demand
    put(db, claim("b", t=4, signer=BOB), claim("b", t=5, signer=ALICE))
    assert view.dirty_pairs == 1
    r = q.query(db, "aspirin", "treats", lens="consensus")
    assert r.value == "b" and r.candidates_count == 5
    assert view.dirty_pairs == 0   # refreshed by that query
    assert q.query(db, "aspirin", "treats", lens="consensus").value == "b"
    assert q.query(db, "aspirin", "other", lens="consensus").value == "x"
    # filters bypass the view
    assert q.query(db, "aspirin", "treats", lens="consensus", as_of=T0 + 3).value == "a"


def test_materialized_view_of_authority_goes_stale_on_any_assertion(db):
    put(db, claim("a", t=1), claim("b", t=2, signer=BOB))
    view = q.materialize(db, Authority())
    assert not view.stale
    put(db, claim("c", predicate="elsewhere", t=3))
    assert view.stale
    assert q.query(db, "aspirin", "treats", lens="authority").value == \
        q.query(db, "aspirin", "treats", lens=Authority(multipliers={"observational": 0.6})).value
    view.refresh(db)
    assert not view.stale
    for lens in ("recency", "confidence", "skeptic", "layered", "vote_consensus", "epoch_aware"):
        built = q.materialize(db, lens)
        assert len(built) == 2
        assert q.query(db, "aspirin", "treats", lens=lens).winner == \
            q.query(db, "aspirin", "treats", lens=lens, lifecycle=list(Lifecycle)).winner


# -------------------------------------------------------------------- audit

def test_audit_records_who_what_and_why(db):
    a, b = claim("a", t=1, c=0.5), claim("b", t=2, c=0.25, signer=BOB)
    put(db, a, b)
    q.query(db, "aspirin", "treats", lens="consensus", audit=True, agent="dr-house")
    q.query(db, "aspirin", "treats", audit=True, agent=ALICE)
    q.query(db, "aspirin", audit=True)
    q.query(db, "aspirin", "treats")  # not audited
    entries = q.audit_log(db)
    assert len(entries) == 3
    first = entries[0]
    assert first["agent"] == "dr-house" and first["lens"] == "consensus"
    assert first["subject"] == "aspirin" and first["predicate"] == "treats"
    result = first["results"]["treats"]
    assert result["winner"] == a.id.hex() and result["value"] == "a"
    assert result["confidence"] == pytest.approx(0.5 / 0.75)
    assert [c[0] for c in result["contributions"]] == [a.id.hex(), b.id.hex()]
    assert result["contributions"][0][1:] == [0.5, "proposed", bytes(32).hex()]
    assert entries[1]["agent"] == ALICE.public_key.hex()
    assert q.audit_log(db, agent=ALICE) == [entries[1]]
    assert q.audit_log(db, agent=ALICE.public_key) == [entries[1]]
    assert q.audit_log(db, limit=1) == [entries[2]]
    assert q.audit_log(db, since=entries[1]["at"]) == entries[1:]
    assert entries[2]["predicate"] is None and list(entries[2]["results"]) == ["treats"]


def test_audit_log_survives_a_torn_entry_and_reopen(tmp_path):
    path = tmp_path / "db"
    with stemedb.open(path, durability="none") as db:
        put(db, claim("a", t=1))
        q.query(db, "aspirin", "treats", audit=True, agent="x")
    with open(os.path.join(path, q.AUDIT_FILE), "ab") as handle:
        handle.write(b'{"v":1,"at":12')   # a crash in the middle of an append
    with stemedb.open(path, durability="none") as db:
        q.query(db, "aspirin", "treats", audit=True, agent="y")
        assert [e["agent"] for e in q.audit_log(db)] == ["x", "y"]
    assert q.audit_log.__doc__


def test_audit_writes_through_the_file_layer_with_fdatasync(tmp_path):
    synced = []

    class Recording(stemedb.FileLayer):
        def fdatasync(self, fd):
            synced.append(fd)
            super().fdatasync(fd)

    with stemedb.open(tmp_path / "db", durability="none", files=Recording()) as db:
        put(db, claim("a", t=1))
        before = len(synced)
        q.query(db, "aspirin", "treats", audit=True)
        assert len(synced) == before + 1


# ------------------------------------------------------------- odds and ends

def test_resolution_repr_and_dict(db):
    put(db, claim("a", t=1))
    r = q.query(db, "aspirin", "treats", lens="skeptic")
    assert "Resolution 'aspirin' 'treats' by skeptic: 'a'" in repr(r)
    d = r.to_dict()
    assert d["analysis"]["status"] == UNANIMOUS and d["filters"]["lifecycle"] == "any"
    json.dumps(d)
    layered = q.query(db, "aspirin", "treats", lens=Layered(inner=EpochAware()), audit=True)
    json.dumps(layered.to_dict())


def test_query_many_matches_query(db):
    put(db, claim("a", t=1), claim("b", t=2, signer=BOB), claim("c", predicate="p", t=3))
    pairs = [("aspirin", "treats"), ("aspirin", "p"), ("nobody", "p")]
    many = q.query_many(db, pairs, lens="consensus")
    single = [q.query(db, s, p, lens="consensus") for s, p in pairs]
    assert [(r.winner, r.confidence, r.conflict_score, r.candidates_count) for r in many] == \
        [(r.winner, r.confidence, r.conflict_score, r.candidates_count) for r in single]


def test_index_levels_follow_writes(db, monkeypatch):
    from stemedb.lenses import _state
    monkeypatch.setattr(_state, "SCAN_MAX", 3)
    monkeypatch.setattr(_state, "TAIL_MIN", 5)
    for i in range(40):
        put(db, claim(f"v{i}", t=i, predicate=f"p{i % 3}"))
        assert q.query(db, "aspirin", f"p{i % 3}").value == f"v{i}"
    assert sorted(q.query(db, "aspirin")) == ["p0", "p1", "p2"]
    assert [q.query(db, "aspirin", f"p{k}").candidates_count for k in range(3)] == [14, 13, 13]
    state = _state.state_of(db)
    assert state.pairs.levels.base.size + state.pairs.levels.tail.size <= 40


def test_query_encoded_returns_the_same_winners_undecoded(db):
    put(db, claim("a", t=1), claim("b", t=2, signer=BOB), claim("c", predicate="p", t=3))
    pairs = [("aspirin", "treats"), ("nobody", "p"), ("aspirin", "p")]
    for lens in ("recency", "consensus", "skeptic"):
        batch = q.query_encoded(db, pairs, lens=lens)
        single = [q.query(db, s, p, lens=lens) for s, p in pairs]
        assert len(batch) == 3 and list(batch.found) == [True, False, True]
        for i, r in enumerate(single):
            assert batch.winner(i) == r.winner
            assert batch.confidence[i] == r.confidence and batch.conflict_score[i] == r.conflict_score
            assert batch.candidates_count[i] == r.candidates_count
        assert batch.encoded(1) == b"" and bytes(batch.winner_ids[1]) == bytes(32)
        assert batch.encoded(0) == single[0].winner.encode()


def test_queries_run_while_writers_append(db, monkeypatch):
    """Readers see a consistent snapshot while the index levels catch up with writers."""
    import threading

    from stemedb.lenses import _state
    monkeypatch.setattr(_state, "SCAN_MAX", 16)
    monkeypatch.setattr(_state, "TAIL_MIN", 64)
    q.materialize(db, "consensus")
    stop = threading.Event()
    errors = []

    def write():
        try:
            for i in range(150):
                put(db, claim(f"v{i % 7}", predicate=f"p{i % 3}", t=i, signer=(ALICE, BOB, CAROL)[i % 3]))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            stop.set()

    def read():
        seen = {}
        try:
            while not stop.is_set():
                for k in range(3):
                    r = q.query(db, "aspirin", f"p{k}", lens="consensus")
                    assert r.candidates_count >= seen.get(k, 0)
                    seen[k] = r.candidates_count
                    assert 0.0 <= r.confidence <= 1.0
                q.conflicts(db, top=3)
                q.query(db, "aspirin", lens="authority")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write)] + [threading.Thread(target=read) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert [q.query(db, "aspirin", f"p{k}").candidates_count for k in range(3)] == [50, 50, 50]
    fresh = q.query(db, "aspirin", "p0", lens="consensus", lifecycle=list(Lifecycle))
    assert q.query(db, "aspirin", "p0", lens="consensus").winner == fresh.winner


def test_warm_up_is_idempotent(monkeypatch):
    from stemedb.lenses import _kernels

    q.warm_up()
    assert q._warm_done.is_set()
    # Every kernel the warm-up touches is compiled for the types queries pass.
    assert _kernels.select_pair.signatures and _kernels.resolve_pair.signatures
    compiles: list[str] = []
    monkeypatch.setattr(_kernels, "warm_up", lambda: compiles.append("again"))
    threads_before = {t.name for t in threading.enumerate()}
    q.warm_up()
    q.warm_up(background=True)
    q.warm_up()
    assert compiles == []  # once per process: later calls neither compile nor start a thread
    assert "stemedb-jit-warm-up" not in {t.name for t in threading.enumerate()} - threads_before


def run_warm_up_with(monkeypatch, caplog, cold, *, notice_after: float) -> list[str]:
    """q._run_warm_up over a stand-in kernel warm-up that lasts until a message was logged
    (or 0.5 s), with numba's cache reported as `cold`; the messages logged."""
    from stemedb.lenses import _kernels

    monkeypatch.setattr(q, "WARM_UP_NOTICE_SECONDS", notice_after)
    monkeypatch.setattr(_kernels, "cache_is_cold", lambda: cold)
    seen_while_compiling: list[bool] = []

    def compile_slowly() -> None:
        deadline = time.monotonic() + 0.5
        while not caplog.records and time.monotonic() < deadline:
            time.sleep(0.01)
        seen_while_compiling.append(bool(caplog.records) and not q._warm_done.is_set())

    monkeypatch.setattr(_kernels, "warm_up", compile_slowly)
    monkeypatch.setattr(q, "_warm_done", threading.Event())
    caplog.clear()
    with caplog.at_level("WARNING", logger="stemedb.query"):
        q._run_warm_up()
    assert q._warm_done.is_set()
    messages = [record.getMessage() for record in caplog.records]
    assert seen_while_compiling == [bool(messages)]  # told while it was still compiling
    return messages


def test_a_warm_up_that_compiles_says_so_and_one_that_loads_says_nothing(monkeypatch, caplog):
    """Issue 11 item 3: a user is told when the first whole-store call waits for the JIT."""
    compiling = run_warm_up_with(monkeypatch, caplog, True, notice_after=30.0)
    assert compiling[0].startswith("compiling the query kernels: the first whole-store call after "
                                   "an install")
    assert compiling[1].startswith("query kernels ready after ") and len(compiling) == 2
    # A cache that cannot be read: a warm-up that outlasts the notice time is taken as compiling.
    assert len(run_warm_up_with(monkeypatch, caplog, None, notice_after=0.0)) == 2
    assert run_warm_up_with(monkeypatch, caplog, None, notice_after=30.0) == []
    # A warm cache says nothing, however busy the machine makes the load.
    assert run_warm_up_with(monkeypatch, caplog, False, notice_after=0.0) == []


def test_the_kernel_cache_is_seen_as_warm_after_a_warm_up():
    from stemedb.lenses import _kernels

    q.warm_up()
    assert _kernels._KERNELS and _kernels.cache_is_cold() is False


def test_the_custom_lens_example_of_the_docs(db):
    from stemedb.lenses import pick as lens_pick

    class Freshest(Lens):
        name = "freshest"
        reads = frozenset()

        def __init__(self, max_age_us: int) -> None:
            self.max_age_us = max_age_us

        def resolve(self, candidates: Candidates) -> Outcome:
            ts = candidates.timestamp.astype(np.int64)
            weights = np.where(ts >= ts.max(initial=0) - self.max_age_us,
                               candidates.effective_confidence, 0.0)
            return lens_pick(candidates, weights, 2)

    put(db, claim("old", t=0, c=1.0), claim("old", t=1, c=1.0, signer=BOB),
        claim("new", t=100, c=0.5, signer=CAROL))
    assert q.query(db, "aspirin", "treats", lens="consensus").value == "old"
    r = q.query(db, "aspirin", "treats", lens=Freshest(10))
    assert r.value == "new" and r.confidence == 1.0 and r.lens == "freshest(max_age_us=10)"


def test_render_gives_printable_text(db):
    put(db, claim("a", t=1), claim("b", t=2, signer=BOB),
        claim("gloves", subject="ward", predicate="must_use", t=3))
    text = q.render(q.query(db, "aspirin", "treats", lens="skeptic"))
    assert "winner      'b'" in text and "status      Contested" in text and "50.0%" in text
    assert "aspirin / treats" in q.render(q.query(db, "aspirin"))
    assert "gloves" in q.render(q.query(db, "ward", lens="constraints"))
    assert "regulatory" not in q.render(q.query(db, "aspirin", "treats", lens="layered"))
    assert "observational" in q.render(q.query(db, "aspirin", "treats", lens="layered"))
    assert "aspirin / treats" in q.render(q.conflicts(db))
    assert q.render([]) == "no contested (subject, predicate) pairs"
    q.query(db, "aspirin", "treats", audit=True, agent="me")
    assert "me  recency  aspirin / treats  -> treats: 'b'" in q.render(q.audit_log(db))


def test_opening_a_store_neither_loads_the_query_engine_nor_starts_a_warm_up(tmp_path):
    """The engine knows nothing of queries: the JIT warm-up starts with the first query."""
    import subprocess
    import sys

    probe = (
        "import sys, threading, stemedb\n"
        f"db = stemedb.open({str(tmp_path / 'db')!r})\n"
        "db.put(stemedb.Assertion('s', 'p', 1, timestamp=1).sign(stemedb.Signer.from_seed(bytes(32))))\n"
        "loaded = sorted(m for m in ('stemedb.query', 'stemedb.lenses', 'numba') if m in sys.modules)\n"
        "warming = [t.name for t in threading.enumerate() if 'warm' in t.name]\n"
        "db.query('s', 'p')\n"
        "print(loaded, warming, 'stemedb.query' in sys.modules)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "[] [] True"


def test_a_query_during_a_write_notification_sees_the_store_before_that_write(db):
    """Queries read up to what the query layer was told of: a view never answers for a
    store that holds a write it has not invalidated."""
    db.put(claim("old", t=1))
    seen: list[tuple[object, list[bytes]]] = []

    def probe(record_numbers, columns):   # subscribed before the query layer: runs first
        result = q.query(db, "aspirin", "treats")
        seen.append((result.value, [c.assertion_id for c in result.contributions]))

    db.view.subscribe(probe)
    q.materialize(db, "recency")
    new = claim("new", t=2)
    db.put(new)
    old_id = claim("old", t=1).id
    assert seen == [("old", [old_id])]
    after = q.query(db, "aspirin", "treats")
    assert after.value == "new" and [c.assertion_id for c in after.contributions] == [new.id, old_id]


def test_single_queries_on_threads_beside_a_growing_store_keep_their_answers(tmp_path):
    # Each store keeps one PairQuery whose column views every query may refresh; while one
    # thread writes (the columns double several times), queries on other threads must give
    # the answers they gave before for pairs the writes do not touch.
    signer = stemedb.Signer.from_seed(b"\x44" * 32)
    with stemedb.open(tmp_path / "db") as db:
        fixed = [Assertion(f"fixed{i % 40}", f"p{i % 3}", i % 5, confidence=0.1 + (i % 7) / 10,
                           timestamp=1000 + i).sign(signer) for i in range(600)]
        db.put_many(fixed)
        pairs = sorted({(a.subject, a.predicate) for a in fixed})
        expected = {(pair, lens): db.query(*pair, lens=lens).winner
                    for pair in pairs for lens in ("recency", "consensus")}
        stop = threading.Event()
        problems: list[str] = []

        def ask() -> None:
            n = 0
            while not stop.is_set():
                pair = pairs[n % len(pairs)]
                lens = ("recency", "consensus")[n % 2]
                if db.query(*pair, lens=lens).winner != expected[(pair, lens)]:
                    problems.append(f"{pair} {lens}")
                n += 1

        askers = [threading.Thread(target=ask) for _ in range(3)]
        for thread in askers:
            thread.start()
        for start in range(0, 20_000, 1000):
            members, envelope = signer.sign_batch(
                [Assertion(f"other{i}", "q", i, timestamp=5000 + i) for i in range(start, start + 1000)])
            db.put_many(members, envelope=envelope)
        stop.set()
        for thread in askers:
            thread.join()
        assert not problems, problems[:5]
