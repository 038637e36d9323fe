"""The server: listeners, connection cap, graceful shutdown, and `serve()`.

Owns: the binary-protocol and HTTP listeners, the set of open connections
and its cap, the assembly of what the front ends share — the request
pipeline (stemedb.server.pipeline) over the Authenticator, RequestLimits,
Service and ServerMetrics, and the BufferBudget (the memory all connections
may hold, stemedb.server.buffers), handed to each connection as one
DoorContext, never the Server itself — and the shutdown sequence (stop
accepting → stop reading → answer what is in flight → close). The
replication side it serves the replication opcodes with: a ClusterNode on a
cluster node (which also routes reads and writes), else the whole-store
sync of a single server (`server.sync`). `serve()` adds the process around
it: the configuration's precedence (command line > environment > file),
logging, opening and closing the store, the cluster node (its file, its
address, its peers; SIGHUP reloads the file), signals, the query kernels'
warm-up, the start line in the log and the one-line announcement of the
bound addresses on stdout. Must never: close the Database it was handed (whoever opened it
closes it; `serve()` does, after the last commit was answered).

Resource handling: `Server.run()` owns its listeners and every accepted
stream; each stream is closed when its connection ends, with a lingering
close (half-close, then discard input briefly) so a final error frame is not
destroyed by a TCP reset.
Error handling: overload errors on accept (EMFILE, ENFILE, ENOBUFS, ENOMEM)
are handled by trio.serve_listeners, which logs them to "trio.serve_listeners"
and retries; a connection's own failure never reaches the others.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from stemedb import _protocol, database
from stemedb.database import Database
from stemedb.errors import ConfigError, StemeError, TooManyConnections
from stemedb.logs import configure_logging
from stemedb.replication.cluster import ClusterFile
from stemedb.replication.node import ClusterNode
from stemedb.replication.store import EngineStore
from stemedb.replication.sync import StoreSync
from stemedb.server.auth import Authenticator, Peer, describe_peer
from stemedb.server.buffers import BufferBudget
from stemedb.server.config import LOG_FORMATS, LOG_LEVELS, ServerConfig, parse_address
from stemedb.server.connection import Connection
from stemedb.server.http import HttpConnection
from stemedb.server.limits import RequestLimits
from stemedb.server.metrics import PeerStatus, ServerMetrics, SyncTotals, stemedb_version
from stemedb.server.pipeline import DoorContext, Pipeline, Replication
from stemedb.server.service import JSON, Service

if TYPE_CHECKING:
    from stemedb.backup.archiver import Archiver

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

log = logging.getLogger("stemedb.server")

LINGER_SECONDS = 0.5
LINGER_BYTES = 1 << 20


class Server:
    """Serves one open Database over the binary protocol and, optionally, HTTP."""

    def __init__(self, db: Database, config: ServerConfig | None = None, *,
                 replication: Replication | None = None,
                 run_blocking: Callable[..., Awaitable[Any]] | None = None) -> None:
        """`replication`: the ClusterNode of a cluster node (None: a single server, which
        answers SYNC on its whole store unless `server.sync` is off). `run_blocking`
        replaces the worker threads (the simulation runs blocking calls inline)."""
        self.db = db
        self.config = config or ServerConfig()
        self.config.limits.check_budget()
        self.cluster = replication if isinstance(replication, ClusterNode) else None
        if self.cluster is not None:
            _check_node_budget(self.config)
        if replication is None and self.config.sync:
            replication = StoreSync(db, **({"run_blocking": run_blocking} if run_blocking else {}))
        self.replication = replication
        self.auth = Authenticator(self.config.tokens, metrics_tokens=self.config.metrics_tokens)
        self.limits = RequestLimits(self.config)
        self.service = Service(db, self.limits)
        self.budget = BufferBudget(self.config.limits.buffer_budget)
        self.metrics = ServerMetrics(db.stats)
        self.metrics.track_buffers(self.budget)
        self.pipeline = Pipeline(self.service, self.auth, self.limits, self.metrics,
                                 write_threads=self.config.write_threads,
                                 bulk_threads=self.config.bulk_threads,
                                 read_threads=self.config.read_threads, describe=self.describe,
                                 access=self.config.access_log, replication=replication,
                                 cluster=self.cluster, run_blocking=run_blocking)
        if self.cluster is not None:
            self.metrics.track_cluster(self.cluster.node_id, partial(peer_statuses, self.cluster),
                                       partial(sync_totals, self.cluster))
        self.door = DoorContext(self.pipeline, self.config.limits, self.budget, self.metrics,
                                server_name=self.config.name, tls=self.config.tls)
        self.ssl_context = _ssl_context(self.config) if self.config.tls else None
        self.connections: set[Connection] = set()
        self.http_connections: set[HttpConnection] = set()
        self.listen_address: str | None = None
        self.http_address: str | None = None
        self.started_at = time.time()
        self._stop: trio.Event | None = None
        self.stopped: trio.Event | None = None

    @property
    def draining(self) -> bool:
        """True once shutdown began: no new connections, no new requests read."""
        return self.door.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.door.draining = value

    def describe(self) -> JSON:
        """The server's own figures (added to STATS answers)."""
        return {
            "name": self.config.name,
            "protocol_version": _protocol.PROTOCOL_VERSION,
            "listen": self.listen_address,
            "http": self.http_address,
            "protected_mode": self.auth.protected_mode,
            "tls": self.config.tls,
            "connections": len(self.connections),
            "http_connections": len(self.http_connections),
            "uptime_seconds": time.time() - self.started_at,
            "draining": self.draining,
            "buffers": self.budget.describe(),
            **({"cluster": {"name": self.cluster.cluster.name, "node": self.cluster.node_id,
                            "version": self.cluster.cluster.version}} if self.cluster else {}),
        }

    # -------------------------------------------------------------- running

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Bind the configured addresses, serve until `shutdown()`, then drain and return."""
        self._stop = trio.Event()
        self.stopped = trio.Event()
        binary = await _listeners(self.config.listen)
        http = await _listeners(self.config.http)
        self.listen_address = _bound(binary)
        self.http_address = _bound(http)
        if self.auth.protected_mode:
            log.warning("protected mode: no tokens are configured, so only loopback clients are "
                        "served (each with the admin role); add [[tokens]] to the config to serve "
                        "the network")
        limits = self.config.limits
        try:
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as acceptors:
                    if binary:
                        acceptors.start_soon(partial(trio.serve_listeners, self._accept_binary, binary,
                                                     handler_nursery=connections))
                    if http:
                        acceptors.start_soon(partial(trio.serve_listeners, self._accept_http, http,
                                                     handler_nursery=connections))
                    task_status.started(self)
                    await self._stop.wait()
                    log.info("shutting down: no new connections; answering requests in flight")
                    self.draining = True
                    acceptors.cancel_scope.cancel()
                for conn in self._all_connections():
                    conn.stop_reading()
                connections.cancel_scope.deadline = trio.current_time() + limits.shutdown_grace
            log.info("all connections closed")
        finally:
            self.draining = True
            self.stopped.set()

    def close(self) -> None:
        """Release what a single server's sync side holds of the store (its reconciliation
        trees). A cluster node's store adapter belongs to whoever built the node."""
        if isinstance(self.replication, StoreSync):
            self.replication.close()

    def shutdown(self) -> None:
        """Begin a graceful shutdown (safe to call more than once, from the event loop)."""
        self.draining = True
        if self._stop is not None:
            self._stop.set()
        for conn in self._all_connections():
            conn.stop_reading()

    def _all_connections(self) -> list[Connection | HttpConnection]:
        return [*self.connections, *self.http_connections]

    async def _accept_binary(self, stream: trio.SocketStream) -> None:
        await self.handle_stream(stream, _peer(stream))

    async def _accept_http(self, stream: trio.SocketStream) -> None:
        await self.handle_http(stream, _peer(stream))

    async def handle_stream(self, stream: trio.abc.Stream, peer: Peer) -> None:
        """Serve one binary-protocol client on `stream` (closed on return)."""
        self.metrics.connections_accepted.labels("binary").inc()
        try:
            if len(self.connections) >= self.config.limits.max_connections or self.draining:
                await self._refuse(stream, peer)
                return
            if self.ssl_context is not None:
                stream = trio.SSLStream(stream, self.ssl_context, server_side=True)
            conn = Connection(self.door, stream, peer)
            self.connections.add(conn)
            self.metrics.connections.labels("binary").inc()
            try:
                await conn.run()
            finally:
                self.connections.discard(conn)
                self.metrics.connections.labels("binary").dec()
            await _linger_close(stream, lingering=conn.fatal is not None)
        finally:
            await trio.aclose_forcefully(stream)

    async def handle_http(self, stream: trio.abc.Stream, peer: Peer) -> None:
        """Serve one HTTP client on `stream` (closed on return)."""
        self.metrics.connections_accepted.labels("http").inc()
        try:
            if len(self.http_connections) >= self.config.limits.max_connections or self.draining:
                self.metrics.rejected.labels("too_many_connections").inc()
                return
            if self.ssl_context is not None:  # the side door is as private as the front door
                stream = trio.SSLStream(stream, self.ssl_context, server_side=True)
            conn = HttpConnection(self.door, stream, peer)
            self.http_connections.add(conn)
            self.metrics.connections.labels("http").inc()
            try:
                await conn.run()
            finally:
                self.http_connections.discard(conn)
                self.metrics.connections.labels("http").dec()
            await _linger_close(stream, lingering=True)
        finally:
            await trio.aclose_forcefully(stream)

    async def _refuse(self, stream: trio.abc.Stream, peer: Peer) -> None:
        """Over the connection cap: one error frame (plain TCP only), then close."""
        reason = "server is shutting down" if self.draining else (
            f"too many connections (limit {self.config.limits.max_connections}); retry later")
        self.metrics.rejected.labels("draining" if self.draining else "too_many_connections").inc()
        log.info("refusing connection from %s: %s", describe_peer(peer), reason)
        if self.ssl_context is not None:
            return  # a TLS client could not read a plain frame
        payload = _protocol.encode_error(TooManyConnections.code, 1000, reason)
        frame = _protocol.frame_header(_protocol.ERROR, _protocol.RESPONSE, 0, len(payload)) + payload
        with trio.move_on_after(1.0):
            try:
                await stream.send_all(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
        await _linger_close(stream, lingering=True)


def peer_statuses(node: ClusterNode) -> dict[str, PeerStatus]:
    """What `ServerMetrics.track_cluster` reads of a node's peers at each scrape."""
    statuses = {}
    for peer in node.peers:
        queue = node.queues.get(peer)
        state = node.membership.state(peer).value if peer in node.membership.peers else "down"
        if queue is None:
            statuses[peer] = PeerStatus(up=state != "down", lag_seconds=None)
            continue
        statuses[peer] = PeerStatus(up=state != "down", lag_seconds=queue.lag(),
                                    queue_records=queue.depth_records,
                                    pushed_records=queue.stats.sent_records,
                                    dropped_records=queue.stats.dropped_records)
    return statuses


def sync_totals(node: ClusterNode) -> SyncTotals:
    """What `ServerMetrics.track_cluster` reads of a node's anti-entropy at each scrape."""
    stats = node.anti_entropy.stats
    return SyncTotals(rounds=stats.rounds, failed_rounds=stats.failed_rounds,
                      records_sent=stats.records_sent, records_received=stats.records_received,
                      bytes_sent=stats.bytes_sent + stats.record_bytes_sent,
                      bytes_received=stats.bytes_received + stats.record_bytes_received)


def _check_node_budget(config: ServerConfig) -> None:
    """A node's peers send frames of up to twice max_frame: each half of the budget holds one."""
    from stemedb.server.connection import NODE_FRAME_FACTOR

    frame = NODE_FRAME_FACTOR * config.limits.max_frame
    needed = 2 * (frame + (1 << 20))
    if config.limits.buffer_budget < needed:
        raise ConfigError(f"limits.buffer_budget: {config.limits.buffer_budget} bytes cannot hold the "
                          f"{frame}-byte frames cluster nodes exchange in each half; give at least "
                          f"{needed}, or lower limits.max_frame")


async def _linger_close(stream: trio.abc.Stream, *, lingering: bool) -> None:
    """Half-close and discard what the peer still sends, so our last frame is not reset away."""
    if not lingering or not isinstance(stream, trio.abc.HalfCloseableStream):
        return
    with trio.move_on_after(LINGER_SECONDS):
        try:
            await stream.send_eof()
            discarded = 0
            while discarded < LINGER_BYTES:
                data = await stream.receive_some(65536)
                if not data:
                    break
                discarded += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
            pass


def _peer(stream: trio.SocketStream) -> Peer:
    try:
        peer: Peer = stream.socket.getpeername()
    except OSError:
        return None
    return peer


async def _listeners(address: str | None) -> list[trio.SocketListener]:
    if not address:
        return []
    host, port = parse_address(address)
    try:
        return list(await trio.open_tcp_listeners(port, host=host))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise StemeError(f"{address}: address already in use") from None
        raise


def _bound(listeners: list[trio.SocketListener]) -> str | None:
    if not listeners:
        return None
    host, port = listeners[0].socket.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _ssl_context(config: ServerConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    assert config.tls_cert is not None and config.tls_key is not None
    context.load_cert_chain(config.tls_cert, config.tls_key)
    return context


# ------------------------------------------------------------------ process


def load_config(config: ServerConfig | str | os.PathLike[str] | dict[str, Any] | None, *,
                overrides: dict[str, Any] | None = None,
                environ: Mapping[str, str] | None = None) -> ServerConfig:
    """The configuration to serve with.

    A file path or None: `ServerConfig.resolve` (command line `overrides` >
    STEMEDB_* environment > file > defaults). A ServerConfig or dict is
    taken as given (programs and tests that build their own), with only the
    `overrides` applied on top.
    """
    if config is None or isinstance(config, (str, os.PathLike)):
        return ServerConfig.resolve(config, environ=environ, overrides=overrides)
    settings = config if isinstance(config, ServerConfig) else ServerConfig.from_dict(config)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key in ("server.listen", "server.http"):
            if value:
                parse_address(value, key)
            setattr(settings, key.split(".", 1)[1], value or None)
        elif key in ("log.level", "log.format"):
            setattr(settings, "log_" + key.split(".", 1)[1], value)
        elif key in ("cluster.file", "cluster.node"):
            setattr(settings, "cluster_" + key.split(".", 1)[1], value)
        else:
            raise ConfigError(f"{key}: not a setting the command line gives")
    return settings


def serve(data_dir: str | os.PathLike[str], listen: str | None = None, http: str | None = None,
          config: ServerConfig | str | os.PathLike[str] | dict[str, Any] | None = None, *,
          log_level: str | None = None, log_format: str | None = None,
          cluster: str | os.PathLike[str] | None = None, node: str | None = None,
          environ: Mapping[str, str] | None = None) -> int:
    """Run a server on the store at `data_dir` until SIGINT or SIGTERM; returns an exit code.

    `listen` / `http` ("host:port", port 0 = any free port; "" turns the
    door off), `log_level`, `log_format`, `cluster` and `node` are the
    command line's: they beat the STEMEDB_* environment variables, which
    beat the config file (docs/operations.md, "Configuration"); the binary
    protocol listens on 127.0.0.1:7440 when nothing gives an address. With a
    cluster file (`cluster`, cluster.file) the server is node `node` of
    that cluster (docs/replication.md): it listens on the node's address in
    the file (a different `listen` is an error), reaches its peers there,
    and reloads the file on SIGHUP. Logging is configured from the result
    (stemedb.logs) before the store is opened. Once bound, the server logs
    its start line (version, data directory, durability, listeners, TLS,
    tokens, and the cluster) and writes one JSON line to stdout: {"version",
    "data", "durability", "listen", "http", "protected_mode", "tls", "pid"}
    (and "cluster", "node" on a cluster node). On a signal the server stops
    accepting, answers every request in flight (their commits finish and
    are acknowledged), closes connections, and closes the store (writing an
    index snapshot). A second signal during shutdown cancels what is left;
    acknowledged writes are durable either way.
    """
    settings = load_config(config, environ=environ, overrides={
        "server.listen": listen, "server.http": http, "log.level": log_level,
        "log.format": log_format, "cluster.file": os.path.abspath(cluster) if cluster else None,
        "cluster.node": node})
    cluster_file = _cluster_of(settings, listen)
    configure_logging(settings.log_level, settings.log_format, access=settings.access_log)
    try:
        db = database.open(data_dir, **settings.database)
    except TypeError as exc:  # an option the engine does not take
        raise ConfigError(f"[database]: {exc}") from None
    try:
        trio.run(_main, db, settings, cluster_file)
    except BaseExceptionGroup as group:  # trio's strict nurseries wrap even a lone error
        raise _sole_error(group) from None
    finally:
        db.close()
    log.info("store closed")
    return 0


def _cluster_of(settings: ServerConfig, listen: str | None) -> ClusterFile | None:
    """The cluster file a node serves by (None: a single server); its listen address is the node's."""
    if settings.cluster_file is None:
        return None
    if settings.cluster_node is None:
        raise ConfigError("cluster.node: which node of the cluster file is this? give --node ID")
    cluster = ClusterFile.load(settings.cluster_file)
    address = cluster.node(settings.cluster_node).address
    if listen and listen != address:
        raise ConfigError(f"--listen {listen}: node {settings.cluster_node} listens on its address "
                          f"in {settings.cluster_file}, {address}; drop --listen or fix the file")
    settings.listen = address
    return cluster


def cluster_node(db: Database, settings: ServerConfig,
                 cluster: ClusterFile) -> tuple[ClusterNode, EngineStore]:
    """The ClusterNode of a server process, and the store adapter it runs on (the caller closes
    it after the server): its peers over TCP (TLS when [tls] is set)."""
    from stemedb.replication.placement import Placement
    from stemedb.replication.sync import sync_with_request
    from stemedb.replication.transport import tcp_connector

    assert settings.cluster_node is not None and settings.cluster_file is not None
    path = settings.cluster_file
    context = None
    if settings.tls:
        context = ssl.create_default_context(cafile=settings.cluster_ca)
    node: ClusterNode | None = None

    def address(peer: str) -> tuple[str, int, bool]:
        assert node is not None
        host, port = node.address_of(peer)
        return host, port, settings.tls

    store = EngineStore(db, Placement(cluster))
    node = ClusterNode(cluster, settings.cluster_node, store, tcp_connector(address, context),
                       token=settings.cluster_token or "", sync_with_server=sync_with_request,
                       load_cluster=lambda: ClusterFile.load(path))
    return node, store


def start_line(server: Server, data_dir: str, durability: str) -> tuple[str, dict[str, Any]]:
    """The start line's message and fields: version, data directory, durability, doors, TLS.

    The text log format appends the fields to the message as key=value, the
    JSON format makes them keys of the line.
    """
    fields: dict[str, Any] = {
        "version": stemedb_version(), "data": data_dir, "durability": durability,
        "listen": server.listen_address, "http": server.http_address, "tls": server.config.tls,
        "protected_mode": server.auth.protected_mode, "tokens": len(server.config.tokens),
        "metrics_token": bool(server.config.metrics_tokens),
    }
    if server.cluster is not None:
        fields.update(cluster=server.cluster.cluster.name, node=server.cluster.node_id,
                      cluster_version=server.cluster.cluster.version)
        return (f"stemedb {fields['version']} serving {data_dir} as node {fields['node']} of "
                f"cluster {fields['cluster']}"), fields
    return f"stemedb {fields['version']} serving {data_dir}", fields


def _sole_error(error: BaseException) -> BaseException:
    """The one error inside (nested) groups of one, e.g. the address in use; else the group."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


async def _main(db: Database, config: ServerConfig, cluster: ClusterFile | None = None) -> None:
    node, store = None, None
    if cluster is not None:
        # Building the node's reconciliation trees reads every record's key: not on the loop.
        node, store = await trio.to_thread.run_sync(cluster_node, db, config, cluster)
    server = Server(db, config, replication=node)
    archiver: Archiver | None = None
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.run)
                if node is not None:
                    await nursery.start(node.run)
                text, fields = start_line(server, db.path, db.durability)
                log.info(text, extra=fields)
                announcement = {key: fields[key] for key in ("version", "data", "durability", "listen",
                                                              "http", "protected_mode", "tls")}
                if node is not None:
                    announcement.update(cluster=fields["cluster"], node=fields["node"])
                announcement["pid"] = os.getpid()
                print(json.dumps(announcement), flush=True)

                async def watch_signals() -> None:
                    async for signum in signals:
                        if signum == signal.SIGHUP:  # reload, never stop: a stray HUP is harmless
                            if node is not None:
                                await _reload(node)
                            else:
                                log.warning("SIGHUP: a single server has nothing to reload (its "
                                            "settings and tokens are read at start); ignored")
                            continue
                        if server.draining:
                            log.warning("second signal: cancelling what is left of the shutdown")
                            nursery.cancel_scope.cancel()
                            return
                        log.info("received %s: shutting down", signal.Signals(signum).name)
                        server.shutdown()

                nursery.start_soon(watch_signals)
                nursery.start_soon(_warm_up_queries)
                archiver = _start_archiver(db, config, server)
                if archiver is not None:
                    nursery.start_soon(archiver.run)
                assert server.stopped is not None
                await server.stopped.wait()
                nursery.cancel_scope.cancel()
    finally:
        if archiver is not None:
            archiver.close()
        server.close()
        if store is not None:
            store.close()


def _start_archiver(db: Database, config: ServerConfig, server: Server) -> Archiver | None:
    """The continuous archiver of `[archive] url`, its metrics registered; None when off."""
    if not config.archive_url:
        return None
    from stemedb.backup.archiver import Archiver

    archiver = Archiver(db, config.archive_url, config.archive_interval)
    server.metrics.track_archive(archiver.status)
    log.info("archiving to %s every %.1f s", config.archive_url, config.archive_interval)
    return archiver


async def _reload(node: ClusterNode) -> None:
    """SIGHUP: take the cluster file again; a file that cannot replace the running one is logged."""
    try:
        change = await node.reload_file()
    except StemeError as exc:
        log.error("SIGHUP: the cluster file was not taken: %s", exc)
        return
    log.info("SIGHUP: cluster file version %s in force", change["version"], extra=change)


async def _warm_up_queries() -> None:
    """Compile the resolution engine's kernels now, so the first query does not pay the JIT."""

    def warm() -> None:
        try:
            from stemedb import query as query_engine
        except ImportError:
            return
        warm_up = getattr(query_engine, "warm_up", None)
        if warm_up is not None:
            started = time.perf_counter()
            warm_up()
            log.info("query kernels warmed up in %.1f s", time.perf_counter() - started)

    await trio.to_thread.run_sync(warm, abandon_on_cancel=True)  # shutdown need not wait for it


def main(argv: list[str] | None = None) -> int:
    """`python -m stemedb.server --data DIR [--listen H:P] [--http H:P] [--config FILE]
    [--log-level L] [--log-format text|json] [--cluster FILE --node ID]`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m stemedb.server",
                                     description="Serve a StemeDB store over the network.")
    parser.add_argument("--data", required=True, help="data directory (created if missing)")
    parser.add_argument("--listen", help="binary protocol address host:port (default 127.0.0.1:7440)")
    parser.add_argument("--http", help="HTTP side door address host:port (default: off)")
    parser.add_argument("--config", help="TOML configuration file (see examples/stemedb.toml)")
    parser.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS,
                        help="debug, info, warning or error (default: [log] level, else info)")
    parser.add_argument("--log-format", choices=LOG_FORMATS,
                        help="text or json lines (default: [log] format, else text)")
    parser.add_argument("--cluster", help="cluster file: serve as a node of that cluster")
    parser.add_argument("--node", help="this node's id in the cluster file")
    args = parser.parse_args(argv)
    try:
        return serve(args.data, listen=args.listen, http=args.http, config=args.config,
                     log_level=args.log_level, log_format=args.log_format, cluster=args.cluster,
                     node=args.node)
    except StemeError as exc:
        print(f"stemedb serve: error: {exc}", file=sys.stderr)
        return 1
