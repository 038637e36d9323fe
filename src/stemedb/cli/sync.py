"""`stemedb sync`: one reconciliation session between a store and another server, now.

Owns: the command's options (--peer, --pull / --push, --peer-token, --json)
and its output: records received and sent, round trips, and bytes each way
(reconciliation messages and record bytes apart). The local side is a data
directory (--data: the store is opened in this process, created if missing,
and this process runs the session over the binary protocol) or a running
server (--url: it is asked with SYNC_WITH to run the session itself). Must
never: store a record that did not verify — every record received goes
through the store's intake (stemedb.replication.sync, EngineStore).

Error handling: an unreachable peer, a peer without replication, or a
forged record (the session ends; the peer is named in the log and in
`error`) is one line and exit 1; what was stored before stays (it verified).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

from stemedb.cli.core import EXIT_ERROR, EXIT_OK, UsageError, add_json_option, add_target_options


def register(commands: Any) -> None:
    sync = commands.add_parser("sync", help="reconcile a store with another one over the network, "
                                            "both directions by default")
    sync.add_argument("--peer", required=True, metavar="URL",
                      help="the other server: stemedb://host:port, stemedbs://host:port, or a node id "
                           "of the --url server's cluster")
    sync.add_argument("--peer-token", metavar="TOKEN", default="",
                      help="the token presented to the peer (role replica or admin; none: the peer "
                           "must be in protected mode on loopback)")
    direction = sync.add_mutually_exclusive_group()
    direction.add_argument("--pull", action="store_true", help="only receive what the peer has")
    direction.add_argument("--push", action="store_true", help="only send what the peer lacks")
    add_target_options(sync)
    add_json_option(sync, "print one JSON object: received, sent, round_trips, bytes_sent, "
                          "bytes_received, message_bytes_*, record_bytes_*, error")
    sync.set_defaults(handler=run_sync)


def run_sync(args: argparse.Namespace, context: Any) -> int:
    pull, push = not args.push, not args.pull
    target = context.target
    if target.url is not None:
        result = _through_server(target.url, target.token, args.peer, args.peer_token, pull, push)
    else:
        if getattr(args, "token", None):
            raise UsageError("--token goes with --url; the peer's token is --peer-token")
        result = _from_directory(target.data, args.peer, args.peer_token, pull, push)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(f"peer          {args.peer}")
        print(f"received      {result['received']:,} records ({result['record_bytes_received']:,} bytes)")
        print(f"sent          {result['sent']:,} records ({result['record_bytes_sent']:,} bytes)")
        print(f"round trips   {result['round_trips']:,}"
              + (f" in {result['seconds']:.2f} s" if "seconds" in result else ""))
        print(f"bytes         {result['bytes_sent']:,} sent, {result['bytes_received']:,} received "
              f"(reconciliation messages {result['message_bytes_sent']:,} / "
              f"{result['message_bytes_received']:,})")
        if result.get("error"):
            print(f"error         {result['error']}")
    return EXIT_ERROR if result.get("error") else EXIT_OK


def _from_directory(data: str, peer: str, peer_token: str, pull: bool, push: bool) -> dict[str, Any]:
    import trio

    import stemedb
    from stemedb.cli.target import locked_elsewhere
    from stemedb.replication.antientropy import Mover
    from stemedb.replication.store import EngineStore
    from stemedb.replication.sync import parse_peer, standalone_placement, sync_with_server

    try:
        parse_peer(peer)
    except ValueError as exc:
        raise UsageError(f"--peer: {exc}") from None
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        db = stemedb.open(data)
    except stemedb.StemeError:
        held = locked_elsewhere(data)
        if held is not None:
            from stemedb.cli.core import CliError
            raise CliError(held) from None
        raise
    try:
        store = EngineStore(db, standalone_placement())
        try:
            async def main() -> dict[str, Any]:
                mover = Mover(store, trio.to_thread.run_sync)
                started = time.perf_counter()
                session = await sync_with_server(peer, mover, token=peer_token, pull=pull, push=push)
                return {**session.to_dict(), "seconds": round(time.perf_counter() - started, 3)}

            return trio.run(main)
        finally:
            store.close()
    finally:
        db.close()


def _through_server(url: str, token: str | None, peer: str, peer_token: str, pull: bool,
                    push: bool) -> dict[str, Any]:
    from stemedb import _protocol
    from stemedb.cli.cluster import ask
    from stemedb.replication import framing
    from stemedb.replication.framing import SyncWith

    payload = framing.encode_sync_with(SyncWith(peer, peer_token, pull=pull, push=push))
    answer: dict[str, Any] = ask(url, token or "", _protocol.SYNC_WITH, payload, timeout=600.0)
    return answer
