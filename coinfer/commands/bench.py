"""``coinfer bench FAMILY``: one experiment family each (``coinfer.bench.*``), numbers written to files."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from coinfer.commands import Command
from planner import policies


def _log(text: str) -> None:
    print(text, flush=True)


def _bench_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("what", choices=list(FAMILIES))
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


def cmd_bench(args: argparse.Namespace) -> int:
    """Run one family; a testbed that cannot be set up is ``TestbedError`` (``coinfer.cli``'s one error line)."""
    FAMILIES[args.what](args)
    return 0


def _energy(args: argparse.Namespace) -> None:
    if args.testbed:
        from coinfer.bench import energy_testbed

        ours = energy_testbed.run(args.out, log=_log)  # the controller at 1 frame/s, against its simulation
        theirs = energy_testbed.run(args.out, policy="edgent", log=_log)  # Edgent's policy on the same requests
        _log(f"modelled power on the same requests: lyapunov {ours['measured']['power_w']:.3f} W, edgent "
             f"{theirs['measured']['power_w']:.3f} W")
        print(f"-> {args.out / 'testbed.json'}, {args.out / 'testbed-edgent.json'}")
        return
    from coinfer.bench import energy

    energy.bench(args.out, log=_log)
    print(f"-> {args.out / 'energy.json'}, {args.out / 'tradeoff.png'}, {args.out / 'queues.png'}")


def _pipeline(args: argparse.Namespace) -> None:
    if not args.sim:
        from coinfer.bench import pipeline_testbed

        pipeline_testbed.run(args.out, frames=args.frames or 100, log=_log)
        print(f"-> {args.out / 'testbed.json'}, {args.out / 'testbed.png'}")
        return
    from coinfer.bench import pipeline

    pipeline.bench_sim(args.out, frames=args.frames or 1000, log=_log)
    print(f"-> {args.out / 'pipeline.json'}, {args.out / 'scaling.png'}")


def _dag(args: argparse.Namespace) -> None:
    from coinfer.bench import dag

    dag.run(args.out, requests=min(args.requests, 5000), log=_log)
    print(f"-> {args.out / 'dag.json'}, {args.out / 'dag.png'}")


def _load(args: argparse.Namespace) -> None:
    from coinfer.bench import load

    load.run(args.out, load.LoadSettings(soak_s=args.soak, step_s=args.step), log=_log)


def _edgent(args: argparse.Namespace) -> None:
    from coinfer.bench import edgent
    from coinfer.lab import testbed

    settings = edgent.Settings(requests=args.per_point, method_requests=args.per_method, loopback=args.loopback,
                               emulation=testbed.Emulation.with_quota(args.cpu_quota),
                               bundle=args.bundle or edgent.BUNDLE, policy=args.policy, only=args.only or "")
    edgent.run(args.out, settings, log=_log)


def _transport(args: argparse.Namespace) -> None:
    from coinfer.bench import transport

    doc = transport.transport_bench()
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


def _planner(args: argparse.Namespace) -> None:
    from coinfer.bench import planner

    doc = planner.planner_bench(requests=args.requests)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    for k in ("bundle", "synthetic_500", "bundle_search", "synthetic_500_search", "bundle_mincut",
              "mincut_solve_bundle_exit5", "mincut_solve_random_dag_320"):
        extra = (f"   ({doc[k]['nodes']} nodes, {doc[k]['candidates']} candidate cuts prepared in "
                 f"{doc[k]['prepare_s']:.2f} s)" if "nodes" in doc[k] else "")
        print(f"{k:<27} p50 {doc[k]['p50_s'] * 1e6:9.1f} us   p99 {doc[k]['p99_s'] * 1e6:9.1f} us{extra}")
    print(f"-> {args.out}")


FAMILIES: dict[str, Callable[[argparse.Namespace], None]] = {
    "planner": _planner, "transport": _transport, "edgent": _edgent, "load": _load, "dag": _dag,
    "pipeline": _pipeline, "energy": _energy,
}
COMMANDS = (Command("bench", "benchmarks that write numbers to a file", _bench_args, cmd_bench),)
