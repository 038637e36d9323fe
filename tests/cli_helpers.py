"""What the CLI tests share: running `stemedb` in-process and as a process, and a real server."""

from __future__ import annotations

import io
import json
import os
import pathlib
import signal
import subprocess
import sys
from typing import Any

import pytest

import stemedb
from stemedb.cli import main

SRC = str(pathlib.Path(stemedb.__file__).resolve().parent.parent)
ALICE = stemedb.Signer.from_seed(b"\x01" * 32)
BOB = stemedb.Signer.from_seed(b"\x02" * 32)
ENVIRONMENT = ("STEMEDB_URL", "STEMEDB_DATA", "STEMEDB_TOKEN", "STEMEDB_HISTORY")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    """No STEMEDB_* variables of the developer's, and a HOME of the test's own."""
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def run(capsys, *argv: str, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    """`stemedb ARGV…` in this process: (exit code, stdout, stderr)."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def process_environment(**extra: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name not in ENVIRONMENT}
    env["PYTHONPATH"] = SRC + os.pathsep + os.environ.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_process(*argv: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m stemedb ARGV…` as a process."""
    return subprocess.run([sys.executable, "-m", "stemedb", *argv], input=stdin, text=True,
                          capture_output=True, env=process_environment(**env), timeout=300)


def assert_one_line_error(err: str, *fragments: str) -> None:
    """stderr is exactly one line, no traceback, and says each fragment."""
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def jsonl(*documents: dict[str, Any]) -> str:
    return "".join(json.dumps(document) + "\n" for document in documents)


class Server:
    """`stemedb serve` on 127.0.0.1:0, as a process; its announcement tells the address."""

    def __init__(self, data: pathlib.Path, config: pathlib.Path | None = None) -> None:
        argv = [sys.executable, "-m", "stemedb", "serve", "--data", str(data),
                "--listen", "127.0.0.1:0"]
        if config is not None:
            argv += ["--config", str(config)]
        self.log = open(data.parent / f"{data.name}-server.log", "w")  # closed in stop()
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                        env=process_environment())
        line = self.process.stdout.readline() if self.process.stdout else ""
        if not line:
            self.process.kill()
            self.log.close()
            raise AssertionError(f"the server did not start: {(data.parent / f'{data.name}-server.log').read_text()}")
        self.announcement = json.loads(line)
        self.address = self.announcement["listen"]
        self.url = f"stemedb://{self.address}"
        self.pid = self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()
