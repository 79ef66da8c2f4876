"""A policy's actuation on the device: the compute knob Linux offers (cpufreq, a cgroup quota, none) and uplink
pacing on the MQTT socket; the Lyapunov controller run by deviced."""

import asyncio
import socket
from pathlib import Path

import numpy as np
import pytest

from deviced.actuation import SO_MAX_PACING_RATE, Actuator, ComputeKnob, pace
from deviced.config import DevicedConfig
from deviced.service import Client
from models.data import load_fashion_mnist, preprocess
from planner import lyapunov
from planner.core import Actuation
from tests.daemons.conftest import Broker, EdgeProcess


def _tree(tmp_path: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_cpufreq_is_preferred_and_rounded_to_an_available_frequency(tmp_path: Path) -> None:
    _tree(tmp_path, {"cpufreq/policy0/cpuinfo_max_freq": "1500000\n",
                     "cpufreq/policy0/scaling_available_frequencies": "600000 900000 1200000 1500000\n",
                     "cpufreq/policy0/scaling_max_freq": "1500000\n",
                     "proc": "0::/coinfer-device\n", "cg/coinfer-device/cpu.max": "10000 100000\n"})
    a = Actuator(cpufreq_root=tmp_path / "cpufreq", cgroup_root=tmp_path / "cg", proc_cgroup=tmp_path / "proc")
    assert a.knob == ComputeKnob.CPUFREQ
    a.set_share(0.5)
    assert (tmp_path / "cpufreq/policy0/scaling_max_freq").read_text().strip() == "900000"
    a.restore()
    assert (tmp_path / "cpufreq/policy0/scaling_max_freq").read_text().strip() == "1500000"


def test_a_cgroup_quota_scales_from_what_it_was(tmp_path: Path) -> None:
    _tree(tmp_path, {"proc": "0::/coinfer-device\n", "cg/coinfer-device/cpu.max": "10000 100000\n"})
    a = Actuator(cpufreq_root=tmp_path / "none", cgroup_root=tmp_path / "cg", proc_cgroup=tmp_path / "proc")
    assert a.knob == ComputeKnob.CGROUP
    a.apply(Actuation(cpu_share=0.5), None)
    assert (tmp_path / "cg/coinfer-device/cpu.max").read_text().split() == ["5000", "100000"]
    _tree(tmp_path, {"proc1": "4:cpu,cpuacct:/dev\n", "cg1/cpu,cpuacct/dev/cpu.cfs_quota_us": "-1\n",
                     "cg1/cpu,cpuacct/dev/cpu.cfs_period_us": "100000\n"})
    v1 = Actuator(mode="cgroup", cgroup_root=tmp_path / "cg1", proc_cgroup=tmp_path / "proc1")
    v1.set_share(0.25)
    assert int((tmp_path / "cg1/cpu,cpuacct/dev/cpu.cfs_quota_us").read_text()) > 0
    # a share whose quota would fall under the kernel's 1 ms floor stretches the period instead
    _tree(tmp_path, {"proc2": "1:cpu:/dev\n", "cg2/cpu/dev/cpu.cfs_quota_us": "1000\n",
                     "cg2/cpu/dev/cpu.cfs_period_us": "10000\n"})
    tight = Actuator(mode="cgroup", cgroup_root=tmp_path / "cg2", proc_cgroup=tmp_path / "proc2")
    tight.set_share(0.5)
    assert (tmp_path / "cg2/cpu/dev/cpu.cfs_quota_us").read_text().strip() == "1000"
    assert (tmp_path / "cg2/cpu/dev/cpu.cfs_period_us").read_text().strip() == "20000"  # 5% of a core
    none = Actuator(mode="none", cgroup_root=tmp_path / "cg", proc_cgroup=tmp_path / "proc")
    assert none.knob == ComputeKnob.NONE
    with pytest.raises(ValueError, match="compute_knob"):
        Actuator(mode="turbo")


def test_pacing_sets_the_sockets_rate() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        pace(s, 800_000)
        assert s.getsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE) == 100_000  # bytes per second
        pace(s, 100)  # never so slow that keepalives stall
        assert s.getsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE) == 8_000


async def test_deviced_runs_the_lyapunov_controller(broker: Broker, prefix: str, edge: EdgeProcess) -> None:
    x = preprocess(load_fashion_mnist("test")[0][:6])
    cfg = DevicedConfig(device_id="pi-energy", topic_prefix=prefix, broker=broker.config, probe_interval_s=0,
                        compute_knob="none", planner={"policy": "lyapunov", "v": 10.0, "slot": 0.1,
                                                      "profile": "pi3b-wifi"})
    async with Client(cfg) as client:
        assert await client.wait_for_edge(5)
        outcomes = [await client.infer(xi, deadline=3.0) for xi in x]
        device = client.device
        sock = device.dispatch.socket()
        assert sock is not None
        paced = sock.getsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE)
    policy = device.policy
    assert isinstance(policy, lyapunov.Lyapunov) and policy._in_flight == 0  # every decision observed
    assert all(o.plan.actuation is not None for o in outcomes) and all(o.exit == 5 for o in outcomes)
    assert device.actuator.knob == ComputeKnob.NONE and device.actuator.rate_bps is not None
    assert paced == int(max(device.actuator.rate_bps, 64e3) / 8)
    assert 0 < device.metrics.cpu_share._value.get() <= 1  # prometheus_client has no public getter
    assert np.all([o.logits.shape == (1, 10) for o in outcomes])


async def test_deviced_holds_what_the_controller_holds(broker: Broker, prefix: str, edge: EdgeProcess) -> None:
    """Planned means run: where the controller holds frames (LTE, frames faster than the device, the radio asleep,
    a large V), deviced waits and asks it again; every request is answered, none past its deadline, the wait shows
    in ``coinfer_device_held_seconds_total``, and each request counts once."""
    x = preprocess(load_fashion_mnist("test")[0][:6])
    cfg = DevicedConfig(device_id="pi-hold", topic_prefix=prefix, broker=broker.config, probe_interval_s=0,
                        compute_knob="none", planner={"policy": "lyapunov", "v": 1000.0, "slot": 0.1,
                                                      "profile": "pi3b-lte"})
    async with Client(cfg) as client:
        assert await client.wait_for_edge(5)
        policy = client.device.policy
        assert isinstance(policy, lyapunov.Lyapunov)
        policy.queues = lyapunov.Queues(arrival_rate=3.0, elapsed_s=600.0)  # as after ten minutes at 3 frames/s
        outcomes = await asyncio.gather(*(client.infer(xi, deadline=2.0) for xi in x))
        held_s = client.device.metrics.held._value.get()  # prometheus_client has no public getter
    assert held_s > 0 and policy._in_flight == 0
    assert len(outcomes) == len(x) and all(o.logits.shape == (1, 10) for o in outcomes)
    assert all(o.latency_s <= 2.0 + 0.5 for o in outcomes)  # held only while the deadline allowed
