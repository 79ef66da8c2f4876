"""``coinfer bench dag``: the min-cut policy on DAG models, the standard ImageNet topologies first.

For each model (the corpus of standard topologies, ``models.corpus``, largest first; the synthetic residual,
inception and reduction DAGs; ResNet-18's shapes; the shipped branchy ResNets), normalised as ``coinfer plan``
loads it, and two device/edge pairs (Edgent's Raspberry Pi 3 / desktop regressions, which extrapolate far outside
the small AlexNet-era layers they were fitted on; and this host's own latency model, fitted on random networks
that are not in the corpus, as the edge with a 10x slower copy as the device):

- preparation: the candidate cuts per exit and the time to find them, the lookup p50/p99, a per-request min-cut;
- exactness over a bandwidth (30 kbps-1 Gbps) x device speed x edge speed (1/16-16) sweep: the prepared decision
  against the best single-tensor cut (never slower) and against this request's own min-cut (never slower);
- the predicted latency over bandwidth (at speed 1): min-cut, best single cut, device-only, edge-only;
- head + tail against the whole model at every multi-tensor cut chosen;
- on the corpus, the host latency model's prediction error (``coinfer.bench.prediction``), before and after the
  layer kinds real models need; and the event loop's longest stall while deviced prepares a new advert for the
  largest model.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from coinfer.bench import planner as bench
from coinfer.bench import prediction
from deviced.edges import EdgeDirectory
from deviced.inbound import Channel, Inbound
from models import corpus, graph, loaders, synth
from models.bundle import BUNDLES_DIR, MANIFEST, describe, load_bundle
from models.ort import onnxruntime as ort
from models.profile import random_feed
from planner import baselines, candidates, edgent, mincut, policies
from planner.core import Conditions, Decision, ExitInfo, Prepared, View, allow_encodings, exits_from_manifest
from planner.latency import LatencyModel
from protocol.messages import Advert, Status

BANDWIDTHS = (3e4, 1e5, 3e5, 1e6, 3e6, 1e7, 3e7, 1e8, 3e8, 1e9)
SPEEDS = (1 / 16, 1 / 4, 1.0, 4.0, 16.0)
SHIPPED_DAGS = ("fmnist-branchy-resnet", "fmnist56-branchy-resnet")
HOST_SLOWDOWN = 10.0  # the device of the host pair: this host's latency model, 10x slower (Pi-class)
PLOTTED = "host/10"


def models(cache: Path, names: Sequence[str], log: Callable[[str], None]
           ) -> dict[str, tuple[Callable[[], onnx.ModelProto], bool]]:
    """The models to plan: name -> (loader of the normalised model, whether it is a corpus model)."""
    found: dict[str, tuple[Callable[[], onnx.ModelProto], bool]] = {}
    for name in names:
        path = corpus.build(name, cache, log=log)
        found[name] = (functools.partial(graph.load_model, path), True)
    synthetic: dict[str, Callable[[], onnx.ModelProto]] = {
        "residual_net": lambda: synth.residual_net(blocks=8, channels=32, side=32),
        "inception_net": lambda: synth.inception_net(side=32),
        "reduction_net": synth.reduction_net,
        # ResNet-18's real layer shapes at 224x224 (batch norm folded, random weights)
        "resnet18_shapes": synth.resnet18,
    }
    for name, make in synthetic.items():
        found[name] = (functools.partial(_prepared, make), False)
    for name in SHIPPED_DAGS:
        if (BUNDLES_DIR / name / MANIFEST).exists():
            found[name] = (functools.partial(_bundle_model, BUNDLES_DIR / name), False)
    return found


def _prepared(make: Callable[[], onnx.ModelProto]) -> onnx.ModelProto:
    return graph.prepare(make())


def _bundle_model(path: Path) -> onnx.ModelProto:
    return load_bundle(path).model


def run(out_dir: Path, *, requests: int = 2000, cache: Path = corpus.CACHE_DIR,
        names: Sequence[str] = corpus.NAMES, fit_nets: int = 100, runs: int = 20,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"fitting this host's latency model on {fit_nets} random networks (one thread)")
    host, host_before, _ = prediction.fit_host(fit_nets, runs=runs, log=log)
    (out_dir / "host-latency.json").write_text(json.dumps(host.to_json(), indent=1) + "\n")
    desktop = loaders.load_latency_model(loaders.DESKTOP_MODEL)
    pairs = {"pi3": (loaders.load_latency_model(loaders.PI3_MODEL), desktop),
             "host/10": (host.scaled(HOST_SLOWDOWN, host.stage_overhead_s, name=f"{host.name}-x10",
                                     meta={"from": host.name, "slowdown": HOST_SLOWDOWN}), host)}
    doc: dict[str, Any] = {"bandwidths_bps": list(BANDWIDTHS), "speeds": list(SPEEDS), "host_model": host.name,
                           "pairs": {k: [d.name, e.name] for k, (d, e) in pairs.items()}, "models": {}}
    found = models(cache, names, log)
    for i, (name, (load, in_corpus)) in enumerate(found.items()):
        log(f"[{i + 1}/{len(found)}] {name}")
        model = load()
        exits = allow_encodings(exits_from_manifest(describe(model)), ())
        entry: dict[str, Any] = {"nodes": len(model.graph.node), "corpus": in_corpus, "devices": {}}
        if in_corpus:
            entry["raw_nodes"] = len(onnx.load(str(corpus.path_of(name, cache))).graph.node)
        for pair, (device, edge) in pairs.items():
            entry["devices"][pair] = _sweep(exits, device, edge, requests)
        entry["exact"] = _exactness(model, entry)
        if in_corpus:
            entry["prediction"] = prediction.evaluate(model, name, {"after": host, "before": host_before}, runs=runs)
        doc["models"][name] = entry
        _log_model(name, entry, log)
    largest = max((n for n, e in doc["models"].items() if e["corpus"]), key=lambda n: doc["models"][n]["nodes"])
    doc["loop_stall"] = {"model": largest, **asyncio.run(_loop_stall(found[largest][0](), *pairs["pi3"]))}
    log(f"loop stall while deviced prepares {largest}: {doc['loop_stall']['max_stall_s'] * 1e3:.1f} ms "
        f"(preparation {doc['loop_stall']['prepare_s'] * 1e3:.0f} ms off the loop)")
    (out_dir / "dag.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out_dir / "dag.md").write_text(summary(doc))
    _plot(out_dir / "dag.png", doc)
    return doc


def summary(doc: dict[str, Any]) -> str:
    """The README's tables from ``dag.json``: planning per model and pair, then prediction per corpus model."""
    lines = ["| model | nodes (file -> run) | pair | candidates / single cuts | prepared in | lookup p50 / p99 | "
             "min-cut p50 | slower than single cut / own min-cut (of 250) | multi-tensor wins (best gain at speed 1) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, e in doc["models"].items():
        nodes = f"{e['raw_nodes']} -> {e['nodes']}" if "raw_nodes" in e else str(e["nodes"])
        for pair, d in e["devices"].items():
            x = d["exactness"]
            best = max(d["rows"], key=lambda r: r["gain"])
            gain = (f"{best['gain']:.3f}x at {best['bandwidth_bps'] / 1e3:g} kbps ({len(best['crossing'])} tensors)"
                    if best["gain"] > 1 + 1e-9 else "-")
            lines.append(f"| {name} | {nodes} | {pair} | {d['candidates']} / {d['single_cut_candidates']} | "
                         f"{d['prepare_s'] * 1e3:.0f} ms | {d['lookup']['p50_s'] * 1e6:.0f} / "
                         f"{d['lookup']['p99_s'] * 1e6:.0f} us | {d['min_cut']['p50_s'] * 1e3:.2f} ms | "
                         f"{x['slower_than_single_cut']} / {x['slower_than_min_cut']} | "
                         f"{x['multi_tensor_wins']} ({gain}) |")
    lines += ["", "| model | measured run (1 thread) | predicted | error | before | layer median error (before) |",
              "|---|---|---|---|---|---|"]
    for name, e in doc["models"].items():
        p = e.get("prediction")
        if p:
            lines.append(f"| {name} | {p['measured_run_s'] * 1e3:.1f} ms | "
                         f"{p['after']['predicted_run_s'] * 1e3:.1f} ms | "
                         f"{p['after']['error']:+.1%} | {p['before']['error']:+.1%} | "
                         f"{p['after']['layer_median_abs_error']:.1%} ({p['before']['layer_median_abs_error']:.1%}) |")
    stall = doc.get("loop_stall")
    if stall:
        lines += ["", f"Loop stall while deviced prepares {stall['model']}: longest tick gap "
                      f"{stall['max_stall_s'] * 1e3:.1f} ms, preparation {stall['prepare_s'] * 1e3:.0f} ms off the "
                      "loop."]
    return "\n".join(lines) + "\n"


def _log_model(name: str, entry: dict[str, Any], log: Callable[[str], None]) -> None:
    for pair, d in entry["devices"].items():
        log(f"  {pair}: {entry['nodes']} nodes, {d['candidates']} candidate cuts prepared in {d['prepare_s']:.3f} s; "
            f"lookup p50 {d['lookup']['p50_s'] * 1e6:.0f} us p99 {d['lookup']['p99_s'] * 1e6:.0f} us, min-cut p50 "
            f"{d['min_cut']['p50_s'] * 1e3:.2f} ms; {d['exactness']['slower_than_single_cut']} of "
            f"{d['exactness']['points']} slower than the best single cut, {d['exactness']['slower_than_min_cut']} "
            f"than a per-request min-cut; multi-tensor wins at {d['exactness']['multi_tensor_wins']}")
    p = entry.get("prediction")
    if p:
        log(f"  predicted {p['after']['predicted_run_s'] * 1e3:.1f} ms vs measured {p['measured_run_s'] * 1e3:.1f} ms "
            f"({p['after']['error']:+.1%}; before {p['before']['error']:+.1%}), layer median error "
            f"{p['after']['layer_median_abs_error']:.1%} (before {p['before']['layer_median_abs_error']:.1%})")
    log(f"  max |head+tail - whole| {entry['exact']['max_abs_diff']:.2g} over "
        f"{len(entry['exact']['multi_tensor_cuts'])} multi-tensor cuts")


def _sweep(exits: tuple[ExitInfo, ...], device: LatencyModel, edge: LatencyModel, requests: int) -> dict[str, Any]:
    exits = allow_encodings(exits, ())  # cuts against cuts: every tensor crosses as float32 on both sides
    policy = policies.make("mincut")
    start = time.perf_counter()
    prepared = policy.compile(exits, device, edge)
    prepare_s = time.perf_counter() - start
    assert isinstance(prepared, mincut.MinCutPrepared)
    single = candidates.compile_candidates(exits, device, edge)
    rows, slower_single, slower_cut, wins, worst = [], 0, 0, 0, 1.0
    forced: dict[frozenset[str], Prepared] = {}
    chosen: set[tuple[int, tuple[str, ...]]] = set()  # every multi-tensor cut a decision took, for the split check
    for bps, ds, es in itertools.product(BANDWIDTHS, SPEEDS, SPEEDS):
        cond = Conditions(bandwidth_bps=bps, deadline_s=1e6, device_speed=ds, edge_speed=es)
        ours, theirs = policy.decide(View(prepared=prepared, conditions=cond)), edgent.plan(single, cond)
        assert isinstance(ours, Decision) and isinstance(theirs, Decision)
        slower_single += ours.predicted_s > theirs.predicted_s * (1 + 1e-9)
        if len(ours.cut_tensors) > 1:
            chosen.add((ours.exit, tuple(sorted(ours.cut_tensors))))
        wins += ours.predicted_s < theirs.predicted_s * (1 - 1e-9)
        worst = max(worst, ours.predicted_s / theirs.predicted_s)
        # this request's own min-cut of the deepest exit, costed as any plan is (overheads, result return)
        cut = mincut.min_cut(prepared.graphs[-1], es / ds, 8.0 / bps / ds).crossing
        fixed = baselines.Fixed(len(exits), cut)
        if cut not in forced:
            forced[cut] = fixed.compile(exits, device, edge)
        own = fixed.decide(View(prepared=forced[cut], conditions=cond))
        if ours.exit == len(exits) and isinstance(own, Decision):
            slower_cut += ours.predicted_s > own.predicted_s * (1 + 1e-9)
        if ds == es == 1.0:
            base = baselines.baselines(single, cond)
            device_only, edge_only = base["device_only"], base["edge_only"]
            assert isinstance(device_only, Decision) and isinstance(edge_only, Decision)
            rows.append({"bandwidth_bps": bps, "mincut_s": ours.predicted_s, "single_cut_s": theirs.predicted_s,
                         "device_only_s": device_only.predicted_s, "edge_only_s": edge_only.predicted_s,
                         "gain": theirs.predicted_s / ours.predicted_s, "exit": ours.exit,
                         "crossing": sorted(ours.cut_tensors), "single_crossing": sorted(theirs.cut_tensors)})
    g = prepared.graphs[-1]
    return {"candidates": int(prepared.candidates.exit.size), "single_cut_candidates": int(single.exit.size),
            "candidates_per_exit": [len(ex.cuts) for ex in prepared.exits], "prepare_s": prepare_s, "rows": rows,
            "multi_tensor_cuts": [[e, list(c)] for e, c in sorted(chosen)],
            "exactness": {"points": len(BANDWIDTHS) * len(SPEEDS) ** 2, "slower_than_single_cut": int(slower_single),
                          "slower_than_min_cut": int(slower_cut), "multi_tensor_wins": int(wins),
                          "worst_ratio_to_single_cut": worst},
            "lookup": bench.decision_times(prepared, requests, decide=policy.decide),
            "single_cut_search": bench.decision_times(Prepared(candidates=single), requests,
                                                      decide=lambda v: edgent.plan(v.candidates, v.conditions)),
            "min_cut": bench.solve_times(g, solves=50),
            "brute_force": bench.brute_force_times(g)}


async def _loop_stall(model: onnx.ModelProto, device: LatencyModel, edge: LatencyModel) -> dict[str, float]:
    """The longest gap between 1 ms ticks of the event loop while deviced's edge directory prepares a new advert
    for ``model`` (off the loop), against the time the preparation takes (what the loop stalled for when it
    prepared on the loop)."""
    exits = exits_from_manifest(describe(model))
    edges = EdgeDirectory(digest="0" * 64, exits=exits, device_model=device, policy=policies.make("mincut"))
    edges.on_status(Inbound(channel=Channel.EDGE_STATUS, sender="edge", topic="-",
                            message=Status(state="online", sender="edge")))
    advert = Advert(edge_id="edge", bundles={"0" * 64: "m"}, latency_model=edge.to_json(), queue_depth=0,
                    service_s=0.01, workers=1)
    stalls: list[float] = []
    started = time.perf_counter()
    edges.on_advert(Inbound(channel=Channel.EDGE_ADVERT, sender="edge", message=advert, topic="-"))
    last = time.perf_counter()
    while edges.edges["edge"].prepared is None:
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        stalls.append(now - last)
        last = now
    prepare_s = time.perf_counter() - started
    edges.close()
    return {"max_stall_s": max(stalls), "p50_tick_s": float(np.median(stalls)), "prepare_s": prepare_s,
            "ticks": len(stalls)}


def _exactness(model: onnx.ModelProto, entry: dict[str, Any]) -> dict[str, Any]:
    """Every multi-tensor cut chosen: head then tail against the whole model on a random input."""
    cuts = {(e, tuple(c)) for dev in entry["devices"].values() for e, c in dev["multi_tensor_cuts"]}
    outputs = [o.name for o in model.graph.output]
    worst = scale = 0.0
    for exit_index, tensors in sorted(cuts):
        sub = graph.prepare(graph.extract_outputs(model, [outputs[exit_index - 1]]))
        feed = random_feed(sub, np.random.default_rng(0))
        whole = _run(sub, feed)
        head, tail = graph.split(sub, tensors)
        out = _run(tail, _run(head, feed))
        worst = max(worst, *(float(np.max(np.abs(out[k] - v))) for k, v in whole.items()))
        scale = max(scale, *(float(np.max(np.abs(v))) for v in whole.values()))
    return {"multi_tensor_cuts": [{"exit": e, "tensors": list(c)} for e, c in sorted(cuts)], "max_abs_diff": worst,
            "max_abs_output": scale}


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed), strict=True))


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
        rows = doc["models"][name]["devices"][PLOTTED]["rows"]
        bw = [r["bandwidth_bps"] / 1e6 for r in rows]
        for key, label, style in (("mincut_s", "min-cut", "o-"), ("single_cut_s", "best single cut", "s--"),
                                  ("edge_only_s", "edge only", ":"), ("device_only_s", "device only", "-.")):
            ax.plot(bw, [r[key] for r in rows], style, label=label)
        ax.set(xscale="log", yscale="log", xlabel="uplink (Mbps)", ylabel="predicted latency (s)",
               title=f"{name} ({doc['models'][name]['nodes']} nodes)")
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("min-cut vs best single-tensor cut (edge: this host's fitted model; device: "
                 f"{HOST_SLOWDOWN:.0f}x slower)")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)
