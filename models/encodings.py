"""Measure what encoding a bundle's cut tensors costs in accuracy and saves in bytes, into its manifest.

For every tensor set that crosses somewhere (each exit's listed cuts and the input), the test set runs through the
head, each image's crossing tensors go through the wire's own encode and decode (``protocol.tensors``: per-image
scale and zero point, as deviced sends them), and the tail of every exit that can be cut there runs on the result.
An encoding's accuracy is the exit's float32 accuracy moved by the change the encoding makes on the same inputs.
Lossless zstd keeps its precision's accuracy; its bytes vary with the data, so they are the mean over the first
``BYTES_SAMPLE`` images. The planner only ever chooses an encoding whose accuracy is in the manifest.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from tqdm import tqdm

from models import graph
from models.bundle import MANIFEST, Bundle, batch_session, load_bundle
from models.data import load_fashion_mnist
from protocol.tensors import ENCODED, encode_tensor, roundtrip

MEASURED = ENCODED
PRECISIONS = ("float32", "float16", "int8")  # float32 too: the accuracy zstd keeps, on the same inputs
BYTES_SAMPLE = 250  # zstd sizes vary little between images; compressing every one of 10,000 dominates the run
BATCH = 250


def measure(path: Path | str, *, x: npt.NDArray[np.float32] | None = None, y: npt.NDArray[np.int64] | None = None,
            images: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Measure every (exit, cut, encoding) of the bundle at ``path`` on the labelled inputs ``x``, ``y`` (default:
    the Fashion-MNIST test set through the bundle's preprocessing), the first ``images`` of them (all by default),
    and write the results into its manifest; returns a summary."""
    bundle = load_bundle(path)
    if x is None or y is None:
        raw_images, labels = load_fashion_mnist("test")
        x, y, source = bundle.preprocess(raw_images), labels, "fashion-mnist test"
    else:
        source = "the labelled set given"
    n = len(y) if images is None else min(images, len(y))
    x, y = x[:n], y[:n]
    model = graph.prepare(bundle.model)
    sets: dict[frozenset[str], list[int]] = {}  # crossing tensors -> the exits cut there
    for ex in bundle.exits:
        for tensors in (frozenset({ex.input}), *(c.tensors for c in ex.cuts)):
            sets.setdefault(tensors, []).append(ex.index)
    results: dict[tuple[int, frozenset[str]], dict[str, dict[str, float]]] = {}
    bar = tqdm(total=len(sets), desc=f"encodings {bundle.name}", unit="cut", disable=not progress)
    for tensors, exits in sets.items():
        outputs = [bundle.exit(e).output for e in exits]
        accuracy, nbytes = _measure_cut(model, bundle, tensors, outputs, x, y)
        for e, acc in zip(exits, accuracy, strict=True):
            # the exit's float32 accuracy moved by what the encoding changed on the same inputs (all of the test set
            # by default; on a part of it, the part's own float32 accuracy would not be the exit's); zstd is
            # lossless: its precision's
            results[(e, tensors)] = {enc: {"accuracy": round(bundle.exit(e).accuracy + acc[enc.partition("+")[0]]
                                                             - acc["float32"], 4),
                                           "bytes": round(nbytes[enc], 1)} for enc in MEASURED}
        bar.update()
    bar.close()
    manifest = json.loads((bundle.path / MANIFEST).read_text())
    for e in manifest["exits"]:
        ex = bundle.exit(int(e["index"]))
        e["input_encodings"] = results[(ex.index, frozenset({ex.input}))]
        for c in e["cuts"]:
            c["encodings"] = results[(ex.index, frozenset(c["tensors"]))]
    manifest["encodings"] = {"measured_on": f"{source}, first {n} inputs", "bytes_mean_over": min(BYTES_SAMPLE, n),
                             "zstd_level": 1, "scheme": "int8: per-tensor affine, per input; float16; zstd of any"}
    (bundle.path / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return {"bundle": bundle.name, "inputs": n, "crossing_sets": len(sets),
            "exits": [{"exit": e["index"], "accuracy": e["accuracy"], "input": e["input_encodings"],
                       "cuts": {c["name"]: c["encodings"] for c in e["cuts"]}} for e in manifest["exits"]]}


def _measure_cut(model: onnx.ModelProto, bundle: Bundle, tensors: frozenset[str], outputs: list[str],
                 x: npt.NDArray[np.float32], y: npt.NDArray[np.int64]
                 ) -> tuple[list[dict[str, float]], dict[str, float]]:
    """(per output: accuracy per lossy precision, mean bytes per encoding) with ``tensors`` crossing encoded."""
    names = sorted(tensors)
    head = None if tensors == {bundle.input_name} else batch_session(graph.segment(model, [bundle.input_name],
                                                                                    names))
    tail = batch_session(graph.segment(model, names, outputs))
    correct = {p: np.zeros(len(outputs)) for p in PRECISIONS}
    sizes = {enc: 0.0 for enc in MEASURED}
    seen = 0
    for start, batch in _batches(x):
        values = dict(zip(names, head.run(names, {bundle.input_name: batch}), strict=True)) if head else \
            {bundle.input_name: batch}
        for precision in PRECISIONS:
            logits = tail.run(outputs, {t: roundtrip(v, precision) for t, v in values.items()})
            correct[precision] += [(lg.argmax(1) == y[start:start + len(batch)]).sum() for lg in logits]
        for i in range(min(len(batch), BYTES_SAMPLE - seen)):
            for enc in MEASURED:
                sizes[enc] += sum(len(encode_tensor(v[i:i + 1], enc)["data"]) for v in values.values())
            seen += 1
    return ([{p: float(correct[p][k] / len(y)) for p in PRECISIONS} for k in range(len(outputs))],
            {enc: total / max(seen, 1) for enc, total in sizes.items()})


def _batches(x: npt.NDArray[np.float32]) -> Iterator[tuple[int, npt.NDArray[np.float32]]]:
    for start in range(0, len(x), BATCH):
        yield start, x[start:start + BATCH]
