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
