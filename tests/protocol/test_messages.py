import contextlib

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import PROTOCOL_VERSION
from protocol.errors import ErrorCode, MalformedMessage, MessageTooLarge, ProtocolError, TensorError, VersionMismatch
from protocol.messages import (
    Advert,
    AppRequest,
    AppResult,
    ErrorReply,
    InferRequest,
    InferResult,
    Message,
    Probe,
    ProbeReply,
    Status,
    decode,
    encode,
)
from protocol.tensors import decode_tensor, encode_tensor
from protocol.topics import Topics

DIGEST = "ab" * 32


def _request(**kw: object) -> InferRequest:
    args: dict[str, object] = {"request_id": "r-1", "device_id": "pi-1", "bundle": DIGEST, "exit": 3, "cut": 4,
                               "tensors": {"lrn1": np.arange(12, dtype=np.float32).reshape(1, 3, 4)},
                               "budget_s": 0.25}
    args.update(kw)
    return InferRequest(**args)  # type: ignore[arg-type]


MESSAGES: list[Message] = [
    _request(),
    InferResult(request_id="r-1", edge_id="edge-a", exit=3, outputs={"exit3": np.ones((1, 10), np.float32)},
                queue_s=0.001, compute_s=0.002),
    ErrorReply(request_id="r-1", code=ErrorCode.BUSY, message="queue full", sender="edge-a"),
    ErrorReply(request_id="", code=ErrorCode.MALFORMED, message="unreadable", sender="edge-a"),
    Probe(probe_id="p-1", device_id="pi-1", padding=b"\x00" * 1000),
    ProbeReply(probe_id="p-1", edge_id="edge-a", size=1000),
    Advert(edge_id="edge-a", bundles={DIGEST: "fmnist"}, latency_model={"format": "coinfer.latency/1"},
           queue_depth=2, service_s=0.004, workers=1),
    Status(state="online", sender="edge-a"),
    AppRequest(request_id="a-1", tensors={"input": np.zeros((1, 1, 28, 28), np.float32)}, deadline_s=0.3),
    AppResult(request_id="a-1", outputs={"logits": np.ones((1, 10), np.float32)}, exit=5, where="split",
              latency_s=0.05, deadline_s=0.3, fallback="", edge_id="edge-a"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    again = decode(encode(msg))
    assert type(again) is type(msg)
    for name in ("tensors", "outputs"):
        if hasattr(msg, name):
            for k, v in getattr(msg, name).items():
                assert np.array_equal(getattr(again, name)[k], v) and getattr(again, name)[k].dtype == v.dtype
    plain = {k: v for k, v in vars_of(msg).items() if k not in ("tensors", "outputs")}
    assert plain == {k: v for k, v in vars_of(again).items() if k not in ("tensors", "outputs")}


def vars_of(msg: Message) -> dict[str, object]:
    return {f: getattr(msg, f) for f in msg.__dataclass_fields__}


def test_decoded_tensor_is_zero_copy_and_read_only() -> None:
    raw = encode(_request())
    tensor = decode(raw).tensors["lrn1"]  # type: ignore[union-attr]
    assert not tensor.flags.writeable and not tensor.flags.owndata


def _body(**changes: object) -> bytes:
    body = msgpack.unpackb(encode(_request()), raw=False)
    body.update(changes)
    return msgpack.packb({k: v for k, v in body.items() if v is not None}, use_bin_type=True)


@pytest.mark.parametrize(("raw", "error"), [
    (b"", MalformedMessage),
    (b"\xc1\xc1\xc1", MalformedMessage),
    (msgpack.packb([1, 2, 3]), MalformedMessage),
    (_body(v=PROTOCOL_VERSION + 1), VersionMismatch),
    (_body(v=None), VersionMismatch),
    (_body(kind="teleport"), MalformedMessage),
    (_body(surprise=1), MalformedMessage),
    (_body(exit=0), MalformedMessage),
    (_body(exit=True), MalformedMessage),
    (_body(budget_s=float("nan")), MalformedMessage),
    (_body(bundle="not-a-digest"), MalformedMessage),
    (_body(device_id="pi/../#"), MalformedMessage),
    (_body(tensors={}), MalformedMessage),
    (_body(tensors={"x": {"dtype": "float32", "shape": [2], "data": b"\x00" * 7}}), TensorError),
    (_body(tensors={"x": {"dtype": "object", "shape": [1], "data": b"\x00" * 8}}), TensorError),
    (_body(tensors={"x": {"dtype": "float32", "shape": [-1], "data": b""}}), TensorError),
    (_body(tensors={"x": {"dtype": "float32", "shape": [1 << 30, 1 << 10], "data": b""}}), MessageTooLarge),
    (_body(tensors={"x": {"dtype": "float32", "shape": [1], "data": b"\x00" * 4, "pickle": 1}}), TensorError),
])
def test_bad_envelopes_are_rejected(raw: bytes, error: type[ProtocolError]) -> None:
    with pytest.raises(error):
        decode(raw)


def test_unexpected_kind_is_rejected() -> None:
    with pytest.raises(MalformedMessage, match="unexpected"):
        decode(encode(MESSAGES[1]), expect=InferRequest)


def test_expected_shape_and_dtype() -> None:
    wire = encode_tensor(np.zeros((1, 4), np.float32))
    assert decode_tensor(wire, shape=[1, 4], dtype="float32").shape == (1, 4)
    with pytest.raises(TensorError, match="expected shape"):
        decode_tensor(wire, shape=[4, 1])
    with pytest.raises(TensorError, match="expected dtype"):
        decode_tensor(wire, dtype="uint8")
    with pytest.raises(TensorError, match="not allowed"):
        encode_tensor(np.zeros(2, dtype=np.complex64))


def test_big_endian_input_is_sent_little_endian() -> None:
    a = np.arange(4, dtype=">f4")
    assert np.array_equal(decode_tensor(encode_tensor(a)), a)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_escape_as_other_errors(raw: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode(raw)


def test_topics() -> None:
    t = Topics("test-1")
    assert t.edge_request("edge-a", "pi-1") == "test-1/edge/edge-a/req/pi-1"
    assert t.pool_requests() == "$share/edged/test-1/pool/req/+"
    assert t.edge_id_of("test-1/edge/edge-a/advert") == "edge-a"
    assert t.device_id_of("test-1/edge/edge-a/req/pi-1") == "pi-1"
    with pytest.raises(MalformedMessage):
        t.edge_request("edge/a", "pi-1")
    with pytest.raises(MalformedMessage):
        t.device_responses("#")
    with pytest.raises(ValueError):
        Topics("bad/#")
    assert t.is_app_response("pi-1", "test-1/dev/pi-1/app/ui")
    assert not t.is_app_response("pi-1", "test-1/dev/pi-2/app/ui")
    assert not t.is_app_response("pi-1", "test-1/dev/pi-1/app/ui/x")
    assert not t.is_app_response("pi-1", "test-1/dev/pi-1/resp")


def test_app_request_carries_one_input() -> None:
    with pytest.raises(MalformedMessage, match="exactly one"):
        AppRequest(request_id="a", tensors={"a": np.zeros(1, np.float32), "b": np.zeros(1, np.float32)})
    with pytest.raises(MalformedMessage, match="where"):
        AppResult(request_id="a", outputs={"l": np.zeros(1, np.float32)}, exit=1, where="moon", latency_s=0,
                  deadline_s=0)
