"""The storage engine: segments, group commit, recovery, indexes, snapshots."""

from stemedb.engine.database import Database, RecoveryReport, VerifyReport, Writer, open
from stemedb.engine.files import FileLayer

__all__ = ["Database", "FileLayer", "RecoveryReport", "VerifyReport", "Writer", "open"]
