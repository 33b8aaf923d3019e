"""Server counters. Plain integers on the hot path; rendered for Prometheus on scrape."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import Histogram

COMMIT_SECONDS_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


def _commit_histogram() -> Histogram:
    from prometheus_client import Histogram

    return Histogram(
        "sds_storage_commit_seconds",
        "Duration of storage commits.",
        buckets=COMMIT_SECONDS_BUCKETS,
        registry=None,
    )


@dataclass(slots=True)
class Metrics:
    """What the server counts. No store ids or subjects: labels are reasons only."""

    connections_opened: int = 0
    connections_open: int = 0
    signal_connections_open: int = 0
    frames_received: int = 0
    bytes_received: int = 0
    frames_relayed: int = 0
    bytes_relayed: int = 0
    frames_sent: int = 0
    slow_consumers_closed: int = 0
    frames_dropped: Counter[str] = field(default_factory=Counter)
    auth_failures: Counter[str] = field(default_factory=Counter)
    connections_refused: Counter[str] = field(default_factory=Counter)
    commits: int = 0
    commit_seconds: Histogram = field(default_factory=_commit_histogram)
    commit_seconds_max: float = 0.0
    commit_failures: int = 0
    commit_queue_depth: int = 0
    commit_ok_at: float = float("-inf")
    """When (time.monotonic) the last commit succeeded."""
    commit_failed_at: float = float("-inf")
    """When (time.monotonic) the last commit failed."""
    stores_open: int = 0
    store_files_open: int = 0
    pending_bytes: int = 0
    writer_pauses: Counter[str] = field(default_factory=Counter)
    catchup_bytes: int = 0
    catchup_waits: int = 0
    catchup_timeouts: int = 0
    value_answers_active: int = 0
    value_requests_queued: int = 0
    value_requests_unanswered: Counter[str] = field(default_factory=Counter)
    value_answer_bytes: int = 0
    values_not_stored: Counter[str] = field(default_factory=Counter)
    ownership_changes: Counter[str] = field(default_factory=Counter)
    """Stores (or signalling rooms) this process took, released, handed over or lost."""
    forwarded_connections_opened: int = 0
    forwarded_connections_open: int = 0

    def observe_commit(self, seconds: float, *, ok: bool) -> None:
        """Count one storage commit that took ``seconds`` and succeeded or not."""
        self.commits += 1
        self.commit_seconds.observe(seconds)
        self.commit_seconds_max = max(self.commit_seconds_max, seconds)
        if ok:
            self.commit_ok_at = time.monotonic()
        else:
            self.commit_failed_at = time.monotonic()


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The exposition format ``render_prometheus`` writes (Prometheus 3 wants it named)."""


def sds_version() -> str:
    """The installed version of sds (the ``sds-relay`` distribution)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sds-relay")
    except PackageNotFoundError:
        return "unknown"


def build_info() -> dict[str, str]:
    """The labels of ``sds_build_info``: versions of sds, Python and SQLite."""
    import platform
    import sqlite3

    return {
        "version": sds_version(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
    }


def render_prometheus(metrics: Metrics) -> str:
    """The counters in Prometheus text format (prometheus_client writes the format).

    Besides the server's own families: the standard ``process_*`` (CPU, memory,
    open files) and ``python_info`` families, and ``sds_build_info``.
    """
    from prometheus_client import PlatformCollector, ProcessCollector
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        InfoMetricFamily,
        Metric,
    )
    from prometheus_client.exposition import generate_latest
    from prometheus_client.registry import Collector, CollectorRegistry

    def counter(name: str, doc: str, value: float) -> Metric:
        return CounterMetricFamily(name, doc, value=value)

    def gauge(name: str, doc: str, value: float) -> Metric:
        return GaugeMetricFamily(name, doc, value=value)

    def by_reason(name: str, doc: str, counts: Counter[str]) -> Metric:
        family = CounterMetricFamily(name, doc, labels=["reason"])
        for reason, count in sorted(counts.items()):
            family.add_metric([reason], count)
        return family

    class _Snapshot(Collector):
        def collect(self) -> list[Metric]:
            m = metrics
            return [
                gauge("sds_connections", "Open /ws connections.", m.connections_open),
                gauge(
                    "sds_signal_connections", "Open /signal connections.", m.signal_connections_open
                ),
                counter(
                    "sds_connections_opened", "Accepted /ws connections.", m.connections_opened
                ),
                gauge("sds_stores", "Stores with connected clients.", m.stores_open),
                gauge("sds_store_files_open", "Open SQLite store files.", m.store_files_open),
                counter("sds_frames_received", "Frames received from clients.", m.frames_received),
                counter("sds_bytes_received", "Bytes received from clients.", m.bytes_received),
                counter("sds_frames_relayed", "Frames relayed to a store.", m.frames_relayed),
                counter(
                    "sds_bytes_relayed", "Payload bytes delivered by relaying.", m.bytes_relayed
                ),
                counter("sds_frames_sent", "Frames written to client sockets.", m.frames_sent),
                counter(
                    "sds_slow_consumers_closed",
                    "Clients closed with 1013 for not keeping up.",
                    m.slow_consumers_closed,
                ),
                by_reason("sds_frames_dropped", "Frames not relayed, by reason.", m.frames_dropped),
                by_reason("sds_auth_failures", "Refused tokens, by reason.", m.auth_failures),
                by_reason(
                    "sds_connections_refused",
                    "Connections refused with 503, by reason.",
                    m.connections_refused,
                ),
                counter("sds_storage_commits", "Storage transactions committed.", m.commits),
                gauge(
                    "sds_storage_commit_seconds_max",
                    "Longest storage commit so far.",
                    m.commit_seconds_max,
                ),
                counter("sds_storage_failures", "Failed storage commits.", m.commit_failures),
                gauge(
                    "sds_storage_queue_depth",
                    "Writes waiting for their commit.",
                    m.commit_queue_depth,
                ),
                InfoMetricFamily("sds_build", "Versions of sds, Python and SQLite.", build_info()),
                gauge(
                    "sds_value_answers_active",
                    "REQ_VALUE answers being sent (at most one per client).",
                    m.value_answers_active,
                ),
                gauge(
                    "sds_value_requests_queued",
                    "REQ_VALUE answers waiting behind the one in flight.",
                    m.value_requests_queued,
                ),
                by_reason(
                    "sds_value_requests_unanswered",
                    "REQ_VALUE requests (still relayed) the server did not answer, by reason.",
                    m.value_requests_unanswered,
                ),
                counter(
                    "sds_value_answer_bytes",
                    "Payload bytes of REQ_VALUE answers written to sockets.",
                    m.value_answer_bytes,
                ),
                by_reason(
                    "sds_values_not_stored",
                    "Values (VALUE_CHUNK sequences) that could not be stored, by reason.",
                    m.values_not_stored,
                ),
                gauge(
                    "sds_pending_bytes",
                    "Bytes of frames waiting for their commit, all stores.",
                    m.pending_bytes,
                ),
                by_reason(
                    "sds_writer_pauses",
                    "Times a writer was not read because too much waited for commit, "
                    "by bound (store, total).",
                    m.writer_pauses,
                ),
                gauge(
                    "sds_catchup_bytes",
                    "Bytes of catch-up pages held for joiners.",
                    m.catchup_bytes,
                ),
                counter(
                    "sds_catchup_waits",
                    "Catch-up pages that waited for room in the catch-up budget.",
                    m.catchup_waits,
                ),
                counter(
                    "sds_catchup_timeouts",
                    "Joiners closed with 1013 after waiting too long for catch-up room.",
                    m.catchup_timeouts,
                ),
                by_reason(
                    "sds_ownership_changes",
                    "Stores and signalling rooms this process took (acquired), let go when "
                    "unused (released), handed over to the process the proxy routes their "
                    "clients to (handed_over) or lost, by reason.",
                    m.ownership_changes,
                ),
                counter(
                    "sds_forwarded_connections_opened",
                    "Connections forwarded to the process owning their store.",
                    m.forwarded_connections_opened,
                ),
                gauge(
                    "sds_forwarded_connections",
                    "Open connections forwarded to the process owning their store.",
                    m.forwarded_connections_open,
                ),
            ]

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot())
    registry.register(metrics.commit_seconds)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return generate_latest(registry).decode()
