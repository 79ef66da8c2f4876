"""Model bundles: ONNX file(s) plus a ``manifest.json`` describing layers, exits, cuts and hashes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from models import data, graph
from models.errors import BundleError, ModelLoadError
from planner.core import ExitInfo, exits_from_manifest
from planner.errors import PlannerError

FORMAT = "coinfer.bundle/1"
MODEL_FILE = "model.onnx"
MANIFEST = "manifest.json"
BUNDLES_DIR = Path(__file__).parent / "bundles"
DEFAULT_BUNDLE = BUNDLES_DIR / "fmnist-branchy-alexnet"


@dataclass(frozen=True, slots=True)
class Bundle:
    """A loaded, hash-verified bundle."""

    path: Path
    name: str
    digest: str  # sha256 of manifest.json, which pins every file's own sha256
    manifest: dict[str, Any]
    model: onnx.ModelProto
    layers: dict[str, graph.Layer]
    exits: tuple[ExitInfo, ...]

    @property
    def input_name(self) -> str:
        return str(self.manifest["input"]["name"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.manifest["input"]["shape"])

    def preprocess(self, images: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        """Fashion-MNIST uint8 images (N, 28, 28) -> this bundle's input tensors (N, 1, H, W)."""
        steps = self.manifest["input"].get("preprocess")
        if steps is None:
            raise BundleError(f"bundle {self.name} takes its input tensors as they are, not Fashion-MNIST images")
        return data.preprocess(images, int(steps.get("upsample", 1)))

    def exit_model(self, index: int) -> onnx.ModelProto:
        """The prepared sub-model computing exit ``index`` (1-based) alone."""
        info = self.exit(index)
        return graph.prepare(graph.extract_outputs(self.model, [info.output]))

    def exit(self, index: int) -> ExitInfo:
        """Exit ``index`` (1-based) as the planner sees it."""
        if not 1 <= index <= len(self.exits):
            raise BundleError(f"exit {index} out of range 1..{len(self.exits)}")
        return self.exits[index - 1]


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_bundle(path: Path | str = DEFAULT_BUNDLE) -> Bundle:
    """Read a bundle directory, verify every file's sha256 and the manifest, and load the model."""
    path = Path(path)
    manifest_path = path / MANIFEST
    try:
        raw = manifest_path.read_bytes()
        manifest = json.loads(raw)
    except FileNotFoundError as exc:
        raise BundleError(f"{manifest_path} not found: not a coinfer bundle") from exc
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read {manifest_path}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{manifest_path}: not a {FORMAT} manifest")
    try:
        files: dict[str, dict[str, Any]] = manifest["files"]
        for name, meta in files.items():
            file_path = path / name
            if not file_path.is_file():
                raise BundleError(f"bundle file {file_path} is missing")
            if sha256_file(file_path) != meta["sha256"]:
                raise BundleError(f"{file_path}: sha256 mismatch (corrupt or modified bundle)")
        try:
            model = graph.load_model(path / manifest["model"], normalise=False)  # written normalised
        except ModelLoadError as exc:
            raise BundleError(str(exc)) from exc
        layers = {lay.name: lay for lay in graph.layers(model)}
        exits = exits_from_manifest(manifest)
        name = str(manifest["name"])
    except (KeyError, TypeError, ValueError, PlannerError) as exc:
        raise BundleError(f"{manifest_path}: malformed manifest ({exc!r})") from exc
    return Bundle(path=path, name=name, digest=hashlib.sha256(raw).hexdigest(), manifest=manifest,
                  model=model, layers=layers, exits=exits)


def batch_session(model: onnx.ModelProto) -> Any:
    """An onnxruntime session of ``model`` whose inputs and outputs take any batch size (their first dimension),
    for measuring on a whole labelled set."""
    from models.ort import onnxruntime as ort

    dynamic = onnx.ModelProto()
    dynamic.CopyFrom(model)
    for vi in [*dynamic.graph.input, *dynamic.graph.output]:
        vi.type.tensor_type.shape.dim[0].dim_param = "batch"
    del dynamic.graph.value_info[:]
    return ort.InferenceSession(dynamic.SerializeToString(), providers=["CPUExecutionProvider"])


def exit_accuracies(model: onnx.ModelProto, outputs: Sequence[str], x: npt.NDArray[np.float32],
                    y: npt.NDArray[np.int64], batch: int = 500) -> list[float]:
    """Top-1 accuracy of each output of ``model`` on (x, y), run with onnxruntime at batch size ``batch``."""
    session = batch_session(model)
    input_name = session.get_inputs()[0].name
    correct = np.zeros(len(outputs))
    for i in range(0, len(x), batch):
        logits = session.run(list(outputs), {input_name: x[i:i + batch]})
        correct += [(lg.argmax(1) == y[i:i + batch]).sum() for lg in logits]
    return [float(c / len(x)) for c in correct]


def describe(model: onnx.ModelProto, accuracy: Sequence[float] | None = None) -> dict[str, Any]:
    """The manifest's description of any prepared single-input model: its input, its layers, and one exit per
    graph output with its layers and single-tensor cuts (``accuracy`` per output, 0 where unmeasured)."""
    inputs = graph.graph_inputs(model)
    if len(inputs) != 1:
        raise BundleError(f"the model takes {len(inputs)} inputs {inputs}; coinfer plans models of one input")
    outputs = [o.name for o in model.graph.output]
    exits = []
    for i, output in enumerate(outputs):
        sub = graph.prepare(graph.extract_outputs(model, [output]))
        exits.append({"index": i + 1, "output": output, "layers": [n.name for n in sub.graph.node],
                      "accuracy": round(accuracy[i], 4) if accuracy else 0.0,
                      "flops": sum(lay.features["flops"] for lay in graph.layers(sub)),
                      "cuts": [c.to_json() for c in graph.cuts(sub)]})
    inp = next(i for i in model.graph.input if i.name == inputs[0])
    return {"input": {"name": inp.name, "dtype": "float32",
                      "shape": [d.dim_value for d in inp.type.tensor_type.shape.dim]},
            "layers": [lay.to_json() for lay in graph.layers(model)], "exits": exits}


def write_bundle(model: onnx.ModelProto, out_dir: Path, *, name: str, upsample: int = 1,
                 test_images: npt.NDArray[np.float32], test_labels: npt.NDArray[np.int64],
                 training: dict[str, object]) -> Path:
    """Write a Fashion-MNIST ``model`` and its manifest (layers, exits with measured accuracy and cuts, hashes)."""
    prepared = graph.prepare(model)
    outputs = [o.name for o in prepared.graph.output]
    accuracy = exit_accuracies(prepared, outputs, test_images, test_labels)
    return package(model, out_dir, name=name, accuracy=accuracy, test_images=len(test_labels),
                   input_info={"preprocess": {"scale": 1 / 255, "mean": data.MEAN, "std": data.STD,
                                              "upsample": upsample},
                               "dataset": "fashion-mnist", "classes": list(data.CLASSES)},
                   training=training)


def package(model: onnx.ModelProto, out_dir: Path, *, name: str, accuracy: Sequence[float] | None,
            test_images: int = 0, input_info: dict[str, object] | None = None,
            training: dict[str, object] | None = None) -> Path:
    """Write any single-input ``model`` as a bundle: the model, and a manifest of its layers, one exit per graph
    output (``accuracy`` each, measured on ``test_images``; None: unmeasured, 0) with its cuts, and hashes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = describe(graph.prepare(model), accuracy)
    for e in doc["exits"]:
        e["test_images"] = test_images
        e["accuracy_measured"] = accuracy is not None
    model_path = out_dir / MODEL_FILE
    onnx.save(model, str(model_path))
    manifest = {
        "format": FORMAT,
        "name": name,
        "model": MODEL_FILE,
        "files": {MODEL_FILE: {"sha256": sha256_file(model_path), "bytes": model_path.stat().st_size}},
        "input": {**doc["input"], **(input_info or {})},
        "layers": doc["layers"],
        "exits": doc["exits"],
        "training": training or {},
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return out_dir
