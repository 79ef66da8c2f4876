"""The branchy ResNets: Fashion-MNIST classifiers with residual blocks (DAGs) and three exits, trained with torch
(the ``train`` extra) and exported to ONNX, the bundles the min-cut policy ships.

Stages of two residual blocks each (conv-relu-conv plus the skip, a 1x1 projection where the shape changes); an
exit after each stage (global average pool, fully connected). Two architectures (``ARCHS``):

- ``fmnist-branchy-resnet``: 16, 32 and 64 channels at 28x28, 14x14 and 7x7 (a strided block between stages).
  Light: the whole network is ~40 ms on the 10%-of-a-core testbed device.
- ``fmnist56-branchy-resnet``: the 56x56 input of the paper-sized AlexNet (12.5 KB, the Edgent paper's input
  size), a strided stem to 28x28, 64 channels; then a *bottleneck* (a strided 3x3 conv to 8 channels at 14x14:
  6.3 KB, half the input) before stages of 160 and 320 channels at 14x14 and 7x7. Heavy on the testbed device,
  and with a cut that is smaller than the input after a cheap head: the bottleneck injected for split computing
  (Eshratifar et al., BottleNet, ISLPED 2019; Matsubara et al., BottleFit, WoWMoM 2022). Without one, every
  activation of a residual network on a 56x56 grey image is larger than the image, and splitting never beats
  sending the input.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from models.bundle import write_bundle
from models.data import load_fashion_mnist, preprocess
from models.train import fit

EXIT_LOSS_WEIGHTS = [0.3, 0.3, 1.0]
NUM_CLASSES = 10


@dataclass(frozen=True)
class Arch:
    name: str
    upsample: int  # input side = 28 x upsample
    stem_stride: int
    widths: tuple[int, int, int]
    bottleneck: int | None = None  # channels of the strided conv between stages 1 and 2 (None: a strided block)

    @property
    def side(self) -> int:
        return 28 * self.upsample


RESNET28 = Arch("fmnist-branchy-resnet", upsample=1, stem_stride=1, widths=(16, 32, 64))
RESNET56 = Arch("fmnist56-branchy-resnet", upsample=2, stem_stride=2, widths=(64, 160, 320), bottleneck=8)
ARCHS = {a.name: a for a in (RESNET28, RESNET56)}
NAME = RESNET28.name


class Block(nn.Module):
    """conv-relu-conv plus the skip (a strided 1x1 projection where the shape changes), then relu."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1, stride=stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.skip(x) + self.conv2(torch.relu(self.conv1(x))))


class BranchyResNet(nn.Module):
    def __init__(self, arch: Arch = RESNET28) -> None:
        super().__init__()
        self.arch = arch
        self.stem = nn.Conv2d(1, arch.widths[0], 3, stride=arch.stem_stride, padding=1)
        stages, exits, cin = [], [], arch.widths[0]
        for i, width in enumerate(arch.widths):
            stride = 1 if i == 0 or (i == 1 and arch.bottleneck) else 2
            stages.append(nn.Sequential(Block(cin, width, stride), Block(width, width, 1)))
            exits.append(nn.Linear(width, NUM_CLASSES))
            cin = arch.bottleneck if i == 0 and arch.bottleneck else width
        self.stages, self.exits = nn.ModuleList(stages), nn.ModuleList(exits)
        self.bottleneck = (nn.Conv2d(arch.widths[0], arch.bottleneck, 3, stride=2, padding=1)
                           if arch.bottleneck else None)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = torch.relu(self.stem(x))
        outs = []
        for i, (stage, head) in enumerate(zip(self.stages, self.exits, strict=True)):
            if i == 1 and self.bottleneck is not None:
                x = torch.relu(self.bottleneck(x))
            x = stage(x)
            outs.append(head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)))
        return outs


def train(arch: Arch = RESNET28, *, epochs: float = 2.0, batch: int = 128, lr: float = 3e-3,
          subset: int | None = None, seed: int = 0, progress: bool = True) -> tuple[BranchyResNet, dict[str, object]]:
    """Joint training of the three exits on the Fashion-MNIST training split."""
    torch.manual_seed(seed)
    images, labels = load_fashion_mnist("train")
    if subset:
        images, labels = images[:subset], labels[:subset]
    x_all = preprocess(images, arch.upsample)
    model = BranchyResNet(arch)
    start = time.perf_counter()
    steps = fit(model, x_all, labels, EXIT_LOSS_WEIGHTS, epochs=epochs, batch=batch, lr=lr, seed=seed,
                progress=progress)
    return model, {"arch": arch.name, "epochs": epochs, "steps": steps, "batch": batch, "lr": lr, "seed": seed,
                   "train_images": len(x_all), "train_seconds": round(time.perf_counter() - start, 1),
                   "torch_threads": torch.get_num_threads(), "exit_loss_weights": EXIT_LOSS_WEIGHTS}


def export_bundle(model: BranchyResNet, out_dir: Path, report: dict[str, object]) -> Path:
    """The ONNX export (exits exit1..exit3) with each exit's accuracy on the full test split, as a bundle."""
    model.eval()
    arch = model.arch
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(model, (torch.zeros(1, 1, arch.side, arch.side),), str(path), input_names=["input"],
                          output_names=[f"exit{i + 1}" for i in range(len(arch.widths))], dynamo=False)
        exported = onnx.load(str(path))
    images, labels = load_fashion_mnist("test")
    return write_bundle(exported, out_dir, name=arch.name, upsample=arch.upsample,
                        test_images=preprocess(images, arch.upsample), test_labels=labels.astype(np.int64),
                        training=report)
