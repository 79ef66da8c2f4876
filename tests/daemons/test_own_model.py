"""Bring your own model: an ONNX classifier exported from torch (a residual block, two exits) packaged by
`coinfer bundle`, planned with the min-cut, served by edged and deviced through a real broker."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch  # the `train` extra, which `make test` installs

from coinfer.cli import main
from models.bundle import load_bundle
from models.runtime import StageRunner
from tests.daemons.conftest import REPO, Broker, free_port, serve_and_infer, whole_exit


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


def _readme_block(marker: str) -> str:
    lines = (REPO / "README.md").read_text().splitlines()
    start = lines.index(marker) + 2  # the marker, then the ```sh line
    return "\n".join(lines[start:lines.index("```", start)]) + "\n"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_readmes_own_model_path_runs_as_written(tmp_path: Path) -> None:
    """The README's "Bring your own model" block, verbatim, on a torch-exported two-head net and a labelled set:
    bundle, encodings, profile + fit (no guessing), plan, and the demo serving it on those inputs; then
    `deviced infer --inputs` on the same file."""
    import onnxruntime as ort

    from deviced.cli import main as deviced_main
    from tests.daemons.test_infeasible import export_mobilenet

    export_mobilenet(tmp_path / "net.onnx")
    x = np.random.default_rng(1).standard_normal((40, 1, 28, 28)).astype(np.float32)
    sess = ort.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    y = np.array([int(np.argmax(sess.run(["final"], {"input": xi[None]})[0])) for xi in x])
    np.savez(tmp_path / "held-out.npz", x=x, y=y)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", _readme_block("<!-- own-model -->")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fc " in done.stdout and "too few samples" in done.stdout  # fit fitted fewer variables and said so
    rows = [line for line in done.stdout.splitlines() if line.strip().startswith(("50kbps", "2Mbps"))]
    assert len(rows) == 2 and all("%" in r for r in rows), done.stdout  # the demo's table, one row per link
    assert (tmp_path / "net-latency.json").exists() and (tmp_path / "bundles/net/manifest.json").exists()
    conf = tmp_path / "deviced.toml"  # no broker here: answered on the device, and said so
    conf.write_text(f'[deviced]\ndevice_id = "pi-own"\nbundle = "{tmp_path / "bundles/net"}"\n'
                    f'latency_model = "{tmp_path / "net-latency.json"}"\n\n[broker]\nport = {free_port()}\n')
    out = subprocess.run([sys.executable, "-m", "deviced.cli", "infer", "--inputs", str(tmp_path / "held-out.npz"),
                          "--count", "5", "--config", str(conf), "--deadline", "1s"], capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 5 and "answering on this device" in out.stderr
    assert "5 inputs: met 100%" in out.stderr and "accuracy 1.0000" in out.stderr  # exit 2 on the device
    assert deviced_main(["infer", "--config", str(conf)]) == 2  # neither images nor --inputs: a clear error
