"""close() frees the store's in-memory indexes at once, not when the garbage collector runs.

A Database is in reference cycles (its view, its writers and its query state
point back at it), so without this a closed store kept its columns, ID index,
posting lists and query indexes until a full collection: a benchmark that
opened a 10 M-record store ten times in one process was killed at 24 GB.
"""

from __future__ import annotations

import gc
import threading
import tracemalloc

import pytest

import stemedb
from stemedb.errors import DatabaseClosed

SIGNER = stemedb.Signer.from_seed(b"\x05" * 32)


def fill(path, count: int) -> list[bytes]:
    members, envelope = SIGNER.sign_batch(
        [stemedb.Assertion(f"s{i % 50}", f"p{i % 7}", i, timestamp=1_000_000 + i) for i in range(count)])
    with stemedb.open(path, durability="none") as db:
        db.put_many(members, envelope=envelope)
    return [m.id for m in members]


def use(db, ids: list[bytes]) -> None:
    """Every reader that keeps views of the columns: point reads, batch reads, both query paths."""
    assert db.get(ids[3]).object == 3
    db.get_encoded(ids[4])
    db.get_many(ids[:10])
    assert db.query("s3", "p3").winner is not None
    assert db.query("s3", "p3", as_of=2_000_000, lens="consensus").winner is not None
    db.query("s3")


def test_close_frees_the_indexes_while_the_database_object_lives(tmp_path):
    ids = fill(tmp_path / "db", 20_000)
    for _ in range(2):              # imports and one-time caches happen before the measurement
        with stemedb.open(tmp_path / "db", durability="none") as db:
            use(db, ids)
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        db = stemedb.open(tmp_path / "db", durability="none")
        use(db, ids)
        opened = tracemalloc.get_traced_memory()[0]
        db.close()
        closed = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
        gc.enable()
    assert opened > 2_000_000                        # ~150 B a record of numpy arrays
    assert closed < opened / 5, (opened, closed)     # gone with db still referenced, no collection
    assert len(db) == 20_001 and "records=20001" in repr(db)   # and the envelope
    for call in (lambda: db.get(ids[0]), lambda: db.get_many(ids[:2]), lambda: db.query("s1", "p1"),
                 lambda: db.view.snapshot(), lambda: db.view.record_at(0)):
        with pytest.raises(DatabaseClosed):
            call()
    with stemedb.open(tmp_path / "db", durability="none") as again:   # nothing lost
        assert len(again) == 20_001 and again.get(ids[19_999]).object == 19_999


def test_reads_racing_close_answer_or_say_closed(tmp_path):
    """Readers on three threads while the store closes: each call returns the record or raises
    DatabaseClosed, never a wrong answer (NotFound from released indexes) or a crash."""
    ids = fill(tmp_path / "db", 5_000)
    for _round in range(5):
        db = stemedb.open(tmp_path / "db", durability="none")
        db.query("s1", "p1")
        wrong: list[BaseException] = []
        go = threading.Barrier(4)

        def read(db=db, go=go, wrong=wrong) -> None:
            go.wait()
            for k in range(2_000):
                try:
                    assert db.get(ids[k % 5_000]).object == k % 5_000
                    assert db.query("s1", "p1").winner is not None
                except DatabaseClosed:
                    return
                except BaseException as exc:  # noqa: BLE001 - reported below
                    wrong.append(exc)
                    return

        readers = [threading.Thread(target=read) for _ in range(3)]
        for thread in readers:
            thread.start()
        go.wait()
        db.close()
        for thread in readers:
            thread.join()
        assert not wrong, wrong[0]


def test_an_answer_read_after_close_says_closed(tmp_path):
    """A Resolution's contributions are built when first read, from record numbers of the
    snapshot it was answered on: after close (columns released) that read must raise
    DatabaseClosed, not index the emptied columns."""
    ids = fill(tmp_path / "db", 3_000)
    db = stemedb.open(tmp_path / "db", durability="none")
    fast = db.query("s3", "p3")                                       # the one-call path
    general = db.query("s3", "p3", as_of=2_000_000, lens="consensus")  # the general path
    assert fast.candidates_count > 1 and general.candidates_count > 1
    db.close()
    for answer in (fast, general):
        with pytest.raises(DatabaseClosed):
            answer.contributions  # noqa: B018 - the read builds them
    with pytest.raises(DatabaseClosed):
        db.records_at([0, 1])
    with pytest.raises(DatabaseClosed):
        list(db.scan("s1"))
    assert len(ids) == 3_000
