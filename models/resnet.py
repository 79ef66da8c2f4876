"""The branchy ResNet: a Fashion-MNIST classifier with residual blocks (a DAG) and three exits, trained with torch
(the ``train`` extra) and exported to ONNX, the model the min-cut policy's bundle ships.

Stages of two residual blocks each (16, 32 and 64 channels at 28x28, 14x14 and 7x7; a strided block with a 1x1
projection on its skip between stages); an exit after each stage (global average pool, fully connected).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from models.bundle import write_bundle
from models.data import load_fashion_mnist, preprocess
from models.train import fit

NAME = "fmnist-branchy-resnet"
WIDTHS = (16, 32, 64)
EXIT_LOSS_WEIGHTS = [0.3, 0.3, 1.0]
NUM_CLASSES = 10


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
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, WIDTHS[0], 3, padding=1)
        stages, exits, cin = [], [], WIDTHS[0]
        for i, width in enumerate(WIDTHS):
            stages.append(nn.Sequential(Block(cin, width, 1 if i == 0 else 2), Block(width, width, 1)))
            exits.append(nn.Linear(width, NUM_CLASSES))
            cin = width
        self.stages, self.exits = nn.ModuleList(stages), nn.ModuleList(exits)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = torch.relu(self.stem(x))
        outs = []
        for stage, head in zip(self.stages, self.exits, strict=True):
            x = stage(x)
            outs.append(head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)))
        return outs


def train(*, epochs: float = 2.0, batch: int = 128, lr: float = 3e-3, subset: int | None = None,
          seed: int = 0, progress: bool = True) -> tuple[BranchyResNet, dict[str, object]]:
    """Joint training of the three exits on the Fashion-MNIST training split."""
    torch.manual_seed(seed)
    images, labels = load_fashion_mnist("train")
    if subset:
        images, labels = images[:subset], labels[:subset]
    x_all = preprocess(images, 1)
    model = BranchyResNet()
    start = time.perf_counter()
    steps = fit(model, x_all, labels, EXIT_LOSS_WEIGHTS, epochs=epochs, batch=batch, lr=lr, seed=seed,
                progress=progress)
    return model, {"arch": NAME, "epochs": epochs, "steps": steps, "batch": batch, "lr": lr, "seed": seed,
                   "train_images": len(x_all), "train_seconds": round(time.perf_counter() - start, 1),
                   "torch_threads": torch.get_num_threads(), "exit_loss_weights": EXIT_LOSS_WEIGHTS}


def export_bundle(model: BranchyResNet, out_dir: Path, report: dict[str, object]) -> Path:
    """The ONNX export (exits exit1..exit3) with each exit's accuracy on the full test split, as a bundle."""
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(path), input_names=["input"],
                          output_names=[f"exit{i + 1}" for i in range(len(WIDTHS))], dynamo=False)
        exported = onnx.load(str(path))
    images, labels = load_fashion_mnist("test")
    return write_bundle(exported, out_dir, name=NAME, test_images=preprocess(images, 1),
                        test_labels=labels.astype(np.int64), training=report)
