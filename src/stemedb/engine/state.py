"""In-memory indexes and fixed-width columns, and their snapshots on disk.

Owns: the per-record columns (location, ID, and the fields of
`_codec.COLUMNS`), the ID hash index and the posting lists, adding a batch of
durable records to all of them, and writing / loading snapshots atomically
(temp directory → fsync files → rename → fsync parent). Must never: write
segments, or change anything for a record that is not yet durable.

Resource handling: a snapshot is a directory of .npy files plus MANIFEST.json;
older snapshots are removed only after a newer one is durably named.
Error handling: a snapshot whose checksums do not match is reported and
ignored (the segments are the truth; recovery replays them instead). A
snapshot that cannot be written leaves no temporary directory behind; ENOSPC
raises StorageFull.
"""

from __future__ import annotations

import errno
import io
import json
import os
from typing import Any

import numpy as np

from stemedb import _codec, _hash, _index
from stemedb.engine.files import FileLayer
from stemedb.errors import CorruptionError, StorageFull

SNAPSHOT_VERSION = 3  # 3: MANIFEST.json carries its own CRC-32C

# Posting lists: name → the column whose key it indexes (0 = no entry).
POSTINGS = {
    "subject": "subject",
    "pair": "pair",
    "predicate": "predicate",
    "signer": "signer",
    "target": "target",      # votes by assertion, revisions by parent
    "epoch": "epoch",        # assertions by epoch
}

EXTRA_COLUMNS = {
    "location": np.uint64,   # segment number << 32 | frame offset
    "length": np.uint32,     # payload (encoded record) bytes
}


class Columns:
    """Growable fixed-width arrays, one row per record number."""

    def __init__(self, capacity: int = 1024) -> None:
        self.count = 0
        self.capacity = max(capacity, 1024)
        self.arrays: dict[str, np.ndarray] = {}
        for name, dtype in {**_codec.COLUMNS, **EXTRA_COLUMNS}.items():
            self.arrays[name] = np.zeros(self.capacity, dtype=dtype)
        self.arrays["id"] = np.zeros((self.capacity, 32), dtype=np.uint8)

    def reserve(self, extra: int) -> None:
        needed = self.count + extra
        if needed <= self.capacity:
            return
        capacity = self.capacity
        while capacity < needed:
            capacity *= 2
        for name, array in self.arrays.items():
            grown = np.zeros((capacity,) + array.shape[1:], dtype=array.dtype)
            grown[: self.count] = array[: self.count]
            self.arrays[name] = grown
        self.capacity = capacity

    def append(self, values: dict[str, np.ndarray], n: int) -> None:
        self.reserve(n)
        start, end = self.count, self.count + n
        for name, array in values.items():
            self.arrays[name][start:end] = array
        self.count = end

    def view(self, name: str) -> np.ndarray:
        return self.arrays[name][: self.count]

    def memory_bytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


class EpochLinks:
    """Superseded epoch key → record numbers of the epochs that supersede it.

    Epochs are rare and one epoch may supersede many, so a dict of lists (a
    PostingIndex holds one key per record).
    """

    def __init__(self) -> None:
        self.links: dict[int, list[int]] = {}

    def add(self, key: int, recno: int) -> None:
        self.links.setdefault(key, []).append(recno)

    def get(self, key: int) -> np.ndarray:
        return np.array(self.links.get(key, ()), dtype=np.uint32)

    def __len__(self) -> int:
        return len(self.links)


class State:
    """Everything derived from the segments that reads need."""

    def __init__(self) -> None:
        self.columns = Columns()
        self.ids = _index.IdIndex()
        self.postings = {name: _index.PostingIndex() for name in POSTINGS}
        self.superseded_by = EpochLinks()
        self.kind_counts = np.zeros(5, dtype=np.int64)

    @property
    def count(self) -> int:
        return self.columns.count

    def all_ids(self) -> np.ndarray:
        return self.columns.arrays["id"]

    def lookup_many(self, ids: np.ndarray) -> np.ndarray:
        return self.ids.lookup_many(ids, self.all_ids())

    def add(self, ids: np.ndarray, columns: dict[str, np.ndarray],
            epoch_links: list[tuple[int, bytes]] | None = None) -> np.ndarray:
        """Index a batch of durable records; returns their record numbers."""
        n = len(ids)
        start = self.count
        if n == 0:
            return np.zeros(0, dtype=np.uint32)
        recnos = np.arange(start, start + n, dtype=np.uint32)
        values = dict(columns)
        values["id"] = ids
        self.columns.append(values, n)
        self.ids.insert_many(ids, recnos, self.all_ids())
        for name, column in POSTINGS.items():
            keys = columns[column]
            mask = keys != 0
            if mask.any():
                self.postings[name].add_many(keys[mask], recnos[mask])
        for recno, superseded in epoch_links or ():
            self.superseded_by.add(_codec.id_key(superseded), recno)
        self.kind_counts += np.bincount(columns["kind"], minlength=5)[:5]
        return recnos

    def memory_bytes(self) -> dict[str, int]:
        return {
            "columns": self.columns.memory_bytes(),
            "id_index": self.ids.memory_bytes(),
            "postings": sum(p.memory_bytes() for p in self.postings.values()),
        }

    # -- snapshots -----------------------------------------------------------

    def arrays_for_snapshot(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name in self.columns.arrays:
            out[f"column.{name}"] = self.columns.view(name)
        pairs = [(key, recno) for key, recnos in self.superseded_by.links.items() for recno in recnos]
        out["superseded_by.keys"] = np.array([k for k, _ in pairs], dtype=np.uint64)
        out["superseded_by.recnos"] = np.array([r for _, r in pairs], dtype=np.uint32)
        indexes: list[tuple[str, Any]] = [("ids", self.ids)]
        indexes += [(f"posting.{k}", v) for k, v in self.postings.items()]
        for prefix, index in indexes:
            for key, value in index.state().items():
                out[f"{prefix}.{key}"] = np.asarray(value)
        out["kind_counts"] = self.kind_counts.copy()
        return out

    @classmethod
    def from_snapshot(cls, arrays: dict[str, np.ndarray]) -> State:
        state = cls()
        count = len(arrays["column.id"])
        state.columns.reserve(count)
        for name in state.columns.arrays:
            state.columns.arrays[name][:count] = arrays[f"column.{name}"]
        state.columns.count = count

        def index_state(prefix: str) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for key, value in arrays.items():
                if key.startswith(prefix + "."):
                    field = key[len(prefix) + 1:]
                    out[field] = value.item() if value.ndim == 0 else value
            return out

        state.ids = _index.IdIndex.from_state(index_state("ids"))
        state.postings = {name: _index.PostingIndex.from_state(index_state(f"posting.{name}"))
                          for name in POSTINGS}
        state.superseded_by = EpochLinks()
        for key, recno in zip(arrays["superseded_by.keys"].tolist(), arrays["superseded_by.recnos"].tolist()):
            state.superseded_by.add(key, recno)
        state.kind_counts = np.array(arrays["kind_counts"], dtype=np.int64)
        return state


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


def load_snapshot(files: FileLayer, directory: str) -> tuple[State, dict[str, Any]] | None:
    """The newest snapshot whose checksums all match, or None.

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
        return State.from_snapshot(arrays), manifest
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
