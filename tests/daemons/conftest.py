"""A real mosquitto on a free port (started once per session) and daemons run in-process against it."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edged.config import EdgedConfig
from edged.server import run as run_edged
from protocol.session import BrokerConfig

REPO = Path(__file__).resolve().parents[2]
_prefixes = itertools.count()


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if found is None:
        raise RuntimeError("mosquitto not installed: `make test` installs it (apt-get install mosquitto)")
    return found


@dataclass
class Broker:
    port: int
    conf: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    @property
    def config(self) -> BrokerConfig:
        return BrokerConfig(host="127.0.0.1", port=self.port)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_broker(directory: Path) -> Broker:
    """mosquitto from the repository's mosquitto.conf, on a free port."""
    port = free_port()
    conf = directory / "mosquitto.conf"
    conf.write_text((REPO / "mosquitto.conf").read_text().replace("listener 18830 ", f"listener {port} "))
    b = Broker(port=port, conf=conf)
    b.start()
    return b


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


async def wait_online(broker: Broker, prefix: str, edge_id: str) -> None:
    """Until ``edge_id``'s retained advert is on the broker (its subscriptions are in place by then)."""
    import aiomqtt

    from protocol.topics import Topics

    async with aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
        await c.subscribe(Topics(prefix).edge_advert(edge_id))
        async with asyncio.timeout(10):
            async for _ in c.messages:
                return
