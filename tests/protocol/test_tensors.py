"""Encoded tensors on the wire: float16, int8 with scale and zero point, zstd; every declaration checked."""

from __future__ import annotations

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protocol.errors import MessageTooLarge, TensorError
from protocol.messages import InferRequest, decode, encode
from protocol.tensors import ENCODINGS, decode_tensor, encode_tensor, quantize, roundtrip

RELU = np.maximum(np.random.default_rng(0).standard_normal((1, 16, 8, 8)), 0).astype(np.float32)


def _bytes(wire: dict) -> int:
    return len(wire["data"])


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_every_encoding_round_trips_to_float32(encoding: str) -> None:
    wire = encode_tensor(RELU, encoding)
    back = decode_tensor(wire, shape=[1, 16, 8, 8], dtype="float32")
    assert back.dtype == np.float32 and back.shape == RELU.shape
    if encoding.startswith("float32"):
        assert np.array_equal(back, RELU)
    elif encoding.startswith("float16"):
        assert np.allclose(back, RELU, rtol=1e-3, atol=1e-4)
    else:
        _q, scale, _zero = quantize(RELU)
        assert np.abs(back - RELU).max() <= scale / 2 + 1e-6
        assert np.all(back[RELU == 0] == 0)  # a ReLU's zeros stay exactly zero


def test_encodings_cross_fewer_bytes() -> None:
    plain = _bytes(encode_tensor(RELU))
    assert _bytes(encode_tensor(RELU, "float16")) == plain // 2
    assert _bytes(encode_tensor(RELU, "int8")) == plain // 4
    # about half of a ReLU's outputs are zero: zstd shrinks each precision further
    for precision in ("float32", "float16", "int8"):
        assert _bytes(encode_tensor(RELU, precision + "+zstd")) < _bytes(encode_tensor(RELU, precision))


def test_an_encoded_request_decodes_to_the_float32_tensors() -> None:
    raw = encode(InferRequest(request_id="r", device_id="pi-1", bundle="0" * 64, exit=1, cut=2,
                              tensors={"relu1": RELU}, budget_s=1.0, encoding="int8+zstd"))
    msg = decode(raw, expect=InferRequest)
    assert isinstance(msg, InferRequest) and msg.encoding == "int8+zstd"
    assert np.abs(msg.tensors["relu1"] - RELU).max() <= quantize(RELU)[1] / 2 + 1e-6
    assert len(raw) < RELU.nbytes / 4


def test_a_request_whose_tensors_disagree_with_its_encoding_is_refused() -> None:
    body = encode(InferRequest(request_id="r", device_id="pi-1", bundle="0" * 64, exit=1, cut=2,
                               tensors={"relu1": RELU}, budget_s=1.0, encoding="float16"))
    import msgpack

    doc = msgpack.unpackb(body)
    doc["encoding"] = "int8"
    with pytest.raises(TensorError, match="declares float16, the request int8"):
        decode(msgpack.packb(doc))
    with pytest.raises(TensorError, match="unknown encoding"):
        InferRequest(request_id="r", device_id="pi-1", bundle="0" * 64, exit=1, cut=2, tensors={"x": RELU},
                     budget_s=1.0, encoding="int4")


def _int8(**changes: object) -> dict:
    wire = encode_tensor(RELU, "int8")
    wire["data"] = bytes(wire["data"])
    wire.update(changes)
    return wire


@pytest.mark.parametrize(("wire", "match"), [
    (_int8(scale=0.0), "scale"),
    (_int8(scale=float("nan")), "scale"),
    (_int8(scale=-1.0), "scale"),
    (_int8(scale=True), "scale"),
    (_int8(zero=128), "zero point"),
    (_int8(zero=1.5), "zero point"),
    (_int8(data=b"\x00" * 100), "needs 1024 bytes, got 100"),
    (_int8(enc="int4"), "unknown encoding"),
    (_int8(enc="float32"), "unknown encoding"),
    (_int8(dtype="int32"), "only float32"),
    (_int8(shape=[1, 16, 8, 9]), "needs 1152 bytes"),
    (_int8(pickle=1), "exactly the keys"),
    ({k: v for k, v in _int8().items() if k != "scale"}, "exactly the keys"),
    ({**encode_tensor(RELU, "float16"), "scale": 1.0}, "exactly the keys"),
    ({**encode_tensor(RELU, "float16"), "data": b"\x00" * 1024}, "needs 2048 bytes, got 1024"),
])
def test_a_wrong_declaration_is_a_clear_error(wire: dict, match: str) -> None:
    with pytest.raises(TensorError, match=match):
        decode_tensor(wire)


def test_a_zstd_frame_must_expand_to_exactly_the_declared_tensor() -> None:
    wire = encode_tensor(RELU, "int8+zstd")
    big = zstandard.ZstdCompressor().compress(bytes(1 << 24))  # 16 MB of zeros in a few hundred bytes
    for data, match in ((big, "holds 16777216 bytes, the shape needs 1024"),
                        (bytes(wire["data"]) + b"junk", "not one valid zstd frame"),
                        (bytes(wire["data"])[:-2], "not one valid zstd frame"),
                        (b"garbage", "not one valid zstd frame")):
        with pytest.raises(TensorError, match=match):
            decode_tensor({**wire, "data": data})


def test_only_float32_tensors_are_encoded() -> None:
    with pytest.raises(TensorError, match="only float32"):
        encode_tensor(np.zeros(4, np.int64), "int8")
    with pytest.raises(TensorError, match="unknown encoding"):
        encode_tensor(RELU, "bfloat16")
    with pytest.raises(TensorError, match="inf or nan"):
        encode_tensor(np.array([1.0, np.inf], np.float32), "int8")
    with pytest.raises(MessageTooLarge):
        decode_tensor({"dtype": "float32", "shape": [1 << 30, 1 << 10], "data": b"", "enc": "int8", "scale": 1.0,
                       "zero": 0})


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(max_dims=4, max_side=6),
                  elements=st.floats(-1e4, 1e4, width=32)))
def test_int8_error_is_at_most_half_a_step(x: np.ndarray) -> None:
    for encoding in ("int8", "int8+zstd"):
        back = decode_tensor(encode_tensor(x, encoding))
        _q, scale, _zero = quantize(x)
        assert back.shape == x.shape
        assert np.all(np.abs(back - x) <= scale / 2 + scale * 1e-3 + 1e-6)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_batch_round_trips_exactly_as_its_samples_cross_one_by_one(encoding: str) -> None:
    rng = np.random.default_rng(1)
    batch = (rng.standard_normal((5, 3, 4, 4)) * rng.uniform(0.01, 100, (5, 1, 1, 1))).astype(np.float32)
    batch[2] = 0.0
    batch[3] = np.abs(batch[3])
    expected = np.concatenate([decode_tensor(encode_tensor(batch[i:i + 1], encoding)) for i in range(5)])
    assert np.array_equal(roundtrip(batch, encoding), expected)
