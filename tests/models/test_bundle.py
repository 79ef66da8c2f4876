import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.bundle import Bundle, exit_accuracies, load_bundle
from models.data import load_fashion_mnist, preprocess
from models.errors import BundleError


def test_manifest_describes_a_real_tradeoff(bundle: Bundle) -> None:
    exits = bundle.exits
    assert len(exits) == 5
    flops = [e["flops"] for e in bundle.manifest["exits"]]
    assert flops == sorted(flops)
    assert exits[0].accuracy < exits[-1].accuracy - 0.02  # first exit clearly less accurate
    assert flops[0] < flops[-1] / 5  # and clearly cheaper
    kinds = {bundle.layers[name].kind for name in exits[-1].layers}
    assert {"conv", "relu", "pool", "lrn", "dropout", "fc"} <= kinds
    for layer in bundle.manifest["layers"]:
        assert {"type", "input_bytes", "output_bytes", "flops", "param_bytes"} <= layer.keys()


def test_recorded_accuracy_is_reproducible(bundle: Bundle) -> None:
    images, labels = load_fashion_mnist("test")
    outputs = [e.output for e in bundle.exits]
    measured = exit_accuracies(bundle.model, outputs, preprocess(images[:2000]), labels[:2000])
    # the manifest reports the full 10,000-image set; a fifth of it agrees within sampling noise
    for e, acc in zip(bundle.exits, measured, strict=True):
        assert abs(e.accuracy - acc) < 0.03


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
