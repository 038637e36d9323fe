"""What a command works on: a data directory or a running server, behind one interface.

Owns: choosing the target (a command-line option beats STEMEDB_URL /
STEMEDB_DATA / STEMEDB_TOKEN, which beat the default data directory),
opening it on first use and keeping it open (the shell runs many commands
on one), and the operations the commands need — each built only on
`stemedb.open(...)` and the blocking client `stemedb.connect(...)`. Where
those APIs lack something, the simplest correct version is built here from
what they offer; each such place is marked INTERFACE REQUEST with the
signature it stands in for. Must never: create a store for a read command,
or use anything of the engine, server or client but their public API.

Resource handling: a Context owns the Database or Client it opened; close()
releases it (the Database writes its snapshot and gives up the LOCK).
Error handling: a missing store, a store locked by another process, a bad
URL or an unreachable server raise CliError (one line naming the path or
address and what to do); the API's own StemeError pass through.
"""

from __future__ import annotations

import abc
import argparse
import fcntl
import os
import socket
import struct
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import stemedb
from stemedb.cli.core import DEFAULT_DATA, CliError, UsageError
from stemedb.cli.formats import ID_HEX, id_argument

DEFAULT_URL = "stemedb://127.0.0.1:7440"
# docs/protocol.md, "Limits": the most records one SCAN returns. It has no cursor,
# so nothing past this many can be reached over the network (INTERFACE REQUEST below).
MAX_SCAN = 1_000_000
QUERY_THREADS = 8       # queries in flight at once when conflicts are computed over the network
VERIFY_TIMEOUT = 6 * 3600.0   # seconds a server may take to scrub its store (about a second per GB)


@dataclass(frozen=True)
class Target:
    """A data directory (`data`) or a server (`url`, with its `token`)."""

    data: str | None = None
    url: str | None = None
    token: str | None = None

    def __str__(self) -> str:
        return self.url if self.url is not None else str(self.data)


def choose(options: argparse.Namespace, environ: Any = None) -> Target:
    """The target named by --data / --url / --token, else the environment, else the default."""
    environ = os.environ if environ is None else environ
    data = getattr(options, "data", None)
    url = getattr(options, "url", None)
    token = getattr(options, "token", None)
    if data is not None and url is not None:
        raise UsageError("--data and --url exclude each other: give one")
    if data is None and url is None:
        data = environ.get("STEMEDB_DATA") or None
        url = environ.get("STEMEDB_URL") or None
        if data is not None and url is not None:
            raise UsageError("both STEMEDB_DATA and STEMEDB_URL are set: unset one, "
                             "or choose with --data or --url")
    if url is not None:
        if token is None:
            token = environ.get("STEMEDB_TOKEN") or None
        return Target(url=url, token=token)
    if token is not None:
        raise UsageError("--token applies to a server: give --url (or STEMEDB_URL) with it")
    return Target(data=data if data is not None else os.path.expanduser(DEFAULT_DATA))


class Context:
    """The target of one command line (or of a whole shell session), opened on first use."""

    def __init__(self, options: argparse.Namespace, environ: Any = None) -> None:
        self._options = options
        self._environ = environ
        self._target: Target | None = None
        self._store: Store | None = None
        self.warnings: list[str] = []     # printed to stderr when the command has finished
        self.default_key: str | None = None     # the shell's --key, for put
        self.interactive_stdin = False          # stdin is the shell's: put must not read it

    @property
    def target(self) -> Target:
        if self._target is None:
            self._target = choose(self._options, self._environ)
        return self._target

    def use_data(self, path: str) -> None:
        """Work on the data directory `path` (a command's deprecated positional argument)."""
        if self._store is not None:
            raise UsageError(f"{path}: the store is already chosen ({self.target})")
        self._target = Target(data=path)

    def data_directory(self, command: str) -> str:
        """The data directory of a command that works on files only (serve): --data, else
        STEMEDB_DATA, else the default; STEMEDB_URL does not apply."""
        if getattr(self._options, "url", None) is not None or getattr(self._options, "token", None):
            raise UsageError(f"{command} works on a data directory: --url and --token do not apply")
        environ = os.environ if self._environ is None else self._environ
        data = getattr(self._options, "data", None) or environ.get("STEMEDB_DATA") or None
        return data if data is not None else os.path.expanduser(DEFAULT_DATA)

    def store(self, *, write: bool = False) -> Store:
        """The open store; a read command (write=False) never creates one."""
        if self._store is None:
            target = self.target
            if target.url is not None:
                self._store = RemoteStore(target.url, target.token)
            else:
                assert target.data is not None
                self._store = LocalStore(target.data, create=write)
        return self._store

    def close(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            store.close()


class ScanCapped(CliError):
    """A scan over the network stopped at MAX_SCAN records: the rest cannot be reached."""


class Store(abc.ABC):
    """The operations commands use, over an embedded Database or a server (subclasses)."""

    where = ""
    remote = False

    @abc.abstractmethod
    def put_many(self, records: list[Any], envelope: Any = None) -> list[bytes]:
        """Store records (members of `envelope` when given) in one batch; their IDs in order."""

    @abc.abstractmethod
    def present(self, ids: list[bytes]) -> list[bool]:
        """Whether each ID is stored already."""

    @abc.abstractmethod
    def get(self, record_id: bytes) -> Any:
        """The record with this ID; NotFound if there is none."""

    @abc.abstractmethod
    def scan(self, subject: str | None = None, predicate: str | None = None,
             kind: str | None = None, limit: int | None = None) -> Iterator[Any]:
        """Records in write order; with limit None every one (ScanCapped where that is impossible)."""

    @abc.abstractmethod
    def query(self, subject: str, predicate: str | None, lens: str,
              filters: dict[str, Any]) -> Any:
        """The resolution's JSON-ready document (a dict predicate → document without predicate)."""

    @abc.abstractmethod
    def conflicts(self, lifecycle: str, as_of: int | None, min_score: float) -> list[dict[str, Any]]:
        """Every contested pair as {subject, predicate, conflict_score, candidates_count, claims_count}."""

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]:
        """The store's figures (a server adds its own under "server")."""

    @abc.abstractmethod
    def verify(self) -> dict[str, Any]:
        """{"ok", "records_checked", "problems", "scope"}."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the Database or the connection."""

    def resolve_id(self, text: str, what: str = "ID") -> bytes:
        """The ID that `text` (a full ID, or a unique prefix of at least 4 hex digits) names.

        INTERFACE REQUEST: `Database.find_ids(prefix: str, limit: int = 2) ->
        list[bytes]` and `Client.find_ids(...)` (a wire operation), answered
        from the ID index. Until then every record is scanned for a match.
        """
        prefix = id_argument(text, what)
        if len(prefix) == ID_HEX:
            return bytes.fromhex(prefix)
        matches: list[bytes] = []
        complete = True
        try:
            for record in self.scan():
                if record.id.hex().startswith(prefix):
                    matches.append(record.id)
        except ScanCapped:
            complete = False
        if len(matches) > 1:
            more = "" if complete else " or more"
            raise CliError(f"{what}: the prefix {prefix} matches {len(matches)}{more} records; "
                           "give more of its digits")
        if not complete:
            found = "matches one of" if matches else "matches none of"
            raise CliError(f"{what}: the prefix {prefix} {found} the first {MAX_SCAN:,} records, "
                           "the most the server scans; give the full ID")
        if not matches:
            raise stemedb.NotFound(f"{what}: no record with an ID starting {prefix} in {self.where}")
        return matches[0]


# ------------------------------------------------------------------ a data directory

def store_problem(path: str) -> str | None:
    """Why `path` holds no store (None when it holds one: a MANIFEST or a segments/ directory)."""
    if not os.path.exists(path):
        return "no such directory"
    if not os.path.isdir(path):
        return "not a directory"
    if os.path.exists(os.path.join(path, "MANIFEST")) or os.path.isdir(os.path.join(path, "segments")):
        return None
    return "an empty directory" if not os.listdir(path) else "a directory without a MANIFEST"


class LocalStore(Store):
    """A data directory opened in this process with stemedb.open."""

    def __init__(self, path: str, *, create: bool) -> None:
        self.where = path
        if not create:
            problem = store_problem(path)
            if problem is not None:
                raise CliError(f"no StemeDB store at {path} ({problem}); give --data DIR of a store, "
                               "or --url to reach a server (stemedb put creates a store)")
        try:
            self.db = stemedb.open(path)
        except stemedb.StemeError:
            held = locked_elsewhere(path)
            if held is not None:
                raise CliError(held) from None
            raise

    def put_many(self, records: list[Any], envelope: Any = None) -> list[bytes]:
        return self.db.put_many(records, envelope=envelope)

    def present(self, ids: list[bytes]) -> list[bool]:
        return [self.db.contains(record_id) for record_id in ids]

    def get(self, record_id: bytes) -> Any:
        return self.db.get(record_id)

    def scan(self, subject: str | None = None, predicate: str | None = None,
             kind: str | None = None, limit: int | None = None) -> Iterator[Any]:
        for count, record in enumerate(self.db.scan(subject, predicate, kind=kind)):
            if limit is not None and count >= limit:
                return
            yield record

    def query(self, subject: str, predicate: str | None, lens: str,
              filters: dict[str, Any]) -> Any:
        return resolution_document(self.db.query(subject, predicate, lens=lens, **filters))

    def conflicts(self, lifecycle: str, as_of: int | None, min_score: float) -> list[dict[str, Any]]:
        rows = self.db.conflicts(None, lifecycle=lifecycle, as_of=as_of, min_score=min_score)
        return [row.to_dict() for row in rows]

    def stats(self) -> dict[str, Any]:
        return dict(self.db.stats())

    def verify(self) -> dict[str, Any]:
        report = self.db.verify()
        return {"ok": report.ok, "records_checked": report.records_checked,
                "problems": list(report.problems), "scope": "segments"}

    def close(self) -> None:
        self.db.close()


def resolution_document(result: Any) -> Any:
    """A query result as JSON-ready documents, whichever API answered it.

    The embedded API answers Resolution objects; the current network client
    answers their documents already, with the contributing records decoded
    under "records" (dropped here: the documents name them by ID).
    """
    if hasattr(result, "to_dict"):
        return result.to_dict()
    if isinstance(result, dict):
        document = {key: value for key, value in result.items() if key != "records"}
        if "lens" in document and "candidates_count" in document:
            return document
        return {key: resolution_document(value) for key, value in document.items()}
    return result


# ------------------------------------------------------------------ a server

class RemoteStore(Store):
    """A running server, through the blocking client."""

    remote = True

    def __init__(self, url: str, token: str | None) -> None:
        try:
            self.client = stemedb.connect(url, token=token)
        except ValueError as exc:
            raise UsageError(f"--url: {exc}") from None
        except stemedb.Unavailable as exc:
            raise CliError(f"{exc}; is a server running there? (stemedb serve)") from None
        except stemedb.AuthError as exc:
            if token is None:
                raise CliError(f"the server at {url} requires a token: give --token or set "
                               "STEMEDB_TOKEN") from None
            raise CliError(f"{exc} (the token given by --token or STEMEDB_TOKEN)") from None
        self.where = str(self.client.address)

    def put_many(self, records: list[Any], envelope: Any = None) -> list[bytes]:
        return list(self.client.put_many(records, envelope=envelope))

    def present(self, ids: list[bytes]) -> list[bool]:
        """INTERFACE REQUEST: `Client.contains_many(ids) -> list[bool]` (or put_many telling
        which records were new). Until then the records are fetched (absent ones cost nothing)."""
        return [record is not None for record in self.client.get_many(ids)] if ids else []

    def get(self, record_id: bytes) -> Any:
        return self.client.get(record_id)

    def scan(self, subject: str | None = None, predicate: str | None = None,
             kind: str | None = None, limit: int | None = None) -> Iterator[Any]:
        """INTERFACE REQUEST: `Client.scan(...)` as an iterator over every match (a SCAN
        cursor). Until then one SCAN, so at most MAX_SCAN records."""
        every = limit is None or limit > MAX_SCAN
        wanted = MAX_SCAN if limit is None or every else limit
        records = self.client.scan(subject, predicate, kind=kind, limit=wanted)
        yield from records
        if every and len(records) >= MAX_SCAN:
            raise ScanCapped(f"the server returns at most {MAX_SCAN:,} records per scan and has more; "
                             "narrow it with a subject, predicate or kind")

    def query(self, subject: str, predicate: str | None, lens: str,
              filters: dict[str, Any]) -> Any:
        if filters.get("agent") is not None:
            raise UsageError("--agent: a server records the name of your token as the agent; "
                             "drop --agent with --url")
        filters = {name: value for name, value in filters.items() if name != "agent"}
        return resolution_document(self.client.query(subject, predicate, lens=lens, **filters))

    def conflicts(self, lifecycle: str, as_of: int | None, min_score: float) -> list[dict[str, Any]]:
        """INTERFACE REQUEST: `Client.conflicts(top=None, *, lifecycle="any", as_of=None,
        min_score=0.0) -> list[PairConflict]` (a CONFLICTS operation). Until then: the
        pairs whose assertions claim more than one value are each resolved by the
        server's Skeptic lens, whose conflict score and claims are the dashboard's."""
        values: dict[tuple[str, str], set[tuple[int, str]]] = defaultdict(set)
        for record in self.scan(kind="assertion"):
            values[(record.subject, record.predicate)].add((record.object_tag, repr(record.object)))
        pairs = [pair for pair, seen in values.items() if len(seen) > 1]
        filters: dict[str, Any] = {"lifecycle": lifecycle}
        if as_of is not None:
            filters["as_of"] = as_of

        def resolve(pair: tuple[str, str]) -> Any:
            return resolution_document(self.client.query(*pair, lens="skeptic", **filters))

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(QUERY_THREADS) as pool:
            documents = list(pool.map(resolve, pairs))
        return [{"subject": d["subject"], "predicate": d["predicate"],
                 "conflict_score": d["conflict_score"], "candidates_count": d["candidates_count"],
                 "claims_count": len(d["analysis"]["claims"])}
                for d in documents if d["conflict_score"] > 0 and d["conflict_score"] >= min_score]

    def stats(self) -> dict[str, Any]:
        return dict(self.client.stats())

    def verify(self) -> dict[str, Any]:
        """The server's own scrub of its store (VERIFY, admin role): the same report as on a
        data directory, while the server keeps serving."""
        report = self.client.verify(timeout=VERIFY_TIMEOUT)
        return {"ok": report.ok, "records_checked": report.records_checked,
                "problems": list(report.problems), "scope": "segments"}

    def close(self) -> None:
        self.client.close()


# ------------------------------------------------------------------ who holds a store

def locked_elsewhere(path: str) -> str | None:
    """If another process holds the store's LOCK: one line saying so and how to reach it.

    INTERFACE REQUEST: the server could publish its announcement (the JSON
    line it prints) in the data directory while it runs. Until then the
    holder is found in /proc/locks and its listening sockets are asked for a
    StemeDB HELLO (Linux; elsewhere the default address is suggested).
    """
    lock = os.path.join(path, "LOCK")
    try:
        descriptor = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        pass
    else:
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        return None
    finally:
        os.close(descriptor)
    pid = lock_holder(lock)
    address = server_address(pid) if pid is not None else None
    who = f"process {pid}" if pid is not None else "another process"
    if address is not None:
        return (f"{path} is open in {who}, the StemeDB server at {address}: "
                f"reach it with --url stemedb://{address}")
    return (f"{path} is open in {who} (its LOCK is held); if that is a server, reach it with "
            f"--url (default {DEFAULT_URL}), or stop it first")


def lock_holder(lock_path: str) -> int | None:
    """The pid holding a flock() on `lock_path`, from /proc/locks (None if unknown)."""
    try:
        status = os.stat(lock_path)
        with open("/proc/locks") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    wanted = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted and fields[4].isdigit():
            pid = int(fields[4])
            if pid not in (0, os.getpid()):
                return pid
    return None


def server_address(pid: int) -> str | None:
    """The host:port on which process `pid` answers the StemeDB protocol, if it listens."""
    for address in listening_addresses(pid):
        try:
            stemedb.connect(f"stemedb://{address}", reconnect=False, retries=0,
                            connect_timeout=1.0, timeout=1.0).close()
        except stemedb.AuthError:
            return address  # a StemeDB server that wants a token
        except (stemedb.StemeError, OSError):
            continue  # another protocol (the HTTP side door) or gone
        return address
    return None


def listening_addresses(pid: int) -> list[str]:
    """host:port of the TCP sockets process `pid` listens on (wildcards as loopback)."""
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return []
    inodes = {link[8:-1] for link in links if link.startswith("socket:[")}
    found: list[str] = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            with open(table) as handle:
                rows = handle.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) < 10 or fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            host_hex, port_hex = fields[1].split(":")
            raw = b"".join(struct.pack("=I", int(host_hex[i:i + 8], 16))
                           for i in range(0, len(host_hex), 8))
            host = socket.inet_ntop(family, raw)
            host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
            port = int(port_hex, 16)
            found.append(f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}")
    return found
