"""Inspect and split any ONNX model: layers in topological order, valid cuts, head/tail extraction.

A cut is a *set* of tensors: everything that produces them runs in the head, everything else in the
tail, and only those tensors cross. A chain model's cuts are sets of one; DAG models (residual or
inception blocks) also have cuts of several tensors, which ``split`` handles the same way.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import numpy as np
import onnx
import onnx.utils
from google.protobuf.message import DecodeError
from onnx import helper, shape_inference

from models.errors import CutError, ModelLoadError, UnknownTensorError

IR_INITIALIZERS_OPTIONAL = 4  # from this IR version on, an initializer need not be a graph input
# Layer kinds: Edgent's Table I types, and the kinds real ImageNet models need besides (each its own regression in
# a fitted latency model; a model without an entry for a kind costs it by its "other" fallback)
KIND_OF_OP = {
    "Conv": "conv", "ConvTranspose": "conv", "Relu": "relu", "MaxPool": "pool", "AveragePool": "pool",
    "GlobalAveragePool": "pool", "GlobalMaxPool": "pool", "LRN": "lrn", "Dropout": "dropout", "Gemm": "fc",
    "MatMul": "matmul", "Add": "add", "Sub": "add", "Mul": "add", "Div": "add", "Concat": "concat",
    "Split": "concat", "Slice": "concat", "Softmax": "softmax", "BatchNormalization": "norm",
    "LayerNormalization": "norm", "InstanceNormalization": "norm", "Clip": "act", "HardSwish": "act",
    "HardSigmoid": "act", "LeakyRelu": "act", "Sigmoid": "act_exp", "Gelu": "act_exp", "Erf": "act_exp",
    "Tanh": "act_exp", "Elu": "act_exp", "Reshape": "reshape", "Transpose": "reshape", "Flatten": "reshape",
    "Squeeze": "reshape", "Unsqueeze": "reshape",
}


@dataclass(frozen=True, slots=True)
class Layer:
    """One graph node with the sizes the latency models use (Edgent Table I variables and more)."""

    index: int
    name: str
    op_type: str
    kind: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    features: dict[str, float] = field(hash=False)

    def to_json(self) -> dict[str, object]:
        """Plain-JSON form (as in bundle manifests and ``coinfer layers --json``)."""
        return {"index": self.index, "name": self.name, "op_type": self.op_type, "type": self.kind,
                "inputs": list(self.inputs), "outputs": list(self.outputs), **self.features}


@dataclass(frozen=True, slots=True)
class Cut:
    """A set of tensors separating the graph; ``index`` = number of layers in the head."""

    name: str
    tensors: frozenset[str]
    index: int
    bytes: int

    def to_json(self) -> dict[str, object]:
        """Plain-JSON form."""
        return {"name": self.name, "tensors": sorted(self.tensors), "index": self.index, "bytes": self.bytes}


def load_model(path: Path | str, *, normalise: bool = True) -> onnx.ModelProto:
    """Read, check and ``normalise`` an ONNX file; a missing, corrupt or invalid file raises ``ModelLoadError``."""
    path = Path(path)
    try:
        model = _modern_ir(onnx.load(str(path)))
        onnx.checker.check_model(model)
    except FileNotFoundError as exc:
        raise ModelLoadError(f"model file {path} not found") from exc
    except (OSError, DecodeError, onnx.checker.ValidationError) as exc:
        raise ModelLoadError(f"{path} is not a valid ONNX model: {exc}") from exc
    return prepare(normalised(model) if normalise else model)


def normalised(model: onnx.ModelProto) -> onnx.ModelProto:
    """What onnxruntime runs: the model after its basic graph optimisations (constants folded, so that weights made
    by Constant nodes become initializers; BatchNormalization fused into the Conv before it; Identity and Dropout
    removed), written out by onnxruntime itself (``optimized_model_filepath``). Only ONNX-domain operators come out
    of that level, so the result is a standard model that head and tail extraction can cut anywhere."""
    from models.ort import onnxruntime as ort  # models/ imports onnxruntime only where it runs models

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    with tempfile.TemporaryDirectory(prefix="coinfer-normalise-") as tmp:
        opts.optimized_model_filepath = str(Path(tmp) / "model.onnx")
        try:
            ort.InferenceSession(_modern_ir(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])
            out = onnx.load(opts.optimized_model_filepath)
        except Exception as exc:  # onnxruntime's own errors are its Fail/InvalidGraph/... classes
            raise ModelLoadError(f"onnxruntime cannot run this model: {exc}") from exc
    out.graph.name = model.graph.name
    return _modern_ir(out)


def _modern_ir(model: onnx.ModelProto) -> onnx.ModelProto:
    """Before IR 4 every initializer must also be a graph input; a head or tail extracted from such a model (or
    onnxruntime's optimised copy, which adds initializers without listing them) breaks that rule, so such models
    become IR 4 (same opsets) with their initializers no longer listed as inputs."""
    if model.ir_version >= IR_INITIALIZERS_OPTIONAL:
        return model
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {t.name for t in model.graph.initializer}
    kept = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    model.ir_version = IR_INITIALIZERS_OPTIONAL
    return model


def prepare(model: onnx.ModelProto, batch: int = 1) -> onnx.ModelProto:
    """Name unnamed nodes, fix symbolic dimensions to ``batch`` and infer every tensor's shape."""
    model = onnx.ModelProto.FromString(_modern_ir(model).SerializeToString())
    used = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type.lower()}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)
    for vi in [*model.graph.input, *model.graph.output]:
        for dim in vi.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.dim_value = batch
    try:
        return shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError) as exc:
        raise ModelLoadError(f"shape inference failed: {exc}") from exc


def graph_inputs(model: onnx.ModelProto) -> list[str]:
    """Names of the real inputs (initializers excluded)."""
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def tensor_bytes(model: onnx.ModelProto) -> dict[str, int]:
    """Byte size of every tensor whose shape is known (inputs, outputs, intermediates, initializers)."""
    sizes: dict[str, int] = {}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        tt = vi.type.tensor_type
        dims = [d.dim_value for d in tt.shape.dim]
        if tt.elem_type and all(d > 0 for d in dims):
            itemsize = helper.tensor_dtype_to_np_dtype(tt.elem_type).itemsize
            sizes[vi.name] = int(np.prod(dims, dtype=np.int64)) * itemsize
    for init in model.graph.initializer:
        itemsize = helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        sizes[init.name] = int(np.prod(init.dims, dtype=np.int64)) * itemsize
    return sizes


def layers(model: onnx.ModelProto) -> list[Layer]:
    """Every node of a ``prepare``d model, in the graph's (topological) order, with its features."""
    sizes = tensor_bytes(model)
    shapes = _shapes(model)
    inits = {t.name for t in model.graph.initializer}
    result = []
    for i, node in enumerate(model.graph.node):
        acts = [t for t in node.input if t and t not in inits]
        params = [t for t in node.input if t in inits]
        feats = {
            "input_bytes": float(sum(sizes.get(t, 0) for t in acts)),
            "output_bytes": float(sum(sizes.get(t, 0) for t in node.output if t)),
            "param_bytes": float(sum(sizes.get(t, 0) for t in params)),
            "flops": float(_flops(node, shapes)),
        }
        if node.op_type in ("Conv", "ConvTranspose"):
            feats["filter_term"] = float(_filter_term(node, shapes))
            # the work as if on the input's grid: a strided depthwise conv costs more per FLOP than one of stride 1
            feats["strided_flops"] = feats["flops"] * int(np.prod(_ints(node, "strides", [1])))
            # groups x kernel area: a depthwise conv pays per channel and kernel tap besides its FLOPs (a 5x5 one on
            # a 7x7 map of a thousand channels costs several times what its FLOPs say)
            feats["kernel_groups"] = float(_ints(node, "group", [1])[0] * int(np.prod(_ints(node, "kernel_shape",
                                                                                              [1]))))
        kind = KIND_OF_OP.get(node.op_type, "other")
        if kind == "conv" and _ints(node, "group", [1])[0] > 1:
            kind = "dwconv"  # depthwise or grouped: a few FLOPs per byte, unlike a dense convolution
        result.append(Layer(index=i, name=node.name, op_type=node.op_type, kind=kind,
                            inputs=tuple(acts), outputs=tuple(t for t in node.output if t), features=feats))
    return result


def cuts(model: onnx.ModelProto) -> list[Cut]:
    """The valid single-tensor cuts of a ``prepare``d model, ordered by the size of their head.

    Tensor t is a cut when the nodes it depends on (its ancestors) can run alone: no other tensor they
    make, and no graph input, is needed by the remaining nodes, and they make no graph output.
    """
    graph, producer = _dag(model)
    consumers = _consumers(model)
    inputs = set(graph_inputs(model))
    outputs = {o.name for o in model.graph.output}
    sizes = tensor_bytes(model)
    found = []
    for tensor, node_idx in producer.items():
        if tensor in outputs:
            continue
        head = nx.ancestors(graph, node_idx) | {node_idx}
        if len(head) == graph.number_of_nodes():
            continue
        tail = set(graph.nodes) - head
        crossing = {t for n in tail for t in model.graph.node[n].input if t in inputs or producer.get(t) in head}
        made_outputs = {t for n in head for t in model.graph.node[n].output} & outputs
        if crossing == {tensor} and not made_outputs and consumers.get(tensor):
            found.append(Cut(name=tensor, tensors=frozenset({tensor}), index=len(head),
                             bytes=sizes.get(tensor, 0)))
    return sorted(found, key=lambda c: (c.index, c.name))


def find_cut(model: onnx.ModelProto, name: str) -> Cut:
    """The cut called ``name`` (a tensor name, or several joined by ``+``)."""
    if "+" in name:
        tensors = frozenset(name.split("+"))
        head, _ = _split_nodes(model, tensors)
        sizes = tensor_bytes(model)
        return Cut(name=name, tensors=tensors, index=len(head), bytes=sum(sizes.get(t, 0) for t in tensors))
    for cut in cuts(model):
        if cut.name == name:
            return cut
    names = {t for n in model.graph.node for t in n.output}
    if name in names:
        try:
            _split_nodes(model, frozenset({name}))
        except CutError as exc:  # it names the others that cross with it
            raise CutError(f"tensor {name!r} is not a cut on its own: {exc}; cut at "
                           f"{'+'.join(sorted({name, *_leaked(exc)}))} to send them all") from None
        raise CutError(f"tensor {name!r} is not a cut")  # pragma: no cover - cuts() lists every single-tensor cut
    raise CutError(f"unknown cut {name!r}; `coinfer layers MODEL` lists the valid ones")


def split(model: onnx.ModelProto, cut: Cut | Iterable[str]) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Head (graph inputs -> cut tensors) and tail (cut tensors -> graph outputs) of a prepared model."""
    tensors = cut.tensors if isinstance(cut, Cut) else frozenset(cut)
    _split_nodes(model, tensors)
    order = sorted(tensors)
    extractor = onnx.utils.Extractor(model)
    head = extractor.extract_model(graph_inputs(model), order)
    tail = extractor.extract_model(order, [o.name for o in model.graph.output])
    for part, suffix in ((head, "head"), (tail, "tail")):
        part.graph.name = f"{model.graph.name}_{suffix}"
        onnx.checker.check_model(part)
    return head, tail


def segment(model: onnx.ModelProto, inputs: Iterable[str], outputs: Iterable[str]) -> onnx.ModelProto:
    """The part of a prepared model from the tensors ``inputs`` to the tensors ``outputs`` (a head, a tail or a
    pipeline's middle stage); ``CutError`` unless ``inputs`` alone suffice to compute ``outputs``."""
    ins, outs = frozenset(inputs), frozenset(outputs)
    _graph, producer = _dag(model)
    known = set(producer) | set(graph_inputs(model))
    unknown = sorted(t for t in ins | outs if t not in known)
    if unknown or not ins or not outs:
        raise UnknownTensorError(f"unknown segment tensor(s) {unknown or '(empty set)'}")
    inits = {t.name for t in model.graph.initializer}
    needed: set[int] = set()
    frontier = [producer[t] for t in outs if t not in ins and t in producer]
    while frontier:  # the nodes between: walk back from the outputs, stopping at the inputs
        n = frontier.pop()
        if n in needed:
            continue
        needed.add(n)
        frontier += [producer[t] for t in model.graph.node[n].input if t and t not in ins and t in producer]
    missing = sorted({t for n in needed for t in model.graph.node[n].input
                      if t and t not in ins and t not in inits and t not in producer})
    unused = sorted(ins - {t for n in needed for t in model.graph.node[n].input})
    if missing or unused or not needed:
        why = f": {missing} would also be needed" if missing else f": {unused} unused" if unused else ""
        raise CutError(f"tensors {sorted(ins)} do not compute {sorted(outs)}{why}")
    part = onnx.utils.Extractor(model).extract_model(sorted(ins), sorted(outs))
    part.graph.name = f"{model.graph.name}_segment"
    onnx.checker.check_model(part)
    return part


def extract_outputs(model: onnx.ModelProto, outputs: Sequence[str]) -> onnx.ModelProto:
    """The sub-model computing only ``outputs`` (e.g. one exit of a multi-exit network)."""
    known = {o.name for o in model.graph.output} | {t for n in model.graph.node for t in n.output}
    missing = [o for o in outputs if o not in known]
    if missing:
        raise CutError(f"unknown output(s) {missing}; the model has {[o.name for o in model.graph.output]}")
    sub = onnx.utils.Extractor(model).extract_model(graph_inputs(model), list(outputs))
    onnx.checker.check_model(sub)
    return sub


def _split_nodes(model: onnx.ModelProto, tensors: frozenset[str]) -> tuple[set[int], set[int]]:
    """Node indices of head and tail for a cut, or ``CutError`` when it does not separate the graph."""
    graph, producer = _dag(model)
    inputs = set(graph_inputs(model))
    unknown = sorted(t for t in tensors if t not in producer and t not in inputs)
    if unknown or not tensors:
        raise CutError(f"unknown cut tensor(s) {unknown or '(empty set)'}")
    head: set[int] = set()
    for t in tensors:
        if t in producer:
            head |= nx.ancestors(graph, producer[t]) | {producer[t]}
    tail = set(graph.nodes) - head
    crossing = {t for n in tail for t in model.graph.node[n].input if t in inputs or producer.get(t) in head}
    outputs = {o.name for o in model.graph.output}
    leaked = sorted((crossing - tensors) | ({t for n in head for t in model.graph.node[n].output} & outputs - tensors))
    if leaked:
        raise _NotACut(f"cut {sorted(tensors)} does not separate the graph: {leaked} also cross it", leaked)
    return head, tail


class _NotACut(CutError):
    """A tensor set that leaves others crossing too (``leaked``)."""

    def __init__(self, message: str, leaked: list[str]) -> None:
        super().__init__(message)
        self.leaked = leaked


def _leaked(exc: CutError) -> list[str]:
    return exc.leaked if isinstance(exc, _NotACut) else []


def _dag(model: onnx.ModelProto) -> tuple[nx.DiGraph, dict[str, int]]:
    producer = {t: i for i, n in enumerate(model.graph.node) for t in n.output if t}
    graph = nx.DiGraph()
    graph.add_nodes_from(range(len(model.graph.node)))
    for i, node in enumerate(model.graph.node):
        graph.add_edges_from((producer[t], i) for t in node.input if t in producer)
    return graph, producer


def _consumers(model: onnx.ModelProto) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, node in enumerate(model.graph.node):
        for t in node.input:
            out.setdefault(t, []).append(i)
    for o in model.graph.output:
        out.setdefault(o.name, []).append(-1)
    return out


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]}
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    return shapes


def _ints(node: onnx.NodeProto, name: str, default: list[int]) -> list[int]:
    """An integer or integer-list attribute, always as a list."""
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
    return default


def _filter_term(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> float:
    """Edgent's conv variable: (filter size / stride)^2 * number of filters."""
    w = shapes.get(node.input[1], [])
    if len(w) < 3:
        return 0.0
    kernel = int(np.prod(w[2:]))
    stride = int(np.prod(_ints(node, "strides", [1])))
    filters = w[0] if node.op_type == "Conv" else w[1]
    return kernel / stride * filters


def _flops(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    out = shapes.get(node.output[0], []) if node.output else []
    out_elems = int(np.prod(out)) if out and all(d > 0 for d in out) else 0
    first = shapes.get(node.input[0], []) if node.input else []
    if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1:
        w = shapes.get(node.input[1], [])
        return 2 * out_elems * int(np.prod(w[1:])) if w else out_elems
    if node.op_type in ("Gemm", "MatMul") and first:
        k = first[0] if node.op_type == "Gemm" and _ints(node, "transA", [0]) == [1] else first[-1]
        return 2 * out_elems * k
    if node.op_type in ("MaxPool", "AveragePool"):
        return out_elems * int(np.prod(_ints(node, "kernel_shape", [1])))
    if node.op_type in ("GlobalAveragePool", "GlobalMaxPool", "LRN") and first:
        size = _ints(node, "size", [1])[0] if node.op_type == "LRN" else 1
        return int(np.prod(first)) * size
    return out_elems
