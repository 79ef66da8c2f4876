"""deviced's MQTT session and the in-process client API for applications."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from types import TracebackType

import aiomqtt
import numpy as np
import numpy.typing as npt
import structlog

from deviced.config import DevicedConfig
from deviced.engine import Device, Outcome
from models.bundle import load_bundle
from models.runtime import StageRunner
from planner.errors import LatencyModelError
from planner.latency import LatencyModel
from planner.units import parse_duration
from protocol import session
from protocol.messages import Status, encode

log = structlog.get_logger()


def build_device(cfg: DevicedConfig) -> Device:
    """Load the bundle and this device's latency model; raises ModelError / LatencyModelError."""
    bundle = load_bundle(cfg.bundle)
    try:
        model = LatencyModel.from_json(json.loads(Path(cfg.latency_model).read_text()))
    except (OSError, ValueError) as exc:
        raise LatencyModelError(f"cannot read latency model {cfg.latency_model}: {exc}") from exc
    return Device(cfg, bundle=bundle, runner=StageRunner(bundle, threads=cfg.threads), device_model=model)


async def run(device: Device, *, shutdown: asyncio.Event, connected: asyncio.Event | None = None) -> None:
    """Keep the device's MQTT session up (reconnecting with backoff) until ``shutdown`` is set."""
    cfg, topics = device.cfg, device.topics
    backoff = session.Backoff()
    while not shutdown.is_set():
        try:
            async with session.client(cfg.broker, identifier=f"deviced-{cfg.device_id}",
                                      will_topic=topics.device_status(cfg.device_id), sender=cfg.device_id) as client:
                for topic in (topics.all_edge_status(), topics.all_edge_adverts(),
                              topics.device_responses(cfg.device_id)):
                    await client.subscribe(topic, qos=1)
                await client.publish(topics.device_status(cfg.device_id),
                                     encode(Status(state="online", sender=cfg.device_id)), qos=1, retain=True)
                device.client = client
                backoff.reset()
                log.info("mqtt_connected", device_id=cfg.device_id)
                if connected is not None:
                    connected.set()
                async with asyncio.TaskGroup() as tg:
                    tasks = [tg.create_task(_receive(client, device), name="receive"),
                             tg.create_task(_probe_loop(device), name="probe")]
                    await shutdown.wait()
                    await client.publish(topics.device_status(cfg.device_id),
                                         encode(Status(state="offline", sender=cfg.device_id)), qos=1, retain=True)
                    for task in tasks:
                        task.cancel()
        except* session.MQTT_ERRORS as group:
            delay = backoff.next()
            log.warning("mqtt_disconnected", error=str(group.exceptions[0]), retry_in_s=round(delay, 2))
            device.client = None
            if connected is not None:
                connected.clear()
            await session.sleep_unless(shutdown, delay)
        finally:
            device.client = None


async def _receive(client: aiomqtt.Client, device: Device) -> None:
    async for message in client.messages:
        if isinstance(message.payload, bytes) and message.payload:
            device.handle(str(message.topic), message.payload)


async def _probe_loop(device: Device) -> None:
    """Probe the chosen edge now and then (passive estimates from every request fill the gaps)."""
    if device.cfg.probe_interval_s <= 0:
        return
    while True:
        edge = device.edges.choose(asyncio.get_running_loop().time())
        if edge is not None:
            await device.probe(edge.edge_id)
        await asyncio.sleep(device.cfg.probe_interval_s if edge is not None else 0.5)


class Client:
    """In-process API: ``async with Client(cfg) as c: outcome = await c.infer(x, deadline=0.3)``."""

    def __init__(self, cfg: DevicedConfig | None = None) -> None:
        self.cfg = cfg or DevicedConfig()
        self.device = build_device(self.cfg)
        self._shutdown = asyncio.Event()
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Client:
        self._task = asyncio.create_task(run(self.device, shutdown=self._shutdown, connected=self._connected),
                                         name=f"deviced-{self.cfg.device_id}")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._shutdown.set()
        if self._task is not None:
            await self._task

    async def wait_for_edge(self, timeout: float = 5.0) -> bool:
        """Wait until connected and some usable edge is known (its retained status and advert arrived)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), timeout)
        while loop.time() < end:
            if self.device.edges.choose(loop.time()) is not None:
                return True
            await asyncio.sleep(0.02)
        return False

    async def infer(self, x: npt.NDArray[np.float32], deadline: float | None = None) -> Outcome:
        """One request; ``deadline`` in seconds (default: the config's ``default_deadline``)."""
        return await self.device.infer(x, deadline if deadline is not None else
                                       parse_duration(self.cfg.default_deadline))
