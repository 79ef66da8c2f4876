"""deviced configuration: ``[deviced]`` and ``[broker]`` tables of a TOML file."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.bundle import DEFAULT_BUNDLE
from models.loaders import PI3_MODEL
from planner import policies
from planner.core import ExitInfo, Planner
from planner.errors import PlannerError
from planner.units import parse_bandwidth, parse_duration
from protocol.config import load_daemon
from protocol.session import BrokerConfig
from protocol.tensors import ENCODED
from protocol.topics import DEFAULT_PREFIX, check_id

DEPLOYED_CONFIG = Path("/etc/coinfer/deviced.toml")  # where deploy/install.sh puts it


def app_user(device_id: str, app: str) -> str:
    """The broker user of application ``app`` on device ``device_id`` (``coinfer broker add-app``)."""
    return check_id(f"{device_id}.{app}", "app user")


@dataclass(frozen=True, slots=True, kw_only=True)
class DevicedConfig:
    device_id: str = "device-1"
    topic_prefix: str = DEFAULT_PREFIX
    bundle: Path = DEFAULT_BUNDLE
    latency_model: Path = PI3_MODEL  # this device's own
    edge_id: str = ""  # "": any edge serving the bundle; else only this one
    threads: int = 1
    initial_bandwidth: str = "1Mbps"
    default_deadline: str = "300ms"
    probe_interval_s: float = 10.0  # 0: no active probes (passive estimates only)
    probe_sizes: tuple[int, ...] = (256, 2048)  # bytes; the last grows to ~50 ms of transfer at the estimate
    # Plan so that this share of requests would have met the deadline, going by how far the recent ones ran over
    # their predictions (``planner.latency.Margin``); 0: on the prediction alone, as Edgent does.
    plan_quantile: float = 0.9
    metrics_port: int = 0  # 0: no /metrics endpoint
    metrics_address: str = "0.0.0.0"  # where /metrics listens (all interfaces: Prometheus is elsewhere)
    # which knob applies a policy's CPU share (``deviced/actuation.py``): auto (cpufreq, else this process's
    # cgroup quota, where writable), cpufreq, cgroup or none
    compute_knob: str = "auto"
    # how a cut's tensors may cross besides float32, when the bundle measured that encoding's accuracy there
    # (``protocol.tensors.ENCODINGS``); [] = always float32
    encodings: tuple[str, ...] = ENCODED
    # Emulation for single-machine runs, stated in every output that uses it (0 / 1: off).
    emulate_uplink: str = ""  # e.g. "500kbps": delay each upload as if sent at this rate
    emulate_slowdown: float = 1.0  # stretch local compute by this factor (a Pi-class device)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    # the ``[planner]`` table: ``policy`` (a name in ``planner.policies``; default auto: the min-cut for a DAG
    # bundle, Edgent's for a chain) and that policy's own parameters
    planner: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_id(self.device_id, "device_id")
        ipaddress.ip_address(self.metrics_address)  # ValueError: not an IP address to listen on
        if self.edge_id:
            check_id(self.edge_id, "edge_id")
        parse_bandwidth(self.initial_bandwidth)
        parse_duration(self.default_deadline)
        if self.emulate_uplink:
            parse_bandwidth(self.emulate_uplink)
        if self.emulate_slowdown < 1.0 or self.threads < 1:
            raise ValueError("emulate_slowdown must be >= 1 and threads >= 1")
        if not 0.0 <= self.plan_quantile <= 1.0:
            raise ValueError("plan_quantile must be within [0, 1]")
        if self.compute_knob not in ("auto", "cpufreq", "cgroup", "none"):
            raise ValueError("compute_knob must be one of auto, cpufreq, cgroup, none")
        unknown = sorted(set(self.encodings) - set(ENCODED))
        if unknown:
            raise ValueError(f"encodings: unknown {unknown}; choose from {list(ENCODED)}")
        if len(set(self.probe_sizes)) < 2:
            raise ValueError("probe_sizes needs two different sizes")
        self.make_policy()  # an unknown policy or bad parameters fail at start-up

    def make_policy(self, exits: Sequence[ExitInfo] = ()) -> Planner:
        """A new instance of the configured planning policy (``auto``: the one for ``exits``)."""
        params = dict(self.planner)
        name = params.pop("policy", policies.DEFAULT)
        try:
            return policies.make(str(name), exits, **params)
        except PlannerError as exc:
            raise ValueError(f"[planner] {exc}") from exc


def load(path: Path) -> DevicedConfig:
    return load_daemon(DevicedConfig, path, "deviced", paths=("bundle", "latency_model"),
                       lists=("probe_sizes", "encodings"), tables=("planner",))
