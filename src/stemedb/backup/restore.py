"""Restore a store from a backup and/or the archive, checked byte by byte, optionally as of a time.

Owns: choosing, from one or more sources (a backup destination, the archive),
the manifest that reaches furthest and, per segment, the source holding
the most of it; cutting the log at a point in time; writing the store into
a temporary directory beside the target; checking it (every part's BLAKE3
before it is written, the record count and record digest of the restored
bytes against the manifest's, then the store opened and verified, its IDs
digested again); and only then renaming it to the target. Must never: leave
anything at the target unless the whole store restored and verified, or
write into a target that holds anything.

Point in time: `as_of_us` keeps exactly the batches whose commit time is at
or before it, in commit order, and nothing after the first later batch.
Commit times are recorded by the archiver (each part lists its batches'
ends and the µs they became durable and indexed); a part without them (a
backup copied from the files) counts all its batches as committed when it
was captured — an upper bound, so a point-in-time restore never includes a
batch committed after the time asked for, though it may leave out untimed
ones committed just before it. Record timestamps are not used: they are
whatever the writer put in the record, while commit order is what the store
went through.

Error handling: a part whose checksum does not match, or that is missing,
raises CorruptionError / StemeError naming the object; a mismatched count or
digest, or a restored store that does not verify, raises CorruptionError;
the temporary directory is removed in every case.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stemedb import _segment
from stemedb.backup import catalog
from stemedb.backup.catalog import Manifest
from stemedb.backup.objects import Objects, open_objects
from stemedb.backup.point import frames_end
from stemedb.engine import database
from stemedb.engine.files import FileLayer
from stemedb.engine.manifest import Manifest as StoreManifest
from stemedb.engine.manifest import write_manifest
from stemedb.errors import CorruptionError, StemeError

_FILES = FileLayer()


@dataclass
class Restored:
    """What a restore produced."""

    target: str
    records: int
    position: tuple[int, int]
    cut_us: int | None          # the as-of time asked for (None: everything)
    sources: list[str]


@dataclass
class _Choice:
    objects: Objects
    segment: dict[str, Any]


def restore(sources: Sequence[str], target: str, *, as_of_us: int | None = None,
            backup: str | None = None) -> Restored:
    """Restore into `target` (absent or an empty directory) from `sources`; see the module doc.

    `backup` names one manifest of the first source (`backups/…json` or
    `archive.json`) instead of the newest.
    """
    target = os.path.abspath(target)
    if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise StemeError(f"{target}: not empty; restore into a new or empty directory (nothing "
                         "was written)")
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise StemeError(f"{parent}: no such directory to restore into")
    opened = [(location, open_objects(location)) for location in sources]
    manifests: list[tuple[Objects, Manifest]] = []
    for index, (location, objects) in enumerate(opened):
        if index == 0 and backup is not None:
            manifests.append((objects, catalog.read_manifest(objects, backup)))
        else:
            manifests.append((objects, catalog.newest(objects, location)))
    store = manifests[0][1].document["store"]
    for objects, manifest in manifests[1:]:
        if manifest.document["store"] != store:
            raise StemeError(f"{objects.describe(manifest.name)}: a backup of another store than "
                             f"{manifests[0][0].describe(manifests[0][1].name)}; give sources of "
                             "one store")
    chosen = _choose(manifests)
    temp = os.path.join(parent, f".{os.path.basename(target)}.restoring-{os.getpid()}")
    if os.path.exists(temp):
        shutil.rmtree(temp)
    try:
        records, digest, position = _write_store(temp, store, chosen, manifests, as_of_us)
        _check_opened(temp, records, digest)
        if os.path.isdir(target):
            os.rmdir(target)     # empty (checked above); the rename needs it gone
        os.rename(temp, target)
        _FILES.fsync_dir(parent)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return Restored(target, records, position, as_of_us, [location for location, _ in opened])


def _choose(manifests: list[tuple[Objects, Manifest]]) -> list[_Choice]:
    """Per segment, the source holding the most of it; segments 0..n without a gap."""
    best: dict[int, _Choice] = {}
    for objects, manifest in manifests:
        for segment in manifest.segments:
            number = int(segment["number"])
            if number not in best or int(segment["length"]) > int(best[number].segment["length"]):
                best[number] = _Choice(objects, segment)
    chosen = [best[n] for n in sorted(best)]
    for index, choice in enumerate(chosen):
        if int(choice.segment["number"]) != index:
            raise StemeError(f"segment {index} is in none of the sources (the backup and archive "
                             "do not meet); give a backup that covers it")
    return chosen


def _cut(chosen: list[_Choice], as_of_us: int) -> tuple[int, int] | None:
    """(segment, offset) to keep bytes before, for a point-in-time restore; None: keep all."""
    for choice in chosen:
        number = int(choice.segment["number"])
        for part in choice.segment["parts"]:
            start = int(part["offset"])
            kept = max(start, _segment.HEADER_SIZE)
            for batch_end, commit_us in part["commits"] or ():
                if int(commit_us) > as_of_us:
                    return number, kept
                kept = int(batch_end)
            if kept < int(part["batches_end"]) and int(part["captured_us"]) > as_of_us:
                return number, kept     # untimed batches: committed at the latest when captured
    return None


def _write_store(temp: str, store: dict[str, Any], chosen: list[_Choice],
                 manifests: list[tuple[Objects, Manifest]], as_of_us: int | None,
                 ) -> tuple[int, int, tuple[int, int]]:
    files = FileLayer()
    segment_size = int(store["segment_size"])
    segments_dir = os.path.join(temp, "segments")
    os.makedirs(segments_dir)
    cut = _cut(chosen, as_of_us) if as_of_us is not None else None
    records = digest = expected_records = expected_digest = 0
    position = (0, 0)
    newest = -1
    for choice in chosen:
        number = int(choice.segment["number"])
        if cut is not None and number > cut[0]:
            break
        limit = cut[1] if cut is not None and number == cut[0] else int(choice.segment["length"])
        frame_end = frames_end(int(choice.segment.get("version", 2)), segment_size)
        path = os.path.join(segments_dir, f"{number:08d}.seg")
        fd = files.open(path, create=True)
        try:
            files.preallocate(fd, segment_size)
            for part in choice.segment["parts"]:
                offset = int(part["offset"])
                if offset >= limit:
                    break
                data = _fetch(choice.objects, part)
                keep = memoryview(data)[:limit - offset]
                files.pwrite(fd, keep, offset)
                if len(keep) == len(data):
                    expected_records += int(part["records"])
                    expected_digest = (expected_digest
                                       + catalog.digest_value(part["record_digest"])) % catalog.MODULUS
                else:
                    count, value = catalog.part_records(keep, offset, frame_end)
                    expected_records += count
                    expected_digest = (expected_digest + value) % catalog.MODULUS
            files.fsync(fd)
            count, value = catalog.part_records(files.read(fd, segment_size, 0), 0, frame_end)
        finally:
            files.close(fd)
        records += count
        digest = (digest + value) % catalog.MODULUS
        position = (number, limit)
        newest = number
    files.fsync_dir(segments_dir)
    write_manifest(files, StoreManifest(os.path.join(temp, "MANIFEST"), segment_size,
                                        int(store["created_us"]), newest))
    files.fsync_dir(temp)
    if records != expected_records or digest != expected_digest:
        raise CorruptionError(f"restored segments hold {records} records, the backup's parts "
                              f"list {expected_records} (or their digest differs); the backup is "
                              "damaged: use another one", path=temp, offset=0)
    if cut is None and len(manifests) == 1:
        manifest = manifests[0][1]
        if records != manifest.records or catalog.digest_hex(digest) != \
                manifest.document["record_digest"]:
            raise CorruptionError(
                f"{manifests[0][0].describe(manifest.name)}: the restored records ({records}) "
                f"do not match the manifest's {manifest.records} or its record digest; the "
                "backup is damaged: use another one", path=manifest.name, offset=0)
    return records, digest, position


def _fetch(objects: Objects, part: dict[str, Any]) -> bytes:
    name = str(part["object"])
    data = objects.get(name)
    if len(data) != int(part["length"]) or catalog.blake3_hex(data) != part["blake3"]:
        raise CorruptionError(f"{objects.describe(name)}: its checksum does not match the backup "
                              "manifest (the file is damaged); nothing was restored — use another "
                              "backup, or the archive", path=objects.describe(name), offset=0)
    return data


def _check_opened(temp: str, records: int, digest: int) -> None:
    """Open the restored store, and require its IDs and a full verify to agree."""
    db = database.open(temp)
    try:
        indexed = catalog.record_digest(np.asarray(db.view.column("id")))
        if len(db) != records or indexed != digest:
            raise CorruptionError(f"the restored store indexes {len(db)} records, its segments "
                                  f"hold {records} (or their digests differ)", path=temp, offset=0)
        report = db.verify()
        if not report.ok:
            raise CorruptionError("the restored store does not verify: "
                                  + "; ".join(report.problems), path=temp, offset=0)
    finally:
        db.close()

