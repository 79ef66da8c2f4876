from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models import graph, synth
from models.bundle import Bundle
from models.errors import CutError, ModelLoadError
from models.profile import random_feed


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed), strict=True))


def _assert_split_composes(model: onnx.ModelProto, cut: graph.Cut, feed: dict[str, np.ndarray],
                           whole: dict[str, np.ndarray], *, exact: bool = True) -> None:
    head, tail = graph.split(model, cut)
    assert {o.name for o in head.graph.output} == set(cut.tensors)
    assert len(head.graph.node) + len(tail.graph.node) == len(model.graph.node)
    mid = _run(head, feed)
    out = _run(tail, mid)
    for name, value in whole.items():
        if exact:
            assert np.array_equal(out[name], value), f"cut {cut.name}: output {name} differs"
        else:
            np.testing.assert_allclose(out[name], value, rtol=1e-5, atol=1e-5, err_msg=f"cut {cut.name}")


def test_every_cut_of_every_exit_is_bit_identical(bundle: Bundle) -> None:
    rng = np.random.default_rng(0)
    for info in bundle.exits:
        model = bundle.exit_model(info.index)
        feed = random_feed(model, rng)
        whole = _run(model, feed)
        cuts = graph.cuts(model)
        # a sub-model of one exit is a chain: every layer boundary is a cut
        assert len(cuts) == len(info.layers) - 1 == len(info.cuts)
        for cut in cuts:
            _assert_split_composes(model, cut, feed, whole)


@pytest.mark.parametrize("factory", [synth.residual_net, synth.inception_net, synth.mlp,
                                     lambda: synth.random_chain(np.random.default_rng(5), 5)])
def test_other_models_split_at_every_cut(factory: object) -> None:
    model = graph.prepare(factory())  # type: ignore[operator]
    feed = random_feed(model, np.random.default_rng(1))
    whole = _run(model, feed)
    cuts = graph.cuts(model)
    assert cuts
    for cut in cuts:
        # onnxruntime fuses Conv+Add(+Relu) across a residual join only when both are in one session,
        # so these models agree to float rounding rather than bit for bit
        _assert_split_composes(model, cut, feed, whole, exact=False)


def test_residual_cuts_skip_the_inside_of_blocks() -> None:
    model = graph.prepare(synth.residual_net(blocks=2))
    names = {c.name for c in graph.cuts(model)}
    assert {"stem_relu", "b0_out", "b1_out"} <= names
    # inside a block the skip connection also crosses, so conv1/relu1 outputs are not single-tensor cuts
    assert not names & {"b0_conv1", "b0_relu1", "b0_conv2"}


def test_multi_tensor_cut_inside_a_residual_block() -> None:
    model = graph.prepare(synth.residual_net(blocks=2))
    cut = graph.find_cut(model, "stem_relu+b0_relu1")
    assert cut.tensors == {"stem_relu", "b0_relu1"} and cut.bytes == 2 * 16 * 16 * 16 * 4
    feed = random_feed(model, np.random.default_rng(2))
    _assert_split_composes(model, cut, feed, _run(model, feed), exact=False)


def test_non_separating_cut_is_rejected() -> None:
    model = graph.prepare(synth.residual_net(blocks=2))
    with pytest.raises(CutError, match="not a cut"):
        graph.find_cut(model, "b0_relu1")
    with pytest.raises(CutError, match="does not separate"):
        graph.split(model, ["b0_relu1"])


def test_unknown_cut_is_rejected() -> None:
    model = graph.prepare(synth.mlp())
    with pytest.raises(CutError, match="unknown cut"):
        graph.find_cut(model, "nope")
    with pytest.raises(CutError, match="unknown cut tensor"):
        graph.split(model, ["nope"])
    with pytest.raises(CutError, match="unknown output"):
        graph.extract_outputs(model, ["nope"])


def test_corrupt_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a protobuf \xff\xff\xff")
    with pytest.raises(ModelLoadError, match="not a valid ONNX model"):
        graph.load_model(bad)
    with pytest.raises(ModelLoadError, match="not found"):
        graph.load_model(tmp_path / "missing.onnx")


def test_layer_features_follow_edgent_table_i(bundle: Bundle) -> None:
    conv2 = bundle.layers["conv2"].features
    assert conv2["input_bytes"] == 32 * 14 * 14 * 4
    assert conv2["filter_term"] == 5 * 5 * 128  # (filter size / stride)^2 * filters
    assert conv2["flops"] == 2 * 128 * 14 * 14 * 32 * 25
    pool1 = bundle.layers["pool1"].features
    assert (pool1["input_bytes"], pool1["output_bytes"]) == (32 * 28 * 28 * 4, 32 * 14 * 14 * 4)
    assert bundle.layers["conv1"].kind == "conv" and bundle.layers["lrn1"].kind == "lrn"


def test_an_ir3_model_splits_at_every_cut() -> None:
    """Older model-zoo exports (IR < 4) list their weights as graph inputs too; every part must still check."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), f"W{i}") for i in range(2)]
    bias = numpy_helper.from_array(np.zeros(8, np.float32), "b")  # read by both layers: never a cut tensor
    nodes = [helper.make_node("Gemm", ["x", "W0", "b"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "W1", "b"], ["y"], name="fc2")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
              *(helper.make_tensor_value_info(w.name, TensorProto.FLOAT, [8, 8]) for w in weights),
              helper.make_tensor_value_info("b", TensorProto.FLOAT, [8])]
    old = helper.make_model(helper.make_graph(nodes, "ir3", inputs,
                                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                                              initializer=[*weights, bias]),
                            opset_imports=[helper.make_opsetid("", 7)], ir_version=3)
    onnx.checker.check_model(old)
    model = graph.prepare(old)
    assert graph.graph_inputs(model) == ["x"] and model.ir_version == 4
    feed = {"x": rng.standard_normal((1, 8)).astype(np.float32)}
    whole = _run(model, feed)
    cuts = graph.cuts(model)
    assert [c.name for c in cuts] == ["h", "r"]
    for cut in cuts:
        _assert_split_composes(model, cut, feed, whole)


def test_real_models_layer_kinds_and_features() -> None:
    """A depthwise conv, its strided work and its groups x taps; an element-wise Add; a MatMul; a Sigmoid."""
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((8, 1, 5, 5)).astype(np.float32), "w")
    m = onnx.numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "m")
    nodes = [onnx.helper.make_node("Conv", ["x", "w"], ["d"], name="dw", group=8, strides=[2, 2], pads=[2] * 4,
                                   kernel_shape=[5, 5]),
             onnx.helper.make_node("Sigmoid", ["d"], ["s"], name="sig"),
             onnx.helper.make_node("Add", ["s", "d"], ["a"], name="add"),
             onnx.helper.make_node("MatMul", ["a", "m"], ["y"], name="mm")]
    model = onnx.helper.make_model(onnx.helper.make_graph(
        nodes, "kinds", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8, 4, 3])], [w, m]),
        opset_imports=[onnx.helper.make_opsetid("", 17)])
    lay = {x.name: x for x in graph.layers(graph.prepare(model))}
    assert {n: x.kind for n, x in lay.items()} == {"dw": "dwconv", "sig": "act_exp", "add": "add", "mm": "matmul"}
    dw = lay["dw"].features
    assert dw["flops"] == 2 * 8 * 4 * 4 * 25 and dw["strided_flops"] == 4 * dw["flops"]
    assert dw["kernel_groups"] == 8 * 25 and dw["param_bytes"] == 8 * 25 * 4
    assert lay["mm"].features["flops"] == 2 * (8 * 4 * 3) * 4
