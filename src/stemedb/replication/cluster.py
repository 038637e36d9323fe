"""The cluster file: which nodes form the cluster, and how records are spread over them.

Owns: parsing and validating the TOML cluster file (docs/replication.md,
"The cluster file") into a frozen `ClusterFile`, and comparing two versions
of it for a reload (`compare`). Must never: open sockets or stores, or guess:
every key it does not know is refused, so a typo is an error at start, not a
silently ignored setting.

Error handling: every mistake raises ClusterFileError naming the file, the
key and what is wrong; nothing is returned for a file with any mistake.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

from stemedb.errors import StemeError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

MAX_PARTITIONS = 65536
ACK_POLICIES = ("1", "all")
MAX_NODE_ID = 64
MAX_PUSH_WINDOW = 64

TOP_KEYS = {"name", "version", "replication_factor", "partitions", "acks", "nodes", "replication"}
NODE_KEYS = {"id", "address"}
REPLICATION_KEYS = {"heartbeat_interval", "suspect_after", "down_after", "anti_entropy_interval",
                    "anti_entropy_jitter", "push_queue_records", "push_queue_bytes", "push_window",
                    "write_timeout", "read_timeout"}


class ClusterFileError(StemeError, ValueError):
    """The cluster file is invalid; the message names the key and what is wrong. Fix the file."""


@dataclass(frozen=True)
class Node:
    """One member of the cluster: its id and the address it listens on."""

    id: str
    address: str       # as written: "host:port", IPv6 hosts in brackets
    host: str
    port: int


@dataclass(frozen=True)
class ReplicationSettings:
    """Timings and bounds of replication (the optional [replication] table); seconds, counts."""

    heartbeat_interval: float = 0.5     # a PING to every peer this often
    suspect_after: float = 2.0          # unanswered for this long: suspect
    down_after: float = 6.0             # unanswered for this long: down
    anti_entropy_interval: float = 30.0  # a reconciliation round with every peer this often
    anti_entropy_jitter: float = 0.2    # each wait is the interval × (1 ± jitter), drawn anew
    push_queue_records: int = 100_000   # records one peer's push queue holds at most
    push_queue_bytes: int = 64 << 20    # bytes one peer's push queue holds at most
    push_window: int = 2                # pushes to one peer in flight at once (1..MAX_PUSH_WINDOW)
    write_timeout: float = 5.0          # a replica that has not confirmed a write by then failed
    read_timeout: float = 30.0          # a read or query forwarded to a replica fails after this


@dataclass(frozen=True)
class ClusterFile:
    """A validated cluster file. Compare versions with `compare(old, new)`."""

    name: str
    version: int
    replication_factor: int
    partitions: int
    acks: str                   # "1" or "all": the default write acknowledgement
    nodes: tuple[Node, ...]
    replication: ReplicationSettings = field(default_factory=ReplicationSettings)
    source: str = "<cluster file>"

    def node(self, node_id: str) -> Node:
        """The node with this id; ClusterFileError naming the known ids otherwise."""
        for node in self.nodes:
            if node.id == node_id:
                return node
        known = ", ".join(n.id for n in self.nodes)
        raise ClusterFileError(f"{self.source}: no node {node_id!r} in the cluster (nodes: {known})")

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(node.id for node in self.nodes)

    def peers_of(self, node_id: str) -> tuple[str, ...]:
        """Every other node's id, in file order."""
        self.node(node_id)
        return tuple(n.id for n in self.nodes if n.id != node_id)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ClusterFile:
        """Read and validate a cluster file."""
        source = os.fspath(path)
        try:
            with open(source, "rb") as handle:
                document = tomllib.load(handle)
        except OSError as exc:
            raise ClusterFileError(f"{source}: cannot read the cluster file ({exc.strerror or exc})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ClusterFileError(f"{source}: not valid TOML ({exc})") from None
        return cls.from_dict(document, source=source)

    @classmethod
    def parse(cls, text: str, *, source: str = "<cluster file>") -> ClusterFile:
        """Validate a cluster file given as TOML text."""
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ClusterFileError(f"{source}: not valid TOML ({exc})") from None
        return cls.from_dict(document, source=source)

    @classmethod
    def from_dict(cls, document: Mapping[str, Any], *, source: str = "<cluster file>") -> ClusterFile:
        """Validate the parsed TOML structure."""
        check = _Checker(source)
        check.known(document, "", TOP_KEYS)
        name = check.text(document, "name")
        version = check.positive_int(document, "version", required=True)
        partitions = check.positive_int(document, "partitions", required=True)
        if partitions > MAX_PARTITIONS:
            check.fail("partitions", f"{partitions} is not in 1..{MAX_PARTITIONS}")
        nodes = _nodes(check, document)
        factor = check.positive_int(document, "replication_factor", required=True)
        if factor > len(nodes):
            check.fail("replication_factor",
                       f"{factor} is more than the {len(nodes)} nodes listed; add nodes or lower it")
        acks = _acks(check, document)
        settings = _settings(check, document.get("replication", {}))
        return cls(name=name, version=version, replication_factor=factor, partitions=partitions,
                   acks=acks, nodes=nodes, replication=settings, source=source)


@dataclass(frozen=True)
class ClusterChange:
    """What a reload changes: node ids added, removed, and given a new address."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    readdressed: tuple[str, ...]
    replication_factor_changed: bool
    acks_changed: bool
    settings_changed: bool

    @property
    def placement_changed(self) -> bool:
        """Replicas of some partitions move (anti-entropy then moves the data)."""
        return bool(self.added or self.removed or self.replication_factor_changed)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.readdressed or self.replication_factor_changed
                    or self.acks_changed or self.settings_changed)


def compare(old: ClusterFile, new: ClusterFile) -> ClusterChange:
    """What changes from `old` to `new`; ClusterFileError if `new` cannot replace `old`.

    A reload must keep the cluster's name and partition count (changing the
    count would move nearly every record: that is a new cluster, filled by
    sync), and a file whose content changed must carry a higher version, so
    every node can tell which of two files is the newer.
    """
    if new.name != old.name:
        raise ClusterFileError(f"{new.source}: name: {new.name!r}, but this node is in cluster "
                               f"{old.name!r}; a reload cannot move a node to another cluster")
    if new.partitions != old.partitions:
        raise ClusterFileError(f"{new.source}: partitions: {new.partitions}, but the cluster has "
                               f"{old.partitions}; the partition count is fixed when a cluster is created")
    old_nodes = {n.id: n for n in old.nodes}
    new_nodes = {n.id: n for n in new.nodes}
    change = ClusterChange(
        added=tuple(i for i in new_nodes if i not in old_nodes),
        removed=tuple(i for i in old_nodes if i not in new_nodes),
        readdressed=tuple(i for i in new_nodes if i in old_nodes and old_nodes[i].address != new_nodes[i].address),
        replication_factor_changed=new.replication_factor != old.replication_factor,
        acks_changed=new.acks != old.acks,
        settings_changed=new.replication != old.replication,
    )
    if new.version < old.version:
        raise ClusterFileError(f"{new.source}: version: {new.version} is older than the running "
                               f"version {old.version}")
    if not change.empty and new.version == old.version:
        raise ClusterFileError(f"{new.source}: version: still {new.version}, but the file changed; "
                               "bump the version with every change")
    return change


class _Checker:
    """Typed reads of the parsed document; every failure names the file and the key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, problem: str) -> NoReturn:
        raise ClusterFileError(f"{self.source}: {key}: {problem}")

    def known(self, table: Mapping[str, Any], prefix: str, keys: set[str]) -> None:
        for key in table:
            if key not in keys:
                expected = ", ".join(sorted(keys))
                raise ClusterFileError(f"{self.source}: {prefix}{key}: unknown key (expected one of "
                                       f"{expected})")

    def text(self, table: Mapping[str, Any], key: str, label: str | None = None) -> str:
        label = label or key
        if key not in table:
            self.fail(label, "missing")
        value = table[key]
        if not isinstance(value, str) or not value.strip():
            self.fail(label, f"expected a non-empty string, got {value!r}")
        return value

    def positive_int(self, table: Mapping[str, Any], key: str, *, required: bool,
                     label: str | None = None) -> int:
        label = label or key
        if key not in table:
            if required:
                self.fail(label, "missing")
            return 0
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self.fail(label, f"expected a positive integer, got {value!r}")
        return value  # type: ignore[no-any-return]

    def seconds(self, table: Mapping[str, Any], key: str, default: float) -> float:
        if key not in table:
            return default
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value <= 0:
            self.fail(f"replication.{key}", f"expected a positive number of seconds, got {value!r}")
        return float(value)


def _nodes(check: _Checker, document: Mapping[str, Any]) -> tuple[Node, ...]:
    tables = document.get("nodes")
    if tables is None:
        check.fail("nodes", "missing; add one [[nodes]] table (id, address) per node")
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        check.fail("nodes", "expected [[nodes]] tables")
    if not tables:
        check.fail("nodes", "no nodes listed")
    nodes: list[Node] = []
    ids: dict[str, int] = {}
    addresses: dict[tuple[str, int], int] = {}
    for index, table in enumerate(tables):
        label = f"nodes[{index}]"
        check.known(table, f"{label}.", NODE_KEYS)
        node_id = check.text(table, "id", f"{label}.id")
        if len(node_id.encode()) > MAX_NODE_ID or not node_id.isprintable() or node_id != node_id.strip():
            check.fail(f"{label}.id", f"{node_id!r} must be printable, without surrounding spaces, "
                                      f"and at most {MAX_NODE_ID} bytes")
        if node_id in ids:
            check.fail(f"{label}.id", f"{node_id!r} is already the id of nodes[{ids[node_id]}]")
        ids[node_id] = index
        address = check.text(table, "address", f"{label}.address")
        host, port = parse_address(address, check, f"{label}.address")
        key = (host.lower(), port)
        if key in addresses:
            check.fail(f"{label}.address", f"{address!r} is already the address of nodes[{addresses[key]}]")
        addresses[key] = index
        nodes.append(Node(id=node_id, address=address, host=host, port=port))
    return tuple(nodes)


def parse_address(address: str, check: _Checker | None = None, label: str = "address") -> tuple[str, int]:
    """("host", port) from "host:port" or "[v6]:port"; ClusterFileError naming `label` otherwise."""
    check = check or _Checker("<address>")
    if address.startswith("["):
        host, bracket, rest = address[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            check.fail(label, f"{address!r} is not [IPv6]:port")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            check.fail(label, f"{host!r} is not an IPv6 address")
    else:
        host, colon, port_text = address.rpartition(":")
        if not colon or not host:
            check.fail(label, f"{address!r} is not host:port")
        if ":" in host:
            check.fail(label, f"{address!r}: write an IPv6 host in brackets, [host]:port")
        if any(c.isspace() for c in host) or "/" in host:
            check.fail(label, f"{address!r}: {host!r} is not a host name or address")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        check.fail(label, f"{address!r}: port {port_text!r} is not in 1..65535")
    return host, int(port_text)


def _acks(check: _Checker, document: Mapping[str, Any]) -> str:
    value = document.get("acks", "1")
    if isinstance(value, int) and not isinstance(value, bool) and value == 1:
        return "1"
    if value not in ACK_POLICIES:
        check.fail("acks", f'{value!r} is not "1" or "all"')
    return value  # type: ignore[no-any-return]


def _settings(check: _Checker, table: Any) -> ReplicationSettings:
    if not isinstance(table, dict):
        check.fail("replication", "expected a [replication] table")
    check.known(table, "replication.", REPLICATION_KEYS)
    defaults = ReplicationSettings()
    values: dict[str, Any] = {}
    for key in ("heartbeat_interval", "suspect_after", "down_after", "anti_entropy_interval",
                "write_timeout", "read_timeout"):
        values[key] = check.seconds(table, key, getattr(defaults, key))
    jitter = table.get("anti_entropy_jitter", defaults.anti_entropy_jitter)
    if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or not 0 <= jitter < 1:
        check.fail("replication.anti_entropy_jitter", f"expected a fraction in [0, 1), got {jitter!r}")
    values["anti_entropy_jitter"] = float(jitter)
    for key in ("push_queue_records", "push_queue_bytes"):
        values[key] = check.positive_int(table, key, required=False, label=f"replication.{key}") \
            or getattr(defaults, key)
    window = check.positive_int(table, "push_window", required=False, label="replication.push_window")
    if window > MAX_PUSH_WINDOW:
        check.fail("replication.push_window", f"expected 1..{MAX_PUSH_WINDOW}, got {window}")
    values["push_window"] = window or defaults.push_window
    if not values["heartbeat_interval"] < values["suspect_after"] < values["down_after"]:
        check.fail("replication", "expected heartbeat_interval < suspect_after < down_after, got "
                   f"{values['heartbeat_interval']}, {values['suspect_after']}, {values['down_after']}")
    return ReplicationSettings(**values)
