"""Bring your own model: an ONNX classifier exported from torch (a residual block, two exits) packaged by
`coinfer bundle`, planned with the min-cut, served by edged and deviced through a real broker."""

from pathlib import Path

import numpy as np
import pytest
import torch  # the `train` extra, which `make test` installs

from coinfer.cli import main
from models.bundle import load_bundle
from models.runtime import StageRunner
from tests.daemons.conftest import Broker, serve_and_infer, whole_exit


def _export(path: Path) -> None:
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.a, self.b = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), \
                nn.Conv2d(8, 8, 3, padding=1)
            self.head1, self.head2, self.pool = nn.Linear(8 * 7 * 7, 10), nn.Linear(8 * 7 * 7, 10), nn.MaxPool2d(4)

        def forward(self, x: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
            x = torch.relu(self.stem(x))
            early = self.head1(torch.flatten(self.pool(x), 1))
            y = torch.relu(x + self.b(torch.relu(self.a(x))))  # a residual block: a DAG
            return early, self.head2(torch.flatten(self.pool(y), 1))

    torch.manual_seed(0)
    torch.onnx.export(Net().eval(), (torch.randn(1, 1, 28, 28),), str(path), input_names=["input"],
                      output_names=["early", "final"], dynamo=False)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_an_exported_model_is_packaged_planned_and_served(tmp_path: Path, broker: Broker, prefix: str,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    onnx_path, labels, out = tmp_path / "net.onnx", tmp_path / "labels.npz", tmp_path / "bundle"
    _export(onnx_path)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 1, 28, 28)).astype(np.float32)
    np.savez(labels, x=x, y=rng.integers(0, 10, 40))
    assert main(["bundle", str(onnx_path), "--out", str(out), "--labels", str(labels)]) == 0
    assert "exit 2 (final)" in capsys.readouterr().out
    bundle = load_bundle(out)
    assert [e.output for e in bundle.exits] == ["early", "final"] and bundle.manifest["exits"][0]["accuracy_measured"]
    np.savez(tmp_path / "bad.npz", x=x[:, :, :27], y=np.zeros(40))
    assert main(["bundle", str(onnx_path), "--out", str(tmp_path / "b2"), "--labels", str(tmp_path / "bad.npz")]) == 2
    assert "the model takes N x [1, 28, 28] inputs" in capsys.readouterr().err
    assert main(["plan", str(out), "--policy", "mincut", "--bandwidth", "1Mbps", "--deadline", "1s"]) in (0, 1)
    # encodings measured on the user's own labelled set: every exit's input and cuts, each with accuracy and bytes
    assert main(["encodings", str(out), "--labels", str(labels), "--json"]) == 0
    measured = load_bundle(out)
    assert all({e.name for e in ex.input_encodings} == {"float16", "int8", "float32+zstd", "float16+zstd",
                                                         "int8+zstd"} and all(c.encodings for c in ex.cuts)
               for ex in measured.exits)
    assert "the labelled set given" in measured.manifest["encodings"]["measured_on"]

    outcomes = await serve_and_infer(broker, prefix, out, x[:4], deadline=2.0, device_id="pi-own",
                                     initial_bandwidth="10Mbps", planner={"policy": "mincut"},
                                     encodings=())  # float32 across: the answers are the whole model's
    runner = StageRunner(bundle)
    assert any(o.where in ("edge", "split") for o in outcomes), [o.where for o in outcomes]
    for o, xi in zip(outcomes, x, strict=False):
        np.testing.assert_allclose(o.logits, whole_exit(runner, o.exit, xi), rtol=1e-5, atol=1e-5)
