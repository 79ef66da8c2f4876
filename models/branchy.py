"""The branchy AlexNet: Fashion-MNIST classifiers with five exits, in the spirit of Edgent's.

An architecture is data (layer specs) so that the torch module used for training and the ONNX graph
shipped in the bundle are built from one description. Two sizes ship:

- ``ALEXNET28`` on the native 28x28 images (119 MFLOPs, about 2 ms on a desktop core): the default.
- ``ALEXNET56`` on the images upsampled 2x to 56x56, twice as wide (1.6 GFLOPs, about 30 ms on a
  desktop core). Its stages take tens of ms on the host, as design.md asks of the testbed, so a CPU
  quota's 10 ms period is small against them; it is the model of the Edgent experiments.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import numpy.typing as npt
import onnx

from models.onnxbuild import ChainBuilder, LayerSpec, out_shape

INPUT_NAME = "input"
NUM_CLASSES = 10
L = LayerSpec
Chain = tuple[LayerSpec, ...]


@dataclass(frozen=True)
class Arch:
    """A multi-exit chain: exit i (1..n-1) branches off after trunk segment i, exit n ends the trunk."""

    name: str  # the bundle's name
    input_shape: tuple[int, ...]  # (channels, height, width), no batch
    trunk: tuple[Chain, ...]
    branches: tuple[Chain, ...]

    def __post_init__(self) -> None:
        if len(self.branches) != len(self.trunk) - 1:
            raise ValueError(f"{self.name}: {len(self.trunk)} trunk segments need {len(self.trunk) - 1} branches")

    @property
    def num_exits(self) -> int:
        return len(self.trunk)

    @property
    def exit_names(self) -> tuple[str, ...]:
        return tuple(f"exit{i + 1}" for i in range(self.num_exits))

    @property
    def upsample(self) -> int:
        """Integer factor from the 28x28 images to the model's input (nearest neighbour)."""
        return self.input_shape[-1] // 28

    def exit_layers(self, index: int) -> Chain:
        """Layers of exit ``index`` (0-based) in execution order: main branch up to it, then its branch."""
        trunk = tuple(layer for segment in self.trunk[: index + 1] for layer in segment)
        return trunk if index == self.num_exits - 1 else trunk + self.branches[index]

    @cached_property
    def segment_shapes(self) -> list[tuple[int, ...]]:
        """Shape of the main-branch tensor after each segment."""
        shapes: list[tuple[int, ...]] = []
        shape = self.input_shape
        for segment in self.trunk:
            for spec in segment:
                shape = out_shape(spec, shape)
            shapes.append(shape)
        return shapes

    def build_onnx(self, weights: Mapping[str, npt.NDArray[np.float32]] | None = None,
                   seed: int = 0) -> onnx.ModelProto:
        """The multi-exit ONNX model (outputs exit1..exitN); random weights when ``weights`` is None."""
        rng = np.random.default_rng(seed)
        builder = ChainBuilder(INPUT_NAME, self.input_shape)
        x, shape = INPUT_NAME, self.input_shape
        outputs: list[tuple[str, tuple[int, ...]]] = []
        for i, segment in enumerate(self.trunk):
            x, shape = builder.chain(x, shape, segment, weights, rng)
            if i < len(self.branches):
                outputs.append(builder.chain(x, shape, self.branches[i], weights, rng))
        outputs.append((x, shape))
        return builder.build(outputs, name="branchy_alexnet")


def _alexnet(name: str, side: int, filters: tuple[int, int, int, int, int], pool5: tuple[int, int],
             branch_pool: int) -> Arch:
    """The branchy AlexNet on ``side`` x ``side`` images: conv widths, classifier pool (k, stride), side pools."""
    c1, c2, c3, c4, c5 = filters

    def side_pool(i: int) -> LayerSpec:
        return L(kind="pool", name=f"b{i}_pool", k=branch_pool, stride=branch_pool)

    return Arch(
        name=name,
        input_shape=(1, side, side),
        trunk=(
            (L(kind="conv", name="conv1", out=c1, k=5, pad=2), L(kind="relu", name="relu1"),
             L(kind="pool", name="pool1", k=2, stride=2), L(kind="lrn", name="lrn1")),
            (L(kind="conv", name="conv2", out=c2, k=5, pad=2), L(kind="relu", name="relu2"),
             L(kind="pool", name="pool2", k=2, stride=2), L(kind="lrn", name="lrn2")),
            (L(kind="conv", name="conv3", out=c3, k=3, pad=1), L(kind="relu", name="relu3")),
            (L(kind="conv", name="conv4", out=c4, k=3, pad=1), L(kind="relu", name="relu4")),
            (L(kind="conv", name="conv5", out=c5, k=3, pad=1), L(kind="relu", name="relu5"),
             L(kind="pool", name="pool5", k=pool5[0], stride=pool5[1]), L(kind="flatten", name="flatten5"),
             L(kind="dropout", name="drop6"), L(kind="fc", name="fc6", out=512), L(kind="relu", name="relu6"),
             L(kind="dropout", name="drop7"), L(kind="fc", name="fc7", out=256), L(kind="relu", name="relu7"),
             L(kind="fc", name="exit5", out=NUM_CLASSES)),
        ),
        branches=(
            (side_pool(1), L(kind="flatten", name="b1_flatten"), L(kind="fc", name="exit1", out=NUM_CLASSES)),
            (L(kind="conv", name="b2_conv", out=32, k=3, pad=1), L(kind="relu", name="b2_relu"),
             L(kind="pool", name="b2_pool", k=2, stride=2), L(kind="flatten", name="b2_flatten"),
             L(kind="fc", name="exit2", out=NUM_CLASSES)),
            (side_pool(3), L(kind="flatten", name="b3_flatten"), L(kind="fc", name="exit3", out=NUM_CLASSES)),
            (side_pool(4), L(kind="flatten", name="b4_flatten"), L(kind="fc", name="b4_fc", out=64),
             L(kind="relu", name="b4_relu"), L(kind="fc", name="exit4", out=NUM_CLASSES)),
        ),
    )


ALEXNET28 = _alexnet("fmnist-branchy-alexnet", 28, (32, 128, 192, 192, 128), pool5=(3, 2), branch_pool=3)
# Fashion-MNIST upsampled 2x to 56x56, with twice the filters: 1.6 GFLOPs (about 30 ms on a desktop
# core). Its 12.5 KB input is the size of Edgent's CIFAR-10 input (32x32x3 float32), so the upload
# weighs against device compute as in the paper. The classifier and the side exits pool harder than
# ALEXNET28's so that the fully connected layers stay small.
ALEXNET56 = _alexnet("fmnist56-branchy-alexnet", 56, (64, 256, 384, 256, 256), pool5=(7, 7), branch_pool=4)

ARCHS = {arch.name: arch for arch in (ALEXNET28, ALEXNET56)}
