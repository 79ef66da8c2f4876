"""``coinfer bench dag``'s prediction part: does a latency model fitted on this host predict real models?

A latency model of this host (onnxruntime, one thread) is fitted on random networks made of the blocks real
models use (``models.zoo.RandomNet``: never a corpus model), then each corpus model is profiled: its whole run
predicted (the sum of its layers' predictions and one stage overhead) against the measured median, and the
median error of its layers. "Before": the same profiles fitted with the kinds real models need collapsed into
Edgent's Table I types, as the planner costed them before (a depthwise conv as a conv, a MatMul as an fc, the
rest through the "other" fallback).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx

from models import corpus, graph, profile
from planner.latency import FIT_VARIABLES, LatencyModel, Sample, fit

TABLE_I_KIND = {"dwconv": "conv", "matmul": "fc"}  # everything else new falls back to "other"
OLD_KINDS = {"conv", "relu", "pool", "lrn", "dropout", "fc"}
REPEATS = 3


def collapsed(kind: str) -> str:
    """A layer's kind as the planner saw it before real models' kinds were added."""
    kind = TABLE_I_KIND.get(kind, kind)
    return kind if kind in OLD_KINDS else "other"


def fit_host(nets: int, *, runs: int, log: Callable[[str], None]) -> tuple[LatencyModel, LatencyModel, dict[str, Any]]:
    """Latency models of this host fitted on ``nets`` random networks: (with the new kinds, Table I kinds only,
    the profile document)."""
    models = []
    for seed in range(nets):
        models.append((f"random_net_{seed}", graph.prepare(graph.normalised(corpus.random_net(seed)))))
    doc = profile.profile_models(models, threads=1, warmup=3, runs=runs,
                                 progress=lambda i, n, name: log(f"  profiling [{i + 1}/{n}] {name}"))
    samples, overhead = profile.samples_from_profiles([doc])
    after = fit(samples, name="this-host-1t", variables=FIT_VARIABLES, stage_overhead_s=overhead,
                meta={"fitted_on": f"{nets} random networks (models.zoo.RandomNet)", "host": doc["host"]})
    before = fit([Sample(kind=collapsed(s.kind), features=s.features, latency_s=s.latency_s) for s in samples],
                 name="this-host-1t-table-i-kinds", variables=FIT_VARIABLES, stage_overhead_s=overhead)
    return after, before, doc


def evaluate(model: onnx.ModelProto, name: str, fitted: dict[str, LatencyModel], *, runs: int,
             repeats: int = REPEATS) -> dict[str, Any]:
    """One corpus model: measured whole run and layers (the median of ``repeats`` profiles, each the median of
    ``runs``: this VM's speed drifts by up to 20% between minutes) against each fitted model's prediction."""
    profiles = [profile.profile_model(model, name=name, threads=1, warmup=3, runs=runs) for _ in range(repeats)]
    layers = [{**lay, "latency_s": float(np.median([p["layers"][i]["latency_s"] for p in profiles]))}
              for i, lay in enumerate(profiles[0]["layers"])]
    run_s = float(np.median([p["run_s"] for p in profiles]))
    row: dict[str, Any] = {"measured_run_s": run_s, "measured_runs_s": [p["run_s"] for p in profiles],
                           "layers": len(layers)}
    for label, lm in fitted.items():
        kinds = [lay["type"] if label == "after" else collapsed(lay["type"]) for lay in layers]
        per_layer = lm.predict_many([(k, lay) for k, lay in zip(kinds, layers, strict=True)])
        whole = float(lm.stage_s(float(per_layer.sum())))
        timed = [(p, lay["latency_s"]) for p, lay in zip(per_layer, layers, strict=True) if lay["latency_s"] > 0]
        row[label] = {"predicted_run_s": whole, "error": whole / run_s - 1.0,
                      "layer_median_abs_error": float(np.median([abs(p / m - 1.0) for p, m in timed]))}
    row["by_kind"] = _by_kind(layers, fitted["after"])
    return row


def _by_kind(layers: Sequence[dict[str, Any]], lm: LatencyModel) -> dict[str, dict[str, float]]:
    """Per layer kind: measured and predicted seconds in all (where the whole-model error comes from)."""
    out: dict[str, dict[str, float]] = {}
    for lay in layers:
        k = out.setdefault(lay["type"], {"n": 0, "measured_s": 0.0, "predicted_s": 0.0})
        k["n"] += 1
        k["measured_s"] += lay["latency_s"]
        k["predicted_s"] += lm.predict(lay["type"], lay)
    return out
