"""Faults against real processes: edged killed mid-request, the broker restarted mid-run. Nothing is lost."""

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from coinfer.lab.procs import Daemon
from deviced.config import DevicedConfig
from deviced.engine import Outcome
from deviced.service import Client
from edged.config import EdgedConfig
from models.data import load_fashion_mnist, preprocess
from planner import policies
from tests.daemons.conftest import Broker, EdgeProcess, start_broker


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Broker]:
    b = start_broker(tmp_path)
    yield b
    b.stop()


def _edged_process(tmp_path: Path, broker: Broker, prefix: str) -> Daemon:
    conf = tmp_path / "edged.toml"
    conf.write_text(f'[edged]\nedge_id = "edge-k"\ntopic_prefix = "{prefix}"\n\n'
                    f'[broker]\nhost = "127.0.0.1"\nport = {broker.port}\n')
    return Daemon("edged.cli", ["--config", str(conf)]).start()


def _inputs(n: int) -> np.ndarray:
    return preprocess(load_fashion_mnist("test")[0][:n])


async def test_edged_killed_mid_request(tmp_path: Path, broker: Broker, prefix: str) -> None:
    proc = _edged_process(tmp_path, broker, prefix)
    x = _inputs(40)
    outcomes: list[Outcome] = []
    try:
        cfg = DevicedConfig(device_id="pi-k", topic_prefix=prefix, broker=broker.config, probe_interval_s=0)
        async with Client(cfg) as client:
            assert await client.wait_for_edge(20)
            for i in range(10):
                outcomes.append(await client.infer(x[i], deadline=0.5))
            assert all(o.where in ("edge", "split") for o in outcomes)
            in_flight = [asyncio.create_task(client.infer(x[10 + i], deadline=0.5)) for i in range(10)]
            await asyncio.sleep(0.002)
            proc.kill()  # SIGKILL
            outcomes += await asyncio.gather(*in_flight)
            for i in range(20, 40):
                outcomes.append(await client.infer(x[i], deadline=0.5))
    finally:
        proc.stop()
    assert len(outcomes) == 40 and all(o.logits.shape == (1, 10) for o in outcomes)  # nothing lost
    after = outcomes[20:]
    assert any(o.fallback == "timeout" for o in outcomes[10:])
    assert all(o.where in ("fallback", "device") for o in after)
    # local completion fits a 0.5 s budget on this machine: every request still met its deadline
    assert sum(o.met for o in outcomes) == 40, [round(o.latency_s, 3) for o in outcomes if not o.met]


async def test_broker_restart_mid_run(own_broker: Broker, prefix: str) -> None:
    edge = EdgeProcess(EdgedConfig(edge_id="edge-r", topic_prefix=prefix, broker=own_broker.config))
    x = _inputs(30)
    outcomes: list[Outcome] = []
    try:
        cfg = DevicedConfig(device_id="pi-r", topic_prefix=prefix, broker=own_broker.config, probe_interval_s=0)
        async with Client(cfg) as client:
            assert await client.wait_for_edge(10)
            for i in range(10):
                outcomes.append(await client.infer(x[i], deadline=0.5))
            own_broker.stop()
            for i in range(10, 20):
                outcomes.append(await client.infer(x[i], deadline=0.5))
            own_broker.start()
            assert await client.wait_for_edge(20)  # reconnected, the advert came back
            for i in range(20, 30):
                outcomes.append(await client.infer(x[i], deadline=0.5))
    finally:
        await edge.stop()
    assert len(outcomes) == 30 and all(o.logits.shape == (1, 10) for o in outcomes)
    assert all(o.where in ("edge", "split") for o in outcomes[:10])
    assert all(o.where in ("device", "fallback") for o in outcomes[10:20])
    assert all(o.where in ("edge", "split") for o in outcomes[20:])


async def test_broker_killed_under_in_flight_requests(tmp_path: Path, own_broker: Broker, prefix: str) -> None:
    """A lost broker is not a slow edge: every waiting request falls back at once with reason ``broker``, and
    nothing is learned from it (no bandwidth cap, no margin sample, no suspect strike)."""
    proc = _edged_process(tmp_path, own_broker, prefix)
    x = _inputs(6)
    try:
        cfg = DevicedConfig(device_id="pi-lost", topic_prefix=prefix, broker=own_broker.config, probe_interval_s=0)
        async with Client(cfg) as client:
            assert await client.wait_for_edge(20)
            device = client.device
            edge_only = policies.make("fixed", exit=5, cut=0)
            assert (await device.infer(x[0], 5.0, policy=edge_only)).where == "edge"
            link, margins = device.link.estimate, (device.learning.device_margin, device.learning.remote_margin)
            os.kill(proc.pid, signal.SIGSTOP)  # the edge takes requests and answers none: they wait
            in_flight = [asyncio.create_task(device.infer(x[i], 5.0, policy=edge_only)) for i in range(1, 6)]
            for _ in range(200):  # until all five are sent and waiting for their answers
                await asyncio.sleep(0.01)
                if device.dispatch.waiting == 5:
                    break
            killed = time.monotonic()
            own_broker.kill()
            outcomes: list[Outcome] = await asyncio.gather(*in_flight)
            done = time.monotonic()
            view = device.edges.edges["edge-k"]
            assert [o.fallback for o in outcomes] == ["broker"] * 5
            assert all(o.where == "fallback" and o.logits.shape == (1, 10) for o in outcomes)
            # at once: not at the local cut-off, which a 5 s deadline puts seconds later
            assert done - killed < 2.5, done - killed
            assert device.link.estimate == link and device.link.capped is None
            assert (device.learning.device_margin, device.learning.remote_margin) == margins
            assert view.unanswered == 0 and view.suspect_until == 0.0
            assert device.metrics.registry.get_sample_value("coinfer_device_fallbacks_total",
                                                            {"reason": "broker"}) == 5
    finally:
        if proc.proc is not None:
            os.kill(proc.pid, signal.SIGCONT)
        proc.stop()
