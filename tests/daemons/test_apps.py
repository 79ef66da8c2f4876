"""Applications talking to a running deviced through the broker (the local request topic)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from deviced.config import DevicedConfig
from deviced.service import RemoteClient, RemoteError, build_device, run
from models.bundle import Bundle
from models.data import load_fashion_mnist, preprocess
from protocol import session
from protocol.messages import AppRequest, ErrorReply, Status, decode, encode
from protocol.topics import Topics
from tests.daemons.conftest import REPO, Broker, EdgeProcess, free_port


@pytest.fixture
async def deviced(broker: Broker, prefix: str) -> AsyncIterator[DevicedConfig]:
    # float32 across, so that an answer is exactly the whole model's (encoded ones: tests/daemons/test_encodings.py)
    cfg = DevicedConfig(device_id="pi-app", topic_prefix=prefix, broker=broker.config, probe_interval_s=0,
                        encodings=())
    device, shutdown, connected = build_device(cfg), asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run(device, shutdown=shutdown, connected=connected))
    await asyncio.wait_for(connected.wait(), 5)
    yield cfg
    shutdown.set()
    await asyncio.wait_for(task, 10)


async def test_app_request_answered_like_the_whole_model(deviced: DevicedConfig, edge: EdgeProcess,
                                                         bundle: Bundle) -> None:
    x = preprocess(load_fashion_mnist("test")[0][:5])
    runner = build_device(deviced).runner
    # every whole exit is built at start: no first request of one waits for its session
    assert runner.built == {runner.whole(info.index) for info in bundle.exits}
    async with RemoteClient(deviced.broker, deviced.device_id, prefix=deviced.topic_prefix) as app:
        for xi in x:
            r = await app.infer(xi, deadline=1.0)
            whole = runner.stage(runner.whole(r.exit)).run(
                {"input": xi.reshape(1, 1, 28, 28)})
            assert np.array_equal(r.outputs["logits"], next(iter(whole.values())))
            assert r.latency_s <= r.deadline_s == 1.0


async def test_bad_app_requests_get_errors_and_deviced_keeps_serving(deviced: DevicedConfig) -> None:
    topics = Topics(deviced.topic_prefix)
    reply_topic = topics.app_responses(deviced.device_id, "raw-app")
    async with session.client(deviced.broker, identifier="raw-app") as raw, \
            RemoteClient(deviced.broker, deviced.device_id, prefix=deviced.topic_prefix) as app:
        await raw.subscribe(reply_topic, qos=1)
        messages = raw.messages.__aiter__()

        async def ask(payload: bytes, corr: str) -> ErrorReply:
            props = session.request_properties(response_topic=reply_topic, correlation=corr, expiry_s=5)
            await raw.publish(topics.device_infer(deviced.device_id), payload, qos=1, properties=props)
            reply = decode((await asyncio.wait_for(anext(messages), 5)).payload)  # type: ignore[arg-type]
            assert isinstance(reply, ErrorReply)
            return reply

        assert (await ask(b"\x93garbage", "a")).code == "malformed"
        wrong = encode(AppRequest(request_id="r-1", tensors={"x": np.zeros((3, 3), np.float32)}, deadline_s=1.0))
        reply = await ask(wrong, "b")
        assert reply.code == "bad_tensor" and reply.request_id == "r-1"
        # no response topic, or one outside this device's app namespace: not answered (logged and counted)
        await raw.publish(topics.device_infer(deviced.device_id), wrong, qos=1)
        victim = topics.device_responses("victim")
        await raw.subscribe(victim, qos=1)
        await raw.publish(topics.device_infer(deviced.device_id), wrong, qos=1, properties=session.request_properties(
            response_topic=victim, correlation="c", expiry_s=5))
        with pytest.raises(RemoteError, match="bad_tensor"):
            await app.infer(np.zeros(5, np.float32), deadline=1.0)
        answer = await app.infer(np.zeros((1, 1, 28, 28), np.float32), deadline=1.0)
        assert answer.where == "device" and answer.fallback == "no_edge"
        with pytest.raises(TimeoutError):  # nothing was published to the victim's topic
            await asyncio.wait_for(anext(messages), 0.5)


def test_deviced_run_serves_apps_metrics_and_the_cli(broker: Broker, prefix: str, tmp_path: Path) -> None:
    metrics_port = free_port()
    conf = tmp_path / "deviced.toml"
    conf.write_text(f'[deviced]\ndevice_id = "pi-run"\ntopic_prefix = "{prefix}"\nprobe_interval_s = 0\n'
                    f'metrics_port = {metrics_port}\n\n[broker]\nport = {broker.port}\n')
    np.save(tmp_path / "x.npy", load_fashion_mnist("test")[0][:3])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    daemon = subprocess.Popen([sys.executable, "-m", "deviced.cli", "run", "--config", str(conf)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        assert daemon.stdout is not None
        for line in daemon.stdout:
            if '"mqtt_connected"' in line:
                break
        out = subprocess.run([sys.executable, "-m", "deviced.cli", "infer", str(tmp_path / "x.npy"), "--config",
                              str(conf), "--via-daemon", "--deadline", "1s", "--json"],
                             capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        records = [json.loads(line) for line in out.stdout.splitlines()]
        assert len(records) == 3 and all(r["met"] and r["where"] == "device" for r in records)
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert 'coinfer_device_requests_total{where="device"} 3.0' in text
    finally:
        daemon.terminate()
        assert daemon.wait(timeout=20) == 0


async def test_a_one_shot_client_never_displaces_the_running_daemon(deviced: DevicedConfig, bundle: Bundle) -> None:
    """`deviced infer --config` beside `deviced run` of the same device: its own client id, no status, no app
    topic (mosquitto would otherwise close the daemon's connection, and the daemon would look offline)."""
    from deviced.service import Client

    topics = Topics(deviced.topic_prefix)
    x = preprocess(load_fashion_mnist("test")[0][:3])
    async with Client(deviced, daemon=False) as one_shot:
        await asyncio.sleep(0.5)
        outcomes = [await one_shot.infer(xi, deadline=1.0) for xi in x]
    assert len(outcomes) == 3
    async with session.client(deviced.broker, identifier="status-reader") as c:
        await c.subscribe(topics.device_status(deviced.device_id), qos=1)
        async with asyncio.timeout(5):
            async for message in c.messages:
                assert isinstance(message.payload, bytes)
                status = decode(message.payload)
                break
    assert isinstance(status, Status) and status.state == "online"
    async with RemoteClient(deviced.broker, deviced.device_id, prefix=deviced.topic_prefix) as app:
        answer = await app.infer(x[0], deadline=1.0)  # the daemon still serves its applications
    assert answer.exit >= 1
