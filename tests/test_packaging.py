"""What the package asks of its users' environments (issue 11, item 3).

- Current trio and anyio: an error is reported as itself, not wrapped in the
  ExceptionGroup that strict task groups (trio >= 0.25, anyio 4) raise.
"""

from __future__ import annotations

import socket

import anyio
import pytest
from test_server_support import background_server

import stemedb
from stemedb.errors import NotFound, StemeError
from stemedb.server import ServerConfig, serve

# ---------------------------------------------------------- current trio and anyio


def test_serve_reports_a_startup_error_as_itself(tmp_path):
    """Strict nurseries wrapped the refused address in an ExceptionGroup the CLI could not print."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(StemeError, match=f"^{address}: address already in use$"):
            serve(tmp_path / "data", listen=address, http="")
    with stemedb.open(tmp_path / "data") as db:  # serve() closed the store it opened
        assert len(db) == 0


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_an_error_inside_async_with_connect_async_arrives_as_itself(tmp_path, backend):
    """anyio 4 task groups wrap what they are handed; the client's must not be handed the body's error."""
    async def scenario() -> None:
        async with stemedb.connect_async(server.url) as client:
            assert await client.ping() > 0
            await client.get(bytes(32))

    with background_server(tmp_path / "data", ServerConfig(listen="127.0.0.1:0", http=None)) as server:
        with pytest.raises(NotFound, match="^no record with ID 0{64}$"):
            anyio.run(scenario, backend=backend)
        with pytest.raises(KeyError, match="raised in the body"):
            anyio.run(raise_inside, server.url, backend=backend)


async def raise_inside(url: str) -> None:
    async with stemedb.connect_async(url):
        raise KeyError("raised in the body")
