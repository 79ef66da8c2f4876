"""The energy model and the Lyapunov controller: bounded queues under feasible load, V = 0 minimises backlog,
a larger V trades backlog for energy, and the controller as a policy behind the seam."""

import numpy as np
import pytest

from models.bundle import Bundle
from planner import candidates, core, energy, lyapunov, policies
from planner.latency import LatencyModel

PROFILE = energy.PROFILES["pi3b-lte"]


@pytest.fixture(scope="module")
def acts(bundle: Bundle, pi3: LatencyModel, desktop: LatencyModel) -> lyapunov.Actions:
    return lyapunov.Actions.of_exit(candidates.compile_candidates(bundle.exits, pi3, desktop), 5)


def test_the_energy_model_follows_its_sources() -> None:
    p = energy.PROFILES["pi4b-wifi"]
    assert (p.idle_w, p.busy_w) == (2.7, 6.4) and p.settings[0] == pytest.approx(600 / 1500)
    assert p.busy_power_w(1.0) == pytest.approx(6.4)
    assert p.busy_power_w(p.settings[0]) == pytest.approx(2.7 + 0.8 * 3.7 * 0.4)
    # busy power linear in frequency: a frame costs 20% less energy at the lowest clock (the stated assumption)
    slow, fast = p.compute_j(1.0, p.settings[0]), p.compute_j(1.0, 1.0)
    assert fast == pytest.approx(3.7) and slow == pytest.approx(0.8 * 3.7)
    mid = p.compute_j(1.0, p.settings[4])
    assert slow < mid < fast
    lte = energy.PROFILES["pi4b-lte"]
    assert lte.radio_w(1e6) == pytest.approx(0.43839 + 1.28804) and lte.radio_tail_s == pytest.approx(11.576)
    assert lte.send_j(1e6, 2e6) < lte.send_j(1e6, 1e6)  # beta is paid per second: faster is cheaper per bit
    custom = energy.profile_from_doc({"base": "pi4b-wifi", "idle_w": 3.0, "radio": "lte"})
    assert custom.idle_w == 3.0 and custom.radio_tail_s == pytest.approx(11.576)
    for doc, message in (({"watts": 1}, "unknown field"), ({"base": "pi9"}, "unknown base"),
                         ({"busy_w": 1.0}, "idle_w <= busy_w_min <= busy_w"), ({"radio": "5g"}, "radio must be"),
                         ({"settings": [0.5, 0.9]}, "end at 1")):
        with pytest.raises(energy.EnergyError, match=message):
            energy.profile_from_doc(doc)


def _run(acts: lyapunov.Actions, v: float, arrivals: np.ndarray, bandwidth: np.ndarray,
         slot_s: float = 0.25) -> tuple[float, float, list[lyapunov.Queues]]:
    """The controller's own dynamics (``apply`` with the actual arrivals): energy, mean backlog, the queues."""
    s = lyapunov.Settings(v=v, slot_s=slot_s, latency_target_s=10.0)
    q, prev, joules, states = lyapunov.Queues(), 0.0, 0.0, []
    for a, bw in zip(arrivals, bandwidth, strict=True):
        ch = lyapunov.choose(s, PROFILE, acts, q, float(bw), prev)
        real = lyapunov.apply(s, PROFILE, acts, q, ch.action, ch.setting, ch.rate_bps, float(bw), float(a))
        joules += real.compute_j + real.radio_j
        q, prev = real.next, float(a)
        states.append(q)
    return joules, float(np.mean([x.frames + x.bits / acts.input_bits for x in states])), states


def test_queues_stay_bounded_and_v_trades_backlog_for_energy(acts: lyapunov.Actions) -> None:
    rng = np.random.default_rng(0)
    slots = 4000
    arrivals = rng.poisson(0.1 * 0.25, slots).astype(float)  # 0.1 frames/s: feasible on the device alone
    bandwidth = np.where(rng.random(slots) < 0.05, 1e3, 1.3e6)  # with outages
    results = {v: _run(acts, v, arrivals, bandwidth) for v in (0.0, 10.0, 1000.0)}
    for _, _, states in results.values():  # bounded: no queue grows over the run
        assert max(x.frames for x in states) < 10 and max(x.latency for x in states) < 500
        assert max(x.frames for x in states[-1000:]) <= max(x.frames for x in states[:1000]) + 5
    energies = [results[v][0] for v in (0.0, 10.0, 1000.0)]
    backlogs = [results[v][1] for v in (0.0, 10.0, 1000.0)]
    assert energies[0] > energies[1] >= energies[2]  # more V, less energy
    assert backlogs[0] < backlogs[1] <= backlogs[2] * 1.001  # and more backlog
    # an infeasible load (10 frames/s, no uplink at all): the backlog grows without bound, at every V
    _, _, states = _run(acts, 1.0, np.full(400, 2.5), np.full(400, 1e3))
    assert states[-1].frames > states[100].frames + 500


def test_v0_serves_as_fast_as_it_can(acts: lyapunov.Actions) -> None:
    s = lyapunov.Settings(v=0.0)
    q = lyapunov.Queues(frames=5.0, bits=0.0, arrival_rate=1.0)
    ch = lyapunov.choose(s, PROFILE, acts, q, 0.0 + 1e3, 1.0)  # no uplink to speak of: compute on the device
    assert acts.bits[ch.action] == 0 and ch.setting == 1.0 and ch.served > 0
    same = lyapunov.choose(s, PROFILE, acts, q, 1e3, 1.0)
    assert same == ch  # deterministic


def test_the_controller_is_a_policy_behind_the_seam(bundle: Bundle, pi3: LatencyModel,
                                                    desktop: LatencyModel) -> None:
    policy = policies.make("lyapunov", v=100.0, slot=0.5, profile="pi3b-lte")
    c = policy.compile(bundle.exits, pi3, desktop)
    decisions = []
    for i in range(6):
        d = policy.decide(core.View(prepared=c, conditions=core.Conditions(bandwidth_bps=2e6, deadline_s=5.0,
                                                                             now_s=0.2 * i)))
        assert isinstance(d, core.Decision)
        decisions.append(d)
    assert all(d.exit == 5 and d.actuation is not None for d in decisions)
    assert all(0 < (d.actuation.cpu_share or 0) <= 1 for d in decisions if d.actuation)
    # within one slot (0.5 s) the same action; the slot after may change it
    assert decisions[0].cut_tensors == decisions[1].cut_tensors == decisions[2].cut_tensors
    assert policy._in_flight == 6
    for d in decisions:
        policy.observe(core.Observation(decision=d, latency_s=0.1, deadline_s=5.0, device_s=0.1, edge_s=None,
                                        fallback=None))
    assert policy._in_flight == 0
    with pytest.raises(Exception, match="unknown energy profile"):
        policies.make("lyapunov", profile="nope")
    with pytest.raises(Exception, match="need v >= 0"):
        policies.make("lyapunov", v=-1)


def test_the_controller_holds_frames_to_send_them_together(bundle: Bundle, pi3: LatencyModel,
                                                           desktop: LatencyModel) -> None:
    """LTE, frames faster than the device can compute them and the radio asleep: at a large V the controller holds
    the request to send it with later ones (a hold, not a route), decides it again in a later slot without counting
    it as a new arrival, and never holds a request that could then no longer meet its deadline."""
    policy = policies.make("lyapunov", v=1000.0, slot=0.25, profile="pi3b-lte")
    assert isinstance(policy, lyapunov.Lyapunov)
    prepared = policy.compile(bundle.exits, pi3, desktop)
    policy.queues = lyapunov.Queues(arrival_rate=2.0, elapsed_s=600.0)  # two frames a second for ten minutes
    held = policy.decide(core.View(prepared=prepared, conditions=core.Conditions(
        bandwidth_bps=1.3e6, deadline_s=30.0, now_s=100.0)))
    assert isinstance(held, core.Decision) and held.actuation is not None and held.actuation.hold_s
    assert 0 < held.actuation.hold_s <= 0.25 and policy._in_flight == 1
    again = policy.decide(core.View(prepared=prepared, conditions=core.Conditions(
        bandwidth_bps=1.3e6, deadline_s=29.7, now_s=100.3, held_s=0.3)))
    assert isinstance(again, core.Decision) and policy._in_flight == 1  # the same request, not a new one
    urgent = policy.decide(core.View(prepared=prepared, conditions=core.Conditions(
        bandwidth_bps=1.3e6, deadline_s=0.1, now_s=100.35)))
    assert isinstance(urgent, core.Decision) and urgent.actuation is not None and not urgent.actuation.hold_s
    assert policy._in_flight == 2
    # on Wi-Fi (no tail) holding saves nothing: never held
    wifi = policies.make("lyapunov", v=1000.0, slot=0.25, profile="pi3b-wifi")
    assert isinstance(wifi, lyapunov.Lyapunov)
    wifi.queues = lyapunov.Queues(arrival_rate=2.0, elapsed_s=600.0)
    d = wifi.decide(core.View(prepared=wifi.compile(bundle.exits, pi3, desktop), conditions=core.Conditions(
        bandwidth_bps=1.3e6, deadline_s=30.0, now_s=100.0)))
    assert isinstance(d, core.Decision) and d.actuation is not None and not d.actuation.hold_s
