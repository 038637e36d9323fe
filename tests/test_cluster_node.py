"""Cluster nodes end to end on the simulated network: the write path, push, acks, down replicas.

Three nodes with real stores over a fault-free SimNetwork under trio's
MockClock. The documented example cluster is used, whose pinned placement
holds partition 0 on (n2, n3), partition 1 on (n3, n1); subjects are chosen
by their partition. What each ack policy promises is checked the moment the
write returns, before any push could have delivered it.
"""

from __future__ import annotations

import errno
import logging

import numpy as np
import pytest
import trio
import trio.testing
from sim.cluster import running, wait_until
from sim.forgery import forge

import stemedb
from stemedb import _codec
from stemedb.errors import SignatureError, Unavailable
from stemedb.replication.cluster import ClusterFile
from stemedb.replication.framing import RecordBatch
from stemedb.replication.membership import PeerState
from stemedb.replication.placement import scope_of

SIGNER = stemedb.Signer.from_seed(bytes([0x41]) * 32)
TEXT = ('name = "demo"\nversion = 1\nreplication_factor = 2\npartitions = 256\nacks = "1"\n'
        + "".join(f'[[nodes]]\nid = "n{i}"\naddress = "h:{i}"\n' for i in (1, 2, 3))
        + "[replication]\nanti_entropy_interval = 600\n")
CLUSTER = ClusterFile.parse(TEXT)


def run(main):
    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def subject_in(cluster, partition, tag="s"):
    i = 0
    while cluster.placement.subject_partition(f"{tag}{i}") != partition:
        i += 1
    return f"{tag}{i}"


def batch_of(records) -> RecordBatch:
    blob, offsets, ids = _codec.encode_many(records)
    return RecordBatch(blob, np.asarray(offsets, dtype=np.int64), ids)


def signed_batch(subjects, timestamp=1000):
    members, envelope = SIGNER.sign_batch(
        [stemedb.Assertion(s, "p", i, timestamp=timestamp + i) for i, s in enumerate(subjects)],
        timestamp=timestamp)
    return [envelope, *members]


def holders(cluster, record_id):
    return sorted(name for name, node in cluster.nodes.items()
                  if node.db is not None and record_id in node.db)


async def all_up(cluster):
    await wait_until(lambda: all(node.node.membership.state(p) is PeerState.UP
                                 for node in cluster.nodes.values() if node.running
                                 for p in node.node.peers if cluster.nodes[p].running))


def test_acks_1_is_durable_on_one_replica_at_ack_then_pushed_to_the_other(tmp_path):
    async def main():
        async with running(CLUSTER, str(tmp_path)) as cluster:
            await all_up(cluster)
            s0 = subject_in(cluster, 0)          # held by n2, n3; written through n1
            envelope, member = signed_batch([s0])
            result = await cluster.nodes["n1"].write(batch_of([envelope, member]), None, 10)
            assert result.acks == "1"
            assert result.stored_on == {"n1": 1, "n2": 1}   # n1 the envelope, n2 the member
            assert holders(cluster, member.id) == ["n2"]    # at the ack: one replica
            await wait_until(lambda: holders(cluster, member.id) == ["n2", "n3"])
            await wait_until(lambda: holders(cluster, envelope.id) == ["n1", "n2", "n3"])
            assert cluster.nodes["n2"].node.queues["n3"].stats.sent_records >= 2
            # the push delay's stages: the sender's queue figures, the receiver's intake
            sent = cluster.nodes["n2"].node.status()["push"]["n3"]
            assert 0 <= sent["wait_p99_seconds"] <= sent["delay_p99_seconds"]
            # (the queue's clock is trio's mock clock here, so a round trip may read 0)
            assert 0 <= sent["send_p50_seconds"] <= sent["send_p99_seconds"] <= sent["delay_p99_seconds"]
            intake = cluster.nodes["n3"].node.status()["intake"]
            assert intake["samples"] >= 1 and 0 <= intake["wait_p50_seconds"] <= intake["wait_p99_seconds"]
            assert 0 <= intake["store_p50_seconds"] <= intake["store_p99_seconds"]
    run(main)


def test_acks_all_is_durable_on_every_up_replica_at_ack(tmp_path):
    async def main():
        async with running(CLUSTER, str(tmp_path)) as cluster:
            await all_up(cluster)
            records = signed_batch([subject_in(cluster, 0), subject_in(cluster, 1)])
            result = await cluster.nodes["n2"].write(batch_of(records), "all", 10)
            assert set(result.stored_on) == {"n1", "n2", "n3"} and result.deferred == {}
            assert holders(cluster, records[1].id) == ["n2", "n3"]
            assert holders(cluster, records[2].id) == ["n1", "n3"]
            assert holders(cluster, records[0].id) == ["n1", "n2", "n3"]
    run(main)


def test_acks_all_with_a_replica_down_acks_the_up_ones_and_the_down_one_catches_up(tmp_path):
    async def main():
        async with running(CLUSTER, str(tmp_path)) as cluster:
            await all_up(cluster)
            await cluster.nodes["n3"].crash()
            await wait_until(lambda: cluster.nodes["n1"].node.membership.is_down("n3"))
            records = signed_batch([subject_in(cluster, 0)])
            result = await cluster.nodes["n1"].write(batch_of(records), "all", 10)
            assert set(result.stored_on) == {"n1", "n2"} and result.deferred == {"n3": 2}
            assert holders(cluster, records[1].id) == ["n2"]
            await cluster.nodes["n3"].restart(cluster.nursery)
            waited = await wait_until(lambda: holders(cluster, records[1].id) == ["n2", "n3"])
            assert waited < 10       # pushed as soon as n3 is heard from again
    run(main)


def test_a_write_with_no_live_replica_is_unavailable(tmp_path):
    async def main():
        async with running(CLUSTER, str(tmp_path)) as cluster:
            await all_up(cluster)
            for name in ("n2", "n3"):
                await cluster.nodes[name].crash()
            await wait_until(lambda: cluster.nodes["n1"].node.membership.is_down("n2")
                             and cluster.nodes["n1"].node.membership.is_down("n3"))
            records = signed_batch([subject_in(cluster, 0)])
            for acks in ("1", "all"):
                with pytest.raises(Unavailable, match="no replica is up for 1 of the records"):
                    await cluster.nodes["n1"].write(batch_of(records), acks, 10)
            # Partition 1 has n1 itself: writes there still succeed.
            result = await cluster.nodes["n1"].write(batch_of(signed_batch([subject_in(cluster, 1)])),
                                                     "1", 10)
            assert result.stored_on == {"n1": 2}
    run(main)


def test_a_replica_that_dies_mid_write_fails_acks_all_and_acks_1_moves_on(tmp_path):
    async def main():
        async with running(CLUSTER, str(tmp_path)) as cluster:
            await all_up(cluster)
            # n2 still looks up to n1, but its connections now go nowhere.
            cluster.network.cut({"n1"}, {"n2"})
            s0 = subject_in(cluster, 0)
            with pytest.raises(Unavailable, match="replica n2 did not confirm the write"):
                await cluster.nodes["n1"].write(batch_of(signed_batch([s0])), "all", 30)
            records = signed_batch([s0], timestamp=2000)
            result = await cluster.nodes["n1"].write(batch_of(records), "1", 30)
            assert "n3" in result.stored_on and records[1].id in cluster.nodes["n3"].db
    run(main)


def test_a_forged_batch_is_refused_at_the_door_and_stored_nowhere(tmp_path):
    import random

    async def main():
        async with running(CLUSTER, str(tmp_path)) as cluster:
            await all_up(cluster)
            honest = [stemedb.Assertion(subject_in(cluster, 0), "p", 1, timestamp=5).sign(SIGNER)]
            data, sent_as, true_id = forge(honest[0], "bad_signature", random.Random(3))
            batch = RecordBatch(data, np.array([0, len(data)]), np.frombuffer(sent_as, np.uint8).reshape(1, 32))
            with pytest.raises(SignatureError, match="bad signature"):
                await cluster.nodes["n1"].write(batch, "1", 10)
            members, _envelope = SIGNER.sign_batch([stemedb.Assertion("x", "p", 1, timestamp=6)], timestamp=6)
            with pytest.raises(SignatureError, match="its envelope is neither in the batch nor stored"):
                await cluster.nodes["n1"].write(batch_of(members), "1", 10)
            await trio.sleep(5)
            assert holders(cluster, true_id) == [] and holders(cluster, members[0].id) == []
    run(main)


def test_members_of_a_stored_envelope_travel_with_it_to_a_replica_that_lacks_it(tmp_path):
    async def main():
        async with running(CLUSTER, str(tmp_path)) as cluster:
            await all_up(cluster)
            s1, s0 = subject_in(cluster, 1), subject_in(cluster, 0)
            members, envelope = SIGNER.sign_batch([stemedb.Assertion(s1, "p", 1, timestamp=7),
                                                   stemedb.Assertion(s0, "p", 2, timestamp=8)],
                                                  timestamp=7)
            cluster.nodes["n1"].db.put_many(members[:1], envelope=envelope)   # only n1 has it
            result = await cluster.nodes["n1"].write(batch_of(members[1:]), "all", 10)
            assert set(result.stored_on) >= {"n2", "n3"}
            assert holders(cluster, members[1].id) == ["n2", "n3"]
            assert envelope.id in cluster.nodes["n2"].db
            assert sum(n.node.status()["forged"].get("n1", 0) for n in cluster.nodes.values()) == 0
    run(main)


def test_disk_full_on_a_replica_during_push_is_retried_until_space_frees(tmp_path, caplog):
    async def main():
        async with running(CLUSTER, str(tmp_path)) as cluster:
            await all_up(cluster)
            full = cluster.nodes["n3"].files
            full.fail("pwrite", errno=errno.ENOSPC, times=None)
            s0 = subject_in(cluster, 0)
            acked = []
            for i in range(5):     # n1 forwards to n2 (acks=1), n2 pushes to n3: disk full there
                records = signed_batch([s0], timestamp=3000 + 10 * i)
                await cluster.nodes["n1"].write(batch_of(records), "1", 10)
                acked.append(records[1].id)
            await trio.sleep(10)
            queue = cluster.nodes["n2"].node.queues["n3"]
            assert queue.depth_records > 0 and queue.stats.send_failures > 0
            assert not any(i in cluster.nodes["n3"].db for i in acked)
            full.clear()
            await wait_until(lambda: all(i in cluster.nodes["n3"].db for i in acked), timeout=5)
            assert queue.depth_records == 0 and queue.stats.refused_records == 0
    with caplog.at_level(logging.WARNING):
        run(main)


def test_status_reports_peers_queues_and_rounds(tmp_path):
    async def main():
        async with running(CLUSTER, str(tmp_path)) as cluster:
            await all_up(cluster)
            node = cluster.nodes["n1"].node
            rounds = node.anti_entropy.stats.rounds     # rounds started when the peers turned up
            result = await node.anti_entropy.sync_now("n2")
            status = node.status()
            assert status["node"] == "n1" and status["version"] == 1
            assert {p: s["state"] for p, s in status["peers"].items()} == {"n2": "up", "n3": "up"}
            assert set(status["push"]) == {"n2", "n3"} and status["push"]["n2"]["depth_records"] == 0
            assert status["anti_entropy"]["rounds"] == rounds + 1 and rounds >= 2 and result.ok
            assert status["forged"] == {}
            fingerprint = cluster.nodes["n1"].store.fingerprint(scope_of(-1))
            assert fingerprint == cluster.nodes["n2"].store.fingerprint(scope_of(-1))
    run(main)


def test_a_node_exports_its_peers_push_queues_and_sync_rounds_as_metrics(tmp_path):
    """The server of a node registers it with ServerMetrics.track_cluster: node states, push
    lag and queue depth, records pushed, and anti-entropy rounds, records and bytes."""
    from prometheus_client.parser import text_string_to_metric_families

    def samples(node):
        found = {}
        for family in text_string_to_metric_families(node.server.metrics.render().decode()):
            for sample in family.samples:
                found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return found

    async def main():
        async with running(CLUSTER, str(tmp_path)) as cluster:
            await all_up(cluster)
            s0 = subject_in(cluster, 0)          # held by n2, n3
            records = signed_batch([s0, s0])
            await cluster.nodes["n2"].write(batch_of(records), "1", 10)
            n2 = cluster.nodes["n2"]
            await wait_until(lambda: n2.node.queues["n3"].stats.sent_records >= 3)
            await n2.node.anti_entropy.sync_now("n1")
            before = samples(n2)
            assert before[("stemedb_node_up", (("node", "n2"),))] == 1
            assert before[("stemedb_node_up", (("node", "n3"),))] == 1
            assert before[("stemedb_push_records_total", (("peer", "n3"),))] >= 3
            assert before[("stemedb_push_queue_records", (("peer", "n3"),))] == 0
            assert before[("stemedb_replication_lag_seconds", (("peer", "n3"),))] == 0
            assert before[("stemedb_sync_rounds_total", ())] >= 1
            assert before[("stemedb_sync_bytes_total", (("direction", "sent"),))] > 0
            await cluster.nodes["n3"].crash()
            await wait_until(lambda: n2.node.membership.is_down("n3"))
            more = signed_batch([s0], timestamp=5000)
            await n2.write(batch_of(more), "1", 10)
            after = samples(n2)
            assert after[("stemedb_node_up", (("node", "n3"),))] == 0
            assert after[("stemedb_push_queue_records", (("peer", "n3"),))] == 2
            assert after[("stemedb_replication_lag_seconds", (("peer", "n3"),))] >= 0
    run(main)


def test_the_put_frame_flags_choose_the_ack_policy_per_request(tmp_path):
    """A client's PUT through a node's server: with one replica of the partition cut off (still
    up as far as the others know), ACKS_ALL is not acknowledged, while the file's default
    (acks = "1") and ACKS_ONE are, by the replica that is reachable."""
    from stemedb import _protocol
    from stemedb.replication.transport import Link

    def put(records):
        blob, offsets, _ids = _codec.encode_many(records)
        return _protocol.encode_record_batch(blob, offsets)

    async def main():
        async with running(CLUSTER, str(tmp_path)) as cluster:
            await all_up(cluster)
            n1 = cluster.nodes["n1"]
            client = Link("n1", lambda _peer: n1.server_stream(), cluster.nursery)
            s0 = subject_in(cluster, 0)                       # held by n2 and n3, not n1
            cluster.network.cut({"n3"}, {"n1", "n2"})
            every = stemedb.Assertion(s0, "p", 1, timestamp=7000).sign(SIGNER)
            with pytest.raises(Unavailable, match="replica n3 did not confirm the write"):
                await client.request(_protocol.PUT, put([every]), 30, flags=_protocol.ACKS_ALL)
            default = stemedb.Assertion(s0, "p", 2, timestamp=8000).sign(SIGNER)
            answer = await client.request(_protocol.PUT, put([default]), 30)
            assert [bytes(i) for i in _protocol.decode_ids(answer)] == [default.id]
            one = stemedb.Assertion(s0, "p", 3, timestamp=9000).sign(SIGNER)
            await client.request(_protocol.PUT, put([one]), 30, flags=_protocol.ACKS_ONE)
            assert holders(cluster, default.id) == holders(cluster, one.id) == ["n2"]
            cluster.network.heal()
            await wait_until(lambda: holders(cluster, one.id) == ["n2", "n3"])
            await client.close()
    run(main)
