"""`stemedb shell`: commands fed on stdin, errors that do not end it, line editing and history."""

from __future__ import annotations

import builtins
import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time

from cli_helpers import (
    ALICE,
    Server,
    clean_environment,  # noqa: F401 - autouse fixture
    process_environment,
    run,
    run_process,
)

import stemedb
from stemedb.cli.formats import parse_time

T0 = parse_time("2026-12-01T10:00:00Z", "test")


def key_file(tmp_path):
    path = tmp_path / "alice.key"
    path.write_text(json.dumps({"type": "ed25519", "seed": ALICE.seed.hex()}))
    return path


def tea_id(value="hot"):
    return stemedb.Assertion("tea", "is", value, timestamp=T0, signers=[ALICE.public_key]).id.hex()


def test_a_session_on_a_data_directory(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    script = "\n".join([
        "# a comment, then a blank line",
        "",
        'put {"subject": "tea", "predicate": "is", "object": "hot", "timestamp": "2026-12-01T10:00:00Z"}',
        "scan -s tea",
        "get zz",
        "frobnicate",
        f"get {tea_id()[:6]} --json",
        "stats --data elsewhere",
        "serve",
        "query tea is --lens nope",
        "quit",
        "stats",  # not run: the session has ended
    ]) + "\n"
    code, out, err = run(capsys, "shell", "--data", str(data), "--key", str(key_file(tmp_path)),
                         stdin=script, monkeypatch=monkeypatch)
    assert code == 0
    lines = out.splitlines()
    assert lines[:2] == [tea_id(), f"{tea_id()[:16]}  2026-12-01T10:00:00Z  tea — is — \"hot\"  "
                         "(1, observational, proposed)"]
    assert json.loads("\n".join(lines[2:]))["id"] == tea_id()
    assert err.splitlines() == [
        "stemedb get: error: ID: 'zz' is not hex",
        "stemedb: error: argument COMMAND: invalid choice: 'frobnicate' (choose from 'demo', 'keygen', "
        "'put', 'get', 'scan', 'list', 'query', 'conflicts', 'stats', 'verify', 'serve', 'shell', 'sync', "
        "'cluster') "
        "(see stemedb --help)",
        f"stemedb stats: error: this shell works on {data}; start another shell for another store or server",
        "stemedb serve: error: serve is not available inside the shell",
        "stemedb query: error: lens: 'nope', expected one of recency, confidence, consensus, "
        "vote_consensus, authority, skeptic, epoch_aware, layered, constraints or a Lens",
    ]


def test_help_lists_the_commands(tmp_path, capsys, monkeypatch):
    code, out, err = run(capsys, "shell", "--data", str(tmp_path / "d"), stdin="help\nhelp scan\nhelp nope\n",
                         monkeypatch=monkeypatch)
    assert code == 0
    assert "  scan (list)  list stored records in write order" in out
    assert "  quit         leave (also exit, Ctrl-D)" in out and "serve" not in out.split("usage:")[0]
    assert "usage: stemedb scan" in out and "--subject SUBJECT" in out
    assert err == "stemedb help: error: no command 'nope'; help lists them\n"
    assert not (tmp_path / "d").exists()  # nothing needed the store: nothing was created


def test_put_in_the_shell_does_not_read_the_shell_input(tmp_path, capsys, monkeypatch):
    code, out, err = run(capsys, "shell", "--data", str(tmp_path / "d"), stdin="put\nstats\n",
                         monkeypatch=monkeypatch)
    assert code == 0
    assert err.splitlines() == [
        "stemedb put: error: put in the shell reads a file (put FILE) or JSON after it "
        "(put {\"subject\": …})",
        f"stemedb stats: error: no StemeDB store at {tmp_path / 'd'} (no such directory); give --data "
        "DIR of a store, or --url to reach a server (stemedb put creates a store)",
    ]


def test_a_session_on_a_server(tmp_path):
    server = Server(tmp_path / "data")
    try:
        script = ('put {"subject": "tea", "predicate": "is", "object": "hot", "timestamp": ' + str(T0) + "}\n"
                  f"get {tea_id()[:8]}\nquery tea is\nget ffff\n")
        result = run_process("shell", "--url", server.url, "--key", str(key_file(tmp_path)), stdin=script)
        assert result.returncode == 0
        lines = result.stdout.splitlines()
        assert lines[0] == tea_id()
        assert lines[1] == "2026-12-01T10:00:00Z  tea — is — \"hot\"  (1, observational, proposed)"
        assert "tea / is  (lens recency)" in lines
        assert result.stderr == (f"stemedb get: error: ID: no record with an ID starting ffff in "
                                 f"{server.url}\n")
    finally:
        server.stop()


def test_ctrl_c_at_the_prompt_drops_the_line(tmp_path, capsys, monkeypatch):
    """On a terminal the shell reads with input(); Ctrl-C there raises KeyboardInterrupt."""
    record = stemedb.Assertion("tea", "is", "hot", timestamp=T0).sign(ALICE)
    with stemedb.open(tmp_path / "data") as db:
        db.put(record)
    typed = iter([KeyboardInterrupt, "scan", EOFError])

    def keyboard(prompt: str) -> str:
        key = next(typed)
        if isinstance(key, type):
            raise key
        return key

    monkeypatch.setattr(builtins, "input", keyboard)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setenv("STEMEDB_HISTORY", str(tmp_path / "history"))
    code, out, err = run(capsys, "shell", "--data", str(tmp_path / "data"))
    assert code == 0 and err == ""
    assert out.splitlines() == [
        f"stemedb shell on {tmp_path / 'data'}; help lists the commands, quit leaves",
        "",  # the dropped line
        f"{record.id.hex()[:16]}  2026-12-01T10:00:00Z  tea — is — \"hot\"  (1, observational, proposed)",
        "",  # after Ctrl-D
    ]


class Terminal:
    """`stemedb shell` on a pseudo-terminal, so readline is in charge of its input."""

    def __init__(self, *argv: str, **env: str) -> None:
        self.master, slave = pty.openpty()
        # wide enough that readline need not scroll the line (no redraws in the output)
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 400, 0, 0))
        self.process = subprocess.Popen([sys.executable, "-m", "stemedb", "shell", *argv],
                                        stdin=slave, stdout=slave, stderr=slave,
                                        env=process_environment(TERM="dumb", **env))
        os.close(slave)
        self.output = b""

    def read_until(self, text: bytes, start: int = 0, timeout: float = 60.0) -> bytes:
        """Read until `text` appears in the output after byte `start`."""
        deadline = time.monotonic() + timeout  # a hang guard only
        while text not in self.output[start:]:
            ready, _, _ = select.select([self.master], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                raise AssertionError(f"no {text!r} in {self.output!r}")
            try:
                self.output += os.read(self.master, 4096)
            except OSError:  # the shell has ended
                raise AssertionError(f"no {text!r} in {self.output!r}") from None
        return self.output

    def type(self, keys: bytes, then: bytes) -> bytes:
        before = len(self.output)
        os.write(self.master, keys)
        self.read_until(then, before)
        return self.output[before:]

    def close(self) -> int:
        code = self.process.wait(120)
        os.close(self.master)
        return code


def test_line_editing_and_history_on_a_terminal(tmp_path):
    data, history = tmp_path / "data", tmp_path / "history"
    with stemedb.open(data) as db:
        db.put(stemedb.Assertion("tea", "is", "hot", timestamp=T0).sign(ALICE))
    prompt = f"{data}> ".encode()
    terminal = Terminal("--data", str(data), STEMEDB_HISTORY=str(history))
    terminal.read_until(prompt)
    # Ctrl-A goes to the start of the line: "ats" becomes "stats".
    answer = terminal.type(b"ats\x01st\r", then=prompt)
    assert b"records     1  assertion 1" in answer
    terminal.type(b"quit\r", then=b"\n")
    assert terminal.close() == 0
    assert history.read_text().splitlines() == ["stats", "quit"]

    terminal = Terminal("--data", str(data), STEMEDB_HISTORY=str(history))
    terminal.read_until(prompt)
    answer = terminal.type(b"\x1b[A\x1b[A\r", then=prompt)  # up twice: "stats" from the last session
    assert b"records     1  assertion 1" in answer
    os.write(terminal.master, b"\x04")  # Ctrl-D ends the shell
    assert terminal.close() == 0
