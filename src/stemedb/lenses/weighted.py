"""Weighted lenses: Consensus, VoteConsensus, Authority.

Owns: the rules that weigh candidates (confidence x decay, summed votes,
source class x trust rank) and either sum equal claims (Consensus,
VoteConsensus) or take the heaviest assertion (Authority). Must never:
depend on candidate order (weights are summed exactly, in fixed point).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from stemedb import _pair
from stemedb.lenses import _rules
from stemedb.lenses.base import (
    DEFAULT_TRUST,
    SOURCE_MULTIPLIERS,
    Candidates,
    Lens,
    Outcome,
    pick,
)
from stemedb.records import SourceClass


class Consensus(Lens):
    """Group by object; the claim with the most weight (confidence x decay) wins.

    Ties go to the claim holding the most recent assertion; the winner record
    is that claim's most recent assertion. Confidence = winner weight / total.
    """

    name = "consensus"
    reads: ClassVar[frozenset[str]] = frozenset()
    bulk_mode: ClassVar[int | None] = _rules.CONSENSUS

    def resolve(self, candidates: Candidates) -> Outcome:
        return pick(candidates, candidates.effective_confidence, _rules.CONSENSUS)


class VoteConsensus(Lens):
    """Consensus where an assertion's weight is the summed weight of its votes.

    Each agent's latest vote on an assertion counts (as of the query);
    an assertion's net vote weight is floored at 0. Assertions nobody voted
    on weigh 0; if no candidate has weight, the claim holding the most
    recent assertion wins with confidence 0.
    """

    name = "vote_consensus"
    reads: ClassVar[frozenset[str]] = frozenset({"votes"})

    def resolve(self, candidates: Candidates) -> Outcome:
        return pick(candidates, candidates.net_votes(), _rules.CONSENSUS)


class Authority(Lens):
    """weight = effective confidence x source-class multiplier x signer trust rank; highest wins.

    Ties: the latest, then the lowest ID. Confidence: the winner's weight.
    `multipliers` overrides some or all of the FEATURES.md multipliers
    (keys: SourceClass, its name or number); `trust=False` leaves the trust
    rank out (every signer counts 1.0).
    """

    name = "authority"
    reads: ClassVar[frozenset[str]] = frozenset({"trust"})
    bulk_mode: ClassVar[int | None] = _rules.CONFIDENCE
    bulk_authority: ClassVar[bool] = True

    def __init__(self, multipliers: Mapping[Any, float] | None = None, *, trust: bool = True) -> None:
        table = dict(SOURCE_MULTIPLIERS)
        for key, value in (multipliers or {}).items():
            source = SourceClass[key.upper()] if isinstance(key, str) else SourceClass(key)
            value = float(value)
            if not value >= 0.0:
                raise ValueError(f"multipliers[{source.name.lower()}]: expected a number >= 0")
            table[source] = value
        self.multipliers = {source: table[source] for source in SourceClass}
        self.trust = bool(trust)

    def dependencies(self) -> frozenset[str]:
        return self.reads if self.trust else frozenset()

    def params(self) -> dict[str, Any]:
        changed = {s.name.lower(): v for s, v in self.multipliers.items() if v != SOURCE_MULTIPLIERS[s]}
        out: dict[str, Any] = {}
        if changed:
            out["multipliers"] = changed
        if not self.trust:
            out["trust"] = False
        return out

    def multiplier_array(self) -> np.ndarray:
        return np.array([self.multipliers[s] for s in SourceClass], dtype=np.float64)

    def trust_table(self, candidates: Candidates) -> tuple[np.ndarray, np.ndarray, float]:
        if not self.trust:
            return np.zeros(0, dtype=np.uint64), np.zeros(0), 1.0
        keys, values = candidates.context.trust()
        return keys, values, DEFAULT_TRUST

    def resolve(self, candidates: Candidates) -> Outcome:
        a = candidates.context.arrays
        keys, values, default = self.trust_table(candidates)
        weights = _pair.authority_weights(
            candidates.rows, candidates.effective_confidence, a["source_class"], a["signer"],
            self.multiplier_array(), keys, values, default)
        return pick(candidates, weights, _rules.CONFIDENCE)
