"""edged configuration: ``[edged]`` and ``[broker]`` tables of a TOML file."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from models.bundle import DEFAULT_BUNDLE
from models.loaders import DESKTOP_MODEL
from protocol.config import load_daemon
from protocol.session import BrokerConfig
from protocol.topics import DEFAULT_PREFIX, check_id

DEFAULT_LATENCY_MODEL = DESKTOP_MODEL


@dataclass(frozen=True, slots=True, kw_only=True)
class EdgedConfig:
    edge_id: str = "edge-1"
    topic_prefix: str = DEFAULT_PREFIX
    bundles: tuple[Path, ...] = (DEFAULT_BUNDLE,)
    latency_model: Path = DEFAULT_LATENCY_MODEL  # advertised to devices
    workers: int = 1
    threads: int = 1  # onnxruntime intra-op threads per worker
    pool: bool = True  # also take untargeted work from the shared subscription
    metrics_port: int = 0  # 0: no /metrics endpoint
    metrics_address: str = "0.0.0.0"  # where /metrics listens; 127.0.0.1 where Prometheus runs on this host
    advert_interval_s: float = 5.0
    drain_timeout_s: float = 10.0
    broker: BrokerConfig = field(default_factory=BrokerConfig)

    def __post_init__(self) -> None:
        check_id(self.edge_id, "edge_id")
        ipaddress.ip_address(self.metrics_address)  # ValueError: not an IP address to listen on
        if self.workers < 1 or self.threads < 1:
            raise ValueError("workers and threads must be >= 1")
        if not self.bundles:
            raise ValueError("serve at least one bundle")


def load(path: Path) -> EdgedConfig:
    return load_daemon(EdgedConfig, path, "edged", paths=("latency_model",), path_lists=("bundles",))
