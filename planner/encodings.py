"""What it costs to send a cut's tensors encoded (``protocol.tensors.ENCODINGS``): compute on both sides.

Encoding and decoding are element-wise passes over the tensor, so they are costed as ReLU-like layers of each
host's latency model over the float32 tensor's bytes: the same speed model, speed factor and margins as its
layers. The pass counts are measured: each encoder's and decoder's time (``protocol.tensors``) over numpy's ReLU
on the same 1 MB ReLU output, on the build machine (float16 is slow: numpy converts it in software; zstd level 1
on sparse ReLU outputs).
"""

from __future__ import annotations

from planner.errors import PlannerError
from planner.latency import LatencyModel

# name -> (encode passes on the sender, decode passes on the receiver), per byte of the float32 tensor
PASSES: dict[str, tuple[float, float]] = {
    "float16": (12.0, 10.0),
    "int8": (2.0, 1.0),
    "float32+zstd": (30.0, 8.0),
    "float16+zstd": (19.0, 11.0),
    "int8+zstd": (10.0, 2.0),
}


def cost_s(name: str, plain_bytes: float, sender: LatencyModel, receiver: LatencyModel) -> tuple[float, float]:
    """(encode seconds on ``sender``, decode seconds on ``receiver``) of ``plain_bytes`` of float32 tensors."""
    if name not in PASSES:
        raise PlannerError(f"unknown encoding {name!r}; known: {', '.join(PASSES)}")
    enc, dec = PASSES[name]
    return _passes(sender, enc, plain_bytes), _passes(receiver, dec, plain_bytes)


def _passes(model: LatencyModel, passes: float, nbytes: float) -> float:
    """``passes`` element-wise passes over ``nbytes``: a ReLU's per-byte time each, its fixed time once."""
    def relu(b: float) -> float:
        return model.predict("relu", {"input_bytes": b, "output_bytes": b, "flops": b / 4})

    fixed = relu(0.0)
    return fixed + passes * max(relu(nbytes) - fixed, 0.0)
