"""The indexes: fixed-width columns, the ID hash index and the posting lists.

Owns: the per-record columns (location, length, ID, and the fields of
`_codec.COLUMNS`), the ID hash index, the posting lists, the epoch
supersession links and the range trees of replication (`_reconcile.ScopeTrees`:
records ordered by (timestamp, ID), the whole store and, in a store kept
for a cluster, each partition); adding a batch of durable records to all of
them in one call (`State.add`, under the database's state lock); where in
the log the indexed records end (`position`, `batch_seq`); and turning all
of it into the arrays a snapshot stores and back. Must never: write files
(snapshots.py does), or change anything for a record that is not yet durable.

The range trees are persisted as the whole store's record numbers in key
order (4 bytes a record) and bulk-loaded from it in one O(n) pass; the
partition trees are split off that order when the store is opened for a
cluster (`keep_partitions`), so a snapshot does not depend on the
partition count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from stemedb import _codec, _index, _reconcile
from stemedb.records import RecordKind

# Posting lists: name → the column whose key it indexes (0 = no entry).
POSTINGS = {
    "subject": "subject",
    "pair": "pair",
    "predicate": "predicate",
    "signer": "signer",
    "target": "target",      # votes by assertion, revisions by parent
    "epoch": "epoch",        # assertions by epoch
}

# kind_counts has one slot per RecordKind value (slot 0 unused: no kind is 0).
KIND_SLOTS = max(RecordKind) + 1

EXTRA_COLUMNS = {
    "location": np.uint64,   # segment number << 32 | frame offset
    "length": np.uint32,     # payload (encoded record) bytes
}


class Columns:
    """Growable fixed-width arrays, one row per record number."""

    def __init__(self, capacity: int = 1024) -> None:
        self.count = 0
        self.capacity = max(capacity, 1024)
        self.generation = 0      # +1 each time the arrays are replaced (readers re-take them then)
        self.arrays: dict[str, np.ndarray] = {}
        for name, dtype in {**_codec.COLUMNS, **EXTRA_COLUMNS}.items():
            self.arrays[name] = np.zeros(self.capacity, dtype=dtype)
        self.arrays["id"] = np.zeros((self.capacity, 32), dtype=np.uint8)

    def release(self) -> None:
        """Back to an empty table of the smallest capacity, in the same dict (readers hold it):
        a closing store frees its columns at once, not when the garbage collector gets to it."""
        self.count = 0
        self.capacity = 1024
        for name, array in self.arrays.items():
            self.arrays[name] = np.zeros((self.capacity,) + array.shape[1:], dtype=array.dtype)
        self.generation += 1

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
        self.generation += 1

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

    def __init__(self, partitions: int = 0) -> None:
        self.columns = Columns()
        self.ids = _index.IdIndex()
        self.postings = {name: _index.PostingIndex() for name in POSTINGS}
        self.superseded_by = EpochLinks()
        self.kind_counts = np.zeros(KIND_SLOTS, dtype=np.int64)
        self.trees = _reconcile.ScopeTrees(partitions)
        # Where the indexed records end in the log: the next frame after the last
        # indexed batch (segment, offset), and that batch's sequence number.
        self.position: tuple[int, int] = (0, 0)
        self.batch_seq = 0

    @property
    def count(self) -> int:
        return self.columns.count

    def release(self) -> None:
        """Free the in-memory indexes of a closing store (under the state lock, after the last
        write and snapshot). The Database object may outlive close() by a long time, or wait
        in a reference cycle for the garbage collector: its memory does not. Empty afterwards."""
        self.columns.release()
        self.ids.release()
        for index in self.postings.values():
            index.release()
        self.superseded_by = EpochLinks()
        self.trees = _reconcile.ScopeTrees(self.partitions)

    def all_ids(self) -> np.ndarray:
        return self.columns.arrays["id"]

    def lookup_many(self, ids: np.ndarray) -> np.ndarray:
        return self.ids.lookup_many(ids, self.all_ids())

    def add(self, ids: np.ndarray, columns: dict[str, np.ndarray],
            epoch_links: Sequence[tuple[int, bytes]] = ()) -> np.ndarray:
        """Index a batch of durable records; returns their record numbers.

        `epoch_links` are (index in this batch, superseded epoch ID) pairs.
        """
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
        for index, superseded in epoch_links:
            self.superseded_by.add(_codec.id_key(superseded), start + index)
        self.kind_counts += np.bincount(columns["kind"], minlength=KIND_SLOTS)[:KIND_SLOTS]
        arrays = self.columns.arrays
        self.trees.add(recnos, columns["kind"], columns["place"], arrays["timestamp"], arrays["id"])
        return recnos

    @property
    def partitions(self) -> int:
        """The partition count the range trees are kept for (0: the whole store only)."""
        return int(self.trees.partitions)

    def keep_partitions(self, partitions: int) -> None:
        """Start keeping a range tree per partition, split off the whole store's (O(n), once)."""
        arrays = self.columns.arrays
        self.trees.keep_partitions(partitions, self.count, arrays["kind"], arrays["place"],
                                   arrays["timestamp"], arrays["id"])

    def reconcile_items(self, scope: int) -> tuple[_reconcile.RangeTree, np.ndarray, np.ndarray]:
        """(tree, timestamps, ids) of a scope: valid while the state lock is held."""
        arrays = self.columns.arrays
        return self.trees.tree(scope), arrays["timestamp"], arrays["id"]

    def memory_bytes(self) -> dict[str, int]:
        return {
            "columns": self.columns.memory_bytes(),
            "id_index": self.ids.memory_bytes(),
            "postings": sum(p.memory_bytes() for p in self.postings.values()),
            "range_trees": int(self.trees.memory_bytes()),
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
        for key, value in self.trees.state().items():
            if key != "partitions":          # split off again at open, for the count it asks for
                out[f"trees.{key}"] = np.asarray(value)
        return out

    @classmethod
    def from_snapshot(cls, arrays: dict[str, np.ndarray], partitions: int = 0) -> State:
        """The state a snapshot holds, range trees kept for `partitions` (split in the same pass)."""
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
        columns = state.columns.arrays
        state.trees = _reconcile.ScopeTrees.from_state(
            index_state("trees"), partitions, count, columns["kind"], columns["place"], columns["timestamp"],
            columns["id"])
        return state


def epoch_links(buffer: Any, starts: np.ndarray, lengths: np.ndarray,
                kinds: np.ndarray) -> list[tuple[int, bytes]]:
    """(index, superseded epoch ID) for each Epoch record's supersedes list.

    The records are buffer[starts[i]:starts[i] + lengths[i]]; only the Epoch
    records are decoded (epochs are rare).
    """
    links: list[tuple[int, bytes]] = []
    for index in np.nonzero(kinds == RecordKind.EPOCH)[0]:
        start = int(starts[index])
        epoch = _codec.decode(bytes(buffer[start:start + int(lengths[index])]))
        links.extend((int(index), superseded) for superseded in epoch.supersedes)
    return links
