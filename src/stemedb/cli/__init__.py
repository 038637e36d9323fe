"""The `stemedb` command: every command on a data directory (--data) or a server (--url).

Owns: the parser (one module per command group registers its commands) and
`main`, the one place where a command's outcome becomes an exit code. Must
never: hold a command's logic (the command modules do), or let a user's
mistake end in a traceback.

Adding a command group: a module with `register(commands)` that adds its
parsers (see core.Commands) with `handler=run_x` defaults, each handler
taking (args, context) — context.store() is the open target
(target.Store) — and returning an exit code; then list it in COMMAND_GROUPS.

Error handling: see core.run_command (one line, exit 1; usage 2; Ctrl-C
130). A closed stdout (`stemedb scan | head`) ends the command quietly with
exit 141, as a tool killed by SIGPIPE would.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Sequence

import stemedb
from stemedb.cli import (
    backup,
    bench,
    cluster,
    dataio,
    demo,
    keys,
    records,
    resolve,
    serve,
    shell,
    store,
    sync,
    token,
)
from stemedb.cli.core import (
    EXIT_BROKEN_PIPE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    Commands,
    Parser,
    UsageError,
    add_target_options,
    describe,
    report,
    run_command,
)
from stemedb.cli.target import Context

COMMAND_GROUPS = (demo, keys, records, resolve, store, dataio, token, backup, sync, cluster, serve,
                  shell, bench)


def build_parser() -> Parser:
    parser = Parser(prog="stemedb", description="StemeDB's command line: every command works on a "
                    "data directory (--data) or a running server (--url); see docs/cli.md.")
    parser.add_argument("--version", action="version", version=f"stemedb {stemedb.__version__}")
    add_target_options(parser)
    # The shell runs the CLI's own commands; it gets the builder here rather than importing
    # this package (which imports it).
    parser.set_defaults(parser_factory=build_parser)
    parser.commands = Commands(parser)
    for group in COMMAND_GROUPS:
        group.register(parser.commands)
    return parser


def _closing(args: argparse.Namespace, context: Context) -> int:
    """The command's handler, then the target closed (its errors reported like the command's)."""
    try:
        code = int(args.handler(args, context))
    finally:
        context.close()
    for warning in context.warnings:
        report(args.command, warning)
    return code


def _command_named(argv: Sequence[str], parser: Parser) -> str | None:
    return next((word for word in argv if word in parser.commands.parsers), None)


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null, so the interpreter's last flush does not complain of the pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass  # not a real file descriptor (tests capture stdout)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `stemedb ARGS…`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except UsageError as exc:
            report(_command_named(argv, parser), f"error: {describe(exc)}")
            return EXIT_USAGE
        code = run_command(args.command, _closing, args, Context(args))
        sys.stdout.flush()  # here, so that a closed pipe is noticed while we can handle it
        return code
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        report(_command_named(argv, parser), "interrupted")
        return EXIT_INTERRUPTED


__all__ = ["build_parser", "main"]
