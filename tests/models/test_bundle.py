import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models import branchy
from models.bundle import BUNDLES_DIR, Bundle, exit_accuracies, load_bundle
from models.data import load_fashion_mnist
from models.errors import BundleError


@pytest.fixture(scope="module", params=sorted(branchy.ARCHS))
def shipped(request: pytest.FixtureRequest) -> Bundle:
    """Each shipped bundle (one per architecture)."""
    return load_bundle(BUNDLES_DIR / request.param)


def test_every_architecture_ships_a_bundle_of_its_shape(shipped: Bundle) -> None:
    arch = branchy.ARCHS[shipped.name]
    assert shipped.input_shape == (1, *arch.input_shape)
    assert [len(e.layers) for e in shipped.exits] == [len(arch.exit_layers(i)) for i in range(arch.num_exits)]
    images, _ = load_fashion_mnist("test")
    assert shipped.preprocess(images[:2]).shape == (2, *arch.input_shape)


def test_manifest_describes_a_real_tradeoff(shipped: Bundle) -> None:
    bundle = shipped
    exits = bundle.exits
    assert len(exits) == 5
    flops = [e["flops"] for e in bundle.manifest["exits"]]
    assert flops == sorted(flops)
    assert exits[0].accuracy < max(e.accuracy for e in exits) - 0.02  # first exit clearly less accurate
    assert flops[0] < flops[-1] / 5  # and clearly cheaper
    kinds = {bundle.layers[lay.name].kind for lay in exits[-1].layers}
    assert {"conv", "relu", "pool", "lrn", "dropout", "fc"} <= kinds
    for layer in bundle.manifest["layers"]:
        assert {"type", "input_bytes", "output_bytes", "flops", "param_bytes"} <= layer.keys()


def test_recorded_accuracy_is_reproducible(shipped: Bundle) -> None:
    images, labels = load_fashion_mnist("test")
    outputs = [e.output for e in shipped.exits]
    measured = exit_accuracies(shipped.model, outputs, shipped.preprocess(images[:1000]), labels[:1000])
    # the manifest reports the full 10,000-image set; a tenth of it agrees within sampling noise (3 sigma)
    for e, acc in zip(shipped.exits, measured, strict=True):
        assert abs(e.accuracy - acc) < 0.04


def _copy(bundle: Bundle, tmp_path: Path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(bundle.path, dst)
    return dst


def test_tampered_model_fails_hash_check(bundle: Bundle, tmp_path: Path) -> None:
    dst = _copy(bundle, tmp_path)
    raw = bytearray((dst / "model.onnx").read_bytes())
    raw[-100] ^= 0xFF
    (dst / "model.onnx").write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="sha256 mismatch"):
        load_bundle(dst)


def test_missing_or_malformed_manifest(bundle: Bundle, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a coinfer bundle"):
        load_bundle(tmp_path)
    dst = _copy(bundle, tmp_path)
    manifest = json.loads((dst / "manifest.json").read_text())
    del manifest["exits"]
    (dst / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="malformed manifest"):
        load_bundle(dst)
    (dst / "model.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(dst)


def test_digest_pins_the_manifest(bundle: Bundle) -> None:
    assert len(bundle.digest) == 64 and load_bundle(bundle.path).digest == bundle.digest
    with pytest.raises(BundleError, match="out of range"):
        bundle.exit(6)
    x = np.zeros(bundle.input_shape, np.float32)
    assert x.shape == (1, 1, 28, 28)


@pytest.mark.parametrize("name", ["fmnist-branchy-resnet", "fmnist56-branchy-resnet"])
def test_the_shipped_dag_bundles_are_residual_networks_whose_accuracy_rises_with_depth(name: str) -> None:
    from models import graph, loaders
    from planner import candidates, core, edgent, policies

    bundle = load_bundle(BUNDLES_DIR / name)
    accuracy = [e.accuracy for e in bundle.exits]
    assert len(accuracy) == 3 and accuracy == sorted(accuracy) and accuracy[-1] > 0.85
    assert all(e["test_images"] == 10_000 for e in bundle.manifest["exits"])
    ops = {lay["op_type"] for lay in bundle.manifest["layers"]}
    assert "Add" in ops  # residual joins: a DAG, not a chain
    deepest = bundle.exit_model(3)
    assert len(graph.cuts(deepest)) < len(deepest.graph.node) - 1  # inside a block no single tensor separates
    device, edge = loaders.load_latency_model("pi3"), loaders.load_latency_model("desktop")
    policy = policies.make("mincut")
    cands = policy.compile(bundle.exits, device, edge)
    single = candidates.compile_candidates(bundle.exits, device, edge)
    for bps in (3e4, 3e5, 3e6, 3e7):
        cond = core.Conditions(bandwidth_bps=bps, deadline_s=1e6)
        ours, theirs = policy.decide(core.View(prepared=cands, conditions=cond)), edgent.plan(single, cond)
        assert isinstance(ours, core.Decision) and isinstance(theirs, core.Decision)
        assert ours.exit == theirs.exit == 3 and ours.predicted_s <= theirs.predicted_s * (1 + 1e-12)
