"""The Lyapunov controller (CutEdge's drift-plus-penalty): per time slot, the cut, compute setting and transmit
rate that minimise V x energy + the drift of the queues.

Queues, in a slot of ``slot_s`` seconds (the fluid model the simulation and the policy share):

    frames   Q' = Q - served + arrivals           served = min(Q, slot x setting / head time)      (frames)
    transmit T' = T + served x cut bits - sent     sent = min(T + served x cut bits, rate x slot)  (bits)
    latency  Z' = max(Z + W' - latency target, 0)  W' = (Q' + T' / input bits) / arrival rate       (seconds)
    rate     Y' = max(Y + min throughput x slot - served, 0)                                      (frames)

(a head computed in a slot is sent in the same slot; W' is Little's law: the backlog in frames over the
arrival rate, the mean time a frame now waits). Radio energy is the sending power and, when a send wakes or
keeps up the radio, the tail it adds (``planner.energy``). In the objective a send bears only its share of
that tail: the frames expected to go out while the radio stays up (those sent now, and those arriving within
the tail) share it. Charged whole to the first frame, waking the radio would always look dearer than computing
on the device, and a controller that saw only one slot would keep the radio asleep even where frames come
often enough to keep it up cheaply.

Each slot every (cut, setting, rate) of the exit is costed with numpy and the one minimising

    V x (compute energy + radio energy) + 1/2 ((Q' + T' / input bits)^2 + Z'^2 + Y'^2)

is taken (the exact one-slot drift, not its bound). The frame and transmit queues enter as one backlog, in
frames (the uplink's bits counted as inputs' worth): with a square per queue, moving frames from one queue to
the other would look like progress (two halves square to less than the whole) while nothing left the device.
V = 0 minimises backlog; a larger V trades backlog (latency) for energy: energy O(1/V) from the optimum,
backlog O(V). Energy is ``planner.energy``'s model.
``Lyapunov`` is this as a ``planner.core.Planner`` policy: its slots advance with the conditions' clock,
arrivals are its ``decide`` calls, the frame queue is what it decided and has not seen finish, and the
transmit queue is the device's measured uplink backlog.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from planner.candidates import Stateless, compile_candidates, fixed_plan
from planner.core import Actuation, Candidates, Decision, ExitInfo, Infeasible, Observation, Prepared, View
from planner.energy import DEFAULT_PROFILE, PROFILES, EnergyProfile
from planner.errors import PlannerError
from planner.latency import LatencyModel

RATE_FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # transmit rates tried, as shares of the bandwidth estimate
ARRIVAL_TAU_S = 60.0  # time constant of the arrival-rate estimate (Little's law needs the long-run rate)
TINY = 1e-9


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """The controller's parameters (the ``[planner]`` table of ``policy = "lyapunov"``)."""

    v: float = 1.0
    slot_s: float = 0.25
    latency_target_s: float = 2.0
    min_throughput: float = 0.0  # frames/s; 0: no throughput constraint
    rate_fractions: tuple[float, ...] = RATE_FRACTIONS

    def __post_init__(self) -> None:
        if self.v < 0 or not self.slot_s > 0 or not self.latency_target_s > 0 or self.min_throughput < 0:
            raise PlannerError("lyapunov: need v >= 0, slot > 0, latency_target > 0, min_throughput >= 0")
        if not self.rate_fractions or any(not 0 < f <= 1 for f in self.rate_fractions):
            raise PlannerError("lyapunov: rate fractions lie in (0, 1]")


@dataclass(frozen=True, slots=True, kw_only=True)
class Actions:
    """One exit's cuts as the controller sees them: device seconds at full speed and bits sent per frame."""

    rows: npt.NDArray[np.int64]  # the candidates' indices
    head_s: npt.NDArray[np.float64]
    bits: npt.NDArray[np.float64]
    edge_s: npt.NDArray[np.float64]
    input_bits: float

    @classmethod
    def of_exit(cls, c: Candidates, exit_index: int) -> Actions:
        # the exit's plain candidates: the controller trades energy for backlog, not for accuracy
        spans = [np.arange(first, stop) for e, first, stop in c.rank if e == exit_index]
        if not spans:
            raise PlannerError(f"lyapunov: no exit {exit_index}")
        rows = spans[0]
        bits = c.up_bytes[rows] * 8.0
        edge_only = c.cut[rows] == 0
        return cls(rows=rows, head_s=c.device_s[rows], bits=bits, edge_s=c.edge_s[rows],
                   input_bits=float(bits[edge_only].max()) if edge_only.any() else float(bits.max()) or 1.0)


@dataclass(frozen=True, slots=True)
class Queues:
    frames: float = 0.0  # Q
    bits: float = 0.0  # T
    latency: float = 0.0  # Z
    throughput: float = 0.0  # Y
    arrival_rate: float = 0.0  # frames/s, estimated
    quiet_s: float = 1e9  # since the radio last sent (its tail energy)


@dataclass(frozen=True, slots=True, kw_only=True)
class Choice:
    """One slot's action and what it does to the queues (given the arrivals)."""

    action: int  # index into ``Actions``
    setting: float
    rate_bps: float
    served: float
    sent_bits: float
    compute_j: float
    radio_j: float  # sending and the tail
    next: Queues


def choose(s: Settings, profile: EnergyProfile, acts: Actions, q: Queues, bandwidth_bps: float,
           arrivals: float, *, device_speed: float = 1.0) -> Choice:
    """The (cut, setting, rate) minimising V x energy + drift for one slot (``arrivals`` frames expected)."""
    settings = np.asarray(profile.settings)[::-1]  # fastest first: a tie (e.g. V = 0) goes to the fastest
    rates = np.sort(np.asarray(s.rate_fractions))[::-1] * max(bandwidth_bps, 0.0)
    cut, setting, rate = np.meshgrid(np.arange(acts.head_s.size), settings, rates, indexing="ij")
    ev = _evaluate(s, profile, acts, q, cut, setting, rate, bandwidth_bps, arrivals, device_speed)
    best = np.unravel_index(int(np.argmin(s.v * (ev["compute"] + ev["radio_cost"]) + ev["drift"])), cut.shape)
    return _choice(ev, best, int(cut[best]), float(setting[best]), float(rate[best]))


def apply(s: Settings, profile: EnergyProfile, acts: Actions, q: Queues, action: int, setting: float,
          rate_bps: float, bandwidth_bps: float, arrivals: float, *, device_speed: float = 1.0) -> Choice:
    """What one action does in a slot with ``arrivals`` frames (the simulation's ground truth)."""
    ev = _evaluate(s, profile, acts, q, np.array([action]), np.array([setting]), np.array([min(rate_bps,
                   bandwidth_bps)]), bandwidth_bps, arrivals, device_speed)
    return _choice(ev, (0,), action, setting, rate_bps)


def _evaluate(s: Settings, profile: EnergyProfile, acts: Actions, q: Queues, cut: npt.NDArray[np.int64],
              setting: npt.NDArray[np.float64], rate: npt.NDArray[np.float64], bandwidth_bps: float,
              arrivals: float, device_speed: float) -> dict[str, npt.NDArray[np.float64]]:
    """The queue updates and energies of actions (arrays of cut index, setting, rate): the module's equations."""
    head = acts.head_s[cut] * device_speed
    capacity = np.where(head > 0, s.slot_s * setting / np.maximum(head, TINY), np.inf)
    served = np.minimum(q.frames, capacity)
    ready = q.bits + served * acts.bits[cut]
    sent = np.minimum(ready, rate * s.slot_s)
    frames = q.frames - served + arrivals
    bits = ready - sent
    arrival_rate = max(q.arrival_rate, arrivals / s.slot_s, 1.0 / ARRIVAL_TAU_S)
    wait = (frames + bits / acts.input_bits) / arrival_rate
    z = np.maximum(q.latency + wait - s.latency_target_s, 0.0)
    y = np.maximum(q.throughput + s.min_throughput * s.slot_s - served, 0.0)
    compute = profile.compute_j(served * head, setting)
    busy = sent > 0
    tx_s = np.where(busy, sent / np.maximum(rate, 1.0), 0.0)
    # a send keeps the radio up for its tail: charged when sent, as the tail it adds (the radio would otherwise
    # be asleep ``quiet_s`` after its last send), so that the sum over slots is the tail energy spent
    sending = np.where(busy, profile.send_j(sent, np.maximum(rate, 1.0)), 0.0)
    tail = np.where(busy, profile.radio_tail_w * np.minimum(q.quiet_s, profile.radio_tail_s), 0.0)
    batch = sent / acts.input_bits  # frames' worth going out now
    share = batch / np.maximum(batch + q.arrival_rate * profile.radio_tail_s, TINY)
    drift = 0.5 * ((frames + bits / acts.input_bits) ** 2 + z**2 + y**2)
    alpha = min(s.slot_s / ARRIVAL_TAU_S, 1.0)
    new_rate = (1 - alpha) * q.arrival_rate + alpha * arrivals / s.slot_s
    return {"served": served, "sent": sent, "frames": frames, "bits": bits, "z": z, "y": y, "compute": compute,
            "radio": sending + tail, "radio_cost": sending + tail * share, "drift": drift,
            "quiet": np.where(busy, s.slot_s - tx_s, q.quiet_s + s.slot_s),
            "arrival_rate": np.full_like(served, new_rate)}


def _choice(ev: dict[str, npt.NDArray[np.float64]], at: tuple[Any, ...], action: int, setting: float,
            rate_bps: float) -> Choice:
    return Choice(action=action, setting=setting, rate_bps=rate_bps, served=float(ev["served"][at]),
                  sent_bits=float(ev["sent"][at]), compute_j=float(ev["compute"][at]), radio_j=float(ev["radio"][at]),
                  next=Queues(frames=float(ev["frames"][at]), bits=float(ev["bits"][at]), latency=float(ev["z"][at]),
                              throughput=float(ev["y"][at]), arrival_rate=float(ev["arrival_rate"][at]),
                              quiet_s=float(ev["quiet"][at])))


@dataclass(frozen=True, slots=True, kw_only=True)
class LyapunovPrepared(Prepared):
    """What ``Lyapunov.compile`` made for one edge latency model: the candidates and the controlled exit's actions."""

    exit: int
    actions: Actions


class Lyapunov(Stateless):
    """The controller as a policy: per slot one (cut, CPU share, transmit rate), applied to that slot's requests."""

    def __init__(self, *, v: float = 1.0, slot: float = 0.25, latency_target: float = 2.0,
                 min_throughput: float = 0.0, profile: str = DEFAULT_PROFILE, exit: int | None = None) -> None:
        if profile not in PROFILES:
            raise PlannerError(f"lyapunov: unknown energy profile {profile!r}; known: {', '.join(PROFILES)}")
        self.settings = Settings(v=float(v), slot_s=float(slot), latency_target_s=float(latency_target),
                                 min_throughput=float(min_throughput))
        self.profile = PROFILES[profile]
        self.exit = exit
        self.queues = Queues()
        self._slot_start: float | None = None
        self._arrivals = 0  # decided in the current slot
        self._in_flight = 0  # decided and not yet observed
        self._choice: Choice | None = None

    def compile(self, exits: Sequence[ExitInfo], device: LatencyModel, edge: LatencyModel) -> LyapunovPrepared:
        c = compile_candidates(exits, device, edge)
        exit_index = self.exit or c.rank[0][0]
        return LyapunovPrepared(candidates=c, exit=exit_index, actions=Actions.of_exit(c, exit_index))

    def decide(self, view: View) -> Decision | Infeasible:
        prepared, cond = view.prepared, view.conditions
        if not isinstance(prepared, LyapunovPrepared):
            raise PlannerError("lyapunov decides over what its own compile prepared")
        c, exit_index, acts = prepared.candidates, prepared.exit, prepared.actions
        now = cond.now_s
        if now is None or self._slot_start is None or now >= self._slot_start + self.settings.slot_s \
                or self._choice is None:
            slots = 1 if now is None or self._slot_start is None else max(
                1, math.floor((now - self._slot_start) / self.settings.slot_s))
            # the slots that passed without a request count as slots with no arrivals (and no sending)
            idle = (1 - min(self.settings.slot_s / ARRIVAL_TAU_S, 1.0)) ** (slots - 1)
            # the frame queue: the requests decided and not yet finished, and this one
            q = replace(self.queues, frames=float(self._in_flight + 1), bits=cond.uplink_backlog_bytes * 8.0,
                        arrival_rate=self.queues.arrival_rate * idle,
                        quiet_s=self.queues.quiet_s + (slots - 1) * self.settings.slot_s)
            self._choice = choose(self.settings, self.profile, acts, q, cond.bandwidth_bps, float(self._arrivals),
                                  device_speed=cond.device_speed)
            self.queues = self._choice.next
            self._slot_start = now
            self._arrivals = 0
        self._arrivals += 1
        self._in_flight += 1
        ch = self._choice
        plan = fixed_plan(c, cond, exit_index, c.tensors[int(acts.rows[ch.action])])
        slower = plan.device_s * (1 / ch.setting - 1)  # its device part at the chosen share of the CPU
        return replace(plan, device_s=plan.device_s + slower, predicted_s=plan.predicted_s + slower,
                       bound_s=plan.bound_s + slower, feasible=plan.bound_s + slower <= cond.deadline_s,
                       actuation=Actuation(cpu_share=ch.setting, tx_rate_bps=ch.rate_bps or None))

    def observe(self, outcome: Observation) -> None:
        self._in_flight = max(self._in_flight - 1, 0)
