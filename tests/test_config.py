"""Configuration and logs (issue 13, item 6): every setting from the file, the environment and the
command line, in that order of precedence under the command line; one clear error naming the key;
the documented table; the example file; text and JSON log lines; the access log; the start line."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import pathlib
import re
import signal
import subprocess
import sys
import urllib.request
from typing import Any

import pytest
from test_server_support import background_server, claims

import stemedb
from stemedb.client import connect
from stemedb.logs import configure_logging
from stemedb.server import ConfigError, ServerConfig, hash_token
from stemedb.server.config import SETTINGS, Limits, environment_settings, settings_table

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "stemedb.toml"
OPERATIONS = ROOT / "docs" / "operations.md"
SRC = str(pathlib.Path(stemedb.__file__).resolve().parent.parent)


@pytest.fixture
def config_file(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "stemedb.toml"
    path.write_text('[server]\nlisten = "127.0.0.1:7001"\nname = "from-file"\n'
                    '[limits]\nmax_inflight = 11\n[log]\nformat = "json"\n')
    return path


# ------------------------------------------------------------------ precedence


def test_precedence_command_line_over_environment_over_file_over_default(config_file):
    assert ServerConfig.resolve(None, environ={}).listen == "127.0.0.1:7440"  # the default
    from_file = ServerConfig.resolve(config_file, environ={})
    assert (from_file.listen, from_file.name, from_file.limits.max_inflight) == \
        ("127.0.0.1:7001", "from-file", 11)
    assert from_file.limits.max_frame == Limits().max_frame  # not in the file: default
    environ = {"STEMEDB_SERVER_LISTEN": "127.0.0.1:7002", "STEMEDB_LIMITS_MAX_INFLIGHT": "12"}
    from_environment = ServerConfig.resolve(config_file, environ=environ)
    assert (from_environment.listen, from_environment.limits.max_inflight) == ("127.0.0.1:7002", 12)
    assert from_environment.name == "from-file"  # what the environment does not set, the file does
    from_command_line = ServerConfig.resolve(config_file, environ=environ, overrides={
        "server.listen": "127.0.0.1:7003", "server.http": None, "log.format": "text"})
    assert from_command_line.listen == "127.0.0.1:7003"
    assert from_command_line.limits.max_inflight == 12 and from_command_line.http is None
    assert (from_environment.log_format, from_command_line.log_format) == ("json", "text")


def test_every_setting_can_come_from_its_environment_variable(tmp_path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    digest = hash_token("metrics-token-0123456789").hex()
    values = {
        "server.listen": "127.0.0.1:1", "server.http": "127.0.0.1:2", "server.name": "env",
        "server.write_threads": "3", "server.bulk_threads": "4", "server.read_threads": "5",
        "database.durability": "batch", "database.segment_size": "1048576",
        "database.batch_interval_ms": "2.5", "database.snapshot_every": "77",
        "database.verify_threads": "2",
        "limits.max_frame": "2000000", "limits.preauth_frame": "2000",
        "limits.handshake_timeout": "1.5", "limits.idle_timeout": "9", "limits.max_connections": "7",
        "limits.max_inflight": "8", "limits.shutdown_grace": "3", "limits.max_http_body": "1000000",
        "limits.buffer_budget": "9000000", "limits.output_buffer": "65536", "limits.send_timeout": "4",
        "rate_limits.client": "{ rate = 10.0, burst = 20.0 }",
        "rate_limits.operations": "{ put = { rate = 1.0 } }",
        "tokens": f'[{{ name = "env", role = "read", sha256 = "{digest}" }}]',
        "quotas.default_tier": "basic", "quotas.tiers": "{ basic = { rate = 5.0 } }",
        "quotas.signers": '{ "' + "ab" * 32 + '" = "basic" }',
        "tls.cert": str(cert), "tls.key": str(key),
        "http.metrics_token_sha256": digest,
        "log.level": "debug", "log.format": "json", "log.access": "yes",
        "archive.url": "s3://bucket/db1", "archive.interval": "0.25",
        "server.sync": "false", "cluster.file": str(tmp_path / "cluster.toml"), "cluster.node": "n2",
        "cluster.token": "node-token-0123456789", "cluster.ca": str(tmp_path / "ca.pem"),
    }
    assert set(values) == {s.key for s in SETTINGS}, "a setting this test does not cover"
    environ = {s.environment: values[s.key] for s in SETTINGS}
    config = ServerConfig.resolve(None, environ=environ)
    assert (config.listen, config.http, config.name) == ("127.0.0.1:1", "127.0.0.1:2", "env")
    assert (config.write_threads, config.bulk_threads, config.read_threads) == (3, 4, 5)
    assert config.database == {"durability": "batch", "segment_size": 1048576,
                               "batch_interval_ms": 2.5, "snapshot_every": 77, "verify_threads": 2}
    assert dataclasses.asdict(config.limits) == {
        "max_frame": 2000000, "preauth_frame": 2000, "handshake_timeout": 1.5, "idle_timeout": 9.0,
        "max_connections": 7, "max_inflight": 8, "shutdown_grace": 3.0, "max_http_body": 1000000,
        "buffer_budget": 9000000, "output_buffer": 65536, "send_timeout": 4.0}
    assert (config.client_rate.rate, config.client_rate.burst) == (10.0, 20.0)
    assert config.operation_rates["put"].rate == 1.0
    assert [(t.name, t.sha256.hex()) for t in config.tokens] == [("env", digest)]
    assert config.quota_default_tier == "basic" and config.signer_tiers == {b"\xab" * 32: "basic"}
    assert (config.tls_cert, config.tls_key) == (str(cert), str(key))
    assert config.metrics_tokens == [bytes.fromhex(digest)]
    assert (config.log_level, config.log_format, config.access_log) == ("debug", "json", True)
    assert (config.archive_url, config.archive_interval) == ("s3://bucket/db1", 0.25)
    assert config.sync is False
    assert (config.cluster_file, config.cluster_node) == (str(tmp_path / "cluster.toml"), "n2")
    assert (config.cluster_token, config.cluster_ca) == ("node-token-0123456789", str(tmp_path / "ca.pem"))


def test_registry_defaults_are_the_real_defaults(tmp_path):
    """The documented default of each scalar setting is what an empty configuration runs with."""
    config = ServerConfig.resolve(None, environ={})
    actual = {"server.listen": f'"{config.listen}"', "server.http": "off" if config.http is None else "",
              "server.name": f'"{config.name}"', "log.level": f'"{config.log_level}"',
              "log.format": f'"{config.log_format}"',
              "log.access": str(config.access_log).lower(),
              "archive.url": "off" if config.archive_url is None else "",
              "archive.interval": str(config.archive_interval)}
    for field in dataclasses.fields(Limits):
        actual[f"limits.{field.name}"] = str(getattr(config.limits, field.name))
    for name in ("write_threads", "bulk_threads", "read_threads"):
        actual[f"server.{name}"] = str(getattr(config, name))
    with stemedb.open(tmp_path / "data", segment_size=1 << 20) as db:  # the engine's own defaults
        actual["database.durability"] = f'"{db.durability}"'
        actual["database.snapshot_every"] = str(db.snapshot_every)
        actual["database.batch_interval_ms"] = f"{db.batch_interval * 1000:g}"
    from stemedb.engine.database import DEFAULT_SEGMENT_SIZE
    actual["database.segment_size"] = str(DEFAULT_SEGMENT_SIZE)
    documented = {s.key: s.default for s in SETTINGS}
    for key, value in actual.items():
        assert documented[key] == value, key


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("environ, message", [
    ({"STEMEDB_LIMITS_MAX_FRAMES": "1"}, "STEMEDB_LIMITS_MAX_FRAMES: not a setting (known: "),
    ({"STEMEDB_LOG_LEVLE": "debug"}, "STEMEDB_LOG_LEVLE: not a setting"),
    ({"STEMEDB_TOKENS_FILE": "x"}, "STEMEDB_TOKENS_FILE: not a setting"),
    ({"STEMEDB_LIMITS_MAX_FRAME": "big"},
     "STEMEDB_LIMITS_MAX_FRAME (limits.max_frame): expected an integer, got 'big'"),
    ({"STEMEDB_LIMITS_MAX_FRAME": "-5"},
     "limits.max_frame: expected a positive integer, got -5 (set by STEMEDB_LIMITS_MAX_FRAME)"),
    ({"STEMEDB_LOG_ACCESS": "maybe"}, "STEMEDB_LOG_ACCESS (log.access): expected true or false"),
    ({"STEMEDB_LOG_FORMAT": "xml"},
     "log.format: expected one of text, json, got 'xml' (set by STEMEDB_LOG_FORMAT)"),
    ({"STEMEDB_TOKENS": '[{ name = "a", role = "root", sha256 = "00" }]'},
     "tokens[0].role: expected one of read, write, admin, replica (set by STEMEDB_TOKENS)"),
    ({"STEMEDB_RATE_LIMITS_CLIENT": "fast"},
     "STEMEDB_RATE_LIMITS_CLIENT (rate_limits.client): expected a TOML inline table or array"),
    ({"STEMEDB_HTTP_METRICS_TOKEN_SHA256": "abc"},
     "http.metrics_token_sha256: expected 64 hex digits (the sha256 `stemedb token` prints) "
     "(set by STEMEDB_HTTP_METRICS_TOKEN_SHA256)"),
    ({"STEMEDB_DATABASE_DURABILITY": "fast"},
     "database.durability: expected one of sync, batch, none, got 'fast' "
     "(set by STEMEDB_DATABASE_DURABILITY)"),
])
def test_a_bad_environment_variable_is_one_error_naming_it(environ, message):
    with pytest.raises(ConfigError) as error:
        ServerConfig.resolve(None, environ=environ)
    assert str(error.value).startswith(message), str(error.value)


def test_variables_that_are_not_file_settings_are_left_alone():
    environ = {"STEMEDB_DATA": "/x", "STEMEDB_SEGMENT_SIZE": "4194304", "STEMEDB_LOG": "debug",
               "STEMEDB_TOKEN": "client-side", "PATH": "/bin"}
    assert environment_settings(environ) == {}


def test_errors_say_which_file_or_option_set_the_key(config_file, tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("[limits]\nmax_frame = 0\n")
    with pytest.raises(ConfigError) as error:
        ServerConfig.resolve(broken, environ={})
    assert str(error.value) == f"{broken}: limits.max_frame: expected a positive integer, got 0"
    with pytest.raises(ConfigError) as error:
        ServerConfig.resolve(config_file, environ={}, overrides={"server.listen": "nowhere"})
    assert str(error.value) == "server.listen: expected \"host:port\", got 'nowhere' (set by --listen)"
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[log]\nlevle = 'debug'\n")
    with pytest.raises(ConfigError, match=r"unknown.toml: log.levle: unknown key \(known: access, "
                                          r"format, level\)"):
        ServerConfig.resolve(unknown, environ={})
    with pytest.raises(ConfigError, match="database.segment_sise: unknown key"):
        ServerConfig.from_dict({"database": {"segment_sise": 1}})


def test_a_bad_setting_stops_the_server_before_it_touches_the_data_directory(tmp_path):
    data = tmp_path / "data"
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
               STEMEDB_LIMITS_MAX_INFLIGHT="many")
    result = subprocess.run([sys.executable, "-m", "stemedb.server", "--data", str(data),
                             "--listen", "127.0.0.1:0"], capture_output=True, text=True, env=env,
                            timeout=60)
    assert result.returncode == 1
    assert result.stderr == ("stemedb serve: error: STEMEDB_LIMITS_MAX_INFLIGHT "
                             "(limits.max_inflight): expected an integer, got 'many'\n")
    assert not data.exists()


# ------------------------------------------------------------------ documentation and example


def test_operations_doc_has_the_table_of_every_setting():
    """docs/operations.md carries settings_table() as it is (regenerate it from there)."""
    assert settings_table() in OPERATIONS.read_text()


def test_example_lists_every_setting_and_loads():
    text = EXAMPLE.read_text()
    sections: dict[str, set[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip().lstrip("#").strip()
        header = re.fullmatch(r"\[\[?([a-z_.]+)\]\]?.*", line)
        if header:
            section = header.group(1)
            parent, _, name = section.rpartition(".")
            sections.setdefault(parent, set()).add(name)  # [a.b] sets the key b of table a
            continue
        assignment = re.match(r"([a-z_0-9]+)\s*=", line)
        if assignment:
            sections.setdefault(section, set()).add(assignment.group(1))
    for setting in SETTINGS:
        if setting.key == "tokens":
            assert "tokens" in sections
            continue
        table, name = setting.key.rsplit(".", 1)
        assert name in sections.get(table, set()), f"{setting.key} is missing from the example"
    settings = ServerConfig.load(EXAMPLE)
    assert [t.name for t in settings.tokens] == ["ingest", "dashboard", "operator"]


def test_example_holds_no_token_that_works_as_written():
    """Every secret-looking word of the file fails against every token hash the file configures."""
    text = EXAMPLE.read_text()
    settings = ServerConfig.load(EXAMPLE)
    assert "token =" not in text.replace("metrics_token", ""), "a plaintext [[tokens]] token"
    digests = [t.sha256 for t in settings.tokens] + settings.metrics_tokens
    assert digests
    candidates = set(re.findall(r"[\w\-.~+/=]+", text)) | set(re.findall(r'"([^"]*)"', text)) | {""}
    for candidate in candidates:
        assert hash_token(candidate) not in digests, candidate


# ------------------------------------------------------------------ logs


def test_json_log_lines_carry_time_level_logger_message_and_fields():
    stream = io.StringIO()
    handler = configure_logging("info", "json", stream=stream)
    try:
        logger = logging.getLogger("stemedb.test")
        logger.debug("not shown")
        logger.info("hello %s", "world", extra={"door": "http", "bytes": 12})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logging.getLogger().removeHandler(handler)
    first, second = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first.pop("time"))
    assert first == {"level": "info", "logger": "stemedb.test", "message": "hello world",
                     "door": "http", "bytes": 12}
    assert second["level"] == "error" and "ValueError: boom" in second["exception"]


def test_text_log_lines_append_fields_and_configuring_twice_replaces_the_handler():
    stream = io.StringIO()
    configure_logging("warning", "text", stream=io.StringIO())
    handler = configure_logging("info", "text", stream=stream)
    try:
        root = logging.getLogger()
        assert sum(1 for h in root.handlers if type(h).__name__ == "_StemeHandler") == 1
        logging.getLogger("stemedb.test").info("ready", extra={"peer": "10.0.0.1:5", "note": "a b"})
    finally:
        logging.getLogger().removeHandler(handler)
    line = stream.getvalue().rstrip("\n")
    assert re.fullmatch(r"\S+ \S+ INFO stemedb.test: ready peer=10.0.0.1:5 note=\"a b\"", line), line
    with pytest.raises(ConfigError, match="log level: expected one of debug, info"):
        configure_logging("verbose", "text")
    with pytest.raises(ConfigError, match="log format: expected one of text, json"):
        configure_logging("info", "yaml")


def test_access_log_one_line_per_request(tmp_path, caplog):
    settings = ServerConfig(listen="127.0.0.1:0", http="127.0.0.1:0", access_log=True)
    with caplog.at_level(logging.INFO, logger="stemedb.access"), \
            background_server(tmp_path / "data", settings) as running:
        records = claims(3)
        with connect(running.url) as client:
            client.put_many(records)
            client.get(records[0].id)
            with pytest.raises(stemedb.InvalidRequest):
                client.query("s0", "p", lens="no-such-lens")
        with urllib.request.urlopen(f"{running.http}/health", timeout=10) as answer:
            answer.read()
    lines = [r for r in caplog.records if r.name == "stemedb.access"]
    seen = [(r.door, r.op, r.status, r.principal.startswith("local:127.0.0.1")) for r in lines]
    assert seen == [("binary", "put", "ok", True), ("binary", "get", "ok", True),
                    ("binary", "query", "invalid_request", True), ("http", "health", "ok", False)]
    put = lines[0]
    assert put.bytes > 3 * 100 and put.duration_ms >= 0 and re.fullmatch(r"127\.0\.0\.1:\d+", put.peer)
    assert lines[3].principal == "-" and lines[3].bytes == 0


def test_no_access_log_unless_configured(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="stemedb.access"), \
            background_server(tmp_path / "data") as running:
        with connect(running.url) as client:
            client.ping()
    assert [r for r in caplog.records if r.name == "stemedb.access"] == []


def _start(data: pathlib.Path, *options: str, environ: dict[str, str] | None = None,
           config: pathlib.Path | None = None) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **(environ or {}))
    command = [sys.executable, "-m", "stemedb.server", "--data", str(data), *options]
    if config is not None:
        command += ["--config", str(config)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)
    line = process.stdout.readline() if process.stdout else ""
    if not line:
        process.kill()
        raise AssertionError(f"server did not start: {process.communicate()[1]}")
    return process, json.loads(line)


def _stop(process: subprocess.Popen[str]) -> str:
    process.send_signal(signal.SIGTERM)
    _, errors = process.communicate(timeout=60)
    assert process.returncode == 0, errors
    return errors


def test_start_line_and_json_logs_of_a_server_process(tmp_path):
    """`python -m stemedb.server --log-format json`: the start line's fields, every line JSON,
    the access log switched on by the environment."""
    config = tmp_path / "stemedb.toml"
    config.write_text('[database]\ndurability = "batch"\n[server]\nhttp = "127.0.0.1:0"\n')
    process, announced = _start(tmp_path / "data", "--listen", "127.0.0.1:0", "--log-format", "json",
                                environ={"STEMEDB_LOG_ACCESS": "true"}, config=config)
    try:
        with urllib.request.urlopen(f"http://{announced['http']}/ready", timeout=10) as answer:
            answer.read()
    finally:
        errors = _stop(process)
    assert announced["version"] == stemedb.__version__ and announced["durability"] == "batch"
    assert announced["data"] == str(tmp_path / "data") and announced["tls"] is False
    lines = [json.loads(line) for line in errors.splitlines()]  # every line is one JSON object
    start = next(line for line in lines if line["message"].startswith("stemedb "))
    assert start["message"] == f"stemedb {stemedb.__version__} serving {tmp_path / 'data'}"
    assert {k: start[k] for k in ("version", "data", "durability", "listen", "http", "tls",
                                  "protected_mode")} == {
        "version": stemedb.__version__, "data": str(tmp_path / "data"), "durability": "batch",
        "listen": announced["listen"], "http": announced["http"], "tls": False,
        "protected_mode": True}
    access = [line for line in lines if line["logger"] == "stemedb.access"]
    assert len(access) == 1 and access[0]["op"] == "ready" and access[0]["status"] == "ok"
    assert set(access[0]) >= {"time", "level", "door", "op", "peer", "principal", "status", "bytes",
                              "duration_ms"}


def test_log_level_option_beats_the_file(tmp_path):
    config = tmp_path / "stemedb.toml"
    config.write_text('[log]\nlevel = "debug"\n')
    process, _ = _start(tmp_path / "data", "--listen", "127.0.0.1:0", "--log-level", "warning",
                        config=config)
    errors = _stop(process)
    assert " INFO " not in errors and " DEBUG " not in errors
    assert "WARNING stemedb.server: protected mode" in errors
