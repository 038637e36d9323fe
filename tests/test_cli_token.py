"""`stemedb token`: a new secret, its sha256, and config lines a server accepts as written."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from cli_helpers import (
    Server,
    assert_one_line_error,
    clean_environment,  # noqa: F401 - autouse fixture
    run,
)

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from stemedb.server.auth import Authenticator
from stemedb.server.config import ServerConfig


def printed(out: str) -> tuple[str, str, str]:
    """(token, sha256, the config lines) from the text output."""
    lines = out.splitlines()
    assert lines[0].startswith("token   ") and lines[1].startswith("sha256  ")
    config = "\n".join(line for line in lines[2:] if line and not line.startswith("#")) + "\n"
    return lines[0].split()[1], lines[1].split()[1], config


def test_the_token_its_sha256_and_config_lines(capsys):
    code, out, err = run(capsys, "token", "--role", "write", "--name", "ingest")
    assert (code, err) == (0, "")
    secret, digest, config = printed(out)
    assert re.fullmatch(r"sdb_[A-Za-z0-9_-]{43}", secret)
    assert digest == hashlib.sha256(secret.encode()).hexdigest()
    assert config == f'[[tokens]]\nname = "ingest"\nrole = "write"\nsha256 = "{digest}"\n'
    principal = Authenticator(ServerConfig.from_dict(tomllib.loads(config)).tokens).authenticate(secret)
    assert (principal.name, principal.role_name) == ("ingest", "write")


def test_json_output_and_the_default_name(capsys):
    code, out, _err = run(capsys, "token", "--json")
    assert code == 0
    document = json.loads(out)
    assert set(document) == {"token", "sha256", "name", "role", "config"}
    assert document["sha256"] == hashlib.sha256(document["token"].encode()).hexdigest()
    assert (document["role"], document["name"]) == ("read", f"read-{document['sha256'][:8]}")
    config = ServerConfig.from_dict(tomllib.loads(document["config"]))
    assert Authenticator(config.tokens).authenticate(document["token"]).role_name == "read"


def test_each_token_is_new(capsys):
    tokens = {json.loads(run(capsys, "token", "--json")[1])["token"] for _ in range(3)}
    assert len(tokens) == 3


def test_a_metrics_token_goes_in_the_http_table(capsys):
    document = json.loads(run(capsys, "token", "--role", "metrics", "--json")[1])
    config = ServerConfig.from_dict(tomllib.loads(document["config"]))
    assert config.tokens == []
    assert config.metrics_tokens == [hashlib.sha256(document["token"].encode()).digest()]
    Authenticator([], metrics_tokens=config.metrics_tokens).authenticate_scraper(document["token"])


@pytest.mark.parametrize("name", ['a"b', "", "x" * 65, "two words"])
def test_a_name_toml_cannot_hold_as_written_is_refused(capsys, name):
    code, out, err = run(capsys, "token", "--name", name)
    assert (code, out) == (2, "")
    assert_one_line_error(err, "--name")


def test_a_server_accepts_the_pasted_lines(tmp_path, capsys):
    """The rotate-tokens runbook's step: paste the printed lines, restart, use the token."""
    _code, out, _err = run(capsys, "token", "--role", "admin", "--name", "ops")
    secret, _digest, config = printed(out)
    config_file = tmp_path / "stemedb.toml"
    config_file.write_text(config)
    server = Server(tmp_path / "data", config_file)
    try:
        code, out, err = run(capsys, "stats", "--url", server.url, "--token", secret, "--json")
        assert code == 0, err
        assert json.loads(out)["records"] == 0
        code, _out, err = run(capsys, "stats", "--url", server.url, "--token", "sdb_" + "x" * 43)
        assert code == 1
        assert_one_line_error(err, "unknown token")
    finally:
        server.stop()
