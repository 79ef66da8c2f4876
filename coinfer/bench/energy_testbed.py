"""``coinfer bench energy --testbed``: the Lyapunov controller inside deviced on the namespace testbed, on one
bandwidth trace replayed through ``tc``, with the cgroup CPU quota as its compute knob and socket pacing as
its rate knob; measured latency and throughput, and energy modelled from the measured times, against the
simulation (``coinfer.bench.energy``) of the same trace and the same arrivals. Needs root.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from coinfer.bench import energy
from coinfer.lab import traces
from coinfer.lab.client import Agent, edged, run_agent
from coinfer.lab.procs import REPO
from coinfer.lab.testbed import BROKER_PORT, Emulation, Testbed, broker
from models import loaders
from models.bundle import BUNDLES_DIR, load_bundle
from planner import candidates, lyapunov
from planner.core import Candidates, Conditions, Decision, Observation, Prepared, View, Where
from planner.energy import PROFILES, EnergyProfile

REPLAY_STEP_S = 0.002  # the per-request simulation's time step
BUNDLE = BUNDLES_DIR / "fmnist56-branchy-alexnet"  # its stages span many periods of the quota (as bench edgent)
CALIBRATED = REPO / "docs" / "results" / "edgent"  # the testbed's device and edge latency models (bench edgent)


def run(out: Path, *, duration_s: float = 300.0, rate: float = 1.0, v: float = 10.0, slot_s: float = 0.1,
        latency_target_s: float = 10.0, profile: str = "pi3b-lte", cpu_quota: float = 0.1, seed: int = 0,
        outages_per_hour: float = 0.0, policy: str = "lyapunov", log: Callable[[str], None] = print) -> dict[str, Any]:
    """One run of ``policy`` in deviced (``lyapunov``, compared with its simulation; or ``edgent``, float32 only:
    the same requests for reference, its energy modelled the same way); ``outages_per_hour`` > 0 adds the HSDPA
    trace's outages (deviced then times out and falls back, which the fluid simulation does not model)."""
    out.mkdir(parents=True, exist_ok=True)
    trace = traces.hsdpa(duration_s + 10, seed=seed, outages_per_hour=outages_per_hour)
    rng = np.random.default_rng(seed + 7)
    offsets = np.cumsum(rng.exponential(1.0 / rate, int(duration_s * rate * 1.5)))
    offsets = offsets[offsets < duration_s]
    device_model, edge_model = CALIBRATED / "device-latency-model.json", CALIBRATED / "edge-latency-model.json"
    params: dict[str, Any] = ({"v": v, "slot": slot_s, "latency_target": latency_target_s, "profile": profile}
                              if policy == "lyapunov" else {"encodings": False})
    bed = Testbed(Emulation(uplink_bps=trace.rates_bps[0], cpu_quota=cpu_quota))
    log(f"testbed: hsdpa trace (seed {seed}, {outages_per_hour:g} outages an hour) over {duration_s:.0f} s, "
        f"Poisson arrivals at {rate:g}/s "
        f"({len(offsets)} requests), {policy} {params}, CPU quota {cpu_quota:.0%} of a core as the compute knob")
    with tempfile.TemporaryDirectory() as tmpdir, ExitStack() as stack:
        tmp = Path(tmpdir)
        stack.enter_context(bed)
        stack.enter_context(broker(tmp, bed.edge_host, bed.edge_argv))
        stack.enter_context(edged(bed, tmp, edge_model, BUNDLE))
        agent = stack.enter_context(_agent(bed, device_model, policy, params))
        stop = threading.Event()
        player = threading.Thread(target=_play, args=(bed, trace, stop), daemon=True)
        player.start()
        try:
            answer = agent.ask(op="arrivals", offsets=[round(float(t), 4) for t in offsets],
                               deadline_s=latency_target_s)
            records = answer["records"]
            log(f"  deviced applied the CPU share with: {answer['compute_knob']}")
        finally:
            stop.set()
            player.join()
        described = bed.describe()
    if policy != "lyapunov":
        return _reference(out / f"testbed-{policy}.json", records, trace, duration_s, params, profile, device_model,
                          edge_model, described, log)
    name = "testbed.json" if outages_per_hour == 0 else "testbed-outages.json"
    return _compare(out / name, records, trace, offsets, duration_s, params, profile, device_model, edge_model,
                    described, log)


def _reference(path: Path, records: list[dict[str, Any]], trace: traces.Trace, duration_s: float,
               params: dict[str, Any], profile_name: str, device_model: Path, edge_model: Path,
               described: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """Another policy on the same requests: measured latency and throughput, energy modelled as for the controller
    (its device stages at full share, the speed they ran at)."""
    profile = PROFILES[profile_name]
    cands = candidates.compile_candidates(load_bundle(BUNDLE).exits, loaders.load_latency_model(device_model),
                                          loaders.load_latency_model(edge_model))
    measured = _measured(records, cands, profile, trace, duration_s)
    path.write_text(json.dumps({"emulation": described, "params": params, "profile": profile.to_json(),
                                "trace": trace.to_json(), "measured": measured, "records": records}, indent=1) + "\n")
    log(f"  measured: {measured['requests']} requests, {measured['throughput']:.3f}/s, latency mean "
        f"{measured['latency_mean_s']:.3f} s p95 {measured['latency_p95_s']:.3f} s, modelled power "
        f"{measured['power_w']:.3f} W; where {measured['where']}")
    return {"measured": measured}


@contextmanager
def _agent(bed: Testbed, model: Path, policy: str, params: dict[str, Any]) -> Iterator[Agent]:
    argv = [sys.executable, "-m", "coinfer.lab.agent", "--broker-host", bed.edge_host, "--broker-port",
            str(BROKER_PORT), "--device-model", str(model), "--bundle", str(BUNDLE.resolve()), "--policy",
            policy, "--planner", json.dumps(params), "--compute-knob", "cgroup"]
    with run_agent(bed, argv) as agent:
        yield agent


def _play(bed: Testbed, trace: traces.Trace, stop: threading.Event) -> None:
    start = time.monotonic()
    while not stop.is_set():
        bed.set_uplink(trace.at(time.monotonic() - start))
        stop.wait(0.25)


def _compare(path: Path, records: list[dict[str, Any]], trace: traces.Trace, offsets: np.ndarray, duration_s: float,
             params: dict[str, Any], profile_name: str, device_model: Path, edge_model: Path,
             described: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """Measured latency and throughput, energy modelled from the measured times, against the simulation of the same
    requests (``replay``: deviced's own policy object per request, on the same trace and arrivals) and, for
    reference, against the trade-off curves' slotted fluid simulation."""
    profile = PROFILES[profile_name]
    bundle = load_bundle(BUNDLE)
    # deviced's own policy object decides the replayed requests, over what it prepares itself
    policy = lyapunov.Lyapunov(**params)
    prepared = policy.compile(bundle.exits, loaders.load_latency_model(device_model),
                              loaders.load_latency_model(edge_model))
    cands = prepared.candidates
    measured = _measured(records, cands, profile, trace, duration_s)
    speed = measured["device_speed"]
    replayed = replay(policy, prepared, trace, offsets, speed)
    sim = account(replayed, cands, profile, trace, duration_s, speed)
    s = lyapunov.Settings(v=float(params["v"]), slot_s=float(params["slot"]),
                          latency_target_s=float(params["latency_target"]))
    arrived = np.bincount((offsets / s.slot_s).astype(int), minlength=int(duration_s / s.slot_s))[
        :int(duration_s / s.slot_s)].astype(float)
    acts = lyapunov.Actions.of_exit(cands, len(bundle.exits))
    acts = replace(acts, head_s=acts.head_s * speed)
    fluid = energy.simulate(energy.controller(s, profile, acts), "fluid", s, profile, acts, trace, arrived,
                            deadline_s=s.latency_target_s).summary()
    errors = {k: measured[k] / sim[k] - 1 for k in ("throughput", "latency_mean_s", "power_w") if sim[k]}
    doc = {"emulation": described, "params": params, "profile": profile.to_json(), "trace": trace.to_json(),
           "measured": measured, "simulated": sim, "relative_error": errors, "fluid_simulation": fluid,
           "records": records, "simulated_records": replayed}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    log(f"  measured: {measured['requests']} requests, {measured['throughput']:.3f}/s, latency mean "
        f"{measured['latency_mean_s']:.3f} s p95 {measured['latency_p95_s']:.3f} s, modelled power "
        f"{measured['power_w']:.3f} W; where {measured['where']}; CPU shares used {measured['cpu_shares']}")
    log(f"  simulated: {sim['throughput']:.3f}/s, latency mean {sim['latency_mean_s']:.3f} s p95 "
        f"{sim['latency_p95_s']:.3f} s, power {sim['power_w']:.3f} W; where {sim['where']}; relative error "
        + ", ".join(f"{k} {v:+.1%}" for k, v in errors.items()))
    return doc


def _measured(records: list[dict[str, Any]], cands: Candidates, profile: EnergyProfile, trace: traces.Trace,
              duration_s: float) -> dict[str, Any]:
    """``account`` of the testbed's records at the speed the device's stages ran at against their model, at the
    share they ran at (what deviced's speed factor learns): the simulations serve frames at the same speed, or a
    few percent at a busy device's load would read as queueing error."""
    ratios = [r["stage_s"] * (r["cpu_share"] or 1.0) / float(cands.device_s[cands.index(
        r["plan_exit"], frozenset(r["cut_tensors"]) if r["where"] == "split" else frozenset())])
        for r in records if r["where"] in ("device", "split")]
    speed = float(np.median(ratios)) if ratios else 1.0
    return {**account(records, cands, profile, trace, duration_s, speed), "device_speed": speed}


def account(records: list[dict[str, Any]], cands: Candidates, profile: EnergyProfile, trace: traces.Trace,
            duration_s: float, speed: float) -> dict[str, Any]:
    """Throughput, latency and modelled power of a run's per-request records (the testbed's or ``replay``'s):
    compute as the modelled full-speed time of what ran on the device at ``speed``, at the share it ran at (a
    fallback counted as its whole exit on the device); the radio from each send at its paced rate and the tail
    between sends."""
    lat = np.array([r["latency_s"] for r in records])
    compute_j = 0.0
    for r in records:
        ran = {"device": (r["plan_exit"], frozenset()), "fallback": (r["exit"], frozenset()),
               "split": (r["plan_exit"], frozenset(r["cut_tensors"]))}.get(r["where"])
        if ran is not None:
            full = float(cands.device_s[cands.index(*ran)]) * speed
            compute_j += float(profile.compute_j(full, r["cpu_share"] or 1.0))
    sends = []  # (start, seconds on the air, rate)
    for r in records:
        if r["where"] in ("edge", "split"):
            bits = float(cands.up_bytes[cands.index(r["plan_exit"], frozenset(r["cut_tensors"]))]) * 8
            start = r["t"] + (r["stage_s"] if r["where"] == "split" else 0.0)
            rate = min(r["tx_rate_bps"] or np.inf, trace.at(start))
            sends.append((start, min(bits / max(rate, 1.0), r["latency_s"]), rate))  # on the air at most until done
    sends.sort()
    radio_j = 0.0
    for i, (start, air, rate) in enumerate(sends):
        quiet = (sends[i + 1][0] if i + 1 < len(sends) else duration_s) - start - air
        radio_j += float(profile.radio_w(rate)) * air + profile.radio_tail_w * min(max(quiet, 0.0),
                                                                                   profile.radio_tail_s)
    return {"requests": len(records), "throughput": len(records) / duration_s,  # per second of the arrivals
            "latency_mean_s": float(lat.mean()), "latency_p95_s": float(np.percentile(lat, 95)),
            "deadline_hit": float(np.mean([r["met"] for r in records])),
            "fallbacks": sum(r["fallback"] is not None for r in records),
            "where": {w: sum(r["where"] == w for r in records) for w in sorted({r["where"] for r in records})},
            "cpu_shares": sorted({r["cpu_share"] for r in records if r["cpu_share"] is not None}),
            "power_w": profile.idle_w + (compute_j + radio_j) / duration_s, "compute_w": compute_j / duration_s,
            "radio_w": radio_j / duration_s}


def replay(policy: lyapunov.Lyapunov, prepared: Prepared, trace: traces.Trace, offsets: np.ndarray, speed: float, *,
           step_s: float = REPLAY_STEP_S) -> list[dict[str, Any]]:
    """What deviced does with these requests, simulated in steps of ``step_s``: the same ``Lyapunov`` policy decides
    each request as it arrives (its route fixed then, its CPU share and transmit rate applied to the whole device
    from then on, as the actuator does; a request it holds is decided again when the hold ends); stages run one at
    a time, first come first served, at ``speed`` times their model over the share in force; sends queue on an
    uplink at the trace's rate (or the paced one, if lower); the edge answers after its modelled time. Returns
    records shaped like the testbed's."""
    cands = prepared.candidates
    share, rate, t, i = 1.0, math.inf, 0.0, 0
    cpu: deque[list[Any]] = deque()  # [request, full-speed seconds left]
    air: deque[list[Any]] = deque()  # [request, bits left]
    edge: list[tuple[float, dict[str, Any]]] = []  # (answer at, request)
    held: list[tuple[float, float]] = []  # (decide again at, arrived at): requests the policy held
    records: list[dict[str, Any]] = []
    while i < len(offsets) or cpu or air or edge or held:
        due = [h for h in held if h[0] <= t]
        for h in due:
            held.remove(h)
        arrived = []
        while i < len(offsets) and offsets[i] <= t:
            arrived.append((float(offsets[i]), 0.0))
            i += 1
        for came, again in [(h[1], t - h[1]) for h in due] + arrived:
            left = policy.settings.latency_target_s - again
            cond = Conditions(bandwidth_bps=trace.at(t), deadline_s=max(left, 1e-3),
                              uplink_backlog_bytes=sum(b for _, b in air) / 8, device_speed=speed, now_s=t,
                              held_s=max(again, 1e-9) if again else 0.0)
            d = policy.decide(View(prepared=prepared, conditions=cond))
            assert isinstance(d, Decision) and d.actuation is not None
            if d.actuation.hold_s:  # deviced sleeps this long and asks again, as here
                held.append((t + d.actuation.hold_s, came))
                continue
            share, rate = d.actuation.cpu_share or 1.0, d.actuation.tx_rate_bps or math.inf
            r = {"t": came, "decision": d, "where": d.where.value, "plan_exit": d.exit,
                 "exit": d.exit, "cut_tensors": sorted(d.cut_tensors), "cpu_share": share,
                 "tx_rate_bps": d.actuation.tx_rate_bps, "fallback": None, "stage_s": 0.0}
            c = cands.index(d.exit, d.cut_tensors)
            r["bits"], r["edge_s"] = float(cands.up_bytes[c]) * 8, float(cands.edge_s[c])
            if d.where == Where.EDGE:
                air.append([r, r["bits"]])
            else:
                cpu.append([r, float(cands.device_s[c]) * speed])
        if cpu:
            cpu[0][1] -= step_s * share
            cpu[0][0]["stage_s"] += step_s
            if cpu[0][1] <= 0:
                r = cpu.popleft()[0]
                if r["where"] == Where.SPLIT:
                    air.append([r, r["bits"]])
                else:
                    records.append(_done(policy, r, t + step_s))
        if air:
            air[0][1] -= step_s * min(rate, trace.at(t))
            if air[0][1] <= 0:
                r = air.popleft()[0]
                edge.append((t + step_s + r["edge_s"], r))
        for answer in [e for e in edge if e[0] <= t + step_s]:
            edge.remove(answer)
            records.append(_done(policy, answer[1], answer[0]))
        t += step_s
    return sorted(records, key=lambda r: r["t"])


def _done(policy: lyapunov.Lyapunov, r: dict[str, Any], at: float) -> dict[str, Any]:
    d = r.pop("decision")
    r["latency_s"] = at - r["t"]
    r["met"] = r["latency_s"] <= policy.settings.latency_target_s
    policy.observe(Observation(decision=d, latency_s=r["latency_s"], deadline_s=policy.settings.latency_target_s,
                               device_s=r["stage_s"], edge_s=r["edge_s"], fallback=None))
    return r
