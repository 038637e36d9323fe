"""`stemedb shell`: the same commands, one per line, on one store or server (like redis-cli).

Owns: the read loop (readline line editing, history in ~/.stemedb/history
or $STEMEDB_HISTORY, command-name completion), `help`, `quit`, and `put`
with the JSON written on the line itself. Must never: end the session for a
command's mistake, or let `put` read the shell's own input.

Resource handling: the store or connection is opened by the first command
that needs it and closed when the shell ends (a data directory stays locked
meanwhile, as with any open store).
Error handling: each command's error is its one line (core.run_command) and
the next line is read; Ctrl-C at the prompt drops the line, during a command
interrupts that command only; EOF (Ctrl-D), `quit` or `exit` end the shell.
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import sys
from collections.abc import Callable
from typing import Any

from stemedb.cli.core import (
    EXIT_OK,
    EXIT_USAGE,
    Parser,
    UsageError,
    add_target_options,
    describe,
    report,
    run_command,
)

NOT_IN_SHELL = ("shell", "serve")
QUIT = ("quit", "exit", r"\q")
HISTORY_LENGTH = 1000


def register(commands: Any) -> None:
    shell = commands.add_parser("shell", help="an interactive session: the commands, one per line",
                                description="Run commands one per line on one store or server "
                                "(line editing and history when a terminal).")
    add_target_options(shell)
    shell.add_argument("--key", help="key file that signs what put stores in this session")
    shell.set_defaults(handler=run_shell)


def run_shell(args: argparse.Namespace, context: Any) -> int:
    parser = args.parser_factory()  # the shell's commands are the CLI's own
    context.default_key = args.key
    context.interactive_stdin = True
    interactive = sys.stdin.isatty()
    save_history = _start_line_editing(parser) if interactive else None
    if interactive:
        print(f"stemedb shell on {context.target}; help lists the commands, quit leaves")
    try:
        _loop(parser, context, interactive)
    finally:
        if save_history is not None:
            save_history()
    return EXIT_OK


def _loop(parser: Parser, context: Any, interactive: bool) -> None:
    prompt = f"{context.target}> " if interactive else ""
    while True:
        try:
            line = input(prompt) if interactive else sys.stdin.readline()
        except EOFError:
            break
        except KeyboardInterrupt:
            print()  # Ctrl-C at the prompt drops the line, as in redis-cli and psql
            continue
        if not interactive and not line:
            break
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line in QUIT:
            break
        run_line(parser, line, context)
    if interactive:
        print()


def run_line(parser: Parser, line: str, context: Any) -> int:
    """Run one shell line: `help [COMMAND]` or a command; its exit code."""
    try:
        argv, inline = split_line(line)
    except ValueError as exc:
        report("shell", f"error: {exc}")
        return EXIT_USAGE
    if argv[0] == "help":
        return _help(parser, argv[1:])
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        report(argv[0] if argv[0] in parser.commands.parsers else None, f"error: {describe(exc)}")
        return EXIT_USAGE
    except SystemExit:  # --help or --version printed
        return EXIT_OK
    refusal = _refusal(args, context)
    if refusal is not None:
        report(args.command, f"error: {refusal}")
        return EXIT_USAGE
    if inline is not None:
        args.inline_input = io.StringIO(inline)
    return run_command(args.command, args.handler, args, context)


def split_line(line: str) -> tuple[list[str], str | None]:
    """The words of a line; for `put … {json}` also the JSON, taken as it was typed."""
    inline = None
    words = line.split(None, 1)
    if words[0] == "put" and "{" in line:
        start = line.index("{")
        line, inline = line[:start], line[start:]
    return shlex.split(line), inline


def _refusal(args: argparse.Namespace, context: Any) -> str | None:
    if args.command in NOT_IN_SHELL:
        return f"{args.command} is not available inside the shell"
    if any(getattr(args, name, None) is not None for name in ("data", "url", "token", "path")):
        return (f"this shell works on {context.target}; start another shell for another store "
                "or server")
    return None


def _help(parser: Parser, topic: list[str]) -> int:
    commands = parser.commands
    if topic and topic[0] in commands.parsers:
        commands.parsers[topic[0]].print_help()
        return EXIT_OK
    if topic:
        report("help", f"error: no command {topic[0]!r}; help lists them")
        return EXIT_USAGE
    width = max(len(label) for label in commands.summaries)
    for label, summary in commands.summaries.items():
        if label not in NOT_IN_SHELL:
            print(f"  {label:{width}s}  {summary}")
    print(f"  {'help':{width}s}  help COMMAND shows its options")
    print(f"  {'quit':{width}s}  leave (also exit, Ctrl-D)")
    print('put takes a file, or JSON on the line: put {"subject": "s", "predicate": "p", "object": 1}')
    return EXIT_OK


def _start_line_editing(parser: Parser) -> Callable[[], None] | None:
    """readline with history and completion of command names; returns what saves the history."""
    try:
        import readline
    except ImportError:  # a Python built without readline: plain input() still works
        return None
    path = os.environ.get("STEMEDB_HISTORY") or os.path.join(os.path.expanduser("~"), ".stemedb",
                                                             "history")
    try:
        readline.read_history_file(path)
    except OSError:
        pass  # no history yet
    readline.set_history_length(HISTORY_LENGTH)
    names = sorted([*parser.commands.parsers, "help", "quit"])

    def complete(text: str, state: int) -> str | None:
        matches = [name + " " for name in names if name.startswith(text)]
        return matches[state] if state < len(matches) else None

    readline.set_completer(complete)
    readline.parse_and_bind("tab: complete")

    def save() -> None:
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            readline.write_history_file(path)
        except OSError as exc:
            sys.stderr.write(f"stemedb shell: history not saved: {describe(exc)}\n")

    return save
