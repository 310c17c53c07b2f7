"""Prometheus metrics of one server: requests, latencies, batch sizes, queue depth.

Each app has its own registry (not the process-global one), so several apps in one process, as
in tests, never clash over metric names.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from explainrt.serve.batcher import BatchStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    """The metric families, and the hooks the batchers and the request middleware call."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("explainrt_requests", "HTTP requests answered", ["endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("explainrt_request_latency_seconds", "Time to answer a request",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("explainrt_batch_size", "Images per runtime batch", ["model", "kind"],
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.batch_wait = Histogram("explainrt_batch_wait_seconds", "Time the oldest request of a batch waited",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("explainrt_queue_depth", "Images waiting for a batch", ["model"],
                                 registry=self.registry)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def batch_stats(self, model: str) -> BatchStats:
        """Hooks for the batcher of ``model``."""

        def on_batch(kind: str, images: int, waited: float) -> None:
            self.batch_size.labels(model, kind).observe(images)
            self.batch_wait.labels(model).observe(waited)

        return BatchStats(on_batch=on_batch, on_queue=self.queue_depth.labels(model).set)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
