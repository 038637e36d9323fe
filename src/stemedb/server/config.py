"""Server configuration: the TOML file, its defaults and its validation.

Owns: ServerConfig and its parts (limits, rate limits, tokens, quotas, TLS,
database options), loaded from a TOML file (see examples/stemedb.toml) or a
dict. Must never: open sockets or the database. Unknown keys are refused, so a
typo in a limit is an error at start, not a silently absent limit.

Error handling: every problem raises ConfigError (stemedb.errors) naming the key.
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
ROLES = {"read": _protocol.ROLE_READ, "write": _protocol.ROLE_WRITE, "admin": _protocol.ROLE_ADMIN}
OPERATIONS = ("ping", "put", "get", "query", "scan", "vote", "epoch", "stats", "audit", "sync")


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

    @property
    def protected_mode(self) -> bool:
        """No tokens configured: only loopback clients are served (each as admin)."""
        return not self.tokens

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ServerConfig:
        """Read a TOML file."""
        try:
            with open(path, "rb") as handle:
                document = tomllib.load(handle)
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
        return cls.from_dict(document, base=os.path.dirname(os.path.abspath(path)))

    @classmethod
    def from_dict(cls, document: Mapping[str, Any], *, base: str = ".") -> ServerConfig:
        """Build from the parsed TOML structure (relative TLS paths are relative to `base`)."""
        _known(document, "", {"server", "database", "limits", "rate_limits", "tokens", "quotas", "tls"})
        config = cls()
        server = _table(document, "server")
        _known(server, "server.", {"listen", "http", "name", "write_threads", "bulk_threads",
                                   "read_threads"})
        config.listen = _opt_str(server, "server.listen", DEFAULT_LISTEN)
        config.http = _opt_str(server, "server.http", None)
        config.name = str(server.get("name", config.name))
        config.write_threads = _positive_int(server, "server.write_threads", config.write_threads)
        config.bulk_threads = _positive_int(server, "server.bulk_threads", config.bulk_threads)
        config.read_threads = _positive_int(server, "server.read_threads", config.read_threads)
        config.database = dict(_table(document, "database"))
        config.limits = _limits(_table(document, "limits"))
        rates = _table(document, "rate_limits")
        _known(rates, "rate_limits.", {"client", "operations"})
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
        _known(tls, "tls.", {"cert", "key"})
        if ("cert" in tls) != ("key" in tls):
            raise ConfigError("tls: give both cert and key, or neither")
        if "cert" in tls:
            config.tls_cert = os.path.join(base, str(tls["cert"]))
            config.tls_key = os.path.join(base, str(tls["key"]))
        return config


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
