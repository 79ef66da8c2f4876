"""Tensor encoding: a small header (dtype from a whitelist, shape) and the raw little-endian bytes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from protocol.errors import MessageTooLarge, TensorError

DTYPES = ("float32", "float16", "uint8", "int8", "int32", "int64")
MAX_TENSOR_BYTES = 64 * 1024 * 1024
MAX_DIMS = 8


def encode_tensor(array: npt.NDArray[Any]) -> dict[str, Any]:
    """The wire form of ``array``: ``{"dtype", "shape", "data"}`` with little-endian ``data``."""
    dtype = np.dtype(array.dtype).newbyteorder("<")
    if dtype.name not in DTYPES:
        raise TensorError(f"dtype {array.dtype} not allowed on the wire; use one of {DTYPES}")
    # a byte view, not a copy: msgpack packs any buffer as bin, so the data is copied once, into the message
    data = np.ascontiguousarray(array, dtype=dtype).data.cast("B")
    if data.nbytes > MAX_TENSOR_BYTES:
        raise MessageTooLarge(f"tensor of {data.nbytes} bytes exceeds {MAX_TENSOR_BYTES}")
    return {"dtype": dtype.name, "shape": list(array.shape), "data": data}


def decode_tensor(obj: Any, *, shape: Sequence[int] | None = None, dtype: str | None = None) -> npt.NDArray[Any]:
    """Validate and decode a wire tensor without copying (the result is read-only).

    ``shape``/``dtype`` are what the receiver expects (e.g. the cut tensor the plan names); a mismatch
    raises ``TensorError`` before any compute sees the data.
    """
    if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "data"}:
        raise TensorError("a tensor is a map with exactly 'dtype', 'shape' and 'data'")
    name, dims, data = obj["dtype"], obj["shape"], obj["data"]
    if name not in DTYPES:
        raise TensorError(f"dtype {name!r} not allowed; expected one of {DTYPES}")
    if (not isinstance(dims, list) or len(dims) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims)):
        raise TensorError(f"bad shape {dims!r}")
    if not isinstance(data, bytes | memoryview):  # bytes off the wire; a byte view straight from encode_tensor
        raise TensorError("tensor data must be bytes")
    dt = np.dtype(name).newbyteorder("<")
    expected = int(np.prod(dims, dtype=np.int64)) * dt.itemsize
    if expected > MAX_TENSOR_BYTES:
        raise MessageTooLarge(f"tensor of {expected} bytes exceeds {MAX_TENSOR_BYTES}")
    if len(data) != expected:
        raise TensorError(f"shape {dims} of {name} needs {expected} bytes, got {len(data)}")
    if dtype is not None and name != dtype:
        raise TensorError(f"expected dtype {dtype}, got {name}")
    if shape is not None and list(shape) != dims:
        raise TensorError(f"expected shape {list(shape)}, got {dims}")
    return np.frombuffer(data, dtype=dt).reshape(dims)
