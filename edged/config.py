"""edged configuration: ``[edged]`` and ``[broker]`` tables of a TOML file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from models.bundle import DEFAULT_BUNDLE
from protocol.config import ConfigError, broker, read_toml, resolve, section
from protocol.session import BrokerConfig
from protocol.topics import DEFAULT_PREFIX, check_id

DEFAULT_LATENCY_MODEL = Path(__file__).resolve().parent.parent / "planner" / "reference" / "edgent2018-desktop.json"


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
    advert_interval_s: float = 5.0
    drain_timeout_s: float = 10.0
    broker: BrokerConfig = field(default_factory=BrokerConfig)

    def __post_init__(self) -> None:
        check_id(self.edge_id, "edge_id")
        if self.workers < 1 or self.threads < 1:
            raise ValueError("workers and threads must be >= 1")
        if not self.bundles:
            raise ValueError("serve at least one bundle")


def load(path: Path) -> EdgedConfig:
    doc = read_toml(path)
    unknown = sorted(set(doc) - {"edged", "broker"})
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {unknown}")
    base = path.resolve().parent
    table = dict(doc.get("edged", {}))
    if "bundles" in table:
        table["bundles"] = tuple(resolve(base, b) for b in table["bundles"])
    if "latency_model" in table:
        table["latency_model"] = resolve(base, table["latency_model"])
    return section(EdgedConfig, {"edged": table}, "edged", broker=broker(doc))
