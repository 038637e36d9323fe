"""Routing: which nodes a write goes to, which node serves a read, who pushes what.

Owns: the pure decisions of the write and read paths (docs/replication.md,
"Writes", "Reads"), without I/O: for a batch of records and the peers' states,
the nodes each record is sent to and whether they push it on (`plan_write`),
the records each push queue gets after a local write (`push_shares`), and the
replicas a read tries, in order (`read_order`). Must never: send, store or
wait; the node (node.py) carries the plans out.

The rules:
- acks=1: each record goes to one replica, its *primary*: this node when it
  is a replica, else the first up replica in rendezvous order (then the
  suspect ones); the primary stores it and pushes it to the other replicas.
  If a primary fails, the records are planned again without it.
- acks=all: each record goes to every up replica of its partition (this node
  counts as up); the write is acknowledged once all of them confirmed. The
  replicas that are not up get the records from this node's push queues
  (held until they are up), then from anti-entropy.
- Envelopes go with the members they prove, wherever those go; records of the
  global partition (votes, epochs, envelopes) are replicated to every node.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from stemedb.replication.membership import PeerState
from stemedb.replication.placement import GLOBAL, Placement


@dataclass
class WritePlan:
    """Per target node: the positions in the batch it stores, and whether it pushes them on."""

    sends: dict[str, np.ndarray] = field(default_factory=dict)   # node → positions (envelopes added)
    push: dict[str, bool] = field(default_factory=dict)
    required: dict[str, np.ndarray] = field(default_factory=dict)  # node → positions it is primary for
    deferred: dict[str, np.ndarray] = field(default_factory=dict)  # acks=all: non-up replica → positions
    unplaced: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


State = Callable[[str], PeerState]


def up_replicas(placement: Placement, partition: int, local: str, state: State) -> list[str]:
    return [n for n in placement.replicas(partition) if n == local or state(n) is PeerState.UP]


def with_envelopes(positions: Iterable[int], envelope_of: np.ndarray) -> np.ndarray:
    """`positions` plus the positions of the batch envelopes their members name (-1: none), sorted."""
    chosen = np.unique(np.asarray(list(positions), dtype=np.int64))
    if not len(chosen):
        return chosen
    proofs = envelope_of[chosen]
    return np.unique(np.concatenate([chosen, proofs[proofs >= 0]]))


def plan_write(placement: Placement, local: str, partitions: np.ndarray, envelope_of: np.ndarray,
               acks: str, state: State, exclude: frozenset[str] = frozenset()) -> WritePlan:
    """Where each record of a batch goes (see the module's rules).

    partitions[i] is record i's partition (GLOBAL for global records);
    envelope_of[i] the batch position of the envelope proving record i, or -1.
    `exclude` holds nodes that already failed this write (acks=1 replans).
    """
    if acks not in ("1", "all"):
        raise ValueError(f'acks: {acks!r}, expected "1" or "all"')
    plan = WritePlan()
    assigned: dict[str, list[int]] = {}
    deferred: dict[str, list[int]] = {}
    unplaced: list[int] = []
    for partition in np.unique(partitions).tolist():
        positions = np.nonzero(partitions == partition)[0].tolist()
        if acks == "1":
            targets = [n for n in read_order(placement, partition, local, state) if n not in exclude][:1]
        else:
            targets = [n for n in up_replicas(placement, partition, local, state) if n not in exclude]
            for node in placement.replicas(partition):
                if node not in targets and node != local:
                    deferred.setdefault(node, []).extend(positions)
        if not targets:
            unplaced.extend(positions)
        for node in targets:
            assigned.setdefault(node, []).extend(positions)
    for node, positions in assigned.items():
        plan.required[node] = np.array(sorted(positions), dtype=np.int64)
        plan.sends[node] = with_envelopes(positions, envelope_of)
        plan.push[node] = acks == "1"
    for node, positions in deferred.items():
        plan.deferred[node] = with_envelopes(positions, envelope_of)
    plan.unplaced = np.array(sorted(unplaced), dtype=np.int64)
    return plan


def push_shares(placement: Placement, local: str, partitions: np.ndarray, envelope_of: np.ndarray,
                *, include_global: bool) -> dict[str, np.ndarray]:
    """After this node stored a batch as its primary: the positions each peer's push queue gets.

    Each record goes to the other replicas of its partition; global records
    to every other node when `include_global` (the node that accepted the
    write pushes those; a forwarded primary does not, to avoid pushing them
    twice), and envelopes with the members they prove.
    """
    shares: dict[str, np.ndarray] = {}
    for peer in placement.cluster.peers_of(local):
        wanted = [i for i, p in enumerate(partitions.tolist())
                  if (include_global if p == GLOBAL else peer in placement.replicas(p))]
        if wanted:
            shares[peer] = with_envelopes(wanted, envelope_of)
    return shares


def read_order(placement: Placement, partition: int, local: str, state: State) -> list[str]:
    """Replicas to serve a read of (or take an acks=1 write for) `partition`, best first.

    This node when it is a replica, then the up replicas in rendezvous order,
    then the suspect ones; never the down ones.
    """
    replicas = placement.replicas(partition)
    order = [local] if local in replicas else []
    order += [n for n in replicas if n != local and state(n) is PeerState.UP]
    order += [n for n in replicas if n != local and state(n) is PeerState.SUSPECT]
    return order
