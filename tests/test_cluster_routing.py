"""Routing decisions: write plans under acks=1 and acks=all, push shares, read order.

The cluster is the documented example (n1, n2, n3, R = 2, 256 partitions),
whose pinned placement holds partition 0 on (n2, n3) and partition 1 on
(n3, n1).
"""

from __future__ import annotations

import numpy as np
import pytest

from stemedb.replication.cluster import ClusterFile
from stemedb.replication.membership import PeerState
from stemedb.replication.placement import GLOBAL, Placement
from stemedb.replication.routing import plan_write, push_shares, read_order, with_envelopes

UP, SUSPECT, DOWN = PeerState.UP, PeerState.SUSPECT, PeerState.DOWN
PLACEMENT = Placement(ClusterFile.parse(
    'name = "demo"\nversion = 1\nreplication_factor = 2\npartitions = 256\n'
    + "".join(f'[[nodes]]\nid = "n{i}"\naddress = "h:{i}"\n' for i in (1, 2, 3))))
assert PLACEMENT.replicas(0) == ("n2", "n3") and PLACEMENT.replicas(1) == ("n3", "n1")

# A batch: an envelope (global), two of its members in partitions 0 and 1, a vote (global),
# and an individually signed assertion in partition 0.
PARTITIONS = np.array([GLOBAL, 0, 1, GLOBAL, 0])
ENVELOPE_OF = np.array([-1, 0, 0, -1, -1])


def states(**given):
    return lambda node: given.get(node, UP)


def plan(local, acks, **given):
    return plan_write(PLACEMENT, local, PARTITIONS, ENVELOPE_OF, acks, states(**given))


def test_acks_1_stores_locally_what_this_node_replicates_and_forwards_the_rest_to_one_replica():
    p = plan("n1", "1")
    assert p.required["n1"].tolist() == [0, 2, 3]         # global records and partition 1
    assert p.required["n2"].tolist() == [1, 4]            # partition 0's first replica
    assert p.sends["n2"].tolist() == [0, 1, 4]            # ... with the envelope of its member
    assert p.sends["n1"].tolist() == [0, 2, 3]
    assert p.push == {"n1": True, "n2": True} and not p.deferred and not len(p.unplaced)


def test_acks_1_skips_down_replicas_prefers_up_over_suspect_and_replans_without_failures():
    assert set(plan("n1", "1", n2=DOWN).required) == {"n1", "n3"}
    assert plan("n1", "1", n2=SUSPECT).required["n3"].tolist() == [1, 4]
    assert plan("n1", "1", n2=SUSPECT, n3=DOWN).required["n2"].tolist() == [1, 4]
    unplaced = plan("n1", "1", n2=DOWN, n3=DOWN)
    assert unplaced.unplaced.tolist() == [1, 4] and "n2" not in unplaced.sends
    again = plan_write(PLACEMENT, "n1", PARTITIONS, ENVELOPE_OF, "1", states(),
                       exclude=frozenset({"n2", "n1"}))
    assert again.required == {"n3": again.required["n3"]} and again.required["n3"].tolist() == [0, 1, 2, 3, 4]
    stuck = plan_write(PLACEMENT, "n1", PARTITIONS, ENVELOPE_OF, "1", states(),
                       exclude=frozenset({"n2", "n3"}))
    assert stuck.unplaced.tolist() == [1, 4] and stuck.required["n1"].tolist() == [0, 2, 3]


def test_acks_all_sends_to_every_up_replica_and_defers_the_others():
    p = plan("n1", "all", n3=DOWN)
    assert p.required["n1"].tolist() == [0, 2, 3]
    assert p.required["n2"].tolist() == [0, 1, 3, 4]      # global records and partition 0
    assert p.push == {"n1": False, "n2": False}
    assert p.deferred["n3"].tolist() == [0, 1, 2, 3, 4]   # n3 holds every partition here
    assert not len(p.unplaced)
    full = plan("n1", "all")
    assert set(full.required) == {"n1", "n2", "n3"} and not full.deferred
    suspect = plan("n1", "all", n2=SUSPECT, n3=SUSPECT)
    assert suspect.unplaced.tolist() == [1, 4]            # partition 0: no replica up
    assert set(suspect.deferred) == {"n2", "n3"}


def test_unknown_acks_are_refused():
    with pytest.raises(ValueError, match='acks: \'2\', expected "1" or "all"'):
        plan("n1", "2")


def test_push_shares_follow_replicas_and_carry_envelopes():
    shares = push_shares(PLACEMENT, "n2", PARTITIONS, ENVELOPE_OF, include_global=True)
    assert shares["n3"].tolist() == [0, 1, 2, 3, 4]       # replica of 0 and 1, and every global
    assert shares["n1"].tolist() == [0, 2, 3]
    forwarded = push_shares(PLACEMENT, "n2", PARTITIONS, ENVELOPE_OF, include_global=False)
    assert forwarded["n3"].tolist() == [0, 1, 2, 4]       # the envelope rides with its members
    assert forwarded["n1"].tolist() == [0, 2]
    assert with_envelopes([], ENVELOPE_OF).tolist() == []


def test_read_order():
    assert read_order(PLACEMENT, 1, "n1", states()) == ["n1", "n3"]
    assert read_order(PLACEMENT, 0, "n1", states(n2=SUSPECT)) == ["n3", "n2"]
    assert read_order(PLACEMENT, 0, "n1", states(n2=DOWN, n3=DOWN)) == []
    assert read_order(PLACEMENT, GLOBAL, "n2", states(n1=DOWN)) == ["n2", "n3"]
