"""Hypothesis-generated malformed envelopes, tensors and adverts thrown at edged and deviced through the broker.

Each daemon must answer every request that names a response topic (an error, or a result where the mutation
happened to stay valid), never crash, and still serve a good request afterwards. Inputs are drawn up front
(derandomized, so CI sees the same ones every run) and then sent in order; a failure names the input.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiomqtt
import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deviced.config import DevicedConfig
from deviced.service import Client, RemoteClient
from models.bundle import Bundle
from protocol import session
from protocol.messages import Advert, AppRequest, AppResult, ErrorReply, InferRequest, InferResult, decode, encode
from protocol.tensors import ENCODINGS
from protocol.topics import Topics
from tests.daemons.conftest import Broker, EdgeProcess, wait_online

EXAMPLES = 120
_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=64),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)
_tensor = st.fixed_dictionaries({
    "dtype": st.sampled_from(["float32", "float64", "int8", "uint8", "float16", "object", "<f4", "", "complex64"]),
    "shape": st.lists(st.integers(-2, 1 << 40), max_size=6) | _values,
    "data": st.binary(max_size=4096) | _values}, optional={  # an encoded tensor's declarations
    "enc": st.sampled_from([*ENCODINGS, "int4", ""]) | _values,
    "scale": st.floats() | _values, "zero": st.integers(-300, 300) | _values})


def mutations(valid: bytes) -> st.SearchStrategy[bytes]:
    """Byte garbage, and the valid envelope with a field replaced, dropped, added, or its tensors mangled."""
    body = msgpack.unpackb(valid, raw=False)
    keys = sorted(body)

    def replace(k: str, v: Any) -> bytes:
        return msgpack.packb({**body, k: v}, use_bin_type=True)

    def drop(k: str) -> bytes:
        return msgpack.packb({x: y for x, y in body.items() if x != k}, use_bin_type=True)

    def truncate(n: int) -> bytes:
        return valid[: n % max(len(valid), 1)]

    tensor_field = "tensors" if "tensors" in body else None
    strategies = [st.binary(max_size=512), st.builds(replace, st.sampled_from(keys), _values),
                  st.builds(drop, st.sampled_from(keys)), st.builds(replace, st.text(max_size=10), _values),
                  st.builds(truncate, st.integers(0, 1 << 16))]
    if tensor_field:
        strategies.append(st.builds(lambda name, t: replace(tensor_field, {name: t}),
                                    st.sampled_from(["input", "x", ""]), _tensor))
    return st.one_of(strategies)


def draw(strategy: st.SearchStrategy[bytes]) -> list[bytes]:
    drawn: list[bytes] = []

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(payload: bytes) -> None:
        drawn.append(payload)

    collect()
    return drawn


async def _ask_all(client: aiomqtt.Client, topic: str, reply_topic: str, payloads: list[bytes]) -> list[Any]:
    """Send each payload as a request answered on ``reply_topic``; return the decoded answers in order."""
    answers: list[Any] = []
    for i, payload in enumerate(payloads):
        corr = f"fz-{i}-{uuid.uuid4().hex[:6]}"
        props = session.request_properties(response_topic=reply_topic, correlation=corr, expiry_s=10)
        await client.publish(topic, payload, qos=1, properties=props)
        try:
            async with asyncio.timeout(10):
                async for message in client.messages:
                    if session.response_of(message)[1] == corr.encode():
                        assert isinstance(message.payload, bytes)
                        answers.append(decode(message.payload))
                        break
        except TimeoutError:
            raise AssertionError(f"no answer to fuzz input {i}: {payload[:200]!r}") from None
    return answers


async def test_edged_answers_every_fuzzed_request(broker: Broker, prefix: str, edge: EdgeProcess,
                                                  bundle: Bundle) -> None:
    t = Topics(prefix)
    good = encode(InferRequest(request_id="good", device_id="fz-1", bundle=bundle.digest, exit=1, cut=0,
                               budget_s=5.0, tensors={"input": np.zeros((1, 1, 28, 28), np.float32)}))
    payloads = draw(mutations(good))
    await wait_online(broker, prefix, "edge-a")
    async with aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
        await c.subscribe(t.device_responses("fz-1"), qos=1)
        answers = await _ask_all(c, t.edge_request("edge-a", "fz-1"), t.device_responses("fz-1"), payloads)
        assert not edge.task.done(), "edged stopped"
        [after] = await _ask_all(c, t.edge_request("edge-a", "fz-1"), t.device_responses("fz-1"), [good])
    assert len(answers) == len(payloads) == EXAMPLES
    assert all(isinstance(a, ErrorReply | InferResult) for a in answers)
    assert sum(isinstance(a, ErrorReply) for a in answers) > EXAMPLES // 2
    assert isinstance(after, InferResult)


async def test_deviced_answers_every_fuzzed_app_request_and_survives_fuzzed_adverts(
        broker: Broker, prefix: str) -> None:
    t = Topics(prefix)
    good = encode(AppRequest(request_id="good", tensors={"input": np.zeros((1, 28, 28), np.float32)},
                             deadline_s=1.0))
    advert = encode(Advert(edge_id="fz-edge", bundles={"0" * 64: "x"}, latency_model={}, queue_depth=0,
                           service_s=0.01, workers=1))
    requests, adverts = draw(mutations(good)), draw(mutations(advert))
    cfg = DevicedConfig(device_id="fz-dev", topic_prefix=prefix, broker=broker.config, probe_interval_s=0)
    reply_topic = t.app_responses("fz-dev", "fuzzer")
    async with Client(cfg) as device, \
            aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
        await asyncio.wait_for(device._connected.wait(), 10)
        for payload in adverts:  # no reply is due: deviced must only log and go on
            await c.publish(t.edge_advert("fz-edge"), payload, qos=1)
            await c.publish(t.edge_status("fz-edge"), payload, qos=1)
        await c.subscribe(reply_topic, qos=1)
        answers = await _ask_all(c, t.device_infer("fz-dev"), reply_topic, requests)
        assert not device._task.done(), "deviced stopped"
        async with RemoteClient(broker.config, "fz-dev", prefix=prefix) as app:
            after = await app.infer(np.zeros((1, 28, 28), np.float32), deadline=1.0)
    assert len(answers) == EXAMPLES
    assert all(isinstance(a, ErrorReply | AppResult) for a in answers)
    assert sum(isinstance(a, ErrorReply) for a in answers) > EXAMPLES // 2
    assert isinstance(after, AppResult) and after.where == "device"
