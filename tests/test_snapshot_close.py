"""The snapshot at close: written unless the newest one this process wrote is nearly current.

A bulk load that crosses snapshot_every has a background snapshot written
just before close; close then skips a second full snapshot when fewer than
1 % of snapshot_every records are left for the next open to replay, and
that open finds them all. A larger tail gets its snapshot at close.
"""

from __future__ import annotations

import os

import stemedb
from stemedb.engine import database

SIGNER = stemedb.Signer.from_seed(b"\x04" * 32)


def snapshots(path) -> list[int]:
    index = os.path.join(str(path), "index")
    return sorted(int(name.split("-")[1]) for name in os.listdir(index)
                  if name.startswith("snapshot-") and not name.endswith(".tmp"))


def write(db, start: int, count: int) -> None:
    members, envelope = SIGNER.sign_batch(
        [stemedb.Assertion(f"s{i}", "p", i, timestamp=1_000_000 + i) for i in range(start, start + count)])
    db.put_many(members, envelope=envelope)


def test_a_nearly_current_snapshot_is_not_written_again_at_close(tmp_path):
    path = tmp_path / "db"
    db = database.open(str(path), snapshot_every=2000)
    write(db, 0, 1999)          # 2000 records with the envelope: a background snapshot
    db._checkpointer.join()
    assert snapshots(path) == [2000]
    write(db, 1999, 9)          # 10 records after it: under 1 % of 2000 (20)
    db.close()
    assert snapshots(path) == [2000]
    with database.open(str(path), snapshot_every=2000) as again:
        assert len(again) == 2010       # the open replayed the 10 the snapshot does not hold
        assert again.verify().ok
    # that process wrote no snapshot of its own, so its close wrote one
    assert snapshots(path) == [2010]


def test_a_tail_of_one_percent_or_more_gets_its_snapshot_at_close(tmp_path):
    path = tmp_path / "db"
    db = database.open(str(path), snapshot_every=2000)
    write(db, 0, 1999)
    db._checkpointer.join()
    assert snapshots(path) == [2000]
    write(db, 1999, 19)         # 20 records after it: 1 % of 2000
    db.close()
    assert snapshots(path) == [2020]
    with database.open(str(path), snapshot_every=2000) as again:
        assert len(again) == 2020
