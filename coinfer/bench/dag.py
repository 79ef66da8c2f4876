"""``coinfer bench dag``: the min-cut policy on DAG models against the best single-tensor cut.

For each model (the synthetic residual, inception and reduction DAGs; the shipped branchy ResNets;
torchvision's ResNet-18, MobileNetV2, GoogLeNet and DenseNet-121 with random weights at 224x224 when
torchvision is importable) and each device (Edgent's Raspberry Pi 3 model; the desktop model 10x slower, a
faster device) against the desktop edge: the min-cut plan's predicted latency over a bandwidth sweep beside
the best single-tensor cut (what the chain planner finds), device-only and edge-only; decision times (the
prepared lookup and a per-request min-cut); and, for every multi-tensor cut chosen, that head + tail compute
what the whole exit does.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from coinfer.bench import planner as bench
from models import graph, loaders, synth
from models.bundle import BUNDLES_DIR, MANIFEST, describe, load_bundle
from models.ort import onnxruntime as ort
from models.profile import random_feed
from planner import baselines, candidates, edgent, mincut, policies
from planner.core import Conditions, Decision, Prepared, View, allow_encodings, exits_from_manifest
from planner.latency import LatencyModel

BANDWIDTHS = (3e4, 1e5, 3e5, 1e6, 3e6, 1e7, 3e7, 1e8)
SHIPPED_DAGS = ("fmnist-branchy-resnet", "fmnist56-branchy-resnet")
TORCHVISION = ("resnet18", "mobilenet_v2", "googlenet", "densenet121")


def models() -> tuple[dict[str, Callable[[], onnx.ModelProto]], str]:
    """The models to plan, and a note on what was left out."""
    found: dict[str, Callable[[], onnx.ModelProto]] = {
        "residual_net": lambda: synth.residual_net(blocks=8, channels=32, side=32),
        "inception_net": lambda: synth.inception_net(side=32),
        "reduction_net": synth.reduction_net,
        # ResNet-18's real layer shapes at 224x224 (batch norm folded, random weights), built without torchvision
        "resnet18_shapes": synth.resnet18,
    }
    for name in SHIPPED_DAGS:
        shipped = BUNDLES_DIR / name
        if (shipped / MANIFEST).exists():
            found[name] = _bundle_model(shipped)
    try:
        import torchvision  # noqa: F401 - optional: only to export real topologies
    except (ImportError, RuntimeError) as exc:  # RuntimeError: a torchvision built for another torch
        return found, f"torchvision unusable here ({exc}): the real topologies were left out"
    for name in TORCHVISION:
        found[name] = _torchvision_factory(name)
    return found, ""


def _bundle_model(path: Path) -> Callable[[], onnx.ModelProto]:
    return lambda: load_bundle(path).model


def run(out_dir: Path, *, requests: int = 2000, log: Callable[[str], None] = print) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    edge = loaders.load_latency_model(loaders.DESKTOP_MODEL)
    pi3 = loaders.load_latency_model(loaders.PI3_MODEL)
    devices = {"pi3": pi3, "desktop/10": edge.scaled(10.0, edge.stage_overhead_s, name="desktop-x10",
                                                     meta={"from": edge.name, "slowdown": 10})}
    found, note = models()
    if note:
        log(note)
    doc: dict[str, Any] = {"bandwidths_bps": list(BANDWIDTHS), "edge_model": edge.name, "note": note, "models": {}}
    for name, factory in found.items():
        model = graph.prepare(factory())
        exits = exits_from_manifest(describe(model))
        entry: dict[str, Any] = {"nodes": len(model.graph.node), "devices": {}}
        for device_name, device in devices.items():
            entry["devices"][device_name] = _sweep(exits, device, edge, requests)
        entry["exact"] = _exactness(model, entry)
        doc["models"][name] = entry
        d = entry["devices"]["pi3"]
        wins = sum(r["gain"] > 1.0001 for dev in entry["devices"].values() for r in dev["rows"])
        log(f"{name}: {entry['nodes']} nodes, {d['candidates']} candidate cuts (prepared in {d['prepare_s']:.2f} s); "
            f"lookup p50 {d['lookup']['p50_s'] * 1e6:.0f} us, min-cut p50 {d['min_cut']['p50_s'] * 1e3:.2f} ms; "
            f"multi-tensor wins at {wins} of {len(BANDWIDTHS) * len(devices)} points; "
            f"max |head+tail - whole| {entry['exact']['max_abs_diff']:.2g}")
    (out_dir / "dag.json").write_text(json.dumps(doc, indent=1) + "\n")
    _plot(out_dir / "dag.png", doc)
    return doc


def _sweep(exits: Any, device: LatencyModel, edge: LatencyModel, requests: int) -> dict[str, Any]:
    exits = allow_encodings(exits, ())  # cuts against cuts: every tensor crosses as float32 on both sides
    policy = policies.make("mincut")
    start = time.perf_counter()
    prepared = policy.compile(exits, device, edge)
    prepare_s = time.perf_counter() - start
    single = candidates.compile_candidates(exits, device, edge)
    rows = []
    for bps in BANDWIDTHS:
        cond = Conditions(bandwidth_bps=bps, deadline_s=1e6)
        ours, theirs = policy.decide(View(prepared=prepared, conditions=cond)), edgent.plan(single, cond)
        base = baselines.baselines(single, cond)
        assert isinstance(ours, Decision) and isinstance(theirs, Decision)
        device_only, edge_only = base["device_only"], base["edge_only"]
        assert isinstance(device_only, Decision) and isinstance(edge_only, Decision)
        rows.append({"bandwidth_bps": bps, "mincut_s": ours.predicted_s, "single_cut_s": theirs.predicted_s,
                     "device_only_s": device_only.predicted_s, "edge_only_s": edge_only.predicted_s,
                     "gain": theirs.predicted_s / ours.predicted_s, "exit": ours.exit,
                     "crossing": sorted(ours.cut_tensors),
                     "single_crossing": sorted(theirs.cut_tensors)})
    g = mincut.from_exit(exits[0], device, edge)
    return {"candidates": int(prepared.candidates.exit.size), "single_cut_candidates": int(single.exit.size),
            "prepare_s": prepare_s, "rows": rows,
            "lookup": bench.decision_times(prepared, requests, decide=policy.decide),
            "single_cut_search": bench.decision_times(Prepared(candidates=single), requests,
                                                      decide=lambda v: edgent.plan(v.candidates, v.conditions)),
            "min_cut": bench.solve_times(g, solves=100),
            "brute_force": bench.brute_force_times(g)}


def _exactness(model: onnx.ModelProto, entry: dict[str, Any]) -> dict[str, Any]:
    """Every multi-tensor cut chosen: head then tail against the whole model on a random input."""
    cuts = {(r["exit"], tuple(r["crossing"])) for dev in entry["devices"].values() for r in dev["rows"]
            if len(r["crossing"]) > 1}
    outputs = [o.name for o in model.graph.output]
    worst = 0.0
    for exit_index, tensors in sorted(cuts):
        sub = graph.prepare(graph.extract_outputs(model, [outputs[exit_index - 1]]))
        feed = random_feed(sub, np.random.default_rng(0))
        whole = _run(sub, feed)
        head, tail = graph.split(sub, tensors)
        out = _run(tail, _run(head, feed))
        worst = max(worst, *(float(np.max(np.abs(out[k] - v))) for k, v in whole.items()))
    return {"multi_tensor_cuts": [{"exit": e, "tensors": list(c)} for e, c in sorted(cuts)], "max_abs_diff": worst}


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed), strict=True))


def _torchvision_factory(name: str) -> Callable[[], onnx.ModelProto]:
    def build() -> onnx.ModelProto:
        import tempfile

        import torch
        import torchvision

        kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
        net = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.onnx"
            torch.onnx.export(net, (torch.randn(1, 3, 224, 224),), str(path), input_names=["input"], dynamo=False)
            return onnx.load(str(path))

    return build


def _plot(path: Path, doc: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["models"])
    cols = min(3, len(names))
    rows_n = -(-len(names) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.6 * rows_n), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names, strict=False):
        rows = doc["models"][name]["devices"]["pi3"]["rows"]
        bw = [r["bandwidth_bps"] / 1e6 for r in rows]
        for key, label, style in (("mincut_s", "min-cut", "o-"), ("single_cut_s", "best single cut", "s--"),
                                  ("edge_only_s", "edge only", ":"), ("device_only_s", "device only", "-.")):
            ax.plot(bw, [r[key] for r in rows], style, label=label)
        ax.set(xscale="log", yscale="log", xlabel="uplink (Mbps)", ylabel="predicted latency (s)",
               title=f"{name} ({doc['models'][name]['nodes']} nodes)")
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("min-cut vs best single-tensor cut (device: Edgent's Pi 3 model; edge: desktop)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
