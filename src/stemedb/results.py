"""What a query answers, embedded or over the network: `Resolution` and `Contribution`.

Owns: the result types the query engine (stemedb.query) builds and the
clients rebuild from a QUERY answer (`Resolution.from_document`), so that
`db.query(...)` and `client.query(...)` return the same type with the same
fields. Must never: import the query engine, the lenses or numba (the
clients load this module in a client-only install); what the engine adds
(a contribution source computed on first access, a materialised view's
recompute) is passed in as plain objects.

Error handling: `from_document` raises ProtocolError when an answer names
a winner it does not carry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from stemedb.errors import ProtocolError
from stemedb.records import Assertion, Lifecycle, ObjectValue

if TYPE_CHECKING:
    from stemedb.lenses.base import Filters

__all__ = ["Resolution", "Contribution"]


class Contribution(NamedTuple):
    """One candidate assertion and the weight it carried under the lens."""

    assertion_id: bytes
    weight: float
    lifecycle: Lifecycle
    source_hash: bytes
    supports: bool          # it claims the winner's value

    def to_dict(self) -> dict[str, Any]:
        return {"assertion_id": self.assertion_id.hex(), "weight": self.weight,
                "lifecycle": self.lifecycle.name.lower(), "source_hash": self.source_hash.hex(),
                "supports": self.supports}



class ContributionSource(Protocol):
    """What computes a Resolution's contributions on first access (the query engine's)."""

    def build(self) -> list[Contribution]: ...


class Resolution:
    """The answer to a query.

    winner: the winning Assertion, or None. confidence and conflict_score:
    in [0, 1]. candidates_count: assertions the lens weighed (after filters,
    revisions and, for EpochAware, superseded epochs). contributions: every
    weighed candidate with its weight, heaviest first (decoded on first
    access). analysis: lens-specific (SkepticAnalysis, LayeredAnalysis,
    EpochAnalysis, ConstraintsAnalysis) or None.
    """

    __slots__ = ("subject", "predicate", "lens", "winner", "confidence", "conflict_score",
                 "candidates_count", "filters", "_analysis", "_contributions", "_source",
                 "_recompute")

    def __init__(self, subject: str, predicate: str | None, lens: str, winner: Assertion | None,
                 confidence: float, conflict_score: float, candidates_count: int, *,
                 analysis: Any = None, contributions: list[Contribution] | None = None,
                 filters: Filters | dict[str, Any] | None = None,
                 source: ContributionSource | None = None,
                 recompute: Callable[[], Resolution] | None = None) -> None:
        self.subject = subject
        self.predicate = predicate
        self.lens = lens
        self.winner = winner
        self.confidence = confidence
        self.conflict_score = conflict_score
        self.candidates_count = candidates_count
        self.filters = filters
        self._analysis = analysis
        self._contributions = contributions
        self._source = source
        self._recompute = recompute

    def _complete(self) -> None:
        """A result served by a materialised view computes its details when first asked."""
        if self._recompute is not None:
            full = self._recompute()
            self._analysis = full.analysis
            self._contributions = full.contributions
            self._recompute = None

    @property
    def analysis(self) -> Any:
        self._complete()
        return self._analysis

    @property
    def contributions(self) -> list[Contribution]:
        self._complete()
        if self._contributions is None:
            self._contributions = self._source.build() if self._source is not None else []
            self._source = None
        return self._contributions

    @property
    def value(self) -> ObjectValue | None:
        """The winner's object, or None."""
        return self.winner.object if self.winner is not None else None

    @classmethod
    def from_document(cls, document: dict[str, Any], records: Iterable[Any] = ()) -> Resolution:
        """The Resolution a QUERY answer's JSON describes (docs/schemas/query-result.schema.json).

        `records` are the answer's contributing records: the winner is taken
        from them by ID. `analysis` and `filters` stay the JSON objects they
        arrived as (their lens-specific classes belong to the query engine,
        which a client does not load); `to_dict()` gives back `document`.
        """
        by_id = {record.id: record for record in records}
        winner = None
        if document.get("winner") is not None:
            winner_id = bytes.fromhex(document["winner"]["id"])
            winner = by_id.get(winner_id)
            if winner is None:
                raise ProtocolError(f"the answer names winner {winner_id.hex()} but does not carry it")
        contributions = [Contribution(bytes.fromhex(c["assertion_id"]), float(c["weight"]),
                                      Lifecycle[c["lifecycle"].upper()], bytes.fromhex(c["source_hash"]),
                                      bool(c["supports"]))
                         for c in document.get("contributions", [])]
        return cls(document["subject"], document["predicate"], document["lens"], winner,
                   float(document["confidence"]), float(document["conflict_score"]),
                   int(document["candidates_count"]), analysis=document.get("analysis"),
                   contributions=contributions, filters=document.get("filters"))

    @staticmethod
    def is_document(document: Any) -> bool:
        """Whether a QUERY result is one resolution (else a mapping predicate → resolution)."""
        return isinstance(document, dict) and isinstance(document.get("candidates_count"), int) \
            and isinstance(document.get("lens"), str)

    def to_dict(self, *, contributions: bool = True) -> dict[str, Any]:
        """A JSON-ready view (bytes as hex)."""
        analysis = self.analysis
        out: dict[str, Any] = {
            "subject": self.subject, "predicate": self.predicate, "lens": self.lens,
            "winner": self.winner.to_dict() if self.winner is not None else None,
            "confidence": self.confidence, "conflict_score": self.conflict_score,
            "candidates_count": self.candidates_count,
            "analysis": analysis.to_dict() if hasattr(analysis, "to_dict") else analysis,
        }
        if isinstance(self.filters, dict):  # a Resolution a client received
            out["filters"] = dict(self.filters)
        elif self.filters is not None:
            out["filters"] = self.filters.as_dict()
        if contributions:
            out["contributions"] = [c.to_dict() for c in self.contributions]
        return out

    def __repr__(self) -> str:
        value = _short(self.value) if self.winner is not None else "no winner"
        return (f"<Resolution {self.subject!r} {self.predicate!r} by {self.lens}: {value} "
                f"confidence={self.confidence:.3f} conflict={self.conflict_score:.3f} "
                f"candidates={self.candidates_count}>")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------- planning
