"""deviced's Prometheus metrics (own registry per instance)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

RATIO_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.5, 2.0, 5.0)
BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)


class DeviceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram("coinfer_device_request_duration_seconds", "End-to-end latency of a request",
                                 buckets=BUCKETS, registry=r)
        self.requests = Counter("coinfer_device_requests_total", "Requests finished, by where", ["where"], registry=r)
        self.deadline = Gauge("coinfer_device_deadline_seconds", "Deadline of the last request", registry=r)
        self.deadline_ratio = Histogram("coinfer_device_latency_deadline_ratio",
                                        "Latency / deadline of each request (over 1: missed)",
                                        buckets=RATIO_BUCKETS, registry=r)
        self.deadline_misses = Counter("coinfer_device_deadline_misses_total", "Requests over their deadline",
                                       registry=r)
        self.unmeetable = Counter("coinfer_device_unmeetable_total",
                                  "Requests no plan was predicted to meet: the plan predicted to finish first ran",
                                  registry=r)
        self.fallbacks = Counter("coinfer_device_fallbacks_total", "Requests finished locally after planning the edge",
                                 ["reason"], registry=r)
        self.app_errors = Counter("coinfer_device_app_errors_total", "Application requests answered with an error",
                                  ["code"], registry=r)
        self.bandwidth = Gauge("coinfer_device_bandwidth_estimate_bps",
                               "Uplink estimate: the rate at which a request's bytes cross", registry=r)
        self.message_seconds = Gauge("coinfer_device_link_message_seconds",
                                     "Uplink estimate: the per-message cost of a request's round trip, whatever its "
                                     "size", registry=r)
        self.free_bytes = Gauge("coinfer_device_link_free_bytes",
                                "Uplink estimate: bytes a request crosses without waiting for the rate (a token "
                                "bucket's burst)", registry=r)
        self.exit = Gauge("coinfer_device_plan_exit", "Exit of the last plan (1-based)", registry=r)
        self.cut = Gauge("coinfer_device_plan_cut", "Layers on the device in the last plan", registry=r)
        self.speed = Gauge("coinfer_device_speed_factor",
                           "Measured / modelled stage times, learned online: 'device' or an edge id (over 1: slower)",
                           ["machine"], registry=r)
        self.device_margin = Gauge("coinfer_device_plan_margin_seconds",
                                   "Planned with: seconds added to the device's predicted compute", registry=r)
        self.remote_margin = Gauge("coinfer_device_plan_margin_ratio",
                                   "Planned with: factor on the predicted link + edge time", registry=r)
        self.accuracy = Gauge("coinfer_device_expected_accuracy", "Expected accuracy of the last plan", registry=r)
        self.cpu_share = Gauge("coinfer_device_cpu_share",
                               "CPU share the policy set (1: full; the compute_knob applies it)", registry=r)
        self.tx_rate = Gauge("coinfer_device_tx_rate_bps", "Transmit rate the policy paced the uplink to", registry=r)
        self.held = Counter("coinfer_device_held_seconds_total",
                            "Seconds requests waited because the policy held them (to send them together)", registry=r)

        # pipelined streams: this device as a worker (stage) and as a stream's owner (stream)
        self.stage_queued = Gauge("coinfer_stage_queued_frames", "Frames waiting on this worker's stages", registry=r)
        self.stage_frames = Counter("coinfer_stage_frames_total", "Frames this worker's stages handled, by outcome",
                                    ["outcome"], registry=r)
        self.stage_seconds = Histogram("coinfer_stage_compute_seconds", "Compute time of one frame in one stage",
                                       buckets=BUCKETS, registry=r)
        self.stream_latency = Histogram("coinfer_stream_frame_latency_seconds",
                                        "A stream frame's latency, sent to result", buckets=BUCKETS, registry=r)
        self.stream_frames = Counter("coinfer_stream_frames_total",
                                     "Stream frames ended, by outcome (result, error; duplicate: a second result "
                                     "suppressed)", ["outcome"], registry=r)
        self.stream_fps = Gauge("coinfer_stream_frames_per_second", "Results per second over the last 5 s",
                                registry=r)
        self.stream_in_flight = Gauge("coinfer_stream_in_flight_frames", "Frames sent and not yet delivered",
                                      registry=r)
        self.stream_replans = Counter("coinfer_stream_replans_total", "Pipeline re-plans, by reason", ["reason"],
                                      registry=r)

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        """``/metrics`` on ``address:port`` (all interfaces by default)."""
        start_http_server(port, addr=address, registry=self.registry)
