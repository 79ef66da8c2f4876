"""The Lyapunov controller (CutEdge's drift-plus-penalty): per time slot, the cut, compute setting and transmit
rate that minimise V x energy + the drift of the queues.

Queues, in a slot of ``slot_s`` seconds (the fluid model the simulation and the policy share):

    frames   Q' = Q - served + arrivals           served = min(Q, slot x setting / head time)      (frames)
    transmit T' = T + served x cut bits - sent     sent = min(T + served x cut bits, rate x slot)  (bits)
    latency  Z' = max(Z + W' - latency target, 0)  W' = (Q' + T' / input bits) / arrival rate       (seconds)
    rate     Y' = max(Y + min throughput x slot - served, 0)                                      (frames)

(a head computed in a slot is sent in the same slot; W' is Little's law: the backlog in frames over the
arrival rate, the mean time a frame now waits). Besides every (cut, setting, rate) a slot may *hold*: compute
and send nothing, the frames waiting to go with a later slot's.

Radio energy is the energy spent, given the radio's state (``Queues.quiet_s``, the time since its last send):
a send costs its time on the air and the tail it adds, min(quiet, tail) x tail power (``planner.energy``): its
extension while the radio is up, the whole tail when it wakes it. Two things keep the one-slot view from
misjudging that. Holding is the only way to wait for free (without it the cheapest wait was computing a sliver
of a frame on the device, which burnt energy while frames piled up); it is an option only on a radio with a
tail, where the best other action sends or computes slower than frames arrive. And while frames come faster than
the device could afford them, the radio being up is worth their arrival rate x the device's cheapest frame less
the tail power: a send's extension is charged less that (never below nothing).

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

from planner.candidates import Stateless, compile_candidates, costs_of, plan_at
from planner.core import (
    Actuation,
    Candidates,
    Decision,
    ExitInfo,
    Infeasible,
    Observation,
    Prepared,
    View,
)
from planner.energy import DEFAULT_PROFILE, PROFILES, EnergyProfile
from planner.errors import PlannerError
from planner.latency import LatencyModel

RATE_FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # transmit rates tried, as shares of the bandwidth estimate
ARRIVAL_TAU_S = 60.0  # time constant of the arrival-rate estimate (Little's law needs the long-run rate)
TINY = 1e-9
MIN_HOLD_S = 0.001  # a hold lasts at least this long (the next slot may start any moment)


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

    @property
    def hold(self) -> int:
        """The index of the action that neither computes nor sends this slot (frames wait for a later one)."""
        return int(self.head_s.size)

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
    elapsed_s: float = 0.0  # since the first slot: the arrival rate is a plain mean until ARRIVAL_TAU_S has passed


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
    cut, setting, rate = np.meshgrid(np.arange(acts.hold + 1), settings, rates, indexing="ij")
    ev = _evaluate(s, profile, acts, q, cut, setting, rate, bandwidth_bps, arrivals, device_speed)
    objective = s.v * (ev["compute"] + ev["radio_cost"]) + ev["drift"]
    # holding frames saves energy only by sending them together later (fewer wakes of the radio, or letting it
    # sleep between batches): an option on a radio with a tail, where the best other action sends or computes on
    # the device slower than frames arrive (they will be sent in the end); not where the device keeps up (a frame
    # costs it the same later), nor on a radio without a tail (sending costs the same per bit whenever)
    others = np.where(cut == acts.hold, np.inf, objective)
    best_other = np.unravel_index(int(np.argmin(others)), cut.shape)
    best = np.unravel_index(int(np.argmin(objective)), cut.shape)
    keeps_up = ev["capacity"][best_other] >= q.arrival_rate * s.slot_s
    if cut[best] == acts.hold and (profile.radio_tail_s <= 0 or (ev["sent"][best_other] <= 0 and keeps_up)):
        best = best_other
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
    hold = cut == acts.hold
    at = np.minimum(cut, acts.hold - 1)
    head = acts.head_s[at] * device_speed
    capacity = np.where(hold, 0.0, np.where(head > 0, s.slot_s * setting / np.maximum(head, TINY), np.inf))
    served = np.minimum(q.frames, capacity)
    ready = q.bits + served * acts.bits[at]
    sent = np.where(hold, 0.0, np.minimum(ready, rate * s.slot_s))
    frames = q.frames - served + arrivals
    bits = ready - sent
    arrival_rate = max(q.arrival_rate, arrivals / s.slot_s, 1.0 / ARRIVAL_TAU_S)
    wait = (frames + bits / acts.input_bits) / arrival_rate
    z = np.maximum(q.latency + wait - s.latency_target_s, 0.0)
    y = np.maximum(q.throughput + s.min_throughput * s.slot_s - served, 0.0)
    compute = profile.compute_j(served * head, setting)
    busy = sent > 0
    tx_s = np.where(busy, sent / np.maximum(rate, 1.0), 0.0)
    # the radio's energy as spent, given its state: a send keeps the radio up for a whole tail from now, which
    # adds min(quiet, tail) seconds to the time it is up (the radio was up, or asleep, ``quiet_s`` after its last
    # send): while it is up a send costs the tail it extends, waking it costs the whole tail. Summed over slots it
    # is the tail energy spent (the last tail aside)
    sending = np.where(busy, profile.send_j(sent, np.maximum(rate, 1.0)), 0.0)
    tail = np.where(busy, profile.radio_tail_w * np.minimum(q.quiet_s, profile.radio_tail_s), 0.0)
    # what keeping the radio up is worth while frames come faster than the device could afford them: each frame
    # expected within the extension would cost the device ``local_j`` instead of being sent (a one-slot view sees
    # the extension's cost and not this, and computes frames on the device that are cheaper to send)
    local = acts.bits == 0
    local_j = float(np.min(profile.compute_j(float(acts.head_s[local].min()) * device_speed,
                                             np.asarray(profile.settings)))) if local.any() else 0.0
    worth_w = min(max(q.arrival_rate * local_j - profile.radio_tail_w, 0.0), profile.radio_tail_w)
    tail_cost = tail * (1.0 - worth_w / profile.radio_tail_w) if profile.radio_tail_w > 0 else tail
    drift = 0.5 * ((frames + bits / acts.input_bits) ** 2 + z**2 + y**2)
    # the mean rate so far while the run is young (a minute-long average starting from 0 would read a steady
    # 1 frame/s as a trickle for its first minute), then a moving average over ARRIVAL_TAU_S
    alpha = min(max(s.slot_s / ARRIVAL_TAU_S, s.slot_s / (q.elapsed_s + s.slot_s)), 1.0)
    new_rate = (1 - alpha) * q.arrival_rate + alpha * arrivals / s.slot_s
    return {"served": served, "sent": sent, "frames": frames, "bits": bits, "z": z, "y": y, "compute": compute,
            "radio": sending + tail, "radio_cost": sending + tail_cost, "drift": drift, "capacity": capacity,
            "quiet": np.where(busy, s.slot_s - tx_s, q.quiet_s + s.slot_s),
            "arrival_rate": np.full_like(served, new_rate), "elapsed": np.full_like(served, q.elapsed_s + s.slot_s)}


def _choice(ev: dict[str, npt.NDArray[np.float64]], at: tuple[Any, ...], action: int, setting: float,
            rate_bps: float) -> Choice:
    return Choice(action=action, setting=setting, rate_bps=rate_bps, served=float(ev["served"][at]),
                  sent_bits=float(ev["sent"][at]), compute_j=float(ev["compute"][at]), radio_j=float(ev["radio"][at]),
                  next=Queues(frames=float(ev["frames"][at]), bits=float(ev["bits"][at]), latency=float(ev["z"][at]),
                              throughput=float(ev["y"][at]), arrival_rate=float(ev["arrival_rate"][at]),
                              quiet_s=float(ev["quiet"][at]), elapsed_s=float(ev["elapsed"][at])))


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
        """This slot's action for the request: a route with its CPU share and rate, or a hold until the next slot
        (the request is decided again then, ``Conditions.held_s`` > 0; it is not a new arrival)."""
        prepared, cond = view.prepared, view.conditions
        if not isinstance(prepared, LyapunovPrepared):
            raise PlannerError("lyapunov decides over what its own compile prepared")
        c, acts = prepared.candidates, prepared.actions
        now, arrival = cond.now_s, cond.held_s == 0
        if now is None or self._slot_start is None or now >= self._slot_start + self.settings.slot_s \
                or self._choice is None:
            slots = 1 if now is None or self._slot_start is None else max(
                1, math.floor((now - self._slot_start) / self.settings.slot_s))
            # the slots that passed without a request count as slots with no arrivals (and no sending)
            idle = (1 - min(self.settings.slot_s / ARRIVAL_TAU_S, 1.0)) ** (slots - 1)
            # the frame queue: the requests decided (or held) and not yet finished, and this one if it is new
            q = replace(self.queues, frames=float(self._in_flight + arrival), bits=cond.uplink_backlog_bytes * 8.0,
                        arrival_rate=self.queues.arrival_rate * idle,
                        quiet_s=self.queues.quiet_s + (slots - 1) * self.settings.slot_s,
                        elapsed_s=self.queues.elapsed_s + (slots - 1) * self.settings.slot_s)
            self._choice = choose(self.settings, self.profile, acts, q, cond.bandwidth_bps, float(self._arrivals),
                                  device_speed=cond.device_speed)
            self.queues = self._choice.next
            self._slot_start = now
            self._arrivals = 0
        if arrival:
            self._arrivals += 1
            self._in_flight += 1
        ch, costs = self._choice, costs_of(c, cond)
        if ch.action == acts.hold:
            wait = self.settings.slot_s if now is None or self._slot_start is None else max(
                self._slot_start + self.settings.slot_s - now, MIN_HOLD_S)
            # the exit's fastest plan now, at full speed and rate (Edgent's choice for it): what runs after the hold,
            # or now if the request cannot wait
            fastest = plan_at(c, int(acts.rows[np.argmin(costs[0][acts.rows])]), costs, cond)
            if wait + fastest.bound_s <= cond.deadline_s:  # held to go with the frames of a later slot
                return replace(fastest, actuation=Actuation(hold_s=wait))
            return replace(fastest, actuation=Actuation(cpu_share=1.0, tx_rate_bps=None))  # it cannot wait
        plan = plan_at(c, int(acts.rows[ch.action]), costs, cond)
        slower = plan.device_s * (1 / ch.setting - 1)  # its device part at the chosen share of the CPU
        return replace(plan, device_s=plan.device_s + slower, predicted_s=plan.predicted_s + slower,
                       bound_s=plan.bound_s + slower, feasible=plan.bound_s + slower <= cond.deadline_s,
                       actuation=Actuation(cpu_share=ch.setting, tx_rate_bps=ch.rate_bps or None))

    def observe(self, outcome: Observation) -> None:
        self._in_flight = max(self._in_flight - 1, 0)

