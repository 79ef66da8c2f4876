"""``coinfer``: the tool CLI (inspect, split, train, profile, fit, plan, sweep, bench)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from coinfer import bench
from models import branchy, graph, loaders
from models.bundle import BUNDLES_DIR, DEFAULT_BUNDLE, MANIFEST, describe, exit_accuracies, load_bundle, package
from models.errors import ModelError
from planner import baselines, candidates, edgent, policies, units
from planner import pipeline as pipeline_planner
from planner.core import Candidates, Conditions, Decision, Infeasible, Planner, Prepared, View, exits_from_manifest
from planner.errors import PlannerError
from planner.latency import FIT_VARIABLES, TABLE_I_VARIABLES, Sample, fit

NO_DEADLINE_S = 1e6  # `plan` without --deadline: the fastest plan of the most accurate exit
RESNETS = ("fmnist-branchy-resnet", "fmnist56-branchy-resnet")  # models.resnet.ARCHS, named here: torch only to train


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
    except (ModelError, PlannerError) as exc:
        print(f"coinfer: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="coinfer", description="coinfer: device-edge DNN co-inference tools")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("layers", help="list a model's layers and valid cut points")
    s.add_argument("model", help="ONNX file or bundle directory")
    s.add_argument("--output", help="restrict to the sub-model computing this output (e.g. exit3)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=cmd_layers)

    s = sub.add_parser("split", help="split a model at a cut into head and tail ONNX files")
    s.add_argument("model", help="ONNX file or bundle directory")
    s.add_argument("--at", required=True,
                   help="cut name from `coinfer layers` (tensors joined by '+' for a multi-tensor cut)")
    s.add_argument("--head", required=True, type=Path)
    s.add_argument("--tail", required=True, type=Path)
    s.add_argument("--output", help="restrict to the sub-model computing this output first")
    s.set_defaults(func=cmd_split)

    s = sub.add_parser("bundle", help="package any ONNX classifier as a bundle that edged and deviced serve")
    s.add_argument("model", type=Path, help="an ONNX file with one input")
    s.add_argument("--out", required=True, type=Path, help="the bundle directory to write")
    s.add_argument("--name", help="the bundle's name (default: the file's stem)")
    s.add_argument("--exits", help="comma-separated outputs to serve as exits, least accurate first "
                                   "(default: every graph output)")
    s.add_argument("--labels", type=Path, help="an .npz with `x` (inputs, N x the model's input shape without its "
                                               "batch) and `y` (class indices): each exit's accuracy is measured on "
                                               "it; without: marked unmeasured (0)")
    s.set_defaults(func=cmd_bundle)

    s = sub.add_parser("encodings", help="measure the accuracy and bytes of every (exit, cut, encoding) of a bundle "
                                         "into its manifest (what the planner may choose)")
    s.add_argument("bundle", type=Path)
    s.add_argument("--labels", type=Path, help="an .npz with `x` and `y` as for `bundle` (default: the Fashion-MNIST "
                                               "test set through the bundle's preprocessing)")
    s.add_argument("--images", type=int, help="measure on the first N inputs only (default: all)")
    s.add_argument("--json", action="store_true", help="print the measurements as JSON")
    s.set_defaults(func=cmd_encodings)

    s = sub.add_parser("train", help="train a branchy network on Fashion-MNIST and write its bundle (needs torch)")
    s.add_argument("--arch", choices=[*sorted(branchy.ARCHS), *RESNETS], default=branchy.ALEXNET28.name,
                   help=f"which architecture (and bundle name); {' and '.join(RESNETS)}: the residual DAGs (--init, "
                        f"--freeze and --finetune-epochs apply to the AlexNets)")
    s.add_argument("--out", type=Path, default=None, help="bundle directory (default: models/bundles/ARCH)")
    s.add_argument("--epochs", type=float, default=3.0, help="joint training of all exits")
    s.add_argument("--finetune-epochs", type=float, default=1.0, help="then the last segment alone")
    s.add_argument("--subset", type=int, default=None, help="train on the first N training images only")
    s.add_argument("--batch", type=int, default=128)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--init", type=Path, default=None, help="start from this bundle's weights (same --arch)")
    s.add_argument("--freeze", type=int, default=0, metavar="N",
                   help="keep the first N segments and their exits fixed; train the rest")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("profile", help="measure per-layer latency on this host")
    s.add_argument("models", nargs="*", type=Path, help="bundles or ONNX files (default: the shipped bundle)")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--sweep", type=int, default=0, metavar="N", help="also profile N random synthetic chains")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--runs", type=int, default=50)
    s.add_argument("--warmup", type=int, default=10)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_profile)

    s = sub.add_parser("fit", help="fit per-layer-type latency models from profiles")
    s.add_argument("profiles", nargs="+", type=Path)
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--name", default=None)
    s.add_argument("--table-i", action="store_true", help="use only Edgent's Table I variables (no FLOPs term)")
    s.set_defaults(func=cmd_fit)

    for name, helptext in (("plan", "choose exit and cut for one request"),
                           ("sweep", "plan over a bandwidth or deadline sweep")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("bundle", nargs="?", type=Path, default=DEFAULT_BUNDLE,
                       help="a bundle directory, or any ONNX file (each graph output an exit, accuracy unmeasured)")
        s.add_argument("--device-model", type=Path, default=loaders.PI3_MODEL)
        s.add_argument("--edge-model", type=Path, default=loaders.DESKTOP_MODEL)
        s.add_argument("--rtt", default=None, help="fixed round-trip cost, e.g. 5ms (default 0)")
        s.add_argument("--json", action="store_true")
        s.add_argument("--policy", default=policies.DEFAULT, choices=sorted(set(policies.POLICIES) - {"fixed"}),
                       help=f"planning policy (default {policies.DEFAULT})")
        if name == "plan":
            s.add_argument("--bandwidth", required=True, help="uplink, e.g. 500kbps or 1.5Mbps")
            s.add_argument("--deadline", help="e.g. 300ms or 1s (default: none, the fastest plan of the top exit)")
            s.set_defaults(func=cmd_plan)
        else:
            s.add_argument("--bandwidths", default="50kbps,100kbps,200kbps,400kbps,500kbps,750kbps,1Mbps,1.5Mbps,2Mbps")
            s.add_argument("--deadlines", default="1s", help="comma-separated; sweeps whichever list is longer")
            s.set_defaults(func=cmd_sweep)

    s = sub.add_parser("demo", help="mosquitto + edged + deviced on this machine, co-inference on real images")
    s.add_argument("--links", default="100kbps,2Mbps", help="emulated uplink speeds, comma-separated")
    s.add_argument("--deadline", default="200ms")
    s.add_argument("--images", type=int, default=300)
    s.add_argument("--mosquitto-conf", type=Path, default=Path(__file__).resolve().parent.parent / "mosquitto.conf")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("testbed", help="the emulated device + link (network namespaces, tc tbf, CPU cgroup; root)")
    s.add_argument("action", choices=["up", "down"])
    s.add_argument("--uplink", default="1Mbps")
    s.add_argument("--cpu-quota", type=float, default=0.1)
    s.set_defaults(func=cmd_testbed)

    s = sub.add_parser("broker", help="provision the production broker: certificates, per-device credentials and ACLs")
    s.add_argument("action", choices=["init", "add-device", "add-edge", "add-app", "revoke", "list", "scrape-config"])
    s.add_argument("ident", nargs="?",
                   help="device or edge id (add-device, add-edge, revoke); DEVICE.APP for add-app (e.g. pi-1.camera)")
    s.add_argument("--domain", default="lan", help="scrape-config: targets are ID.DOMAIN:PORT unless --target")
    s.add_argument("--target", action="append", default=[], metavar="ID=HOST:PORT",
                   help="scrape-config: where one edge or device serves its metrics (repeat)")
    s.add_argument("--out", type=Path, help="scrape-config: write here instead of printing")
    s.add_argument("--dir", type=Path, default=Path("/etc/mosquitto/coinfer"), help="the broker's coinfer folder")
    s.add_argument("--host", action="append", default=[],
                   help="init: a DNS name or IP devices use to reach the broker (repeat for several)")
    s.add_argument("--prefix", default="coinfer", help="topic prefix of the deployment")
    s.set_defaults(func=cmd_broker)

    pipe = sub.add_parser("pipeline", help="pipelines over several devices (and an edge): plan a fleet's stages")
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
    s.set_defaults(func=cmd_pipeline)

    s = sub.add_parser("bench", help="benchmarks that write numbers to a file")
    s.add_argument("what", choices=["planner", "transport", "edgent", "load", "dag", "pipeline", "energy"])
    s.add_argument("--out", required=True, type=Path, help="a JSON file (edgent, dag: a folder)")
    s.add_argument("--loopback", action="store_true",
                   help="edgent: no namespaces/tc/cgroup (no root): emulate link and device in-app, labelled so")
    s.add_argument("--cpu-quota", type=float, default=0.1,
                   help="edgent: the device's share of one core (below 10%%, the 10 ms period lengthens to 1 ms each)")
    s.add_argument("--per-point", type=int, default=20, help="edgent: requests per measured point")
    s.add_argument("--per-method", type=int, default=30,
                   help="edgent: requests per method and deadline in Fig. 9 (the same images for each method)")
    s.add_argument("--bundle", type=Path, default=None,
                   help="edgent: the model (default: the 56x56 bundle, whose stages suit a CPU quota)")
    s.add_argument("--policy", default=policies.DEFAULT, choices=sorted(set(policies.POLICIES) - {"fixed"}),
                   help="edgent: deviced's planning policy, the figures' `coinfer` (mincut for a DAG bundle)")
    s.add_argument("--only", choices=["fig9"], help="edgent: calibrate, then this experiment alone (fig9: accuracy "
                                                    "vs deadline at 400 kbps, with and without encoded activations)")
    s.add_argument("--requests", type=int, default=20000)
    s.add_argument("--soak", type=float, default=180.0, help="load: soak length in seconds (0: none)")
    s.add_argument("--step", type=float, default=4.0, help="load: seconds per offered rate")
    s.add_argument("--sim", action="store_true",
                   help="pipeline: plan and simulate (no root); without it, streams through deviced on the fleet "
                        "testbed (root)")
    s.add_argument("--testbed", action="store_true",
                   help="energy: the controller in deviced on the namespace testbed, against its simulation (root)")
    s.add_argument("--frames", type=int, default=None,
                   help="pipeline: frames per plan (default: 1000 simulated, 100 streamed on the testbed)")
    s.set_defaults(func=cmd_bench)
    return p


def _model_arg(path: Path, output: str | None) -> onnx.ModelProto:
    model = load_bundle(path).model if (path / MANIFEST).exists() else graph.load_model(path)
    return graph.prepare(graph.extract_outputs(model, [output])) if output else model


def cmd_layers(args: argparse.Namespace) -> int:
    model = _model_arg(Path(args.model), args.output)
    layers, cuts = graph.layers(model), graph.cuts(model)
    if args.json:
        print(json.dumps({"model": str(args.model), "layers": [lay.to_json() for lay in layers],
                          "cuts": [c.to_json() for c in cuts]}, indent=1))
        return 0
    cut_after = {c.index: c for c in cuts}
    print(f"{'#':>3}  {'layer':<16} {'op':<12} {'type':<8} {'out bytes':>10} {'MFLOPs':>8}  cut after")
    for lay in layers:
        cut = cut_after.get(lay.index + 1)
        print(f"{lay.index:>3}  {lay.name:<16} {lay.op_type:<12} {lay.kind:<8} {lay.features['output_bytes']:>10.0f} "
              f"{lay.features['flops'] / 1e6:>8.2f}  {cut.name if cut else ''}")
    print(f"{len(layers)} layers, {len(cuts)} single-tensor cuts")
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    model = _model_arg(Path(args.model), args.output)
    head, tail = graph.split(model, graph.find_cut(model, args.at))
    onnx.save(head, str(args.head))
    onnx.save(tail, str(args.tail))
    print(f"head: {len(head.graph.node)} layers -> {args.head}\ntail: {len(tail.graph.node)} layers -> {args.tail}")
    return 0


def cmd_bundle(args: argparse.Namespace) -> int:
    model = graph.load_model(args.model)
    if args.exits:
        model = graph.prepare(graph.extract_outputs(model, [o.strip() for o in args.exits.split(",")]))
    accuracy = None
    count = 0
    if args.labels:
        x, y = _labelled(args.labels)
        shape = tuple(describe(model)["input"]["shape"][1:])
        if x.shape[1:] != shape or len(x) != len(y):
            raise ModelError(f"{args.labels}: x is {list(x.shape)} and y {list(y.shape)}; the model takes "
                             f"N x {list(shape)} inputs, one label each")
        outputs = [o.name for o in model.graph.output]
        accuracy, count = exit_accuracies(model, outputs, x, y), len(y)
    out = package(model, args.out, name=args.name or args.model.stem, accuracy=accuracy, test_images=count,
                  training={"source": str(args.model), "labels": str(args.labels) if args.labels else None})
    bundle = load_bundle(out)
    for e in bundle.exits:
        measured = f"accuracy {e.accuracy:.4f} on {count}" if accuracy is not None else "accuracy unmeasured"
        print(f"exit {e.index} ({e.output}): {len(e.layers)} layers, {len(e.cuts)} single-tensor cuts, {measured}")
    print(f"-> {out} (sha256 {bundle.digest[:12]}); serve it: [edged] bundles = [\"{out}\"], "
          f"[deviced] bundle = \"{out}\"; plan DAG cuts with [planner] policy = \"mincut\"")
    return 0


def _labelled(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of a labelled-set .npz, never unpickled."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return np.asarray(data["x"], np.float32), np.asarray(data["y"], np.int64)
    except (OSError, KeyError, ValueError) as exc:
        raise ModelError(f"{path}: expected an .npz with arrays x and y ({exc})") from exc


def cmd_encodings(args: argparse.Namespace) -> int:
    from models import encodings

    x = y = None
    if args.labels:
        x, y = _labelled(args.labels)
    summary = encodings.measure(args.bundle, x=x, y=y, images=args.images, progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print(f"{summary['bundle']}: {summary['crossing_sets']} crossing tensor sets measured on {summary['inputs']} "
          "inputs; per exit, over its cuts: accuracy change (points) and bytes against float32")
    for e in summary["exits"]:
        cuts = [e["input"], *e["cuts"].values()]
        row = []
        for name in encodings.MEASURED:
            delta = [100 * (c[name]["accuracy"] - c["float32+zstd"]["accuracy"]) for c in cuts]
            row.append(f"{name} {min(delta):+.2f}..{max(delta):+.2f}")
        print(f"  exit {e['exit']} (float32 {e['accuracy']:.4f}): " + ", ".join(row))
    print(f"-> {args.bundle / 'manifest.json'}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    try:
        from models.train import export_bundle, train, weights_of
    except ImportError as exc:
        print(f"coinfer: error: training needs torch ({exc}); install the extra: pip install 'coinfer[train]'",
              file=sys.stderr)
        return 2
    if args.arch in RESNETS:  # a DAG: not a branchy.Arch chain
        from models import resnet

        net, report = resnet.train(resnet.ARCHS[args.arch], epochs=args.epochs, batch=args.batch,
                                   subset=args.subset, seed=args.seed)
        out = resnet.export_bundle(net, args.out or BUNDLES_DIR / args.arch, report)
        for e in load_bundle(out).exits:
            print(f"exit {e.index}: {len(e.layers):>2} layers, test accuracy {e.accuracy:.4f}")
        print(f"bundle written to {out}")
        return 0
    arch = branchy.ARCHS[args.arch]
    base = load_bundle(args.init) if args.init else None
    model, report = train(arch, epochs=args.epochs, finetune_epochs=args.finetune_epochs, batch=args.batch,
                          subset=args.subset, seed=args.seed, init=weights_of(base) if base else None,
                          freeze=args.freeze)
    if base:  # the whole history stays in the manifest
        report["continued_from"] = base.manifest["training"]
    out = export_bundle(model, args.out or BUNDLES_DIR / arch.name, report)
    for e in load_bundle(out).exits:
        print(f"exit {e.index}: {len(e.layers):>2} layers, test accuracy {e.accuracy:.4f}")
    print(f"bundle written to {out}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from models import profile, synth

    models: list[tuple[str, onnx.ModelProto]] = []
    for path in args.models or [DEFAULT_BUNDLE]:
        if (path / MANIFEST).exists():
            b = load_bundle(path)
            models.append((b.name, b.model))
        else:
            models.append((path.stem, graph.load_model(path)))
    rng = np.random.default_rng(args.seed)
    models += [(f"random_chain_{i}", synth.random_chain(rng, i)) for i in range(args.sweep)]

    def progress(i: int, n: int, name: str) -> None:
        print(f"[{i + 1}/{n}] profiling {name}", file=sys.stderr, flush=True)

    doc = profile.profile_models(models, threads=args.threads, warmup=args.warmup, runs=args.runs,
                                 progress=progress)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    n_layers = sum(len(m["layers"]) for m in doc["models"])
    print(f"profiled {len(models)} model(s), {n_layers} layers, {args.threads} thread(s) -> {args.out}")
    return 0


def samples_from_profiles(docs: Sequence[dict[str, Any]]) -> tuple[list[Sample], float]:
    """Layer samples (plus one "load" sample per model) and the median per-run overhead."""
    samples, overheads = [], []
    for doc in docs:
        if doc.get("format") != "coinfer.profile/1":
            raise PlannerError("not a coinfer.profile/1 document")
        for m in doc["models"]:
            for lay in m["layers"]:
                feats = {k: float(v) for k, v in lay.items() if isinstance(v, (int, float))}
                samples.append(Sample(kind=lay["type"], features=feats, latency_s=float(lay["latency_s"])))
            samples.append(Sample(kind="load", features={"model_bytes": float(m["model_bytes"])},
                                  latency_s=float(m["load_s"])))
            overheads.append(m["run_s"] - sum(lay["latency_s"] for lay in m["layers"]))
    return samples, max(0.0, statistics.median(overheads)) if overheads else 0.0


def cmd_fit(args: argparse.Namespace) -> int:
    docs = []
    for path in args.profiles:
        try:
            docs.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise PlannerError(f"cannot read profile {path}: {exc}") from exc
    samples, overhead = samples_from_profiles(docs)
    host = docs[0].get("host", {})
    model = fit(samples, name=args.name or f"{host.get('hostname', 'host')}-{docs[0].get('threads', 1)}t",
                variables=TABLE_I_VARIABLES if args.table_i else FIT_VARIABLES,
                stage_overhead_s=overhead, meta={"host": host, "threads": docs[0].get("threads"),
                                                 "profiles": [str(p) for p in args.profiles]})
    args.out.write_text(json.dumps(model.to_json(), indent=1) + "\n")
    print(f"{'type':<8} {'n':>5} {'held out':>8} {'R2':>7} {'MdAPE':>7}  variables")
    for kind, tm in model.types.items():
        r2, mdape = tm.fit.get("r2"), tm.fit.get("mdape")
        print(f"{kind:<8} {tm.fit.get('n', 0):>5} {tm.fit.get('n_test', 0):>8} "
              f"{'-' if r2 is None else f'{r2:.3f}':>7} {'-' if mdape is None else f'{mdape:.1%}':>7}  "
              f"{', '.join(tm.variables)}")
    errors = [abs(sum(model.predict(lay["type"], lay) for lay in m["layers"]) - m["run_s"]) / m["run_s"]
              for doc in docs for m in doc["models"]]
    print(f"whole models ({len(errors)}): predicted vs measured run, median error {np.median(errors):.1%}, "
          f"p95 {np.percentile(errors, 95):.1%}")
    print(f"stage overhead {overhead * 1e6:.1f} us; latency model -> {args.out}")
    return 0


@dataclass(frozen=True, slots=True)
class _Setup:
    name: str
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
    policy = policies.make(args.policy)
    rtt = units.parse_duration(args.rtt) if args.rtt else 0.0
    return _Setup(name=name, policy=policy, prepared=policy.compile(exits, device, edge),
                  single=candidates.compile_candidates(exits, device, edge), rtt_s=rtt)


def _plan_row(label: str, p: Decision | Infeasible) -> str:
    if isinstance(p, Infeasible):
        return f"{label:<15} {'infeasible':>10}  {p.reason}"

    def ms(v: float) -> str:
        return f"{v * 1e3:8.1f}"

    return (f"{label:<15} {'yes' if p.feasible else 'MISS':>10} {p.exit:>4} {p.cut:>3}/{p.n_layers:<3} {p.where:<6} "
            f"{ms(p.predicted_s)} {ms(p.device_s)} {ms(p.transfer_s)} {ms(p.edge_s)} {p.accuracy:8.4f}")


HEADER = (f"{'method':<15} {'meets':>10} {'exit':>4} {'cut':>7} {'where':<6} {'total ms':>8} {'device':>8} "
          f"{'transfer':>8} {'edge':>8} {'accuracy':>8}")


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
        print(json.dumps({**chosen.to_json(), "policy": args.policy, "n_candidates": n_candidates,
                          "bandwidth_bps": cond.bandwidth_bps, "deadline_s": cond.deadline_s,
                          "best_single_cut": single.to_json(),
                          "baselines": {k: v.to_json() for k, v in base.items()}}, indent=1))
        return 0
    print(f"{setup.name}: uplink {args.bandwidth}, deadline {args.deadline or 'none'}")
    print(HEADER)
    print(_plan_row(args.policy, chosen))
    print(_plan_row("best_single_cut", single))
    for k, v in base.items():
        print(_plan_row(k, v))
    if isinstance(chosen, Decision) and len(chosen.cut_tensors) > 1:
        print(f"{args.policy} crosses {len(chosen.cut_tensors)} tensors: {', '.join(sorted(chosen.cut_tensors))}")
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
        results.append({"bandwidth_bps": bw, "deadline_s": dl, **policy.decide(view).to_json()})
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"{name}: device {args.device_model.stem}, edge {args.edge_model.stem}")
    print(f"{'uplink':>9} {'deadline':>9} {'exit':>5} {'cut':>7} {'where':<6} {'predicted ms':>12} {'accuracy':>8} "
          f"crossing as")
    for r in results:
        cut = f"{r['cut']}/{r['n_layers']}" if r["exit"] else "-"
        pred = f"{r['predicted_s'] * 1e3:12.1f}" if r["exit"] else f"{'infeasible':>12}"
        acc = f"{r['accuracy']:8.4f}" if r["exit"] else f"{'-':>8}"
        crossing = r.get("encoding", "-") if r["exit"] and r["where"] != "device" else "-"
        print(f"{units.format_bandwidth(r['bandwidth_bps']):>9} {r['deadline_s'] * 1e3:>7.0f}ms "
              f"{r['exit'] or '-':>5} {cut:>7} {r['where']:<6} {pred} {acc} {crossing}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from coinfer import demo

    links = args.links.split(",")
    demo.check_links(links)
    return demo.run_demo(links=links, deadline_s=units.parse_duration(args.deadline), images=args.images,
                         mosquitto_conf=args.mosquitto_conf)


def cmd_testbed(args: argparse.Namespace) -> int:
    from coinfer import testbed

    try:
        if args.action == "down":
            testbed.check_privileges()
            testbed.down()
            print("testbed removed")
            return 0
        bed = testbed.Testbed(testbed.Emulation.with_quota(args.cpu_quota,
                                                           uplink_bps=units.parse_bandwidth(args.uplink)))
        bed.up()
    except testbed.TestbedError as exc:
        print(f"coinfer: error: {exc}", file=sys.stderr)
        return 2
    for key, value in bed.describe().items():
        print(f"{key}: {value}")
    print(f"edge side:   {' '.join(bed.edge_argv(['CMD']))}\ndevice side: {' '.join(bed.device_argv(['CMD']))}\n"
          f"change the link: ip netns exec {testbed.NS_DEVICE} tc qdisc change dev {testbed.VETH_DEVICE} root "
          f"{' '.join(testbed.tbf_args(5e5))}\nremove: coinfer testbed down")
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    from coinfer import broker
    from protocol.errors import MalformedMessage

    try:
        if args.action == "init":
            for path in broker.init(args.dir, args.host):
                print(f"wrote {path}")
            print(f"next: install deploy/mosquitto/coinfer.conf as /etc/mosquitto/conf.d/coinfer.conf, then "
                  f"`coinfer broker add-edge ID` and `coinfer broker add-device ID`; copy {args.dir / 'ca.crt'} to "
                  f"each device")
        elif args.action == "list":
            for e in broker.entries(args.dir):
                print(f"{e.role:<7} {e.ident:<24} prefix {e.prefix}")
        elif args.action == "scrape-config":
            targets = dict(t.split("=", 1) for t in args.target if "=" in t)
            if len(targets) != len(args.target):
                raise ValueError("--target takes ID=HOST:PORT")
            text = broker.scrape_config(broker.entries(args.dir), domain=args.domain, targets=targets)
            if args.out:
                args.out.write_text(text)
                print(f"wrote {args.out}")
            else:
                print(text, end="")
        elif args.ident is None:
            print(f"coinfer: error: broker {args.action} needs an id", file=sys.stderr)
            return 2
        elif args.action == "revoke":
            e = broker.revoke(args.dir, args.ident)
            print(f"revoked {e.role} {e.ident}; now `systemctl reload mosquitto` (SIGHUP) to refuse it")
        else:
            entry = broker.Entry(args.action.removeprefix("add-"), args.ident, args.prefix)
            _, secret = broker.add(args.dir, entry)
            print(f"{entry.role} {entry.ident}: its password is in {secret} (mode 0600). {_install_hint(entry)}, "
                  f"then delete it here.")
            for access, topic in entry.rules():
                print(f"  {access:<9} {topic}")
            print("now `systemctl reload mosquitto` (SIGHUP) to apply")
    except (broker.BrokerSetupError, MalformedMessage, ValueError, OSError) as exc:
        print(f"coinfer: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _install_hint(entry: Any) -> str:
    """Where a provisioned password goes on the machine that uses it (deploy/install.sh's file names)."""
    if entry.role == "app":
        app = entry.ident.rsplit(".", 1)[1]
        return (f"Copy it to the device as /etc/coinfer/apps/{app}.password (mode 0640, group: the Unix group the "
                f"application runs as)")
    daemon = "edged" if entry.role == "edge" else "deviced"
    return f"Copy it to the {entry.role} as /etc/coinfer/{daemon}.password (mode 0600)"


def cmd_pipeline(args: argparse.Namespace) -> int:
    from coinfer import pipeline
    from models.loaders import load_fleet

    fleet = load_fleet(args.workers)
    chain = pipeline.load_chain(Path(args.model), args.exit)
    bound = units.parse_duration(args.latency_bound) if args.latency_bound else None
    p = pipeline_planner.plan(chain, fleet, method=args.method, latency_bound_s=bound, seed=args.seed,
                              split=not args.no_split)
    print(json.dumps(p.to_json(), indent=1) if args.json else pipeline.format_plan(p))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "energy":
        from coinfer import energy

        if args.testbed:
            from coinfer import energybed, testbed

            try:
                for outages in (0.0, 30.0):
                    energybed.run(args.out, outages_per_hour=outages, log=lambda text: print(text, flush=True))
            except testbed.TestbedError as exc:
                print(f"coinfer: error: {exc}", file=sys.stderr)
                return 2
            print(f"-> {args.out / 'testbed.json'}, {args.out / 'testbed-outages.json'}")
            return 0
        energy.bench(args.out, log=lambda text: print(text, flush=True))
        print(f"-> {args.out / 'energy.json'}, {args.out / 'tradeoff.png'}, {args.out / 'queues.png'}")
        return 0
    if args.what == "pipeline":
        if not args.sim:
            from coinfer import pipebed, testbed

            try:
                pipebed.run(args.out, frames=args.frames or 100, log=lambda text: print(text, flush=True))
            except testbed.TestbedError as exc:
                print(f"coinfer: error: {exc}", file=sys.stderr)
                return 2
            print(f"-> {args.out / 'testbed.json'}, {args.out / 'testbed.png'}")
            return 0
        from coinfer import pipeline

        pipeline.bench_sim(args.out, frames=args.frames or 1000, log=lambda text: print(text, flush=True))
        print(f"-> {args.out / 'pipeline.json'}, {args.out / 'scaling.png'}")
        return 0
    if args.what == "dag":
        from coinfer import dagbench

        dagbench.run(args.out, requests=min(args.requests, 5000), log=lambda text: print(text, flush=True))
        print(f"-> {args.out / 'dag.json'}, {args.out / 'dag.png'}")
        return 0
    if args.what == "load":
        from coinfer import load

        load.run(args.out, load.LoadSettings(soak_s=args.soak, step_s=args.step),
                 log=lambda text: print(text, flush=True))
        return 0
    if args.what == "edgent":
        from coinfer import experiments, testbed

        settings = experiments.Settings(requests=args.per_point, method_requests=args.per_method,
                                        loopback=args.loopback,
                                        emulation=testbed.Emulation.with_quota(args.cpu_quota),
                                        bundle=args.bundle or experiments.BUNDLE, policy=args.policy,
                                        only=args.only or "")
        try:
            experiments.run(args.out, settings, log=lambda text: print(text, flush=True))
        except testbed.TestbedError as exc:
            print(f"coinfer: error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.what == "transport":
        doc = bench.transport_bench()
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
        for row in doc["rows"]:
            parts = "  ".join(f"{k[:-2]} {v * 1e3:.3f}" for k, v in row["parts_s"].items())
            print(f"{row['bytes']:>8} B  mqtt {row['mqtt_s'] * 1e3:7.3f} ms  tcp {row['tcp_s'] * 1e3:7.3f} ms  "
                  f"ratio {row['ratio']:5.2f}  broker floor {row['broker_floor_s'] * 1e3:7.3f} ms  ({parts} ms)")
        for e in doc["encodings"]:
            print(f"{e['bytes']:>8} B as {e['encoding']:<13} {e['wire_bytes']:>9.0f} B on the wire  "
                  f"mqtt {e['mqtt_s'] * 1e3:7.3f} ms  (encode {e['encode_s'] * 1e3:.3f}, decode "
                  f"{e['decode_s'] * 1e3:.3f})")
        print(f"-> {args.out}")
        return 0
    doc = bench.planner_bench(requests=args.requests)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    for k in ("bundle", "synthetic_500", "bundle_search", "synthetic_500_search", "bundle_mincut",
              "mincut_solve_bundle_exit5", "mincut_solve_random_dag_320"):
        extra = (f"   ({doc[k]['nodes']} nodes, {doc[k]['candidates']} candidate cuts prepared in "
                 f"{doc[k]['prepare_s']:.2f} s)" if "nodes" in doc[k] else "")
        print(f"{k:<27} p50 {doc[k]['p50_s'] * 1e6:9.1f} us   p99 {doc[k]['p99_s'] * 1e6:9.1f} us{extra}")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
