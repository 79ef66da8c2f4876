"""An edge's new latency model is prepared off the event loop: the loop keeps serving, with the model it had."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from deviced.edges import EdgeDirectory
from deviced.inbound import Channel, Inbound
from models.bundle import Bundle
from planner import policies
from planner.core import ExitInfo, Planner, Prepared
from planner.latency import LatencyModel
from protocol.messages import Advert, Status

pytestmark = pytest.mark.asyncio


class Gated:
    """The configured policy, whose ``compile`` waits until the test opens the gate (a slow preparation)."""

    def __init__(self) -> None:
        self.inner: Planner = policies.make("mincut")
        self.gate = threading.Event()
        self.threads: list[str] = []

    def compile(self, exits: Sequence[ExitInfo], device: LatencyModel, edge: LatencyModel) -> Prepared:
        self.threads.append(threading.current_thread().name)
        assert self.gate.wait(10), "the test never opened the gate"
        return self.inner.compile(exits, device, edge)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def _advert(bundle: Bundle, model: LatencyModel) -> Inbound:
    advert = Advert(edge_id="edge-1", bundles={bundle.digest: bundle.name}, latency_model=model.to_json(),
                    queue_depth=0, service_s=0.01, workers=1)
    return Inbound(channel=Channel.EDGE_ADVERT, sender="edge-1", message=advert, topic="t")


async def _until(predicate: object, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.01)


async def test_a_new_advert_is_prepared_off_the_loop_and_the_old_model_serves_meanwhile(
        bundle: Bundle, pi3: LatencyModel, desktop: LatencyModel) -> None:
    policy = Gated()
    edges = EdgeDirectory(digest=bundle.digest, exits=bundle.exits, device_model=pi3, policy=policy)  # type: ignore[arg-type]
    try:
        edges.on_status(Inbound(channel=Channel.EDGE_STATUS, sender="edge-1", topic="t",
                                message=Status(state="online", sender="edge-1")))
        edges.on_advert(_advert(bundle, desktop))  # returns at once: the worker waits at the gate
        view = edges.edges["edge-1"]
        assert view.prepared is None and view.pending_key and edges.choose(0.0) is None  # nothing to plan with yet
        ticks = 0
        for _ in range(5):  # the loop runs while the preparation waits
            await asyncio.sleep(0)
            ticks += 1
        assert ticks == 5 and view.prepared is None
        policy.gate.set()
        await _until(lambda: view.prepared is not None)
        assert policy.threads == ["coinfer-prepare_0"] and view.model == desktop and edges.choose(0.0) is view
        first = view.prepared

        policy.gate.clear()
        faster = desktop.scaled(0.5, desktop.stage_overhead_s, name="desktop-x2", meta={})
        edges.on_advert(_advert(bundle, faster))
        edges.on_advert(_advert(bundle, faster))  # the same model again: not prepared twice
        await asyncio.sleep(0.05)
        assert view.prepared is first and view.model == desktop and edges.choose(0.0) is view  # still serving
        policy.gate.set()
        await _until(lambda: view.model == faster)
        assert view.prepared is not first and len(policy.threads) == 2
    finally:
        policy.gate.set()
        edges.close()


async def test_an_unusable_latency_model_is_refused_without_stopping_the_loop(bundle: Bundle,
                                                                              pi3: LatencyModel) -> None:
    edges = EdgeDirectory(digest=bundle.digest, exits=bundle.exits, device_model=pi3, policy=policies.make("edgent"))
    advert = Advert(edge_id="edge-1", bundles={bundle.digest: bundle.name}, latency_model={"format": "nonsense"},
                    queue_depth=0, service_s=0.01, workers=1)
    edges.on_advert(Inbound(channel=Channel.EDGE_ADVERT, sender="edge-1", message=advert, topic="t"))
    view = edges.edges["edge-1"]
    assert view.prepared is None and not view.pending_key and edges.choose(0.0) is None
    edges.close()
