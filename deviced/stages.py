"""deviced as a pipeline worker: it runs a stage of a stream that some device owns (``deviced/stream.py``).

A stream's owner sends each worker a ``StagePlan`` on the worker's stage inbox (``Topics.stage_inbox``): the
segment of the model to run, the epoch it belongs to, where to send each frame next, and how many frames the
worker may hold waiting (its credits). Frames then arrive on the same inbox from the owner or the previous stage;
the worker runs its segment on each, one stage at a time on the device's CPU (``Device.run_stage``), and sends
the outputs on to the next stage, or the result back to the owner's stream inbox. While it holds a plan it sends
the owner a heartbeat (``StageAck``: frames waiting, done, the median compute time of the last few).

Every message is validated first; whatever a worker cannot take (unreadable, a plan not from its stream's owner,
an unknown bundle or cut, a frame of another epoch, of no plan, or over the credits, a tensor that does not fit)
is answered with a ``StageError`` to the sender's stream inbox, and the worker keeps serving.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import statistics
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from deviced.inbound import Inbound, Rejected
from models.errors import ModelError
from models.runtime import Stage, StageRunner
from planner.core import Segment
from protocol.errors import ErrorCode
from protocol.messages import (
    StageAck,
    StageError,
    StageFrame,
    StagePlan,
    StageResult,
    StageStop,
    encode,
)
from protocol.topics import Topics

log = structlog.get_logger()
HEARTBEAT_S = 0.5  # a worker's StageAck interval while it holds a plan
RECENT = 8  # frames whose median compute time the heartbeat reports

Publish = Callable[[str, bytes], Coroutine[Any, Any, None]]
RunStage = Callable[[Stage, Any], Awaitable[tuple[dict[str, Any], float]]]


@dataclass(slots=True)
class _Held:
    """One stream's plan on this worker, its frames waiting, and the tasks serving them."""

    plan: StagePlan
    stage: Stage
    inbox: asyncio.Queue[StageFrame]
    outbox: asyncio.Queue[tuple[StageFrame, dict[str, Any], float]]
    done: int = 0
    recent: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=RECENT))
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class StageWorker:
    """The stage role of one deviced: plans by (owner, stream), frames through bounded queues."""

    def __init__(self, *, worker_id: str, topics: Topics, digest: str, runner: StageRunner, run_stage: RunStage,
                 publish: Publish, metrics: Any) -> None:
        self.worker_id = worker_id
        self.topics = topics
        self.digest = digest
        self.runner = runner
        self._run_stage = run_stage
        self._publish = publish
        self.metrics = metrics
        self._held: dict[tuple[str, str], _Held] = {}
        self._pending: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def queued(self) -> int:
        """Frames waiting on this worker, over every stream it serves."""
        return sum(h.inbox.qsize() + h.outbox.qsize() for h in self._held.values())

    def on_message(self, inbound: Inbound) -> None:
        """One message from the stage inbox (``inbound.sender``: the topic's last level, which the broker's ACL
        vouches for)."""
        if self._closed:
            return  # the session is ending: nothing new starts
        sender, msg = inbound.sender, inbound.message
        if isinstance(msg, StageFrame):
            self._frame(sender, msg)
        elif isinstance(msg, StagePlan):
            self._spawn(self._take_plan(sender, msg))
        elif isinstance(msg, StageStop):
            if sender != msg.owner:
                self._refuse(sender, msg.stream_id, 0, -1, ErrorCode.MALFORMED, "only a stream's owner stops it")
                return
            self._spawn(self._stop(msg.owner, msg.stream_id, announce=True))

    def on_rejected(self, rejected: Rejected) -> None:
        """A stage-inbox message that failed validation: its sender learns why."""
        if not self._closed:
            self._refuse(rejected.sender, "", 0, -1, rejected.error.code, str(rejected.error))

    async def close(self) -> None:
        """Drop every plan (the session ends)."""
        self._closed = True
        for owner, stream_id in list(self._held):
            await self._stop(owner, stream_id, announce=False)
        for task in list(self._pending):
            task.cancel()

    # ---- messages -----------------------------------------------------------------------------------------------
    def _frame(self, sender: str, msg: StageFrame) -> None:
        held = self._held.get((msg.owner, msg.stream_id))
        problem: tuple[ErrorCode, str] | None = None
        if held is None:
            problem = ErrorCode.NO_PLAN, f"{self.worker_id} holds no plan for stream {msg.stream_id}"
        elif msg.epoch != held.plan.epoch:
            problem = ErrorCode.STALE, f"frame of epoch {msg.epoch}; the plan here is of epoch {held.plan.epoch}"
        elif sender not in held.plan.previous:
            problem = ErrorCode.MALFORMED, f"frames of stage {msg.stage} come from {list(held.plan.previous)}, " \
                                           f"not {sender}"
        elif msg.stage != held.plan.stage:
            problem = ErrorCode.BAD_PLAN, f"frame for stage {msg.stage}; this worker runs stage {held.plan.stage}"
        elif held.inbox.full():
            problem = ErrorCode.BUSY, f"{held.plan.credits} frames already wait on {self.worker_id}"
        if problem is not None:  # told to the owner, or to a sender that is not where frames come from
            to = sender if problem[0] is ErrorCode.MALFORMED else msg.owner
            self._refuse(to, msg.stream_id, msg.epoch, msg.frame, *problem)
            return
        assert held is not None
        held.inbox.put_nowait(msg)
        self.metrics.stage_queued.set(self.queued)

    async def _take_plan(self, sender: str, plan: StagePlan) -> None:
        key = (plan.owner, plan.stream_id)
        if sender != plan.owner:
            self._refuse(sender, plan.stream_id, plan.epoch, -1, ErrorCode.MALFORMED,
                         f"a plan for {plan.owner}'s stream came from {sender}: taken only from the stream's owner")
            return
        if plan.bundle != self.digest:
            self._refuse(sender, plan.stream_id, plan.epoch, -1, ErrorCode.UNKNOWN_BUNDLE,
                         f"{self.worker_id} serves bundle {self.digest[:12]}, not {plan.bundle[:12]}")
            return
        held = self._held.get(key)
        if held is not None and held.plan.epoch >= plan.epoch:
            self._refuse(sender, plan.stream_id, plan.epoch, -1, ErrorCode.STALE,
                         f"plan of epoch {plan.epoch}; {self.worker_id} holds epoch {held.plan.epoch}")
            return
        segment = Segment(plan.exit, frozenset(plan.input_names), frozenset(plan.output_names))
        try:
            stage = await asyncio.to_thread(self.runner.stage, segment)
            # one run now: a session's first run is many times slower, and is no frame's business
            await self._run_stage(stage, {k: np.zeros(v, np.float32) for k, v in stage.inputs.items()})
        except ModelError as exc:
            self._refuse(sender, plan.stream_id, plan.epoch, -1, ErrorCode.BAD_PLAN, str(exc))
            return
        await self._stop(*key, announce=False)  # the earlier epoch's frames are the owner's to re-send
        held = _Held(plan=plan, stage=stage, inbox=asyncio.Queue(plan.credits), outbox=asyncio.Queue(plan.credits))
        held.tasks = [asyncio.create_task(self._compute(held), name=f"stage-{plan.stream_id}-compute"),
                      asyncio.create_task(self._send(held), name=f"stage-{plan.stream_id}-send"),
                      asyncio.create_task(self._heartbeat(held), name=f"stage-{plan.stream_id}-heartbeat")]
        self._held[key] = held
        log.info("stage_plan", stream_id=plan.stream_id, owner=plan.owner, epoch=plan.epoch, stage=plan.stage,
                 inputs=list(plan.input_names), outputs=list(plan.output_names), next=list(plan.next))
        await self._ack(held, "ready")

    async def _stop(self, owner: str, stream_id: str, *, announce: bool) -> None:
        held = self._held.pop((owner, stream_id), None)
        if held is None:
            return
        for task in held.tasks:
            task.cancel()
        for task in held.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        dropped = held.inbox.qsize() + held.outbox.qsize()
        if dropped:
            self.metrics.stage_frames.labels("dropped_by_owner").inc(dropped)
        self.metrics.stage_queued.set(self.queued)
        if announce:
            await self._ack(held, "stopped")

    # ---- the stage's tasks --------------------------------------------------------------------------------------
    async def _compute(self, held: _Held) -> None:
        """Frames in arrival order through the stage; outputs to the sender task (bounded: it waits for room)."""
        plan = held.plan
        while True:
            frame = await held.inbox.get()
            try:
                outputs, seconds = await self._run_stage(held.stage, frame.tensors)
            except (ModelError, ValueError) as exc:
                self._refuse(plan.owner, plan.stream_id, plan.epoch, frame.frame, ErrorCode.BAD_TENSOR, str(exc))
                continue
            except Exception as exc:  # the runtime failed on this frame: answered, and the stage keeps serving
                log.exception("stage_failed", stream_id=plan.stream_id, frame=frame.frame)
                self._refuse(plan.owner, plan.stream_id, plan.epoch, frame.frame, ErrorCode.INTERNAL,
                             f"stage failed: {type(exc).__name__}")
                continue
            held.recent.append(seconds)
            held.done += 1
            self.metrics.stage_seconds.observe(seconds)
            await held.outbox.put((frame, outputs, seconds))

    async def _send(self, held: _Held) -> None:
        plan = held.plan
        while True:
            frame, outputs, seconds = await held.outbox.get()
            if plan.next:
                target = plan.next[frame.frame % len(plan.next)]
                topic = self.topics.stage_inbox(target, self.worker_id)
                payload = encode(StageFrame(stream_id=plan.stream_id, owner=plan.owner, epoch=plan.epoch,
                                            frame=frame.frame, stage=plan.stage + 1, tensors=outputs))
            else:
                topic = self.topics.stream_inbox(plan.owner, self.worker_id)
                payload = encode(StageResult(stream_id=plan.stream_id, epoch=plan.epoch, frame=frame.frame,
                                             sender=self.worker_id, outputs=outputs, compute_s=seconds))
            try:
                await self._publish(topic, payload)
            except Exception as exc:  # no session: the owner's watchdog re-sends what was in flight
                log.warning("stage_send_failed", stream_id=plan.stream_id, frame=frame.frame, error=str(exc))
                self.metrics.stage_frames.labels("send_failed").inc()
                continue
            self.metrics.stage_frames.labels("done").inc()
            self.metrics.stage_queued.set(self.queued)

    async def _heartbeat(self, held: _Held) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            with contextlib.suppress(Exception):  # a missed heartbeat is what the owner watches for
                await self._ack(held, "running")

    async def _ack(self, held: _Held, state: str) -> None:
        plan = held.plan
        ack = StageAck(stream_id=plan.stream_id, epoch=plan.epoch, stage=plan.stage, sender=self.worker_id,
                       state=state, queued=held.inbox.qsize() + held.outbox.qsize(), done=held.done,
                       compute_s=statistics.median(held.recent) if held.recent else 0.0)
        await self._publish(self.topics.stream_inbox(plan.owner, self.worker_id), encode(ack))

    # ---- errors -------------------------------------------------------------------------------------------------
    def _refuse(self, to: str, stream_id: str, epoch: int, frame: int, code: ErrorCode, message: str) -> None:
        """Answer what this worker will not take with a ``StageError`` to ``to``'s stream inbox (and count it)."""
        self.metrics.stage_frames.labels(f"refused_{code.value}").inc()
        log.warning("stage_refused", to=to, stream_id=stream_id, epoch=epoch, frame=frame, code=code.value,
                    reason=message)
        error = StageError(stream_id=stream_id, epoch=epoch, frame=frame, code=code, message=message[:2000],
                           sender=self.worker_id)
        self._spawn(self._publish(self.topics.stream_inbox(to, self.worker_id), encode(error)))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._pending.add(task)
        task.add_done_callback(self._spawned_done)

    def _spawned_done(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:  # a lost broker: the owner's watchdog acts
            log.warning("stage_send_failed", error=str(task.exception()) or type(task.exception()).__name__)
