import numpy as np
import onnxruntime as ort
import pytest
import torch

from models import branchy
from models.data import load_fashion_mnist, preprocess
from models.train import BranchyAlexNet, evaluate, train


@pytest.mark.parametrize("arch", branchy.ARCHS.values(), ids=list(branchy.ARCHS))
def test_onnx_built_from_torch_weights_matches_torch(arch: branchy.Arch) -> None:
    torch.manual_seed(0)
    model = BranchyAlexNet(arch).eval()
    images, _ = load_fashion_mnist("test")
    x = preprocess(images[:4], arch.upsample)
    assert x.shape[1:] == arch.input_shape
    with torch.no_grad():
        expected = [o.numpy() for o in model(torch.from_numpy(x))]
    onnx_model = arch.build_onnx(model.numpy_weights())
    session = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    for i in range(len(x)):
        got = session.run(list(arch.exit_names), {"input": x[i:i + 1]})
        for e in range(arch.num_exits):
            np.testing.assert_allclose(got[e][0], expected[e][i], rtol=1e-4, atol=1e-4)


def test_an_arch_needs_one_branch_per_side_exit() -> None:
    with pytest.raises(ValueError, match="branches"):
        branchy.Arch(name="x", input_shape=(1, 28, 28), trunk=branchy.ALEXNET28.trunk,
                     branches=branchy.ALEXNET28.branches[:2])


def test_a_few_training_steps_learn_something() -> None:
    model, report = train(epochs=1.0, batch=64, subset=640, lr=2e-3, finetune_epochs=0.5, progress=False,
                          log=lambda _: None)
    assert report["steps"] == 10 and report["train_images"] == 640 and report["finetune_steps"] == 5
    images, labels = load_fashion_mnist("test")
    accuracy = evaluate(model, preprocess(images[:1000]), labels[:1000])
    assert len(accuracy) == branchy.ALEXNET28.num_exits
    assert max(accuracy) > 0.3  # chance is 0.1


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_branchy_resnet_exports_a_dag_bundle_equal_to_torch(tmp_path: object) -> None:
    from pathlib import Path

    from models import graph, resnet
    from models.bundle import load_bundle

    model, report = resnet.train(epochs=1.0, batch=64, subset=320, progress=False)
    assert report["steps"] == 5
    out = resnet.export_bundle(model, Path(str(tmp_path)) / "resnet", report)
    bundle = load_bundle(out)
    assert [e.output for e in bundle.exits] == ["exit1", "exit2", "exit3"]
    # a DAG: a residual block's skip and branch make cuts inside blocks multi-tensor; block boundaries are cuts
    exit3 = bundle.exit_model(3)
    assert len(graph.cuts(exit3)) < len(exit3.graph.node) - 1
    images, _ = load_fashion_mnist("test")
    x = preprocess(images[:2])
    with torch.no_grad():
        expected = [o.numpy() for o in model.eval()(torch.from_numpy(x))]
    session = ort.InferenceSession(bundle.model.SerializeToString(), providers=["CPUExecutionProvider"])
    for i in range(len(x)):
        got = session.run(["exit1", "exit2", "exit3"], {"input": x[i:i + 1]})
        for e in range(3):
            np.testing.assert_allclose(got[e][0], expected[e][i], rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_56x56_resnet_has_a_bottleneck_cut_smaller_than_its_input(tmp_path: object) -> None:
    """The heavy DAG bundle's architecture: its only cuts below the input's size are the bottleneck and later
    (every activation before it is larger than the 56x56 image), so a split can beat sending the input."""
    from pathlib import Path

    import onnx

    from models import graph, resnet

    arch = resnet.RESNET56
    model = resnet.BranchyResNet(arch).eval()
    path = Path(str(tmp_path)) / "r56.onnx"
    torch.onnx.export(model, (torch.zeros(1, 1, arch.side, arch.side),), str(path), input_names=["input"],
                      output_names=["exit1", "exit2", "exit3"], dynamo=False)
    prepared = graph.prepare(graph.extract_outputs(onnx.load(str(path)), ["exit3"]))
    input_bytes = 4 * arch.side ** 2
    small = [c for c in graph.cuts(prepared) if c.bytes < input_bytes]
    assert small, "no cut smaller than the input"
    first = small[0]
    assert first.bytes == 4 * arch.bottleneck * (arch.side // 4) ** 2  # 8 channels at 14x14
    assert all(c.bytes >= input_bytes for c in graph.cuts(prepared) if c.index < first.index)
