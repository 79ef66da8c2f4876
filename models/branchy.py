"""The branchy AlexNet: a Fashion-MNIST classifier with five exits, in the spirit of Edgent's.

The architecture is data (layer specs) so that the torch module used for training and the ONNX graph
shipped in the bundle are built from one description.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
import onnx

from models.onnxbuild import ChainBuilder, LayerSpec, out_shape

INPUT_NAME = "input"
INPUT_SHAPE: tuple[int, ...] = (1, 28, 28)
NUM_CLASSES = 10
L = LayerSpec

# Main branch, in segments; exit i (1..4) branches off after segment i, exit 5 ends segment 5.
TRUNK: tuple[tuple[LayerSpec, ...], ...] = (
    (L(kind="conv", name="conv1", out=32, k=5, pad=2), L(kind="relu", name="relu1"),
     L(kind="pool", name="pool1", k=2, stride=2), L(kind="lrn", name="lrn1")),
    (L(kind="conv", name="conv2", out=128, k=5, pad=2), L(kind="relu", name="relu2"),
     L(kind="pool", name="pool2", k=2, stride=2), L(kind="lrn", name="lrn2")),
    (L(kind="conv", name="conv3", out=192, k=3, pad=1), L(kind="relu", name="relu3")),
    (L(kind="conv", name="conv4", out=192, k=3, pad=1), L(kind="relu", name="relu4")),
    (L(kind="conv", name="conv5", out=128, k=3, pad=1), L(kind="relu", name="relu5"),
     L(kind="pool", name="pool5", k=3, stride=2), L(kind="flatten", name="flatten5"),
     L(kind="dropout", name="drop6"), L(kind="fc", name="fc6", out=512), L(kind="relu", name="relu6"),
     L(kind="dropout", name="drop7"), L(kind="fc", name="fc7", out=256), L(kind="relu", name="relu7"),
     L(kind="fc", name="exit5", out=NUM_CLASSES)),
)
BRANCHES: tuple[tuple[LayerSpec, ...], ...] = (
    (L(kind="pool", name="b1_pool", k=3, stride=3), L(kind="flatten", name="b1_flatten"),
     L(kind="fc", name="exit1", out=NUM_CLASSES)),
    (L(kind="conv", name="b2_conv", out=32, k=3, pad=1), L(kind="relu", name="b2_relu"),
     L(kind="pool", name="b2_pool", k=2, stride=2), L(kind="flatten", name="b2_flatten"),
     L(kind="fc", name="exit2", out=NUM_CLASSES)),
    (L(kind="pool", name="b3_pool", k=3, stride=3), L(kind="flatten", name="b3_flatten"),
     L(kind="fc", name="exit3", out=NUM_CLASSES)),
    (L(kind="pool", name="b4_pool", k=3, stride=3), L(kind="flatten", name="b4_flatten"),
     L(kind="fc", name="b4_fc", out=64), L(kind="relu", name="b4_relu"),
     L(kind="fc", name="exit4", out=NUM_CLASSES)),
)
NUM_EXITS = len(TRUNK)
EXIT_NAMES = tuple(f"exit{i + 1}" for i in range(NUM_EXITS))


def exit_layers(index: int) -> tuple[LayerSpec, ...]:
    """Layers of exit ``index`` (0-based) in execution order: main branch up to it, then its branch."""
    trunk = tuple(layer for segment in TRUNK[: index + 1] for layer in segment)
    return trunk if index == NUM_EXITS - 1 else trunk + BRANCHES[index]


def segment_shapes() -> list[tuple[int, ...]]:
    """Shape of the main-branch tensor after each segment."""
    shapes: list[tuple[int, ...]] = []
    shape = INPUT_SHAPE
    for segment in TRUNK:
        for spec in segment:
            shape = out_shape(spec, shape)
        shapes.append(shape)
    return shapes


def build_onnx(weights: Mapping[str, npt.NDArray[np.float32]] | None = None, seed: int = 0) -> onnx.ModelProto:
    """The multi-exit ONNX model (outputs exit1..exit5); random weights when ``weights`` is None."""
    rng = np.random.default_rng(seed)
    builder = ChainBuilder(INPUT_NAME, INPUT_SHAPE)
    x, shape = INPUT_NAME, INPUT_SHAPE
    outputs: list[tuple[str, tuple[int, ...]]] = []
    for i, segment in enumerate(TRUNK):
        x, shape = builder.chain(x, shape, segment, weights, rng)
        if i < len(BRANCHES):
            outputs.append(builder.chain(x, shape, BRANCHES[i], weights, rng))
    outputs.append((x, shape))
    return builder.build(outputs, name="branchy_alexnet")
