"""The Constraints lens: the `must_use` / `forbidden` rules recorded for a context.

Owns: collecting, for one subject (the context), the distinct values
asserted under the predicates `must_use` and `forbidden`, and flagging the
values that are both required and forbidden. Must never: pick one rule
over another silently (a contradiction is reported, not resolved).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from stemedb import _codec
from stemedb.lenses import _rules
from stemedb.lenses.base import Candidates, Lens, Outcome, claims_of
from stemedb.lenses.skeptic import _jsonable

MUST_USE = "must_use"
FORBIDDEN = "forbidden"


@dataclass(frozen=True)
class Rule:
    """One required or forbidden value, with the assertions that state it."""

    value: Any
    weight: float                       # summed effective confidence of its assertions
    assertion_ids: list[bytes] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"value": _jsonable(self.value), "weight": self.weight,
                "assertions": [i.hex() for i in self.assertion_ids]}


@dataclass(frozen=True)
class ConstraintsAnalysis:
    must_use: list[Rule]                # heaviest first
    forbidden: list[Rule]
    conflicts: list[Any]                # values both required and forbidden

    def to_dict(self) -> dict[str, Any]:
        return {"must_use": [r.to_dict() for r in self.must_use],
                "forbidden": [r.to_dict() for r in self.forbidden],
                "conflicts": [_jsonable(v) for v in self.conflicts]}


class Constraints(Lens):
    """Rules for a context: values asserted as `must_use` and as `forbidden` about the subject.

    No winner. Conflict score: the fraction of distinct values that are both
    required and forbidden; confidence: 1 - that fraction (0 with no rules).
    """

    name = "constraints"
    predicates: ClassVar[tuple[str, ...] | None] = (MUST_USE, FORBIDDEN)
    reads: ClassVar[frozenset[str]] = frozenset()

    def resolve(self, candidates: Candidates) -> Outcome:
        weights = np.ascontiguousarray(candidates.effective_confidence, dtype=np.float64)
        predicate = candidates.context.arrays["predicate"][candidates.rows]
        rules: dict[str, dict[int, Rule]] = {}
        for name in (MUST_USE, FORBIDDEN):
            mask = predicate == np.uint64(_codec.predicate_key(name))
            rules[name] = self._rules(candidates.subset(mask), weights[mask])
        required, forbidden = rules[MUST_USE], rules[FORBIDDEN]
        conflicts = [rule.value for key, rule in required.items() if key in forbidden]
        distinct = len(required.keys() | forbidden.keys())
        score = len(conflicts) / distinct if distinct else 0.0
        confidence = 1.0 - score if distinct else 0.0
        analysis = ConstraintsAnalysis(list(required.values()), list(forbidden.values()), conflicts)
        return candidates.outcome(None, confidence, weights, score, analysis)

    @staticmethod
    def _rules(candidates: Candidates, weights: np.ndarray) -> dict[int, Rule]:
        """Object key -> Rule, heaviest first."""
        if not len(candidates):
            return {}
        group, units, _, latest, order = claims_of(candidates, weights)
        records = candidates.context.assertions(candidates.rows[latest[order]])
        ids = candidates.ids
        objects = candidates.object_key
        rules = {}
        for g, record in zip(order.tolist(), records):
            members = np.flatnonzero(group == g)
            member_ids = sorted(bytes(ids[i]) for i in members)
            rules[int(objects[members[0]])] = Rule(record.object, float(units[g]) / _rules.WEIGHT_SCALE,
                                                   member_ids)
        return rules
