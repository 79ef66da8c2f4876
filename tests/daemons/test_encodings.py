"""Encoded activations end to end: deviced chooses an encoding at a slow uplink, edged decodes it, and the answer is
exactly the tail run on what crossed; a wrongly declared tensor gets an error reply and edged keeps serving."""

from __future__ import annotations

import aiomqtt
import msgpack
import numpy as np

from deviced.config import DevicedConfig
from deviced.service import Client
from models import graph
from models.bundle import Bundle
from models.data import load_fashion_mnist, preprocess
from protocol.messages import ErrorReply, InferRequest, InferResult, encode
from protocol.tensors import PLAIN, roundtrip
from protocol.topics import Topics
from tests.daemons.conftest import Broker, EdgeProcess, wait_online
from tests.daemons.test_fuzz import _ask_all


def _tail(bundle: Bundle, exit_index: int, tensors: dict[str, np.ndarray]) -> np.ndarray:
    """What the edge computes from the crossing tensors ``tensors`` to the exit's output."""
    from models.ort import onnxruntime as ort

    model = graph.segment(bundle.exit_model(exit_index), sorted(tensors), [bundle.exit(exit_index).output])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, tensors)[0]


async def test_a_slow_uplink_sends_encoded_tensors_and_the_answer_is_the_tail_on_them(
        broker: Broker, prefix: str, edge: EdgeProcess, bundle: Bundle) -> None:
    assert any(c.encodings for ex in bundle.exits for c in ex.cuts), "the shipped bundle has measured encodings"
    x = preprocess(load_fashion_mnist("test")[0][:8])
    cfg = DevicedConfig(device_id="pi-enc", topic_prefix=prefix, broker=broker.config, probe_interval_s=0,
                        initial_bandwidth="30kbps", emulate_uplink="30kbps", plan_quantile=0.0)
    async with Client(cfg) as client:
        assert await client.wait_for_edge(5)
        outcomes = [await client.infer(x[i], deadline=0.4) for i in range(len(x))]
        runner = client.device.runner
        encoded = [(i, o) for i, o in enumerate(outcomes) if o.plan.encoding != PLAIN and o.fallback is None]
        assert encoded, [o.record() for o in outcomes]
        for i, o in encoded:
            head = o.plan.step("device")
            feed = {bundle.input_name: x[i].reshape(bundle.input_shape)}
            crossing = runner.stage(head.segment).run(feed) if head else feed
            sent = {k: roundtrip(np.asarray(v), o.plan.encoding) for k, v in crossing.items()}
            tail = runner.stage(o.plan.step("edge").segment).run(sent)  # as edged runs it
            assert np.array_equal(o.logits, next(iter(tail.values()))), o.record()
    assert all(o.latency_s <= 0.4 * 1.5 for o in outcomes)


async def test_a_wrongly_declared_tensor_is_an_error_and_the_edge_keeps_serving(
        broker: Broker, prefix: str, edge: EdgeProcess, bundle: Bundle) -> None:
    t = Topics(prefix)
    x = preprocess(load_fashion_mnist("test")[0][:1]).reshape(bundle.input_shape)
    good = encode(InferRequest(request_id="enc-1", device_id="pi-raw", bundle=bundle.digest, exit=1, cut=0,
                               tensors={bundle.input_name: x}, budget_s=5.0, encoding="int8+zstd"))
    body = msgpack.unpackb(good)
    wrong = []
    for key, value in (("scale", -1.0), ("zero", 300), ("enc", "float16"), ("data", b"\x28\xb5\x2f\xfd" * 4)):
        tensor = {**body["tensors"][bundle.input_name], key: value}
        wrong.append(msgpack.packb({**body, "tensors": {bundle.input_name: tensor}}))
    await wait_online(broker, prefix, "edge-a")
    async with aiomqtt.Client("127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
        await c.subscribe(t.device_responses("pi-raw"), qos=1)
        answers = await _ask_all(c, t.edge_request("edge-a", "pi-raw"), t.device_responses("pi-raw"), [*wrong, good])
    assert not edge.task.done()
    errors, [result] = answers[:-1], answers[-1:]
    assert all(isinstance(e, ErrorReply) for e in errors), errors
    messages = " | ".join(e.message for e in errors if isinstance(e, ErrorReply))
    for what in ("scale", "zero point", "declares float16", "zstd"):
        assert what in messages, messages
    assert isinstance(result, InferResult) and result.request_id == "enc-1"
    expected = _tail(bundle, 1, {bundle.input_name: roundtrip(x, "int8")})
    assert np.allclose(next(iter(result.outputs.values())), expected, atol=1e-5)
