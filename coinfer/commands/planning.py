"""Planning: ``plan`` (one request), ``sweep`` (over bandwidths or deadlines), ``pipeline plan`` (a fleet's stages)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from coinfer.commands import Command
from models import graph, loaders
from models.bundle import DEFAULT_BUNDLE, MANIFEST, describe, load_bundle
from planner import baselines, candidates, edgent, policies, units
from planner import pipeline as pipeline_planner
from planner.core import Candidates, Conditions, Decision, Infeasible, Planner, Prepared, View, exits_from_manifest

NO_DEADLINE_S = 1e6  # `plan` without --deadline: the fastest plan of the most accurate exit


def _request_args(s: argparse.ArgumentParser) -> None:
    """What ``plan`` and ``sweep`` share: the model, both latency models, the round trip and the policy."""
    s.add_argument("bundle", nargs="?", type=Path, default=DEFAULT_BUNDLE,
                   help="a bundle directory, or any ONNX file (each graph output an exit, accuracy unmeasured)")
    s.add_argument("--device-model", type=Path, default=loaders.PI3_MODEL)
    s.add_argument("--edge-model", type=Path, default=loaders.DESKTOP_MODEL)
    s.add_argument("--rtt", default=None, help="fixed round-trip cost, e.g. 5ms (default 0)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--policy", default=policies.DEFAULT,
                   choices=[policies.AUTO, *sorted(set(policies.POLICIES) - {"fixed"})],
                   help="planning policy (default auto: mincut for a DAG model, edgent for a chain)")


def _plan_args(s: argparse.ArgumentParser) -> None:
    _request_args(s)
    s.add_argument("--bandwidth", required=True, help="uplink, e.g. 500kbps or 1.5Mbps")
    s.add_argument("--deadline", help="e.g. 300ms or 1s (default: none, the fastest plan of the top exit)")


def _sweep_args(s: argparse.ArgumentParser) -> None:
    _request_args(s)
    s.add_argument("--bandwidths", default="50kbps,100kbps,200kbps,400kbps,500kbps,750kbps,1Mbps,1.5Mbps,2Mbps")
    s.add_argument("--deadlines", default="1s", help="comma-separated; sweeps whichever list is longer")


def _pipeline_args(pipe: argparse.ArgumentParser) -> None:
    s = pipe.add_subparsers(dest="action", required=True, metavar="ACTION").add_parser(
        "plan", help="the stages, block ranges, threads, replicas and splits that maximise frames/s")
    s.add_argument("model", nargs="?", type=Path, default=DEFAULT_BUNDLE, help="bundle directory or ONNX file")
    s.add_argument("--workers", required=True, type=Path, help="the fleet (a *.workers.toml file)")
    s.add_argument("--exit", type=int, default=None, help="the exit to serve (default: the deepest)")
    s.add_argument("--method", default=None, choices=list(pipeline_planner.METHODS),
                   help=f"exact (default up to {pipeline_planner.EXACT_MAX} workers), pso (default beyond), greedy; "
                        "embedded: one worker's cores")
    s.add_argument("--latency-bound", default=None, help="per-frame latency bound, e.g. 500ms")
    s.add_argument("--seed", type=int, default=0, help="pso: the swarm's seed")
    s.add_argument("--no-split", action="store_true", help="leave intra-layer splits out")
    s.add_argument("--json", action="store_true")


@dataclass(frozen=True, slots=True)
class _Setup:
    name: str
    policy_name: str  # what ran (``auto`` resolved)
    policy: Planner
    prepared: Prepared  # by the policy
    single: Candidates  # every single-tensor cut: what the chain planner searches
    rtt_s: float


def _setup(args: argparse.Namespace) -> _Setup:
    """The model (a bundle, or any ONNX file: one exit per graph output, accuracy unmeasured), both latency
    models, and the policy's candidates."""
    path = Path(args.bundle)
    if (path / MANIFEST).exists():
        bundle = load_bundle(path)
        name, exits = bundle.name, bundle.exits
    else:
        name, exits = path.name, exits_from_manifest(describe(graph.load_model(path)))
    device = loaders.load_latency_model(args.device_model)
    edge = loaders.load_latency_model(args.edge_model)
    policy_name = policies.resolve(args.policy, exits)
    policy = policies.make(policy_name)
    rtt = units.parse_duration(args.rtt) if args.rtt else 0.0
    return _Setup(name=name, policy_name=policy_name, policy=policy, prepared=policy.compile(exits, device, edge),
                  single=candidates.compile_candidates(exits, device, edge), rtt_s=rtt)


def _plan_row(label: str, p: Decision | Infeasible) -> str:
    if isinstance(p, Infeasible):
        return f"{label:<15} {'infeasible':>10}  {p.reason}"

    def ms(v: float) -> str:
        return f"{v * 1e3:8.1f}"

    return (f"{label:<15} {'yes' if p.feasible else 'MISS':>10} {p.exit:>4} {p.cut:>3}/{p.n_layers:<3} {p.where:<6} "
            f"{ms(p.predicted_s)} {ms(p.device_s)} {ms(p.transfer_s)} {ms(p.edge_s)} {_accuracy(p.accuracy)}")


def _accuracy(value: float) -> str:
    """An exit's accuracy, or "unmeasured" (a model packaged without a labelled set carries 0)."""
    return f"{value:10.4f}" if value > 0 else f"{'unmeasured':>10}"


HEADER = (f"{'method':<15} {'meets':>10} {'exit':>4} {'cut':>7} {'where':<6} {'total ms':>8} {'device':>8} "
          f"{'transfer':>8} {'edge':>8} {'accuracy':>10}")


def cmd_plan(args: argparse.Namespace) -> int:
    setup = _setup(args)
    cond = Conditions(bandwidth_bps=units.parse_bandwidth(args.bandwidth),
                      deadline_s=units.parse_duration(args.deadline) if args.deadline else NO_DEADLINE_S,
                      rtt_s=setup.rtt_s)
    chosen = setup.policy.decide(View(prepared=setup.prepared, conditions=cond))
    base, single = baselines.baselines(setup.single, cond), edgent.plan(setup.single, cond)
    if args.json:
        shown = chosen if isinstance(chosen, Decision) else chosen.best_effort
        c = setup.prepared.candidates
        n_candidates = int((c.exit == shown.exit).sum()) if shown else int(c.exit.size)
        print(json.dumps({**chosen.to_json(), "policy": setup.policy_name, "n_candidates": n_candidates,
                          "bandwidth_bps": cond.bandwidth_bps, "deadline_s": cond.deadline_s,
                          "best_single_cut": single.to_json(),
                          "baselines": {k: v.to_json() for k, v in base.items()}}, indent=1))
        return 0
    print(f"{setup.name}: uplink {args.bandwidth}, deadline {args.deadline or 'none'}")
    print(HEADER)
    print(_plan_row(setup.policy_name, chosen))
    print(_plan_row("best_single_cut", single))
    for k, v in base.items():
        print(_plan_row(k, v))
    if isinstance(chosen, Decision) and len(chosen.cut_tensors) > 1:
        print(f"{setup.policy_name} crosses {len(chosen.cut_tensors)} tensors: {', '.join(sorted(chosen.cut_tensors))}")
    return 0 if chosen.feasible else 1


def cmd_sweep(args: argparse.Namespace) -> int:
    setup = _setup(args)
    name, prepared, rtt = setup.name, setup.prepared, setup.rtt_s
    bws = [units.parse_bandwidth(b) for b in args.bandwidths.split(",")]
    dls = [units.parse_duration(d) for d in args.deadlines.split(",")]
    rows = [(bw, dl) for bw in bws for dl in dls]
    results = []
    policy = setup.policy
    for bw, dl in rows:
        view = View(prepared=prepared, conditions=Conditions(bandwidth_bps=bw, deadline_s=dl, rtt_s=rtt))
        results.append({"bandwidth_bps": bw, "deadline_s": dl, "policy": setup.policy_name,
                        **policy.decide(view).to_json()})
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"{name}: device {args.device_model.stem}, edge {args.edge_model.stem}, policy {setup.policy_name}")
    print(f"{'uplink':>9} {'deadline':>9} {'exit':>5} {'cut':>7} {'where':<6} {'predicted ms':>12} {'accuracy':>10} "
          f"crossing as")
    for r in results:
        cut = f"{r['cut']}/{r['n_layers']}" if r["exit"] else "-"
        pred = f"{r['predicted_s'] * 1e3:12.1f}" if r["exit"] else f"{'infeasible':>12}"
        acc = _accuracy(r["accuracy"]) if r["exit"] else f"{'-':>10}"
        crossing = r.get("encoding", "-") if r["exit"] and r["where"] != "device" else "-"
        print(f"{units.format_bandwidth(r['bandwidth_bps']):>9} {r['deadline_s'] * 1e3:>7.0f}ms "
              f"{r['exit'] or '-':>5} {cut:>7} {r['where']:<6} {pred} {acc} {crossing}")
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from coinfer.bench import pipeline
    from models.loaders import load_fleet

    fleet = load_fleet(args.workers)
    chain = pipeline.load_chain(Path(args.model), args.exit)
    bound = units.parse_duration(args.latency_bound) if args.latency_bound else None
    p = pipeline_planner.plan(chain, fleet, method=args.method, latency_bound_s=bound, seed=args.seed,
                              split=not args.no_split)
    print(json.dumps(p.to_json(), indent=1) if args.json else pipeline.format_plan(p))
    return 0


COMMANDS = (
    Command("plan", "choose exit and cut for one request", _plan_args, cmd_plan),
    Command("sweep", "plan over a bandwidth or deadline sweep", _sweep_args, cmd_sweep),
    Command("pipeline", "pipelines over several devices (and an edge): plan a fleet's stages", _pipeline_args,
            cmd_pipeline),
)
