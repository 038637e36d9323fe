"""StemeDB clients: blocking (`connect`) and async (`connect_async`, on anyio: trio or asyncio).

Owns: nothing itself; re-exports (the errors a client raises are defined,
with every other, in stemedb.errors and exported from stemedb). Both speak
docs/protocol.md through the compiled codec in stemedb._protocol and offer
the embedded Database's operations with its arguments and result types
(put, put_many, get, get_many, query → Resolution, vote, epoch, scan → an
iterator, stats, audit, writer(signer) with put / put_many / flush / close),
plus ping. Either takes one URL, several, or a cluster file (failover).

    client = stemedb.client.connect("stemedb://127.0.0.1:7440", token="…")
    with client.writer(signer) as writer:
        record_id = writer.put(stemedb.Assertion("aspirin", "treats", stemedb.Ref("headache")))
"""

from collections.abc import Sequence

from stemedb.client._wire import Session, parse_url
from stemedb.client.blocking import Client, ClientWriter, connect
from stemedb.errors import ClientClosed, ConnectionLost, InvalidRequest, RequestTimeout, Unsupported


def connect_async(url: str | Sequence[str] | None = "stemedb://127.0.0.1:7440", *,  # type: ignore[no-untyped-def]
                  token: str | None = None, **options: object):
    """An AsyncClient (imported lazily: it needs anyio) to enter with ``async with``.

    `url`: one URL or several (failover), or None with ``cluster=`` a cluster file.
    """
    from stemedb.client.aio import AsyncClient

    return AsyncClient(url, token=token, **options)  # type: ignore[arg-type]


__all__ = [
    "connect",
    "connect_async",
    "Client",
    "ClientWriter",
    "Session",
    "ClientClosed",
    "ConnectionLost",
    "RequestTimeout",
    "Unsupported",
    "InvalidRequest",
    "parse_url",
]
