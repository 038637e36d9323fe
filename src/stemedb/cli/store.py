"""`stemedb stats` and `stemedb verify`: what a store holds, and whether it is intact.

Owns: their output, and the deprecated positional data directory these
commands (and conflicts) still accept. Must never: create a store (a missing
or empty path is an error, so `verify typo` cannot pass).

Error handling: verify exits 1 when anything is damaged; a path that holds
no store is one line naming it (target.LocalStore).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from stemedb.cli.core import (
    EXIT_ERROR,
    EXIT_OK,
    UsageError,
    add_json_option,
    add_target_options,
)


def register(commands: Any) -> None:
    stats = commands.add_parser("stats", help="counts, sizes and recovery figures of a store")
    stats.add_argument("path", nargs="?", metavar="DIR", help="deprecated: use --data DIR")
    add_target_options(stats)
    add_json_option(stats)
    stats.set_defaults(handler=run_stats)

    verify = commands.add_parser("verify", help="scrub every checksum and ID of a store")
    verify.add_argument("path", nargs="?", metavar="DIR", help="deprecated: use --data DIR")
    add_target_options(verify)
    add_json_option(verify)
    verify.set_defaults(handler=run_verify)


def deprecated_path(args: argparse.Namespace, context: Any) -> None:
    """`stemedb stats DIR` still works, as `--data DIR`, warning once the command is done.

    (After it, not before: a mistake in the rest of the command stays one line.)
    """
    path = getattr(args, "path", None)
    if path is None:
        return
    if getattr(args, "data", None) is not None or getattr(args, "url", None) is not None:
        raise UsageError(f"{path}: give the store once, with --data or --url")
    context.use_data(path)
    context.warnings.append(f"warning: a data directory as an argument is deprecated; "
                            f"use --data {path}")


def run_stats(args: argparse.Namespace, context: Any) -> int:
    deprecated_path(args, context)
    stats = context.store().stats()
    if args.json:
        print(json.dumps(stats, indent=1, default=str))
        return EXIT_OK
    print(f"store       {stats['path']}")
    print(f"records     {stats['records']:,}  "
          + "  ".join(f"{kind} {count:,}" for kind, count in stats["by_kind"].items()))
    print(f"segments    {stats['segments']} × {stats['segment_size'] >> 20} MiB, "
          f"{stats['used_bytes'] / 2**20:,.1f} MiB used")
    print("index RAM   " + ", ".join(f"{name} {size / 2**20:,.1f} MiB"
                                     for name, size in stats["index_bytes"].items()))
    recovery = stats["recovery"]
    print(f"last open   {recovery['seconds'] * 1000:.1f} ms, {recovery['records_replayed']:,} "
          f"records replayed, {recovery['torn_bytes_dropped']} torn bytes dropped")
    for problem in recovery["problems"]:
        print(f"problem     {problem}")
    server = stats.get("server")
    if server:
        print(f"server      {server.get('name') or 'stemedb'} at {server.get('listen')}, "
              f"protocol {server.get('protocol_version')}, up {server.get('uptime_seconds', 0):,.0f} s, "
              f"{server.get('connections', 0)} connection(s)"
              + (", protected mode" if server.get("protected_mode") else "")
              + (", draining" if server.get("draining") else ""))
    return EXIT_OK


SCOPES = {"segments": "", "signatures": " (over the network: every record read through its "
          "checksum, signatures and envelope proofs checked; the segment scrub needs --data)"}


def run_verify(args: argparse.Namespace, context: Any) -> int:
    deprecated_path(args, context)
    store = context.store()
    started = time.perf_counter()
    report_ = store.verify()
    seconds = time.perf_counter() - started
    if args.json:
        print(json.dumps({**report_, "seconds": seconds}, indent=1))
    else:
        for problem in report_["problems"]:
            print(f"PROBLEM  {problem}")
        print(f"{'OK' if report_['ok'] else 'DAMAGED'}: {report_['records_checked']:,} records "
              f"checked{SCOPES[report_['scope']]} in {seconds:.2f} s, "
              f"{len(report_['problems'])} problem(s)")
    return EXIT_OK if report_["ok"] else EXIT_ERROR
