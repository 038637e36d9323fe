"""The Layered lens: one answer per source-class tier; the highest tier with candidates decides.

Owns: splitting candidates by source class (Regulatory is the highest tier,
Anecdotal the lowest), resolving each tier with an inner lens, and
reporting every tier's winner and conflict. Must never: let a lower tier
override a higher one, however much weight it carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from stemedb.lenses.base import Candidates, Lens, Outcome, conflict_score
from stemedb.lenses.weighted import Consensus
from stemedb.records import SourceClass


@dataclass(frozen=True)
class Tier:
    """The inner lens's answer among the candidates of one source class."""

    source_class: SourceClass
    winner: Any                 # the tier's winning assertion, or None
    confidence: float
    conflict_score: float
    candidates_count: int
    analysis: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {"source_class": self.source_class.name.lower(),
                "winner": self.winner.to_dict() if self.winner is not None else None,
                "confidence": self.confidence, "conflict_score": self.conflict_score,
                "candidates_count": self.candidates_count}


@dataclass(frozen=True)
class LayeredAnalysis:
    tiers: list[Tier]           # highest tier first; only tiers with candidates
    deciding: SourceClass | None

    def to_dict(self) -> dict[str, Any]:
        return {"deciding": self.deciding.name.lower() if self.deciding is not None else None,
                "tiers": [t.to_dict() for t in self.tiers]}


class Layered(Lens):
    """Resolve each source-class tier with `inner` (default Consensus); the highest tier decides.

    Confidence: the deciding tier's. Conflict score: over all candidates,
    with the inner lens's weights.
    """

    name = "layered"
    reads: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, inner: Lens | None = None) -> None:
        if inner is not None and not isinstance(inner, Lens):
            raise TypeError(f"inner: expected a Lens, got {type(inner).__name__}")
        self.inner = inner or Consensus()

    def params(self) -> dict[str, Any]:
        return {"inner": self.inner}

    def dependencies(self) -> frozenset[str]:
        return self.inner.dependencies()

    def resolve(self, candidates: Candidates) -> Outcome:
        classes = candidates.source_class
        weights = np.zeros(len(candidates))
        results = []
        for code in np.unique(classes).tolist():
            mask = classes == code
            outcome = self.inner.resolve(candidates.subset(mask))
            weights[mask] = outcome.weights
            results.append((SourceClass(code), outcome))
        winner_rows = [o.winner_row for _, o in results if o.winner_row is not None]
        decoded = dict(zip(winner_rows, candidates.context.records(winner_rows)))
        tiers = []
        for source, outcome in results:
            conflict = outcome.conflict_score
            if conflict is None:
                conflict = conflict_score(outcome.candidates, outcome.weights)
            row = outcome.winner_row
            tiers.append(Tier(source, decoded.get(row) if row is not None else None,
                              float(outcome.confidence), float(conflict), len(outcome.candidates),
                              outcome.analysis))
        if not results:
            return candidates.outcome(None, 0.0, weights, 0.0, LayeredAnalysis([], None))
        source, top = results[0]
        winner = None
        if top.winner_row is not None:
            winner = int(np.flatnonzero(candidates.rows == top.winner_row)[0])
        return candidates.outcome(winner, float(top.confidence), weights, None,
                                  LayeredAnalysis(tiers, source))
