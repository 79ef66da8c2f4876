"""Tensor encoding: a small header (dtype from a whitelist, shape) and the raw little-endian bytes.

A float32 tensor may also travel *encoded* (``ENCODINGS``): as float16, or as int8 with a per-tensor scale and
zero point (``x ~ scale * (q - zero)``; zero is always exactly representable, so a ReLU's zeros stay zeros), and
either of them, or the plain bytes, compressed with zstd (level 1). The map then says so: ``enc`` (the encoding's
name), and for int8 ``scale`` and ``zero``; ``dtype`` and ``shape`` stay those of the float32 tensor the receiver
gets back. Every declaration is checked against the bytes before anything is decoded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import zstandard

from protocol.errors import MessageTooLarge, TensorError

DTYPES = ("float32", "float16", "uint8", "int8", "int32", "int64")
MAX_TENSOR_BYTES = 64 * 1024 * 1024
MAX_DIMS = 8
PLAIN = "float32"
# the precision a float32 tensor crosses at, optionally followed by "+zstd" (lossless, on those bytes)
ENCODINGS = ("float32", "float16", "int8", "float32+zstd", "float16+zstd", "int8+zstd")
ENCODED = ENCODINGS[1:]  # every encoding but plain float32
_STORED: dict[str, np.dtype[Any]] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "int8": np.dtype("i1")}
_KEYS = frozenset({"dtype", "shape", "data"})
_ZSTD_LEVEL = 1
_compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)  # thread-safe for one-shot compress()


def encode_tensor(array: npt.NDArray[Any], encoding: str = PLAIN) -> dict[str, Any]:
    """The wire form of ``array``: ``{"dtype", "shape", "data"}`` with little-endian ``data``; with an
    ``encoding`` other than plain float32, also ``enc`` (and ``scale``, ``zero`` for int8)."""
    if encoding == PLAIN:
        dtype = np.dtype(array.dtype).newbyteorder("<")
        if dtype.name not in DTYPES:
            raise TensorError(f"dtype {array.dtype} not allowed on the wire; use one of {DTYPES}")
        # a byte view, not a copy: msgpack packs any buffer as bin, so the data is copied once, into the message
        data = np.ascontiguousarray(array, dtype=dtype).data.cast("B")
        _check_size(data.nbytes)
        return {"dtype": dtype.name, "shape": list(array.shape), "data": data}
    if encoding not in ENCODINGS:
        raise TensorError(f"unknown encoding {encoding!r}; known: {', '.join(ENCODINGS)}")
    if np.dtype(array.dtype) != np.float32:
        raise TensorError(f"only float32 tensors are encoded; this one is {array.dtype}")
    _check_size(array.nbytes)
    precision, _, codec = encoding.partition("+")
    x = np.ascontiguousarray(array, dtype="<f4")
    wire: dict[str, Any] = {"dtype": "float32", "shape": list(array.shape), "enc": encoding}
    if precision == "int8":
        q, wire["scale"], wire["zero"] = quantize(x)
        stored: npt.NDArray[Any] = q
    else:
        stored = x.astype(_STORED[precision], copy=False)
    data = stored.data.cast("B")
    wire["data"] = _compressor.compress(data) if codec else data
    return wire


def quantize(x: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.int8], float, int]:
    """Per-tensor affine int8: (q, scale, zero) with ``x ~ scale * (q - zero)`` and 0 exactly representable."""
    q, scale, zero = _quantize_rows(x.reshape(1, -1))
    return q.reshape(x.shape), float(scale[0]), int(zero[0])


def roundtrip(batch: npt.NDArray[np.float32], encoding: str) -> npt.NDArray[np.float32]:
    """What each sample of ``batch`` (its first axis) is after crossing in ``encoding``, exactly as
    ``decode_tensor(encode_tensor(sample, encoding))`` makes it, for a whole batch at once (to measure accuracy)."""
    precision = encoding.partition("+")[0]
    if encoding not in ENCODINGS:
        raise TensorError(f"unknown encoding {encoding!r}; known: {', '.join(ENCODINGS)}")
    if precision == "float16":
        return batch.astype("<f2").astype(np.float32)
    if precision == "int8":
        q, scale, zero = _quantize_rows(batch.reshape(len(batch), -1))
        out = (q.astype(np.float32) - zero[:, None].astype(np.float32)) * scale[:, None].astype(np.float32)
        return out.reshape(batch.shape)
    return batch


def _quantize_rows(rows: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float64],
                                                            npt.NDArray[np.int64]]:
    """int8 of each row on its own: (q, scale per row, zero point per row)."""
    lo = np.minimum(rows.min(axis=1, initial=0.0), 0.0).astype(np.float64)
    hi = np.maximum(rows.max(axis=1, initial=0.0), 0.0).astype(np.float64)
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise TensorError("a tensor with inf or nan cannot be quantized")
    scale = np.where(hi > lo, np.maximum((hi - lo) / 255.0, 1e-30), 1.0)  # a normal float32 whatever the range
    zero = np.clip(np.rint(-128 - lo / scale), -128, 127).astype(np.int64)
    q = rows * (1.0 / scale).astype(np.float32)[:, None]  # float32 throughout, in place: ~1 ms per MB here
    np.rint(q, out=q)
    q += zero.astype(np.float32)[:, None]
    np.clip(q, -128, 127, out=q)
    return q.astype(np.int8), scale, zero


def decode_tensor(obj: Any, *, shape: Sequence[int] | None = None, dtype: str | None = None) -> npt.NDArray[Any]:
    """Validate and decode a wire tensor (plain: without copying, read-only; encoded: back to float32).

    ``shape``/``dtype`` are what the receiver expects (e.g. the cut tensor the plan names); a mismatch
    raises ``TensorError`` before any compute sees the data.
    """
    if not isinstance(obj, dict) or not set(obj) >= _KEYS:
        raise TensorError("a tensor is a map with 'dtype', 'shape' and 'data'")
    encoding = obj.get("enc", PLAIN)
    if encoding not in ENCODINGS or ("enc" in obj and encoding == PLAIN):
        raise TensorError(f"unknown encoding {encoding!r}; known: {', '.join(ENCODED)}")
    precision, _, codec = encoding.partition("+")
    extra = {"enc", "scale", "zero"} if precision == "int8" else {"enc"} if "enc" in obj else set()
    if set(obj) != _KEYS | extra:
        raise TensorError(f"a tensor encoded as {encoding} has exactly the keys {sorted(_KEYS | extra)}, "
                          f"got {sorted(obj)}")
    name, dims, data = obj["dtype"], obj["shape"], obj["data"]
    if name not in DTYPES:
        raise TensorError(f"dtype {name!r} not allowed; expected one of {DTYPES}")
    if "enc" in obj and name != "float32":
        raise TensorError(f"only float32 tensors are encoded; this one says {name}")
    if (not isinstance(dims, list) or len(dims) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims)):
        raise TensorError(f"bad shape {dims!r}")
    if not isinstance(data, bytes | memoryview):  # bytes off the wire; a byte view straight from encode_tensor
        raise TensorError("tensor data must be bytes")
    if dtype is not None and name != dtype:
        raise TensorError(f"expected dtype {dtype}, got {name}")
    if shape is not None and list(shape) != dims:
        raise TensorError(f"expected shape {list(shape)}, got {dims}")
    count = int(np.prod(dims, dtype=np.int64))
    _check_size(count * np.dtype(name).itemsize)
    stored: np.dtype[Any] = _STORED[precision] if "enc" in obj else np.dtype(name).newbyteorder("<")
    expected = count * stored.itemsize
    if codec:
        data = _decompress(data, expected, encoding)
    if len(data) != expected:
        raise TensorError(f"shape {dims} as {encoding if 'enc' in obj else name} needs {expected} bytes, "
                          f"got {len(data)}")
    values: npt.NDArray[Any] = np.frombuffer(data, dtype=stored).reshape(dims)
    if precision == "int8":
        scale, zero = obj["scale"], obj["zero"]
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not (math.isfinite(scale) and scale > 0):
            raise TensorError(f"int8 scale must be a finite number > 0, got {scale!r}")
        if isinstance(zero, bool) or not isinstance(zero, int) or not -128 <= zero <= 127:
            raise TensorError(f"int8 zero point must be an integer in -128..127, got {zero!r}")
        out: npt.NDArray[np.float32] = (values.astype(np.float32) - np.float32(zero)) * np.float32(scale)
        return out
    return values.astype(np.float32) if precision == "float16" else values


def _decompress(data: bytes | memoryview, expected: int, encoding: str) -> bytes:
    """zstd bytes that must expand to exactly ``expected`` bytes (checked from the frame header first, so that a
    frame claiming more is never expanded)."""
    try:
        size = zstandard.frame_content_size(data)
        if size != expected:
            raise TensorError(f"{encoding}: the zstd frame holds {size} bytes, the shape needs {expected}")
        out: bytes = zstandard.ZstdDecompressor().decompress(data, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise TensorError(f"{encoding}: not one valid zstd frame: {exc}") from exc
    return out


def _check_size(nbytes: int) -> None:
    if nbytes > MAX_TENSOR_BYTES:
        raise MessageTooLarge(f"tensor of {nbytes} bytes exceeds {MAX_TENSOR_BYTES}")
