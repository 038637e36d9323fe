"""The storage engine: segments, group commit, recovery, indexes, snapshots, and the read view.

The engine knows nothing of queries: the query engine and the lenses take a
Database and read through `db.view` (engine/view.py).
"""

from stemedb.engine.database import Database, Writer, open
from stemedb.engine.files import FileLayer
from stemedb.engine.recovery import RecoveryReport
from stemedb.engine.scrub import VerifyReport
from stemedb.engine.view import ReadView, Snapshot

__all__ = ["Database", "FileLayer", "ReadView", "RecoveryReport", "Snapshot", "VerifyReport",
           "Writer", "open"]
