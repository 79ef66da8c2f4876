"""Synthetic ONNX models: random chains for profiling sweeps, and DAG shapes for tests and benchmarks."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import helper

from models.onnxbuild import ChainBuilder, LayerSpec

L = LayerSpec


def random_chain(rng: np.random.Generator, index: int = 0) -> onnx.ModelProto:
    """A random AlexNet-like chain (conv/relu/pool/lrn blocks, then dropout/fc) of varied sizes."""
    channels = int(rng.choice([1, 3, 8, 16, 32]))
    side = int(rng.choice([16, 24, 28, 32, 48, 64]))
    shape: tuple[int, ...] = (channels, side, side)
    layers: list[LayerSpec] = []
    for b in range(int(rng.integers(1, 4))):
        if shape[1] < 4:
            break
        k = int(rng.choice([1, 3, 5]))
        stride = int(rng.choice([1, 1, 2]))
        layers += [L(kind="conv", name=f"m{index}_conv{b}", out=int(rng.choice([8, 16, 32, 64, 96, 128, 192])),
                     k=k, stride=stride, pad=k // 2), L(kind="relu", name=f"m{index}_relu{b}")]
        if rng.random() < 0.7 and shape[1] // stride >= 4:
            layers.append(L(kind="pool", name=f"m{index}_pool{b}", k=int(rng.choice([2, 3])), stride=2))
        if rng.random() < 0.5:
            layers.append(L(kind="lrn", name=f"m{index}_lrn{b}", size=int(rng.choice([3, 5]))))
        shape = _shape_after(layers, (channels, side, side))
    layers.append(L(kind="flatten", name=f"m{index}_flatten"))
    for f in range(int(rng.integers(1, 3))):
        layers += [L(kind="dropout", name=f"m{index}_drop{f}"),
                   L(kind="fc", name=f"m{index}_fc{f}", out=int(rng.choice([64, 256, 512, 1024]))),
                   L(kind="relu", name=f"m{index}_fcrelu{f}")]
    builder = ChainBuilder("input", (channels, side, side))
    out, out_shape = builder.chain("input", (channels, side, side), layers, rng=rng)
    return builder.build([(out, out_shape)], name=f"random_chain_{index}")


def residual_net(blocks: int = 3, channels: int = 16, side: int = 16, seed: int = 0) -> onnx.ModelProto:
    """ResNet-style DAG: a stem, then blocks whose input skips over two convs into an Add."""
    rng = np.random.default_rng(seed)
    builder = ChainBuilder("input", (3, side, side))
    x, shape = builder.chain("input", (3, side, side), [L(kind="conv", name="stem", out=channels, k=3, pad=1),
                                                         L(kind="relu", name="stem_relu")], rng=rng)
    for b in range(blocks):
        y, _ = builder.chain(x, shape, [L(kind="conv", name=f"b{b}_conv1", out=channels, k=3, pad=1),
                                        L(kind="relu", name=f"b{b}_relu1"),
                                        L(kind="conv", name=f"b{b}_conv2", out=channels, k=3, pad=1)], rng=rng)
        builder.add_node(helper.make_node("Add", [x, y], [f"b{b}_add"], name=f"b{b}_add"))
        x, shape = builder.chain(f"b{b}_add", shape, [L(kind="relu", name=f"b{b}_out")], rng=rng)
    x, shape = builder.chain(x, shape, [L(kind="pool", name="head_pool", k=2, stride=2),
                                        L(kind="flatten", name="head_flatten"),
                                        L(kind="fc", name="logits", out=10)], rng=rng)
    return builder.build([(x, shape)], name="residual_net")


def inception_net(side: int = 16, seed: int = 0) -> onnx.ModelProto:
    """Inception-style DAG: three parallel branches joined by a Concat, twice."""
    rng = np.random.default_rng(seed)
    builder = ChainBuilder("input", (3, side, side))
    x, shape = builder.chain("input", (3, side, side), [L(kind="conv", name="stem", out=8, k=3, pad=1)], rng=rng)
    for m in range(2):
        outs = []
        for b, k in enumerate((1, 3, 5)):
            y, _ = builder.chain(x, shape, [L(kind="conv", name=f"i{m}_b{b}", out=8, k=k, pad=k // 2),
                                            L(kind="relu", name=f"i{m}_b{b}_relu")], rng=rng)
            outs.append(y)
        builder.add_node(helper.make_node("Concat", outs, [f"i{m}_cat"], name=f"i{m}_cat", axis=1))
        x, shape = f"i{m}_cat", (24, shape[1], shape[2])
        x, shape = builder.chain(x, shape, [L(kind="conv", name=f"i{m}_reduce", out=8, k=1)], rng=rng)
    x, shape = builder.chain(x, shape, [L(kind="flatten", name="flat"), L(kind="fc", name="logits", out=10)], rng=rng)
    return builder.build([(x, shape)], name="inception_net")


def reduction_net(side: int = 64, width: int = 64, seed: int = 0) -> onnx.ModelProto:
    """Inception modules whose branches first reduce to a few channels (1x1 convs) before widening again: the
    few-channel branch tensors together are smaller than any single tensor, so the best cut crosses several."""
    rng = np.random.default_rng(seed)
    builder = ChainBuilder("input", (3, side, side))
    x, shape = builder.chain("input", (3, side, side), [L(kind="conv", name="stem", out=width, k=3, pad=1, stride=2),
                                                        L(kind="relu", name="stem_relu")], rng=rng)
    for m in range(3):
        outs = []
        for b, k in enumerate((1, 3, 5)):
            y, _ = builder.chain(x, shape, [L(kind="conv", name=f"m{m}_b{b}_reduce", out=2, k=1),
                                            L(kind="relu", name=f"m{m}_b{b}_rrelu"),
                                            L(kind="conv", name=f"m{m}_b{b}", out=width // 2, k=k, pad=k // 2),
                                            L(kind="relu", name=f"m{m}_b{b}_relu")], rng=rng)
            outs.append(y)
        builder.add_node(helper.make_node("Concat", outs, [f"m{m}_cat"], name=f"m{m}_cat", axis=1))
        x, shape = builder.chain(f"m{m}_cat", (3 * (width // 2), shape[1], shape[2]),
                                 [L(kind="conv", name=f"m{m}_mix", out=width, k=1),
                                  L(kind="relu", name=f"m{m}_mix_relu")], rng=rng)
    x, shape = builder.chain(x, shape, [L(kind="pool", name="pool", k=4, stride=4), L(kind="flatten", name="flat"),
                                        L(kind="fc", name="logits", out=10)], rng=rng)
    return builder.build([(x, shape)], name="reduction_net")


def mlp(widths: tuple[int, ...] = (64, 128, 128, 32, 10), seed: int = 0) -> onnx.ModelProto:
    """A plain MLP on a flat input built from MatMul + Add + Relu (no Gemm), three nodes a layer."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "input"
    for i, (w_in, w_out) in enumerate(itertools.pairwise(widths)):
        w = (rng.standard_normal((w_in, w_out)) / np.sqrt(w_in)).astype(np.float32)
        inits += [onnx.numpy_helper.from_array(w, f"w{i}"),
                  onnx.numpy_helper.from_array(np.zeros(w_out, np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"], name=f"mm{i}"),
                  helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"add{i}"], name=f"add{i}")]
        x = f"add{i}"
        if i < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [x], [f"relu{i}"], name=f"relu{i}"))
            x = f"relu{i}"
    graph = helper.make_graph(nodes, "mlp",
                              [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", widths[0]])],
                              [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, ["batch", widths[-1]])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def vgg16(side: int = 224, classes: int = 1000, seed: int = 0) -> onnx.ModelProto:
    """VGG-16's layer shapes (13 3x3 convolutions in 5 blocks, 3 fully connected) with random weights."""
    rng = np.random.default_rng(seed)
    builder = ChainBuilder("input", (3, side, side))
    layers: list[LayerSpec] = []
    for b, (width, convs) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)), start=1):
        for c in range(1, convs + 1):
            layers += [L(kind="conv", name=f"conv{b}_{c}", out=width, k=3, pad=1), L(kind="relu", name=f"relu{b}_{c}")]
        layers.append(L(kind="pool", name=f"pool{b}", k=2, stride=2))
    layers += [L(kind="flatten", name="flatten"), L(kind="fc", name="fc6", out=4096), L(kind="relu", name="relu6"),
               L(kind="fc", name="fc7", out=4096), L(kind="relu", name="relu7"), L(kind="fc", name="fc8", out=classes)]
    x, shape = builder.chain("input", (3, side, side), layers, rng=rng)
    return builder.build([(x, shape)], name="vgg16")


def resnet18(side: int = 224, classes: int = 1000, seed: int = 0) -> onnx.ModelProto:
    """ResNet-18's layer shapes (batch norm folded into the convolutions) with random weights: a DAG."""
    rng = np.random.default_rng(seed)
    builder = ChainBuilder("input", (3, side, side))
    x, shape = builder.chain("input", (3, side, side), [L(kind="conv", name="conv1", out=64, k=7, stride=2, pad=3),
                                                        L(kind="relu", name="relu1"),
                                                        L(kind="pool", name="pool1", k=3, stride=2, pad=1)], rng=rng)
    for stage, width in enumerate((64, 128, 256, 512), start=1):
        for block in (1, 2):
            name = f"l{stage}_{block}"
            stride = 2 if stage > 1 and block == 1 else 1
            y, out = builder.chain(x, shape, [
                L(kind="conv", name=f"{name}_conv1", out=width, k=3, stride=stride, pad=1),
                L(kind="relu", name=f"{name}_relu1"), L(kind="conv", name=f"{name}_conv2", out=width, k=3, pad=1)],
                rng=rng)
            skip = x
            if stride != 1 or shape[0] != width:
                skip, _ = builder.chain(x, shape, [L(kind="conv", name=f"{name}_down", out=width, k=1, stride=stride)],
                                        rng=rng)
            builder.add_node(helper.make_node("Add", [skip, y], [f"{name}_add"], name=f"{name}_add"))
            x, shape = builder.chain(f"{name}_add", out, [L(kind="relu", name=f"{name}_out")], rng=rng)
    x, shape = builder.chain(x, shape, [L(kind="pool", name="avgpool", k=shape[1], stride=shape[1]),
                                        L(kind="flatten", name="flatten"), L(kind="fc", name="fc", out=classes)],
                             rng=rng)
    return builder.build([(x, shape)], name="resnet18")


def _shape_after(layers: list[LayerSpec], shape: tuple[int, ...]) -> tuple[int, ...]:
    from models.onnxbuild import out_shape

    for spec in layers:
        shape = out_shape(spec, shape)
    return shape
