"""Prometheus metrics of one server: its own counters plus the database's and the process's.

Owns: a private CollectorRegistry (several servers can live in one test
process) holding the request / rejection / connection / query-latency metrics
the request pipeline and the front doors update — one request counter, one
latency histogram and one error counter, all labelled by `door` (binary,
http) and `op` (the operation) — the process and Python collectors,
`stemedb_build_info`, a collector that turns `db.stats()` into the storage
metrics (WAL fsync latency histogram, group commits, writes, bytes, errors,
segments, disk, recovery) at scrape time, and the registration API through
which archival and the cluster publish theirs (`track_archive`,
`track_cluster`): those metrics exist only once something registered them.
No `_created` series are exported (prometheus_client's are turned off for the
process when this module is imported). Must never: block the event loop —
`render()` takes the database's state lock, so the HTTP side door calls it
from a worker thread.

Error handling: a store whose stats() raises is reported as
stemedb_store_up 0 and the rest of the scrape still answers; a registered
source that raises is logged and left out of that scrape.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from stemedb import _protocol
from stemedb.server.buffers import BufferBudget

log = logging.getLogger("stemedb.server.metrics")

# A `_created` series per counter and histogram doubles the series count and no
# dashboard or alert of ours reads it. The switch is process-wide in prometheus_client.
disable_created_metrics()  # type: ignore[no-untyped-call]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


@dataclass(frozen=True)
class ArchiveStatus:
    """What continuous archival reports at each scrape (`ServerMetrics.track_archive`)."""

    lag_seconds: float                # age of the oldest durable write not archived yet; 0: caught up
    last_success_unix: float | None   # when the last upload finished (Unix seconds); None: none yet
    archived_bytes: int               # bytes uploaded since the server started
    failures: int                     # failed uploads since the server started


@dataclass(frozen=True)
class PeerStatus:
    """What the cluster reports of one peer at each scrape (`ServerMetrics.track_cluster`)."""

    up: bool                          # False once the peer is down (docs/replication.md, liveness)
    lag_seconds: float | None         # age of the oldest record not yet pushed to it; None: unknown
    queue_records: int = 0            # records waiting in its push queue
    pushed_records: int = 0           # records pushed to it since the server started
    dropped_records: int = 0          # records its full push queue dropped (anti-entropy repairs them)


@dataclass(frozen=True)
class SyncTotals:
    """This node's anti-entropy figures since it started (`ServerMetrics.track_cluster`)."""

    rounds: int = 0
    failed_rounds: int = 0
    records_sent: int = 0
    records_received: int = 0
    bytes_sent: int = 0               # reconciliation messages and records, each way
    bytes_received: int = 0


def _histogram_buckets(histogram: Mapping[str, int], scale: float) -> list[tuple[str, float]]:
    """Cumulative Prometheus buckets from {upper bound: count in that bucket} (engine stats)."""
    buckets: list[tuple[str, float]] = []
    cumulative = 0
    for bound, count in histogram.items():
        cumulative += count
        upper = float(bound)
        buckets.append(("+Inf" if upper == float("inf") else repr(upper * scale), cumulative))
    if not buckets or buckets[-1][0] != "+Inf":
        buckets.append(("+Inf", cumulative))
    return buckets


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, doc)
    gauge.add_metric([], float(value))
    return gauge


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    counter = CounterMetricFamily(name, doc)
    counter.add_metric([], value)
    return counter


class DatabaseCollector:
    """Reads db.stats() on every scrape.

    Engine figures it does not find are left out rather than invented: the
    group-commit size histogram (`writes["batch_records_histogram"]`,
    {upper bound: batches}) replaces the lifetime mean once the engine
    reports it, and `writes["envelopes_written"]` splits envelopes from the
    other records written.
    """

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def describe(self) -> list[Metric]:
        return []  # metrics are only known once stats() is read; skip the eager describe

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self._stats()
        except Exception:  # a closed or failing store still lets the scrape answer
            yield _gauge("stemedb_store_up", "1 when the store answered stats()", 0)
            return
        yield _gauge("stemedb_store_up", "1 when the store answered stats()", 1)
        writes = stats["writes"]
        yield HistogramMetricFamily(
            "stemedb_wal_fsync_seconds", "WAL fdatasync latency",
            buckets=_histogram_buckets(writes["fsync_histogram_ms"], 1 / 1000.0),
            sum_value=writes["fsync_mean_ms"] * writes["fsyncs"] / 1000.0)
        yield from self._writes(writes)
        index_bytes = stats["index_bytes"]
        if isinstance(index_bytes, dict):
            index_bytes = sum(index_bytes.values())
        for name, doc, value in (
            ("stemedb_group_commit_batch_records_max", "Largest group commit, in records",
             writes["max_records_per_batch"]),
            ("stemedb_group_commit_batch_writers_max", "Most writers served by one group commit",
             writes["max_writers_per_batch"]),
            ("stemedb_records", "Records stored", stats["records"]),
            ("stemedb_segments", "Segment files", stats["segments"]),
            ("stemedb_disk_bytes", "Bytes allocated on disk by segments", stats["disk_bytes"]),
            ("stemedb_used_bytes", "Bytes of segments holding frames", stats["used_bytes"]),
            ("stemedb_index_memory_bytes", "Bytes of RAM held by the indexes", index_bytes),
            ("stemedb_recovery_seconds", "Duration of the last open's recovery",
             stats["recovery"]["seconds"]),
            ("stemedb_recovery_records_replayed", "Records replayed by the last open",
             stats["recovery"]["records_replayed"]),
            ("stemedb_recovery_torn_bytes", "Torn-tail bytes dropped by the last open",
             stats["recovery"]["torn_bytes_dropped"]),
            ("stemedb_store_failed", "1 after a failed fsync (writes refused until reopen)",
             1 if stats["failed"] else 0),
        ):
            yield _gauge(name, doc, value)
        yield from _filesystem(stats.get("path"))
        by_kind = GaugeMetricFamily("stemedb_records_by_kind", "Records stored, by kind", labels=["kind"])
        for kind, count in stats["by_kind"].items():
            by_kind.add_metric([kind], count)
        yield by_kind

    @staticmethod
    def _writes(writes: Mapping[str, Any]) -> Iterator[Metric]:
        envelopes = writes.get("envelopes_written")
        records = writes["records_written"] - (envelopes or 0)
        yield _counter("stemedb_group_commit_batches", "Group commits (one append + fsync each)",
                       writes["batches"])
        yield _counter("stemedb_writes", "Records written durably (envelopes apart, once the "
                       "engine counts them: stemedb_envelopes_written_total)", records)
        if envelopes is not None:
            yield _counter("stemedb_envelopes_written", "Batch envelopes written durably",
                           envelopes)
        yield _counter("stemedb_written_bytes", "Bytes appended to the WAL", writes["bytes_written"])
        yield _counter("stemedb_write_errors", "Failed appends or fsyncs", writes["write_errors"])
        yield _counter("stemedb_fsyncs", "fdatasync calls", writes["fsyncs"])
        sizes = writes.get("batch_records_histogram")
        if sizes is not None:
            yield HistogramMetricFamily(
                "stemedb_group_commit_batch_records", "Records per group commit",
                buckets=_histogram_buckets(sizes, 1.0), sum_value=writes["records_written"])
        else:
            batches = writes["batches"] or 0
            yield _gauge("stemedb_group_commit_batch_records_mean",
                         "Mean records per group commit since the store opened (until the engine "
                         "reports a histogram)",
                         writes["records_written"] / batches if batches else 0.0)


def _filesystem(path: str | None) -> Iterator[Metric]:
    """Size and free space of the filesystem holding the data directory (for the disk alerts)."""
    if not path:
        return
    try:
        fs = os.statvfs(path)
    except OSError:
        return
    yield _gauge("stemedb_filesystem_size_bytes", "Size of the filesystem holding the data "
                 "directory", fs.f_blocks * fs.f_frsize)
    yield _gauge("stemedb_filesystem_avail_bytes", "Bytes of that filesystem the server may "
                 "still allocate", fs.f_bavail * fs.f_frsize)


class FeatureCollector:
    """The metrics of archival and of the cluster, read from their registered sources."""

    def __init__(self) -> None:
        self.archive: Callable[[], ArchiveStatus] | None = None
        self.node: str | None = None
        self.peers: Callable[[], Mapping[str, PeerStatus]] | None = None
        self.sync: Callable[[], SyncTotals] | None = None

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        if self.archive is not None:
            try:
                archive = self.archive()
            except Exception:
                log.exception("the archive's metrics source failed; left out of this scrape")
            else:
                yield _gauge("stemedb_archive_lag_seconds", "Age of the oldest durable write not "
                             "archived yet (0: caught up)", archive.lag_seconds)
                if archive.last_success_unix is not None:
                    yield _gauge("stemedb_archive_last_success_timestamp_seconds",
                                 "When the last archive upload finished", archive.last_success_unix)
                yield _counter("stemedb_archived_bytes", "Bytes archived", archive.archived_bytes)
                yield _counter("stemedb_archive_failures", "Failed archive uploads",
                               archive.failures)
        if self.peers is not None and self.node is not None:
            try:
                peers = dict(self.peers())
            except Exception:
                log.exception("the cluster's metrics source failed; left out of this scrape")
                return
            up = GaugeMetricFamily("stemedb_node_up", "1 while a cluster node is up, as this node "
                                   "sees it (itself included)", labels=["node"])
            up.add_metric([self.node], 1)
            lag = GaugeMetricFamily("stemedb_replication_lag_seconds", "Age of the oldest record "
                                    "not yet pushed to a peer", labels=["peer"])
            depth = GaugeMetricFamily("stemedb_push_queue_records", "Records waiting in a peer's "
                                      "push queue", labels=["peer"])
            pushed = CounterMetricFamily("stemedb_push_records", "Records pushed to a peer",
                                         labels=["peer"])
            dropped = CounterMetricFamily("stemedb_push_dropped_records", "Records a peer's full "
                                          "push queue dropped (anti-entropy repairs them)",
                                          labels=["peer"])
            for peer, status in sorted(peers.items()):
                up.add_metric([peer], 1 if status.up else 0)
                if status.lag_seconds is not None:
                    lag.add_metric([peer], status.lag_seconds)
                depth.add_metric([peer], status.queue_records)
                pushed.add_metric([peer], status.pushed_records)
                dropped.add_metric([peer], status.dropped_records)
            yield from (up, lag, depth, pushed, dropped)
            yield from self._sync_metrics()

    def _sync_metrics(self) -> Iterator[Metric]:
        if self.sync is None:
            return
        try:
            totals = self.sync()
        except Exception:
            log.exception("the cluster's sync metrics source failed; left out of this scrape")
            return
        yield _counter("stemedb_sync_rounds", "Anti-entropy rounds this node started", totals.rounds)
        yield _counter("stemedb_sync_failed_rounds", "Anti-entropy rounds that failed",
                       totals.failed_rounds)
        records = CounterMetricFamily("stemedb_sync_records", "Records moved by anti-entropy",
                                      labels=["direction"])
        records.add_metric(["sent"], totals.records_sent)
        records.add_metric(["received"], totals.records_received)
        sizes = CounterMetricFamily("stemedb_sync_bytes", "Bytes moved by anti-entropy "
                                    "(messages and records)", labels=["direction"])
        sizes.add_metric(["sent"], totals.bytes_sent)
        sizes.add_metric(["received"], totals.bytes_received)
        yield records
        yield sizes


class ServerMetrics:
    """The counters the front doors update, and the text exposition of everything."""

    def __init__(self, stats: Callable[[], dict[str, Any]] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        registry = self.registry
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        build = Gauge("stemedb_build_info", "The running StemeDB: version, Python, protocol",
                      ["version", "python", "protocol"], registry=registry)
        build.labels(stemedb_version(), platform.python_version(), str(_protocol.PROTOCOL_VERSION)).set(1)
        self.requests = Counter("stemedb_requests", "Requests answered, by door and operation",
                                ["door", "op"], registry=registry)
        self.request_errors = Counter("stemedb_request_errors",
                                      "Requests answered with an error, by door, operation and error",
                                      ["door", "op", "error"], registry=registry)
        self.rejected = Counter("stemedb_requests_rejected",
                                "Requests or connections refused, by reason", ["reason"],
                                registry=registry)
        self.request_seconds = Histogram("stemedb_request_seconds",
                                         "Request latency, by door and operation", ["door", "op"],
                                         buckets=LATENCY_BUCKETS, registry=registry)
        self.query_seconds = Histogram("stemedb_query_seconds", "Query latency by lens", ["lens"],
                                       buckets=LATENCY_BUCKETS, registry=registry)
        self.put_records = Histogram("stemedb_put_batch_records", "Records per write request",
                                     buckets=(1, 10, 100, 1000, 10_000, 100_000, 1_000_000),
                                     registry=registry)
        self.connections = Gauge("stemedb_connections", "Open connections", ["door"],
                                 registry=registry)
        self.connections_accepted = Counter("stemedb_connections_accepted", "Connections accepted",
                                            ["door"], registry=registry)
        self.protocol_errors = Counter("stemedb_protocol_errors",
                                       "Connections closed for a protocol violation", ["error"],
                                       registry=registry)
        self.buffer_bytes = Gauge("stemedb_buffer_bytes",
                                  "Bytes of the buffer budget held, by pool (requests, answers)",
                                  ["pool"], registry=registry)
        self.buffer_waiting = Gauge("stemedb_buffer_waiting",
                                    "Readers or answers waiting for the buffer budget, by pool",
                                    ["pool"], registry=registry)
        for door in ("binary", "http"):  # both doors' series exist from the first scrape
            self.connections.labels(door)
            self.connections_accepted.labels(door)
        self._features = FeatureCollector()
        registry.register(self._features)
        if stats is not None:
            registry.register(DatabaseCollector(stats))

    def track_buffers(self, budget: BufferBudget) -> None:
        """Read the buffer budget's pools (stemedb.server.buffers.BufferBudget) at every scrape."""
        for pool in (budget.requests, budget.answers):
            self.buffer_bytes.labels(pool.name).set_function(partial(getattr, pool, "used"))
            self.buffer_waiting.labels(pool.name).set_function(partial(getattr, pool, "waiting"))

    def track_archive(self, status: Callable[[], ArchiveStatus]) -> None:
        """Export continuous archival's metrics, read from `status()` at every scrape.

        Called once by the archiver when it starts: stemedb_archive_lag_seconds,
        stemedb_archive_last_success_timestamp_seconds, stemedb_archived_bytes_total,
        stemedb_archive_failures_total. `status` runs in the scrape's worker thread.
        """
        self._features.archive = status

    def track_cluster(self, node: str, peers: Callable[[], Mapping[str, PeerStatus]],
                      sync: Callable[[], SyncTotals] | None = None) -> None:
        """Export the cluster's metrics: this node's id, and its peers read from `peers()` per scrape.

        stemedb_node_up{node} (this node 1, each peer as it is seen),
        stemedb_replication_lag_seconds{peer}, stemedb_push_queue_records{peer},
        stemedb_push_records_total{peer}, stemedb_push_dropped_records_total{peer}; with
        `sync`: stemedb_sync_rounds_total, stemedb_sync_failed_rounds_total,
        stemedb_sync_records_total{direction} and stemedb_sync_bytes_total{direction}.
        The sources run in the scrape's worker thread.
        """
        self._features.node = node
        self._features.peers = peers
        self._features.sync = sync

    def render(self) -> bytes:
        """The Prometheus text format (blocking: call from a worker thread)."""
        return bytes(generate_latest(self.registry))


def stemedb_version() -> str:
    """The running package's version (stemedb.__version__)."""
    import stemedb

    return str(getattr(stemedb, "__version__", "unknown"))
