"""Type stubs for stemedb._single (ext/stemedb/_single.pyx): one pair's query, start to end, compiled."""

from collections.abc import Callable
from typing import Any

from stemedb._pair import PairQuery
from stemedb.results import Resolution

class PairContributions:
    def build(self) -> list[Any]: ...

class SingleQuery:
    def __init__(self, pair: PairQuery, resolution: type, build: Callable[..., list[Any]],
                 filters: Any) -> None: ...
    def answer(self, db: Any, state: Any, subject: str, predicate: str, mode: int,
               lens: str) -> Resolution | None: ...

class QueryFront:
    def __init__(self, db: Any, hooks: Callable[[], tuple[Any, ...]]) -> None: ...
    def __call__(self, subject: str, predicate: str | None = None, *, lens: Any = "recency",
                 lifecycle: Any = "any", epoch: Any = None, as_of: int | None = None,
                 decay: bool = False, now: int | None = None, audit: bool = False,
                 agent: Any = None) -> Any: ...
