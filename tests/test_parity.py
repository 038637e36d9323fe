"""One API, embedded or remote: one body of behaviour, four ways, identical results.

`behaviour(api)` writes, reads, scans, resolves (lenses by name, as objects,
as classes; every filter), audits and group-signs through whatever `api`
is: the embedded Database, the blocking client, and the async client under
trio and under asyncio (each against a server of its own on a fresh store).
It records what every call returned — types, records, the resolutions'
`to_dict()`, the errors' classes — and the four records must be equal.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from test_server_support import OTHER, SIGNER, background_server

import stemedb
from stemedb.client import connect, connect_async
from stemedb.errors import ClientClosed, InvalidRecord, NotFound, SignatureError
from stemedb.lenses import Authority, Consensus, EpochAware, Layered, Skeptic

T = 1_700_000_000_000_000
ERRORS = (NotFound, SignatureError, InvalidRecord, ClientClosed, ValueError, TypeError)


async def call(target: Any, name: str, *args: Any, **kwargs: Any) -> Any:
    """target.name(*args, **kwargs), awaited if the API is async."""
    result = getattr(target, name)(*args, **kwargs)
    if inspect.isawaitable(result):
        result = await result
    return result


async def outcome(target: Any, name: str, *args: Any, **kwargs: Any) -> Any:
    """What a call gives, as comparable data: the error's class, or the value described."""
    try:
        value = await call(target, name, *args, **kwargs)
    except ERRORS as exc:
        return ("error", next(cls.__name__ for cls in ERRORS if isinstance(exc, cls)))
    return describe(value)


def describe(value: Any) -> Any:
    if isinstance(value, stemedb.Resolution):
        winner = value.winner.encode().hex() if value.winner is not None else None
        return ("Resolution", value.to_dict(), winner, repr(value.value))
    if isinstance(value, dict):
        return ("dict", {key: describe(item) for key, item in value.items()})
    if isinstance(value, Iterator):
        return ("iterator", [describe(item) for item in value])
    if isinstance(value, list):
        return ("list", [describe(item) for item in value])
    if isinstance(value, bytes):
        return ("id", value.hex())
    if hasattr(value, "encode") and hasattr(value, "id"):
        return (type(value).__name__, value.encode().hex())
    return (type(value).__name__, value)


def claims() -> list[Any]:
    def claim(subject: str, predicate: str, obj: Any, i: int, signer: Any = SIGNER, **fields: Any) -> Any:
        return stemedb.Assertion(subject, predicate, obj, timestamp=T + i, **fields).sign(signer)

    return [
        claim("aspirin", "treats", stemedb.Ref("headache"), 0, confidence=0.75, source_class="clinical"),
        claim("aspirin", "treats", stemedb.Ref("fever"), 1, OTHER, confidence=0.5, lifecycle="approved"),
        claim("aspirin", "treats", stemedb.Ref("headache"), 2, OTHER, confidence=0.9,
              source_class="regulatory"),
        claim("aspirin", "dose_mg", 500, 3),
        claim("aspirin", "dose_mg", 650, 4, OTHER, lifecycle="approved"),
        claim("ibuprofen", "treats", stemedb.Ref("pain"), 5, confidence=0.6),
        claim("ctx", "must_use", "gloves", 6),
        claim("ctx", "forbidden", "gloves", 7, OTHER),
    ]


async def behaviour(api: Any) -> list[Any]:
    seen: list[Any] = []
    records = claims()
    seen.append(await outcome(api, "put", records[0]))
    seen.append(await outcome(api, "put_many", records[1:]))
    members, envelope = SIGNER.sign_batch(
        [stemedb.Assertion("sensor", "reading", float(i), timestamp=T + 10 + i) for i in range(3)],
        timestamp=T + 20)
    seen.append(await outcome(api, "put_many", members, envelope=envelope))
    epoch = stemedb.Epoch("2024", timestamp=T + 30).sign(SIGNER)
    seen.append(await outcome(api, "epoch", epoch))
    in_epoch = stemedb.Assertion("aspirin", "treats", stemedb.Ref("migraine"), timestamp=T + 31,
                                 epoch=epoch.id).sign(SIGNER)
    seen.append(await outcome(api, "put", in_epoch))
    seen.append(await outcome(api, "vote", stemedb.Vote(records[1].id, 1.0, timestamp=T + 40).sign(SIGNER)))
    # reads
    seen.append(await outcome(api, "get", records[3].id))
    seen.append(await outcome(api, "get", bytes(32)))
    seen.append(await outcome(api, "get_many", [records[0].id, bytes(32), members[1].id]))
    seen.append(await outcome(api, "scan", "aspirin"))
    seen.append(await outcome(api, "scan", None, "treats", kind="assertion"))
    seen.append(await outcome(api, "scan", kind="envelope"))
    # resolution: lenses by name, object and class; defaults; every filter
    for lens in ("recency", "confidence", "consensus", "vote_consensus", "authority", "skeptic",
                 "epoch_aware", "layered"):
        seen.append(await outcome(api, "query", "aspirin", "treats", lens=lens))
    for lens in (Consensus(), Consensus, EpochAware(inner=Consensus()), Authority(trust=False),
                 Authority({"clinical": 2.0}), Skeptic(weighting="votes"), Layered(inner=Skeptic())):
        seen.append(await outcome(api, "query", "aspirin", "treats", lens=lens))
    seen.append(await outcome(api, "query", "aspirin", "treats"))  # the default lens
    seen.append(await outcome(api, "query", "aspirin"))  # every predicate: a mapping
    seen.append(await outcome(api, "query", "nobody"))  # no predicates: an empty mapping
    seen.append(await outcome(api, "query", "ctx", lens="constraints"))
    seen.append(await outcome(api, "query", "aspirin", "treats", lifecycle="approved"))
    seen.append(await outcome(api, "query", "aspirin", "treats", lifecycle=["proposed", 2]))
    seen.append(await outcome(api, "query", "aspirin", "treats", lifecycle=stemedb.Lifecycle.APPROVED))
    seen.append(await outcome(api, "query", "aspirin", "treats", as_of=T + 1, lens="consensus"))
    seen.append(await outcome(api, "query", "aspirin", "treats", epoch=epoch))
    seen.append(await outcome(api, "query", "aspirin", "treats", epoch=epoch.id.hex()))
    seen.append(await outcome(api, "query", "aspirin", "treats", decay=True, now=T + 86_400_000_000 * 400,
                              lens="consensus"))
    seen.append(await outcome(api, "query", "aspirin", "treats", lens="no-such-lens"))
    seen.append(await outcome(api, "query", "", "treats"))
    seen.append(await outcome(api, "query", "aspirin", "treats", lifecycle="sideways"))
    # refusals
    seen.append(await outcome(api, "put", stemedb.Assertion("x", "y", 1, timestamp=T)))
    tampered = records[0]._with_proof(records[0].signers, ((0, bytes(64)),), None)
    seen.append(await outcome(api, "put", tampered))
    seen.append(await outcome(api, "vote", records[0]))
    # the audit log
    await call(api, "query", "ibuprofen", "treats", lens="consensus", audit=True)
    entries = await call(api, "audit", limit=5)
    seen.append([(e["subject"], e["predicate"], e["lens"], e["results"]) for e in entries])
    seen.append(len(await call(api, "audit", since=T, limit=None)))
    seen.append(await call(api, "audit", limit=0))
    # one writer shape
    unsigned = [stemedb.Assertion("writer", "n", i, timestamp=T + 50 + i) for i in range(5)]
    writer = api.writer(OTHER)
    if hasattr(writer, "__aenter__"):
        async with writer:
            seen.append(await outcome(writer, "put", unsigned[0]))
            seen.append(await outcome(writer, "put_many", unsigned[1:]))
            seen.append(await outcome(writer, "flush"))
    else:
        with writer:
            seen.append(await outcome(writer, "put", unsigned[0]))
            seen.append(await outcome(writer, "put_many", unsigned[1:]))
            seen.append(await outcome(writer, "flush"))
    seen.append(await outcome(writer, "put", unsigned[0]))  # closed by leaving the block
    # The members' proofs name envelopes stamped with the time they were signed: compare IDs.
    seen.append([record.id for record in await call(api, "scan", "writer")])
    stats = await call(api, "stats")
    seen.append((stats["records"], stats["by_kind"]))
    return seen


def embedded(path: Any) -> list[Any]:
    async def main() -> list[Any]:
        with stemedb.open(path) as db:
            return await behaviour(db)

    return anyio.run(main, backend="trio")


def blocking(path: Any) -> list[Any]:
    async def main(url: str) -> list[Any]:
        with connect(url) as client:
            return await behaviour(client)

    with background_server(path) as running:
        return anyio.run(main, running.url, backend="trio")


def asynchronous(path: Any, backend: str) -> list[Any]:
    async def main(url: str) -> list[Any]:
        async with connect_async(url) as client:
            return await behaviour(client)

    with background_server(path) as running:
        return anyio.run(main, running.url, backend=backend)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    return embedded(tmp_path_factory.mktemp("embedded") / "data")


def test_the_embedded_behaviour_exercises_what_it_claims(reference):
    """The reference run is no degenerate one: real answers, real refusals, a closed writer."""
    kinds = [entry[0] for entry in reference if isinstance(entry, tuple)]
    assert kinds.count("Resolution") >= 20 and kinds.count("error") >= 7
    assert ("error", "NotFound") in reference and ("error", "SignatureError") in reference
    assert ("error", "ClientClosed") in reference and ("error", "ValueError") in reference
    assert reference[9][0] == "iterator" and len(reference[9][1]) == 6  # scan("aspirin")


@pytest.mark.parametrize("flavour", ["blocking", "async-trio", "async-asyncio"])
def test_the_clients_behave_as_the_embedded_database(tmp_path, reference, flavour):
    if flavour == "blocking":
        remote = blocking(tmp_path / "data")
    else:
        remote = asynchronous(tmp_path / "data", flavour.split("-")[1])
    differing = [(index, want, got) for index, (want, got) in enumerate(zip(reference, remote))
                 if want != got]
    assert len(remote) == len(reference)
    assert differing == [], differing[:3]
