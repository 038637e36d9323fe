"""Lenses: the rules that choose an answer among conflicting claims at read time.

Built in (FEATURES.md §3): Recency, Confidence, Consensus, VoteConsensus,
Authority, Skeptic, EpochAware, Layered, Constraints. A lens is named by a
string ("recency", "vote_consensus", ...) or passed as an object with
parameters (``EpochAware(inner=Consensus())``). Write your own by
subclassing `Lens` (see docs/query.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from stemedb.lenses.base import (
    HALF_LIVES_DAYS,
    SOURCE_MULTIPLIERS,
    Candidates,
    Context,
    Filters,
    Lens,
    LensSpec,
    Outcome,
    claims_of,
    conflict_score,
    pick,
)
from stemedb.lenses.constraints import Constraints, ConstraintsAnalysis, Rule
from stemedb.lenses.epochs import EpochAnalysis, EpochAware
from stemedb.lenses.layered import Layered, LayeredAnalysis, Tier
from stemedb.lenses.simple import Confidence, Recency
from stemedb.lenses.skeptic import (
    AGREED,
    CONTESTED,
    CONTESTED_AT,
    UNANIMOUS,
    Claim,
    Skeptic,
    SkepticAnalysis,
)
from stemedb.lenses.weighted import Authority, Consensus, VoteConsensus

__all__ = [
    "Lens", "Candidates", "Context", "Filters", "Outcome",
    "Recency", "Confidence", "Consensus", "VoteConsensus", "Authority", "Skeptic",
    "EpochAware", "Layered", "Constraints",
    "SkepticAnalysis", "Claim", "LayeredAnalysis", "Tier", "EpochAnalysis",
    "ConstraintsAnalysis", "Rule",
    "UNANIMOUS", "AGREED", "CONTESTED", "CONTESTED_AT",
    "HALF_LIVES_DAYS", "SOURCE_MULTIPLIERS",
    "claims_of", "conflict_score", "pick", "get_lens", "register", "lens_names", "from_wire",
]

LensFactory = Callable[[], Lens]
_REGISTRY: dict[str, tuple[str, LensFactory]] = {}


def _normal(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "").replace(" ", "")


_BY_NAME: dict[str, Lens] = {}
GENERATION = 0   # +1 at each register(): callers that cache what a name resolves to look again


def register(name: str, factory: LensFactory) -> None:
    """Make `get_lens(name)` (and `db.query(..., lens=name)`) build a lens with `factory()`."""
    global GENERATION
    _REGISTRY[_normal(name)] = (name, factory)
    _BY_NAME.clear()
    GENERATION += 1


_BUILT_IN = (Recency, Confidence, Consensus, VoteConsensus, Authority, Skeptic, EpochAware,
             Layered, Constraints)
for _cls in _BUILT_IN:
    register(_cls.name, _cls)


def lens_names() -> list[str]:
    return [name for name, _ in _REGISTRY.values()]


def get_lens(spec: LensSpec) -> Lens:
    """A Lens from a name, a Lens subclass, or a Lens (returned as is)."""
    if isinstance(spec, Lens):
        return spec
    if isinstance(spec, type) and issubclass(spec, Lens):
        return spec()
    if isinstance(spec, str):
        cached = _BY_NAME.get(spec)
        if cached is not None:
            return cached
        found = _REGISTRY.get(_normal(spec))
        if found is None:
            raise ValueError(f"lens: {spec!r}, expected one of {', '.join(lens_names())} or a Lens")
        lens = found[1]()
        if not isinstance(lens, Lens):
            raise TypeError(f"lens {spec!r}: its factory returned {type(lens).__name__}, not a Lens")
        if found[1] in _BUILT_IN:
            _BY_NAME[spec] = lens  # built-in lenses hold only parameters: one instance serves all
        return lens
    raise TypeError(f"lens: expected a name or a stemedb.lenses.Lens, got {type(spec).__name__}")


def from_wire(name: str, parameters: Mapping[str, Any] | None) -> Lens:
    """The lens a QUERY names: `name` with the `lens_parameters` of `Lens.wire()` (docs/protocol.md).

    Parameters are passed to the lens's class as keyword arguments; a lens
    inside is {"lens": name, "parameters": {...}}. Raises ValueError naming
    what is wrong (an unknown lens or parameter, a lens that takes none).
    """
    if not parameters:
        return get_lens(name)
    if not isinstance(parameters, Mapping):
        raise ValueError("lens_parameters: expected a JSON object")
    found = _REGISTRY.get(_normal(name))
    if found is None:
        raise ValueError(f"lens: {name!r}, expected one of {', '.join(lens_names())}")
    factory = found[1]
    if not (isinstance(factory, type) and issubclass(factory, Lens)):
        raise ValueError(f"lens {name!r} takes no parameters")
    arguments = {key: _lens_argument(value) for key, value in parameters.items()}
    try:
        return factory(**arguments)
    except TypeError as exc:
        raise ValueError(f"lens_parameters of {name!r}: {exc}") from None


def _lens_argument(value: Any) -> Any:
    if isinstance(value, Mapping) and set(value) == {"lens", "parameters"}:
        return from_wire(value["lens"], value["parameters"])
    return value

