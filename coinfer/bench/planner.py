"""``coinfer bench planner``: decision times of the policies and the min-cut solver (numbers to a file, never asserted
as wall-clock limits in tests)."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from models import loaders
from models.bundle import load_bundle
from planner import edgent, mincut, policies
from planner.core import Conditions, CutPoint, ExitInfo, LayerInfo, Prepared, View

SYNTHETIC_LAYERS = 500
SYNTHETIC_EXITS = 5


def synthetic_chain(n_layers: int = SYNTHETIC_LAYERS, n_exits: int = SYNTHETIC_EXITS,
                    seed: int = 0) -> list[ExitInfo]:
    """A planner-level chain of ``n_layers`` conv/relu/pool/fc layers with ``n_exits`` evenly spaced exits."""
    rng = np.random.default_rng(seed)
    kinds = ("conv", "relu", "pool", "fc")
    layers = []
    for i in range(n_layers):
        size = float(rng.integers(1_000, 200_000))
        layers.append(LayerInfo(name=f"l{i}", kind=kinds[i % 4], features={
            "input_bytes": size, "output_bytes": size * float(rng.uniform(0.25, 1.0)),
            "filter_term": float(rng.integers(16, 512)), "flops": size * 100.0}))
    exits = []
    for e in range(n_exits):
        n = n_layers * (e + 1) // n_exits
        chain = tuple(layers[:n])
        cuts = tuple(CutPoint(index=i, bytes=int(chain[i - 1].features["output_bytes"]),
                              tensors=frozenset({f"l{i - 1}"})) for i in range(1, n))
        exits.append(ExitInfo(index=e + 1, output=f"l{n - 1}", input="input", accuracy=0.5 + 0.08 * e, layers=chain,
                              cuts=cuts, input_bytes=3136, result_bytes=40))
    return exits


def decision_times(prepared: Prepared, requests: int, seed: int = 0, *,
                   decide: Callable[[View], object] | None = None) -> dict[str, float]:
    """Distribution of one decision over random bandwidths (50 kbps-10 Mbps) and deadlines (50 ms-2 s):
    ``decide`` (default: the Edgent policy as deviced calls it, with its plan for an infeasible request)."""
    rng = np.random.default_rng(seed)
    decide = decide or policies.make(policies.DEFAULT).decide
    views = [View(prepared=prepared, conditions=Conditions(bandwidth_bps=float(b), deadline_s=float(d)))
             for b, d in zip(rng.uniform(5e4, 1e7, requests), rng.uniform(0.05, 2.0, requests), strict=True)]
    for view in views[:200]:
        decide(view)
    times = np.empty(requests)
    for i, view in enumerate(views):
        start = time.perf_counter_ns()
        decide(view)
        times[i] = time.perf_counter_ns() - start
    times *= 1e-9
    return {"p50_s": float(np.percentile(times, 50)), "p99_s": float(np.percentile(times, 99)),
            "mean_s": float(times.mean()), "requests": requests, "candidates": int(prepared.candidates.exit.size)}


def planner_bench(requests: int = 20000) -> dict[str, Any]:
    """Decision time for the shipped bundle and for a 500-layer synthetic chain: the policy's whole decision
    (``bundle``, ``synthetic_500``) and Edgent's search alone (``*_search``)."""
    device = loaders.load_latency_model(loaders.PI3_MODEL)
    edge = loaders.load_latency_model(loaders.DESKTOP_MODEL)
    bundle = load_bundle()
    edgent_policy = policies.make("edgent")
    ours = edgent_policy.compile(bundle.exits, device, edge)
    synth = edgent_policy.compile(synthetic_chain(), device, edge)

    def search(view: View) -> object:
        return edgent.plan(view.candidates, view.conditions)

    cut = policies.make("mincut")
    ours_cut = cut.compile(bundle.exits, device, edge)
    return {"bundle": decision_times(ours, requests), "synthetic_500": decision_times(synth, requests),
            "bundle_search": decision_times(ours, requests, decide=search),
            "synthetic_500_search": decision_times(synth, requests, decide=search),
            "bundle_mincut": decision_times(ours_cut, requests, decide=cut.decide),
            "mincut_solve_bundle_exit5": solve_times(mincut.from_exit(bundle.exits[-1], device, edge)),
            "mincut_solve_random_dag_320": solve_times(random_dag(320)),
            "host": {"machine": platform.machine(), "python": platform.python_version()},
            "latency_models": [device.name, edge.name]}


def random_dag(n: int, seed: int = 0) -> mincut.LayerGraph:
    """A layer graph of ``n`` nodes, each reading one or two of the 8 before it (residual/inception-like)."""
    rng = np.random.default_rng(seed)
    readers: dict[int, list[int]] = {-1: [0]}
    for i in range(1, n):
        for src in set(rng.integers(max(i - 8, 0), i, size=int(rng.integers(1, 3))).tolist()):
            readers.setdefault(int(src), []).append(i)
    for i in range(n - 1):
        readers.setdefault(i, [i + 1])
    tensors = tuple(mincut.Tensor(name=f"t{p}", bytes=float(rng.integers(1_000, 400_000)), producer=p,
                                  consumers=tuple(sorted(set(c)))) for p, c in sorted(readers.items()))
    device_s = rng.uniform(1e-4, 2e-2, n)
    return mincut.LayerGraph(names=tuple(f"n{i}" for i in range(n)), device_s=device_s,
                             edge_s=device_s / rng.uniform(5, 20, n), tensors=tensors, output=n - 1)


def solve_times(g: mincut.LayerGraph, solves: int = 200, seed: int = 0) -> dict[str, float]:
    """One per-request min-cut at random bandwidths (50 kbps-100 Mbps) and speed ratios; and the size of the
    offline candidate set of that graph with its preparation time."""
    rng = np.random.default_rng(seed)
    times = np.empty(solves)
    for i, (bps, ratio) in enumerate(zip(10 ** rng.uniform(4.7, 8, solves), 10 ** rng.uniform(-1, 1, solves),
                                         strict=True)):
        began = time.perf_counter_ns()
        mincut.min_cut(g, float(ratio), 8.0 / float(bps))
        times[i] = (time.perf_counter_ns() - began) * 1e-9
    prepared = time.perf_counter()
    parts = mincut.candidate_partitions(g)
    return {"p50_s": float(np.percentile(times, 50)), "p99_s": float(np.percentile(times, 99)), "nodes": g.n,
            "tensors": len(g.tensors), "candidates": len(parts), "prepare_s": time.perf_counter() - prepared}


def brute_force_times(g: mincut.LayerGraph, solves: int = 3, seed: int = 0) -> dict[str, Any]:
    """Brute force over every closed head (graphs of at most ``mincut.MAX_BRUTE_FORCE_NODES`` nodes) at random
    conditions, each checked against the min-cut's cost; larger graphs: why it was not run."""
    if g.n > mincut.MAX_BRUTE_FORCE_NODES:
        return {"nodes": g.n, "skipped": f"{g.n} nodes > {mincut.MAX_BRUTE_FORCE_NODES}: 2^{g.n - 1} heads"}
    rng = np.random.default_rng(seed)
    times, worst = [], 0.0
    for bps, ratio in zip(10 ** rng.uniform(4.7, 8, solves), 10 ** rng.uniform(-1, 1, solves), strict=True):
        cond = (float(ratio), 8.0 / float(bps))  # speed ratio, seconds per byte
        began = time.perf_counter_ns()
        want = mincut.brute_force(g, *cond).cost(*cond)
        times.append((time.perf_counter_ns() - began) * 1e-9)
        worst = max(worst, abs(mincut.min_cut(g, *cond).cost(*cond) - want) / want)
    return {"nodes": g.n, "p50_s": float(np.percentile(times, 50)), "max_s": max(times), "solves": solves,
            "heads": sum(1 for _ in mincut.closed_heads(g)), "min_cut_rel_diff": worst}
