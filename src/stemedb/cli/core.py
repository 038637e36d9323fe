"""What every command shares: the argument parser, common options, errors and exit codes.

Owns: the parser class (a usage mistake is one line, exit 2), the options
that choose what a command works on (--data / --url / --token) and --json,
turning any user mistake into one line on stderr with its exit code, and
holding Ctrl-C back while a write is in flight. Must never: print anything
but that one error line to stderr on failure, or let a traceback through
for a mistake the user can fix.

Error handling: StemeError, OSError and ValueError (the API's refusal of a
parameter) become `stemedb COMMAND: error: MESSAGE` and exit 1; UsageError exit 2; Ctrl-C exit 130 ("interrupted",
with what was stored so far when a command reports it); a closed stdout
(`| head`) is handled by the caller (main), quietly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TextIO

import stemedb

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130      # 128 + SIGINT, as shells report it
EXIT_BROKEN_PIPE = 141      # 128 + SIGPIPE: what `head` sees from tools killed by the closed pipe

DEFAULT_DATA = os.path.join("~", ".stemedb", "data")


class CliError(stemedb.StemeError):
    """A mistake in what the command line asks for; printed as one line, exit 1."""


class UsageError(CliError):
    """A malformed command line (unknown option, missing argument, clashing options); exit 2."""


class Interrupted(Exception):
    """Ctrl-C ended a command; `progress` says what it had done (e.g. "stored 20 so far")."""

    def __init__(self, progress: str) -> None:
        super().__init__(progress)
        self.progress = progress


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes are one line, raised for whoever runs it to report."""

    commands: Commands  # set on the top-level parser (stemedb.cli.build_parser)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


Handler = Callable[[argparse.Namespace, Any], int]


class Commands:
    """The subcommands: each command module's register() adds its own with add_parser()."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self._action = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                             parser_class=Parser)
        self.summaries: dict[str, str] = {}      # command → its one-line help
        self.parsers: dict[str, argparse.ArgumentParser] = {}   # aliases included

    def add_parser(self, name: str, *, help: str, aliases: tuple[str, ...] = (),  # noqa: A002
                   **options: Any) -> argparse.ArgumentParser:
        parser = self._action.add_parser(name, help=help, aliases=list(aliases), **options)
        label = f"{name} ({', '.join(aliases)})" if aliases else name
        self.summaries[label] = help
        for each in (name, *aliases):
            self.parsers[each] = parser
        return parser


def add_target_options(parser: argparse.ArgumentParser) -> None:
    """--data / --url / --token, accepted before the command and after it.

    Their defaults are SUPPRESS so that an option given before the command is
    not overwritten by the command's own (absent) one; see target.choose().
    """
    group = parser.add_argument_group("where (an option beats STEMEDB_URL / STEMEDB_DATA / "
                                      "STEMEDB_TOKEN, which beat the default)")
    group.add_argument("--data", metavar="DIR", default=argparse.SUPPRESS,
                       help=f"a data directory (default $STEMEDB_DATA, else {DEFAULT_DATA})")
    group.add_argument("--url", metavar="URL", default=argparse.SUPPRESS,
                       help="a running server, stemedb://host:port or stemedbs://… (default $STEMEDB_URL)")
    group.add_argument("--token", metavar="TOKEN", default=argparse.SUPPRESS,
                       help="the server's API token (default $STEMEDB_TOKEN)")


def add_json_option(parser: argparse.ArgumentParser, what: str = "print JSON") -> None:
    parser.add_argument("--json", action="store_true", help=what)


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def describe(exc: BaseException) -> str:
    """The message of an error, as one line (an OSError names its file first)."""
    if isinstance(exc, OSError) and not isinstance(exc, stemedb.StemeError) and exc.strerror:
        where = exc.filename if exc.filename is not None else None
        return one_line(f"{where}: {exc.strerror}" if where is not None else exc.strerror)
    return one_line(str(exc) or type(exc).__name__)


def report(command: str | None, message: str, stream: TextIO | None = None) -> None:
    """One line on stderr: `stemedb COMMAND: MESSAGE`."""
    stream = sys.stderr if stream is None else stream
    stream.write(f"stemedb {command}: {message}\n" if command else f"stemedb: {message}\n")
    stream.flush()


def run_command(command: str, handler: Handler, args: argparse.Namespace, context: Any) -> int:
    """Run one command; every user mistake becomes one line on stderr and an exit code.

    BrokenPipeError is left to the caller: stdout is gone, so whoever owns
    the process decides how to leave quietly.
    """
    try:
        return int(handler(args, context))
    except UsageError as exc:
        report(command, f"error: {describe(exc)}")
        return EXIT_USAGE
    except Interrupted as exc:
        report(command, f"interrupted: {exc.progress}")
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        report(command, "interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        raise
    except (stemedb.StemeError, OSError, ValueError) as exc:
        # ValueError: how the API refuses a parameter it does not know (a lens, a lifecycle)
        report(command, f"error: {describe(exc)}")
        return EXIT_ERROR


@contextlib.contextmanager
def writes_finish_first() -> Iterator[None]:
    """Hold a Ctrl-C back until the write in this block has been answered.

    So that "stored N so far" is exact: a batch is either acknowledged and
    counted, or was never sent. A second Ctrl-C interrupts at once (the
    batch in flight may then be stored or not; storing it again is safe).
    Only the main thread receives signals; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = False

    def hold(signum: int, frame: Any) -> None:
        nonlocal pressed
        if pressed:
            raise KeyboardInterrupt
        pressed = True

    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):
        yield  # SIGINT is ignored or handled outside Python: leave it alone
        return
    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt
