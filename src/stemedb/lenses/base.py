"""The lens interface: Context (one query's snapshot and filters), Candidates, Outcome, Lens.

Owns: what a lens sees (the candidate record numbers of one subject /
predicate after the filters, with their fixed-width columns gathered on
demand) and what it returns (an Outcome: winner index, confidence, weights,
optional conflict score and analysis). Must never: write to the store, or
let a lens depend on the order candidates arrive in.

Writing a lens: subclass `Lens`, give it a `name`, implement
`resolve(candidates) -> Outcome`. Candidates are in ascending record-number
order; a lens must break ties by something order-independent (the built-in
ones use timestamp, then ID). See docs/query.md.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

import numpy as np

from stemedb import _codec, _pair
from stemedb._codec import Record
from stemedb.lenses import _rules
from stemedb.records import Assertion, Epoch, Lifecycle, SourceClass

if TYPE_CHECKING:
    from stemedb.engine.database import Database
    from stemedb.lenses._state import QueryState

# What the query API accepts for a lens, a lifecycle filter and an epoch filter.
LensSpec: TypeAlias = "str | Lens | type[Lens]"
Stage: TypeAlias = "str | int | Lifecycle"
LifecycleSpec: TypeAlias = "Stage | Collection[Stage]"
EpochSpec: TypeAlias = "Epoch | bytes | bytearray | memoryview | str | None"

LIFECYCLE_ANY = 0xFF
NO_LIMIT = int(_rules.NO_LIMIT)

# FEATURES.md §3: half-lives in days (Regulatory never decays) and Authority multipliers.
HALF_LIVES_DAYS: dict[SourceClass, float] = {
    SourceClass.REGULATORY: math.inf,
    SourceClass.CLINICAL: 730.0,
    SourceClass.PEER_REVIEWED: 730.0,
    SourceClass.OBSERVATIONAL: 365.0,
    SourceClass.EXPERT: 180.0,
    SourceClass.COMMUNITY: 90.0,
    SourceClass.ANECDOTAL: 30.0,
}
SOURCE_MULTIPLIERS: dict[SourceClass, float] = {
    SourceClass.REGULATORY: 1.0,
    SourceClass.CLINICAL: 0.9,
    SourceClass.PEER_REVIEWED: 0.85,
    SourceClass.OBSERVATIONAL: 0.6,
    SourceClass.EXPERT: 0.5,
    SourceClass.COMMUNITY: 0.3,
    SourceClass.ANECDOTAL: 0.1,
}
DEFAULT_TRUST = 0.5
HALF_LIVES = np.array([HALF_LIVES_DAYS[c] for c in SourceClass], dtype=np.float64)


@dataclass(frozen=True)
class Filters:
    """The query filters, normalised (see `Filters.make`)."""

    lifecycle_mask: int = LIFECYCLE_ANY
    lifecycle: str = "any"
    as_of: int | None = None
    epoch: bytes | None = None
    decay: bool = False
    now: int | None = None

    @property
    def as_of_limit(self) -> np.uint64:
        return np.uint64(NO_LIMIT if self.as_of is None else self.as_of)

    @property
    def epoch_key(self) -> np.uint64:
        return np.uint64(0 if self.epoch is None else _codec.id_key(self.epoch))

    @property
    def is_default(self) -> bool:
        """True when nothing is filtered out or reweighted (materialised views apply)."""
        return (self.lifecycle_mask == LIFECYCLE_ANY and self.as_of is None and self.epoch is None
                and not self.decay)

    @staticmethod
    def make(lifecycle: LifecycleSpec = "any", epoch: EpochSpec = None, as_of: int | None = None,
             decay: bool = False, now: int | None = None) -> Filters:
        if lifecycle == "any" and epoch is None and as_of is None and not decay and now is None:
            return DEFAULT_FILTERS
        mask, label = lifecycle_mask(lifecycle)
        if epoch is not None:
            epoch = getattr(epoch, "id", epoch)
            if isinstance(epoch, str):
                try:
                    epoch = bytes.fromhex(epoch)
                except ValueError:
                    raise ValueError("epoch: expected an Epoch, its 32-byte ID or 64 hex digits") from None
            if isinstance(epoch, (bytearray, memoryview)):
                epoch = bytes(epoch)
            if not isinstance(epoch, bytes) or len(epoch) != 32:
                raise ValueError("epoch: expected an Epoch, its 32-byte ID or 64 hex digits")
        if as_of is not None:
            as_of = _microseconds(as_of, "as_of")
        if now is not None:
            now = _microseconds(now, "now")
        elif decay:
            now = as_of if as_of is not None else _now_us()
        return Filters(mask, label, as_of, epoch, bool(decay), now)

    def as_dict(self) -> dict[str, Any]:
        return {"lifecycle": self.lifecycle, "as_of": self.as_of,
                "epoch": self.epoch.hex() if self.epoch else None, "decay": self.decay,
                "now": self.now}


DEFAULT_FILTERS = Filters()


def _now_us() -> int:
    import time
    return time.time_ns() // 1000


def _microseconds(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}: expected microseconds since the Unix epoch (int), got {value!r}")
    micros = int(value)
    if not 0 <= micros <= NO_LIMIT:
        raise ValueError(f"{name}: {micros} is outside 0..2**64-1")
    return micros


def lifecycle_mask(value: LifecycleSpec) -> tuple[int, str]:
    """("any" | "approved" | a stage name, number or Lifecycle | a list of them) -> (bit mask, label)."""
    if isinstance(value, str) and value.lower() == "any":
        return LIFECYCLE_ANY, "any"
    listed = isinstance(value, (list, tuple, set, frozenset))
    stages: Collection[object] = value if listed else [value]  # type: ignore[assignment]
    mask = 0
    names = []
    for stage in stages:
        try:
            if isinstance(stage, str):
                member = Lifecycle[stage.upper().replace("-", "_")]
            else:
                member = Lifecycle(stage)  # type: ignore[arg-type]
        except (KeyError, ValueError):
            stage_names = ", ".join(m.name.lower() for m in Lifecycle)
            if not listed:
                raise ValueError(f"lifecycle: {stage!r}, expected one of any, {stage_names}") from None
            if isinstance(stage, str) and stage.lower() == "any":
                raise ValueError(f"lifecycle: 'any' in a list; pass lifecycle='any' alone, or list "
                                 f"stages only ({stage_names})") from None
            raise ValueError(f"lifecycle: {stage!r} in the list, expected stages only: "
                             f"{stage_names}") from None
        mask |= 1 << int(member)
        names.append(member.name.lower())
    if not mask:
        raise ValueError("lifecycle: expected at least one stage")
    return mask, ",".join(sorted(set(names), key=lambda n: Lifecycle[n.upper()]))


class Context:
    """One query's read snapshot: the store's columns (rows below `count`), the filters and caches.

    Record numbers below `count` never change, so a Context stays valid while
    later writes append.
    """

    __slots__ = ("db", "state", "count", "arrays", "filters")

    def __init__(self, db: Database, state: QueryState, count: int, arrays: Mapping[str, np.ndarray],
                 filters: Filters) -> None:
        self.db = db
        self.state = state
        self.count = count
        self.arrays = arrays
        self.filters = filters

    def column(self, name: str) -> np.ndarray:
        """The full engine column (rows below `count` are valid)."""
        return self.arrays[name]

    def records(self, rows: np.ndarray | Sequence[int]) -> list[Record]:
        """Decode these record numbers (checksums checked)."""
        return self.db.view.records_at(rows)

    def gather(self, rows: np.ndarray | Sequence[int]) -> tuple[bytes, np.ndarray]:
        """(blob, offsets) of these record numbers, encoded (checksums checked)."""
        return self.db.view.gather(rows)

    def assertion_at(self, row: int) -> Assertion:
        """Decode one record number the query selected as an assertion."""
        record = self.db.view.record_at(row)
        if not isinstance(record, Assertion):
            raise TypeError(f"expected an assertion, got a {type(record).__name__}")
        return record

    def assertions(self, rows: np.ndarray | Sequence[int]) -> list[Assertion]:
        """Decode record numbers the query selected by the kind column: assertions, all of them."""
        records = self.records(rows)
        for record in records:
            if not isinstance(record, Assertion):
                raise TypeError(f"expected an assertion, got a {type(record).__name__}")
        return records  # type: ignore[return-value]

    def effective_confidence(self, rows: np.ndarray) -> np.ndarray:
        f = self.filters
        return _pair.effective_confidence(
            rows, self.arrays["confidence"], self.arrays["timestamp"], self.arrays["source_class"],
            f.decay, float(f.now or 0), HALF_LIVES)

    def trust(self) -> tuple[np.ndarray, np.ndarray]:
        """(signer keys ascending, trust rank) of every agent with a rank (others: 0.5)."""
        return self.state.trust(self)

    def net_votes(self, rows: np.ndarray) -> np.ndarray:
        """Per record: summed weight of the latest vote of each agent (as of the filters), >= 0."""
        if not len(rows):
            return np.zeros(0)
        keys = np.ascontiguousarray(self.arrays["id"][rows, :8]).view("<u8").ravel()
        # Votes written after this snapshot are in the posting lists but not in its arrays.
        flat, offsets = self.db.view.postings("target").get_many(keys, below=self.count)
        a = self.arrays
        return _pair.net_votes(rows, flat, offsets, a["kind"], a["timestamp"],
                                  self.filters.as_of_limit, a["confidence"], a["signer"], a["id"])

    def superseded_epochs(self, epoch_keys: Sequence[int]) -> set[int]:
        """The subset of these epoch ID keys superseded as of the filters (see EpochAware)."""
        return self.state.superseded(self, epoch_keys)


class Candidates:
    """The candidate assertions of one query, as record numbers with lazily gathered columns.

    Attributes are numpy arrays aligned with `rows` (ascending record
    numbers): timestamp (µs), confidence (stored), effective_confidence
    (decay applied when the query asks for it), source_class, lifecycle,
    object_key (equal objects have equal keys), signer_key (first signer),
    epoch_key (0: none), ids ((n, 32) uint8).
    """

    __slots__ = ("context", "rows", "_cache")

    def __init__(self, context: Context, rows: np.ndarray) -> None:
        self.context = context
        self.rows = rows
        self._cache: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def _gather(self, name: str, column: str) -> np.ndarray:
        found = self._cache.get(name)
        if found is None:
            found = self._cache[name] = self.context.arrays[column][self.rows]
        return found

    @property
    def timestamp(self) -> np.ndarray:
        return self._gather("timestamp", "timestamp")

    @property
    def confidence(self) -> np.ndarray:
        return self._gather("confidence", "confidence")

    @property
    def source_class(self) -> np.ndarray:
        return self._gather("source_class", "source_class")

    @property
    def lifecycle(self) -> np.ndarray:
        return self._gather("lifecycle", "lifecycle")

    @property
    def object_key(self) -> np.ndarray:
        return self._gather("object", "object")

    @property
    def signer_key(self) -> np.ndarray:
        return self._gather("signer", "signer")

    @property
    def epoch_key(self) -> np.ndarray:
        return self._gather("epoch", "epoch")

    @property
    def ids(self) -> np.ndarray:
        return self._gather("id", "id")

    @property
    def effective_confidence(self) -> np.ndarray:
        found = self._cache.get("effective")
        if found is None:
            found = self._cache["effective"] = self.context.effective_confidence(self.rows)
        return found

    def net_votes(self) -> np.ndarray:
        found = self._cache.get("votes")
        if found is None:
            found = self._cache["votes"] = self.context.net_votes(self.rows)
        return found

    def trust(self) -> np.ndarray:
        """Trust rank of each candidate's signer (0.5 for agents without a rank)."""
        keys, values = self.context.trust()
        signers = self.signer_key
        if not len(keys):
            return np.full(len(signers), DEFAULT_TRUST)
        at = np.minimum(np.searchsorted(keys, signers), len(keys) - 1)
        return np.where(keys[at] == signers, values[at], DEFAULT_TRUST)

    def subset(self, selector: np.ndarray) -> Candidates:
        """Candidates at a boolean mask or ascending indices."""
        return Candidates(self.context, self.rows[selector])

    def records(self) -> list[Assertion]:
        """The decoded assertions (costly: prefer the columns)."""
        return self.context.assertions(self.rows)

    def outcome(self, winner: int | None, confidence: float, weights: np.ndarray,
                conflict_score: float | None = None, analysis: Any = None) -> Outcome:
        return Outcome(self, winner, confidence, weights, conflict_score, analysis)


@dataclass
class Outcome:
    """What a lens returns.

    winner: index into the candidates, or None. confidence: in [0, 1].
    weights: the weight each candidate carried (for contributions and, when
    conflict_score is None, the conflict score over claims). analysis: any
    lens-specific result (e.g. SkepticAnalysis).
    """

    candidates: Candidates
    winner: int | None
    confidence: float
    weights: np.ndarray
    conflict_score: float | None = None
    analysis: Any = None

    @property
    def winner_row(self) -> int | None:
        return None if self.winner is None else int(self.candidates.rows[self.winner])


class Lens:
    """Base class of every lens. Subclasses set `name` and implement `resolve`.

    A lens holds only its parameters (it is shared between queries and
    threads). `params()` returns them (for `key()`, `describe()` and the
    audit log); the default reads the instance's `__dict__`.
    """

    name: ClassVar[str] = "custom"
    # Lenses that read fixed predicates of a subject (Constraints) name them here.
    predicates: ClassVar[tuple[str, ...] | None] = None
    # What besides the pair's own assertions the answer depends on ("votes", "trust",
    # "epochs"): a materialised view of the lens is dropped when any of these change.
    # Unknown (custom) lenses are assumed to depend on everything.
    reads: ClassVar[frozenset[str]] = frozenset({"votes", "trust", "epochs"})
    # Kernel rule (_rules.RECENCY / CONFIDENCE / CONSENSUS) that computes this lens for
    # every pair at once, if there is one (materialised views); otherwise views loop.
    bulk_mode: ClassVar[int | None] = None
    bulk_authority: ClassVar[bool] = False

    def resolve(self, candidates: Candidates) -> Outcome:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        return dict(vars(self))

    def dependencies(self) -> frozenset[str]:
        """See `reads`."""
        return self.reads

    def key(self) -> Hashable:
        """Equal keys: equal answers for the same candidates (materialised views use it)."""
        return (type(self).__module__, type(self).__qualname__,
                tuple(sorted((k, _hashable(v)) for k, v in self.params().items())))

    def describe(self) -> str:
        params = self.params()
        if not params:
            return self.name
        inner = ", ".join(f"{k}={_describe(v)}" for k, v in sorted(params.items()))
        return f"{self.name}({inner})"

    def wire(self) -> tuple[str, dict[str, Any]]:
        """(name, parameters): how a client sends this lens in a QUERY (docs/protocol.md).

        The name goes in QUERY's `lens` field, non-empty parameters in the
        `lens_parameters` option, as JSON values: a lens inside (EpochAware's
        `inner`) as {"lens": name, "parameters": {...}}, source classes by
        name. The server rebuilds the lens with `stemedb.lenses.from_wire`.
        """
        return self.name, {str(key): _wire_value(value) for key, value in self.params().items()}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Lens) and self.key() == other.key()

    def __hash__(self) -> int:
        return hash(self.key())

    def __repr__(self) -> str:
        return f"<lens {self.describe()}>"


def _hashable(value: Any) -> Hashable:
    if isinstance(value, Lens):
        return value.key()
    if isinstance(value, dict):
        return tuple(sorted((_hashable(k), _hashable(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, np.ndarray):
        return tuple(value.tolist())
    return value  # type: ignore[no-any-return]


def _wire_value(value: Any) -> Any:
    if isinstance(value, Lens):
        name, parameters = value.wire()
        return {"lens": name, "parameters": parameters}
    if isinstance(value, SourceClass):
        return value.name.lower()
    if isinstance(value, dict):
        return {str(_wire_value(k)): _wire_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_wire_value(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"lens parameter {value!r}: cannot be sent to a server (not a JSON value)")


def _describe(value: Any) -> str:
    if isinstance(value, Lens):
        return value.describe()
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_describe(k)}: {_describe(v)}" for k, v in value.items()) + "}"
    if isinstance(value, SourceClass):
        return value.name.lower()
    return repr(value)


# ------------------------------------------------------ helpers for lenses

def claims_of(candidates: Candidates, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                    np.ndarray, np.ndarray]:
    """Group candidates into claims (equal objects).

    Returns (group of each candidate, weight units per claim, candidates
    per claim, index of each claim's most recent candidate, claim order
    best first: more weight, then the more recent latest assertion).
    """
    a = candidates.context.arrays
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    group, units, counts, latest = _pair.group_claims(candidates.rows, weights, a["object"],
                                                         a["timestamp"], a["id"])
    order = _pair.rank_claims(candidates.rows, units, latest, a["timestamp"], a["id"])
    return group, units, counts, latest, order


def conflict_score(candidates: Candidates, weights: np.ndarray) -> float:
    """Normalised Shannon entropy of the claims' weight shares (0: one claim; 1: even split)."""
    if not len(candidates):
        return 0.0
    a = candidates.context.arrays
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    _, units, counts, _ = _pair.group_claims(candidates.rows, weights, a["object"],
                                                a["timestamp"], a["id"])
    return float(_pair.entropy(units, counts))


def pick(candidates: Candidates, weights: np.ndarray, mode: int) -> Outcome:
    """An Outcome by one of the kernel rules (RECENCY, CONFIDENCE, CONSENSUS) over these weights."""
    a = candidates.context.arrays
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    index, confidence, conflict = _pair.pick(candidates.rows, weights, a["object"],
                                                a["timestamp"], a["id"], mode)
    winner = None if index < 0 else int(index)
    return Outcome(candidates, winner, float(confidence), weights, float(conflict))
