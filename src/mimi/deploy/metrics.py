"""What an operator watches, in the Prometheus text format (``GET /metrics``), from ``prometheus_client``.

Every server holds its own registry, so two servers in one process (tests) do not share counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics"]

# seconds: from a few ms (a batch of one on a small model) to tens of seconds (a queue backed up on a CPU)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class ServerMetrics:
    """The server's counters, histograms and gauges (names prefixed ``mimi_``)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "mimi_requests", "Prediction requests answered, by task and HTTP status", ["task", "status"], registry=r
        )
        self.latency = Histogram(
            "mimi_request_seconds",
            "Seconds from a prediction request's arrival to its answer",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "mimi_batch_size", "Requests run in one backbone pass", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "mimi_batch_seconds", "Seconds the model spent on one batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("mimi_queue_depth", "Requests waiting for a batch", registry=r)
        self.tasks_loaded = Gauge("mimi_tasks_loaded", "Tasks the bank holds", registry=r)
        self.task_load_failures = Counter(
            "mimi_task_load_failures", "Task files that could not be added (corrupt, another backbone...)", registry=r
        )
        self.ready = Gauge(
            "mimi_ready", "1 once the backbone and tasks are loaded, 0 before and while draining", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
