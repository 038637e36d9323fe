"""`stemedb token`: a new API token, and the lines of configuration that make a server accept it.

Owns: printing a token made by stemedb.server.auth.new_token() once — the
secret for the client, its SHA-256 for the config — with the exact
`[[tokens]]` table (or the `[http] metrics_token_sha256` line) to paste.
Must never: write the secret anywhere but standard output, or keep it.

Error handling: a name the TOML table could not hold is a usage error;
nothing is printed then.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from stemedb.cli.core import EXIT_OK, UsageError

ROLES = ("read", "write", "admin", "metrics")   # metrics: for GET /metrics, not the API


def register(commands: Any) -> None:
    token = commands.add_parser(
        "token", help="make a new API token; print it once, with its sha256 for the config",
        description="Print a new random token (give it to the client), its SHA-256 (the server's "
        "config stores only that) and the config lines to paste; see docs/cli.md.")
    token.add_argument("--role", choices=ROLES, default="read",
                       help="what the token may do (default read); metrics: scrape /metrics only")
    token.add_argument("--name", help="the token's name in the config and the server's logs "
                       "(default: ROLE-<first 8 digits of its sha256>)")
    token.add_argument("--json", action="store_true",
                       help="print one JSON object: token, sha256, name, role, config")
    token.set_defaults(handler=run_token)


def config_lines(name: str, role: str, digest: str) -> str:
    """The TOML that makes a server accept the token (stemedb.server.config reads it)."""
    if role == "metrics":
        return f'[http]\nmetrics_token_sha256 = ["{digest}"]\n'
    return f'[[tokens]]\nname = "{name}"\nrole = "{role}"\nsha256 = "{digest}"\n'


def run_token(args: argparse.Namespace, context: Any) -> int:
    from stemedb.server.auth import new_token  # the server's own rule for what a token is

    secret, digest = new_token()
    name = args.name if args.name is not None else f"{args.role}-{digest[:8]}"
    if not re.fullmatch(r"[A-Za-z0-9_.:@-]{1,64}", name):
        raise UsageError(f"--name: {name!r}: use 1 to 64 letters, digits or _ . : @ -")
    config = config_lines(name, args.role, digest)
    if args.json:
        print(json.dumps({"token": secret, "sha256": digest, "name": name, "role": args.role,
                          "config": config}))
        return EXIT_OK
    print(f"token   {secret}")
    print(f"sha256  {digest}")
    where = ("the server's config (stemedb.toml); the list may hold several hashes" if args.role == "metrics"
             else "the server's config (stemedb.toml), after the tokens already there")
    print(f"\n# Paste the lines below into {where},\n# then restart the server. The token is not shown again.")
    print(config, end="")
    return EXIT_OK
