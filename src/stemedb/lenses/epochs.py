"""The EpochAware lens: drop assertions of superseded epochs, then apply an inner lens.

Owns: the choice of which candidates an epoch supersession removes (the
supersession rule itself — chains, cycles, missing epochs — lives in
`_state.epoch_superseded` so it is cached per store). Must never: drop an
assertion whose epoch nobody supersedes (missing epochs fail open).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from stemedb.lenses.base import Candidates, Lens, Outcome
from stemedb.lenses.simple import Recency


@dataclass(frozen=True)
class EpochAnalysis:
    """What EpochAware dropped, and the inner lens's own analysis."""

    dropped: int                       # candidates whose epoch is superseded
    superseded_epochs: list[str]       # their epochs' ID keys (first 8 bytes, hex)
    inner: Any

    def to_dict(self) -> dict[str, Any]:
        inner = self.inner.to_dict() if hasattr(self.inner, "to_dict") else self.inner
        return {"dropped": self.dropped, "superseded_epochs": self.superseded_epochs, "inner": inner}


class EpochAware(Lens):
    """Drops candidates whose epoch is superseded (see docs/query.md), then applies `inner`.

    Default inner lens: Recency. Assertions without an epoch always stay.
    """

    name = "epoch_aware"
    reads: ClassVar[frozenset[str]] = frozenset({"epochs"})

    def __init__(self, inner: Lens | None = None) -> None:
        if inner is not None and not isinstance(inner, Lens):
            raise TypeError(f"inner: expected a Lens, got {type(inner).__name__}")
        self.inner = inner or Recency()

    def params(self) -> dict[str, Any]:
        return {"inner": self.inner}

    def dependencies(self) -> frozenset[str]:
        return self.reads | self.inner.dependencies()

    def resolve(self, candidates: Candidates) -> Outcome:
        epochs = candidates.epoch_key
        present = np.unique(epochs[epochs != 0])
        superseded = candidates.context.superseded_epochs(present.tolist()) if len(present) else set()
        kept = candidates
        if superseded:
            drop = np.isin(epochs, np.array(sorted(superseded), dtype=np.uint64))
            kept = candidates.subset(~drop)
        outcome = self.inner.resolve(kept)
        outcome.analysis = EpochAnalysis(
            dropped=len(candidates) - len(kept),
            superseded_epochs=[int(k).to_bytes(8, "little").hex() for k in sorted(superseded)],
            inner=outcome.analysis)
        return outcome
