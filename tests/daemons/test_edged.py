"""edged against a real broker: bad input gets error replies, the daemon keeps serving, the pool shares work."""

import asyncio
import contextlib
import uuid

import aiomqtt
import msgpack
import numpy as np

from edged.config import EdgedConfig
from models.bundle import Bundle
from protocol import session
from protocol.errors import ErrorCode
from protocol.messages import ErrorReply, InferRequest, InferResult, Message, Probe, ProbeReply, decode, encode
from protocol.topics import Topics
from tests.daemons.conftest import Broker, EdgeProcess, wait_online


async def _ask(broker: Broker, topic: str, payload: bytes, *, timeout: float = 5.0) -> Message:
    """Send as the device named by ``topic`` and wait on that device's response topic."""
    prefix = topic.split("/edge/")[0].split("/pool/")[0]
    reply_topic = Topics(prefix).device_responses(Topics(prefix).device_id_of(topic))
    async with aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
        await c.subscribe(reply_topic, qos=1)
        props = session.request_properties(response_topic=reply_topic, correlation="c-1", expiry_s=timeout)
        await c.publish(topic, payload, qos=1, properties=props)
        async with asyncio.timeout(timeout):
            async for message in c.messages:
                assert isinstance(message.payload, bytes)
                return decode(message.payload)
    raise AssertionError("no reply")


def _request(b: Bundle, **kw: object) -> InferRequest:
    args: dict[str, object] = {"request_id": uuid.uuid4().hex[:16], "device_id": "pi-9", "bundle": b.digest,
                               "exit": 5, "cut": 0, "budget_s": 2.0,
                               "tensors": {"input": np.zeros((1, 1, 28, 28), np.float32)}}
    args.update(kw)
    return InferRequest(**args)  # type: ignore[arg-type]


async def test_bad_requests_get_error_replies_and_edged_keeps_serving(broker: Broker, prefix: str,
                                                                      edge: EdgeProcess, bundle: Bundle) -> None:
    await wait_online(broker, prefix, "edge-a")
    topic = Topics(prefix).edge_request("edge-a", "pi-9")
    good = encode(_request(bundle))
    body = msgpack.unpackb(good, raw=False)
    wrong_version = msgpack.packb({**body, "v": 99}, use_bin_type=True)
    wrong_shape = encode(_request(bundle, tensors={"input": np.zeros((1, 1, 27, 28), np.float32)}))
    wrong_name = encode(_request(bundle, tensors={"x": np.zeros((1, 1, 28, 28), np.float32)}))
    short_data = msgpack.packb({**body, "tensors": {"input": {"dtype": "float32", "shape": [1, 1, 28, 28],
                                                              "data": b"\x00" * 100}}}, use_bin_type=True)
    oversized = msgpack.packb({**body, "tensors": {"input": {"dtype": "float32", "shape": [1 << 20, 1 << 10],
                                                             "data": b""}}}, use_bin_type=True)
    cases = [
        (b"\x93garbage", ErrorCode.MALFORMED),
        (wrong_version, ErrorCode.VERSION),
        (wrong_shape, ErrorCode.BAD_TENSOR),
        (wrong_name, ErrorCode.BAD_TENSOR),
        (short_data, ErrorCode.BAD_TENSOR),
        (oversized, ErrorCode.TOO_LARGE),
        (encode(_request(bundle, bundle="0" * 64)), ErrorCode.UNKNOWN_BUNDLE),
        (encode(_request(bundle, exit=9)), ErrorCode.BAD_PLAN),
        (encode(_request(bundle, cut=99)), ErrorCode.BAD_PLAN),
        (encode(_request(bundle, budget_s=1e-6)), ErrorCode.BUSY),
    ]
    for payload, code in cases:
        reply = await _ask(broker, topic, payload)
        assert isinstance(reply, ErrorReply) and reply.code == code, (code, reply)
    reply = await _ask(broker, topic, good)
    assert isinstance(reply, InferResult) and reply.outputs["exit5"].shape == (1, 10)
    probe = await _ask(broker, Topics(prefix).edge_probe("edge-a", "pi-9"),
                       encode(Probe(probe_id="p1", device_id="pi-9", padding=bytes(5000))))
    assert isinstance(probe, ProbeReply) and probe.size == 5000


async def test_split_request_runs_the_tail(broker: Broker, prefix: str, edge: EdgeProcess, bundle: Bundle) -> None:
    await wait_online(broker, prefix, "edge-a")
    x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
    from models.runtime import StageRunner
    from planner.core import Segment

    runner = StageRunner(bundle)
    after4 = next(c for c in bundle.exit(2).cuts if c.index == 4)
    mid = runner.stage(Segment(2, frozenset({"input"}), after4.tensors)).run({"input": x})
    whole = runner.stage(runner.whole(2)).run({"input": x})
    reply = await _ask(broker, Topics(prefix).edge_request("edge-a", "pi-9"),
                       encode(_request(bundle, exit=2, cut=4, tensors=mid)))
    assert isinstance(reply, InferResult)
    assert np.array_equal(reply.outputs["exit2"], whole["exit2"])


async def test_two_edged_share_the_pool(broker: Broker, prefix: str, bundle: Bundle) -> None:
    edges = [EdgeProcess(EdgedConfig(edge_id=f"edge-{i}", topic_prefix=prefix, broker=broker.config))
             for i in range(2)]
    try:
        for i in range(2):
            await wait_online(broker, prefix, f"edge-{i}")
        await asyncio.sleep(0.3)  # both shared subscriptions in place
        seen = []
        for _ in range(20):
            reply = await _ask(broker, Topics(prefix).pool_request("pi-9"), encode(_request(bundle)))
            assert isinstance(reply, InferResult)
            seen.append(reply.edge_id)
        assert set(seen) == {"edge-0", "edge-1"}, seen
    finally:
        for e in edges:
            await e.stop()


async def test_replies_go_to_the_sender_only(broker: Broker, prefix: str, edge: EdgeProcess, bundle: Bundle) -> None:
    """A request whose response-topic property names another device is answered on the sender's own topic."""
    await wait_online(broker, prefix, "edge-a")
    t = Topics(prefix)
    victim, own = t.device_responses("pi-victim"), t.device_responses("pi-9")
    async with aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
        await c.subscribe(victim, qos=1)
        await c.subscribe(own, qos=1)
        props = session.request_properties(response_topic=victim, correlation="c-2", expiry_s=5)
        await c.publish(t.edge_request("edge-a", "pi-9"), encode(_request(bundle)), qos=1, properties=props)
        got = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.5):
                async for message in c.messages:
                    got.append(str(message.topic))
    assert got == [own], got
