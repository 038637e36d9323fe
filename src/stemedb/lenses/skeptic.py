"""The Skeptic lens: conflict analysis of one (subject, predicate).

Owns: ranking the distinct claims by weight share, the conflict score
(normalised Shannon entropy of the shares) and the status thresholds.
Must never: hide a claim (every distinct value is listed, however light).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from stemedb import _pair
from stemedb.lenses import _rules
from stemedb.lenses.base import Candidates, Lens, Outcome, claims_of
from stemedb.lenses.weighted import Authority

UNANIMOUS = "Unanimous"
AGREED = "Agreed"
CONTESTED = "Contested"
# Contested from this conflict score up. With two claims, 0.8 is reached when the
# minority holds ~24 % of the weight (75/25 gives 0.811, 80/20 gives 0.722); two
# opposing equal-weight claims give 1.0.
CONTESTED_AT = 0.8

WEIGHTINGS = ("confidence", "votes", "authority")


@dataclass(frozen=True)
class Claim:
    """One distinct value among the candidates."""

    value: Any                 # the object value
    share: float               # of the total weight (of the candidate count when no weight)
    weight: float              # summed weight of the assertions making this claim
    assertions: int            # how many candidates make it
    latest: Any                # its most recent assertion

    def to_dict(self) -> dict[str, Any]:
        return {"value": _jsonable(self.value), "share": self.share, "weight": self.weight,
                "assertions": self.assertions, "latest": self.latest.id.hex()}


@dataclass(frozen=True)
class SkepticAnalysis:
    """status: Unanimous (one distinct value), Agreed, or Contested (score >= CONTESTED_AT)."""

    status: str
    conflict_score: float
    claims: list[Claim]        # best first: weight, then the more recent latest assertion

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "conflict_score": self.conflict_score,
                "claims": [c.to_dict() for c in self.claims]}


def status_of(claims: int, score: float) -> str:
    if claims <= 1:
        return UNANIMOUS
    return CONTESTED if score >= CONTESTED_AT else AGREED


class Skeptic(Lens):
    """Distinct claims ranked by weight share; the top claim's latest assertion is the winner.

    weighting: "confidence" (confidence x decay, as Consensus; default),
    "votes" (as VoteConsensus) or "authority" (as Authority's weights).
    Confidence: the top claim's share. With no candidates: status Unanimous,
    no claims, no winner.
    """

    name = "skeptic"
    reads: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, weighting: str = "confidence") -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting: {weighting!r}, expected one of {', '.join(WEIGHTINGS)}")
        self.weighting = weighting

    def params(self) -> dict[str, Any]:
        return {} if self.weighting == "confidence" else {"weighting": self.weighting}

    def dependencies(self) -> frozenset[str]:
        return {"confidence": frozenset(), "votes": frozenset({"votes"}),
                "authority": frozenset({"trust"})}[self.weighting]

    @property
    def bulk_mode(self) -> int | None:  # type: ignore[override]
        return _rules.CONSENSUS if self.weighting == "confidence" else None

    def weights(self, candidates: Candidates) -> np.ndarray:
        if self.weighting == "votes":
            return candidates.net_votes()
        if self.weighting == "authority":
            lens = Authority()
            a = candidates.context.arrays
            keys, values, default = lens.trust_table(candidates)
            return _pair.authority_weights(
                candidates.rows, candidates.effective_confidence, a["source_class"], a["signer"],
                lens.multiplier_array(), keys, values, default)
        return candidates.effective_confidence

    def resolve(self, candidates: Candidates) -> Outcome:
        weights = np.ascontiguousarray(self.weights(candidates), dtype=np.float64)
        if not len(candidates):
            return candidates.outcome(None, 0.0, weights, 0.0, SkepticAnalysis(UNANIMOUS, 0.0, []))
        _, units, counts, latest, order = claims_of(candidates, weights)
        score = float(_pair.entropy(units, counts))
        total = int(units.sum())
        basis = units if total > 0 else counts
        denominator = total if total > 0 else int(counts.sum())
        latest_rows = candidates.rows[latest[order]]
        records = candidates.context.assertions(latest_rows)
        claims = [Claim(value=record.object, share=float(basis[g]) / denominator,
                        weight=float(units[g]) / _rules.WEIGHT_SCALE, assertions=int(counts[g]),
                        latest=record)
                  for g, record in zip(order.tolist(), records)]
        analysis = SkepticAnalysis(status_of(len(claims), score), score, claims)
        winner = int(latest[order[0]])
        confidence = float(units[order[0]]) / total if total > 0 else 0.0
        return candidates.outcome(winner, confidence, weights, score, analysis)


def _jsonable(value: Any) -> Any:
    from stemedb.records import Ref
    if isinstance(value, Ref):
        return {"ref": value.entity}
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    return value
