"""edged's Prometheus metrics (own registry per instance, so several can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class EdgeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("coinfer_edge_requests_total", "Requests answered, by outcome", ["outcome"], registry=r)
        self.request_seconds = Histogram("coinfer_edge_request_duration_seconds",
                                         "Arrival to reply of a request", buckets=BUCKETS, registry=r)
        self.stage_seconds = Histogram("coinfer_edge_stage_duration_seconds", "Tail-stage compute time",
                                       buckets=BUCKETS, registry=r)
        self.queue_depth = Gauge("coinfer_edge_queue_depth", "Requests waiting or in service", registry=r)
        self.workers = Gauge("coinfer_edge_workers", "Tail stages that can run at once", registry=r)
        self.probes = Counter("coinfer_edge_probes_total", "Bandwidth probes answered", registry=r)

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        """``/metrics`` on ``address:port`` (all interfaces by default)."""
        start_http_server(port, addr=address, registry=self.registry)
