"""Train the branchy AlexNet on Fashion-MNIST with torch (the ``train`` extra) and write its bundle."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from tqdm import tqdm

from models import branchy
from models.bundle import Bundle, write_bundle
from models.data import load_fashion_mnist, preprocess
from models.onnxbuild import LayerSpec, out_shape

# BranchyNet trains all exits jointly on a weighted sum of their losses; the last exit weighs most.
EXIT_LOSS_WEIGHTS = (0.3, 0.3, 0.3, 0.3, 1.0)


def _module(spec: LayerSpec, shape: tuple[int, ...]) -> nn.Module:
    if spec.kind == "conv":
        return nn.Conv2d(shape[0], spec.out, spec.k, stride=spec.stride, padding=spec.pad)
    if spec.kind == "relu":
        return nn.ReLU()
    if spec.kind == "pool":
        return nn.MaxPool2d(spec.k, stride=spec.stride, padding=spec.pad)
    if spec.kind == "lrn":
        return nn.LocalResponseNorm(spec.size, alpha=1e-4, beta=0.75, k=1.0)
    if spec.kind == "dropout":
        return nn.Dropout(spec.p)
    if spec.kind == "flatten":
        return nn.Flatten()
    return nn.Linear(shape[0], spec.out)


class BranchyAlexNet(nn.Module):
    """Torch twin of a ``models.branchy.Arch``: ``forward`` returns the logits of every exit."""

    def __init__(self, arch: branchy.Arch = branchy.ALEXNET28) -> None:
        super().__init__()
        self.arch = arch
        self.layers = nn.ModuleDict()
        self.trunk: list[list[str]] = []
        self.branches: list[list[str]] = []
        shape = arch.input_shape
        for i, segment in enumerate(arch.trunk):
            self.trunk.append(self._add(segment, shape))
            shape = arch.segment_shapes[i]
            if i < len(arch.branches):
                self.branches.append(self._add(arch.branches[i], shape))

    def _add(self, specs: tuple[LayerSpec, ...], shape: tuple[int, ...]) -> list[str]:
        for spec in specs:
            self.layers[spec.name] = _module(spec, shape)
            shape = out_shape(spec, shape)
        return [spec.name for spec in specs]

    def _run(self, names: list[str], x: torch.Tensor) -> torch.Tensor:
        for name in names:
            x = self.layers[name](x)
        return x

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i, names in enumerate(self.trunk):
            x = self._run(names, x)
            if i < len(self.branches):
                outs.append(self._run(self.branches[i], x))
        outs.append(x)
        return outs

    def load_numpy_weights(self, weights: dict[str, npt.NDArray[np.float32]]) -> None:
        """The inverse of ``numpy_weights``: every parameter must be given, with its shape."""
        self.load_state_dict({f"layers.{k}": torch.from_numpy(np.array(v)) for k, v in weights.items()})

    def freeze(self, segments: int) -> None:
        """Stop training the first ``segments`` trunk segments and the branches after them."""
        for names in self.trunk[:segments] + self.branches[:segments]:
            for name in names:
                self.layers[name].requires_grad_(False)

    def numpy_weights(self) -> dict[str, npt.NDArray[np.float32]]:
        """Parameters keyed as ``models.onnxbuild`` expects (``<layer>.weight``, ``<layer>.bias``)."""
        return {k.removeprefix("layers."): v.detach().cpu().numpy().astype(np.float32)
                for k, v in self.state_dict().items()}


def evaluate(model: BranchyAlexNet, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64],
             batch: int = 1000) -> list[float]:
    """Accuracy of every exit on (x, y)."""
    model.eval()
    correct = np.zeros(model.arch.num_exits)
    with torch.no_grad():
        for i in range(0, len(x), batch):
            outs = model(torch.from_numpy(x[i:i + batch]))
            for e, logits in enumerate(outs):
                correct[e] += (logits.argmax(1).numpy() == y[i:i + batch]).sum()
    return [float(c / len(x)) for c in correct]


def train(arch: branchy.Arch = branchy.ALEXNET28, *, epochs: float = 3.0, batch: int = 128, lr: float = 2e-3,
          subset: int | None = None, finetune_epochs: float = 1.0, seed: int = 0, threads: int | None = None,
          init: dict[str, npt.NDArray[np.float32]] | None = None, freeze: int = 0, progress: bool = True,
          log: Callable[[str], None] = print) -> tuple[BranchyAlexNet, dict[str, object]]:
    """Joint training of all exits, then ``finetune_final``; returns the model and a training report.

    ``init`` starts from given weights (a bundle's: ``weights_of``) instead of random ones; ``freeze``
    keeps the first segments and their exits as they are and trains the rest on the later exits' losses.
    """
    if not 0 <= freeze < arch.num_exits:
        raise ValueError(f"freeze must be in 0..{arch.num_exits - 1}")
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    images, labels = load_fashion_mnist("train")
    if subset:
        images, labels = images[:subset], labels[:subset]
    x_all, y_all = preprocess(images, arch.upsample), labels
    model = BranchyAlexNet(arch)
    if init is not None:
        model.load_numpy_weights(init)
    model.freeze(freeze)
    weights = [0.0 if i < freeze else w for i, w in enumerate(EXIT_LOSS_WEIGHTS)]
    start = time.perf_counter()
    total = fit(model, x_all, y_all, weights, epochs=epochs, batch=batch, lr=lr, seed=seed, progress=progress)
    report: dict[str, object] = {"epochs": epochs, "steps": total, "batch": batch, "lr": lr, "seed": seed,
              "train_images": len(x_all), "train_seconds": round(time.perf_counter() - start, 1),
              "torch_threads": torch.get_num_threads(), "initialised_from_bundle": init is not None,
              "frozen_segments": freeze}
    log(f"trained {total} steps in {report['train_seconds']} s")
    if finetune_epochs > 0:
        report.update(finetune_final(model, x_all, y_all, epochs=finetune_epochs, batch=batch,
                                     progress=progress))
    return model, report


def fit(model: nn.Module, x_all: npt.NDArray[np.float32], y_all: npt.NDArray[np.int64], exit_weights: list[float],
        *, epochs: float, batch: int, lr: float, seed: int, progress: bool = True) -> int:
    """Joint training of a multi-exit ``model`` (its forward returns one logits tensor per exit) on the weighted
    sum of the exits' losses: Adam with a one-cycle schedule. Returns the steps taken."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    steps_per_epoch = int(np.ceil(len(x_all) / batch))
    total = round(epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total)
    loss_fn = nn.CrossEntropyLoss()
    rng = np.random.default_rng(seed)
    weights = torch.tensor(exit_weights)
    bar = tqdm(total=total, desc="train", unit="step", disable=not progress)
    step = 0
    while step < total:
        order = rng.permutation(len(x_all))
        model.train()
        for i in range(0, len(order), batch):
            if step >= total:
                break
            idx = order[i:i + batch]
            outs = model(torch.from_numpy(x_all[idx]))
            target = torch.from_numpy(y_all[idx])
            loss = sum(w * loss_fn(o, target) for w, o in zip(weights, outs, strict=True))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return total


def finetune_final(model: BranchyAlexNet, x_all: npt.NDArray[np.float32], y_all: npt.NDArray[np.int64], *,
                   epochs: float = 1.0, batch: int = 128, lr: float = 5e-4, seed: int = 1,
                   progress: bool = True) -> dict[str, object]:
    """Train only the last segment on the last exit's loss, the rest frozen (the side exits are unchanged).

    Joint training spends part of the shared layers' capacity on the side exits; a short second stage
    lets the final exit catch up, as staged BranchyNet training does.
    """
    torch.manual_seed(seed)
    last = model.trunk[-1]
    params = [p for name in last for p in model.layers[name].parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    total = round(epochs * np.ceil(len(x_all) / batch))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    loss_fn = nn.CrossEntropyLoss()
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    bar = tqdm(total=total, desc="finetune", unit="step", disable=not progress)
    step = 0
    model.train()
    while step < total:
        order = rng.permutation(len(x_all))
        for i in range(0, len(order), batch):
            if step >= total:
                break
            idx = order[i:i + batch]
            with torch.no_grad():
                x = torch.from_numpy(x_all[idx])
                for names in model.trunk[:-1]:
                    x = model._run(names, x)
            loss = loss_fn(model._run(last, x), torch.from_numpy(y_all[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return {"finetune_epochs": epochs, "finetune_steps": total, "finetune_lr": lr,
            "finetune_seconds": round(time.perf_counter() - start, 1)}


def weights_of(bundle: Bundle) -> dict[str, npt.NDArray[np.float32]]:
    """A bundle's parameters keyed as ``BranchyAlexNet.numpy_weights`` gives them (to continue training)."""
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in bundle.model.graph.initializer}


def export_bundle(model: BranchyAlexNet, out_dir: Path, report: dict[str, object]) -> Path:
    """Evaluate on the full test split and write the bundle (ONNX + manifest) to ``out_dir``."""
    images, labels = load_fashion_mnist("test")
    arch = model.arch
    onnx_model = arch.build_onnx(model.numpy_weights())
    return write_bundle(onnx_model, out_dir, name=arch.name, upsample=arch.upsample,
                        test_images=preprocess(images, arch.upsample), test_labels=labels, training=report)
