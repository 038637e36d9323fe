"""`stemedb serve`: a store served over the network until SIGINT or SIGTERM.

Owns: the command's options (--data, --listen, --http, --config, and
--cluster FILE --node ID for a node of a cluster) and the log format. Must never: hold the store itself (stemedb.server.serve opens
and closes it).

Error handling: a bad configuration or an address in use is one line
(ConfigError is a StemeError; OSError names the address).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import stemedb
from stemedb.cli.core import DEFAULT_DATA, CliError
from stemedb.cli.target import locked_elsewhere


def register(commands: Any) -> None:
    serve = commands.add_parser("serve", help="serve a store over the network until SIGINT/SIGTERM")
    serve.add_argument("--data", metavar="DIR", default=argparse.SUPPRESS,
                       help=f"data directory, created if missing (default $STEMEDB_DATA, else {DEFAULT_DATA})")
    serve.add_argument("--listen", help="binary protocol host:port (default: the config's, else 127.0.0.1:7440)")
    serve.add_argument("--http", help="HTTP side door host:port (default: the config's, else off)")
    serve.add_argument("--config", help="TOML configuration file (see examples/stemedb.toml)")
    serve.add_argument("--cluster", metavar="FILE",
                       help="serve as a node of the cluster in FILE (docs/replication.md); the node "
                            "listens on its address there")
    serve.add_argument("--node", metavar="ID", help="this node's id in the --cluster file")
    serve.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace, context: Any) -> int:
    """Serve a store (binary protocol, optional HTTP side door) until a signal."""
    from stemedb.server import serve

    data = context.data_directory("serve")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(serve(data, listen=args.listen, http=args.http, config=args.config,
                         cluster=args.cluster, node=args.node))
    except stemedb.StemeError:
        held = locked_elsewhere(data)
        if held is not None:
            raise CliError(held) from None
        raise
