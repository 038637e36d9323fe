"""Prometheus metrics of one server: its own counters plus the database's.

Owns: a private CollectorRegistry (several servers can live in one test
process), the request / rejection / connection / query-latency metrics the
request pipeline and the front doors update (requests are labelled by `door`
— binary, http — and `op`, the operation), and a collector that turns `db.stats()` into the storage
metrics (WAL fsync latency histogram, group-commit batches, writes, bytes,
errors, segments, disk usage, recovery) at scrape time. Must never: block the
event loop — `render()` takes the database's state lock, so the HTTP side door
calls it from a worker thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from stemedb.server.buffers import BufferBudget

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class DatabaseCollector:
    """Reads db.stats() on every scrape."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def describe(self) -> list[Metric]:
        return []  # metrics are only known once stats() is read; skip the eager describe

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self._stats()
        except Exception:  # a closed or failing store still lets the scrape answer
            up = GaugeMetricFamily("stemedb_store_up", "1 when the store answered stats()")
            up.add_metric([], 0)
            yield up
            return
        up = GaugeMetricFamily("stemedb_store_up", "1 when the store answered stats()")
        up.add_metric([], 1)
        yield up
        writes = stats["writes"]
        buckets, cumulative = [], 0
        for bound, count in writes["fsync_histogram_ms"].items():
            cumulative += count
            upper = float(bound)
            buckets.append(("+Inf" if upper == float("inf") else repr(upper / 1000.0), cumulative))
        if not buckets or buckets[-1][0] != "+Inf":
            buckets.append(("+Inf", cumulative))
        fsync = HistogramMetricFamily("stemedb_wal_fsync_seconds", "WAL fdatasync latency",
                                      buckets=buckets,
                                      sum_value=writes["fsync_mean_ms"] * writes["fsyncs"] / 1000.0)
        yield fsync
        for name, doc, value in (
            ("stemedb_group_commit_batches", "Group commits (one append + fsync each)", writes["batches"]),
            ("stemedb_writes", "Records written durably", writes["records_written"]),
            ("stemedb_written_bytes", "Bytes appended to the WAL", writes["bytes_written"]),
            ("stemedb_write_errors", "Failed appends or fsyncs", writes["write_errors"]),
            ("stemedb_fsyncs", "fdatasync calls", writes["fsyncs"]),
        ):
            counter = CounterMetricFamily(name, doc)
            counter.add_metric([], value)
            yield counter
        batches = writes["batches"] or 0
        mean = writes["records_written"] / batches if batches else 0.0
        index_bytes = stats["index_bytes"]
        if isinstance(index_bytes, dict):
            index_bytes = sum(index_bytes.values())
        for name, doc, value in (
            ("stemedb_group_commit_batch_records_mean", "Mean records per group commit", mean),
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
            gauge = GaugeMetricFamily(name, doc)
            gauge.add_metric([], float(value))
            yield gauge
        by_kind = GaugeMetricFamily("stemedb_records_by_kind", "Records stored, by kind", labels=["kind"])
        for kind, count in stats["by_kind"].items():
            by_kind.add_metric([kind], count)
        yield by_kind


class ServerMetrics:
    """The counters the front doors update, and the text exposition of everything."""

    def __init__(self, stats: Callable[[], dict[str, Any]] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        registry = self.registry
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
        if stats is not None:
            registry.register(DatabaseCollector(stats))

    def track_buffers(self, budget: BufferBudget) -> None:
        """Read the buffer budget's pools (stemedb.server.buffers.BufferBudget) at every scrape."""
        for pool in (budget.requests, budget.answers):
            self.buffer_bytes.labels(pool.name).set_function(partial(getattr, pool, "used"))
            self.buffer_waiting.labels(pool.name).set_function(partial(getattr, pool, "waiting"))

    def render(self) -> bytes:
        """The Prometheus text format (blocking: call from a worker thread)."""
        return bytes(generate_latest(self.registry))
