"""bench/bench_sync.py (B7 in process) runs, checks its own sessions, and its catch-up hook moves records.

The bench refuses to report a session that did not find exactly the missing
records; here it runs at a small size, and `catch_up` brings an empty
replica (and a half-full one, in a cluster's scopes) up to its source
through the replication intake.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

import stemedb
from stemedb.replication.cluster import ClusterFile
from stemedb.replication.placement import Placement

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import bench_sync  # noqa: E402

SIGNER = stemedb.Signer.from_seed(b"\x41" * 32)


def test_the_bench_reports_every_gap_and_shape(tmp_path):
    out = tmp_path / "b7.json"
    assert bench_sync.main(["--records", "3000", "--runs", "2", "--gaps", "1,40", "--chunk", "1000",
                            "--dir", str(tmp_path), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [(r["d"], r["shape"]) for r in report["rows"]] == [(1, "newest"), (1, "random"),
                                                             (40, "newest"), (40, "random")]
    for row in report["rows"]:
        assert row["every_id_bytes"] == 32 * 3000 and row["met"] is None      # not judged below 1 M
        assert 1 <= row["round_trips"]["min"] <= row["round_trips"]["max"]
        assert row["bytes_total"]["median"] == row["bytes_to_source"]["median"] + row["bytes_to_replica"]["median"]
        assert 0 < row["bytes_total"]["median"] < row["every_id_bytes"]


def write(db, tag: str, n: int, start: int = 0) -> list:
    members, envelope = SIGNER.sign_batch([stemedb.Assertion(f"{tag}-{i % 17}", "p", i,
                                                             timestamp=(start + i) * 1000)
                                           for i in range(n)])
    db.put_many(members, envelope=envelope)
    signed = [stemedb.Vote(members[i], 1.0, timestamp=(start + i) * 1000 + 1).sign(SIGNER)
              for i in range(0, n, 9)]
    db.put_many(signed)
    return [envelope, *members, *signed]


def ids_of(db) -> set[bytes]:
    return {bytes(i) for i in db.view.column("id")}


def test_catch_up_brings_an_empty_replica_to_its_source(tmp_path):
    with stemedb.open(tmp_path / "source") as source, stemedb.open(tmp_path / "replica") as replica:
        written = write(source, "a", 500)
        result = bench_sync.catch_up(source, replica)
        assert result["records"] == len(written) and ids_of(replica) == ids_of(source)
        assert result["round_trips"] >= 1 and result["bytes_to_source"] > 0
        assert bench_sync.catch_up(source, replica)["records"] == 0          # nothing left to move


def test_catch_up_over_a_cluster_s_scopes_moves_only_what_is_missing(tmp_path):
    placement = Placement(ClusterFile.parse('name = "t"\nversion = 1\nreplication_factor = 1\n'
                                            'partitions = 4\n[[nodes]]\nid = "n1"\naddress = "h:1"\n'))
    with stemedb.open(tmp_path / "source") as source, stemedb.open(tmp_path / "replica") as replica:
        shared = write(source, "b", 300)
        replica.put_many(shared[1:301], envelope=shared[0])
        later = write(source, "c", 200, start=1000)
        result = bench_sync.catch_up(source, replica, placement)
        assert result["records"] == len(later) + len(shared) - 301
        assert ids_of(replica) == ids_of(source)
        for scope in range(0, 6):
            with source.reconcile_lock(), replica.reconcile_lock():
                a, b = source.reconcile_items(scope)[0], replica.reconcile_items(scope)[0]
                assert len(a) == len(b)
        assert np.array_equal(np.sort(source.view.column("timestamp")), np.sort(replica.view.column("timestamp")))
