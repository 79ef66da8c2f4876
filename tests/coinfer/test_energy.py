"""Bandwidth traces with their stated statistics, and the trace-driven simulation of the energy controller."""

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from coinfer.bench import energy
from coinfer.lab import traces
from models.bundle import Bundle
from planner import candidates, lyapunov
from planner.energy import PROFILES
from planner.latency import LatencyModel


def test_the_hsdpa_trace_has_the_published_statistics() -> None:
    t = traces.hsdpa(36000, seed=3, outages_per_hour=0.0)  # ten hours without outages: the AR(1) part alone
    x = np.log(np.asarray(t.rates_bps))
    assert np.corrcoef(x[:-1], x[1:])[0, 1] == pytest.approx(0.84, abs=0.02)
    assert x.std() == pytest.approx(0.37, abs=0.02)
    assert np.mean(t.rates_bps) == pytest.approx(1.3e6, rel=0.05)
    with_outages = traces.hsdpa(36000, seed=3)
    down = np.asarray(with_outages.rates_bps) <= traces.OUTAGE_BPS
    starts = int(np.sum(down[1:] & ~down[:-1]))
    assert 200 <= starts <= 400  # 30 an hour
    lengths = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], down.astype(int), [0]]))))[::2]
    assert np.median(lengths) == pytest.approx(1.0, abs=1.0) and np.percentile(lengths, 90) <= 10


def test_traces_are_reproducible_and_carry_their_generator(tmp_path: Path) -> None:
    a, b = traces.wifi(600, seed=5), traces.wifi(600, seed=5)
    assert a == b and a != traces.wifi(600, seed=6)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(a.to_json()))
    back = traces.Trace.from_json(json.loads(path.read_text()))
    assert back == a and back.generator == "wifi" and back.params["mean_bps"] == 20e6 and back.seed == 5
    with pytest.raises(ValueError, match="trace"):
        traces.Trace.from_json({"format": "other"})
    bursty = traces.arrivals("bursty", 0.5, 40000, 0.25, seed=1)
    assert bursty.mean() / 0.25 == pytest.approx(0.5, rel=0.2) and (bursty == 0).mean() > 0.7
    with pytest.raises(ValueError, match="unknown arrival process"):
        traces.arrivals("steady", 1.0, 10, 0.25)


def test_the_simulation_keeps_every_frame_and_the_controller_saves_energy(bundle: Bundle, pi3: LatencyModel,
                                                                          desktop: LatencyModel) -> None:
    acts = lyapunov.Actions.of_exit(candidates.compile_candidates(bundle.exits, pi3, desktop), 5)
    profile = PROFILES["pi3b-lte"]
    trace = traces.hsdpa(600, seed=2)
    s = lyapunov.Settings(v=100.0, slot_s=0.25, latency_target_s=10.0)
    arrived = traces.arrivals("poisson", 0.1, 2400, 0.25, seed=2)
    ctrl = energy.simulate(energy.controller(s, profile, acts), "lyapunov", s, profile, acts, trace, arrived,
                           deadline_s=10.0, every=8)
    edg = energy.simulate(energy.edgent_like(acts), "edgent", s, profile, acts, trace, arrived, deadline_s=10.0)
    for r in (ctrl, edg):
        done = r.throughput * 600
        assert done + r.unfinished == pytest.approx(arrived.sum(), abs=1e-6)  # every frame counted once
        assert math.isfinite(r.latency_mean_s) and r.power_w >= profile.idle_w
    assert ctrl.power_w < edg.power_w  # the LTE tail: a frame every 10 s keeps the radio up for Edgent
    assert ctrl.latency_mean_s > edg.latency_mean_s
    assert len(ctrl.series["t"]) == 300


def test_bench_energy_writes_curves_traces_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(energy, "V_SWEEP", (0.0, 100.0))
    doc = energy.bench(tmp_path, duration_s=120.0, log=lambda _: None)
    assert set(doc["scenarios"]) and all(len(sc["curve"]) == 2 for sc in doc["scenarios"].values())
    assert {"edgent", "device_only", "edge_only", "best_fixed"} <= set(next(iter(doc["scenarios"].values()))
                                                                      ["baselines"])
    for name in ("energy.json", "tradeoff.png", "queues.png", "traces/hsdpa.json"):
        assert (tmp_path / name).stat().st_size > 0


def test_the_replay_answers_every_request_as_deviced_would(bundle: Bundle, pi3: LatencyModel,
                                                           desktop: LatencyModel) -> None:
    from coinfer.bench import energy_testbed as energybed

    policy = lyapunov.Lyapunov(v=10.0, slot=0.1, latency_target=10.0, profile="pi3b-lte")
    prepared = policy.compile(bundle.exits, pi3, desktop)
    cands = prepared.candidates
    trace = traces.hsdpa(130, seed=3)
    offsets = np.cumsum(np.random.default_rng(3).exponential(1.5, 80))
    offsets = offsets[offsets < 120]
    records = energybed.replay(policy, prepared, trace, offsets, speed=2.0)
    assert [r["t"] for r in records] == pytest.approx(list(offsets))  # one answer per request
    on_device = [r for r in records if r["where"] in ("device", "split")]
    assert on_device, "the controller computes some frames on the device at LTE"
    for r in on_device:  # a stage takes its modelled time at the measured speed over its share, or longer
        full = float(cands.device_s[cands.index(r["plan_exit"], frozenset(r["cut_tensors"]) if r["where"] == "split"
                                                else frozenset())])
        assert r["stage_s"] >= full * 2.0 - 0.01 and r["latency_s"] >= r["stage_s"] - 1e-9
    finished = sorted(on_device, key=lambda r: r["t"] + r["latency_s"])
    assert [r["t"] for r in finished] == sorted(r["t"] for r in on_device)  # first come, first served
    summary = energybed.account(records, cands, PROFILES["pi3b-lte"], trace, 120.0, 2.0)
    assert summary["requests"] == len(offsets) and summary["power_w"] > PROFILES["pi3b-lte"].idle_w


def test_power_is_never_above_edgents_policy_and_never_rises_with_v() -> None:
    """Every shipped scenario (30 simulated minutes each): the controller's average power at every V is at most
    Edgent's policy's on the same arrivals and trace, and does not rise as V grows (0.2% slack: a run is one
    sample path); V = 0 is the least backlog."""
    _, acts = energy.controlled()
    for sc in energy.scenarios(1800.0, seed=0):
        slots = int(len(sc.trace.rates_bps) * sc.trace.step_s / 0.25)
        arrived = traces.arrivals(sc.arrival, sc.rate, slots, 0.25, 0)
        base = lyapunov.Settings(slot_s=0.25, latency_target_s=10.0)
        ref = energy.simulate(energy.edgent_like(acts), "edgent", base, sc.profile, acts, sc.trace, arrived,
                              deadline_s=10.0)
        runs = []
        for v in (0.0, 1.0, 10.0, 100.0, 1000.0):
            s = lyapunov.Settings(v=v, slot_s=0.25, latency_target_s=10.0)
            runs.append(energy.simulate(energy.controller(s, sc.profile, acts), f"V={v:g}", s, sc.profile, acts,
                                        sc.trace, arrived, deadline_s=10.0))
        power = [r.power_w for r in runs]
        assert all(p <= ref.power_w * 1.002 for p in power), (sc.name, ref.power_w, power)
        assert all(b <= a * 1.002 for a, b in itertools.pairwise(power)), (sc.name, power)
        assert runs[0].latency_mean_s <= min(r.latency_mean_s for r in runs) + 1e-9, sc.name
        assert all(r.max_frames < 100 for r in runs), sc.name  # the backlog V buys stays bounded
