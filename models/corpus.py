"""Standard ImageNet-class topologies, defined here (torchvision's wheel does not load against the local torch) and
exported to ONNX with random weights in the export styles users bring: weights as initializers, weights made by
Constant nodes, BatchNorm left unfused, and an IR-3 file (opset 8, every initializer also a graph input).

torch is the optional ``train`` extra; the files are generated once into a cache (``coinfer corpus``), never
committed. The architectures follow the papers' standard configurations (layer counts, widths, strides).
"""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import onnx
from onnx import helper, numpy_helper, version_converter

from models.errors import ModelLoadError

CACHE_DIR = Path.home() / ".cache" / "coinfer" / "corpus"
OPSET = 17
IR3_OPSET = 8


class Style(StrEnum):
    """How the weights reach the ONNX file."""

    INITIALIZERS = "initializers"  # torch's default: weights are initializers, BatchNorm folded into Conv
    CONSTANTS = "constants"  # every weight made by a Constant node (older exports, some converters)
    UNFUSED_BN = "unfused-bn"  # BatchNormalization nodes kept (training-mode export of an eval model)
    IR3 = "ir3"  # IR version 3, opset 8: every initializer is listed as a graph input too


@dataclass(frozen=True, slots=True)
class Entry:
    """A corpus model: its builder (a torch module), input side and export style; ``small`` ones go in tests."""

    name: str
    style: Style
    side: int = 224
    small: bool = False


CORPUS = (
    Entry("densenet121", Style.UNFUSED_BN),
    Entry("resnet50", Style.INITIALIZERS),
    Entry("googlenet", Style.CONSTANTS),
    Entry("efficientnet_b0", Style.CONSTANTS),
    Entry("vit_tiny", Style.INITIALIZERS),
    Entry("mobilenet_v2", Style.UNFUSED_BN, small=True),
    Entry("shufflenet_v2", Style.IR3, small=True),
    Entry("squeezenet1_1", Style.INITIALIZERS, small=True),
)
BY_NAME = {e.name: e for e in CORPUS}
NAMES = tuple(BY_NAME)


def path_of(name: str, cache: Path = CACHE_DIR) -> Path:
    return cache / f"{name}.onnx"


def build(name: str, cache: Path = CACHE_DIR, *, log: Callable[[str], None] | None = None) -> Path:
    """The corpus model ``name`` as an ONNX file in ``cache`` (exported once; later calls reuse the file)."""
    if name not in BY_NAME:
        raise ModelLoadError(f"unknown corpus model {name!r}; the corpus: {', '.join(BY_NAME)}")
    out = path_of(name, cache)
    if out.exists():
        return out
    entry = BY_NAME[name]
    started = time.perf_counter()
    model = export(entry)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".part")
    onnx.save(model, str(tmp))
    tmp.replace(out)
    if log:
        log(f"{name}: {len(model.graph.node)} nodes, {entry.style}, {out.stat().st_size / 1e6:.1f} MB "
            f"in {time.perf_counter() - started:.1f} s -> {out}")
    return out


def export(entry: Entry) -> onnx.ModelProto:
    """Export the entry's architecture (random weights, seed 0) in its style."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - the train extra is installed by make
        raise ModelLoadError("building the corpus needs torch (pip install -e '.[train]')") from exc
    from models import zoo

    torch.manual_seed(0)
    model = _export(zoo.ARCHITECTURES[entry.name]().eval(), entry.side, entry.style)
    model.graph.name = entry.name
    return model


def random_net(seed: int) -> onnx.ModelProto:
    """``models.zoo.RandomNet(seed)`` exported (never part of the corpus: what latency models are fitted on)."""
    import torch

    from models import zoo

    torch.manual_seed(seed)
    net = zoo.RandomNet(seed).eval()
    model = _export(net, net.side, Style.INITIALIZERS)
    model.graph.name = f"random_net_{seed}"
    return model


def _export(net: Any, side: int, style: Style) -> onnx.ModelProto:
    import torch

    x = torch.randn(1, 3, side, side)
    buf = io.BytesIO()
    opset = 9 if style is Style.IR3 else OPSET
    mode = torch.onnx.TrainingMode.PRESERVE if style is Style.UNFUSED_BN else torch.onnx.TrainingMode.EVAL
    with warnings.catch_warnings():  # the legacy exporter's deprecation notes: it is the one that takes opset 8-9
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), buf, dynamo=False, opset_version=opset,  # type: ignore[arg-type]
                          training=mode, input_names=["input"], output_names=["logits"])  # (a file object works)
    model: onnx.ModelProto = onnx.load_from_string(buf.getvalue())
    if style is Style.CONSTANTS:
        return weights_as_constants(model)
    if style is Style.IR3:
        return as_ir3(model)
    return model


def weights_as_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every initializer made by a Constant node at the top of the graph instead."""
    out: onnx.ModelProto = onnx.ModelProto.FromString(model.SerializeToString())
    consts = [helper.make_node("Constant", [], [t.name], name=f"const_{i}", value=t)
              for i, t in enumerate(out.graph.initializer)]
    del out.graph.initializer[:]
    nodes = [*consts, *out.graph.node]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def as_ir3(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model at opset 8 and IR version 3, where every initializer is also a graph input."""
    out: onnx.ModelProto = version_converter.convert_version(model, IR3_OPSET)
    out.ir_version = 3
    listed = {i.name for i in out.graph.input}
    for t in out.graph.initializer:
        if t.name not in listed:
            out.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return out


def parameter_count(model: onnx.ModelProto) -> int:
    """Weights in initializers and Constant nodes."""
    n = sum(numpy_helper.to_array(t).size for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            n += sum(numpy_helper.to_array(a.t).size for a in node.attribute if a.name == "value")
    return int(n)
