"""Placement: partitions from the subject key, replicas by rendezvous hashing.

The compiled hashing is checked against the `blake3` package (an independent
implementation) using the bytes docs/replication.md specifies; the
rendezvous properties (R distinct replicas, removing a node moves only its
partitions, adding one moves about 1/N) are checked on thousands of
partitions; a few values are pinned so placement cannot change silently
between versions (it decides where existing data lives).
"""

from __future__ import annotations

import struct

import blake3
import numpy as np
import pytest

import stemedb
from stemedb import _codec
from stemedb.errors import InvalidRecord
from stemedb.replication.cluster import ClusterFile
from stemedb.replication.placement import (
    GLOBAL,
    Placement,
    moved_partitions,
    partition_of_scope,
    rendezvous_weight,
    scope_of,
    scopes_of,
    subject_partition,
)
from stemedb.replication.reconcile import GLOBAL_PARTITION

SIGNER = stemedb.Signer.from_seed(bytes([7]) * 32)


def cluster(nodes: list[str], *, partitions: int = 256, factor: int = 2) -> ClusterFile:
    lines = ['name = "t"', "version = 1", f"replication_factor = {factor}", f"partitions = {partitions}"]
    for index, node in enumerate(nodes):
        lines += ["[[nodes]]", f'id = "{node}"', f'address = "10.0.0.{index + 1}:7451"']
    return ClusterFile.parse("\n".join(lines) + "\n")


def reference_replicas(nodes: list[str], partition: int, factor: int) -> tuple[str, ...]:
    """docs/replication.md, "Replicas": BLAKE3(utf8(id) ‖ u32 LE partition), highest first."""
    weights = {n: blake3.blake3(n.encode() + struct.pack("<I", partition)).digest() for n in nodes}
    return tuple(sorted(nodes, key=lambda n: weights[n], reverse=True)[:factor])


def test_subject_partition_is_the_engine_subject_key_mod_partitions():
    for subject in ["aspirin", "", "ü-subject", "x" * 300]:
        digest = blake3.blake3(subject.encode()).digest()
        key = int.from_bytes(digest[:8], "little")
        assert _codec.subject_key(subject) == key
        assert subject_partition(subject, 256) == key % 256
        assert subject_partition(subject, 65536) == key % 65536


def test_rendezvous_weight_is_blake3_of_id_and_partition():
    assert rendezvous_weight("n1", 0) == blake3.blake3(b"n1\x00\x00\x00\x00").digest()
    assert rendezvous_weight("n1", 0x01020304) == blake3.blake3(b"n1\x04\x03\x02\x01").digest()


@pytest.mark.parametrize("nodes,factor,partitions", [
    (["n1", "n2", "n3"], 2, 256), (["a"], 1, 16), (["x", "y", "z", "w", "v"], 3, 1000),
    (["nœud-1", "nœud-2"], 2, 7),
])
def test_vectorised_table_matches_the_reference(nodes, factor, partitions):
    placement = Placement(cluster(nodes, partitions=partitions, factor=factor))
    for partition in range(partitions):
        assert placement.replicas(partition) == reference_replicas(nodes, partition, factor)


def test_pinned_placement_of_the_example_cluster():
    placement = Placement(cluster(["n1", "n2", "n3"]))
    assert [placement.replicas(p) for p in range(5)] == [
        ("n2", "n3"), ("n3", "n1"), ("n2", "n3"), ("n3", "n2"), ("n2", "n1")]
    assert rendezvous_weight("n1", 0).hex() == \
        "4cbdc8f2dd3b290471549a16ae912acbb4647b1373b3c812ee7c4504af3adb3d"
    assert placement.subject_partition("aspirin") == 214
    assert placement.replicas(GLOBAL) == ("n1", "n2", "n3")


def test_every_partition_has_r_distinct_replicas_and_counts_are_balanced():
    nodes = [f"node-{i}" for i in range(5)]
    placement = Placement(cluster(nodes, partitions=4096, factor=3))
    held = dict.fromkeys(nodes, 0)
    for partition in range(4096):
        replicas = placement.replicas(partition)
        assert len(replicas) == 3 and len(set(replicas)) == 3
        for node in replicas:
            held[node] += 1
    for node in nodes:
        assert len(placement.partitions_of(node)) == held[node]
        # 4096 × 3 / 5 = 2457.6 each; a binomial spread of a few dozen.
        assert abs(held[node] - 2457.6) < 150, held


def test_removing_a_node_moves_only_its_partitions():
    nodes = ["n1", "n2", "n3", "n4", "n5"]
    before = Placement(cluster(nodes, partitions=2048, factor=2))
    after = Placement(cluster([n for n in nodes if n != "n3"], partitions=2048, factor=2))
    moved = moved_partitions(before, after)
    assert set(moved) == set(before.partitions_of("n3"))
    for partition, (old, new) in moved.items():
        kept = [n for n in old if n != "n3"]
        assert set(kept) < set(new) and len(set(new) - set(old)) == 1, (partition, old, new)


def test_adding_a_node_moves_about_one_nth_of_the_replicas():
    nodes = ["n1", "n2", "n3"]
    partitions, factor = 4096, 2
    before = Placement(cluster(nodes, partitions=partitions, factor=factor))
    after = Placement(cluster(nodes + ["n4"], partitions=partitions, factor=factor))
    moved = moved_partitions(before, after)
    for old, new in moved.values():
        assert "n4" in new and len(set(old) - set(new)) == 1   # n4 takes exactly one slot
    assert set(moved) == set(after.partitions_of("n4"))
    copies_moved = len(moved) / (partitions * factor)
    assert abs(copies_moved - 1 / 4) < 0.02, copies_moved     # 1/N of the copies, N = 4 nodes now


def test_shared_partitions_and_scopes():
    placement = Placement(cluster(["n1", "n2", "n3"], partitions=64))
    for a, b in [("n1", "n2"), ("n2", "n3"), ("n1", "n3")]:
        shared = placement.shared_partitions(a, b)
        assert shared == tuple(p for p in range(64) if {a, b} <= set(placement.replicas(p)))
    assert scope_of(GLOBAL) == GLOBAL_PARTITION and scope_of(0) == 2 and scope_of(63) == 65
    assert partition_of_scope(scope_of(17)) == 17 and partition_of_scope(GLOBAL_PARTITION) == GLOBAL
    assert scopes_of(np.array([GLOBAL, 0, 5])).tolist() == [1, 2, 7]
    with pytest.raises(ValueError, match="partition: 64, expected 0..63 or GLOBAL"):
        placement.replicas(64)


def records_of_every_kind():
    assertion = stemedb.Assertion("aspirin", "treats", stemedb.Ref("headache"), timestamp=1).sign(SIGNER)
    vote = stemedb.Vote(assertion, 1.0, timestamp=2).sign(SIGNER)            # version 2: its subject
    bare_vote = stemedb.Vote(assertion.id, 1.0, timestamp=2).sign(SIGNER)    # version 1: no subject
    epoch = stemedb.Epoch("e1", timestamp=3).sign(SIGNER)
    members, envelope = SIGNER.sign_batch([stemedb.Assertion("ibuprofen", "treats", "pain", timestamp=4)],
                                          timestamp=5)
    return [assertion, vote, bare_vote, epoch, envelope, *members]


def test_record_partitions_from_encoded_bytes():
    placement = Placement(cluster(["n1", "n2", "n3"]))
    records = records_of_every_kind()
    blob, offsets, _ = _codec.encode_many(records)
    # A version-2 vote lives with the assertion it votes on; a version-1 vote is global.
    expected = [placement.subject_partition("aspirin"), placement.subject_partition("aspirin"),
                GLOBAL, GLOBAL, GLOBAL, placement.subject_partition("ibuprofen")]
    assert placement.record_partitions(blob, offsets).tolist() == expected
    for record, partition in zip(records, expected):
        assert placement.record_partition(record.encode()) == partition
    assert placement.record_partitions(b"", np.array([0])).tolist() == []
    with pytest.raises(InvalidRecord):
        placement.record_partition(records[0].encode()[:20])
