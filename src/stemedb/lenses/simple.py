"""Single-winner lenses: Recency and Confidence.

Owns: the two rules that pick one assertion by its own fields. Must never:
depend on candidate order (ties fall to timestamp, then the lowest ID).
"""

from __future__ import annotations

from typing import ClassVar

from stemedb.lenses import _rules
from stemedb.lenses.base import Candidates, Lens, Outcome, pick


class Recency(Lens):
    """The latest assertion wins; equal timestamps fall to the lowest ID.

    Confidence: the winner's effective confidence. Weights (contributions,
    conflict score): effective confidences.
    """

    name = "recency"
    reads: ClassVar[frozenset[str]] = frozenset()
    bulk_mode: ClassVar[int | None] = _rules.RECENCY

    def resolve(self, candidates: Candidates) -> Outcome:
        return pick(candidates, candidates.effective_confidence, _rules.RECENCY)


class Confidence(Lens):
    """The highest effective confidence wins; ties fall to the latest, then the lowest ID.

    Confidence: the winner's effective confidence.
    """

    name = "confidence"
    reads: ClassVar[frozenset[str]] = frozenset()
    bulk_mode: ClassVar[int | None] = _rules.CONFIDENCE

    def resolve(self, candidates: Candidates) -> Outcome:
        return pick(candidates, candidates.effective_confidence, _rules.CONFIDENCE)
