"""A discrete-event simulation of a pipeline plan (simpy): bounded queues, stochastic compute and link times.

It runs a plan the way the executor does (``planner.pipeline``'s period definition): each stage member
computes one frame at a time on its own cores while its downlink receives and its uplink sends other frames;
a sender needs a credit from the receiver before it transmits (``slots`` per sender and receiver: nothing
queues without bound); replicas take frames round-robin; a split stage's members each get the whole input
(published once) and the next stage joins their slices; a hop is the sender's upload, the broker's
per-message cost, then the receiver's download. Every time is the plan's mean times a gamma-distributed
factor with mean 1 and coefficient of variation ``cv``.

simpy is used rather than an event loop of our own: its resources, stores and containers are exactly the
links, queues and credits to model, and it is a well-kept library.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import numpy as np
import simpy

from planner.pipeline import QUEUE_SLOTS, PipelinePlan

WARMUP = 0.1  # the share of frames, at each end, left out of the throughput window


@dataclass(frozen=True, slots=True, kw_only=True)
class SimResult:
    frames: int
    frames_per_s: float  # completions per second between the first and last WARMUP share of frames
    latency_p50_s: float
    latency_p95_s: float
    latency_mean_s: float
    max_inbox: int  # the most frames that waited in any member's inbox (bounded by the credits)
    in_order: bool  # whether results reached the source in frame order (replicas reorder: the executor restores)

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


def simulate(plan: PipelinePlan, *, frames: int = 1000, cv: float = 0.1, seed: int = 0,
             rate: float | None = None, slots: int = QUEUE_SLOTS) -> SimResult:
    """Run ``frames`` frames through ``plan``; ``rate`` frames/s paces the source (None: as fast as credits allow)."""
    return _Sim(plan, frames=frames, cv=cv, seed=seed, rate=rate, slots=slots).run()


class _Sim:
    def __init__(self, plan: PipelinePlan, *, frames: int, cv: float, seed: int, rate: float | None,
                 slots: int) -> None:
        self.plan, self.frames, self.cv, self.rate, self.slots = plan, frames, cv, rate, slots
        self.rng = np.random.default_rng(seed)
        self.env = simpy.Environment()
        env = self.env
        stages = plan.stages
        # member (stage, m): its uplink, downlink, inbox, outbox; credits[(stage, m, sender)] for each sender
        members: list[tuple[Any, int]] = [(s, m) for s, st in enumerate(stages) for m in range(len(st.workers))]
        self.up = {key: simpy.Resource(env) for key in members}
        self.down = {key: simpy.Resource(env) for key in members}
        self.inbox = {key: simpy.Store(env) for key in self.up}
        self.outbox = {key: simpy.Store(env, capacity=slots) for key in self.up}
        self.up[("source", 0)] = simpy.Resource(env)
        self.down[("source", 0)] = simpy.Resource(env)
        self.credits: dict[tuple[Any, ...], simpy.Container] = {}
        self.slices: dict[tuple[Any, ...], int] = {}
        self.started: dict[int, float] = {}
        self.done: list[tuple[int, float]] = []
        self.max_inbox = 0
        self.source_is_first = plan.source in stages[0].workers  # its frames need no hop
        self.source_is_last = plan.source in stages[-1].workers

    def run(self) -> SimResult:
        env = self.env
        for s, st in enumerate(self.plan.stages):
            for m in range(len(st.workers)):
                env.process(self._member(s, m))
                env.process(self._sender(s, m))
        env.process(self._source())
        env.run()
        if len(self.done) != self.frames:
            raise RuntimeError(f"the simulation lost frames: {len(self.done)} of {self.frames} finished")
        times = np.array(sorted(t for _, t in self.done))
        lo, hi = int(self.frames * WARMUP), int(self.frames * (1 - WARMUP)) - 1
        lat = np.array([t - self.started[i] for i, t in self.done])
        order = [i for i, _ in self.done]
        return SimResult(frames=self.frames, frames_per_s=float((hi - lo) / (times[hi] - times[lo])),
                         latency_p50_s=float(np.percentile(lat, 50)), latency_p95_s=float(np.percentile(lat, 95)),
                         latency_mean_s=float(lat.mean()), max_inbox=self.max_inbox,
                         in_order=order == sorted(order))

    def _t(self, mean: float) -> float:
        if mean <= 0:
            return 0.0
        if self.cv <= 0:
            return mean
        shape = 1.0 / self.cv**2
        return float(mean * self.rng.gamma(shape, 1.0 / shape))

    def _targets(self, stage: int, frame: int) -> list[int]:
        st = self.plan.stages[stage]
        if st.mode == "replicas":
            return [frame % len(st.workers)]
        return list(range(len(st.workers)))

    def _credit(self, target: tuple[Any, ...], sender: tuple[Any, ...]) -> simpy.Container:
        key = (*target, *sender)
        if key not in self.credits:
            self.credits[key] = simpy.Container(self.env, capacity=self.slots, init=self.slots)
        return self.credits[key]

    def _source(self) -> Generator[Any, Any, None]:
        for i in range(self.frames):
            if self.rate:
                yield self.env.timeout(1.0 / self.rate)
            sender = ("source", 0)
            targets = [(0, m) for m in self._targets(0, i)]
            for t in targets:
                yield self._credit(t, sender).get(1)
            self.started[i] = self.env.now
            if self.source_is_first:
                for t in targets:
                    self._arrive(t, sender, i)
                continue
            with self.up[sender].request() as req:
                yield req
                yield self.env.timeout(self._t(self.plan.source_send_s))
            for t in targets:
                self.env.process(self._deliver(t, sender, i))

    def _deliver(self, target: tuple[Any, ...], sender: tuple[Any, ...], frame: int) -> Generator[Any, Any, None]:
        yield self.env.timeout(self._t(self.plan.per_message_s))
        s, m = target
        with self.down[target].request() as req:
            yield req
            if s == "source":
                yield self.env.timeout(self._t(self.plan.result_receive_s))
            else:
                yield self.env.timeout(self._t(self.plan.stages[s].receive_s[m]))
        self._arrive(target, sender, frame)

    def _arrive(self, target: tuple[Any, ...], sender: tuple[Any, ...], frame: int) -> None:
        """A frame (or one slice of it) reached ``target``; a split stage's slices are joined first."""
        s, _ = target
        prev = self.plan.stages[-1] if s == "source" else self.plan.stages[s - 1] if s > 0 else None
        need = len(prev.workers) if prev is not None and prev.mode == "split" else 1
        key = (*target, frame)
        got = self.slices.pop(key, 0) + 1
        if got < need:
            self.slices[key] = got
            return
        if s == "source":
            self.done.append((frame, self.env.now))
            return
        senders = [(s - 1, m) for m in range(need)] if need > 1 else [sender]
        box = self.inbox[target]
        box.put((frame, senders))
        self.max_inbox = max(self.max_inbox, len(box.items))

    def _member(self, s: int, m: int) -> Generator[Any, Any, None]:
        st = self.plan.stages[s]
        while True:
            frame, from_members = yield self.inbox[(s, m)].get()
            for sender in from_members:
                yield self._credit((s, m), sender).put(1)
            yield self.env.timeout(self._t(st.compute_s[m]))
            yield self.outbox[(s, m)].put(frame)

    def _sender(self, s: int, m: int) -> Generator[Any, Any, None]:
        st = self.plan.stages[s]
        me = (s, m)
        last = s == len(self.plan.stages) - 1
        while True:
            frame = yield self.outbox[me].get()
            targets = [("source", 0)] if last else [(s + 1, t) for t in self._targets(s + 1, frame)]
            if last and self.source_is_last:
                self._arrive(targets[0], me, frame)
                continue
            if not last:
                for t in targets:
                    yield self._credit(t, me).get(1)
            with self.up[me].request() as req:
                yield req
                yield self.env.timeout(self._t(st.send_s[m]))
            for t in targets:
                self.env.process(self._deliver(t, me, frame))
