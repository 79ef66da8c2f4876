"""The device side of co-inference: plan, run the head, offload the rest, fall back locally in time."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import aiomqtt
import numpy as np
import numpy.typing as npt
import structlog

from deviced.config import DevicedConfig
from deviced.edges import EdgeDirectory, EdgeView
from deviced.metrics import DeviceMetrics
from models.bundle import Bundle
from models.runtime import HEAD, TAIL, Stage, StageRunner
from planner import bandwidth, edgent
from planner.latency import LatencyModel, Margin, SpeedFactor
from planner.units import parse_bandwidth
from protocol import session
from protocol.errors import ProtocolError
from protocol.messages import (
    Advert,
    ErrorReply,
    InferRequest,
    InferResult,
    Message,
    Probe,
    ProbeReply,
    Status,
    decode,
    encode,
)
from protocol.topics import Topics

log = structlog.get_logger()
PROBE_TIMEOUT_S = 2.0
PROBE_TARGET_S = 0.05  # the large probe is sized to take about this long at the current estimate
PROBE_MIN_SIGNAL_S = 0.01  # below this extra time for its extra bytes, a probe pair says nothing
PROBE_MAX_BYTES = 64 * 1024
PROBE_IDLE_BYTES = 1500  # an uplink with no more than a packet of ours unacknowledged is idle enough to probe
# An unanswered transfer caps the estimate, but it is a guess (the path may just have stalled): the cap holds
# this long, then the last measured estimate comes back and the edge is tried again.
CAP_HOLD_S = 5.0
# A planned answer due later than this share of the local cut-off is not given up on at the cut-off
ANSWER_SLACK = 1.1
LATE_REMEMBERED = 256  # given-up requests whose late answers still count as transfer samples
Policy = Callable[[edgent.Candidates, edgent.Conditions], edgent.Plan]


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """How one request ended: its answer, where it was computed, and predicted vs measured times."""

    request_id: str
    logits: npt.NDArray[np.float32]
    exit: int
    where: str  # device | edge | split | fallback
    plan: edgent.Plan
    edge_id: str | None
    fallback: str | None  # why the edge part was abandoned
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


class Device:
    """One device's co-inference engine; ``attach`` gives it an MQTT client, ``handle`` feeds it messages."""

    def __init__(self, cfg: DevicedConfig, *, bundle: Bundle, runner: StageRunner, device_model: LatencyModel,
                 metrics: DeviceMetrics | None = None) -> None:
        self.cfg = cfg
        self.bundle = bundle
        self.runner = runner
        self.topics = Topics(cfg.topic_prefix)
        self.metrics = metrics or DeviceMetrics()
        self.exits = edgent.exits_from_manifest(bundle.manifest)
        self.local = edgent.compile_candidates(self.exits, device_model, device_model)
        self.edges = EdgeDirectory(digest=bundle.digest, exits=self.exits, device_model=device_model,
                                   wanted=cfg.edge_id)
        self.link = bandwidth.LinkEstimate(bandwidth_bps=parse_bandwidth(cfg.initial_bandwidth))
        self.client: aiomqtt.Client | None = None
        self._pending: dict[str, asyncio.Future[Message]] = {}
        self._ids = itertools.count()
        self._prefix = f"{cfg.device_id}-{os.getpid()}-{int(time.time()) % 100000}"
        self._uplink = asyncio.Lock()
        self._emulated_bps = parse_bandwidth(cfg.emulate_uplink) if cfg.emulate_uplink else 0.0
        self.device_speed = SpeedFactor()  # this device's stage times against its latency model, learned online
        # how far requests ran over their predictions: the device's part, and the rest (link and edge)
        self.device_margin = Margin(cfg.plan_quantile, relative=False)  # seconds: CPU time comes in slices
        self.remote_margin = Margin(cfg.plan_quantile)  # a factor: a link's errors grow with the bytes
        self._fastest_local_s = self._local_plan(0.0).predicted_s or 0.0  # the quickest way to any answer, as modelled
        self._probe_bytes = cfg.probe_sizes[-1]
        self._measured: bandwidth.LinkEstimate | None = None  # the estimate a timeout cap replaced
        self._cap_expires = 0.0
        self._emulated_queued = 0  # with emulate_uplink: bytes waiting in the in-app uplink
        # given-up requests: (bytes to cross, sent at); a late answer still times them
        self._late: dict[str, tuple[int, float]] = {}
        self.metrics.bandwidth.set(self.link.bandwidth_bps)

    # ---- requests -------------------------------------------------------------------------------
    async def infer(self, x: npt.NDArray[np.float32], deadline_s: float, *,
                    policy: Policy | None = None) -> Outcome:
        """Answer one input within ``deadline_s`` if possible; always ends with a result.

        ``policy`` replaces the Edgent search (experiments: the baselines, or one forced plan).
        """
        start = time.monotonic()
        request_id = f"{self._prefix}-{next(self._ids)}"
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(self.bundle.input_shape)
        feed = {self.bundle.input_name: x}
        edge = self.edges.choose(start) if self.client is not None else None
        if self._measured is not None and start >= self._cap_expires:
            log.info("link_cap_expired", bandwidth_bps=round(self._measured.bandwidth_bps))
            self.update_link(self._measured)
        link = self.link
        if edge is None or edge.candidates is None:
            plan = self._local_plan(deadline_s)
            return await self._finish_local(request_id, feed, plan, start, deadline_s, link, None, "no_edge")
        cond = edgent.Conditions(bandwidth_bps=link.bandwidth_bps, deadline_s=deadline_s, rtt_s=link.rtt_s,
                                 edge_queue_s=edge.queue_wait_s, uplink_backlog_bytes=self.uplink_backlog(),
                                 device_speed=self.device_speed.value, edge_speed=edge.speed.value,
                                 device_margin_s=self.device_margin.value, remote_margin=self.remote_margin.value)
        if policy is not None:
            plan = policy(edge.candidates, cond)
            if plan.exit is None:  # the policy has no plan: its fastest way, on the device
                plan = self._local_plan(deadline_s)
        else:
            plan = edgent.plan(edge.candidates, cond)
            if not plan.feasible:
                plan = edgent.plan(edge.candidates, replace(cond, deadline_s=1e9))
                plan = self._local_plan(deadline_s) if plan.where == "device" else plan
        self._observe_plan(plan)
        assert plan.exit is not None and plan.cut is not None and plan.n_layers is not None
        if plan.cut == plan.n_layers:
            return await self._finish_local(request_id, feed, plan, start, deadline_s, link, None, None)
        tensors, head_s = feed, 0.0
        if plan.cut:
            tensors, head_s = await self._timed_stage(plan.exit, plan.cut, feed)
        reply, sent_bytes, sent_at = await self._offload(request_id, edge, plan, tensors, start, deadline_s)
        if isinstance(reply, InferResult):
            self.update_link(self.link.with_transfer(*self._transfer(reply, sent_bytes, sent_at)))
            self._observe_edge(edge, plan.exit, plan.cut, reply.compute_s)
            logits = next(iter(reply.outputs.values()))
            where = "edge" if plan.cut == 0 else "split"
            return self._done(request_id, logits, plan.exit, where, plan, edge.edge_id, None, start, deadline_s, link,
                              stage_s=head_s, edge_s=reply.queue_s + reply.compute_s)
        reason = reply.code.value if isinstance(reply, ErrorReply) else "timeout"
        if reason == "timeout":
            self.edges.on_timeout(edge.edge_id, time.monotonic())
        return await self._fallback(request_id, feed, tensors, plan, start, deadline_s, link, edge.edge_id, reason,
                                    head_s)

    async def _offload(self, request_id: str, edge: EdgeView, plan: edgent.Plan,
                       tensors: Mapping[str, npt.NDArray[Any]], start: float,
                       deadline_s: float) -> tuple[Message | None, int, float]:
        """Publish the cut tensors and wait no longer than local completion still allows."""
        assert self.client is not None and plan.exit is not None and plan.cut is not None
        left = deadline_s - (time.monotonic() - start)
        req = InferRequest(request_id=request_id, device_id=self.cfg.device_id, bundle=self.bundle.digest,
                           exit=plan.exit, cut=plan.cut, tensors=tensors, budget_s=max(left, 0.0))
        payload = encode(req)
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            sent_at = time.monotonic()
            # the bytes that must cross before an answer can come: ours and what is still queued ahead of them
            crossing = self.uplink_backlog() + len(payload)
            await self._emulate_upload(len(payload))
            props = session.request_properties(response_topic=self.topics.device_responses(self.cfg.device_id),
                                               correlation=request_id, expiry_s=max(left, 0.001))
            try:
                await self.client.publish(self.topics.edge_request(edge.edge_id, self.cfg.device_id), payload,
                                          qos=session.TRAFFIC_QOS, properties=props)
            except session.MQTT_ERRORS:
                return None, crossing, sent_at
            # the quickest local way out: the rest of this exit from the cut, or the fastest exit from scratch
            finish_local = min(self._device_rest_s(plan.exit, plan.cut),
                               self._fastest_local_s * self.device_speed.value)
            cutoff = deadline_s - finish_local  # after this, no local way meets the deadline
            if cutoff <= (plan.predicted_s or 0.0) * ANSWER_SLACK:
                # the answer is due too close to the cut-off to give up on it there: only the edge can meet the
                # deadline, so it gets until then
                cutoff = deadline_s
            wait = cutoff - (time.monotonic() - start)
            if wait <= 0:  # no local way meets the deadline any more: give the edge until then
                wait = max(deadline_s - (time.monotonic() - start), 0.0)
            try:
                return await asyncio.wait_for(future, timeout=wait), crossing, sent_at
            except TimeoutError:  # evidence too: these bytes did not make it there and back in the time waited
                self._cap_link(8.0 * crossing / max(time.monotonic() - sent_at, 1e-3))
                self._remember_late(request_id, crossing, sent_at)
                return None, crossing, sent_at
        finally:
            self._pending.pop(request_id, None)

    async def _fallback(self, request_id: str, feed: Mapping[str, npt.NDArray[Any]],
                        tensors: Mapping[str, npt.NDArray[Any]], plan: edgent.Plan, start: float, deadline_s: float,
                        link: bandwidth.LinkEstimate, edge_id: str, reason: str, head_s: float) -> Outcome:
        """Finish locally: the rest of the planned exit from the cut, or an earlier exit from scratch."""
        assert plan.exit is not None and plan.cut is not None and plan.n_layers is not None
        self.metrics.fallbacks.labels(reason).inc()
        fallback_start = time.monotonic()
        left = deadline_s - (fallback_start - start)
        rest = self._device_rest_s(plan.exit, plan.cut)
        local = self._local_plan(left)
        if rest <= left or (not local.feasible and rest <= (local.predicted_s or 0.0)):
            if plan.cut == 0:
                out = await self.run_stage(self.runner.stage(plan.exit, plan.n_layers, HEAD), feed)
            else:
                out = await self.run_stage(self.runner.stage(plan.exit, plan.cut, TAIL), tensors)
            logits, exit_index = next(iter(out.values())), plan.exit
        else:
            assert local.exit is not None
            stage = self.runner.stage(local.exit, len(self.exits[local.exit - 1].layers), HEAD)
            out = await self.run_stage(stage, feed)
            logits, exit_index = next(iter(out.values())), local.exit
        return self._done(request_id, logits, exit_index, "fallback", plan, edge_id, reason, start, deadline_s, link,
                          stage_s=head_s + time.monotonic() - fallback_start)

    async def _finish_local(self, request_id: str, feed: Mapping[str, npt.NDArray[Any]], plan: edgent.Plan,
                            start: float, deadline_s: float, link: bandwidth.LinkEstimate, edge_id: str | None,
                            reason: str | None) -> Outcome:
        assert plan.exit is not None
        if reason:
            self.metrics.fallbacks.labels(reason).inc()
        out, stage_s = await self._timed_stage(plan.exit, len(self.exits[plan.exit - 1].layers), feed)
        return self._done(request_id, next(iter(out.values())), plan.exit, "device", plan, edge_id, reason, start,
                          deadline_s, link, stage_s=stage_s)

    def _local_plan(self, deadline_s: float) -> edgent.Plan:
        """The most accurate exit that fits on the device alone, else the fastest one (flagged infeasible)."""
        return edgent.local_plan(self.local, edgent.Conditions(bandwidth_bps=1.0, deadline_s=max(deadline_s, 1e-9),
                                                               device_speed=self.device_speed.value,
                                                               device_margin_s=self.device_margin.value))

    def _model_device_s(self, exit_index: int, cut: int) -> float:
        """The device model's time of an exit's first ``cut`` layers run as one stage (not speed-corrected)."""
        return float(self.local.device_s[edgent.candidate(self.local, exit_index, cut)])

    def _device_rest_s(self, exit_index: int, cut: int) -> float:
        """Predicted device time of an exit's layers after ``cut`` (the whole exit at cut 0), at today's speed."""
        rest = self._model_device_s(exit_index, len(self.exits[exit_index - 1].layers)) - \
            self._model_device_s(exit_index, cut)
        return max(rest, 0.0) * self.device_speed.value

    async def _timed_stage(self, exit_index: int, cut: int,
                           feed: Mapping[str, npt.NDArray[Any]]) -> tuple[dict[str, npt.NDArray[Any]], float]:
        """Run the head stage of ``cut`` layers (its session built first, untimed); fold its time into the
        device's speed factor."""
        stage = self.runner.stage(exit_index, cut, HEAD)
        start = time.monotonic()
        out = await self.run_stage(stage, feed)
        took = time.monotonic() - start
        self.device_speed = self.device_speed.update(took, self._model_device_s(exit_index, cut))
        self.metrics.speed.labels("device").set(self.device_speed.value)
        return out, took

    def _observe_edge(self, edge: EdgeView, exit_index: int, cut: int, compute_s: float) -> None:
        """The edge computed our tail in ``compute_s``: fold it into that edge's speed factor."""
        if edge.candidates is not None:
            predicted = float(edge.candidates.edge_s[edgent.candidate(edge.candidates, exit_index, cut)])
            edge.speed = edge.speed.update(compute_s, predicted)
            self.metrics.speed.labels(edge.edge_id).set(edge.speed.value)

    def _done(self, request_id: str, logits: npt.NDArray[Any], exit_index: int, where: str, plan: edgent.Plan,
              edge_id: str | None, reason: str | None, start: float, deadline_s: float,
              link: bandwidth.LinkEstimate, *, stage_s: float, edge_s: float | None = None) -> Outcome:
        outcome = Outcome(request_id=request_id, logits=np.asarray(logits), exit=exit_index, where=where, plan=plan,
                          edge_id=edge_id, fallback=reason, latency_s=time.monotonic() - start,
                          deadline_s=deadline_s, bandwidth_bps=link.bandwidth_bps, stage_s=stage_s, edge_s=edge_s)
        self.metrics.latency.observe(outcome.latency_s)
        self.metrics.deadline.set(deadline_s)
        self.metrics.deadline_ratio.observe(outcome.latency_s / deadline_s if deadline_s > 0 else float("inf"))
        self.metrics.requests.labels(where).inc()
        if not outcome.met:
            self.metrics.deadline_misses.inc()
        self._observe_margins(outcome)
        log.info("request_done", **outcome.record())
        return outcome

    def _observe_margins(self, o: Outcome) -> None:
        """Fold how far this request ran over its prediction into the margins, part by part."""
        p = o.plan
        if p.predicted_s is None or p.device_s is None:
            return
        if o.where == "device":  # all of it on the device, from arrival to answer
            self.device_margin = self.device_margin.update(o.latency_s, p.predicted_s)
        elif o.where in ("edge", "split") or o.fallback == "timeout":  # a timeout: the remote part took longer
            if o.where == "split":
                self.device_margin = self.device_margin.update(o.stage_s, p.device_s)
            self.remote_margin = self.remote_margin.update(o.latency_s - o.stage_s, p.predicted_s - p.device_s)
        self.metrics.device_margin.set(self.device_margin.value)
        self.metrics.remote_margin.set(self.remote_margin.value)

    def _observe_plan(self, plan: edgent.Plan) -> None:
        self.metrics.exit.set(plan.exit or 0)
        self.metrics.cut.set(plan.cut or 0)
        self.metrics.accuracy.set(plan.accuracy or 0)

    async def run_stage(self, stage: Stage, feed: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        """Run a stage off the event loop; with ``emulate_slowdown`` > 1 stretch it like a slower CPU."""
        start = time.monotonic()
        out = await asyncio.to_thread(stage.run, feed)
        if self.cfg.emulate_slowdown > 1.0:
            await asyncio.sleep((self.cfg.emulate_slowdown - 1.0) * (time.monotonic() - start))
        return out

    def set_emulated_uplink(self, bps: float) -> None:
        """Change the in-application uplink emulation (0: off) while running."""
        self._emulated_bps = bps

    def uplink_backlog(self) -> int:
        """Bytes of our earlier messages not yet across the uplink (measured on the connection, not modelled): a
        new upload queues behind them."""
        on_socket = session.unsent_bytes(self.client) if self.client is not None else 0
        return on_socket + self._emulated_queued

    def _remember_late(self, request_id: str, nbytes: int, sent_at: float) -> None:
        self._late[request_id] = (nbytes, sent_at)
        while len(self._late) > LATE_REMEMBERED:
            del self._late[next(iter(self._late))]

    def _late_answer(self, result: InferResult) -> None:
        """An answer that came after we gave up still times its transfer: a rate sample from a slow link."""
        sent = self._late.pop(result.request_id, None)
        if sent is None:
            return
        sample = self._transfer(result, *sent)
        measured, expires = self._measured, self._cap_expires
        self.update_link(self.link.with_transfer(*sample))
        if measured is not None:
            # the timeout cap still holds, and what returns when it expires learns the sample too: otherwise a
            # device whose plans stay local (no more samples) would keep this one estimate for good
            self._measured, self._cap_expires = measured.with_transfer(*sample), expires
        log.info("late_answer", request_id=result.request_id, bandwidth_bps=round(self.link.bandwidth_bps))

    def _transfer(self, result: InferResult, sent_bytes: int, sent_at: float) -> tuple[int, float]:
        """(bytes both ways, seconds on the wire) of an answered request: the edge's queue and compute taken
        out."""
        wire_s = time.monotonic() - sent_at - result.queue_s - result.compute_s
        return sent_bytes + sum(v.nbytes for v in result.outputs.values()), wire_s

    async def _emulate_upload(self, nbytes: int) -> None:
        """With ``emulate_uplink``: wait out the transfer of ``nbytes``, behind any queued before them."""
        if not self._emulated_bps:
            return
        self._emulated_queued += nbytes
        try:
            async with self._uplink:
                await asyncio.sleep(8.0 * nbytes / self._emulated_bps)
        finally:
            self._emulated_queued -= nbytes

    def update_link(self, link: bandwidth.LinkEstimate) -> None:
        """A measured estimate (probe, transfer, or set by the operator): it replaces any timeout cap."""
        self._measured = None
        self.link = link
        self.metrics.bandwidth.set(link.bandwidth_bps)

    def _cap_link(self, bound_bps: float) -> None:
        if bound_bps >= self.link.bandwidth_bps:
            return
        measured = self._measured or self.link
        self.update_link(replace(self.link, bandwidth_bps=bound_bps))
        self._measured, self._cap_expires = measured, time.monotonic() + CAP_HOLD_S

    # ---- probes and incoming messages -------------------------------------------------------------
    async def probe(self, edge_id: str) -> bandwidth.LinkEstimate | None:
        """Time probes of two (or more) sizes to ``edge_id``; update and return the estimate (None if a probe
        went unanswered, the uplink was busy, or the pair was too close in time to tell a rate)."""
        if self.client is None:
            return None
        if (backlog := self.uplink_backlog()) > PROBE_IDLE_BYTES:
            # a probe behind our own queued bytes times the queue, and adds to it: wait for an idle uplink
            log.info("probe_deferred", edge_id=edge_id, uplink_backlog_bytes=backlog)
            return None
        samples = []
        # the sizes twice, back to back: the first round drains any burst allowance the link saved up while
        # idle (a token bucket lets a probe smaller than its burst through at line rate), the second is timed
        sizes = (*self.cfg.probe_sizes[:-1], self._probe_bytes) * 2
        for size in sizes:
            probe_id = f"{self._prefix}-p{next(self._ids)}"
            future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
            self._pending[probe_id] = future
            payload = encode(Probe(probe_id=probe_id, device_id=self.cfg.device_id, padding=bytes(size)))
            try:
                start = time.monotonic()
                await self._emulate_upload(len(payload))
                props = session.request_properties(response_topic=self.topics.device_responses(self.cfg.device_id),
                                                   correlation=probe_id, expiry_s=PROBE_TIMEOUT_S)
                await self.client.publish(self.topics.edge_probe(edge_id, self.cfg.device_id), payload,
                                          qos=session.TRAFFIC_QOS, properties=props)
                await asyncio.wait_for(future, timeout=PROBE_TIMEOUT_S)
                samples.append((len(payload), time.monotonic() - start))
            except TimeoutError:  # evidence too: the link may be slower than this probe needed; probe smaller
                self._cap_link(8.0 * len(payload) / PROBE_TIMEOUT_S)
                self._probe_bytes = max(self.cfg.probe_sizes[-1], self._probe_bytes // 4)
                return None
            finally:
                self._pending.pop(probe_id, None)
        samples = samples[len(samples) // 2:]
        if samples[-1][1] - samples[0][1] < PROBE_MIN_SIGNAL_S:
            # the large probe's extra bytes took less than the device's timing jitter: no rate, but a floor
            # (they crossed in under PROBE_MIN_SIGNAL_S). An estimate below it is stale (a cap left by a
            # timeout on a clogged link): raise it. Probe larger next time.
            floor = 8.0 * (samples[-1][0] - samples[0][0]) / PROBE_MIN_SIGNAL_S
            if floor > self.link.bandwidth_bps:
                self.update_link(replace(self.link, bandwidth_bps=floor, probed_bps=floor))
                log.info("link_floor_raised", edge_id=edge_id, bandwidth_bps=round(floor))
            self._probe_bytes = min(PROBE_MAX_BYTES, self._probe_bytes * 4)
            return None
        estimate = bandwidth.from_probes(samples)
        self.update_link(replace(estimate, samples=self.link.samples + len(samples)))
        # next time, the large probe takes ~PROBE_TARGET_S at this rate
        self._probe_bytes = min(PROBE_MAX_BYTES, max(self.cfg.probe_sizes[-1],
                                                     int(estimate.bandwidth_bps / 8 * PROBE_TARGET_S)))
        log.info("link_probed", edge_id=edge_id, bandwidth_bps=round(estimate.bandwidth_bps), rtt_s=estimate.rtt_s)
        return self.link

    def handle(self, topic: str, payload: bytes) -> None:
        """Dispatch one incoming message: edge status/adverts, or a reply to a pending request or probe."""
        try:
            msg = decode(payload)
            if isinstance(msg, Status) and topic.endswith("/status"):
                self.edges.on_status(self.topics.edge_id_of(topic), msg)
            elif isinstance(msg, Advert):
                self.edges.on_advert(self.topics.edge_id_of(topic), msg)
            elif isinstance(msg, (InferResult, ErrorReply, ProbeReply)):
                self.edges.heard_from(msg.sender if isinstance(msg, ErrorReply) else msg.edge_id)
                if isinstance(msg, InferResult):
                    self.edges.served(msg.edge_id)
                    self._late_answer(msg)
                key = msg.probe_id if isinstance(msg, ProbeReply) else msg.request_id
                future = self._pending.get(key)
                if future is not None and not future.done():
                    future.set_result(msg)
        except ProtocolError as exc:
            log.warning("message_rejected", topic=topic, error=str(exc))
        except Exception:  # a message that validated but still broke its handler: log it, keep serving
            log.exception("message_failed", topic=topic)
