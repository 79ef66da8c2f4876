"""The device side of co-inference: plan, run the head, offload the rest, fall back locally in time.

``Device`` is the request path; it owns its parts and nothing outside writes their state:
``LinkEstimator`` (``link.py``: estimates, probes, caps, late answers), ``Calibration`` (``learning.py``: speed
factor and margins), ``Dispatch`` (``dispatch.py``: MQTT requests, probes, replies), ``Router`` (``inbound.py``:
every inbound message, decoded once and handed to its part) and the policy that plans (``planner.policies``, chosen
by name in the config; the engine calls only the seam: what the policy prepared per edge, ``decide``, ``observe``;
its local plans are the shared costing's, ``planner.candidates``).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from deviced.actuation import Actuator
from deviced.config import DevicedConfig
from deviced.dispatch import Dispatch
from deviced.edges import EdgeDirectory, EdgeView
from deviced.errors import BrokerLost
from deviced.inbound import Channel, Inbound, Router
from deviced.learning import Calibration
from deviced.link import LinkEstimator
from deviced.metrics import DeviceMetrics
from deviced.stages import StageWorker
from deviced.stream import Stream, StreamResult
from models.bundle import Bundle
from models.runtime import Stage, StageRunner
from planner import bandwidth, candidates
from planner.core import (
    DEVICE,
    EDGE,
    Conditions,
    Decision,
    Infeasible,
    Observation,
    Planner,
    Segment,
    View,
    Where,
    allow_encodings,
)
from planner.fleet import Fleet, chain_from_exit
from planner.latency import LatencyModel
from planner.units import parse_bandwidth
from protocol.messages import (
    STAGE_INBOX,
    STREAM_INBOX,
    Advert,
    ErrorReply,
    InferRequest,
    InferResult,
    ProbeReply,
    StageAck,
    StageError,
    StageResult,
    Status,
    encode,
)
from protocol.topics import Topics

log = structlog.get_logger()
# A planned answer due later than this share of the local cut-off is not given up on at the cut-off
ANSWER_SLACK = 1.1


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """How one request ended: its answer, where it was computed, and predicted vs measured times."""

    request_id: str
    logits: npt.NDArray[np.float32]
    exit: int
    where: str  # device | edge | split | fallback
    plan: Decision
    edge_id: str | None
    fallback: str | None  # why the edge part was abandoned: timeout, broker, no_edge or an edge error code
    latency_s: float
    deadline_s: float
    bandwidth_bps: float  # estimate used for the plan
    stage_s: float = 0.0  # measured: time in device stages (head, tail or local)
    edge_s: float | None = None  # measured by the edge: its queue + compute (None: no answer used)

    @property
    def met(self) -> bool:
        return self.latency_s <= self.deadline_s

    def record(self) -> dict[str, Any]:
        """The per-request record (logged as ``request_done``)."""
        return {"request_id": self.request_id, "exit": self.exit, "where": self.where, "edge_id": self.edge_id,
                "fallback": self.fallback, "latency_s": round(self.latency_s, 6), "deadline_s": self.deadline_s,
                "met": self.met, "bandwidth_bps": round(self.bandwidth_bps), "stage_s": round(self.stage_s, 6),
                "edge_s": None if self.edge_s is None else round(self.edge_s, 6), "plan": self.plan.to_json()}


@dataclass(frozen=True, slots=True)
class _Request:
    request_id: str
    feed: Mapping[str, npt.NDArray[Any]]  # the model input
    start: float
    deadline_s: float
    link: bandwidth.LinkEstimate
    policy: Planner
    conditions: Conditions  # what the device knew when it arrived (built once)

    def left_s(self) -> float:
        return self.deadline_s - (time.monotonic() - self.start)


class Device:
    """One device's co-inference engine; ``dispatch.attach`` gives it an MQTT client."""

    def __init__(self, cfg: DevicedConfig, *, bundle: Bundle, runner: StageRunner, device_model: LatencyModel,
                 metrics: DeviceMetrics | None = None) -> None:
        self.cfg = cfg
        self.bundle = bundle
        self.runner = runner
        self.topics = Topics(cfg.topic_prefix)
        self.metrics = metrics or DeviceMetrics()
        self.policy = cfg.make_policy(bundle.exits)
        # the device's own plans (no edge, or a local finish): every exit, costed on the device alone
        self.local = candidates.compile_candidates(bundle.exits, device_model, device_model)
        self.edges = EdgeDirectory(digest=bundle.digest, exits=allow_encodings(bundle.exits, cfg.encodings),
                                   device_model=device_model, policy=self.policy, wanted=cfg.edge_id)
        self.link = LinkEstimator(parse_bandwidth(cfg.initial_bandwidth), cfg.probe_sizes, self.metrics)
        self.learning = Calibration(cfg.plan_quantile, self.metrics)
        self.dispatch = Dispatch(device_id=cfg.device_id, topics=self.topics, edges=self.edges,
                                 id_prefix=f"{cfg.device_id}-{os.getpid()}-{int(time.time()) % 100000}",
                                 on_late_result=self._late_answer,
                                 emulated_uplink_bps=parse_bandwidth(cfg.emulate_uplink) if cfg.emulate_uplink else 0.0)
        # the quickest way to any answer, as modelled (at the device model's speed)
        self._fastest_local_s = float(self.local.device_s[~self.local.uses_edge].min())
        # what a request carries besides its tensors, until requests measure it: an envelope around one number
        envelope = encode(InferRequest(request_id=self.dispatch.new_id(), device_id=cfg.device_id,
                                       bundle=bundle.digest, exit=1, cut=0,
                                       tensors={bundle.input_name: np.zeros(1, np.float32)}, budget_s=1.0))
        self.link.request_sent(self.dispatch.request(cfg.edge_id or "edge", self.dispatch.new_id(), envelope,
                                                     expiry_s=1.0).wire_bytes, 4.0)
        self.actuator = Actuator(mode=cfg.compute_knob)  # applies a decision's CPU share and transmit rate
        # one device stage at a time, in arrival order (asyncio.Lock is FIFO): concurrent stages would share the
        # CPU and all finish late, and every latency model (Edgent's, the Lyapunov controller's) assumes a queue
        self._cpu = asyncio.Lock()
        # pipelined streams: this device as a worker of anyone's stream, and as the owner of its own
        self.stages = StageWorker(worker_id=cfg.device_id, topics=self.topics, digest=bundle.digest, runner=runner,
                                  run_stage=self.run_stage, publish=self.dispatch.publish, metrics=self.metrics)
        self.streams: dict[str, Stream] = {}
        # every inbound message, decoded once and routed by (channel, type); the session adds the applications'
        self.router = Router(self.topics, cfg.device_id)
        self.router.on(Channel.EDGE_STATUS, Status, handler=self.edges.on_status)
        self.router.on(Channel.EDGE_ADVERT, Advert, handler=self.edges.on_advert)
        self.router.on(Channel.RESPONSES, InferResult, ErrorReply, ProbeReply, handler=self.dispatch.on_reply)
        self.router.on(Channel.STAGE, *STAGE_INBOX, handler=self.stages.on_message)
        self.router.on_reject(Channel.STAGE, self.stages.on_rejected)
        self.router.on(Channel.STREAM, *STREAM_INBOX, handler=self.on_stream_message)
        self.router.on(Channel.DEVICE_STATUS, Status, handler=self.on_device_status)

    # ---- pipelined streams ----------------------------------------------------------------------
    async def stream(self, frames: Any, fleet: Fleet, *, exit_index: int | None = None, method: str | None = None,
                     on_start: Any = None) -> AsyncIterator[StreamResult]:
        """Stream ``frames`` (model inputs) through a pipeline over ``fleet`` (this device its source): one
        ``StreamResult`` per frame, in order (``deviced/stream.py``). ``on_start`` gets the ``Stream``."""
        info = self.bundle.exit(exit_index or len(self.bundle.exits))
        stream = Stream(stream_id=self.dispatch.new_id("s"), owner=self.cfg.device_id, topics=self.topics,
                        digest=self.bundle.digest, chain=chain_from_exit(info), exit_index=info.index,
                        input_name=self.bundle.input_name, output_name=info.output,
                        input_shape=tuple(self.bundle.input_shape), fleet=fleet, publish=self.dispatch.publish,
                        metrics=self.metrics, method=method)
        self.streams[stream.stream_id] = stream
        if on_start is not None:
            on_start(stream)
        try:
            async for result in stream.run(frames):
                yield result
        finally:
            del self.streams[stream.stream_id]

    def on_stream_message(self, inbound: Inbound) -> None:
        """A worker's ack, result or error for one of this device's streams."""
        msg = inbound.message
        assert isinstance(msg, StageResult | StageAck | StageError)
        stream = self.streams.get(msg.stream_id)
        if stream is None:
            log.info("stream_message_unclaimed", sender=inbound.sender, stream_id=msg.stream_id, kind=msg.kind)
            return
        stream.on_message(inbound.sender, msg)

    def on_device_status(self, inbound: Inbound) -> None:
        """Another device's retained status: a stream's owner watches its workers."""
        assert isinstance(inbound.message, Status)
        for stream in self.streams.values():
            stream.on_status(inbound.sender, inbound.message)

    # ---- requests -------------------------------------------------------------------------------
    async def infer(self, x: npt.NDArray[np.float32], deadline_s: float, *,
                    policy: Planner | None = None) -> Outcome:
        """Answer one input within ``deadline_s`` if possible; always ends with a result.

        ``policy`` replaces the configured one for this request (experiments: the baselines, a forced plan).
        """
        start = time.monotonic()
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(self.bundle.input_shape)
        policy = policy or self.policy
        edge = self.edges.choose(start) if self.dispatch.connected else None
        link = self.link.current(start)
        req = _Request(request_id=self.dispatch.new_id(), feed={self.bundle.input_name: x}, start=start,
                       deadline_s=deadline_s, link=link, policy=policy,
                       conditions=self._conditions(start, deadline_s, link, edge))
        prepared = self.edges.prepared(edge, policy) if edge is not None else None
        if edge is None or prepared is None:
            return await self._finish_local(req, self._local_plan(req.conditions), None, "no_edge")
        decision = policy.decide(View(prepared=prepared, conditions=req.conditions))
        while isinstance(decision, Decision) and decision.actuation is not None and decision.actuation.hold_s:
            # the policy holds the request (to send it with later ones): wait, then have it decide again
            await asyncio.sleep(decision.actuation.hold_s)
            self.metrics.held.inc(decision.actuation.hold_s)
            now = time.monotonic()
            link = self.link.current(now)
            req = replace(req, link=link, conditions=replace(self._conditions(now, max(req.left_s(), 1e-3), link, edge),
                                                             held_s=now - req.start))
            decision = policy.decide(View(prepared=prepared, conditions=req.conditions))
        if isinstance(decision, Infeasible):  # nothing meets the deadline: what the policy runs anyway
            decision = decision.best_effort or self._local_plan(req.conditions)
        if not decision.feasible:  # said: counted, and the outcome's plan is marked so
            self.metrics.unmeetable.inc()
        self._observe_plan(decision)
        if decision.actuation is not None:
            self.actuator.apply(decision.actuation, self.dispatch.socket())
            self.metrics.cpu_share.set(self.actuator.share or 1.0)
            self.metrics.tx_rate.set(self.actuator.rate_bps or 0.0)
        if decision.where == Where.DEVICE:
            return await self._finish_local(req, decision, None, None)
        tensors, head_s = req.feed, 0.0
        if (head := decision.step(DEVICE)) is not None:
            tensors, head_s = await self._timed_stage(head.segment, req.feed, decision)
        try:
            reply, crossing, sent_at = await self._offload(req, edge, decision, tensors)
        except BrokerLost as exc:  # not evidence about the edge or the link: no strike, cap or margin sample
            log.warning("offload_broker_lost", request_id=req.request_id, error=str(exc))
            return await self._fallback(req, tensors, decision, edge.edge_id, "broker", head_s)
        except TimeoutError:
            self.edges.on_timeout(edge.edge_id, time.monotonic())
            return await self._fallback(req, tensors, decision, edge.edge_id, "timeout", head_s)
        if isinstance(reply, ErrorReply):
            return await self._fallback(req, tensors, decision, edge.edge_id, reply.code.value, head_s)
        edge_s = reply.queue_s + reply.compute_s
        self.link.transfer(crossing, time.monotonic() - sent_at - edge_s)
        edge.speed = edge.speed.update(reply.compute_s, decision.modelled.tail_s)
        self.metrics.speed.labels(edge.edge_id).set(edge.speed.value)
        return self._done(req, next(iter(reply.outputs.values())), decision.exit, decision.where.value, decision,
                          edge.edge_id, None, stage_s=head_s, edge_s=edge_s)

    async def prepare(self, policy: Planner) -> None:
        """Have ``policy`` (an override of the configured one) prepare for the edge a request would use now, off the
        event loop; otherwise its first request there prepares it."""
        edge = self.edges.choose(time.monotonic())
        if edge is not None:
            await asyncio.to_thread(self.edges.prepared, edge, policy)

    async def probe(self, edge_id: str) -> bandwidth.LinkEstimate | None:
        """Probe the uplink to ``edge_id`` (``LinkEstimator.probe``); None when nothing was learned."""
        if not self.dispatch.connected:
            return None
        try:
            return await self.link.probe(edge_id, lambda size: self.dispatch.probe(edge_id, size),
                                         self.dispatch.uplink_backlog())
        except BrokerLost:
            return None

    async def run_stage(self, stage: Stage,
                        feed: Mapping[str, npt.NDArray[Any]]) -> tuple[dict[str, npt.NDArray[Any]], float]:
        """Run a stage off the event loop once the device's earlier stages are done: (outputs, seconds it ran, the
        wait for the CPU not counted). With ``emulate_slowdown`` > 1 stretch it like a slower CPU."""
        async with self._cpu:
            start = time.monotonic()
            out = await asyncio.to_thread(stage.run, feed)
            if self.cfg.emulate_slowdown > 1.0:
                await asyncio.sleep((self.cfg.emulate_slowdown - 1.0) * (time.monotonic() - start))
            return out, time.monotonic() - start

    # ---- the request path, private --------------------------------------------------------------
    async def _offload(self, req: _Request, edge: EdgeView, decision: Decision,
                       tensors: Mapping[str, npt.NDArray[Any]]) -> tuple[InferResult | ErrorReply, int, float]:
        """Send the cut tensors and wait no longer than local completion still allows: (answer, bytes that had to
        cross, sent at). TimeoutError or BrokerLost when no answer can be used."""
        left = req.left_s()
        payload = encode(InferRequest(request_id=req.request_id, device_id=self.cfg.device_id,
                                      bundle=self.bundle.digest, exit=decision.exit, cut=decision.cut,
                                      tensors=tensors, budget_s=max(left, 0.0), encoding=decision.encoding))
        # the bytes that must cross before an answer can come: ours (on the wire) and what is still queued ahead
        request = self.dispatch.request(edge.edge_id, req.request_id, payload, expiry_s=left)
        self.link.request_sent(request.wire_bytes, decision.modelled.up_bytes)
        crossing = self.dispatch.uplink_backlog() + request.wire_bytes
        sent_at = time.monotonic()
        # the quickest local way out: the rest of this exit from the cut, or the fastest exit from scratch
        finish_local = min(decision.modelled.rest_s, self._fastest_local_s) * self.learning.device_speed.value
        cutoff = req.deadline_s - finish_local  # after this, no local way meets the deadline
        due = decision.bound_s * ANSWER_SLACK  # when the answer is expected, with slack
        # an answer due too close to the cut-off to give up on it there is the best way left: it gets until the
        # deadline, or (a plan predicted past the deadline: nothing meets it) until it is due, unless a local
        # finish started at the deadline would end sooner
        last = max(req.deadline_s, min(due, req.deadline_s + finish_local))
        elapsed = time.monotonic() - req.start
        # the wait covers the upload too: the request's own bytes count against its deadline
        wait = (cutoff if elapsed < cutoff and cutoff > due else last) - elapsed
        try:
            reply = await self.dispatch.infer(request, timeout_s=wait)
        except TimeoutError:  # evidence too: these bytes did not make it there and back in the time waited
            self.link.unanswered(req.request_id, crossing, sent_at, time.monotonic())
            raise
        return reply, crossing, sent_at

    async def _fallback(self, req: _Request, tensors: Mapping[str, npt.NDArray[Any]], decision: Decision,
                        edge_id: str, reason: str, head_s: float) -> Outcome:
        """Finish locally: the rest of the route from the cut, or an earlier exit from scratch."""
        self.metrics.fallbacks.labels(reason).inc()
        left = req.left_s()
        rest = decision.modelled.rest_s * self.learning.device_speed.value
        local = self._local_plan(req.conditions, left)
        if rest <= left or (not local.feasible and rest <= local.predicted_s):
            remote = decision.step(EDGE)
            assert remote is not None
            out, took = await self.run_stage(self.runner.stage(remote.segment), tensors)
            exit_index, modelled = decision.exit, decision.modelled.rest_s
        else:
            out, took = await self.run_stage(self.runner.stage(self.runner.whole(local.exit)), req.feed)
            exit_index, modelled = local.exit, local.modelled.head_s
        # a local run is a measurement of the device like any other: fallbacks teach its speed too
        self.learning.device_stage(took, modelled / (self.actuator.share or 1.0))
        return self._done(req, next(iter(out.values())), exit_index, "fallback", decision, edge_id, reason,
                          stage_s=head_s + took)

    async def _finish_local(self, req: _Request, decision: Decision, edge_id: str | None,
                            reason: str | None) -> Outcome:
        if reason:
            self.metrics.fallbacks.labels(reason).inc()
        out, stage_s = await self._timed_stage(self.runner.whole(decision.exit), req.feed, decision)
        return self._done(req, next(iter(out.values())), decision.exit, Where.DEVICE.value, decision, edge_id,
                          reason, stage_s=stage_s)

    def _conditions(self, now: float, deadline_s: float, link: bandwidth.LinkEstimate,
                    edge: EdgeView | None) -> Conditions:
        """What the device knows now, for one request (with ``edge``: the edge it would use)."""
        return Conditions(bandwidth_bps=link.bandwidth_bps, deadline_s=deadline_s, rtt_s=link.rtt_s,
                          edge_queue_s=edge.queue_wait_s if edge else 0.0,
                          uplink_backlog_bytes=self.dispatch.uplink_backlog(),
                          message_bytes=self.link.message_bytes, free_bytes=link.free_bytes,
                          device_speed=self.learning.device_speed.value,
                          edge_speed=edge.speed.value if edge else 1.0,
                          device_margin_s=self.learning.device_margin.value,
                          remote_margin=self.learning.remote_margin.value, now_s=now)

    def _local_plan(self, cond: Conditions, left_s: float | None = None) -> Decision:
        """The most accurate exit that fits on the device alone (in ``left_s``, default: the whole deadline), else
        the fastest one (flagged infeasible)."""
        left = cond.deadline_s if left_s is None else left_s
        return candidates.local_plan(self.local, replace(cond, deadline_s=max(left, 1e-9)))

    async def _timed_stage(self, segment: Segment, feed: Mapping[str, npt.NDArray[Any]],
                           decision: Decision) -> tuple[dict[str, npt.NDArray[Any]], float]:
        """Run ``decision``'s device stage (a head, or a whole exit; its session built first, untimed); fold its time
        into the device's speed factor."""
        out, took = await self.run_stage(self.runner.stage(segment), feed)
        # the model is of the full CPU: at a policy's share of it the stage is expected to take longer, not the
        # device to have become slower
        self.learning.device_stage(took, decision.modelled.head_s / (self.actuator.share or 1.0))
        return out, took

    def _done(self, req: _Request, logits: npt.NDArray[Any], exit_index: int, where: str, decision: Decision,
              edge_id: str | None, reason: str | None, *, stage_s: float, edge_s: float | None = None) -> Outcome:
        outcome = Outcome(request_id=req.request_id, logits=np.asarray(logits), exit=exit_index, where=where,
                          plan=decision, edge_id=edge_id, fallback=reason, latency_s=time.monotonic() - req.start,
                          deadline_s=req.deadline_s, bandwidth_bps=req.link.bandwidth_bps, stage_s=stage_s,
                          edge_s=edge_s)
        self.metrics.latency.observe(outcome.latency_s)
        self.metrics.deadline.set(req.deadline_s)
        self.metrics.deadline_ratio.observe(outcome.latency_s / req.deadline_s if req.deadline_s > 0 else float("inf"))
        self.metrics.requests.labels(where).inc()
        if not outcome.met:
            self.metrics.deadline_misses.inc()
        self.learning.outcome(where=where, fallback=reason, latency_s=outcome.latency_s, stage_s=stage_s,
                              predicted_s=decision.predicted_s, predicted_device_s=decision.device_s)
        req.policy.observe(Observation(decision=decision, latency_s=outcome.latency_s, deadline_s=req.deadline_s,
                                       device_s=stage_s, edge_s=edge_s, fallback=reason))
        log.debug("request_done", **outcome.record())  # per request: metrics carry the rates
        return outcome

    def _observe_plan(self, decision: Decision) -> None:
        self.metrics.exit.set(decision.exit)
        self.metrics.cut.set(decision.cut)
        self.metrics.accuracy.set(decision.accuracy)

    def _late_answer(self, result: InferResult) -> None:
        self.link.late_answer(result.request_id, result.queue_s + result.compute_s, time.monotonic())
