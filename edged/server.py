"""The edge daemon: serves tail stages of the bundles it holds to devices over MQTT."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiomqtt
import structlog

from edged.config import EdgedConfig
from edged.metrics import EdgeMetrics
from models.bundle import Bundle, load_bundle
from models.errors import CutError, ModelError, UnknownTensorError
from models.loaders import read_latency_model
from models.runtime import Stage, StageInputError, StageRunner
from planner.core import Segment
from planner.errors import LatencyModelError
from protocol import session
from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import (
    Advert,
    ErrorReply,
    InferRequest,
    InferResult,
    Probe,
    ProbeReply,
    Status,
    decode,
    encode,
)
from protocol.topics import Topics

log = structlog.get_logger()
SERVICE_EWMA = 0.2
LOAD_POLL_S = 0.25


@dataclass(slots=True)
class Job:
    request: InferRequest
    stage: Stage  # the tail admitted for it
    reply_to: str
    correlation: bytes | None
    arrived: float


@dataclass(slots=True)
class EdgeState:
    """What one edged holds: bundles by digest, their stage runners, and its live load."""

    cfg: EdgedConfig
    bundles: dict[str, Bundle]
    runners: dict[str, StageRunner]
    latency_model: dict[str, object]
    metrics: EdgeMetrics
    queue: asyncio.Queue[Job] = field(default_factory=asyncio.Queue)
    in_service: int = 0
    service_s: float = 0.005

    @classmethod
    def load(cls, cfg: EdgedConfig) -> EdgeState:
        bundles = {b.digest: b for b in (load_bundle(p) for p in cfg.bundles)}
        try:
            latency_model = read_latency_model(cfg.latency_model)
        except LatencyModelError as exc:
            raise ModelError(str(exc)) from exc
        return cls(cfg=cfg, bundles=bundles, latency_model=latency_model, metrics=EdgeMetrics(),
                   runners={d: StageRunner(b, threads=cfg.threads) for d, b in bundles.items()})

    @property
    def depth(self) -> int:
        return self.queue.qsize() + self.in_service

    def expected_wait_s(self) -> float:
        """Time until a request arriving now would be done: the queue ahead of it plus its own service."""
        return (self.depth / self.cfg.workers + 1) * self.service_s

    def advert(self) -> Advert:
        return Advert(edge_id=self.cfg.edge_id, bundles={d: b.name for d, b in self.bundles.items()},
                      latency_model=self.latency_model, queue_depth=self.depth, service_s=self.service_s,
                      workers=self.cfg.workers)


async def run(cfg: EdgedConfig, *, shutdown: asyncio.Event) -> None:
    """Serve until ``shutdown`` is set, then drain in-flight requests and mark this edge offline."""
    state = EdgeState.load(cfg)
    state.metrics.workers.set(cfg.workers)
    if cfg.metrics_port:
        state.metrics.serve(cfg.metrics_port, cfg.metrics_address)
    topics = Topics(cfg.topic_prefix)
    backoff = session.Backoff()
    session.check_credentials(cfg.broker)
    fatal: session.BrokerRefused | None = None
    log.info("edged_started", edge_id=cfg.edge_id, bundles=[b.name for b in state.bundles.values()])
    async with session.Systemd().serving(f"serving {len(state.bundles)} bundle(s); connecting to "
                                         f"{cfg.broker.host}:{cfg.broker.port}") as systemd:
        while not shutdown.is_set() and fatal is None:
            try:
                async with session.client(cfg.broker, identifier=f"edged-{cfg.edge_id}",
                                          will_topic=topics.edge_status(cfg.edge_id), sender=cfg.edge_id) as client:
                    backoff.reset()
                    log.info("mqtt_connected", host=cfg.broker.host, port=cfg.broker.port)
                    systemd.status(f"connected to {cfg.broker.host}:{cfg.broker.port}")
                    await _serve(client, state, topics, shutdown)
            except* session.MQTT_ERRORS as group:
                refused = session.refusal(cfg.broker, group.exceptions[0])
                if isinstance(refused, session.CredentialsRefused):  # retrying cannot help: stop with one line
                    fatal = refused
                else:
                    delay = backoff.next()
                    log.warning("mqtt_disconnected", error=str(group.exceptions[0]), retry_in_s=round(delay, 2))
                    systemd.status(f"{refused}; retrying")
                    await session.sleep_unless(shutdown, delay)
    if fatal is not None:
        raise fatal
    log.info("edged_stopped", edge_id=cfg.edge_id)


async def _serve(client: aiomqtt.Client, state: EdgeState, topics: Topics, shutdown: asyncio.Event) -> None:
    edge_id = state.cfg.edge_id
    filters = [topics.edge_requests(edge_id), topics.edge_probes(edge_id)]
    if state.cfg.pool:
        filters.append(topics.pool_requests())
    for f in filters:  # subscribed before announcing: a device that sees the advert can send at once
        await client.subscribe(f, qos=1)
    await client.publish(topics.edge_status(edge_id), encode(Status(state="online", sender=edge_id)),
                         qos=1, retain=True)
    await client.publish(topics.edge_advert(edge_id), encode(state.advert()), qos=1, retain=True)
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(_receive(client, state, topics), name="receive"),
                 tg.create_task(_adverts(client, state, topics), name="adverts")]
        tasks += [tg.create_task(_worker(client, state), name=f"worker-{i}") for i in range(state.cfg.workers)]
        await shutdown.wait()
        log.info("edged_draining", queued=state.depth)
        for f in filters:
            await client.unsubscribe(f)
        try:
            await asyncio.wait_for(state.queue.join(), timeout=state.cfg.drain_timeout_s)
        except TimeoutError:
            log.warning("drain_timeout", left=state.depth)
        await client.publish(topics.edge_status(edge_id), encode(Status(state="offline", sender=edge_id)),
                             qos=1, retain=True)
        for task in tasks:
            task.cancel()


async def _receive(client: aiomqtt.Client, state: EdgeState, topics: Topics) -> None:
    async for message in client.messages:
        correlation = session.response_of(message)[1]
        try:
            # answers go only to the sending device's own response topic (the broker's ACL vouches for the
            # device id in the request topic), never where a request's response-topic property points
            reply_to = topics.device_responses(topics.device_id_of(str(message.topic)))
        except ProtocolError as exc:
            await _error(client, state, None, correlation, "", exc.code, str(exc))
            continue
        try:
            await _handle(client, state, message, reply_to, correlation)
        except session.MQTT_ERRORS:
            raise
        except Exception as exc:  # a defect in handling one message must not stop the edge: answered, logged
            log.exception("message_failed", topic=str(message.topic)[:200])
            await _error(client, state, reply_to, correlation, "", ErrorCode.INTERNAL,
                         f"edge error on this request: {type(exc).__name__}")


async def _handle(client: aiomqtt.Client, state: EdgeState, message: aiomqtt.Message, reply_to: str,
                  correlation: bytes | None) -> None:
    asked_to = session.response_of(message)[0]
    if asked_to is not None and asked_to != reply_to:
        log.warning("response_topic_ignored", asked=asked_to[:200], answering=reply_to)
    try:
        msg = decode(message.payload if isinstance(message.payload, bytes) else b"", expect=(InferRequest, Probe))
    except ProtocolError as exc:
        await _error(client, state, reply_to, correlation, "", exc.code, str(exc))
        return
    if isinstance(msg, Probe):
        state.metrics.probes.inc()
        reply = ProbeReply(probe_id=msg.probe_id, edge_id=state.cfg.edge_id, size=len(msg.padding))
        await session.send(client, reply_to, encode(reply), session.reply_properties(correlation))
    elif isinstance(msg, InferRequest):
        await _admit(client, state, msg, reply_to, correlation)


async def _admit(client: aiomqtt.Client, state: EdgeState, req: InferRequest, reply_to: str,
                 correlation: bytes | None) -> None:
    """Check a request against what this edge serves and its load; queue it or answer at once."""
    runner = state.runners.get(req.bundle)
    if runner is None:
        await _error(client, state, reply_to, correlation, req.request_id, ErrorCode.UNKNOWN_BUNDLE,
                     f"bundle {req.bundle[:12]} is not served by {state.cfg.edge_id}")
        return
    try:  # the tensors it carries name the cut: the tail runs from them to the exit's output
        segment = Segment(req.exit, frozenset(req.tensors), runner.whole(req.exit).outputs)
        # a new segment's session takes a while to build: off the event loop
        stage = runner.cached(segment)
        if stage is None:
            stage = await asyncio.to_thread(runner.stage, segment)
    except UnknownTensorError as exc:
        await _error(client, state, reply_to, correlation, req.request_id, ErrorCode.BAD_TENSOR, str(exc))
        return
    except (CutError, ModelError) as exc:
        await _error(client, state, reply_to, correlation, req.request_id, ErrorCode.BAD_PLAN, str(exc))
        return
    if stage.skipped != req.cut:
        await _error(client, state, reply_to, correlation, req.request_id, ErrorCode.BAD_PLAN,
                     f"tensors {sorted(req.tensors)} follow {stage.skipped} layers of exit {req.exit}, "
                     f"the request says {req.cut}")
        return
    wait = state.expected_wait_s()
    if wait > req.budget_s:
        await _error(client, state, reply_to, correlation, req.request_id, ErrorCode.BUSY,
                     f"expected {wait * 1e3:.1f} ms here, budget {req.budget_s * 1e3:.1f} ms")
        return
    state.queue.put_nowait(Job(request=req, stage=stage, reply_to=reply_to, correlation=correlation,
                               arrived=time.monotonic()))
    state.metrics.queue_depth.set(state.depth)


async def _worker(client: aiomqtt.Client, state: EdgeState) -> None:
    while True:
        job = await state.queue.get()
        state.in_service += 1
        try:
            answer = await _compute(state, job)
        finally:  # out of the queue before its answer goes out: no advert sent after the answer counts it
            state.in_service -= 1
            state.metrics.queue_depth.set(state.depth)
            state.queue.task_done()
        req = job.request
        if isinstance(answer, InferResult):
            await session.send(client, job.reply_to, encode(answer), session.reply_properties(job.correlation))
            state.metrics.requests.labels("ok").inc()
            state.metrics.request_seconds.observe(time.monotonic() - job.arrived)
        else:
            await _error(client, state, job.reply_to, job.correlation, req.request_id, *answer)


async def _compute(state: EdgeState, job: Job) -> InferResult | tuple[ErrorCode, str]:
    """Run one queued request's tail: its result, or why not."""
    req = job.request
    queued = time.monotonic() - job.arrived
    if queued > req.budget_s:
        return ErrorCode.EXPIRED, f"waited {queued * 1e3:.1f} ms, budget {req.budget_s * 1e3:.1f} ms"
    start = time.monotonic()
    try:
        outputs = await asyncio.to_thread(job.stage.run, req.tensors)
    except StageInputError as exc:
        return ErrorCode.BAD_TENSOR, str(exc)
    except Exception as exc:  # the runtime failed on this request: answer it, keep serving
        log.exception("stage_failed", request_id=req.request_id)
        return ErrorCode.INTERNAL, f"runtime error: {type(exc).__name__}"
    compute = time.monotonic() - start
    state.service_s = (1 - SERVICE_EWMA) * state.service_s + SERVICE_EWMA * compute
    state.metrics.stage_seconds.observe(compute)
    return InferResult(request_id=req.request_id, edge_id=state.cfg.edge_id, exit=req.exit, outputs=outputs,
                       queue_s=queued, compute_s=compute)


async def _adverts(client: aiomqtt.Client, state: EdgeState, topics: Topics) -> None:
    """Republish the retained advert when the load changes, and at least every ``advert_interval_s``."""
    last_depth, last_sent = state.depth, time.monotonic()
    while True:
        await asyncio.sleep(LOAD_POLL_S)
        now = time.monotonic()
        if state.depth != last_depth or now - last_sent >= state.cfg.advert_interval_s:
            last_depth, last_sent = state.depth, now
            await client.publish(topics.edge_advert(state.cfg.edge_id), encode(state.advert()), qos=1, retain=True)


async def _error(client: aiomqtt.Client, state: EdgeState, reply_to: str | None, correlation: bytes | None,
                 request_id: str, code: ErrorCode, text: str) -> None:
    state.metrics.requests.labels(code.value).inc()
    log.warning("request_rejected", request_id=request_id, code=code.value, reason=text)
    if reply_to is None:
        return  # unreadable and unaddressed: nobody to answer; counted and logged
    reply = ErrorReply(request_id=request_id, code=code, message=text[:2000], sender=state.cfg.edge_id)
    await session.send(client, reply_to, encode(reply), session.reply_properties(correlation))
