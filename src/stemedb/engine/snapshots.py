"""Index snapshots: what lets an open replay only the records written after the last one.

Owns: `DIR/index/snapshot-NNNNNNNNNNNN/` (docs/format.md, "Snapshots"):
capturing the indexes under the state lock, writing them atomically (temp
directory → fsync files → rename → fsync parent), loading the newest one
whose checksums match, and deciding when to write one (on `checkpoint()`,
in the background every `snapshot_every` records, at close unless the
newest one this process wrote leaves under 1 % of `snapshot_every` to replay). Must never:
write segments, or record a position that covers frames not yet indexed.

Resource handling: a snapshot is a directory of .npy files plus
MANIFEST.json; older snapshots are removed only after a newer one is durably
named. A background snapshot runs in one daemon thread at a time; `join()`
waits for it.
Error handling: a snapshot whose checksums do not match is reported and
ignored (the segments are the truth; recovery replays them instead). A
snapshot that cannot be written leaves no temporary directory behind; ENOSPC
raises StorageFull. A background snapshot that fails is reported in the
recovery problems and retried at the next due point.
"""

from __future__ import annotations

import errno
import io
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from stemedb import _hash
from stemedb.engine.files import FileLayer
from stemedb.engine.indexes import State
from stemedb.engine.segments import SegmentLog
from stemedb.errors import CorruptionError, StemeError, StorageFull

SNAPSHOT_VERSION = 5  # 5: the range trees; 4: the `place` column; 3: MANIFEST.json carries its own CRC-32C


class Checkpointer:
    """Writes the snapshots of one open store (see the module doc)."""

    def __init__(self, directory: str, files: FileLayer, state: State, lock: threading.RLock,
                 log: SegmentLog, *, sync_log: bool, every: int,
                 held_back: Callable[[], list[tuple[int, int, int]]],
                 report_problem: Callable[[str], None]) -> None:
        self.directory = directory
        self.files = files
        self.state = state
        self.lock = lock
        self.log = log
        self.sync_log = sync_log      # durability other than "sync": fsync the log first
        self.every = every
        self.held_back = held_back
        self.report_problem = report_problem
        self._write_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._since = 0               # records indexed since the last snapshot was captured
        self._written: int | None = None  # records the newest snapshot this process wrote holds

    def checkpoint(self) -> None:
        """Write a snapshot now (see Database.checkpoint)."""
        with self._write_lock:
            with self.lock:
                if self.sync_log:
                    self.log.sync()
                # The position the indexed state covers, not the log tail: a commit may
                # have appended frames it has not indexed yet (they are replayed on open).
                number, offset = self.state.position
                meta = {"position": [number, offset], "batch_seq": self.state.batch_seq,
                        "created_us": time.time_ns() // 1000,
                        # behind the position, so the next open would not find them again
                        "held_back": [list(entry) for entry in self.held_back()]}
                arrays = self.state.arrays_for_snapshot()
                count = self.state.count
                self._since = 0
            write_snapshot(self.files, self.directory, arrays, count, meta)
            self._written = count

    def at_close(self) -> None:
        """The snapshot of close (after join()): written unless the newest one is nearly current.

        Skipped when the newest snapshot this process wrote leaves fewer than
        1 % of `every` records for the next open to replay (a bulk load that
        has just crossed `every` would otherwise write two full snapshots in a
        row, the background one and this). Replaying them is what an open after
        a crash at that point does anyway.
        """
        with self.lock:
            tail = None if self._written is None else self.state.count - self._written
        if tail is not None and tail < max(self.every // 100, 1):
            return
        self.checkpoint()

    def indexed(self, records: int) -> None:
        """Count records just indexed; start a background snapshot when `every` are due."""
        self._since += records
        if self._since < self.every or (self._thread is not None and self._thread.is_alive()):
            return
        self._since = 0

        def run() -> None:
            try:
                self.checkpoint()
            except (OSError, StemeError) as exc:  # the segments stay the truth; retried later
                self.report_problem(f"background snapshot failed: {exc}")

        self._thread = threading.Thread(target=run, name="stemedb-snapshot", daemon=True)
        self._thread.start()

    def join(self) -> None:
        """Wait for a background snapshot in progress, if any."""
        if self._thread is not None:
            self._thread.join()


def write_snapshot(files: FileLayer, directory: str, arrays: dict[str, np.ndarray], count: int,
                   meta: dict[str, Any]) -> str:
    """Durably write a snapshot (arrays from State.arrays_for_snapshot) named by its record count.

    On any failure the partly written `snapshot-….tmp` is removed (the last
    complete snapshot stays); ENOSPC raises StorageFull.
    """
    if not files.exists(directory):
        files.makedirs(directory)
        files.fsync_dir(os.path.dirname(directory))
    name = f"snapshot-{count:012d}"
    final = os.path.join(directory, name)
    temp = final + ".tmp"
    if files.exists(temp):
        files.remove_tree(temp)
    try:
        _write_snapshot_files(files, temp, arrays, count, meta)
    except OSError as exc:
        files.remove_tree(temp)
        if exc.errno == errno.ENOSPC:
            raise StorageFull(
                f"no room to write an index snapshot in {directory}; free disk space (the "
                "records are safe in the segments; the next open replays them)") from exc
        raise
    if files.exists(final):
        files.remove_tree(final)
    files.rename(temp, final)
    files.fsync_dir(directory)
    for other in files.listdir(directory):
        if other != name and other.startswith("snapshot-"):
            files.remove_tree(os.path.join(directory, other))
    return final


def _write_snapshot_files(files: FileLayer, temp: str, arrays: dict[str, np.ndarray], count: int,
                          meta: dict[str, Any]) -> None:
    files.makedirs(temp)
    checksums = {}
    for key, array in arrays.items():
        buffer = io.BytesIO()
        np.save(buffer, array if array.ndim == 0 else np.ascontiguousarray(array),
                allow_pickle=False)
        data = buffer.getvalue()
        files.write_file(os.path.join(temp, key + ".npy"), data)
        checksums[key] = _hash.crc32c(data)
    manifest = dict(meta, version=SNAPSHOT_VERSION, records=count, checksums=checksums)
    manifest["manifest_crc32c"] = _manifest_checksum(manifest)
    files.write_file(os.path.join(temp, "MANIFEST.json"), json.dumps(manifest, indent=1).encode())
    files.fsync_dir(temp)


def load_snapshot(files: FileLayer, directory: str,
                  partitions: int = 0) -> tuple[State, dict[str, Any]] | None:
    """The newest snapshot whose checksums all match, or None (range trees for `partitions`).

    Raises ValueError describing the damage when the newest snapshot is bad,
    so the caller can report it before replaying the segments instead.
    """
    if not files.exists(directory):
        return None
    names = sorted(n for n in files.listdir(directory)
                   if n.startswith("snapshot-") and not n.endswith(".tmp"))
    if not names:
        return None
    path = os.path.join(directory, names[-1])
    try:
        manifest = json.loads(files.read_file(os.path.join(path, "MANIFEST.json")))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}/MANIFEST.json: unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("manifest_crc32c") != _manifest_checksum(manifest):
        raise ValueError(f"{path}/MANIFEST.json: checksum mismatch (snapshot damaged)")
    if manifest.get("version") != SNAPSHOT_VERSION:
        raise ValueError(f"{path}: unknown snapshot version {manifest.get('version')}")
    arrays = {}
    try:
        for key, expected in manifest["checksums"].items():
            file_path = os.path.join(path, key + ".npy")
            try:
                data = files.read_file(file_path)
            except OSError as exc:
                raise ValueError(f"{file_path}: unreadable ({exc})") from None
            if _hash.crc32c(data) != expected:
                raise ValueError(f"{file_path}: checksum mismatch (snapshot damaged)")
            arrays[key] = _npy_view(data, file_path)
        return State.from_snapshot(arrays, partitions), manifest
    except (KeyError, TypeError, CorruptionError) as exc:
        raise ValueError(f"{path}: inconsistent snapshot ({exc!r})") from None


def _manifest_checksum(manifest: dict[str, Any]) -> int:
    """CRC-32C of the manifest's canonical JSON, without the checksum field itself."""
    body = {k: v for k, v in manifest.items() if k != "manifest_crc32c"}
    return _hash.crc32c(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def _npy_view(data: bytes, path: str) -> np.ndarray:
    """The array in an .npy file's bytes, as a view (no copy; State copies once)."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    except ValueError as exc:
        raise ValueError(f"{path}: not an .npy file ({exc})") from None
    if dtype.hasobject or fortran:
        raise ValueError(f"{path}: unexpected array layout")
    count = int(np.prod(shape)) if shape else 1
    array = np.frombuffer(data, dtype=dtype, count=count, offset=stream.tell())
    return array.reshape(shape)
