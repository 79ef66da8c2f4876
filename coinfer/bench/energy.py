"""``coinfer bench energy``: the trace-driven slot simulation of the Lyapunov controller and its comparisons.

Traces and arrivals: ``coinfer.lab.traces``. The simulation runs the controller's own fluid queue
model (``planner.lyapunov``) slot by slot with the actual arrivals, tracking frames first in, first out so that
every frame has a latency.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from coinfer.lab.traces import Trace, arrivals, hsdpa, steady, wifi
from planner import lyapunov
from planner.energy import EnergyProfile
from planner.lyapunov import Actions, Queues, Settings

# a slot's controller in the simulation: (queues, bandwidth, arrivals) -> (action, setting, rate fraction)
SlotRule = Callable[[Queues, float, float], tuple[int, float, float]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Run:
    """A policy over a trace: power, throughput, latency and the queues' maxima (and their series)."""

    policy: str
    power_w: float  # average, idle included
    compute_w: float  # average above idle
    radio_w: float
    throughput: float  # frames/s completed
    latency_mean_s: float
    latency_p95_s: float
    deadline_hit: float  # share of the arrived frames done within the deadline (unfinished ones miss)
    max_frames: float
    max_bits: float
    max_latency_queue: float
    max_throughput_queue: float
    unfinished: float
    series: dict[str, list[float]]

    def summary(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__ if k != "series"}


def simulate(policy: SlotRule, name: str, s: Settings, profile: EnergyProfile, acts: Actions, trace: Trace,
             arrived: npt.NDArray[np.float64], *, deadline_s: float, every: int = 0) -> Run:
    """Run ``policy`` slot by slot over ``trace`` with ``arrived`` frames per slot (``every``: keep every n-th
    slot's queues in ``series``)."""
    q = Queues()
    dev: deque[list[float]] = deque()  # [arrived at, frames]
    tx: deque[list[float]] = deque()  # [arrived at, bits left, bits per frame, edge seconds]
    lat: list[tuple[float, float]] = []  # (latency, frames)
    maxima = [0.0, 0.0, 0.0, 0.0]  # frames, bits, latency queue, throughput queue (all non-negative)
    compute_j = radio_j = 0.0
    prev = 0.0
    series: dict[str, list[float]] = {"t": [], "frames": [], "bits": [], "latency_queue": [], "bandwidth": []}
    for t, a in enumerate(arrived):
        now = t * s.slot_s
        bw = trace.at(now)
        action, setting, rate = policy(q, bw, prev)
        ch = lyapunov.apply(s, profile, acts, q, action, setting, rate, bw, float(a))
        end = now + s.slot_s
        held = action == acts.hold  # nothing computed or sent this slot
        served, bits = ch.served, 0.0 if held else float(acts.bits[action])
        while served > 1e-9 and dev:  # heads computed this slot join the uplink's queue (or finish: device-only)
            chunk = dev[0]
            part = min(served, chunk[1])
            if bits > 0:
                tx.append([chunk[0], part * bits, bits, float(acts.edge_s[action])])  # never held: it served
            else:
                lat.append((end - chunk[0], part))
            chunk[1] -= part
            served -= part
            if chunk[1] <= 1e-9:
                dev.popleft()
        sent = ch.sent_bits
        while sent > 1e-9 and tx:  # the uplink sends in order
            chunk = tx[0]
            part = min(sent, chunk[1])
            lat.append((end - chunk[0] + chunk[3], part / chunk[2]))
            chunk[1] -= part
            sent -= part
            if chunk[1] <= 1e-9:
                tx.popleft()
        if a > 0:
            dev.append([now + s.slot_s / 2, float(a)])
        compute_j += ch.compute_j
        radio_j += ch.radio_j
        q, prev = ch.next, float(a)
        if every and t % every == 0:
            for k, v in (("t", now), ("frames", q.frames), ("bits", q.bits), ("latency_queue", q.latency),
                         ("bandwidth", bw)):
                series[k].append(round(float(v), 4))
        maxima = [max(m, v) for m, v in zip(maxima, (q.frames, q.bits, q.latency, q.throughput), strict=True)]
    duration = len(arrived) * s.slot_s
    total = float(arrived.sum())
    values = np.array([v for v, _ in lat]) if lat else np.zeros(1)
    weights = np.array([w for _, w in lat]) if lat else np.zeros(1)
    done = float(weights.sum())
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    p95 = float(values[order][np.searchsorted(cum, 0.95 * cum[-1])]) if done > 0 else math.inf
    hit = float(weights[values <= deadline_s].sum()) / total if total else 1.0
    return Run(policy=name, power_w=profile.idle_w + (compute_j + radio_j) / duration,
               compute_w=compute_j / duration, radio_w=radio_j / duration, throughput=done / duration,
               latency_mean_s=float((values * weights).sum() / done) if done else math.inf, latency_p95_s=p95,
               deadline_hit=hit, max_frames=maxima[0], max_bits=maxima[1], max_latency_queue=maxima[2],
               max_throughput_queue=maxima[3],
               unfinished=total - done, series=series)


def controller(s: Settings, profile: EnergyProfile, acts: Actions) -> SlotRule:
    def decide(q: Queues, bw: float, arrivals_prev: float) -> tuple[int, float, float]:
        ch = lyapunov.choose(s, profile, acts, q, bw, arrivals_prev)
        return ch.action, ch.setting, ch.rate_bps
    return decide


def edgent_like(acts: Actions) -> SlotRule:
    """Edgent's deadline-first choice for one exit: the cut with the lowest latency now, at full speed and rate."""
    def decide(q: Queues, bw: float, arrivals_prev: float) -> tuple[int, float, float]:
        latency = acts.head_s + acts.bits / max(bw, 1.0) + np.where(acts.bits > 0, acts.edge_s, 0.0)
        return int(np.argmin(latency)), 1.0, bw
    return decide


def fixed(action: int, setting: float, rate_fraction: float) -> SlotRule:
    def decide(q: Queues, bw: float, arrivals_prev: float) -> tuple[int, float, float]:
        return action, setting, rate_fraction * bw
    return decide


V_SWEEP = (0.0, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
HIT_TOLERANCE = 0.01  # "the same deadline-hit rate": within one percentage point


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    name: str
    trace: Trace
    profile: EnergyProfile
    arrival: str
    rate: float  # frames/s


SCENARIOS = (("steady", "poisson", 0.1), ("hsdpa", "poisson", 0.1), ("hsdpa", "bursty", 0.1),
             ("hsdpa", "poisson", 1.0), ("wifi", "poisson", 0.1), ("wifi", "poisson", 1.0))
THROUGHPUT_V = (10.0, 1000.0)  # the throughput-target curves, at these V
THROUGHPUT_TARGETS = (0.0, 0.5, 0.8, 0.9, 0.95, 1.0, 1.05)  # minimum throughput, as shares of the arrival rate
THROUGHPUT_SCENARIOS = ("steady-lte-poisson-0.1fps", "hsdpa-lte-poisson-1fps")  # sparse and dense LTE


def controlled() -> tuple[str, Actions]:
    """The exit the benchmark controls (the 28x28 branchy AlexNet's deepest, Edgent's Pi 3 and desktop models)."""
    from models import loaders
    from models.bundle import load_bundle
    from planner import candidates

    bundle = load_bundle()
    cands = candidates.compile_candidates(bundle.exits, loaders.load_latency_model(loaders.PI3_MODEL),
                                          loaders.load_latency_model(loaders.DESKTOP_MODEL))
    return f"{bundle.name} exit {len(bundle.exits)}", Actions.of_exit(cands, len(bundle.exits))


def scenarios(duration_s: float, seed: int) -> list[Scenario]:
    """The shipped scenarios: each trace with its radio's profile and its arrivals."""
    from planner.energy import PROFILES

    traces = {"steady": steady(duration_s, seed=seed), "hsdpa": hsdpa(duration_s, seed=seed),
              "wifi": wifi(duration_s, seed=seed)}
    return [Scenario(name=f"{t}-lte-{arr}-{rate:g}fps" if t != "wifi" else f"{t}-{arr}-{rate:g}fps",
                     trace=traces[t], profile=PROFILES["pi3b-wifi" if t == "wifi" else "pi3b-lte"], arrival=arr,
                     rate=rate) for t, arr, rate in SCENARIOS]


def bench(out: Path, *, duration_s: float = 1800.0, slot_s: float = 0.25, latency_target_s: float = 10.0,
          seed: int = 0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``coinfer bench energy``: the controller over a sweep of V against Edgent, device-only, edge-only and the
    best fixed (cut, setting, rate), on each scenario; the throughput-target curves; JSON, the traces, PNGs."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "traces").mkdir(exist_ok=True)
    model, acts = controlled()
    shipped = scenarios(duration_s, seed)
    for t in {sc.trace.name: sc.trace for sc in shipped}.values():
        (out / "traces" / f"{t.name}.json").write_text(json.dumps(t.to_json()) + "\n")
    doc: dict[str, Any] = {"model": model, "device_model": "edgent2018 Pi 3",
                           "edge_model": "edgent2018 desktop", "duration_s": duration_s, "slot_s": slot_s,
                           "latency_target_s": latency_target_s, "deadline_s": latency_target_s, "seed": seed,
                           "v_sweep": list(V_SWEEP), "scenarios": {}}
    for sc in shipped:
        log(f"{sc.name}: {sc.profile.name}, {sc.arrival} arrivals at {sc.rate:g} frames/s")
        doc["scenarios"][sc.name] = _scenario(sc, acts, slot_s, latency_target_s, seed, log)
        if sc.name in THROUGHPUT_SCENARIOS:
            doc["scenarios"][sc.name]["throughput_curves"] = _throughput(sc, acts, slot_s, latency_target_s, seed, log)
    (out / "energy.json").write_text(json.dumps(doc, indent=1) + "\n")
    _plot(doc, out)
    return doc


def _throughput(sc: Scenario, acts: Actions, slot_s: float, target_s: float, seed: int,
                log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Power against the minimum-throughput target (the throughput virtual queue active), at each of
    ``THROUGHPUT_V``: where holding frames to save energy stops being allowed."""
    slots = int(len(sc.trace.rates_bps) * sc.trace.step_s / slot_s)
    arrived = arrivals(sc.arrival, sc.rate, slots, slot_s, seed)
    curves = []
    for v in THROUGHPUT_V:
        for share in THROUGHPUT_TARGETS:
            s = Settings(v=v, slot_s=slot_s, latency_target_s=target_s, min_throughput=share * sc.rate)
            r = simulate(controller(s, sc.profile, acts), f"lyapunov V={v:g} min throughput {share:g}x", s,
                         sc.profile, acts, sc.trace, arrived, deadline_s=target_s)
            curves.append({"v": v, "target_share": share, "min_throughput": share * sc.rate, **r.summary()})
            log(f"  V={v:<6g} min throughput {share:4.2f} x {sc.rate:g}/s: power {r.power_w:.3f} W, latency mean "
                f"{r.latency_mean_s:.2f} s, max throughput queue {r.max_throughput_queue:.1f}")
    return curves


def _scenario(sc: Scenario, acts: Actions, slot_s: float, target_s: float, seed: int,
              log: Callable[[str], None]) -> dict[str, Any]:
    slots = int(len(sc.trace.rates_bps) * sc.trace.step_s / slot_s)
    arrived = arrivals(sc.arrival, sc.rate, slots, slot_s, seed)
    base = Settings(slot_s=slot_s, latency_target_s=target_s)

    def run(policy: SlotRule, name: str, every: int = 0) -> Run:
        return simulate(policy, name, base, sc.profile, acts, sc.trace, arrived, deadline_s=target_s, every=every)

    curve = []
    for v in V_SWEEP:
        s = Settings(v=v, slot_s=slot_s, latency_target_s=target_s)
        r = simulate(controller(s, sc.profile, acts), f"lyapunov V={v:g}", s, sc.profile, acts, sc.trace, arrived,
                     deadline_s=target_s, every=int(4 / slot_s) if v in (0.0, 10.0, 1000.0) else 0)
        curve.append({"v": v, **r.summary(), **({"series": r.series} if r.series["t"] else {})})
        log(f"  V={v:<6g} power {r.power_w:.3f} W  throughput {r.throughput:.3f}/s  latency mean "
            f"{r.latency_mean_s:.2f} s p95 {r.latency_p95_s:.2f} s  hit {r.deadline_hit:.3f}  max Q {r.max_frames:.1f}")
    device_only = int(np.flatnonzero(acts.bits == 0)[0])
    edge_only = int(np.flatnonzero(acts.head_s == 0)[0])
    baselines = {name: run(p, name).summary() for name, p in (
        ("edgent", edgent_like(acts)), ("device_only", fixed(device_only, 1.0, 1.0)),
        ("edge_only", fixed(edge_only, 1.0, 1.0)))}
    mid = int(np.argmin(np.where((acts.bits > 0) & (acts.head_s > 0), acts.bits, np.inf)))  # the thinnest cut
    settings = sorted({sc.profile.settings[0], sc.profile.settings[len(sc.profile.settings) // 2], 1.0})
    fixed_runs = [run(fixed(a, st, rf), f"fixed cut {a} setting {st:.2f} rate {rf:g}").summary()
                  for a in (device_only, edge_only, mid) for st in settings for rf in (0.5, 1.0)]
    # the cheapest fixed action that meets as many deadlines as Edgent's policy (within a point), else the one
    # that meets the most
    target = baselines["edgent"]["deadline_hit"] - HIT_TOLERANCE
    ok = [r for r in fixed_runs if r["deadline_hit"] >= target]
    baselines["best_fixed"] = (min(ok, key=lambda r: r["power_w"]) if ok
                               else max(fixed_runs, key=lambda r: r["deadline_hit"]))
    for name, b in baselines.items():
        log(f"  {name:<12} power {b['power_w']:.3f} W  latency mean {b['latency_mean_s']:.2f} s  "
            f"hit {b['deadline_hit']:.3f}  ({b['policy']})")
    ref = baselines["edgent"]
    same = [c for c in curve if c["deadline_hit"] >= ref["deadline_hit"] - HIT_TOLERANCE
            and c["throughput"] >= ref["throughput"] * 0.99]
    best = min(same, key=lambda c: c["power_w"]) if same else None
    point = None if best is None else {"v": best["v"], "power_w": best["power_w"], "edgent_power_w": ref["power_w"],
                                       "saved": 1 - best["power_w"] / ref["power_w"],
                                       "deadline_hit": best["deadline_hit"], "latency_mean_s": best["latency_mean_s"]}
    if point:
        log(f"  operating point V={point['v']:g}: {point['saved']:.1%} less power than Edgent's policy at its "
            f"deadline-hit rate and throughput")
    # drift-plus-penalty's bounds: power within O(1/V) of the optimum, queues O(V). The optimum is not known: the
    # reference is the cheapest of the fixed actions and the controller's own power at the largest V
    floor = min([r["power_w"] for r in fixed_runs if r["unfinished"] <= 1.0] + [curve[-1]["power_w"]])
    bounds = [{"v": c["v"], "gap_w": c["power_w"] - floor, "max_frames": c["max_frames"],
               "max_latency_queue": c["max_latency_queue"]} for c in curve]
    return {"trace": sc.trace.name, "profile": sc.profile.to_json(), "arrival": sc.arrival, "rate": sc.rate,
            "curve": curve, "baselines": baselines, "operating_point": point,
            "bounds": {"reference_power_w": floor, "rows": bounds}}


def _plot(doc: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["scenarios"])
    fig, axes = plt.subplots(2, len(names), figsize=(3.6 * len(names), 6.4), squeeze=False)
    for col, name in enumerate(names):
        sc = doc["scenarios"][name]
        vs = [max(c["v"], 0.1) for c in sc["curve"]]
        top, bottom = axes[0][col], axes[1][col]
        top.plot(vs, [c["power_w"] for c in sc["curve"]], "o-", label="lyapunov")
        bottom.plot(vs, [c["latency_mean_s"] for c in sc["curve"]], "o-", label="mean")
        bottom.plot(vs, [c["latency_p95_s"] for c in sc["curve"]], "s--", label="p95")
        for (key, r), colour in zip(sc["baselines"].items(), ("tab:red", "tab:green", "tab:purple", "tab:grey"),
                                    strict=True):
            top.axhline(r["power_w"], color=colour, ls=":", label=key)
        for ax in (top, bottom):
            ax.set_xscale("log")
        top.set_title(name, fontsize=8)
        bottom.set_xlabel("V (0 shown at 0.1)")
    axes[0][0].set_ylabel("average power (W)")
    axes[1][0].set_ylabel("latency (s)")
    axes[0][0].legend(fontsize=6)
    axes[1][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "tradeoff.png", dpi=100)
    plt.close(fig)
    sc = doc["scenarios"][next(n for n in names if n.startswith("hsdpa"))]
    fig, axes2 = plt.subplots(3, 1, figsize=(9, 6), sharex=True)
    for c in sc["curve"]:
        if "series" in c:
            ser = c["series"]
            axes2[0].plot(ser["t"], ser["frames"], label=f"V={c['v']:g}", lw=0.8)
            axes2[1].plot(ser["t"], ser["latency_queue"], lw=0.8)
            axes2[2].plot(ser["t"], np.asarray(ser["bandwidth"]) / 1e6, color="grey", lw=0.8)
    axes2[0].set_ylabel("frame queue")
    axes2[1].set_ylabel("latency queue (s)")
    axes2[2].set_ylabel("uplink (Mbit/s)")
    axes2[2].set_xlabel("time (s)")
    axes2[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "queues.png", dpi=100)
    plt.close(fig)
    _plot_axes(doc, out, plt)


def _plot_axes(doc: dict[str, Any], out: Path, plt: Any) -> None:
    """``throughput.png``: power and latency against the throughput target (the third axis); ``bounds.png``: the
    gap to the reference power (1/V) and the queues' maxima (V) over V."""
    with_curves = [(n, sc) for n, sc in doc["scenarios"].items() if "throughput_curves" in sc]
    if with_curves:
        fig, axes = plt.subplots(2, len(with_curves), figsize=(5 * len(with_curves), 6), squeeze=False)
        for col, (name, sc) in enumerate(with_curves):
            for v in sorted({c["v"] for c in sc["throughput_curves"]}):
                rows = [c for c in sc["throughput_curves"] if c["v"] == v]
                axes[0][col].plot([c["min_throughput"] for c in rows], [c["power_w"] for c in rows], "o-",
                                  label=f"V={v:g}")
                axes[1][col].plot([c["min_throughput"] for c in rows], [c["latency_mean_s"] for c in rows], "o-",
                                  label=f"V={v:g}")
            axes[0][col].axhline(sc["baselines"]["edgent"]["power_w"], color="tab:red", ls=":", label="edgent")
            axes[0][col].set_title(f"{name} (arrivals {sc['rate']:g}/s)", fontsize=9)
            axes[1][col].set_xlabel("minimum throughput target (frames/s)")
        axes[0][0].set_ylabel("average power (W)")
        axes[1][0].set_ylabel("mean latency (s)")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=100)
        plt.close(fig)
    fig, (gap, queue) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, sc in doc["scenarios"].items():
        rows = [r for r in sc["bounds"]["rows"] if r["v"] > 0]
        gap.plot([r["v"] for r in rows], [max(r["gap_w"], 1e-4) for r in rows], "o-", label=name)
        queue.plot([r["v"] for r in rows], [r["max_frames"] for r in rows], "o-", label=name)
    vs = np.array(doc["v_sweep"][1:])
    gap.plot(vs, 0.3 / vs, "k:", label="1/V")
    queue.plot(vs, 4 * vs ** 0.5, "k--", label="4 sqrt(V)")
    for ax, title in ((gap, "power above the reference (W)"), (queue, "frame queue maximum")):
        ax.set(xscale="log", yscale="log", xlabel="V", title=title)
    gap.legend(fontsize=6)
    queue.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "bounds.png", dpi=100)
    plt.close(fig)
