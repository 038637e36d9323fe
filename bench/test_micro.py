"""Micro-benchmarks under pytest-benchmark, each beside its peer where one exists.

    pip install ".[bench]"
    pytest bench/ --benchmark-only                                  # table + ours/peer ratios
    pytest bench/ --benchmark-only --benchmark-autosave             # keep this run (.benchmarks/)
    pytest bench/ --benchmark-only --benchmark-compare              # against the last saved run
    pytest bench/ --benchmark-only --benchmark-json out.json

Groups: `hash` (BLAKE3 of record-sized inputs vs the blake3 package), `codec` (encode with
IDs, decode), `point` (one get / get_encoded / contains call vs LMDB `txn.get` of the same
bytes), `query` (one call per lens on pairs that exist vs SQLite's indexed
`SELECT … WHERE subject=? AND predicate=?`), `commit` (one durable batch of 1 000 records vs
SQLite `executemany` + COMMIT with synchronous=FULL and LMDB `putmulti` with sync). A
benchmark named `test_peer_*` is the peer of the others in its group; bench/conftest.py prints
the ratio of median rates after the run. The store is small (STEMEDB_MICRO_RECORDS, 20 000
assertions) so a run takes about a minute; the end-to-end B-table scripts measure at scale.
Each benchmark also checks its answer, so a broken path fails instead of getting fast.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest

lmdb = pytest.importorskip("lmdb")
blake3_package = pytest.importorskip("blake3")
pytest.importorskip("pytest_benchmark")

from workload import generate  # noqa: E402

import stemedb  # noqa: E402
from stemedb import _hash  # noqa: E402

RECORDS = int(os.environ.get("STEMEDB_MICRO_RECORDS", "20000"))
BATCH = 1_000
COMMIT_ROUNDS = 15


class Store:
    def __init__(self, workload: Any, ours: Any, sqlite: sqlite3.Connection, env: Any) -> None:
        self.workload = workload
        self.db = ours
        self.sqlite = sqlite
        self.lmdb = env
        self.ids = [a.id for a in workload.assertions]
        self.pairs = sorted({(a.subject, a.predicate) for a in workload.assertions})


def signed_batches(workload: Any, records: list[Any]) -> tuple[list[Any], list[Any]]:
    by_key = {a.public_key: a for a in workload.agents}
    groups: dict[bytes, list[Any]] = defaultdict(list)
    for record in records:
        groups[record.signers[0]].append(record)
    signed = [by_key[key].sign_batch(group) for key, group in groups.items()]
    return [m for ms, _ in signed for m in ms], [e for _, e in signed]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    base = tmp_path_factory.mktemp("micro")
    workload = generate(RECORDS, votes=True, signers=1)
    db = stemedb.open(base / "ours", durability="sync")
    members, envelope = workload.agents[0].sign_batch(workload.epochs)
    db.put_many(members, envelope=envelope)
    for records in (workload.assertions, workload.votes):
        for start in range(0, len(records), 10_000):
            members, envelopes = signed_batches(workload, records[start:start + 10_000])
            db.put_many(members, envelope=envelopes)
    blob, offsets, ids = stemedb.encode_many(workload.assertions)
    rows = [(bytes(ids[i]), a.subject, a.predicate, bytes(blob[offsets[i]:offsets[i + 1]]))
            for i, a in enumerate(workload.assertions)]
    conn = sqlite3.connect(base / "sqlite.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE records (id BLOB PRIMARY KEY, subject TEXT, predicate TEXT, body BLOB)")
    conn.execute("CREATE INDEX records_sp ON records (subject, predicate)")
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO records VALUES (?,?,?,?)", rows)
    conn.execute("COMMIT")
    env = lmdb.open(str(base / "lmdb"), map_size=1 << 30, sync=True, metasync=True)
    with env.begin(write=True) as txn:
        txn.cursor().putmulti([(row[0], row[3]) for row in rows])
    try:
        yield Store(workload, db, conn, env)
    finally:
        db.close()
        conn.close()
        env.close()


def cycling(items: list[Any]) -> Iterator[Any]:
    return itertools.cycle(items)


# ---------------------------------------------------------------- hash

@pytest.mark.benchmark(group="hash")
def test_blake3_many(benchmark: Any, store: Store) -> None:
    blob, offsets, _ = stemedb.encode_many(store.workload.assertions[:BATCH])
    parts = [bytes(blob[offsets[i]:offsets[i + 1]]) for i in range(BATCH)]
    digests = benchmark(_hash.blake3_many, parts)
    assert bytes(digests[0]) == blake3_package.blake3(parts[0]).digest()


@pytest.mark.benchmark(group="hash")
def test_peer_blake3_package(benchmark: Any, store: Store) -> None:
    blob, offsets, _ = stemedb.encode_many(store.workload.assertions[:BATCH])
    parts = [bytes(blob[offsets[i]:offsets[i + 1]]) for i in range(BATCH)]
    digests = benchmark(lambda: [blake3_package.blake3(p).digest() for p in parts])
    assert digests[0] == _hash.blake3(parts[0])


# ---------------------------------------------------------------- codec

@pytest.mark.benchmark(group="codec")
def test_encode_many_with_ids(benchmark: Any, store: Store) -> None:
    records = store.workload.assertions[:BATCH]
    _, _, ids = benchmark(stemedb.encode_many, records)
    assert bytes(ids[7]) == records[7].id


@pytest.mark.benchmark(group="codec")
def test_decode_many(benchmark: Any, store: Store) -> None:
    records = store.workload.assertions[:BATCH]
    blob, offsets, _ = stemedb.encode_many(records)
    decoded = benchmark(stemedb.decode_many, blob, offsets)
    assert decoded[7] == records[7]


# ---------------------------------------------------------------- point reads

@pytest.mark.benchmark(group="point")
def test_get(benchmark: Any, store: Store) -> None:
    ids = cycling(store.ids)
    record = benchmark(lambda: store.db.get(next(ids)))
    assert record.id in set(store.ids)


@pytest.mark.benchmark(group="point")
def test_get_encoded(benchmark: Any, store: Store) -> None:
    ids = cycling(store.ids)
    body = benchmark(lambda: store.db.get_encoded(next(ids)))
    assert stemedb.decode(body).id in set(store.ids)


@pytest.mark.benchmark(group="point")
def test_contains(benchmark: Any, store: Store) -> None:
    ids = cycling(store.ids)
    assert benchmark(lambda: store.db.contains(next(ids))) is True


@pytest.mark.benchmark(group="point")
def test_peer_lmdb_txn_get(benchmark: Any, store: Store) -> None:
    ids = cycling(store.ids)
    with store.lmdb.begin(buffers=False) as txn:
        body = benchmark(lambda: txn.get(next(ids)))
    assert body is not None and stemedb.decode(body).id in set(store.ids)


# ---------------------------------------------------------------- one query per lens

LENSES = ["recency", "confidence", "consensus", "vote_consensus", "authority", "skeptic",
          "epoch_aware"]


@pytest.mark.benchmark(group="query")
@pytest.mark.parametrize("lens", LENSES)
def test_query(benchmark: Any, store: Store, lens: str) -> None:
    pairs = cycling(store.pairs)
    store.db.query(*store.pairs[0], lens=lens)  # the first query compiles the kernels
    resolution = benchmark(lambda: store.db.query(*next(pairs), lens=lens))
    assert resolution.subject in {s for s, _ in store.pairs}


@pytest.mark.benchmark(group="query")
def test_peer_sqlite_indexed_select(benchmark: Any, store: Store) -> None:
    pairs = cycling(store.pairs)
    sql = "SELECT body FROM records WHERE subject = ? AND predicate = ?"
    rows = benchmark(lambda: store.sqlite.execute(sql, next(pairs)).fetchall())
    assert rows


# ---------------------------------------------------------------- one durable batch

def fresh_batches(store: Store, label: str) -> Iterator[tuple[list[Any], list[Any]]]:
    """New records each round: a store of content-addressed records ignores a repeated one."""
    signer = store.workload.agents[1]
    for round_ in itertools.count():
        records = [stemedb.Assertion(f"micro/{label}/{round_}/{i}", "measured", float(i),
                                     timestamp=1_800_000_000_000_000 + i) for i in range(BATCH)]
        members, envelope = signer.sign_batch(records)
        yield members, [envelope]


@pytest.mark.benchmark(group="commit")
def test_put_many_durable_batch(benchmark: Any, store: Store) -> None:
    batches = fresh_batches(store, "ours")
    before = store.db.stats()["records"]

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        members, envelopes = next(batches)
        return (members,), {"envelope": envelopes}

    benchmark.pedantic(store.db.put_many, setup=setup, rounds=COMMIT_ROUNDS, iterations=1)
    assert store.db.stats()["records"] >= before + BATCH


@pytest.mark.benchmark(group="commit")
def test_peer_sqlite_executemany_commit(benchmark: Any, store: Store) -> None:
    batches = fresh_batches(store, "sqlite")

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        members, _ = next(batches)
        blob, offsets, ids = stemedb.encode_many(members)
        return ([(bytes(ids[i]), m.subject, m.predicate, bytes(blob[offsets[i]:offsets[i + 1]]))
                 for i, m in enumerate(members)],), {}

    def commit(rows: list[tuple[Any, ...]]) -> None:
        store.sqlite.execute("BEGIN")
        store.sqlite.executemany("INSERT INTO records VALUES (?,?,?,?)", rows)
        store.sqlite.execute("COMMIT")

    benchmark.pedantic(commit, setup=setup, rounds=COMMIT_ROUNDS, iterations=1)
    assert store.sqlite.execute("SELECT count(*) FROM records").fetchone()[0] >= RECORDS + BATCH


@pytest.mark.benchmark(group="commit")
def test_peer_lmdb_putmulti_sync(benchmark: Any, store: Store) -> None:
    batches = fresh_batches(store, "lmdb")

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        members, _ = next(batches)
        blob, offsets, ids = stemedb.encode_many(members)
        return ([(bytes(ids[i]), bytes(blob[offsets[i]:offsets[i + 1]])) for i in range(len(members))],), {}

    def commit(items: list[tuple[bytes, bytes]]) -> None:
        with store.lmdb.begin(write=True) as txn:
            txn.cursor().putmulti(items)

    benchmark.pedantic(commit, setup=setup, rounds=COMMIT_ROUNDS, iterations=1)
    assert store.lmdb.stat()["entries"] >= RECORDS + BATCH
