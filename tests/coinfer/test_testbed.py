"""The testbed's pieces; the namespace testbed itself where this runs as root (CI does)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coinfer.bench import edgent as experiments
from coinfer.lab import testbed
from coinfer.lab.procs import REPO


def test_emulation_rejects_what_the_kernel_cannot_do() -> None:
    with pytest.raises(ValueError, match="1 ms per period"):
        testbed.Emulation(cpu_quota=0.05, cpu_period_us=10_000)
    with pytest.raises(ValueError):
        testbed.Emulation(cpu_quota=0)
    assert testbed.Emulation(cpu_quota=0.05, cpu_period_us=20_000).cpu_quota == 0.05
    # what the CLI builds: a share under 1 ms per 10 ms gets a longer period, not an error
    assert testbed.Emulation.with_quota(0.025).cpu_period_us == 40_000
    assert testbed.Emulation.with_quota(0.1, uplink_bps=5e5).cpu_period_us == 10_000
    with pytest.raises(ValueError):
        testbed.Emulation.with_quota(0)


def test_tbf_burst_holds_a_packet_and_queue_holds_two_seconds() -> None:
    args = testbed.tbf_args(50e3)
    assert args[:3] == ["tbf", "rate", "50000bit"] and int(args[4]) >= 1500 and int(args[6]) >= 64_000
    assert int(testbed.tbf_args(100e6)[6]) == int(100e6 / 8 * 2)


def test_trace_steps_and_ramps() -> None:
    assert experiments.trace_bps(5) == 10e6 and experiments.trace_bps(10) == 1e6
    assert experiments.trace_bps(40) == pytest.approx((2e6 + 100e3) / 2)
    assert experiments.trace_bps(1e9) == experiments.TRACE[-1][1]


def test_notice_counts_requests_until_the_estimate_is_within_2x() -> None:
    recs = [{"t": t, "bandwidth_est_bps": b} for t, b in ((9.0, 1e7), (10.2, 8e6), (10.5, 3e6), (10.9, 1.5e6))]
    assert experiments._notice(recs, at=10.0, new_bps=1e6) == {"seconds": 0.9, "requests": 3,
                                                               "estimate_before_bps": 1e7}
    assert experiments._notice(recs[:2], at=10.0, new_bps=1e6)["requests"] is None


def _rec(latency: float, predicted: float, plan: tuple[int, int] = (1, 7), stage: float = 0.0,
         edge: float | None = None) -> dict[str, object]:
    return {"latency_s": latency, "predicted_s": predicted, "plan_exit": plan[0], "plan_cut": plan[1],
            "stage_s": stage, "edge_s": edge, "predicted_device_s": predicted if edge is None else 0.0,
            "predicted_edge_s": None if edge is None else 0.02}


def test_prediction_errors_say_what_no_model_could_beat() -> None:
    # a device stage measured at 30 or 40 ms (a CPU-quota period apart): no one prediction is within 10% of both
    device = [_rec(m, 0.031, stage=m) for m in (0.030, 0.040, 0.040, 0.040)]
    edge = [_rec(0.1, 0.095, (5, 0), edge=0.03), _rec(0.1, 0.095, (5, 0), edge=0.03)]
    got = experiments._errors([device, edge])
    assert got["requests"] == 6
    assert got["within_10pct"] == pytest.approx(3 / 6)  # 30 ms and both edge requests
    assert got["within_10pct_best_possible"] == pytest.approx(5 / 6)  # 40 ms x3 and the edge pair
    assert got["bias_ms"]["device"] == pytest.approx(9.0)  # median stage 40 ms vs 31 predicted
    assert got["bias_ms"]["edge"] == pytest.approx(10.0)  # 30 ms on the edge vs 20 predicted
    assert got["bias_ms"]["link"] == pytest.approx(-5.0)  # the rest: 70 ms measured vs 75 predicted
    assert experiments._best_share([]) == 0 and experiments._errors([[]]) == {"requests": 0}


def test_loopback_testbed_runs_commands_as_they_are() -> None:
    bed = testbed.Testbed(testbed.Emulation(), loopback=True)
    with bed:
        assert bed.device_argv(["true"]) == ["true"] and bed.edge_host == "127.0.0.1"
        assert "loopback" in bed.describe()["mode"]


@pytest.mark.skipif(os.geteuid() != 0, reason="the namespace testbed needs root (CI runs as root)")
def test_namespace_testbed_shapes_the_uplink_and_quota_and_cleans_up(tmp_path: Path) -> None:
    with testbed.Testbed(testbed.Emulation(uplink_bps=500e3, cpu_quota=0.2)) as bed:
        assert {testbed.NS_DEVICE, testbed.NS_EDGE} <= set(_netns())
        qdisc = subprocess.run(["ip", "netns", "exec", testbed.NS_DEVICE, "tc", "qdisc", "show", "dev",
                                testbed.VETH_DEVICE], capture_output=True, text=True).stdout
        assert "tbf" in qdisc and "500Kbit" in qdisc
        bed.set_uplink(2e6)
        qdisc = subprocess.run(["ip", "netns", "exec", testbed.NS_DEVICE, "tc", "qdisc", "show", "dev",
                                testbed.VETH_DEVICE], capture_output=True, text=True).stdout
        assert "2Mbit" in qdisc
        # a device process is in the cgroup and in the device namespace, and reaches the edge's address
        out = subprocess.run(bed.device_argv(["sh", "-c", "cat /proc/self/cgroup; ip -o addr show"]),
                             capture_output=True, text=True, check=True).stdout
        assert testbed.CGROUP_NAME in out and testbed.DEVICE_IP in out and testbed.EDGE_IP not in out
        # the peer's address is a permanent neighbour: no ARP to lose in a full uplink queue
        neigh = subprocess.run(["ip", "-n", testbed.NS_DEVICE, "neigh", "show", testbed.EDGE_IP],
                               capture_output=True, text=True).stdout
        assert "PERMANENT" in neigh
        # one segment per packet: a GSO packet larger than a lowered rate's burst would block the queue for good
        link = subprocess.run(["ip", "-n", testbed.NS_DEVICE, "-d", "link", "show", testbed.VETH_DEVICE],
                              capture_output=True, text=True).stdout
        assert "gso_max_segs 1 " in link
    assert not {testbed.NS_DEVICE, testbed.NS_EDGE} & set(_netns())
    assert not (testbed.CGROUP_ROOT / "cpu" / testbed.CGROUP_NAME).exists()
    assert not (testbed.CGROUP_ROOT / testbed.CGROUP_NAME).exists()


def _netns() -> list[str]:
    return [line.split()[0] for line in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                        text=True).stdout.splitlines() if line.strip()]


@pytest.mark.skipif(os.geteuid() != 0, reason="the namespace testbed needs root (CI runs as root)")
def test_fleet_testbed_gives_each_member_its_quota_and_links_and_cleans_up() -> None:
    members = [testbed.Member(name="cam", cpu_quota=0.1, uplink_bps=2e6, downlink_bps=4e6),
               testbed.Member(name="w1", cpu_quota=0.2, uplink_bps=8e6, downlink_bps=16e6)]
    with testbed.Fleetbed(members) as bed:
        assert {testbed.NS_HUB, "coinfer-w0", "coinfer-w1"} <= set(_netns())
        for i, (up, down) in enumerate((("2Mbit", "4Mbit"), ("8Mbit", "16Mbit"))):
            mine = subprocess.run(["ip", "netns", "exec", f"coinfer-w{i}", "tc", "qdisc", "show", "dev", f"cfw{i}"],
                                  capture_output=True, text=True).stdout
            hub = subprocess.run(["ip", "netns", "exec", testbed.NS_HUB, "tc", "qdisc", "show", "dev", f"cfw{i}h"],
                                 capture_output=True, text=True).stdout
            assert up in mine and down in hub
        # a member's process runs in its cgroup and namespace, and reaches the hub (where the broker runs)
        server = subprocess.Popen(bed.hub_argv([sys.executable, "-c", "import socket; s = socket.socket(); "
                                                f"s.bind(('{bed.hub_host}', 18999)); s.listen(); "
                                                "c, _ = s.accept(); c.sendall(b'hub')"]))
        try:
            client = (f"import socket, time; time.sleep(0.5); c = socket.create_connection(('{bed.hub_host}', 18999), "
                      "timeout=5); print(open('/proc/self/cgroup').read(), c.recv(3).decode())")
            out = subprocess.run(bed.argv("w1", [sys.executable, "-c", client]), capture_output=True, text=True,
                                 timeout=20).stdout
        finally:
            server.wait(timeout=10)
        assert "coinfer-w1" in out and "hub" in out
        bed.set_quota("w1", 0.05)
        cg = next(p for p in (testbed.CGROUP_ROOT / "coinfer-w1", testbed.CGROUP_ROOT / "cpu" / "coinfer-w1")
                  if p.exists())
        quota = (cg / "cpu.max").read_text() if (cg / "cpu.max").exists() else (cg / "cpu.cfs_quota_us").read_text()
        assert quota.split()[0] == "1000"  # 5%: 1 ms per 20 ms
    assert not {testbed.NS_HUB, "coinfer-w0", "coinfer-w1"} & set(_netns())


DEVICE_SIDE = """
import asyncio, json, sys, time
from deviced.config import DevicedConfig
from deviced.service import Client
from planner.bandwidth import LinkEstimate
from protocol.session import BrokerConfig

async def main():
    cfg = DevicedConfig(device_id="pi-link", broker=BrokerConfig(host=sys.argv[1], port=int(sys.argv[2])),
                        probe_interval_s=0)
    async with Client(cfg, daemon=False) as client:
        assert await client.wait_for_edge(20)
        edge = client.device.edges.choose(time.monotonic())
        estimate, samples = LinkEstimate(bandwidth_bps=1e6), []
        for size in [300] * 6 + [300, 1000, 3000, 10_000, 30_000, 100_000, 300_000, 1_000_000] * 2:
            start = time.monotonic()
            wire = await client.device.dispatch.probe(edge.edge_id, size, timeout_s=30)
            samples.append((wire, time.monotonic() - start))
            estimate = estimate.with_transfer(*samples[-1])
        print(json.dumps({"rate_bps": estimate.bandwidth_bps, "per_message_s": estimate.rtt_s, "samples": samples}))

asyncio.run(main())
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="the namespace testbed needs root (CI runs as root)")
def test_the_link_estimate_is_the_shaped_rate_and_the_per_message_cost(tmp_path: Path) -> None:
    """Messages of 300 B to 1 MB through mosquitto and edged on the tc-tbf-shaped uplink: the estimator's rate is
    the tbf rate within 10%, and its per-message cost within 1 ms of what the smallest messages took beyond their
    bytes at that rate (larger ones under a few KB slip through on the token bucket's burst, faster than the rate:
    the fitted line through the large ones starts below zero)."""
    import json

    from coinfer.lab.client import edged
    from models.bundle import DEFAULT_BUNDLE
    from models.loaders import DESKTOP_MODEL

    rate = 4e6
    script = tmp_path / "device_side.py"
    script.write_text(DEVICE_SIDE)
    with testbed.Testbed(testbed.Emulation(uplink_bps=rate, cpu_quota=1.0)) as bed, \
            testbed.broker(tmp_path, bed.edge_host, bed.edge_argv), edged(bed, tmp_path, DESKTOP_MODEL, DEFAULT_BUNDLE):
        done = subprocess.run(bed.device_argv([sys.executable, str(script), bed.edge_host, str(testbed.BROKER_PORT)]),
                              capture_output=True, text=True, timeout=240, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    small = float(np.median([t - 8 * b / rate for b, t in got["samples"] if b < 1000]))
    print(f"\nrate {got['rate_bps'] / 1e6:.3f} Mbps (tbf {rate / 1e6:g}), per-message {got['per_message_s'] * 1e3:.2f} "
          f"ms (the 300 B messages beyond their bytes: {small * 1e3:.2f} ms)")
    for b, t in got["samples"]:
        print(f"  {b:>8} B  {t * 1e3:8.1f} ms  model {(got['per_message_s'] + 8 * b / got['rate_bps']) * 1e3:8.1f}")
    assert abs(got["rate_bps"] / rate - 1) <= 0.10
    assert abs(got["per_message_s"] - small) <= 0.001
