"""``coinfer bench edgent --out DIR``: the Edgent experiments, measured on the emulated testbed.

Calibration (device profiled inside its CPU quota, edge outside; both fitted), then Figs. 6-9 of the
paper, the oracle (every plan measured) and a changing-bandwidth trace. Each experiment writes JSON, a
PNG and a Markdown section; ``summary.json`` holds the headline numbers.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from coinfer.bench import edgent_report as report
from coinfer.lab.calibration import Calibration
from coinfer.lab.client import Agent, edged, run_agent
from coinfer.lab.procs import REPO
from coinfer.lab.testbed import BROKER_PORT, Emulation, Testbed, broker
from coinfer.lab.traces import TRACE, trace_bps
from models import loaders
from models.bundle import BUNDLES_DIR, load_bundle
from planner import baselines, candidates, policies
from planner.core import Conditions, ExitInfo
from planner.latency import QUOTA_STARTS, CpuQuota, LatencyModel, calibrate_stages
from planner.units import format_bandwidth

# The model: its 12.5 KB input is the size of Edgent's CIFAR-10 input, and its stages take tens of ms on
# the host, so they span many periods of the device's CPU quota (design.md).
BUNDLE = BUNDLES_DIR / "fmnist56-branchy-alexnet"
PAPER_DEADLINES_S = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
BANDWIDTHS = (50e3, 100e3, 200e3, 400e3, 500e3, 750e3, 1e6, 1.5e6, 2e6)
ORACLE_BANDWIDTHS = (100e3, 400e3, 1e6, 2e6)
# coinfer_point: coinfer planning on the point prediction, as Edgent does (deviced's margins off)
# coinfer_float32: deviced's policy with every cut tensor sent as float32 (no encoded activations)
METHODS = (*baselines.BASELINES, "coinfer_point", "coinfer_float32", "coinfer")  # coinfer: deviced as configured
DROP_AT_S, DROP_TO_BPS = 8.0, 1e6
TRACE_DEADLINE_S = 0.3  # where Fig. 9 separates the methods at 400 kbps


@dataclass(slots=True)
class Settings:
    requests: int = 20  # per point
    method_requests: int = 30  # per method and deadline (Fig. 9), the same images for each method
    oracle_repeats: int = 5
    stage_repeats: int = 20  # timings per head stage for the device model (10 drifted by about 6% between runs)
    profile_sweep: int = 8  # random synthetic chains profiled beside the bundle
    profile_runs: int = 15
    emulation: Emulation = field(default_factory=Emulation)
    loopback: bool = False
    bundle: Path = BUNDLE
    policy: str = "edgent"  # deviced's planning policy ("coinfer" in the figures); mincut for a DAG bundle
    agent_log_level: str = "warning"  # deviced's log (stderr) inside the agent
    only: str = ""  # one experiment after the calibration ("fig9"); "": all

    @property
    def cpu_quota(self) -> CpuQuota | None:
        """The device's CFS quota, which its latency model includes (loopback: none, the slowdown is in-app)."""
        e = self.emulation
        return None if self.loopback else CpuQuota(quota_s=e.cpu_quota * e.cpu_period_us / 1e6,
                                                   period_s=e.cpu_period_us / 1e6)


def run(out: Path, settings: Settings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run everything; return ``summary.json``'s content."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="coinfer-edgent-")))
        tmp.chmod(0o755)
        bed = stack.enter_context(Testbed(settings.emulation, loopback=settings.loopback))
        emulation = bed.describe()
        log(f"testbed: {emulation['mode']}; device {emulation['device_cpu']}")
        bundle = load_bundle(settings.bundle)
        log(f"model: {bundle.name} ({settings.bundle})")
        exits = bundle.exits  # the bundle agent and edged serve
        calib = _calibrate(bed, settings, tmp, out, log)
        stack.enter_context(broker(tmp, bed.edge_host, bed.edge_argv))
        stack.enter_context(edged(bed, tmp, calib.edge_model_path, settings.bundle))
        with _agent(bed, tmp, calib.naive_device_model_path, settings) as agent:
            calib = _calibrate_stages(agent, exits, calib, settings, tmp, out, log)
        assert calib.device_model_path is not None
        agent = stack.enter_context(_agent(bed, tmp, calib.device_model_path, settings))
        exp = Experiments(bed, agent, exits, calib, settings, out, log)
        results = exp.run_all() if not settings.only else {
            "fig9": exp.methods(list(PAPER_DEADLINES_S), 400e3)}
    try:
        bundle_arg = settings.bundle.resolve().relative_to(REPO)
    except ValueError:
        bundle_arg = settings.bundle
    regenerate = (f"sudo .venv/bin/coinfer bench edgent --bundle {bundle_arg} --policy {settings.policy} "
                  f"--cpu-quota {settings.emulation.cpu_quota:g}{' --only ' + settings.only if settings.only else ''}"
                  f"{' --loopback' if settings.loopback else ''} --out DIR")
    summary = {"regenerate": regenerate, "emulation": emulation, "model": bundle.name, "policy": settings.policy,
               "exits": len(bundle.exits),
               "input_bytes": bundle.exits[0].input_bytes,
               "settings": {"requests_per_point": settings.requests, "method_requests": settings.method_requests,
                            "oracle_repeats": settings.oracle_repeats, "stage_repeats": settings.stage_repeats},
               "wall_s": round(time.monotonic() - started, 1), **results}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if not settings.only:
        report.write_markdown(out, summary, calib, METHODS)
    log(f"done in {summary['wall_s']:.0f} s -> {out}")
    return summary


# ---- calibration -----------------------------------------------------------------------------------

def _calibrate(bed: Testbed, s: Settings, tmp: Path, out: Path, log: Callable[[str], None]) -> Calibration:
    """Profile the edge (host) and the device (inside its quota), fit both, compare per layer and per model."""
    cli = [sys.executable, "-m", "coinfer.cli"]
    prof = [str(s.bundle), "--sweep", str(s.profile_sweep), "--runs", str(s.profile_runs), "--warmup", "5"]
    paths = {side: tmp / f"{side}-profile.json" for side in ("edge", "device")}
    log("calibration: profiling the edge server (this host, unconstrained) ...")
    _check_run([*cli, "profile", "--out", str(paths["edge"]), *prof])
    if bed.loopback:  # the device is this host slowed down inside deviced: scale the edge's profile
        doc = json.loads(paths["edge"].read_text())
        paths["device"].write_text(json.dumps(_scaled_profile(doc, 1.0 / s.emulation.cpu_quota)))
    else:
        log("calibration: profiling the device inside its CPU quota ...")
        _check_run(bed.device_argv([*cli, "profile", "--out", str(paths["device"]), *prof]))
    profiles: dict[str, dict[str, Any]] = {}
    models: dict[str, tuple[LatencyModel, Path]] = {}
    for side in ("edge", "device"):
        model_path = tmp / f"{side}-profile-model.json"
        fit_text = _check_run([*cli, "fit", str(paths[side]), "--out", str(model_path), "--name", f"testbed-{side}"])
        model = loaders.load_latency_model(model_path)
        layer_err, whole = _profile_errors(json.loads(paths[side].read_text()), model)
        profiles[side] = {"fit": fit_text, "layer_error": layer_err, "bundle_run": whole}
        models[side] = model, model_path
        log(f"  {side} per-layer fit: |pred-meas|/meas median {layer_err['p50']:.0%}, p95 {layer_err['p95']:.0%}; "
            f"whole bundle predicted {whole['predicted_s'] * 1e3:.1f} ms, measured {whole['measured_s'] * 1e3:.1f} ms")
    shutil.copy(models["edge"][1], out / "edge-latency-model.json")
    return Calibration(profiles=profiles, edge_model=models["edge"][0], edge_model_path=models["edge"][1],
                       naive_device_model_path=models["device"][1])


def _calibrate_stages(agent: Agent, exits: Sequence[ExitInfo], calib: Calibration, s: Settings,
                      tmp: Path, out: Path, log: Callable[[str], None]) -> Calibration:
    """Time whole head stages on the device and scale the host's per-layer model to match them.

    Under a CPU quota the per-layer profile does not add up: a layer shorter than the quota runs at full
    speed, and the throttling falls between layers and in the Python around them. So the device model is
    the host's per-layer model times a measured CPU slowdown plus a per-stage overhead, with the quota's
    throttling applied to each whole stage (``planner.latency.CpuQuota``).
    """
    log("calibration: timing whole head stages on the device ...")
    stages = agent.ask(op="stages", repeats=s.stage_repeats)["stages"]
    host = candidates.compile_candidates(exits, calib.edge_model, calib.edge_model)
    predicted = [float(host.device_s[host.index(r["exit"], r["cut"])]) for r in stages]
    measured = np.array([r["median_s"] for r in stages])

    def fit(q: CpuQuota | None) -> dict[str, Any]:
        slowdown, overhead = calibrate_stages(predicted, measured.tolist(), cpu_quota=q)
        busy = slowdown * np.array(predicted) + overhead
        fitted = q.wall_s(busy) if q else busy
        return {"cpu_quota": q, "slowdown": slowdown, "stage_overhead_s": overhead, "fitted": fitted,
                "mean_sq_rel_error": float(np.mean(np.square(fitted / measured - 1)))}

    # under a quota, both ways a stage may start (at a refill: busy; anywhere: idle) are fitted; the closer wins
    device_quota = s.cpu_quota
    fits = [fit(replace(device_quota, start=start)) for start in QUOTA_STARTS] if device_quota else [fit(None)]
    best = min(fits, key=lambda f: f["mean_sq_rel_error"])
    slowdown, overhead, quota, fitted = best["slowdown"], best["stage_overhead_s"], best["cpu_quota"], best["fitted"]
    model = calib.edge_model.scaled(slowdown, overhead, name="testbed-device", cpu_quota=quota, meta={
        "calibration": "host per-layer model x slowdown + per-stage overhead, under the device's CPU quota, "
                       "fitted to whole head stages timed on the device", "slowdown": slowdown,
        "stage_overhead_s": overhead})
    path = tmp / "device-model.json"
    path.write_text(json.dumps(model.to_json(), indent=1) + "\n")
    shutil.copy(path, out / "device-latency-model.json")
    errors = np.abs(fitted / measured - 1)
    device_stages = {"slowdown": slowdown, "stage_overhead_s": overhead,
                     "cpu_quota": quota.to_json() if quota else None,
                     "error_p50": float(np.median(errors)), "error_p95": float(np.percentile(errors, 95)),
                     "fits": [{**{k: v for k, v in f.items() if k != "fitted"},
                               "cpu_quota": f["cpu_quota"].to_json() if f["cpu_quota"] else None} for f in fits],
                     "stages": [{**r, "host_predicted_s": p, "calibrated_s": float(f)}
                                for r, p, f in zip(stages, predicted, fitted, strict=True)]}
    calib = replace(calib, device_model=model, device_model_path=path, device_stages=device_stages)
    (out / "calibration.json").write_text(json.dumps(calib.to_json(), indent=1) + "\n")
    log(f"  device: CPU {slowdown:.2f}x the host + {overhead * 1e3:.1f} ms per stage, under the quota "
        f"({quota.start if quota else 'none'} start); "
        f"whole-stage error after "
        f"calibration median {np.median(errors):.0%}, p95 {np.percentile(errors, 95):.0%} ({len(stages)} stages)")
    return calib


def _profile_errors(doc: dict[str, Any], model: LatencyModel) -> tuple[dict[str, float], dict[str, float]]:
    bundle = doc["models"][0]  # the bundle is profiled first
    errors = [abs(model.predict(lay["type"], lay) - lay["latency_s"]) / lay["latency_s"]
              for lay in bundle["layers"] if lay["latency_s"] > 0]
    predicted = sum(model.predict(lay["type"], lay) for lay in bundle["layers"]) + model.stage_overhead_s
    return ({"p50": float(np.median(errors)), "p95": float(np.percentile(errors, 95)), "layers": len(errors)},
            {"predicted_s": predicted, "measured_s": float(bundle["run_s"])})


def _scaled_profile(doc: dict[str, Any], factor: float) -> dict[str, Any]:
    models = [{**m, "run_s": m["run_s"] * factor, "load_s": m["load_s"] * factor,
               "layers": [{**lay, "latency_s": lay["latency_s"] * factor} for lay in m["layers"]]}
              for m in doc["models"]]
    return {**doc, "models": models}


def _check_run(argv: Sequence[str]) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv[:6])} ...` failed:\n{done.stderr[-2000:]}")
    return done.stdout


# ---- processes -------------------------------------------------------------------------------------

@contextmanager
def _agent(bed: Testbed, tmp: Path, model: Path, s: Settings) -> Iterator[Agent]:
    argv = [sys.executable, "-m", "coinfer.lab.agent", "--broker-host", bed.edge_host, "--broker-port",
            str(BROKER_PORT), "--device-model", str(model), "--bundle", str(s.bundle.resolve()),
            "--policy", s.policy, "--log-level", s.agent_log_level]
    if bed.loopback:
        argv += ["--emulate-uplink", f"{int(bed.uplink_bps)}bps", "--emulate-slowdown",
                 str(1.0 / s.emulation.cpu_quota)]
    with run_agent(bed, argv) as agent:
        yield agent


# ---- the experiments -------------------------------------------------------------------------------

class Experiments:
    def __init__(self, bed: Testbed, agent: Agent, exits: Sequence[ExitInfo], calib: Calibration,
                 s: Settings, out: Path, log: Callable[[str], None]) -> None:
        self.bed, self.agent, self.s, self.out, self.log = bed, agent, s, out, log
        self.exits = exits
        # the plans deviced chooses from: its policy's candidates (the min-cut's prepared cuts for a DAG)
        self.cands = policies.make(s.policy).compile(self.exits, calib.device, calib.edge_model).candidates
        self.image = 0
        self.sections: list[str] = []

    def run_all(self) -> dict[str, Any]:
        self.set_uplink(1e6)
        full = self.runs("fixed", 1.0, count=self.s.requests, exit=len(self.exits), cut=len(self.exits[-1].layers))
        device_full = statistics.median(r["latency_s"] for r in full)
        self.log(f"device-only exit {len(self.exits)} measured {device_full * 1e3:.1f} ms; deadlines are the "
                 f"paper's own (100 ms to 1 s): the input upload weighs as in the paper")
        deadline = 1.0
        deadlines = list(PAPER_DEADLINES_S)
        fig67 = self.bandwidth_sweep(deadline)
        fig8 = self.deadline_sweep(deadlines, 500e3)
        fig9 = self.methods(deadlines, 400e3)
        oracle = self.oracle(deadline)
        trace = self.trace(TRACE_DEADLINE_S)
        # coinfer's requests of Figs. 6-8 that ran as planned, one group per point
        groups = [[r for r in p["records"] if r["predicted_s"] is not None and not r["fallback"]]
                  for p in [*fig67["points"], *fig8["points"]]]
        wheres = sorted({r["where"] for g in groups for r in g})
        kinds = sorted({_kind(r) for g in groups for r in g})
        return {"device_full_s": device_full, "fig6_deadline_s": deadline,
                "prediction_error": {**_errors(groups), "by_where": {
                    w: _errors([[r for r in g if r["where"] == w] for g in groups]) for w in wheres},
                    "by_plan": {k: _errors([[r for r in g if _kind(r) == k] for g in groups]) for k in kinds}},
                "oracle_ratio": {format_bandwidth(b): v["ratio"] for b, v in oracle.items()},
                "fig9": fig9, "trace": trace}

    # helpers
    def set_uplink(self, bps: float) -> None:
        self.bed.set_uplink(bps)
        if self.bed.loopback:
            self.agent.ask(op="uplink", bps=bps)

    def runs(self, method: str, deadline: float, *, count: int, first: int | None = None,
             **extra: Any) -> list[dict[str, Any]]:
        """``count`` requests on the next unused test images (or on those from ``first``)."""
        records: list[dict[str, Any]] = self.agent.ask(
            op="run", method=method, deadline_s=deadline, first=self.image if first is None else first,
            count=count, **extra)["records"]
        if first is None:
            self.image += count
        return records

    def settle(self, bps: float) -> dict[str, Any]:
        """Set the link and let the device measure it (probes), as a running deviced would have."""
        self.set_uplink(bps)
        return self.agent.ask(op="probe", repeats=3)

    def bandwidth_sweep(self, deadline: float) -> dict[str, Any]:
        self.log(f"Figs. 6/7: plan and latency vs bandwidth at a {deadline * 1e3:.1f} ms deadline ...")
        points = []
        for bps in BANDWIDTHS:
            probe = self.settle(bps)
            records = self.runs("coinfer", deadline, count=self.s.requests)
            points.append({"bps": bps, "probe": probe, "records": records, **_stats(records)})
            self.log(f"  {format_bandwidth(bps):>8}: {points[-1]['plan']:<10} predicted "
                     f"{points[-1]['predicted_ms']:6.1f} ms, measured p50 {points[-1]['p50_ms']:6.1f} ms, "
                     f"met {points[-1]['met']:.0%}")
        doc = {"deadline_s": deadline, "points": points}
        (self.out / "fig6_7_bandwidth.json").write_text(json.dumps(doc, indent=1) + "\n")
        report.plot_sweep(self.out / "fig6_bandwidth_plan.png", [p["bps"] / 1e3 for p in points], points,
                    "uplink (kbps)", f"Plan vs bandwidth, deadline {deadline * 1e3:.1f} ms", self.bed.describe())
        report.plot_latency(self.out / "fig7_latency.png", points, deadline, self.bed.describe())
        return doc

    def deadline_sweep(self, deadlines: Sequence[float], bps: float) -> dict[str, Any]:
        self.log(f"Fig. 8: plan vs deadline at {format_bandwidth(bps)} ...")
        self.settle(bps)
        points = []
        for d in deadlines:
            records = self.runs("coinfer", d, count=self.s.requests)
            points.append({"deadline_s": d, "records": records, **_stats(records)})
            self.log(f"  {d * 1e3:6.1f} ms: {points[-1]['plan']:<10} met {points[-1]['met']:.0%}")
        doc = {"bps": bps, "points": points}
        (self.out / "fig8_deadline.json").write_text(json.dumps(doc, indent=1) + "\n")
        report.plot_sweep(self.out / "fig8_deadline_plan.png", [p["deadline_s"] * 1e3 for p in points], points,
                    "deadline (ms)", f"Plan vs deadline at {format_bandwidth(bps)}", self.bed.describe())
        return doc

    def methods(self, deadlines: Sequence[float], bps: float) -> dict[str, Any]:
        self.log(f"Fig. 9: accuracy vs deadline at {format_bandwidth(bps)}, {len(METHODS)} methods ...")
        self.settle(bps)
        table: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
        accuracy = {ex.index: ex.accuracy for ex in self.exits}
        n = self.s.method_requests
        for d in deadlines:
            for m in METHODS:  # the same images for every method: accuracies differ by method alone
                records = self.runs(m, d, count=n, first=self.image)
                hit = float(np.mean([r["met"] for r in records]))
                acc = float(np.mean([r["met"] and r["correct"] for r in records]))
                # the test-set accuracy of the exit that answered, 0 for a miss: the accuracy the plans reach
                # without the sampling noise of this point's few images
                expected = float(np.mean([r["met"] * accuracy[r["exit"]] for r in records]))
                table[m].append({"deadline_s": d, "hit_rate": hit, "accuracy": acc, "expected_accuracy": expected,
                                 "p50_ms": float(np.median([r["latency_s"] for r in records]) * 1e3),
                                 "plans": dict(Counter(f"e{r['plan_exit']}@{r['plan_cut']}/{r['encoding']}"
                                                       for r in records)),
                                 "fallbacks": sum(r["fallback"] is not None for r in records)})
            self.image += n
            self.log("  " + f"{d * 1e3:6.1f} ms: " + "  ".join(
                f"{m} {table[m][-1]['accuracy']:.2f}" for m in METHODS))
        doc = {"bps": bps, "table": table}
        (self.out / "fig9_methods.json").write_text(json.dumps(doc, indent=1) + "\n")
        report.plot_methods(self.out / "fig9_accuracy.png", table, bps, self.bed.describe())
        return doc

    def oracle(self, deadline: float) -> dict[float, dict[str, Any]]:
        self.log(f"Oracle: every plan measured, at a {deadline * 1e3:.1f} ms deadline ...")
        result = {}
        c = self.cands
        for bps in ORACLE_BANDWIDTHS:
            self.settle(bps)
            exit_chosen = Counter(r["exit"] for r in self.runs("coinfer", deadline, count=self.s.oracle_repeats)
                                  ).most_common(1)[0][0]
            order = np.argsort(candidates.latencies(c, Conditions(bandwidth_bps=bps, deadline_s=1.0))[0])
            best, measured, pruned = float("inf"), [], 0
            for i in order:
                if c.exit[i] != exit_chosen:
                    continue
                if c.up_bytes[i] * 8 / bps > best:  # its upload alone exceeds the best measured: cannot win
                    pruned += 1
                    continue
                plan = {"exit": int(c.exit[i]), "cut": sorted(c.tensors[i]), "encoding": c.encoding[i]}
                rec = self.runs("fixed", deadline, count=self.s.oracle_repeats, **plan)  # a DAG's cut: its tensors
                m = statistics.median(r["latency_s"] for r in rec)
                measured.append({**plan, "index": int(c.cut[i]), "median_s": m})
                best = min(best, m)
            # coinfer against the best plan measured again, request by request in turns: the device's speed drifts
            # by about 10% over minutes, and measured minutes apart the same plan read 340 and 380 ms
            top = min(measured, key=lambda r: r["median_s"])
            ours, again = [], []
            for _ in range(self.s.oracle_repeats * 2):
                ours += self.runs("coinfer", deadline, count=1)
                again += self.runs("fixed", deadline, count=1, exit=top["exit"], cut=top["cut"],
                                   encoding=top["encoding"])
            ours_s, oracle_s = (statistics.median(r["latency_s"] for r in rs) for rs in (ours, again))
            result[bps] = {"exit": exit_chosen, "coinfer_s": ours_s, "oracle_s": oracle_s, "ratio": ours_s / oracle_s,
                           "oracle_plan": f"{top['exit']}/{top['index']}/{top['encoding']}", "oracle_search_s": best,
                           "measured": measured, "pruned": pruned,
                           "coinfer_plans": dict(Counter(f"{r['plan_exit']}/{r['plan_cut']}" for r in ours))}
            self.log(f"  {format_bandwidth(bps):>8}: exit {exit_chosen}: best of {len(measured)} measured "
                     f"({pruned} pruned) e{top['exit']}@{top['index']}/{top['encoding']}; in turns with it, coinfer "
                     f"{ours_s * 1e3:.1f} ms vs {oracle_s * 1e3:.1f} ms, ratio {ours_s / oracle_s:.2f}")
        doc = {format_bandwidth(b): v for b, v in result.items()}
        (self.out / "oracle.json").write_text(json.dumps({"deadline_s": deadline, "points": doc}, indent=1) + "\n")
        report.plot_oracle(self.out / "oracle.png", result, self.bed.describe())
        return result

    def trace(self, deadline: float) -> dict[str, Any]:
        self.log(f"Trace: bandwidth steps and a ramp over {TRACE[-1][0]:.0f} s, deadline {deadline * 1e3:.1f} ms ...")
        doc: dict[str, Any] = {"deadline_s": deadline, "trace": TRACE}
        for mode in ("coinfer", "fixed"):
            self.settle(TRACE[0][1])
            stop = threading.Event()
            player = threading.Thread(target=self._play, args=(stop,), daemon=True)
            player.start()
            try:
                records = self.agent.ask(op="stream", mode=mode, deadline_s=deadline, duration_s=TRACE[-1][0],
                                         probe_every_s=2.0, emulate_trace=self.bed.loopback)["records"]
            finally:
                stop.set()
                player.join()
            doc[mode] = {"records": records, "hit_rate": float(np.mean([r["met"] for r in records])),
                         "accuracy": float(np.mean([r["met"] and r["correct"] for r in records])),
                         "requests": len(records)}
            self.log(f"  {mode:>8}: {len(records)} requests, deadline hit {doc[mode]['hit_rate']:.1%}, "
                     f"accuracy {doc[mode]['accuracy']:.3f}")
        doc["notice_drop"] = _notice(doc["coinfer"]["records"], at=DROP_AT_S, new_bps=DROP_TO_BPS)
        self.log(f"  the drop to {format_bandwidth(DROP_TO_BPS)} at {DROP_AT_S:g} s noticed (estimate within 2x): "
                 f"{doc['notice_drop']}")
        (self.out / "trace.json").write_text(json.dumps(doc, indent=1) + "\n")
        report.plot_trace(self.out / "trace.png", doc, self.bed.describe())
        without_records = {mode: {k: v for k, v in doc[mode].items() if k != "records"}
                           for mode in ("coinfer", "fixed")}
        return {"deadline_s": deadline, "drop": {"at_s": DROP_AT_S, "from_bps": trace_bps(DROP_AT_S - 1e-6),
                                                 "to_bps": DROP_TO_BPS},
                **without_records, "notice_drop": doc["notice_drop"]}

    def _play(self, stop: threading.Event) -> None:
        """Play the trace on the real link (loopback: the agent plays it in-app)."""
        start = time.monotonic()
        while not self.bed.loopback and not stop.is_set():
            self.bed.set_uplink(trace_bps(time.monotonic() - start))
            stop.wait(0.5)


def _notice(records: list[dict[str, Any]], *, at: float, new_bps: float) -> dict[str, Any]:
    """Time and requests after the drop at ``at`` until the estimate is within 2x of ``new_bps``."""
    before = [r["bandwidth_est_bps"] for r in records if r["t"] < at]
    found: dict[str, Any] = {"seconds": None, "requests": None,
                             "estimate_before_bps": before[-1] if before else None}
    for n, r in enumerate((r for r in records if r["t"] >= at), 1):
        if new_bps / 2 <= r["bandwidth_est_bps"] <= 2 * new_bps:
            return {**found, "seconds": round(r["t"] - at, 3), "requests": n}
    return found


def _errors(groups: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """|predicted - measured| / measured of end-to-end latencies: median, p95, share within 10%.

    Also what no model could beat (``within_10pct_best_possible``: per point and plan, the share of requests
    that the best single prediction gets within 10%, i.e. the run-to-run spread of the measurement itself),
    and the median signed error (measured - predicted) of each part, in ms.
    """
    records = [r for g in groups for r in g]
    err = np.array([abs(r["predicted_s"] - r["latency_s"]) / r["latency_s"] for r in records])
    if not err.size:
        return {"requests": 0}
    same_plan = [[r["latency_s"] for r in g if (r["plan_exit"], r["plan_cut"]) == plan]
                 for g in groups for plan in {(r["plan_exit"], r["plan_cut"]) for r in g}]
    remote = [r for r in records if r["edge_s"] is not None]
    parts = {"device": [r["stage_s"] - r["predicted_device_s"] for r in records if r["predicted_device_s"]],
             "edge": [r["edge_s"] - r["predicted_edge_s"] for r in remote],
             "link": [r["latency_s"] - r["stage_s"] - r["edge_s"]
                      - (r["predicted_s"] - r["predicted_device_s"] - r["predicted_edge_s"]) for r in remote]}
    return {"p50": float(np.median(err)), "p95": float(np.percentile(err, 95)),
            "within_10pct": float(np.mean(err <= 0.10)), "requests": int(err.size),
            "within_10pct_best_possible": sum(_best_share(g) for g in same_plan) / err.size,
            "bias_ms": {k: float(np.median(v) * 1e3) for k, v in parts.items() if v}}


def _kind(record: dict[str, Any]) -> str:
    """A request's plan type: where it ran, and how its tensors crossed (device plans send none)."""
    return record["where"] if record["where"] == "device" else f"{record['where']}/{record.get('encoding', 'float32')}"


def _best_share(latencies: Sequence[float]) -> int:
    """How many of ``latencies`` one prediction can get within 10% of (the most that overlap)."""
    return max((sum(0.9 * m <= p <= 1.1 * m for m in latencies) for p in (0.9 * x for x in latencies)), default=0)


def _stats(records: list[dict[str, Any]]) -> dict[str, Any]:
    plans = Counter(f"e{r['plan_exit']}@{r['plan_cut']}" for r in records)
    lat = [r["latency_s"] * 1e3 for r in records]
    return {"plan": plans.most_common(1)[0][0], "plans": dict(plans),
            "exit": Counter(r["plan_exit"] for r in records).most_common(1)[0][0],
            "cut": Counter(r["plan_cut"] for r in records).most_common(1)[0][0],
            "predicted_ms": float(np.median([(r["predicted_s"] or 0) * 1e3 for r in records])),
            "p50_ms": float(np.median(lat)), "p95_ms": float(np.percentile(lat, 95)),
            "met": float(np.mean([r["met"] for r in records])),
            "accuracy": float(np.mean([r["correct"] for r in records]))}
