"""A user's MobileNetV2-like two-head net on a slow uplink: when no plan is predicted to meet the deadline, the
device runs the plan predicted fastest of all (encodings, exits, local), never waits past the deadline for an
answer that cannot come in time, and learns from what it ran."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch  # the `train` extra, which `make test` installs

from coinfer.cli import main
from deviced.config import DevicedConfig
from deviced.engine import ANSWER_SLACK
from deviced.service import Client
from edged.config import EdgedConfig
from tests.daemons.conftest import Broker, EdgeProcess

REQUESTS = 60


def export_mobilenet(path: Path) -> None:
    """A MobileNetV2-like classifier (inverted residual blocks: 1x1 expand, 3x3 depthwise, 1x1 project, residual
    adds) with an early head after the second block and a final one; random weights."""
    from torch import nn

    def block(c: int, expand: int = 4) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c, c * expand, 1), nn.ReLU6(),
                             nn.Conv2d(c * expand, c * expand, 3, padding=1, groups=c * expand), nn.ReLU6(),
                             nn.Conv2d(c * expand, c, 1))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU6())
            self.b1, self.b2 = block(16), block(16)
            self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU6())
            self.b3, self.b4 = block(32), block(32)
            self.early, self.final = nn.Linear(16, 10), nn.Linear(32, 10)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = self.stem(x)
            x = x + self.b1(x)
            x = x + self.b2(x)
            early = self.early(x.mean(dim=(2, 3)))
            x = self.down(x)
            x = x + self.b3(x)
            x = x + self.b4(x)
            return early, self.final(x.mean(dim=(2, 3)))

    torch.manual_seed(0)
    torch.onnx.export(Net().eval(), (torch.randn(1, 1, 28, 28),), str(path), input_names=["input"],
                      output_names=["early", "final"], dynamo=False)


@pytest.fixture(scope="module")
def own_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, Path]:
    """The net packaged, its encodings measured on a labelled set (labels: the final head's own answers), and this
    host's latency model fitted on its profile (the README's path)."""
    import onnxruntime as ort

    tmp = tmp_path_factory.mktemp("own")
    onnx_path, labels, out, fitted = tmp / "net.onnx", tmp / "labels.npz", tmp / "bundle", tmp / "latency.json"
    export_mobilenet(onnx_path)
    x = np.random.default_rng(0).standard_normal((60, 1, 28, 28)).astype(np.float32)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    y = np.array([int(np.argmax(sess.run(["final"], {"input": xi[None]})[0])) for xi in x])
    np.savez(labels, x=x, y=y)
    assert main(["bundle", str(onnx_path), "--out", str(out), "--labels", str(labels)]) == 0
    assert main(["encodings", str(out), "--labels", str(labels), "--json"]) == 0
    assert main(["profile", str(out), "--out", str(tmp / "profile.json")]) == 0
    assert main(["fit", str(tmp / "profile.json"), "--out", str(fitted)]) == 0
    return out, x, fitted


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(("deadline_s", "own_model"), [(0.2, False), (0.1, False), (0.1, True)])
async def test_a_slow_uplink_never_waits_on_a_plan_that_cannot_work(own_bundle: tuple[Path, np.ndarray, Path],
                                                                    broker: Broker, prefix: str, deadline_s: float,
                                                                    own_model: bool) -> None:
    """The issue's scenario: 50 kbps, the Pi 3 reference model (it predicts this net at seconds on the device: far
    off), 200 and 100 ms. Before: at 100 ms every request ran float32 edge-only (predicted 540 ms while an int8 plan
    was predicted at 170 ms), waited ~545 ms and fell back (0% met). Now the plan predicted fastest runs and the wait
    ends when its answer is due; with the device's own fitted model the device meets 100 ms."""
    bundle, x, fitted = own_bundle
    edge = EdgeProcess(EdgedConfig(edge_id=f"edge-{prefix}", topic_prefix=prefix, broker=broker.config,
                                   bundles=(bundle,)))
    extra = {"latency_model": fitted} if own_model else {}
    cfg = DevicedConfig(device_id="pi-slow", topic_prefix=prefix, broker=broker.config, probe_interval_s=0,
                        bundle=bundle, emulate_uplink="50kbps", initial_bandwidth="50kbps", **extra)
    try:
        async with Client(cfg) as client:
            assert await client.wait_for_edge(10)
            outcomes = [await client.infer(x[i % len(x)], deadline=deadline_s) for i in range(REQUESTS)]
    finally:
        await edge.stop()
    latency = np.array([o.latency_s for o in outcomes])
    met = float(np.mean([o.met for o in outcomes]))
    print(f"\n50 kbps, {deadline_s * 1e3:.0f} ms, {'own' if own_model else 'Pi 3'} model: met {met:.0%}, p95 "
          f"{np.percentile(latency, 95) * 1e3:.0f} ms, predicted median "
          f"{np.median([o.plan.predicted_s for o in outcomes]) * 1e3:.0f} ms, measured "
          f"{np.median(latency) * 1e3:.0f} ms, "
          f"fallbacks {sum(o.fallback is not None for o in outcomes)}, "
          f"plans {sorted({(o.plan.exit, o.plan.where.value, o.plan.encoding) for o in outcomes})}")
    for o in outcomes:
        # never float32 across when the same exit and cut cross encoded, and never a wait past the answer's due
        # time by more than a local run (generous: scheduling noise)
        assert o.plan.where == "device" or o.plan.encoding != "float32"
        assert o.latency_s <= max(deadline_s, o.plan.bound_s * ANSWER_SLACK) + 0.25, o.record()
    if deadline_s == 0.2 or own_model:  # a plan meets it: the int8 upload, or the device itself
        assert met >= 0.8, [o.record() for o in outcomes if not o.met][:3]
