"""A stream's owner: it plans a pipeline over workers, feeds it frames, keeps it flowing, and delivers in order.

The owner (the device whose camera makes the frames) plans with the pipeline planner (``planner.pipeline``,
stages and replicas; intra-layer splits are planned elsewhere but not executed here), sends each worker its
``StagePlan`` and waits for every worker's ``ready``, then sends frames to the first stage. Results return to
its stream inbox. What it guarantees to the application:

- **bounded**: at most ``window`` frames are between the producer and the application (sent, in the pipeline,
  or done and waiting for an earlier one); the producer waits for room (``window`` = ``QUEUE_SLOTS`` per stage,
  and each worker may hold that many, so no queue anywhere grows without bound);
- **in order, exactly once**: every frame gets one ``StreamResult`` (its logits, or an explicit error), in input
  order; a second result for a frame (the old path's, after a re-send) is counted and dropped;
- **fault tolerant** (the controller, ``_watch``): a worker whose status goes offline, or that is silent (no
  heartbeat) for ``STALL_S``, is left out and the stream re-planned with the others; a worker whose measured
  compute drifts from its plan by more than ``DRIFT`` has its blocks' costs corrected and the stream re-planned (if
  the corrected plan differs); a frame
  with no answer for its timeout triggers a re-plan over the same workers. A re-plan is a new *epoch*: workers
  drop frames of other epochs, and the owner re-sends every frame still in flight (at most ``MAX_ATTEMPTS``
  sends a frame; then it ends with an error).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Set
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from deviced.calls import PendingCalls
from deviced.errors import DevicedError
from planner import pipeline
from planner.errors import LatencyModelError
from planner.fleet import Chain, Fleet, PipelineError, Worker
from protocol.errors import ErrorCode
from protocol.messages import StageAck, StageError, StageFrame, StagePlan, StageResult, StageStop, Status, encode
from protocol.topics import Topics

log = structlog.get_logger()
STALL_S = 3.0  # a worker silent this long (6 missed heartbeats) is left out
# a worker's time to take a plan: the round trip and a session's fixed start, and its latency model's "load" time for
# the stage's bytes (Edgent's Table II has one), ACK_LOAD_FACTOR times over (a busy or throttled worker)
ACK_BASE_S = 5.0
ACK_LOAD_FACTOR = 4.0
ACK_FALLBACK_BPS = 20e6  # bytes a second a session loads at where the latency model has no "load" entry
FRAME_TIMEOUT_MIN_S = 5.0  # a frame without an answer this long (or 4x its planned latency + queue) is re-sent
MAX_ATTEMPTS = 5  # sends of one frame (re-plans re-send what is in flight) before it ends with an error
DRIFT = 1.5  # measured / planned compute beyond this (or below its inverse) corrects the worker's speed
DRIFT_BEATS = 3  # heartbeats in a row that must show the drift
WARM_FRAMES = 4  # frames a stage must have done before its heartbeat's compute time counts
WATCH_S = 0.1
FPS_WINDOW_S = 5.0
TRANSIENT = frozenset({ErrorCode.STALE, ErrorCode.NO_PLAN, ErrorCode.BUSY})  # re-send; anything else: an error

Publish = Callable[[str, bytes], Awaitable[None]]


class StreamError(DevicedError):
    """The stream cannot go on: no plan fits the workers left."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamResult:
    """Frame ``index``'s answer: its logits, or an explicit error (``code`` and ``error``)."""

    index: int
    logits: npt.NDArray[np.float32] | None
    latency_s: float
    attempts: int  # sends of the frame (re-plans re-send what is in flight)
    epoch: int  # the plan epoch its answer came from
    worker: str = ""  # the last stage's worker
    finished_s: float = 0.0  # when it ended, seconds after the stream started
    code: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.logits is not None

    def record(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"frame": self.index, "latency_s": round(self.latency_s, 6),
                               "finished_s": round(self.finished_s, 6),
                               "attempts": self.attempts, "epoch": self.epoch, "worker": self.worker}
        if self.ok:
            assert self.logits is not None
            doc["class"] = int(np.argmax(self.logits))
        else:
            doc["error"] = {"code": self.code, "message": self.error}
        return doc


@dataclass(slots=True)
class _Frame:
    index: int
    x: npt.NDArray[np.float32]
    sent_at: float
    resent_at: float
    attempts: int = 1


@dataclass(slots=True)
class _Watch:
    """What the owner knows of one worker of the current plan."""

    planned_s: float  # its stage's compute per frame, as planned
    blocks: tuple[int, int]  # the block range it runs
    heard: float  # the last message from it
    drift: int = 0  # heartbeats in a row off the plan by more than DRIFT
    ratio: float = 1.0  # the last heartbeat's measured / planned


class Stream:
    """One stream, owned by this device: ``async for r in stream.run(frames)``."""

    def __init__(self, *, stream_id: str, owner: str, topics: Topics, digest: str, chain: Chain, exit_index: int,
                 input_name: str, output_name: str, input_shape: tuple[int, ...], fleet: Fleet, publish: Publish,
                 metrics: Any, method: str | None = None) -> None:
        if fleet.source != owner:
            raise PipelineError(f"the fleet's source is {fleet.source!r}; this device is {owner!r}")
        self.stream_id, self.owner, self.topics, self.digest = stream_id, owner, topics, digest
        self.chain, self.exit_index = chain, exit_index
        self.input_name, self.output_name, self.input_shape = input_name, output_name, input_shape
        self.fleet, self.metrics = fleet, metrics
        self.method = method or pipeline.default_method(fleet)
        self._publish = publish
        self.epoch = 0
        self.plan: pipeline.PipelinePlan | None = None
        self.replans: list[dict[str, Any]] = []  # every plan: when, why, what (for reports)
        self.duplicates = 0
        self.max_queued: dict[str, int] = {}  # the most frames each worker reported waiting (its heartbeats)
        self._started = time.monotonic()
        # measured corrections of the fleet's latency models, per worker and block (a model's error depends on the
        # layers, and on the owner its own work shares the CPU: one factor per worker would swing between ranges)
        self._scale = {w.name: np.ones(chain.n) for w in fleet.workers}
        self._lost: set[str] = set()
        self._trouble: dict[str, str] = {}  # worker -> why it must go (set by handlers, acted on by the watchdog)
        self._watch: dict[str, _Watch] = {}
        self._acks: PendingCalls[str, None] = PendingCalls()  # workers taking the plan being sent
        self._in_flight: dict[int, _Frame] = {}
        self._done: dict[int, StreamResult] = {}
        self._resend: set[int] = set()
        self._next = 0
        self._produced: int | None = None
        self._planning = asyncio.Lock()
        self._room = asyncio.Condition()  # the producer waits here while the window is full
        self._wake = asyncio.Event()
        self._delivered: collections.deque[float] = collections.deque()

    @property
    def window(self) -> int:
        """Frames the stream may have between its input and the application (``QUEUE_SLOTS`` per stage)."""
        return _window(self.plan) if self.plan is not None else 1

    # ---- the application's side ---------------------------------------------------------------------------------
    async def run(self, frames: AsyncIterable[npt.NDArray[Any]] | Iterable[npt.NDArray[Any]]
                  ) -> AsyncIterator[StreamResult]:
        """Plan, then stream ``frames`` through; yields one result per frame, in input order."""
        self._started = time.monotonic()
        await self._replan("start")
        producer = asyncio.create_task(self._produce(frames), name=f"stream-{self.stream_id}-produce")
        watchdog = asyncio.create_task(self._watchdog(), name=f"stream-{self.stream_id}-watch")
        try:
            while True:
                while self._next in self._done:
                    result = self._done.pop(self._next)
                    self._next += 1
                    async with self._room:
                        self._room.notify_all()
                    yield result
                for task in (producer, watchdog):
                    if task.done():
                        task.result()  # raises the input's or the controller's error
                if self._produced is not None and self._next >= self._produced:
                    return
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), WATCH_S)
        finally:
            for task in (producer, watchdog):
                task.cancel()
            self.metrics.stream_in_flight.set(0)
            await self._stop_workers(self._members())

    # ---- messages from workers (sync: they only record; the watchdog acts) ---------------------------------------
    def on_message(self, sender: str, msg: StageResult | StageAck | StageError) -> None:
        watch = self._watch.get(sender)
        if watch is not None:
            watch.heard = time.monotonic()
        if isinstance(msg, StageAck):
            self._on_ack(sender, msg)
        elif isinstance(msg, StageResult):
            self._on_result(sender, msg)
        else:
            self._on_error(sender, msg)

    def on_status(self, worker: str, status: Status) -> None:
        """A fleet worker's retained status: offline leaves it out (now, if the plan uses it; else from the next
        plan on); online again (a reboot) makes it plannable at the next re-plan."""
        if worker == self.owner or worker not in self._scale:
            return
        if status.state == "online":
            self._lost.discard(worker)
        elif worker in self._members():
            self._trouble[worker] = "offline"
            self._wake.set()
        else:
            self._lost.add(worker)

    def _on_ack(self, sender: str, ack: StageAck) -> None:
        if ack.epoch != self.epoch:
            return
        if ack.state == "ready":
            self._acks.resolve(sender, None)
            return
        self.max_queued[sender] = max(self.max_queued.get(sender, 0), ack.queued)
        watch = self._watch.get(sender)
        if ack.state == "running" and watch is not None and ack.done >= WARM_FRAMES and watch.planned_s > 0:
            watch.ratio = ack.compute_s / watch.planned_s
            watch.drift = watch.drift + 1 if not 1 / DRIFT <= watch.ratio <= DRIFT else 0

    def _on_result(self, sender: str, msg: StageResult) -> None:
        frame = self._in_flight.get(msg.frame)
        if frame is None:
            self.duplicates += 1  # an old path's answer after a re-send, or one for a frame that ended
            self.metrics.stream_frames.labels("duplicate").inc()
            return
        logits = msg.outputs.get(self.output_name)
        if logits is None:
            self._finish(frame, None, msg.epoch, sender, ErrorCode.BAD_TENSOR.value,
                         f"the result from {sender} lacks {self.output_name!r}")
        else:
            self._finish(frame, logits, msg.epoch, sender)

    def _on_error(self, sender: str, msg: StageError) -> None:
        log.info("stage_error", stream_id=self.stream_id, sender=sender, epoch=msg.epoch, frame=msg.frame,
                 code=msg.code.value, reason=msg.message)
        if msg.frame < 0:
            if msg.epoch == self.epoch:
                self._acks.fail(sender, StreamError(f"{sender} refused the plan: {msg.code.value}: {msg.message}"))
            return
        frame = self._in_flight.get(msg.frame)
        if frame is None or msg.epoch != self.epoch:
            return  # an earlier epoch's: the frame was re-sent since
        if msg.code in TRANSIENT:
            self._resend.add(msg.frame)
            self._wake.set()
        else:
            self._finish(frame, None, msg.epoch, sender, msg.code.value, msg.message)

    def _finish(self, frame: _Frame, logits: npt.NDArray[Any] | None, epoch: int, worker: str, code: str = "",
                error: str = "") -> None:
        now = time.monotonic()
        del self._in_flight[frame.index]
        self._resend.discard(frame.index)
        latency = now - frame.sent_at
        self._done[frame.index] = StreamResult(index=frame.index, logits=logits, latency_s=latency,
                                               attempts=frame.attempts, epoch=epoch, worker=worker,
                                               finished_s=now - self._started, code=code, error=error)
        self.metrics.stream_frames.labels("result" if logits is not None else "error").inc()
        self.metrics.stream_in_flight.set(len(self._in_flight))
        if logits is not None:
            self.metrics.stream_latency.observe(latency)
        self._delivered.append(now)
        while self._delivered and self._delivered[0] < now - FPS_WINDOW_S:
            self._delivered.popleft()
        self.metrics.stream_fps.set(len(self._delivered) / FPS_WINDOW_S)
        self._wake.set()

    # ---- frames out ---------------------------------------------------------------------------------------------
    async def _produce(self, frames: AsyncIterable[npt.NDArray[Any]] | Iterable[npt.NDArray[Any]]) -> None:
        index = 0
        source = _aiter(frames)
        while True:
            async with self._room:  # frames between the input and the application: at most the window
                await self._room.wait_for(lambda: len(self._in_flight) + len(self._done) < self.window)
            try:
                x = await anext(source)  # read only when there is room for it
            except StopAsyncIteration:
                break
            now = time.monotonic()
            frame = _Frame(index=index, x=np.asarray(x, dtype=np.float32), sent_at=now, resent_at=now)
            index += 1
            if frame.x.size != int(np.prod(self.input_shape)):
                self._in_flight[frame.index] = frame
                self._finish(frame, None, self.epoch, self.owner, ErrorCode.BAD_TENSOR.value,
                             f"input of {frame.x.size} values; the model takes {list(self.input_shape)}")
                continue
            frame.x = frame.x.reshape(self.input_shape)
            async with self._planning:
                self._in_flight[frame.index] = frame
                self.metrics.stream_in_flight.set(len(self._in_flight))
                await self._send(frame)
        self._produced = index
        self._wake.set()

    async def _send(self, frame: _Frame) -> None:
        assert self.plan is not None
        first = self.plan.stages[0].workers
        target = first[frame.index % len(first)]
        frame.resent_at = time.monotonic()
        payload = encode(StageFrame(stream_id=self.stream_id, owner=self.owner, epoch=self.epoch, frame=frame.index,
                                    stage=0, tensors={self.input_name: frame.x}))
        try:
            await self._publish(self.topics.stage_inbox(target, self.owner), payload)
        except Exception as exc:  # no session now: the frame's timeout re-sends it
            log.warning("stream_send_failed", stream_id=self.stream_id, frame=frame.index, error=str(exc))

    # ---- the controller -----------------------------------------------------------------------------------------
    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(WATCH_S)
            now = time.monotonic()
            for name, watch in self._watch.items():
                if name != self.owner and now - watch.heard > STALL_S:
                    self._trouble.setdefault(name, "stalled")
            if self._trouble:
                lost, self._trouble = dict(self._trouble), {}
                await self._replan("+".join(sorted(set(lost.values()))), lost=set(lost))
                continue
            drifted = {n: w.ratio for n, w in self._watch.items() if w.drift >= DRIFT_BEATS}
            if drifted:
                for name, ratio in drifted.items():
                    first, stop = self._watch[name].blocks
                    self._scale[name][first:stop] *= ratio
                await self._replan("drift", drift=drifted)
                continue
            assert self.plan is not None
            timeout = max(FRAME_TIMEOUT_MIN_S, 4 * (self.plan.latency_s + self.window * self.plan.period_s))
            if any(now - f.resent_at > timeout for f in self._in_flight.values()):
                await self._replan("timeout")
                continue
            if self._resend:
                async with self._planning:
                    for index in sorted(self._resend):
                        frame = self._in_flight.get(index)
                        if frame is not None and self._retry(frame):
                            await self._send(frame)
                    self._resend.clear()

    def _retry(self, frame: _Frame) -> bool:
        """Count one more send of ``frame``; past ``MAX_ATTEMPTS`` it ends with an error instead."""
        if frame.attempts >= MAX_ATTEMPTS:
            self._finish(frame, None, self.epoch, "", "gave_up",
                         f"no answer after {frame.attempts} sends (re-planned {len(self.replans) - 1} times)")
            return False
        frame.attempts += 1
        return True

    async def _replan(self, reason: str, *, lost: Set[str] = frozenset(), drift: dict[str, float] | None = None
                      ) -> None:
        """A new epoch: plan with the workers left (and corrected speeds), hand out the stages, wait for every
        worker's ready, then re-send what was in flight. A worker that refuses or does not answer is left out too."""
        async with self._planning:
            self._lost |= set(lost) - {self.owner}
            previous = self._members()
            started = time.monotonic()
            while True:
                plan = self._plan()
                if reason == "drift" and self.plan is not None and _layout(plan) == _layout(self.plan):
                    self._corrected(plan, drift or {})  # the same stages are still best: no new epoch
                    return
                self.epoch += 1
                refused = await self._hand_out(plan)
                if not refused:
                    break
                if self.owner in refused:
                    raise StreamError(f"this device ({self.owner}) cannot run its own stage: {refused[self.owner]}")
                log.warning("stream_workers_refused", stream_id=self.stream_id, refused=refused)
                self._lost |= set(refused)
            self.plan = plan
            now = time.monotonic()
            members = self._members()
            self._watch = {name: _Watch(planned_s=s.compute_s[i], blocks=(s.first, s.stop), heard=now)
                           for s in plan.stages for i, name in enumerate(s.workers)}
            await self._stop_workers(previous - members - self._lost)
            resent = 0
            for frame in sorted(self._in_flight.values(), key=lambda f: f.index):
                if self._retry(frame):
                    await self._send(frame)
                    resent += 1
            self._resend.clear()
            entry = {"at": time.time(), "epoch": self.epoch, "reason": reason, "lost": sorted(lost),
                     "drift": {k: round(v, 3) for k, v in (drift or {}).items()}, "resent": resent,
                     "took_s": round(now - started, 3), "frames_per_s": plan.frames_per_s,
                     "latency_s": plan.latency_s,
                     "stages": [[list(s.workers), s.first_layer, s.last_layer] for s in plan.stages]}
            self.replans.append(entry)
            self.metrics.stream_replans.labels(reason).inc()
            log.info("stream_plan", stream_id=self.stream_id, **{k: v for k, v in entry.items() if k != "at"})

    def _corrected(self, plan: pipeline.PipelinePlan, drift: dict[str, float]) -> None:
        """Keep the running stages; only expect what the corrected speeds predict."""
        self.plan = plan
        for stage in plan.stages:
            for i, name in enumerate(stage.workers):
                if name in self._watch:
                    self._watch[name].planned_s, self._watch[name].drift = stage.compute_s[i], 0
        self.metrics.stream_replans.labels("corrected").inc()
        log.info("stream_speeds_corrected", stream_id=self.stream_id, epoch=self.epoch,
                 drift={k: round(v, 3) for k, v in drift.items()}, frames_per_s=plan.frames_per_s)

    def _plan(self) -> pipeline.PipelinePlan:
        workers = tuple(replace(w, block_scale=tuple(self._scale[w.name])) for w in self.fleet.workers
                        if w.name not in self._lost)
        fleet = Fleet(workers=workers, source=self.owner, per_message_s=self.fleet.per_message_s,
                      max_group=self.fleet.max_group)
        try:
            return pipeline.plan(self.chain, fleet, method=self.method, split=False)
        except PipelineError as exc:
            raise StreamError(f"no plan over {[w.name for w in workers]}: {exc}") from exc

    async def _hand_out(self, plan: pipeline.PipelinePlan) -> dict[str, str]:
        """Send each worker its stage of ``plan``; the workers that refused or did not answer in time, and why."""
        # the frames the owner may have out: the new window, or more while a larger earlier window drains
        credits = max(_window(plan), len(self._in_flight) + len(self._done))
        refused: dict[str, str] = {}
        with contextlib.ExitStack() as waiting:
            acks = {w: waiting.enter_context(self._acks.expect(w)) for s in plan.stages for w in s.workers}
            for index, stage in enumerate(plan.stages):
                after = plan.stages[index + 1].workers if index + 1 < len(plan.stages) else ()
                before = plan.stages[index - 1].workers if index else (self.owner,)
                doc = StagePlan(stream_id=self.stream_id, owner=self.owner, epoch=self.epoch, bundle=self.digest,
                                exit=self.exit_index, stage=index,
                                input_names=tuple(sorted(self.chain.boundary_tensors[stage.first])),
                                output_names=tuple(sorted(self.chain.boundary_tensors[stage.stop])), next=after,
                                previous=before, credits=credits)
                for worker in stage.workers:
                    try:
                        await self._publish(self.topics.stage_inbox(worker, self.owner), encode(doc))
                    except Exception as exc:
                        self._acks.fail(worker, StreamError(f"cannot send the plan: {exc}"))
            by_name = {w.name: w for w in self.fleet.workers}
            builds = {w: ack_timeout_s(by_name[w], stage.memory_bytes[i]) if w in by_name else ACK_BASE_S
                      for stage in plan.stages for i, w in enumerate(stage.workers)}
            for worker, future in acks.items():
                try:
                    await asyncio.wait_for(asyncio.shield(future), builds[worker])
                except TimeoutError:
                    refused[worker] = f"no answer in {builds[worker]:.1f} s"
                except StreamError as exc:
                    refused[worker] = str(exc)
        return refused

    async def _stop_workers(self, workers: Iterable[str]) -> None:
        for worker in workers:
            with contextlib.suppress(Exception):
                await self._publish(self.topics.stage_inbox(worker, self.owner),
                                    encode(StageStop(stream_id=self.stream_id, owner=self.owner)))

    def _members(self) -> set[str]:
        return {w for s in self.plan.stages for w in s.workers} if self.plan is not None else set()



def ack_timeout_s(worker: Worker, stage_bytes: float) -> float:
    """How long ``worker`` may take to acknowledge a plan whose stage holds ``stage_bytes`` (weights and buffers):
    ``ACK_BASE_S`` and ``ACK_LOAD_FACTOR`` times the session build its latency model predicts at its speed."""
    try:
        load_s = worker.latency.predict("load", {"model_bytes": stage_bytes}) / worker.speed
    except LatencyModelError:  # no "load" entry and an "other" fallback that needs other variables
        load_s = stage_bytes / ACK_FALLBACK_BPS / worker.speed
    return ACK_BASE_S + ACK_LOAD_FACTOR * load_s


def _window(plan: pipeline.PipelinePlan) -> int:
    return pipeline.QUEUE_SLOTS * len(plan.stages)


def _layout(plan: pipeline.PipelinePlan) -> list[tuple[tuple[str, ...], int, int]]:
    return [(s.workers, s.first, s.stop) for s in plan.stages]


async def _aiter(frames: AsyncIterable[npt.NDArray[Any]] | Iterable[npt.NDArray[Any]]
                 ) -> AsyncIterator[npt.NDArray[Any]]:
    if isinstance(frames, AsyncIterable):
        async for x in frames:
            yield x
    else:
        for x in frames:
            yield x
