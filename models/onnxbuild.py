"""Build chain-shaped ONNX graphs from layer specs (our multi-exit AlexNet and synthetic test models)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
LAYER_KINDS = ("conv", "relu", "pool", "lrn", "dropout", "flatten", "fc")


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerSpec:
    """One layer of a chain: its kind, its unique name (also its output tensor's name) and shape knobs."""

    kind: str
    name: str
    out: int = 0  # conv: filters; fc: output features
    k: int = 1  # conv/pool kernel size
    stride: int = 1
    pad: int = 0
    size: int = 5  # LRN window
    p: float = 0.5  # dropout ratio (identity at inference)

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"unknown layer kind {self.kind!r}; expected one of {LAYER_KINDS}")
        if self.kind in ("conv", "fc") and self.out <= 0:
            raise ValueError(f"{self.name}: {self.kind} needs out > 0")


def out_shape(spec: LayerSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Output shape (without batch) of ``spec`` applied to an input of ``shape``."""
    if spec.kind in ("conv", "pool"):
        c, h, w = shape
        oh = (h + 2 * spec.pad - spec.k) // spec.stride + 1
        ow = (w + 2 * spec.pad - spec.k) // spec.stride + 1
        return (spec.out if spec.kind == "conv" else c, oh, ow)
    if spec.kind == "flatten":
        return (int(np.prod(shape)),)
    if spec.kind == "fc":
        return (spec.out,)
    return shape


def param_shapes(spec: LayerSpec, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Parameter tensor shapes of ``spec`` (torch layout: conv OIHW, fc out x in)."""
    if spec.kind == "conv":
        return {"weight": (spec.out, shape[0], spec.k, spec.k), "bias": (spec.out,)}
    if spec.kind == "fc":
        return {"weight": (spec.out, shape[0]), "bias": (spec.out,)}
    return {}


class ChainBuilder:
    """Accumulates nodes and initializers; each ``chain`` call appends a run of layers."""

    def __init__(self, input_name: str, input_shape: tuple[int, ...]) -> None:
        self.input_name = input_name
        self.input_shape = input_shape
        self._nodes: list[onnx.NodeProto] = []
        self._inits: list[onnx.TensorProto] = []

    def chain(
        self,
        x: str,
        shape: tuple[int, ...],
        layers: Sequence[LayerSpec],
        weights: Mapping[str, npt.NDArray[np.float32]] | None = None,
        rng: np.random.Generator | None = None,
    ) -> tuple[str, tuple[int, ...]]:
        """Append ``layers`` after tensor ``x``; weights come from ``weights`` or are drawn from ``rng``."""
        for spec in layers:
            params: dict[str, str] = {}
            for pname, pshape in param_shapes(spec, shape).items():
                key = f"{spec.name}.{pname}"
                if weights is not None:
                    value = np.asarray(weights[key], dtype=np.float32)
                    if value.shape != pshape:
                        raise ValueError(f"{key}: shape {value.shape}, layer needs {pshape}")
                else:
                    gen = rng if rng is not None else np.random.default_rng(0)
                    fan_in = int(np.prod(pshape[1:])) if len(pshape) > 1 else 1
                    value = (gen.standard_normal(pshape) / np.sqrt(fan_in)).astype(np.float32)
                self._inits.append(numpy_helper.from_array(value, key))
                params[pname] = key
            self._nodes.append(_node(spec, x, params))
            x, shape = spec.name, out_shape(spec, shape)
        return x, shape

    def add_node(self, node: onnx.NodeProto) -> None:
        """Append a hand-made node (e.g. an Add joining two branches)."""
        self._nodes.append(node)

    def build(self, outputs: Sequence[tuple[str, tuple[int, ...]]], name: str = "coinfer") -> onnx.ModelProto:
        """The finished, checked model with batch-1 input and the given outputs."""
        graph = helper.make_graph(
            self._nodes,
            name,
            [helper.make_tensor_value_info(self.input_name, TensorProto.FLOAT, [1, *self.input_shape])],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, [1, *s]) for o, s in outputs],
            initializer=self._inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        onnx.checker.check_model(model, full_check=True)
        return model


def _node(spec: LayerSpec, x: str, params: Mapping[str, str]) -> onnx.NodeProto:
    y, n = spec.name, spec.name
    if spec.kind == "conv":
        return helper.make_node("Conv", [x, params["weight"], params["bias"]], [y], name=n,
                                kernel_shape=[spec.k, spec.k], strides=[spec.stride] * 2,
                                pads=[spec.pad] * 4)
    if spec.kind == "relu":
        return helper.make_node("Relu", [x], [y], name=n)
    if spec.kind == "pool":
        return helper.make_node("MaxPool", [x], [y], name=n, kernel_shape=[spec.k, spec.k],
                                strides=[spec.stride] * 2, pads=[spec.pad] * 4)
    if spec.kind == "lrn":
        return helper.make_node("LRN", [x], [y], name=n, size=spec.size, alpha=1e-4, beta=0.75, bias=1.0)
    if spec.kind == "dropout":
        return helper.make_node("Dropout", [x], [y], name=n)
    if spec.kind == "flatten":
        return helper.make_node("Flatten", [x], [y], name=n, axis=1)
    return helper.make_node("Gemm", [x, params["weight"], params["bias"]], [y], name=n, transB=1)
