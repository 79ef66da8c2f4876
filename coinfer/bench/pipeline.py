"""Pipelines over several workers: ``coinfer pipeline plan`` and ``coinfer bench pipeline --sim``.

A fleet file (TOML, ``*.workers.toml``, read by ``models.loaders.load_fleet``) names the workers;
``latency_model`` is ``pi3`` or ``desktop`` (the Edgent reference models shipped with the planner) or a path to
a latency-model JSON, relative to the file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from models import graph, loaders
from models.bundle import DEFAULT_BUNDLE, MANIFEST, describe, load_bundle
from models.loaders import load_fleet
from planner import pipeline
from planner.core import exits_from_manifest
from planner.fleet import Chain, Fleet, PipelineError, Worker, chain_from_exit

EXAMPLE_FLEET = Path(__file__).resolve().parents[1] / "fleets" / "pi-lab.workers.toml"


def load_chain(model: Path, exit_index: int | None = None) -> Chain:
    """One exit of a bundle or ONNX file as a chain of blocks (default: the deepest exit)."""
    if (model / MANIFEST).exists():
        bundle = load_bundle(model)
        name, exits = bundle.name, bundle.exits
    else:
        name, exits = model.stem, exits_from_manifest(describe(graph.load_model(model)))
    index = exit_index or len(exits)
    if not 1 <= index <= len(exits):
        raise PipelineError(f"{name} has exits 1..{len(exits)}, not {index}")
    return chain_from_exit(exits[index - 1], name=f"{name} exit {index}")


def format_plan(p: pipeline.PipelinePlan) -> str:
    """The plan as a table; columns as wide as their longest entry (exported layer names run long)."""
    rows = [(str(i), "+".join(s.workers), s.mode.value,
             f"{s.first_layer}..{s.last_layer}" if s.stop - s.first > 1 else s.first_layer, s)
            for i, s in enumerate(p.stages, start=1)]
    workers = max([len("workers"), *(len(r[1]) for r in rows)])
    blocks = max([len("blocks"), *(len(r[3]) for r in rows)])
    lines = [f"{p.model}: {p.frames_per_s:.2f} frames/s (period {p.period_s * 1e3:.1f} ms), latency "
             f"{p.latency_s * 1e3:.1f} ms, {len(p.stages)} stage(s) by {p.method}; bottleneck: {p.bottleneck}",
             f"{'stage':<5} {'workers':<{workers}} {'mode':<8} {'blocks':<{blocks}} {'thr':>3} {'compute':>8} "
             f"{'receive':>8} {'send':>8} {'period':>8} {'memory':>8}"]
    for i, names, mode, span, s in rows:
        extra = f" shares {'/'.join(f'{f:.2f}' for f in s.fractions)}" if s.fractions else ""
        extra += f" cores {','.join(map(str, s.cores))}" if s.cores else ""
        lines.append(f"{i:<5} {names:<{workers}} {mode:<8} {span:<{blocks}} {s.threads:>3} "
                     f"{max(s.compute_s) * 1e3:>8.1f} {max(s.receive_s) * 1e3:>8.1f} {max(s.send_s) * 1e3:>8.1f} "
                     f"{s.period_s * 1e3:>8.1f} {max(s.memory_bytes) / 1e6:>6.1f}MB{extra}")
    if p.source_send_s:
        lines.append(f"the source ({p.source}) uploads each frame in {p.source_send_s * 1e3:.2f} ms")
    lines.append("times in ms per frame (per member for replicas/splits); period = max(compute, receive, send) "
                 "/ replicas")
    return "\n".join(lines)


def bench_sim(out: Path, *, frames: int = 1000, seed: int = 0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``coinfer bench pipeline --sim``: scaling with simulation, methods compared, replicas/splits, embedded."""
    from models import synth

    out.mkdir(parents=True, exist_ok=True)
    fleet = load_fleet(EXAMPLE_FLEET)
    bundles = ("fmnist-branchy-alexnet", "fmnist56-branchy-alexnet", "fmnist-branchy-resnet")
    topologies = {"resnet18": synth.resnet18, "vgg16": synth.vgg16}  # real layer shapes, random weights, 224x224

    def make(name: str) -> Chain:
        if name in topologies:
            return chain_from_exit(exits_from_manifest(describe(topologies[name]()))[-1], name=name)
        return load_chain(DEFAULT_BUNDLE.parent / name)

    doc: dict[str, Any] = {"fleet": str(EXAMPLE_FLEET.name), "frames": frames, "cv": 0.1, "seed": seed,
                           "period": "max(compute, receive, send) / replicas; see planner/pipeline.py",
                           "scaling": {}, "groups": {}, "embedded": {}}
    for name in (*bundles, *topologies):
        chain = make(name)
        log(f"scaling: {name} ({chain.n} blocks)")
        doc["scaling"][name] = _scaling(chain, fleet, frames, seed, log)
        doc["groups"][name] = _groups(chain, fleet.subset([w.name for w in fleet.workers if not w.edge]))
        doc["embedded"][name] = _embedded_rows(chain, fleet, frames, seed)
    log("methods: exact vs pso vs greedy on random fleets")
    doc["methods"] = _methods(load_chain(DEFAULT_BUNDLE), seed, log)
    (out / "pipeline.json").write_text(json.dumps(doc, indent=1) + "\n")
    _plot(doc, out / "scaling.png")
    return doc


def _simulated(p: pipeline.PipelinePlan, frames: int, seed: int) -> dict[str, Any]:
    from coinfer.lab import pipesim

    sat = pipesim.simulate(p, frames=frames, seed=seed)
    paced = pipesim.simulate(p, frames=max(frames // 2, 100), seed=seed + 1, rate=0.5 * p.frames_per_s)
    return {"predicted_fps": p.frames_per_s, "simulated_fps": sat.frames_per_s,
            "fps_error": sat.frames_per_s / p.frames_per_s - 1, "predicted_latency_s": p.latency_s,
            "simulated_latency_p50_s": paced.latency_p50_s, "simulated_latency_p95_s": paced.latency_p95_s,
            "saturated_latency_p50_s": sat.latency_p50_s, "max_inbox": sat.max_inbox,
            "stages": len(p.stages), "workers": sum(len(s.workers) for s in p.stages), "bottleneck": p.bottleneck,
            "plan": [[list(s.workers), s.mode, s.first, s.stop] for s in p.stages]}


def _plan_or_none(chain: Chain, fleet: Fleet, **kw: Any) -> pipeline.PipelinePlan | str:
    method = kw.pop("method", None) or pipeline.default_method(fleet)
    try:
        return pipeline.plan(chain, fleet, method=method, **kw)
    except PipelineError as exc:
        return str(exc)


def _scaling(chain: Chain, fleet: Fleet, frames: int, seed: int, log: Callable[[str], None]) -> dict[str, Any]:
    devices = [w.name for w in fleet.workers if not w.edge]
    edge = next(w.name for w in fleet.workers if w.edge)
    rows: dict[str, list[Any]] = {"devices": [], "devices+edge": []}
    for k in range(1, len(devices) + 1):
        for series, names in (("devices", devices[:k]), ("devices+edge", [*devices[:k], edge])):
            p = _plan_or_none(chain, fleet.subset(names))
            row = {"k": k, **(_simulated(p, frames, seed) if isinstance(p, pipeline.PipelinePlan) else {"error": p})}
            rows[series].append(row)
            if "error" not in row:
                log(f"  {series:<13} k={k}: predicted {row['predicted_fps']:8.2f} f/s, simulated "
                    f"{row['simulated_fps']:8.2f} ({row['fps_error']:+.1%}); {row['bottleneck']}")
    costs = pipeline.Costs(chain, fleet.subset(devices))
    single = [(float(costs.period[w, 0, chain.n]), devices[w]) for w in range(len(devices))]
    fits = [s for s in single if np.isfinite(s[0])]
    best = min(fits) if fits else None
    pair = _plan_or_none(chain, fleet.subset([fleet.source, edge]))
    return {**rows, "best_single_device": {"fps": 1 / best[0], "worker": best[1]} if best else None,
            "source_edge_split": _simulated(pair, frames, seed) if isinstance(pair, pipeline.PipelinePlan)
            else {"error": pair}}


def _groups(chain: Chain, fleet: Fleet) -> dict[str, Any]:
    """The gain from replicas and from intra-layer splits: the same devices with each left out (exact)."""
    plain = Fleet(workers=fleet.workers, source=fleet.source, per_message_s=fleet.per_message_s, max_group=1)
    rows = {}
    for label, f, split in (("stages only", plain, False), ("+ replicas", fleet, False), ("+ splits", fleet, True)):
        p = _plan_or_none(chain, f, split=split)
        rows[label] = {"fps": p.frames_per_s, "latency_s": p.latency_s, "bottleneck": p.bottleneck,
                       "modes": [s.mode for s in p.stages]} if isinstance(p, pipeline.PipelinePlan) else {"error": p}
    return rows


def _embedded_rows(chain: Chain, fleet: Fleet, frames: int, seed: int) -> dict[str, Any]:
    """One Pi 4's four cores: one stage on all of them against the embedded planner, free and latency-bound."""
    pi4 = next(w for w in fleet.workers if w.name == "pi4-a")
    one = Fleet(workers=(Worker(name=pi4.name, latency=pi4.latency, memory_bytes=pi4.memory_bytes,
                                uplink_bps=pi4.uplink_bps, downlink_bps=pi4.downlink_bps, speed=pi4.speed,
                                cores=pi4.cores, parallel_fraction=pi4.parallel_fraction),), source=pi4.name)
    rows: dict[str, Any] = {}
    free = _plan_or_none(chain, one, method="embedded")
    if not isinstance(free, pipeline.PipelinePlan):
        return {"error": free}
    rows["throughput first"] = _simulated(free, frames // 2, seed)
    quickest = float(pipeline.Costs(chain, one).compute[0, 0, chain.n])  # one stage on every core
    for factor in (1.0, 2.0):
        p = _plan_or_none(chain, one, method="embedded", latency_bound_s=quickest * factor * (1 + 1e-6))
        if isinstance(p, pipeline.PipelinePlan):
            rows[f"latency <= {factor:g} x one stage"] = {
                **_simulated(p, frames // 2, seed),
                "threads_replicas": [[s.threads, len(s.workers)] for s in p.stages]}
    rows["throughput first"]["threads_replicas"] = [[s.threads, len(s.workers)] for s in free.stages]
    return rows


def _methods(chain: Chain, seed: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Exact, PSO and greedy on the same random fleets (k = 2..8), then PSO and greedy alone for larger k."""
    rng = np.random.default_rng(seed)
    pi3 = loaders.load_latency_model(loaders.PI3_MODEL)
    rows = []
    for k, count in ((2, 8), (3, 8), (4, 8), (5, 8), (6, 8), (7, 8), (8, 8), (16, 3), (32, 3), (64, 2)):
        for i in range(count):
            workers = tuple(Worker(name=f"w{j}", latency=pi3, speed=float(rng.lognormal(0.0, 0.5)), cores=4,
                                   memory_bytes=float(np.exp(rng.uniform(np.log(128e6), np.log(1e9)))),
                                   uplink_bps=float(np.exp(rng.uniform(np.log(10e6), np.log(300e6)))),
                                   downlink_bps=float(np.exp(rng.uniform(np.log(10e6), np.log(300e6)))))
                            for j in range(k))
            fleet = Fleet(workers=workers, source="w0")
            row: dict[str, Any] = {"k": k, "instance": i}
            for method in ("exact", "pso", "greedy"):
                if method == "exact" and k > pipeline.EXACT_MAX:
                    continue
                t0 = time.perf_counter()
                p = pipeline.plan(chain, fleet, method=method, seed=seed + i)
                row[method] = {"fps": p.frames_per_s, "plan_s": time.perf_counter() - t0}
            ref = row["exact"]["fps"] if "exact" in row else max(row["pso"]["fps"], row["greedy"]["fps"])
            for method in ("pso", "greedy"):
                row[method]["gap"] = 1 - row[method]["fps"] / ref
            rows.append(row)
        last = [r for r in rows if r["k"] == k]
        log(f"  k={k:>2}: gap pso {np.mean([r['pso']['gap'] for r in last]):6.2%} greedy "
            f"{np.mean([r['greedy']['gap'] for r in last]):6.2%} (vs {'exact' if k <= 8 else 'the better'}); "
            f"plan s: pso {np.median([r['pso']['plan_s'] for r in last]):.3f}, greedy "
            f"{np.median([r['greedy']['plan_s'] for r in last]):.3f}"
            + (f", exact {np.median([r['exact']['plan_s'] for r in last]):.3f}" if k <= 8 else ""))
    return rows


def _plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["scaling"])
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.6))
    for ax, name in zip(np.atleast_1d(axes), names, strict=True):
        sc = doc["scaling"][name]
        for series, colour in (("devices", "tab:blue"), ("devices+edge", "tab:orange")):
            ok = [r for r in sc[series] if "error" not in r]
            ax.plot([r["k"] for r in ok], [r["predicted_fps"] for r in ok], "-", color=colour,
                    label=f"{series} (planned)")
            ax.plot([r["k"] for r in ok], [r["simulated_fps"] for r in ok], "o", color=colour, mfc="none",
                    label=f"{series} (simulated)")
        if sc["best_single_device"]:
            ax.axhline(sc["best_single_device"]["fps"], color="grey", ls="--", label="best single device")
        if "error" not in sc["source_edge_split"]:
            ax.axhline(sc["source_edge_split"]["predicted_fps"], color="tab:red", ls=":", label="camera + edge split")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("Pi-class devices")
    np.atleast_1d(axes)[0].set_ylabel("frames/s")
    np.atleast_1d(axes)[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
