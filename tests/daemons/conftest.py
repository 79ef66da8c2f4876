"""A real mosquitto on a free port (started once per session) and daemons run in-process against it."""

# Broker (coinfer.lab.procs.Mosquitto) and free_port are re-exported for the tests.

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coinfer.lab.procs import Mosquitto as Broker
from coinfer.lab.procs import free_port
from deviced.config import DevicedConfig
from deviced.engine import Outcome
from deviced.service import Client
from edged.config import EdgedConfig
from edged.server import run as run_edged
from models.runtime import StageRunner

REPO = Path(__file__).resolve().parents[2]
_prefixes = itertools.count()


def start_broker(directory: Path) -> Broker:
    """mosquitto from the repository's mosquitto.conf, on a free port."""
    return Broker.from_template(REPO / "mosquitto.conf", directory, port=free_port()).start()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = start_broker(tmp_path_factory.mktemp("mosquitto"))
    yield b
    b.stop()


@pytest.fixture
def prefix() -> str:
    """A topic prefix of its own for each test."""
    return f"t{next(_prefixes)}-{int(time.time() * 1000) % 10**8}"


class EdgeProcess:
    """edged running as a task in the test's event loop, stopped the way systemd stops it."""

    def __init__(self, cfg: EdgedConfig) -> None:
        self.cfg = cfg
        self.shutdown = asyncio.Event()
        self.task = asyncio.create_task(run_edged(cfg, shutdown=self.shutdown), name=f"edged-{cfg.edge_id}")

    async def stop(self) -> None:
        self.shutdown.set()
        await asyncio.wait_for(self.task, 20)


@pytest.fixture
async def edge(broker: Broker, prefix: str) -> AsyncIterator[EdgeProcess]:
    proc = EdgeProcess(EdgedConfig(edge_id="edge-a", topic_prefix=prefix, broker=broker.config))
    yield proc
    await proc.stop()


async def serve_and_infer(broker: Broker, prefix: str, bundle: Path, inputs: Sequence[np.ndarray], *,
                          deadline: float, **device: Any) -> list[Outcome]:
    """edged serving ``bundle`` and a deviced of it (``device``: more DevicedConfig keys): one request each."""
    edge = EdgeProcess(EdgedConfig(edge_id=f"edge-{prefix}", topic_prefix=prefix, broker=broker.config,
                                   bundles=(bundle,)))
    cfg = DevicedConfig(topic_prefix=prefix, broker=broker.config, probe_interval_s=0, bundle=bundle, **device)
    try:
        async with Client(cfg) as client:
            assert await client.wait_for_edge(10)
            return [await client.infer(x, deadline=deadline) for x in inputs]
    finally:
        await edge.stop()


def whole_exit(runner: StageRunner, exit_index: int, x: np.ndarray) -> np.ndarray:
    """What the whole exit computes for one input (the reference for co-inferred answers)."""
    return next(iter(runner.stage(runner.whole(exit_index)).run({runner.bundle.input_name: x[None]}).values()))


async def wait_online(broker: Broker, prefix: str, edge_id: str) -> None:
    """Until ``edge_id``'s retained advert is on the broker (its subscriptions are in place by then)."""
    import aiomqtt

    from protocol.topics import Topics

    async with aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
        await c.subscribe(Topics(prefix).edge_advert(edge_id))
        async with asyncio.timeout(10):
            async for _ in c.messages:
                return
