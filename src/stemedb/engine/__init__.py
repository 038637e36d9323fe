"""The storage engine: segments, group commit, recovery, indexes, snapshots, and the read view.

The engine knows nothing of queries: the query engine and the lenses take a
Database and read through `db.view` (engine/view.py).

The names below load on first use (PEP 562): a tool that needs one module
of the engine (a backup needs `engine.files`) does not load the database
and everything it imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    **dict.fromkeys(("Database", "Writer", "open"), "stemedb.engine.database"),
    "FileLayer": "stemedb.engine.files",
    "RecoveryReport": "stemedb.engine.recovery",
    "VerifyReport": "stemedb.engine.scrub",
    **dict.fromkeys(("ReadView", "Snapshot"), "stemedb.engine.view"),
}

if TYPE_CHECKING:
    from stemedb.engine.database import Database, Writer, open  # noqa: A004
    from stemedb.engine.files import FileLayer
    from stemedb.engine.recovery import RecoveryReport
    from stemedb.engine.scrub import VerifyReport
    from stemedb.engine.view import ReadView, Snapshot

if not TYPE_CHECKING:

    def __getattr__(name: str) -> Any:  # called only for names not yet in globals()
        module_name = _LAZY.get(name)
        if module_name is None:
            raise AttributeError(f"module 'stemedb.engine' has no attribute {name!r}")
        value = getattr(importlib.import_module(module_name), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = ["Database", "FileLayer", "ReadView", "RecoveryReport", "Snapshot", "VerifyReport",
           "Writer", "open"]
