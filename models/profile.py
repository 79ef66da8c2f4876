"""Measure per-layer latency of ONNX models with onnxruntime's own profiler."""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx

from models import graph
from models.ort import onnxruntime as ort
from planner.errors import PlannerError
from planner.latency import Sample

FORMAT = "coinfer.profile/1"
# Every node is timed as itself (no fusion), as Edgent profiles each layer; the level is recorded.
OPT_LEVEL = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
LOAD_REPEATS = 3


def session_options(threads: int, *, profile: bool = False, prefix: str = "") -> ort.SessionOptions:
    """Options for a single-request session: ``threads`` intra-op threads, no inter-op parallelism."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = OPT_LEVEL
    so.log_severity_level = 3
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = prefix
    return so


def random_feed(model: onnx.ModelProto, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A random float32 input for each graph input of a prepared model."""
    inputs = set(graph.graph_inputs(model))
    return {vi.name: rng.standard_normal([d.dim_value for d in vi.type.tensor_type.shape.dim]).astype(np.float32)
            for vi in model.graph.input if vi.name in inputs}


def profile_model(model: onnx.ModelProto, *, name: str, threads: int = 1, warmup: int = 10,
                  runs: int = 50, seed: int = 0) -> dict[str, Any]:
    """Median latency of every layer, of a whole run and of loading the model."""
    prepared = graph.prepare(model)
    blob = prepared.SerializeToString()
    feed = random_feed(prepared, np.random.default_rng(seed))
    load_times = []
    for _ in range(LOAD_REPEATS):
        start = time.perf_counter()
        session = ort.InferenceSession(blob, session_options(threads), providers=["CPUExecutionProvider"])
        load_times.append(time.perf_counter() - start)
    for _ in range(warmup):
        session.run(None, feed)
    run_times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        run_times.append(time.perf_counter() - start)
    per_node = _node_times(blob, feed, threads=threads, warmup=warmup, runs=runs)
    layers = [{**lay.to_json(), "latency_s": statistics.median(per_node.get(lay.name, [0.0]))}
              for lay in graph.layers(prepared)]
    return {"name": name, "model_bytes": len(blob), "load_s": statistics.median(load_times),
            "run_s": statistics.median(run_times), "layers": layers}


def profile_models(models: Sequence[tuple[str, onnx.ModelProto]], *, threads: int = 1, warmup: int = 10,
                   runs: int = 50, progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """A profile document for several models, with the host and runtime it was measured on."""
    results = []
    for i, (name, model) in enumerate(models):
        if progress:
            progress(i, len(models), name)
        results.append(profile_model(model, name=name, threads=threads, warmup=warmup, runs=runs))
    return {"format": FORMAT, "host": host_info(), "threads": threads, "warmup": warmup, "runs": runs,
            "onnxruntime": ort.__version__, "optimization": str(OPT_LEVEL), "models": results}


def host_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"hostname": platform.node(), "machine": platform.machine(), "cpu": cpu, "cpus": os.cpu_count()}


def _node_times(blob: bytes, feed: dict[str, np.ndarray], *, threads: int, warmup: int,
                runs: int) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory(prefix="coinfer-prof-") as tmp:
        so = session_options(threads, profile=True, prefix=os.path.join(tmp, "ort"))
        session = ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])
        for _ in range(warmup + runs):
            session.run(None, feed)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    times: dict[str, list[float]] = {}
    for ev in events:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            times.setdefault(ev["name"].removesuffix("_kernel_time"), []).append(ev["dur"] * 1e-6)
    # drop the warm-up runs, which the profiler records too
    return {k: v[warmup:] if len(v) > warmup else v for k, v in times.items()}


def samples_from_profiles(docs: Sequence[dict[str, Any]]) -> tuple[list[Sample], float]:
    """Layer samples (plus one "load" sample per model) and the median per-run overhead."""
    samples, overheads = [], []
    for doc in docs:
        if doc.get("format") != FORMAT:
            raise PlannerError(f"not a {FORMAT} document")
        for m in doc["models"]:
            for lay in m["layers"]:
                feats = {k: float(v) for k, v in lay.items() if isinstance(v, (int, float))}
                samples.append(Sample(kind=lay["type"], features=feats, latency_s=float(lay["latency_s"])))
            samples.append(Sample(kind="load", features={"model_bytes": float(m["model_bytes"])},
                                  latency_s=float(m["load_s"])))
            overheads.append(m["run_s"] - sum(lay["latency_s"] for lay in m["layers"]))
    return samples, max(0.0, statistics.median(overheads)) if overheads else 0.0
