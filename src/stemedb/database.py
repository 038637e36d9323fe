"""The Database you open: the storage engine with the query API on top.

Owns: `Database` — `stemedb.engine.Database` (storage: writes, reads,
scrub, snapshots) plus the read-time resolution methods `query`,
`query_many`, `conflicts`, `materialize` and `audit`, each a call into
`stemedb.query` — and `open`, which returns one. Must never: hold state of
its own or reach into either layer: the engine knows nothing of queries,
and the query engine reads the store only through `db.view`.

`stemedb.query` (and with it the lenses and numba) is imported on the first
query, so that `import stemedb` stays light for programs that only write
or only use the clients; `queries` below is the one place that happens.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable
from types import ModuleType
from typing import TYPE_CHECKING, Any

from stemedb import _single
from stemedb.engine.database import Database as StorageDatabase

if TYPE_CHECKING:
    from stemedb import query as queries
    from stemedb.lenses.base import EpochSpec, LensSpec, LifecycleSpec
    from stemedb.query import AgentSpec, MaterializedView, PairConflict, Resolution


class _OnFirstUse(ModuleType):
    """A module imported when one of its attributes is first read."""

    def __getattr__(self, name: str) -> Any:
        module = importlib.import_module(self.__name__)
        value = getattr(module, name)
        # Kept here: the next read is a plain attribute, not an import per query (the
        # module's functions do not change once it is loaded).
        setattr(self, name, value)
        return value


if not TYPE_CHECKING:
    queries = _OnFirstUse("stemedb.query")


def _query_hooks() -> tuple[Any, ...]:
    return queries._front_hooks()


class Database(StorageDatabase):
    """An open StemeDB store. Create with `stemedb.open(path)`.

    Storage (put, get, scan, verify, checkpoint, ...) is documented on
    `stemedb.engine.Database`; the query methods below resolve claims
    through lenses (docs/query.md).
    """

    def __init__(self, path: str | os.PathLike[str], **options: Any) -> None:
        super().__init__(path, **options)
        # db.query: the common case in one compiled call (stemedb._single), the rest to the
        # query() of stemedb.query, which it imports on the first query.
        self.query = _single.QueryFront(self, _query_hooks)  # type: ignore[method-assign]

    def close(self) -> None:
        """Close the store (see stemedb.engine.Database.close) and drop its query state."""
        super().close()
        states = sys.modules.get("stemedb.lenses._state")   # none to drop if no query ran
        if states is not None:
            states.forget(self)

    def query(self, subject: str, predicate: str | None = None, *, lens: LensSpec = "recency",
              lifecycle: LifecycleSpec = "any", epoch: EpochSpec = None, as_of: int | None = None,
              decay: bool = False, now: int | None = None, audit: bool = False,
              agent: AgentSpec = None) -> Resolution | dict[str, Resolution]:
        """Resolve the claims about subject (and predicate) through a lens.

        Returns a Resolution, or with predicate=None a mapping predicate →
        Resolution. See stemedb.query.query and docs/query.md for lenses and
        filters.
        """
        return queries.query(self, subject, predicate, lens=lens, lifecycle=lifecycle, epoch=epoch,
                             as_of=as_of, decay=decay, now=now, audit=audit, agent=agent)

    def query_many(self, pairs: Iterable[tuple[str, str]], *, lens: LensSpec = "recency",
                   lifecycle: LifecycleSpec = "any", epoch: EpochSpec = None,
                   as_of: int | None = None, decay: bool = False,
                   now: int | None = None) -> list[Resolution]:
        """Resolve many (subject, predicate) pairs in one call (see stemedb.query.query_many)."""
        return queries.query_many(self, pairs, lens=lens, lifecycle=lifecycle, epoch=epoch,
                                  as_of=as_of, decay=decay, now=now)

    def conflicts(self, top: int | None = None, *, lifecycle: LifecycleSpec = "any",
                  as_of: int | None = None, min_score: float = 0.0) -> list[PairConflict]:
        """The disagreement dashboard: every contested pair by conflict score, highest first."""
        return queries.conflicts(self, top, lifecycle=lifecycle, as_of=as_of, min_score=min_score)

    def materialize(self, lens: LensSpec) -> MaterializedView:
        """A view caching the winner of every pair under `lens`, kept fresh by writes."""
        return queries.materialize(self, lens)

    def audit(self, agent: AgentSpec = None, since: int | None = None,
              limit: int | None = 100) -> list[dict[str, Any]]:
        """Recorded query audits (oldest first), optionally by agent and time."""
        return queries.audit_log(self, agent=agent, since=since, limit=limit)


def open(path: str | os.PathLike[str], **options: Any) -> Database:  # noqa: A001
    """Open (creating if needed) the store at `path`. See stemedb.engine.Database for options."""
    return Database(path, **options)
