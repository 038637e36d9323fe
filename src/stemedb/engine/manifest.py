"""The store's MANIFEST: segment size, creation time, and the newest segment it knows.

Owns: `DIR/MANIFEST` (docs/format.md, "Data directory"): reading and checking
it, and rewriting it atomically (temp file → fsync → rename → fsync the
directory) each time a segment is created, so that it names the newest
segment and the loss of that file can be noticed, and once when a store is
first opened for a cluster, so that it records the partition count its
range trees are kept for. Must never: decide what a
missing segment means (the segment log and recovery do), or leave a MANIFEST
that a crash could tear (it is always replaced whole).

Error handling: a MANIFEST that does not parse, fails its CRC-32C, or lacks a
field raises CorruptionError naming the file; one written by a newer StemeDB
raises StemeError. A version-1 MANIFEST (written once, no checksum) is read
and checked as well as it can be, and rewritten as version 2 on the first
open by this version. ENOSPC while writing raises StorageFull; the old
MANIFEST is then still in place and the temporary file is removed.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from stemedb import _hash
from stemedb.engine.files import FileLayer
from stemedb.errors import CorruptionError, StemeError, StorageFull

STORE_VERSION = 2   # 2: a CRC-32C and the newest segment; 1: neither (still read, then upgraded)
NAME = "MANIFEST"
MAX_PARTITIONS = (1 << 16) - 2   # scopes 2 + p must fit the 2^16 scopes of a sync session


@dataclass
class Manifest:
    path: str
    segment_size: int
    created_us: int
    newest_segment: int        # the highest segment number ever created (-1: none yet)
    version: int = STORE_VERSION
    partitions: int = 0        # the cluster's partition count, once opened for one (0: never)
    # One rewrite at a time: a segment created by a commit and a first open for a cluster
    # may both rewrite it.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def document(self) -> dict[str, Any]:
        body: dict[str, Any] = {"version": STORE_VERSION, "segment_size": self.segment_size,
                                "created_us": self.created_us,
                                "newest_segment": self.newest_segment}
        if self.partitions:   # absent until set, so a store never opened for a cluster reads as before
            body["partitions"] = self.partitions
        body["crc32c"] = _checksum(body)
        return body


def new_manifest(directory: str, segment_size: int) -> Manifest:
    return Manifest(os.path.join(directory, NAME), segment_size, time.time_ns() // 1000, -1)


def read_manifest(files: FileLayer, directory: str, *, min_segment_size: int) -> Manifest | None:
    """The MANIFEST of the store in `directory`, checked; None if the store has none yet."""
    path = os.path.join(directory, NAME)
    if not files.exists(path):
        return None
    raw = files.read_file(path)
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _damaged(path, f"it is not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise _damaged(path, "it is not a JSON object")
    version = document.get("version")
    if "crc32c" in document:
        if document["crc32c"] != _checksum(document):
            raise _damaged(path, "its checksum does not match its content")
        if version != STORE_VERSION:
            raise StemeError(f"{path}: store version {version!r} is newer than this StemeDB "
                             f"understands ({STORE_VERSION}); open it with a newer release")
    elif version == 2:
        raise _damaged(path, "a version-2 MANIFEST without its checksum")
    elif version != 1:
        raise _damaged(path, f"version {version!r} without a checksum (damaged, or written by "
                       "a newer StemeDB)")
    segment_size = _whole(document, "segment_size", path)
    if segment_size < min_segment_size or segment_size % 4096:
        raise _damaged(path, f"segment_size {segment_size} is not a multiple of 4096 of at least "
                       f"{min_segment_size}")
    created_us = _whole(document, "created_us", path)
    newest = _whole(document, "newest_segment", path) if version == STORE_VERSION else -1
    if newest < -1:
        raise _damaged(path, f"newest_segment {newest} is negative")
    partitions = 0
    if "partitions" in document:
        partitions = _whole(document, "partitions", path)
        if not 1 <= partitions <= MAX_PARTITIONS:
                raise _damaged(path, f"partitions {partitions} is not in 1..{MAX_PARTITIONS}")
    return Manifest(path, segment_size, created_us, newest, version, partitions)


def write_manifest(files: FileLayer, manifest: Manifest) -> None:
    """Replace the MANIFEST atomically (temp → fsync → rename → fsync directory)."""
    with manifest.lock:
        _write(files, manifest)


def _write(files: FileLayer, manifest: Manifest) -> None:
    temp = manifest.path + ".tmp"
    data = json.dumps(manifest.document(), sort_keys=True, separators=(",", ":")).encode() + b"\n"
    try:
        files.write_file(temp, data)
        files.rename(temp, manifest.path)
        files.fsync_dir(os.path.dirname(manifest.path))
    except OSError as exc:
        try:
            if files.exists(temp):
                files.remove(temp)
        except OSError:
            pass
        if exc.errno == errno.ENOSPC:
            raise StorageFull(f"no room to rewrite {manifest.path}; free disk space, then write "
                              "again (reads keep working)") from exc
        raise
    manifest.version = STORE_VERSION


def _whole(document: dict[str, Any], key: str, path: str) -> int:
    value = document.get(key)
    if type(value) is not int:
        raise _damaged(path, f"field {key!r} is missing or not a whole number")
    return value


def _damaged(path: str, what: str) -> CorruptionError:
    return CorruptionError(
        f"{path}: damaged MANIFEST: {what}; restore it from a backup (the segment size is also "
        "in every segment header, see docs/format.md)", path=path, offset=0)


def _checksum(document: dict[str, Any]) -> int:
    """CRC-32C of the canonical JSON of the document without its checksum field."""
    body = {k: v for k, v in document.items() if k != "crc32c"}
    return _hash.crc32c(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
