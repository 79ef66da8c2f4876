"""Pipelined streams through real daemons and a real broker: stages, order, backpressure, faults, bad messages."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest

from coinfer.lab.procs import Daemon
from deviced.config import DevicedConfig
from deviced.service import Client
from deviced.stream import Stream, StreamResult
from models import loaders
from models.bundle import load_bundle
from models.data import load_fashion_mnist, preprocess
from planner.fleet import Fleet, Worker
from planner.latency import LatencyModel
from protocol.errors import ErrorCode, MalformedMessage
from protocol.messages import StageError, StageFrame, StagePlan, decode, encode
from protocol.topics import Topics
from tests.daemons.conftest import Broker


def _fleet(names: Sequence[str]) -> Fleet:
    """Equal Pi-class workers on fast links, no replicas: a stage per worker for the AlexNet bundle."""
    pi3 = loaders.load_latency_model(loaders.PI3_MODEL)
    return Fleet(workers=tuple(Worker(name=n, latency=pi3, memory_bytes=1e9, uplink_bps=100e6, downlink_bps=100e6)
                               for n in names), source=names[0], max_group=1)


def _inputs(n: int) -> np.ndarray:
    return preprocess(load_fashion_mnist("test")[0][:n])


def _reference(x: np.ndarray) -> list[np.ndarray]:
    """The deepest exit of the whole model, run in one piece."""
    from models.runtime import StageRunner

    bundle = load_bundle()
    runner = StageRunner(bundle)
    stage = runner.stage(runner.whole(len(bundle.exits)))
    return [next(iter(stage.run({bundle.input_name: xi.reshape(bundle.input_shape)}).values())) for xi in x]


@contextlib.asynccontextmanager
async def _clients(broker: Broker, prefix: str, names: Sequence[str], **cfg: Any) -> AsyncIterator[list[Client]]:
    clients = [Client(DevicedConfig(device_id=n, topic_prefix=prefix, broker=broker.config, probe_interval_s=0,
                                    **cfg)) for n in names]
    async with contextlib.AsyncExitStack() as stack:
        for c in clients:
            await stack.enter_async_context(c)
        for c in clients:
            await asyncio.wait_for(c._connected.wait(), 10)
        yield clients


async def _collect(client: Client, frames: Any, fleet: Fleet) -> tuple[list[StreamResult], Stream]:
    started: list[Stream] = []
    results = [r async for r in client.stream(frames, fleet, on_start=started.append)]
    return results, started[0]


async def test_three_stage_stream_in_order_and_exact(broker: Broker, prefix: str) -> None:
    names = ["cam", "w1", "w2"]
    x = _inputs(40)
    async with _clients(broker, prefix, names) as clients:
        results, stream = await _collect(clients[0], list(x), _fleet(names))
        metrics = clients[0].device.metrics.registry
        worker_done = [c.device.metrics.registry.get_sample_value("coinfer_stage_frames_total", {"outcome": "done"})
                       for c in clients]
    assert stream.plan is not None and [s.workers for s in stream.plan.stages] == [("cam",), ("w1",), ("w2",)]
    assert [r.index for r in results] == list(range(40))  # every frame once, in input order
    assert all(r.ok and r.worker == "w2" for r in results)
    for r, ref in zip(results, _reference(x), strict=True):
        assert r.logits is not None and np.array_equal(r.logits, ref)  # the pipeline computes the whole model
    assert worker_done == [40.0, 40.0, 40.0]  # each stage ran each frame once
    assert metrics.get_sample_value("coinfer_stream_frames_total", {"outcome": "result"}) == 40
    assert metrics.get_sample_value("coinfer_stream_frame_latency_seconds_count") == 40


async def test_the_producer_waits_for_room(broker: Broker, prefix: str) -> None:
    """A slow application: the stream reads its input only as fast as results leave (the window), no faster."""
    names = ["cam", "w1"]
    pulled: list[int] = []
    ahead: list[int] = []

    def frames() -> Any:
        for i, xi in enumerate(_inputs(30)):
            pulled.append(i)
            yield xi

    async with _clients(broker, prefix, names) as clients:
        started: list[Stream] = []
        consumed = 0
        async for _ in clients[0].stream(frames(), _fleet(names), on_start=started.append):
            consumed += 1
            await asyncio.sleep(0.02)
            ahead.append(len(pulled) - consumed)
    window = started[0].window
    assert consumed == 30 and window == 4 * len(started[0].plan.stages)
    assert max(ahead) <= window  # never more than the window between the input and the application
    assert max(ahead) >= window - 1  # and the pipeline was kept full


def _worker_config(tmp_path: Path, broker: Broker, prefix: str, name: str, slowdown: float) -> Path:
    conf = tmp_path / f"{name}.toml"
    conf.write_text(f'[deviced]\ndevice_id = "{name}"\ntopic_prefix = "{prefix}"\nprobe_interval_s = 0\n'
                    f'emulate_slowdown = {slowdown}\n\n[broker]\nhost = "127.0.0.1"\nport = {broker.port}\n')
    return conf


async def _wait_online(broker: Broker, prefix: str, names: Sequence[str]) -> None:
    topics = Topics(prefix)
    seen: set[str] = set()
    async with aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
        await c.subscribe(topics.all_device_status())
        async with asyncio.timeout(60):
            async for message in c.messages:
                if isinstance(message.payload, bytes) and b"online" in message.payload:
                    seen.add(topics.dev_topic(str(message.topic))[0])  # type: ignore[index]
                if seen >= set(names):
                    return


async def test_a_stage_killed_mid_stream(tmp_path: Path, broker: Broker, prefix: str) -> None:
    """SIGKILL one worker's deviced mid-stream: the owner re-plans without it and re-sends what was in flight;
    every frame still gets exactly one result, in order, equal to the whole model's."""
    names = ["cam", "w1", "w2"]
    workers = {n: Daemon("deviced.cli", ["run", "--config", str(_worker_config(tmp_path, broker, prefix, n, 20.0))])
               for n in names[1:]}
    for d in workers.values():
        d.start()
    x = _inputs(60)
    try:
        await _wait_online(broker, prefix, names[1:])
        async with _clients(broker, prefix, names[:1], emulate_slowdown=20.0) as clients:
            results: list[StreamResult] = []
            started: list[Stream] = []
            async for r in clients[0].stream(list(x), _fleet(names), on_start=started.append):
                results.append(r)
                if len(results) == 15:
                    workers["w1"].kill()
    finally:
        for d in workers.values():
            d.stop()
    stream = started[0]
    assert [r.index for r in results] == list(range(60))
    assert all(r.ok for r in results), [r.record() for r in results if not r.ok]
    for r, ref in zip(results, _reference(x), strict=True):
        assert np.array_equal(r.logits, ref)
    reasons = [p["reason"] for p in stream.replans]
    assert any("offline" in r or "stalled" in r for r in reasons), stream.replans
    assert stream.plan is not None and "w1" not in {w for s in stream.plan.stages for w in s.workers}
    assert any(p["resent"] > 0 for p in stream.replans[1:])  # frames in flight on the lost path went again
    assert max(r.attempts for r in results) >= 2


async def test_malformed_stage_messages_are_refused_and_the_stream_goes_on(broker: Broker, prefix: str) -> None:
    names = ["cam", "w1", "w2"]
    topics = Topics(prefix)
    x = _inputs(40)
    errors: list[StageError] = []
    async with (_clients(broker, prefix, names, emulate_slowdown=10.0) as clients,
                aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5) as mallory):
        await mallory.subscribe(topics.stream_inboxes("mallory"), qos=1)

        async def listen() -> None:
            async for message in mallory.messages:
                msg = decode(message.payload)  # type: ignore[arg-type]
                assert isinstance(msg, StageError)
                errors.append(msg)

        listener = asyncio.create_task(listen())
        started: list[Stream] = []
        results: list[StreamResult] = []
        async for r in clients[0].stream(list(x), _fleet(names), on_start=started.append):
            results.append(r)
            if len(results) == 5:
                stream = started[0]
                inbox = topics.stage_inbox("w1", "mallory")
                digest = clients[0].device.bundle.digest
                await mallory.publish(inbox, b"\x93not a message", qos=1)
                await mallory.publish(inbox, encode(StagePlan(  # a plan for cam's stream, not from cam
                    stream_id=stream.stream_id, owner="cam", epoch=99, bundle=digest, exit=5, stage=1,
                    input_names=("x",), output_names=("y",), next=(), previous=("mallory",), credits=4)), qos=1)
                await mallory.publish(inbox, encode(StageFrame(  # a frame from outside the pipeline
                    stream_id=stream.stream_id, owner="cam", epoch=stream.epoch, frame=6, stage=1,
                    tensors={"lrn2": np.zeros((1, 1), np.float32)})), qos=1)
        await asyncio.sleep(0.3)
        listener.cancel()
    assert [r.index for r in results] == list(range(40)) and all(r.ok for r in results)
    for r, ref in zip(results, _reference(x), strict=True):
        assert np.array_equal(r.logits, ref)
    codes = sorted(e.code for e in errors)
    assert codes == sorted([ErrorCode.MALFORMED, ErrorCode.MALFORMED, ErrorCode.MALFORMED]), errors
    assert {e.sender for e in errors} == {"w1"}
    assert any("not a msgpack" in e.message for e in errors)
    assert any("only from the stream's owner" in e.message for e in errors)
    assert any("not mallory" in e.message for e in errors)


async def test_a_bad_frame_ends_with_an_error_in_its_place(broker: Broker, prefix: str) -> None:
    names = ["cam", "w1"]
    x = list(_inputs(6))
    x[2] = np.zeros(5, np.float32)  # not a 28x28 image
    async with _clients(broker, prefix, names) as clients:
        results, _ = await _collect(clients[0], x, _fleet(names))
    assert [r.index for r in results] == list(range(6))
    assert [r.ok for r in results] == [True, True, False, True, True, True]
    assert results[2].code == ErrorCode.BAD_TENSOR.value and "28" in results[2].error


@pytest.mark.parametrize("field,value", [("credits", 0), ("previous", ()), ("next", ("a", "a")),
                                         ("input_names", ()), ("owner", "a/b"), ("epoch", 0)])
def test_stage_plans_are_validated(field: str, value: Any) -> None:
    doc: dict[str, Any] = dict(stream_id="s1", owner="cam", epoch=1, bundle="a" * 64, exit=5, stage=0,
                               input_names=("input",), output_names=("conv1",), next=("w1",), previous=("cam",),
                               credits=4)
    assert decode(encode(StagePlan(**doc))) == StagePlan(**doc)
    with pytest.raises(MalformedMessage):
        StagePlan(**{**doc, field: value})


def test_a_worker_offline_outside_the_plan_is_left_out_until_it_is_online_again() -> None:
    from deviced.metrics import DeviceMetrics
    from planner.fleet import chain_from_exit
    from protocol.messages import Status

    bundle = load_bundle()
    info = bundle.exit(len(bundle.exits))

    async def publish(topic: str, payload: bytes) -> None:
        raise AssertionError("nothing is sent here")

    stream = Stream(stream_id="s1", owner="cam", topics=Topics("t"), digest=bundle.digest,
                    chain=chain_from_exit(info), exit_index=info.index, input_name=bundle.input_name,
                    output_name=info.output, input_shape=tuple(bundle.input_shape),
                    fleet=_fleet(["cam", "w1", "w2"]), publish=publish, metrics=DeviceMetrics())

    def used() -> set[str]:
        return {w for s in stream._plan().stages for w in s.workers}

    assert used() == {"cam", "w1", "w2"}
    stream.on_status("w1", Status(state="offline", sender="w1"))
    assert used() == {"cam", "w2"}
    stream.on_status("intruder", Status(state="offline", sender="intruder"))  # not of the fleet: ignored
    stream.on_status("w1", Status(state="online", sender="w1"))
    assert used() == {"cam", "w1", "w2"}


def test_a_plans_acknowledgement_waits_as_long_as_its_stage_takes_to_build(pi3: LatencyModel) -> None:
    """Not a fixed 20 s: the base, and four times the session build the worker's latency model predicts for the
    stage's bytes at its speed (a model without a "load" entry: a plain load rate)."""
    from deviced.stream import ACK_BASE_S, ack_timeout_s

    pi = Worker(name="pi", latency=pi3, memory_bytes=1e9, uplink_bps=1e7, downlink_bps=1e7)
    slow = Worker(name="slow", latency=pi3, memory_bytes=1e9, uplink_bps=1e7, downlink_bps=1e7, speed=0.25)
    small, large = ack_timeout_s(pi, 1e6), ack_timeout_s(pi, 200e6)
    assert ACK_BASE_S < small < large and large == pytest.approx(ACK_BASE_S + 4 * (0.842136 + 4.49e-9 * 200e6))
    assert ack_timeout_s(slow, 200e6) == pytest.approx(ACK_BASE_S + 4 * (large - ACK_BASE_S))
    bare = Worker(name="bare", latency=LatencyModel(name="no-load", types={}), memory_bytes=1e9, uplink_bps=1e7,
                  downlink_bps=1e7)
    assert ack_timeout_s(bare, 40e6) == pytest.approx(ACK_BASE_S + 4 * 2.0)
