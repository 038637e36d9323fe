"""Side files: small append-only files of lines in the data directory, beside the store.

Owns: appending one line durably (open, append, fdatasync, close; a new
file's directory entry fsynced) and reading the lines back, through the
store's FileLayer so fault injection covers them. The query audit log
(`audit.log`) is one. Must never: touch segments, the MANIFEST or snapshots,
or leave a line appended to a torn one (a crash mid-append leaves a partial
last line; the next append starts on a new line, and readers skip what does
not parse).

Resource handling: a descriptor is open only during one append.
Error handling: OSError propagates (ENOSPC included); nothing is retried.
"""

from __future__ import annotations

import os
import threading

from stemedb.engine.files import FileLayer


class LineFile:
    """One append-only file of lines. Thread-safe (appends are serialised)."""

    def __init__(self, files: FileLayer, directory: str, name: str) -> None:
        if not name or os.sep in name or name.startswith("."):
            raise ValueError(f"side file name: {name!r} must be a plain file name")
        self.files = files
        self.directory = directory
        self.path = os.path.join(directory, name)
        self._lock = threading.Lock()

    def append(self, line: bytes) -> None:
        """Append `line` (which must end with a newline) and fdatasync it."""
        if not line.endswith(b"\n") or b"\n" in line[:-1]:
            raise ValueError("line: expected exactly one line ending with a newline")
        files = self.files
        with self._lock:
            created = not files.exists(self.path)
            fd = files.open(self.path, create=created)
            try:
                size = files.size(fd)
                if size and files.read(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line  # a torn last line (crash mid-append) stays on its own line
                files.pwrite(fd, line, size)
                files.fdatasync(fd)
            finally:
                files.close(fd)
            if created:
                files.fsync_dir(self.directory)

    def lines(self) -> list[bytes]:
        """Every line of the file (without newlines); none if it does not exist."""
        if not self.files.exists(self.path):
            return []
        return self.files.read_file(self.path).splitlines()
