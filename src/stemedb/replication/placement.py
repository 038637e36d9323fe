"""Placement: which partition a record belongs to, and which nodes hold each partition.

Owns: the partition of a record (docs/replication.md, "Partitions and
placement"): an assertion's is its subject key modulo the partition count,
where the subject key is the engine's own posting-list key (the first 8
bytes, little-endian, of BLAKE3 of the subject's UTF-8), so every claim about
a subject lives on the same replicas; a version-2 vote's is the subject key
it carries (its assertion's) modulo the count, so it lives with the
assertion; every other record (version-1 votes, epochs, envelopes) is in the
GLOBAL partition, held by every node. The rule itself is
`_reconcile.partitions_of` over the `kind` and `place` columns, the one the
engine's range trees use. And the replicas
of a partition: the R nodes with the highest rendezvous weight
BLAKE3(utf8(node id) ‖ u32 LE partition), compared as 32-byte big-endian
numbers. Must never: read or store records, or depend on anything but the
cluster file (two nodes with the same file place every record alike).

Error handling: a record that breaks the format raises InvalidRecord naming
it (the codec's bounds-checked walk).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from stemedb import _codec, _hash, _reconcile
from stemedb.replication.cluster import ClusterFile
from stemedb.replication.reconcile import GLOBAL_PARTITION, partition_scope

GLOBAL = -1   # the partition number of records every node holds


def subject_partition(subject: str, partitions: int) -> int:
    """The partition of the assertions about `subject`."""
    return _codec.subject_key(subject) % partitions


def rendezvous_weight(node_id: str, partition: int) -> bytes:
    """The 32-byte weight of `node_id` for `partition`: BLAKE3(utf8(id) ‖ u32 LE partition)."""
    return _hash.blake3(node_id.encode() + struct.pack("<I", partition))


def scope_of(partition: int) -> int:
    """The reconciliation scope of a partition (GLOBAL included; reconcile.py numbers them)."""
    return GLOBAL_PARTITION if partition == GLOBAL else partition_scope(partition)


def scopes_of(partitions: np.ndarray) -> np.ndarray:
    """`scope_of` of each partition, int64."""
    partitions = np.asarray(partitions, dtype=np.int64)
    return np.where(partitions == GLOBAL, GLOBAL_PARTITION, partitions + partition_scope(0))


def partition_of_scope(scope: int) -> int:
    return GLOBAL if scope == GLOBAL_PARTITION else scope - partition_scope(0)


@dataclass(frozen=True)
class Placement:
    """The placement of one cluster file: replicas of every partition, computed once."""

    cluster: ClusterFile
    _replicas: tuple[tuple[str, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ids = self.cluster.node_ids
        count = self.cluster.partitions
        # One BLAKE3 per (node, partition) in one native call: the inputs back to back.
        suffixes = np.arange(count, dtype="<u4").view(np.uint8).reshape(count, 4)
        pieces, offsets = [], [0]
        for node_id in ids:
            prefix = np.frombuffer(node_id.encode(), dtype=np.uint8)
            rows = np.hstack([np.broadcast_to(prefix, (count, len(prefix))), suffixes])
            pieces.append(rows.tobytes())
            offsets.extend(offsets[-1] + (np.arange(1, count + 1) * rows.shape[1]))
        digests = _hash.blake3_concat(b"".join(pieces), np.array(offsets, dtype=np.int64))
        weights = digests.reshape(len(ids), count, 32)
        factor = self.cluster.replication_factor
        table = []
        for partition in range(count):
            ranked = sorted(range(len(ids)), key=lambda n: weights[n, partition].tobytes(), reverse=True)
            table.append(tuple(ids[n] for n in ranked[:factor]))
        object.__setattr__(self, "_replicas", tuple(table))

    @property
    def partitions(self) -> int:
        return self.cluster.partitions

    def replicas(self, partition: int) -> tuple[str, ...]:
        """The nodes holding `partition`, highest weight first (GLOBAL: every node, file order)."""
        if partition == GLOBAL:
            return self.cluster.node_ids
        if not 0 <= partition < self.cluster.partitions:
            raise ValueError(f"partition: {partition}, expected 0..{self.cluster.partitions - 1} or GLOBAL")
        return self._replicas[partition]

    def holds(self, node_id: str, partition: int) -> bool:
        return node_id in self.replicas(partition)

    def partitions_of(self, node_id: str) -> tuple[int, ...]:
        """The partitions `node_id` holds (GLOBAL not included: every node holds it)."""
        self.cluster.node(node_id)
        return tuple(p for p, nodes in enumerate(self._replicas) if node_id in nodes)

    def shared_partitions(self, a: str, b: str) -> tuple[int, ...]:
        """The partitions both nodes hold (GLOBAL not included)."""
        self.cluster.node(a)
        self.cluster.node(b)
        return tuple(p for p, nodes in enumerate(self._replicas) if a in nodes and b in nodes)

    def subject_partition(self, subject: str) -> int:
        return subject_partition(subject, self.cluster.partitions)

    def partitions_of_columns(self, kinds: np.ndarray, places: np.ndarray) -> np.ndarray:
        """Partition of each record from its `kind` and `place` columns (GLOBAL = -1), int64."""
        return _reconcile.partitions_of(kinds, places, self.cluster.partitions)  # type: ignore[no-any-return]

    def record_partitions(self, blob: bytes | memoryview, offsets: np.ndarray) -> np.ndarray:
        """Partition of each encoded record blob[offsets[i]:offsets[i+1]] (GLOBAL = -1), int64.

        Uses the codec's column extraction, the same walk that indexes a
        stored record, so no record object is built.
        """
        offsets = np.asarray(offsets, dtype=np.int64)
        if len(offsets) < 2:
            return np.zeros(0, dtype=np.int64)
        columns = _codec.extract_columns(blob, offsets[:-1], np.diff(offsets).astype(np.uint32))
        return self.partitions_of_columns(columns["kind"], columns["place"])

    def record_partition(self, encoded: bytes) -> int:
        """Partition of one encoded record (GLOBAL = -1)."""
        return int(self.record_partitions(encoded, np.array([0, len(encoded)]))[0])


def moved_partitions(old: Placement, new: Placement) -> dict[int, tuple[tuple[str, ...], tuple[str, ...]]]:
    """Partitions whose replica set differs: partition → (old replicas, new replicas)."""
    if old.partitions != new.partitions:
        raise ValueError("placements of different partition counts cannot be compared")
    moved = {}
    for partition in range(old.partitions):
        before, after = old.replicas(partition), new.replicas(partition)
        if set(before) != set(after):
            moved[partition] = (before, after)
    return moved
