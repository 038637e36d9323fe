"""Server configuration: every setting, its defaults, the TOML file, the environment.

Owns: ServerConfig and its parts (limits, rate limits, tokens, quotas, TLS,
database options, logging, the /metrics token); SETTINGS, the one list of
every setting (TOML key, environment variable, default, meaning) that the
loader, the table in docs/operations.md and the tests all derive from; and
`resolve()`, which combines the command line, the `STEMEDB_<SECTION>_<KEY>`
environment variables and the TOML file (see examples/stemedb.toml), in that
order of precedence, over the defaults. Must never: open sockets or the
database. Unknown keys and unknown variables of a configuration section are
refused, so a typo in a limit is an error at start, not a silently absent limit.

Error handling: every problem raises ConfigError (stemedb.errors) naming the
key and, when the value came from the environment or the command line, the
variable or option that set it; nothing is returned for a configuration with
any mistake.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stemedb import _protocol
from stemedb.errors import ConfigError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

DEFAULT_LISTEN = "127.0.0.1:7440"
ROLES = {"read": _protocol.ROLE_READ, "write": _protocol.ROLE_WRITE, "admin": _protocol.ROLE_ADMIN,
         "replica": _protocol.ROLE_REPLICA}
OPERATIONS = ("ping", "put", "get", "query", "scan", "vote", "epoch", "stats", "audit", "verify", "sync",
              "node_hello", "replica_put", "push", "sync_with", "cluster_status", "cluster_reload")


@dataclass(frozen=True)
class RateSpec:
    """A token-bucket / GCRA rate: `rate` units per second, bursts of up to `burst` units."""

    rate: float
    burst: float


@dataclass(frozen=True)
class Token:
    """An API token: its name (for logs and rate limiting), role, SHA-256 and expiry."""

    name: str
    role: int
    sha256: bytes
    expires: float | None = None  # Unix seconds; None = never


@dataclass
class Limits:
    """Connection, frame and memory limits (docs/protocol.md, "Limits")."""

    max_frame: int = _protocol.DEFAULT_MAX_FRAME
    preauth_frame: int = _protocol.DEFAULT_PREAUTH_FRAME
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    max_connections: int = 1024
    max_inflight: int = 128
    shutdown_grace: float = 30.0
    max_http_body: int = _protocol.DEFAULT_MAX_FRAME
    buffer_budget: int = 256 << 20   # bytes held for clients, all connections: half requests, half answers
    output_buffer: int = 4 << 20     # answer bytes queued for one connection before its producers wait
    send_timeout: float = 30.0       # seconds a client may take no answer bytes while some wait

    def check_budget(self) -> None:
        """ConfigError unless each half of the buffer budget holds the largest request or answer."""
        largest = max(self.max_frame, self.max_http_body)
        needed = 2 * (largest + (1 << 20))
        if self.buffer_budget < needed:
            raise ConfigError(f"limits.buffer_budget: {self.buffer_budget} bytes cannot hold a "
                              f"{largest}-byte frame or body in each half (requests, answers); give at "
                              f"least {needed}, or lower limits.max_frame / limits.max_http_body")


@dataclass
class ServerConfig:
    """Everything `stemedb serve` needs besides the data directory."""

    listen: str | None = DEFAULT_LISTEN
    http: str | None = None
    name: str = "stemedb"
    write_threads: int = 32
    bulk_threads: int = 2
    read_threads: int = 4
    limits: Limits = field(default_factory=Limits)
    tokens: list[Token] = field(default_factory=list)
    client_rate: RateSpec | None = None
    operation_rates: dict[str, RateSpec] = field(default_factory=dict)
    quota_tiers: dict[str, RateSpec] = field(default_factory=dict)
    quota_default_tier: str | None = None
    signer_tiers: dict[bytes, str] = field(default_factory=dict)
    tls_cert: str | None = None
    tls_key: str | None = None
    database: dict[str, Any] = field(default_factory=dict)
    metrics_tokens: list[bytes] = field(default_factory=list)  # SHA-256s; empty: /metrics is open
    log_level: str = "info"
    log_format: str = "text"
    access_log: bool = False
    archive_url: str | None = None   # continuous archival target (stemedb.backup.archiver); None: off
    archive_interval: float = 1.0
    sync: bool = True                  # a single server answers SYNC / SYNC_WITH (stemedb sync)
    cluster_file: str | None = None    # a cluster node: the cluster file (docs/replication.md) ...
    cluster_node: str | None = None    # ... and this node's id in it
    cluster_token: str | None = None   # the secret this node presents to its peers (role replica)
    cluster_ca: str | None = None      # PEM file of the CA of the nodes' certificates (TLS)

    @property
    def protected_mode(self) -> bool:
        """No tokens configured: only loopback clients are served (each as admin)."""
        return not self.tokens

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ServerConfig:
        """Read a TOML file (the environment is not consulted: see `resolve`)."""
        document = _read_toml(path)
        try:
            return cls.from_dict(document, base=os.path.dirname(os.path.abspath(path)))
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    @classmethod
    def resolve(cls, path: str | os.PathLike[str] | None = None, *,
                environ: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> ServerConfig:
        """The configuration a server process runs with: command line > environment > file > default.

        `path` is the TOML file (None: none); `environ` the process
        environment (default os.environ), of which the `STEMEDB_<SECTION>_<KEY>`
        variables of SETTINGS are read; `overrides` maps setting keys
        ("server.listen", "log.level", …) to command-line values (None: not
        given). A setting given in a higher place replaces the whole value of
        a lower one (a table such as rate_limits.client is replaced, not merged).
        """
        document: dict[str, Any] = {}
        origins: dict[str, str] = {}
        base = "."
        if path is not None:
            document = _read_toml(path)
            base = os.path.dirname(os.path.abspath(path))
        for key, (value, origin) in {**environment_settings(os.environ if environ is None else environ),
                                     **_command_line(overrides or {})}.items():
            _assign(document, key, value)
            origins[key] = origin
        try:
            return cls.from_dict(document, base=base)
        except ConfigError as exc:
            raise ConfigError(_attribute(str(exc), origins, path)) from None

    @classmethod
    def from_dict(cls, document: Mapping[str, Any], *, base: str = ".") -> ServerConfig:
        """Build from the parsed TOML structure (relative TLS paths are relative to `base`)."""
        _known(document, "", set(SECTIONS))
        config = cls()
        server = _table(document, "server")
        _known(server, "server.", _keys_of("server"))
        config.listen = _opt_str(server, "server.listen", DEFAULT_LISTEN)
        config.http = _opt_str(server, "server.http", None)
        config.name = str(server.get("name", config.name))
        config.write_threads = _positive_int(server, "server.write_threads", config.write_threads)
        config.bulk_threads = _positive_int(server, "server.bulk_threads", config.bulk_threads)
        config.read_threads = _positive_int(server, "server.read_threads", config.read_threads)
        config.sync = _boolean(server, "server.sync", config.sync)
        config.database = _database(_table(document, "database"))
        config.limits = _limits(_table(document, "limits"))
        rates = _table(document, "rate_limits")
        _known(rates, "rate_limits.", _keys_of("rate_limits"))
        if "client" in rates:
            config.client_rate = _rate(rates["client"], "rate_limits.client")
        for op, spec in _table(rates, "operations", "rate_limits.").items():
            if op not in OPERATIONS:
                raise ConfigError(f"rate_limits.operations.{op}: unknown operation "
                                  f"(known: {', '.join(OPERATIONS)})")
            config.operation_rates[op] = _rate(spec, f"rate_limits.operations.{op}")
        config.tokens = _tokens(document.get("tokens", []))
        _quotas(config, _table(document, "quotas"))
        tls = _table(document, "tls")
        _known(tls, "tls.", _keys_of("tls"))
        if ("cert" in tls) != ("key" in tls):
            raise ConfigError("tls: give both cert and key, or neither")
        if "cert" in tls:
            config.tls_cert = os.path.join(base, _string(tls, "tls.cert"))
            config.tls_key = os.path.join(base, _string(tls, "tls.key"))
        http = _table(document, "http")
        _known(http, "http.", _keys_of("http"))
        config.metrics_tokens = _digests(http.get("metrics_token_sha256", []),
                                         "http.metrics_token_sha256")
        _cluster(config, _table(document, "cluster"), base)
        log = _table(document, "log")
        _known(log, "log.", _keys_of("log"))
        config.log_level = _choice(log, "log.level", config.log_level, LOG_LEVELS)
        config.log_format = _choice(log, "log.format", config.log_format, LOG_FORMATS)
        config.access_log = _boolean(log, "log.access", config.access_log)
        archive = _table(document, "archive")
        _known(archive, "archive.", _keys_of("archive"))
        config.archive_url = _archive_url(archive)
        config.archive_interval = _positive_number(archive, "archive.interval",
                                                   config.archive_interval)
        return config


# ------------------------------------------------------------------ every setting

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
DURABILITY_MODES = ("sync", "batch", "none")


@dataclass(frozen=True)
class Setting:
    """One configuration setting: where it is written, what it is, and its default.

    `kind` says how a value is read from the environment (where every value
    is text): "text" as it is, "integer" / "number" / "boolean" parsed, "toml"
    as a TOML inline value (a table or an array), "texts" as one string or,
    when it starts with "[", a TOML array of strings.
    """

    key: str           # dotted TOML key: section.name (tokens: the array itself)
    kind: str
    default: str       # as the documentation shows it
    meaning: str
    option: str = ""   # the command-line option that overrides it, if any

    @property
    def environment(self) -> str:
        return "STEMEDB_" + self.key.upper().replace(".", "_")


SETTINGS: tuple[Setting, ...] = (
    Setting("server.listen", "text", '"127.0.0.1:7440"',
            'binary protocol address `host:port` (port 0: any free port); `""` turns it off',
            "--listen"),
    Setting("server.http", "text", "off", "HTTP side door address `host:port` (health, ready, "
            "metrics, JSON API); TLS when [tls] is set", "--http"),
    Setting("server.name", "text", '"stemedb"', "server name in HELLO answers and STATS"),
    Setting("server.write_threads", "integer", "32", "worker threads for small writes (they "
            "mostly wait on group commits)"),
    Setting("server.bulk_threads", "integer", "2", "worker threads for write batches of 256+ "
            "records (CPU-bound)"),
    Setting("server.read_threads", "integer", "4", "worker threads for GET, QUERY, SCAN, STATS"),
    Setting("server.sync", "boolean", "true", "a single server answers SYNC and SYNC_WITH "
            "(`stemedb sync`) from replica and admin tokens; false: `unsupported` (cluster nodes "
            "always answer)"),
    Setting("database.durability", "text", '"sync"', "when a write is acknowledged: `sync`, "
            "`batch` or `none` (\"Durability modes\")"),
    Setting("database.segment_size", "integer", "67108864", "bytes per segment file of a new "
            "store (an existing store keeps its own)"),
    Setting("database.batch_interval_ms", "number", "10", "`batch` mode: milliseconds between "
            "background fsyncs"),
    Setting("database.snapshot_every", "integer", "1000000", "records between automatic index "
            "snapshots"),
    Setting("database.verify_threads", "integer", "CPU count", "threads verifying signatures "
            "of large write batches"),
    Setting("limits.max_frame", "integer", "16777216", "payload bytes per frame after "
            "authentication"),
    Setting("limits.preauth_frame", "integer", "4096", "payload bytes per frame before "
            "authentication (at least 1100)"),
    Setting("limits.handshake_timeout", "number", "10.0", "seconds from accept to an "
            "authenticated HELLO (HTTP: to the first request head)"),
    Setting("limits.idle_timeout", "number", "300.0", "seconds without a complete frame while "
            "nothing is in flight"),
    Setting("limits.max_connections", "integer", "1024", "open connections per door"),
    Setting("limits.max_inflight", "integer", "128", "unanswered requests per connection "
            "(backpressure)"),
    Setting("limits.shutdown_grace", "number", "30.0", "seconds to answer requests in flight "
            "on SIGTERM"),
    Setting("limits.max_http_body", "integer", "16777216", "bytes of an HTTP request body"),
    Setting("limits.buffer_budget", "integer", "268435456", "bytes held for all clients: half "
            "requests, half answers"),
    Setting("limits.output_buffer", "integer", "4194304", "answer bytes queued per connection "
            "before its requests wait"),
    Setting("limits.send_timeout", "number", "30.0", "seconds a client may take no answer "
            "bytes before it is disconnected"),
    Setting("rate_limits.client", "toml", "none", "`{ rate = …, burst = … }`: requests/s per "
            "client (token name)"),
    Setting("rate_limits.operations", "toml", "none", "`{ put = { rate = …, burst = … }, … }`: "
            "requests/s per client and operation"),
    Setting("tokens", "toml", "none (protected mode)", "`[[tokens]]`: `name`, `role` (read, "
            "write, admin), `sha256` of the secret (`stemedb token`), optional `expires`"),
    Setting("quotas.default_tier", "text", "none", "the tier of signers not in "
            "quotas.signers"),
    Setting("quotas.tiers", "toml", "none", "`{ tier = { rate = …, burst = … }, … }`: records/s "
            "per signer key"),
    Setting("quotas.signers", "toml", "none", '`{ "<public key hex>" = "tier", … }`'),
    Setting("tls.cert", "text", "none", "PEM certificate chain; with tls.key, both doors serve "
            "TLS only (path relative to the config file)"),
    Setting("tls.key", "text", "none", "PEM private key of tls.cert"),
    Setting("http.metrics_token_sha256", "texts", "none (open)", "SHA-256 (hex) of the token, "
            "or an array of them, that GET /metrics must present as `Authorization: Bearer`"),
    Setting("cluster.file", "text", "none (a single server)", "the cluster file: this server is a "
            "node of that cluster (docs/replication.md) and listens on its address there", "--cluster"),
    Setting("cluster.node", "text", "none", "this node's id in the cluster file", "--node"),
    Setting("cluster.token", "text", "none", "the secret this node presents to its peers: a "
            "`[[tokens]]` entry of role `replica` (or admin) on every node holds its sha256; none: "
            "peers must be in protected mode (loopback)"),
    Setting("cluster.ca", "text", "the system's", "with [tls]: PEM file of the CA whose "
            "certificates the peers present (path relative to the config file)"),
    Setting("log.level", "text", '"info"', "`debug`, `info`, `warning` or `error`",
            "--log-level"),
    Setting("log.format", "text", '"text"', "`text` (one readable line) or `json` (one JSON "
            "object per line)", "--log-format"),
    Setting("log.access", "boolean", "false", "one `stemedb.access` log line per request: door, "
            "op, peer, principal, status, bytes, duration"),
    Setting("archive.url", "text", "off", "continuous archival to `file:///dir` or "
            "`s3://bucket/prefix` (\"Backup and archival\")"),
    Setting("archive.interval", "number", "1.0", "seconds between archive rounds (the most "
            "acknowledged writes a restore from the archive can lose)"),
)
SETTINGS_BY_KEY = {setting.key: setting for setting in SETTINGS}
SETTINGS_BY_VARIABLE = {setting.environment: setting for setting in SETTINGS}
SECTIONS = tuple(dict.fromkeys(setting.key.split(".", 1)[0] for setting in SETTINGS))
# A variable that starts with one of these and is not a setting is a typo: refused.
RESERVED_PREFIXES = tuple(f"STEMEDB_{section.upper()}" + ("" if section == "tokens" else "_")
                          for section in SECTIONS)


def _keys_of(section: str) -> set[str]:
    return {s.key.split(".", 1)[1] for s in SETTINGS if s.key.startswith(section + ".")}


def settings_table() -> str:
    """The Markdown table of every setting, as docs/operations.md shows it."""
    rows = ["| TOML key | environment variable | command line | default | meaning |",
            "|---|---|---|---|---|"]
    for setting in SETTINGS:
        option = f"`{setting.option}`" if setting.option else ""
        rows.append(f"| `{setting.key}` | `{setting.environment}` | {option} | {setting.default} "
                    f"| {setting.meaning} |")
    return "\n".join(rows) + "\n"


def environment_settings(environ: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    """{setting key: (value, variable)} of the STEMEDB_* variables that name settings.

    ConfigError for a variable in a settings section that names no setting
    (STEMEDB_LIMITS_MAX_FRAMES) or whose text does not parse as its kind.
    Other STEMEDB_* variables (STEMEDB_DATA, STEMEDB_SEGMENT_SIZE) are not
    configuration-file settings and are left alone.
    """
    found: dict[str, tuple[Any, str]] = {}
    for variable in sorted(environ):
        setting = SETTINGS_BY_VARIABLE.get(variable)
        if setting is None:
            if variable.startswith(RESERVED_PREFIXES):
                section = next(p for p in RESERVED_PREFIXES if variable.startswith(p))
                known = sorted(v for v in SETTINGS_BY_VARIABLE if v.startswith(section))
                raise ConfigError(f"{variable}: not a setting (known: {', '.join(known)})")
            continue
        found[setting.key] = (_parse_text(setting, environ[variable], variable), variable)
    return found


def _parse_text(setting: Setting, text: str, origin: str) -> Any:
    """A setting's value from the text of an environment variable."""
    try:
        if setting.kind == "integer":
            return int(text.strip())
        if setting.kind == "number":
            return float(text.strip())
        if setting.kind == "boolean":
            word = text.strip().lower()
            if word in ("1", "true", "yes", "on"):
                return True
            if word in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if setting.kind == "toml" or (setting.kind == "texts" and text.lstrip().startswith("[")):
            return tomllib.loads(f"value = {text}")["value"]
    except (ValueError, tomllib.TOMLDecodeError):
        expected = {"integer": "an integer", "number": "a number",
                    "boolean": "true or false (1, 0, yes, no)"}.get(
            setting.kind, "a TOML inline table or array")
        raise ConfigError(f"{origin} ({setting.key}): expected {expected}, got {text!r}") from None
    if setting.key in ("tls.cert", "tls.key", "cluster.file", "cluster.ca") and text:
        return os.path.abspath(text)  # not relative to the config file: to where it was given
    return text


def _command_line(overrides: Mapping[str, Any]) -> dict[str, tuple[Any, str]]:
    found: dict[str, tuple[Any, str]] = {}
    for key, value in overrides.items():
        setting = SETTINGS_BY_KEY.get(key)
        if setting is None:
            raise ConfigError(f"{key}: not a setting")
        if value is not None:
            found[key] = (value, setting.option or key)
    return found


def _assign(document: dict[str, Any], key: str, value: Any) -> None:
    if "." not in key:
        document[key] = value
        return
    section, name = key.split(".", 1)
    table = document.get(section)
    if not isinstance(table, dict):
        table = document[section] = {}
    table[name] = value


def _attribute(message: str, origins: Mapping[str, str], path: Any) -> str:
    """The message, saying which variable or option set the key it names (else the file)."""
    named = message.split(":", 1)[0].split(" ", 1)[0]
    for key in sorted(origins, key=len, reverse=True):
        if named == key or named.startswith((key + ".", key + "[")):
            return f"{message} (set by {origins[key]})"
    return f"{path}: {message}" if path is not None else message


def _read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None


def hash_token(token: str) -> bytes:
    """The SHA-256 of a token, as stored in the config's `sha256` field (hex)."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def _known(table: Mapping[str, Any], prefix: str, keys: set[str]) -> None:
    unknown = sorted(set(table) - keys)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(keys))})")


def _table(document: Mapping[str, Any], key: str, prefix: str = "") -> Mapping[str, Any]:
    value = document.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"{prefix}{key}: expected a table")
    return value


def _opt_str(table: Mapping[str, Any], key: str, default: str | None) -> str | None:
    value = table.get(key.rsplit(".", 1)[-1], default)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected \"host:port\"")
    parse_address(value, key)
    return value


def _archive_url(table: Mapping[str, Any]) -> str | None:
    value = table.get("url")
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not value.startswith(("file:///", "s3://")):
        raise ConfigError(f"archive.url: expected \"file:///dir\" or \"s3://bucket/prefix\", "
                          f"got {value!r}")
    return value


def _positive_int(table: Mapping[str, Any], key: str, default: int) -> int:
    value = table.get(key.rsplit(".", 1)[-1], default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}: expected a positive integer, got {value!r}")
    return value


def _positive_number(table: Mapping[str, Any], key: str, default: float) -> float:
    value = table.get(key.rsplit(".", 1)[-1], default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{key}: expected a positive number, got {value!r}")
    return float(value)


def _string(table: Mapping[str, Any], key: str) -> str:
    value = table.get(key.rsplit(".", 1)[-1])
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a non-empty string, got {value!r}")
    return value


def _choice(table: Mapping[str, Any], key: str, default: str, choices: tuple[str, ...]) -> str:
    value = table.get(key.rsplit(".", 1)[-1], default)
    word = value.lower() if isinstance(value, str) else value
    if word not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
    return str(word)


def _boolean(table: Mapping[str, Any], key: str, default: bool) -> bool:
    value = table.get(key.rsplit(".", 1)[-1], default)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _digests(value: Any, key: str) -> list[bytes]:
    """SHA-256 digests from one hex string or an array of them."""
    entries = [value] if isinstance(value, str) else value
    if not isinstance(entries, list):
        raise ConfigError(f"{key}: expected the hex SHA-256 of a token, or an array of them")
    digests = []
    for index, entry in enumerate(entries):
        try:
            digest = bytes.fromhex(entry) if isinstance(entry, str) else b""
        except ValueError:
            digest = b""
        if len(digest) != 32:
            where = key if isinstance(value, str) else f"{key}[{index}]"
            raise ConfigError(f"{where}: expected 64 hex digits (the sha256 `stemedb token` prints)")
        digests.append(digest)
    return digests


def _database(table: Mapping[str, Any]) -> dict[str, Any]:
    """The [database] options for stemedb.open(), each checked here so its error names the key."""
    _known(table, "database.", _keys_of("database"))
    options: dict[str, Any] = {}
    if "durability" in table:
        options["durability"] = _choice(table, "database.durability", "sync", DURABILITY_MODES)
    for name in ("segment_size", "snapshot_every", "verify_threads"):
        if name in table:
            options[name] = _positive_int(table, f"database.{name}", 1)
    if "batch_interval_ms" in table:
        options["batch_interval_ms"] = _positive_number(table, "database.batch_interval_ms", 1.0)
    return options


def _limits(table: Mapping[str, Any]) -> Limits:
    limits = Limits()
    ints = ("max_frame", "preauth_frame", "max_connections", "max_inflight", "max_http_body",
            "buffer_budget", "output_buffer")
    floats = ("handshake_timeout", "idle_timeout", "shutdown_grace", "send_timeout")
    _known(table, "limits.", set(ints) | set(floats))
    for name in ints:
        setattr(limits, name, _positive_int(table, f"limits.{name}", getattr(limits, name)))
    for name in floats:
        setattr(limits, name, _positive_number(table, f"limits.{name}", getattr(limits, name)))
    if limits.max_frame > 0xFFFFFFFF:
        raise ConfigError("limits.max_frame: must fit in 32 bits")
    if limits.preauth_frame > limits.max_frame:
        raise ConfigError("limits.preauth_frame: must not exceed limits.max_frame")
    if limits.preauth_frame < 1100:
        raise ConfigError("limits.preauth_frame: must be at least 1100 bytes (a HELLO with a token)")
    limits.check_budget()
    return limits


def _rate(spec: Any, key: str) -> RateSpec:
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{key}: expected {{ rate = …, burst = … }}")
    _known(spec, f"{key}.", {"rate", "burst"})
    rate = _positive_number(spec, f"{key}.rate", 1.0) if "rate" in spec else None
    if rate is None:
        raise ConfigError(f"{key}.rate: required")
    burst = _positive_number(spec, f"{key}.burst", max(rate, 1.0))
    return RateSpec(rate, burst)


def _tokens(entries: Any) -> list[Token]:
    if not isinstance(entries, list):
        raise ConfigError("tokens: expected an array of tables ([[tokens]])")
    out: list[Token] = []
    names: set[str] = set()
    for index, entry in enumerate(entries):
        key = f"tokens[{index}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{key}: expected a table")
        _known(entry, f"{key}.", {"name", "role", "token", "sha256", "expires"})
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{key}.name: required")
        if name in names:
            raise ConfigError(f"{key}.name: {name!r} is used twice")
        names.add(name)
        role = ROLES.get(str(entry.get("role", "")))
        if role is None:
            raise ConfigError(f"{key}.role: expected one of {', '.join(ROLES)}")
        if ("token" in entry) == ("sha256" in entry):
            raise ConfigError(f"{key}: give exactly one of token (the secret) or sha256 (its hash)")
        if "token" in entry:
            secret = entry["token"]
            if not isinstance(secret, str) or len(secret) < 16 or len(secret.encode()) > _protocol.MAX_TOKEN:
                raise ConfigError(f"{key}.token: expected 16..{_protocol.MAX_TOKEN} characters")
            digest = hash_token(secret)
        else:
            try:
                digest = bytes.fromhex(str(entry["sha256"]))
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise ConfigError(f"{key}.sha256: expected 64 hex digits")
        out.append(Token(name, role, digest, _expiry(entry.get("expires"), f"{key}.expires")))
    return out


def _expiry(value: Any, key: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime.datetime):
        moment = value if value.tzinfo is not None else value.replace(tzinfo=datetime.timezone.utc)
        return moment.timestamp()
    if isinstance(value, datetime.date):
        return datetime.datetime(value.year, value.month, value.day,
                                 tzinfo=datetime.timezone.utc).timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ConfigError(f"{key}: expected a TOML date-time or Unix seconds")


def _cluster(config: ServerConfig, table: Mapping[str, Any], base: str) -> None:
    _known(table, "cluster.", _keys_of("cluster"))
    for key in ("file", "ca"):
        if key in table:
            setattr(config, f"cluster_{key}", os.path.join(base, _string(table, f"cluster.{key}")))
    if "node" in table:
        config.cluster_node = _string(table, "cluster.node")
    if "token" in table:
        token = _string(table, "cluster.token")
        if len(token) < 16 or len(token.encode()) > _protocol.MAX_TOKEN:
            raise ConfigError(f"cluster.token: expected 16..{_protocol.MAX_TOKEN} characters")
        config.cluster_token = token
    if config.cluster_node is not None and config.cluster_file is None:
        raise ConfigError("cluster.node: give the cluster file too (cluster.file, --cluster)")


def _quotas(config: ServerConfig, table: Mapping[str, Any]) -> None:
    _known(table, "quotas.", {"default_tier", "tiers", "signers"})
    for tier, spec in _table(table, "tiers", "quotas.").items():
        config.quota_tiers[tier] = _rate(spec, f"quotas.tiers.{tier}")
    default = table.get("default_tier")
    if default is not None and default not in config.quota_tiers:
        raise ConfigError(f"quotas.default_tier: {default!r} is not in quotas.tiers")
    config.quota_default_tier = default
    for key_hex, tier in _table(table, "signers", "quotas.").items():
        try:
            key = bytes.fromhex(key_hex)
        except ValueError:
            key = b""
        if len(key) != 32:
            raise ConfigError(f"quotas.signers.{key_hex}: expected a 64-hex-digit public key")
        if tier not in config.quota_tiers:
            raise ConfigError(f"quotas.signers.{key_hex}: tier {tier!r} is not in quotas.tiers")
        config.signer_tiers[key] = tier


def parse_address(text: str, what: str = "address") -> tuple[str, int]:
    """("host", port) from "host:port" or "[v6]:port"."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what}: expected \"host:port\", got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port)
