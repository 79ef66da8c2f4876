"""Model tools: ``layers``, ``split``, ``bundle``, ``encodings``, ``train``, ``profile``, ``fit``, ``corpus``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx

from coinfer.commands import Command
from models import branchy, graph
from models.bundle import BUNDLES_DIR, DEFAULT_BUNDLE, MANIFEST, describe, exit_accuracies, load_bundle, package
from models.data import read_inputs
from planner.errors import PlannerError
from planner.latency import FIT_VARIABLES, TABLE_I_VARIABLES, fit

RESNETS = ("fmnist-branchy-resnet", "fmnist56-branchy-resnet")  # models.resnet.ARCHS, named here: torch only to train



def _layers_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("model", help="ONNX file or bundle directory")
    s.add_argument("--output", help="restrict to the sub-model computing this output (e.g. exit3)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _split_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("model", help="ONNX file or bundle directory")
    s.add_argument("--at", required=True,
                   help="cut name from `coinfer layers` (tensors joined by '+' for a multi-tensor cut)")
    s.add_argument("--head", required=True, type=Path)
    s.add_argument("--tail", required=True, type=Path)
    s.add_argument("--output", help="restrict to the sub-model computing this output first")


def _bundle_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("model", type=Path, help="an ONNX file with one input")
    s.add_argument("--out", required=True, type=Path, help="the bundle directory to write")
    s.add_argument("--name", help="the bundle's name (default: the file's stem)")
    s.add_argument("--exits", help="comma-separated outputs to serve as exits, least accurate first "
                                   "(default: every graph output)")
    s.add_argument("--labels", type=Path, help="an .npz with `x` (inputs, N x the model's input shape without its "
                                               "batch) and `y` (class indices): each exit's accuracy is measured on "
                                               "it; without: marked unmeasured (0)")


def _encodings_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("bundle", type=Path)
    s.add_argument("--labels", type=Path, help="an .npz with `x` and `y` as for `bundle` (default: the Fashion-MNIST "
                                               "test set through the bundle's preprocessing)")
    s.add_argument("--images", type=int, help="measure on the first N inputs only (default: all)")
    s.add_argument("--json", action="store_true", help="print the measurements as JSON")


def _train_args(s: argparse.ArgumentParser) -> None:
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


def _profile_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("models", nargs="*", type=Path, help="bundles or ONNX files (default: the shipped bundle)")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--sweep", type=int, default=0, metavar="N", help="also profile N random synthetic chains")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--runs", type=int, default=50)
    s.add_argument("--warmup", type=int, default=10)
    s.add_argument("--seed", type=int, default=0)


def _fit_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("profiles", nargs="+", type=Path)
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--name", default=None)
    s.add_argument("--table-i", action="store_true", help="use only Edgent's Table I variables (no FLOPs term)")


def _model_arg(path: Path, output: str | None) -> tuple[onnx.ModelProto, str]:
    """The model, or the sub-model computing ``output``; with several outputs and none named, the last (the deepest
    exit: its cuts are what a plan of it can use). Returns it and a note saying which."""
    model = load_bundle(path).model if (path / MANIFEST).exists() else graph.load_model(path)
    outputs = [o.name for o in model.graph.output]
    if output is None and len(outputs) > 1:
        output = outputs[-1]
        note = f" of the sub-model computing {output!r} (--output for another of {', '.join(outputs)})"
    else:
        note = f" of the sub-model computing {output!r}" if output else ""
    return (graph.prepare(graph.extract_outputs(model, [output])) if output else model), note


def cmd_layers(args: argparse.Namespace) -> int:
    model, note = _model_arg(Path(args.model), args.output)
    layers, cuts = graph.layers(model), graph.cuts(model)
    if args.json:
        print(json.dumps({"model": str(args.model), "layers": [lay.to_json() for lay in layers],
                          "cuts": [c.to_json() for c in cuts]}, indent=1))
        return 0
    cut_after = {c.index: c for c in cuts}
    width = max((len(lay.name) for lay in layers), default=5)  # long exported names keep the columns
    ops = max((len(lay.op_type) for lay in layers), default=2)
    print(f"{'#':>3}  {'layer':<{width}} {'op':<{ops}} {'type':<8} {'out bytes':>10} {'MFLOPs':>8}  cut after")
    for lay in layers:
        cut = cut_after.get(lay.index + 1)
        print(f"{lay.index:>3}  {lay.name:<{width}} {lay.op_type:<{ops}} {lay.kind:<8} "
              f"{lay.features['output_bytes']:>10.0f} {lay.features['flops'] / 1e6:>8.2f}  {cut.name if cut else ''}")
    print(f"{len(layers)} layers, {len(cuts)} single-tensor cuts{note}")
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    model, _ = _model_arg(Path(args.model), args.output)
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
        x, y = read_inputs(args.labels, tuple(describe(model)["input"]["shape"]), labels=True)
        assert y is not None
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


def cmd_encodings(args: argparse.Namespace) -> int:
    from models import encodings

    x = y = None
    if args.labels:
        x, y = read_inputs(args.labels, load_bundle(args.bundle).input_shape, labels=True)
    summary = encodings.measure(args.bundle, x=x, y=y, images=args.images, progress=True)  # long: shown on stderr
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print(f"{summary['bundle']}: {summary['crossing_sets']} crossing tensor sets measured on {summary['inputs']} "
          "inputs; per exit, over its input and cuts: accuracy change (points) and bytes against float32")
    for e in summary["exits"]:
        cuts = [e["input"], *e["cuts"].values()]
        row = []
        for name in encodings.MEASURED:
            delta = [100 * (c[name]["accuracy"] - c["float32+zstd"]["accuracy"]) for c in cuts]
            # float16 is float32 cast to half the bytes, exactly: twice it is what crosses as float32
            share = [c[name]["bytes"] / max(2 * c["float16"]["bytes"], 1.0) for c in cuts]
            row.append(f"{name} {min(delta):+.2f}..{max(delta):+.2f} pts, {min(share):.0%}..{max(share):.0%} bytes")
        accuracy = f"{e['accuracy']:.4f}" if e["accuracy"] else "unmeasured"
        print(f"  exit {e['exit']} (float32 accuracy {accuracy}):\n    " + "\n    ".join(row))
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


def cmd_fit(args: argparse.Namespace) -> int:
    from models import profile

    docs = []
    for path in args.profiles:
        try:
            docs.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise PlannerError(f"cannot read profile {path}: {exc}") from exc
    samples, overhead = profile.samples_from_profiles(docs)
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
              f"{', '.join(tm.variables) or 'none (a constant)'}"
              + (f"  (only {len(tm.variables)} of {tm.fit['reduced_from']}: too few samples of this type; "
                 f"profile more with --sweep)" if tm.fit.get("reduced_from") else ""))
    errors = [abs(sum(model.predict(lay["type"], lay) for lay in m["layers"]) - m["run_s"]) / m["run_s"]
              for doc in docs for m in doc["models"]]
    print(f"whole models ({len(errors)}): predicted vs measured run, median error {np.median(errors):.1%}, "
          f"p95 {np.percentile(errors, 95):.1%}")
    print(f"stage overhead {overhead * 1e6:.1f} us; latency model -> {args.out}")
    return 0


def _corpus_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("names", nargs="*", help="corpus models to build (default: all)")
    s.add_argument("--cache", type=Path, default=None, help="where the ONNX files go (default ~/.cache/coinfer/corpus)")


def cmd_corpus(args: argparse.Namespace) -> int:
    from models import corpus

    cache = args.cache or corpus.CACHE_DIR
    names = args.names or corpus.NAMES
    for i, name in enumerate(names):
        print(f"[{i + 1}/{len(names)}] {name}", file=sys.stderr, flush=True)
        path = corpus.build(name, cache)
        model = graph.load_model(path)
        raw_nodes = len(onnx.load(str(path), load_external_data=False).graph.node)
        print(f"{name:<16} {corpus.BY_NAME[name].style:<13} {raw_nodes:>4} nodes, {len(model.graph.node):>4} as "
              f"onnxruntime runs it, {len(graph.cuts(model)):>3} single-tensor cuts  {path}")
    return 0


COMMANDS = (
    Command("layers", "list a model's layers and valid cut points", _layers_args, cmd_layers),
    Command("split", "split a model at a cut into head and tail ONNX files", _split_args, cmd_split),
    Command("bundle", "package any ONNX classifier as a bundle that edged and deviced serve", _bundle_args,
            cmd_bundle),
    Command("encodings", "measure the accuracy and bytes of every (exit, cut, encoding) of a bundle into its manifest "
                         "(what the planner may choose)", _encodings_args, cmd_encodings),
    Command("train", "train a branchy network on Fashion-MNIST and write its bundle (needs torch)", _train_args,
            cmd_train),
    Command("profile", "measure per-layer latency on this host", _profile_args, cmd_profile),
    Command("fit", "fit per-layer-type latency models from profiles", _fit_args, cmd_fit),
    Command("corpus", "export the standard ImageNet topologies (ResNet-50, DenseNet-121, ...; random weights) to "
                      "ONNX, once (needs torch)", _corpus_args, cmd_corpus),
)
