"""deviced's MQTT session and the in-process client API for applications."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import aiomqtt
import numpy as np
import numpy.typing as npt
import structlog

from deviced.calls import PendingCalls
from deviced.config import DEPLOYED_CONFIG, DevicedConfig, app_user
from deviced.config import load as load_config
from deviced.engine import Device, Outcome
from deviced.errors import BrokerLost
from deviced.inbound import Channel
from deviced.stream import Stream, StreamResult
from models.bundle import load_bundle
from models.loaders import load_latency_model
from models.runtime import StageRunner
from planner.fleet import Fleet
from planner.units import parse_duration
from protocol import session
from protocol.errors import ErrorCode, MalformedMessage, ProtocolError, TensorError
from protocol.messages import AppRequest, AppResult, ErrorReply, Message, Status, decode, encode
from protocol.session import BrokerConfig
from protocol.topics import DEFAULT_PREFIX, Topics, check_id

log = structlog.get_logger()
CONNECT_TIMEOUT_S = 10.0  # a client's wait for its first broker session
APPS_DIR = Path("/etc/coinfer/apps")  # an application's broker password: <app>.password, readable by its group


def build_device(cfg: DevicedConfig) -> Device:
    """Load the bundle and this device's latency model; raises ModelError / LatencyModelError."""
    bundle = load_bundle(cfg.bundle)
    model = load_latency_model(cfg.latency_model)
    runner = StageRunner(bundle, threads=cfg.threads)
    # every whole exit, built now: the first local request (or fallback) of each would otherwise wait for its
    # session (~60 ms for exit 1 under a 10% CPU quota), and a broken model shows at start, not mid-request
    runner.warm(runner.whole(info.index) for info in bundle.exits)
    return Device(cfg, bundle=bundle, runner=runner, device_model=model)


async def run(device: Device, *, shutdown: asyncio.Event, connected: asyncio.Event | None = None,
              daemon: bool = True, systemd: session.Systemd | None = None) -> None:
    """Keep the device's MQTT session up (reconnecting with backoff) until ``shutdown`` is set.

    ``daemon``: this is the device's one deviced (its client id, retained status and last will, and the
    applications' request topic); otherwise a one-shot client beside it (``deviced infer``) that takes none of
    those, so it never displaces the running daemon. ``systemd`` gets a STATUS line at every (dis)connection.
    """
    cfg, topics = device.cfg, device.topics
    where = f"{cfg.broker.host}:{cfg.broker.port}"
    backoff = session.Backoff()
    session.check_credentials(cfg.broker)
    fatal: session.BrokerRefused | None = None
    identifier = f"deviced-{cfg.device_id}" if daemon else f"deviced-{cfg.device_id}-cli-{os.getpid()}"
    subscriptions = [topics.all_edge_status(), topics.all_edge_adverts(), topics.device_responses(cfg.device_id)]
    if daemon:  # the device's own: its applications' requests, and its part in pipelined streams
        subscriptions += [topics.device_infer(cfg.device_id), topics.stage_inboxes(cfg.device_id),
                          topics.stream_inboxes(cfg.device_id), topics.all_device_status()]
    while not shutdown.is_set() and fatal is None:
        try:
            async with session.client(cfg.broker, identifier=identifier,
                                      will_topic=topics.device_status(cfg.device_id) if daemon else "",
                                      sender=cfg.device_id) as client:
                for topic in subscriptions:
                    await client.subscribe(topic, qos=1)
                if daemon:
                    await client.publish(topics.device_status(cfg.device_id),
                                         encode(Status(state="online", sender=cfg.device_id)), qos=1, retain=True)
                device.dispatch.attach(client)
                backoff.reset()
                log.info("mqtt_connected", device_id=cfg.device_id, broker=where)
                if systemd is not None:
                    systemd.status(f"device {cfg.device_id}: connected to {where}")
                if connected is not None:
                    connected.set()
                async with asyncio.TaskGroup() as tg:
                    tasks = [tg.create_task(_receive(client, device, daemon=daemon), name="receive"),
                             tg.create_task(_probe_loop(device), name="probe")]
                    await shutdown.wait()
                    await device.stages.close()  # no heartbeat or frame publishes into a closing session
                    if daemon:
                        await client.publish(topics.device_status(cfg.device_id),
                                             encode(Status(state="offline", sender=cfg.device_id)), qos=1,
                                             retain=True)
                    for task in tasks:
                        task.cancel()
        except* session.MQTT_ERRORS as group:
            error = _first_leaf(group)
            refused = session.refusal(cfg.broker, error)
            device.dispatch.detach(error)
            if connected is not None:
                connected.clear()
            if isinstance(refused, session.CredentialsRefused):  # retrying cannot help: stop with one line
                fatal = refused
            else:
                delay = backoff.next()
                log.warning("mqtt_disconnected", error=str(error), retry_in_s=round(delay, 2))
                if systemd is not None:
                    systemd.status(f"device {cfg.device_id}: {refused}; retrying")
                await session.sleep_unless(shutdown, delay)
        finally:
            device.dispatch.detach()
    device.edges.close()
    device.actuator.restore()
    if fatal is not None:
        raise fatal


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first actual error in a (possibly nested) exception group: what a log line should say."""
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


async def _receive(client: aiomqtt.Client, device: Device, *, daemon: bool) -> None:
    """Every inbound message through the device's one router; the applications' requests (the daemon's only) are
    answered in tasks of their own."""
    async with asyncio.TaskGroup() as tg:
        if daemon:
            device.router.on(Channel.APPS, AppRequest,
                             handler=lambda inbound: _spawn_app(tg, client, device, inbound.message, inbound.reply_to,
                                                                inbound.correlation))
            device.router.on_reject(Channel.APPS, lambda rejected: _spawn_app(
                tg, client, device, rejected.error, rejected.reply_to, rejected.correlation))
        try:
            async for message in client.messages:
                if isinstance(message.payload, bytes):
                    reply_to, correlation = session.response_of(message)
                    device.router.handle(str(message.topic), message.payload, reply_to=reply_to,
                                         correlation=correlation)
        except session.MQTT_ERRORS as exc:  # the session is gone: every waiter learns it now, not at its timeout
            device.dispatch.detach(exc)
            raise


def _spawn_app(tg: asyncio.TaskGroup, client: aiomqtt.Client, device: Device, request: Message | ProtocolError,
               reply_to: str | None, correlation: bytes | None) -> None:
    tg.create_task(_serve_app(client, device, request, reply_to, correlation))


async def _serve_app(client: aiomqtt.Client, device: Device, request: Message | ProtocolError, reply_to: str | None,
                     correlation: bytes | None) -> None:
    """Answer one application request from the local topic with an ``AppResult`` or an ``ErrorReply`` (``request``:
    the decoded request, or why it failed validation)."""
    cfg = device.cfg
    if reply_to is not None and not device.topics.is_app_response(cfg.device_id, reply_to):
        reply_to = None  # deviced answers only under its own app namespace, never where a request points it
    request_id = ""
    try:
        if reply_to is None:
            raise MalformedMessage(f"an app request needs a response topic under "
                                   f"{device.topics.app_responses(cfg.device_id, '<client>')}")
        if isinstance(request, ProtocolError):
            raise request
        assert isinstance(request, AppRequest)
        request_id = request.request_id
        x = next(iter(request.tensors.values()))
        if x.size != int(np.prod(device.bundle.input_shape)):
            raise TensorError(f"input of {x.size} values; the model takes {list(device.bundle.input_shape)}")
        outcome = await device.infer(x.astype(np.float32),
                                     request.deadline_s or parse_duration(cfg.default_deadline))
        answer: AppResult | ErrorReply = AppResult(
            request_id=request_id, outputs={"logits": outcome.logits}, exit=outcome.exit, where=outcome.where,
            latency_s=outcome.latency_s, deadline_s=outcome.deadline_s, fallback=outcome.fallback or "",
            edge_id=outcome.edge_id or "")
    except Exception as exc:  # any failure is answered; the daemon keeps serving
        code = exc.code if isinstance(exc, ProtocolError) else ErrorCode.INTERNAL
        device.metrics.app_errors.labels(code.value).inc()
        log.warning("app_request_failed", request_id=request_id, code=code.value, reason=str(exc),
                    exc_info=code is ErrorCode.INTERNAL)
        if reply_to is None:
            return  # nobody to answer: counted and logged
        text = str(exc) if isinstance(exc, ProtocolError) else f"device error: {type(exc).__name__}"
        answer = ErrorReply(request_id=request_id, code=code, message=text[:2000], sender=cfg.device_id)
    with contextlib.suppress(*session.MQTT_ERRORS):  # disconnected: the application's own timeout covers it
        await session.send(client, reply_to, encode(answer), session.reply_properties(correlation))


async def _probe_loop(device: Device) -> None:
    """Probe the chosen edge now and then (passive estimates from every request fill the gaps)."""
    if device.cfg.probe_interval_s <= 0:
        return
    while True:
        edge = device.edges.choose(asyncio.get_running_loop().time())
        if edge is not None:
            await device.probe(edge.edge_id)
        await asyncio.sleep(device.cfg.probe_interval_s if edge is not None else 0.5)


class Client:
    """In-process API: ``async with Client(cfg) as c: outcome = await c.infer(x, deadline=0.3)``."""

    def __init__(self, cfg: DevicedConfig | None = None, *, daemon: bool = True) -> None:
        """``daemon=False``: a one-shot client beside a running ``deviced run`` of the same device (see ``run``)."""
        self.cfg = cfg or DevicedConfig()
        self.device = build_device(self.cfg)
        self._daemon = daemon
        self._shutdown = asyncio.Event()
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Client:
        self._task = asyncio.create_task(run(self.device, shutdown=self._shutdown, connected=self._connected,
                                             daemon=self._daemon), name=f"deviced-{self.cfg.device_id}")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._shutdown.set()
        if self._task is not None:
            await self._task

    async def wait_connected(self, timeout: float = CONNECT_TIMEOUT_S) -> None:
        """Wait for the broker session; ``session.BrokerRefused`` (one line) when the broker refuses us, or is not
        reached within ``timeout``: what a one-shot client says instead of answering everything on the device."""
        await self._connection(timeout)
        if not self._connected.is_set():
            cause = self.device.dispatch.last_error
            broker = self.cfg.broker
            raise (session.refusal(broker, cause) if cause is not None else
                   session.BrokerRefused(f"broker {broker.host}:{broker.port}: no session within {timeout:g} s"))

    async def wait_for_edge(self, timeout: float = 5.0) -> bool:
        """Wait until connected and some usable edge is known (its retained status and advert arrived); raises
        ``session.BrokerRefused`` when the broker refused us."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        await self._connection(timeout)
        while loop.time() < end:
            if self.device.edges.choose(loop.time()) is not None:
                return True
            await asyncio.sleep(0.02)
        return False

    async def infer(self, x: npt.NDArray[np.float32], deadline: float | None = None) -> Outcome:
        """One request; ``deadline`` in seconds (default: the config's ``default_deadline``). Without a broker
        session it is answered on the device; ``session.BrokerRefused`` once the broker has refused us."""
        self._raise_if_stopped()
        return await self.device.infer(x, deadline if deadline is not None else
                                       parse_duration(self.cfg.default_deadline))

    async def stream(self, frames: AsyncIterable[npt.NDArray[Any]] | Iterable[npt.NDArray[Any]], fleet: Fleet, *,
                     exit_index: int | None = None, method: str | None = None,
                     on_start: Callable[[Stream], None] | None = None) -> AsyncIterator[StreamResult]:
        """Stream model inputs through a pipeline over ``fleet`` (its ``source``: this device; the workers: running
        deviceds of those ids on the same broker); one ``StreamResult`` per frame, in input order. The producer
        is read only as fast as the pipeline has room (``deviced/stream.py``)."""
        await self.wait_connected()
        async for result in self.device.stream(frames, fleet, exit_index=exit_index, method=method,
                                               on_start=on_start):
            yield result


    async def _connection(self, timeout: float) -> None:
        """Wait until connected, the session task ends, or ``timeout``; a session that ended with an error raises
        it (a refused credential)."""
        assert self._task is not None, "use Client as an async context manager"
        up = asyncio.ensure_future(self._connected.wait())
        try:
            await asyncio.wait({up, self._task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            up.cancel()
        self._raise_if_stopped()

    def _raise_if_stopped(self) -> None:
        if self._task is not None and self._task.done() and not self._task.cancelled() and self._task.exception():
            raise cast(BaseException, self._task.exception())



class RemoteError(Exception):
    """deviced answered an application request with an error reply."""

    def __init__(self, reply: ErrorReply) -> None:
        super().__init__(f"{reply.code.value}: {reply.message}")
        self.reply = reply


class RemoteClient:
    """An application's handle on a running ``deviced run`` through the broker (the local request topic).

    On a deployed device: ``async with RemoteClient.from_config(app="camera") as c: r = await c.infer(x)``
    (the broker, device id and TLS from ``/etc/coinfer/deviced.toml``, the application's own credentials from
    ``coinfer broker add-app``). Locally: ``RemoteClient(BrokerConfig(port=...), "device-1")``.
    """

    @classmethod
    def from_config(cls, path: Path | str = DEPLOYED_CONFIG, *, app: str,
                    password_file: Path | str | None = None) -> RemoteClient:
        """A client of the deviced configured in ``path`` (its broker, TLS, device id and topic prefix), as the
        application ``app``: broker user ``<device_id>.<app>``, password from ``password_file`` (default
        ``/etc/coinfer/apps/<app>.password``, or ``$COINFER_MQTT_PASSWORD``), MQTT client id ``app``."""
        cfg = load_config(Path(path))
        check_id(app, "app name")
        secret = Path(password_file) if password_file else APPS_DIR / f"{app}.password"
        broker = replace(cfg.broker, username=app_user(cfg.device_id, app), password_file=str(secret))
        return cls(broker, cfg.device_id, client_id=app, prefix=cfg.topic_prefix)

    def __init__(self, broker: BrokerConfig, device_id: str, *, client_id: str = "",
                 prefix: str = DEFAULT_PREFIX) -> None:
        self.topics = Topics(prefix)
        self.device_id = device_id
        self.client_id = client_id or f"app-{os.getpid()}-{next(_app_ids)}"
        self.broker = broker
        self._calls: PendingCalls[bytes, AppResult | ErrorReply] = PendingCalls()
        self._ids = itertools.count()
        self._stack = contextlib.AsyncExitStack()
        self._client: aiomqtt.Client | None = None

    async def __aenter__(self) -> RemoteClient:
        """Connect; ``session.BrokerRefused`` (one clear line) when the broker is unreachable or refuses us."""
        async with contextlib.AsyncExitStack() as stack:
            try:
                self._client = await stack.enter_async_context(session.client(self.broker,
                                                                              identifier=self.client_id))
            except session.MQTT_ERRORS as exc:
                raise session.refusal(self.broker, exc) from exc
            await self._client.subscribe(self.topics.app_responses(self.device_id, self.client_id), qos=1)
            reader = asyncio.create_task(self._read(self._client), name=f"{self.client_id}-read")
            stack.push_async_callback(_cancel, reader)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def infer(self, x: npt.NDArray[np.float32], deadline: float = 0.0, *, timeout: float = 5.0) -> AppResult:
        """One request; ``deadline`` in seconds (0: deviced's default). Raises RemoteError, TimeoutError, or
        BrokerLost when the broker connection ends meanwhile."""
        assert self._client is not None, "use RemoteClient as an async context manager"
        request_id = f"{self.client_id}-{next(self._ids)}"[-64:]
        props = session.request_properties(response_topic=self.topics.app_responses(self.device_id, self.client_id),
                                           correlation=request_id, expiry_s=max(deadline, timeout))
        with self._calls.expect(request_id.encode()) as future:
            await self._client.publish(self.topics.device_infer(self.device_id),
                                       encode(AppRequest(request_id=request_id, tensors={"input": x},
                                                         deadline_s=deadline)),
                                       qos=1, properties=props)
            answer = await asyncio.wait_for(future, timeout=max(deadline, 0.0) + timeout)
        if isinstance(answer, ErrorReply):
            raise RemoteError(answer)
        return answer

    async def _read(self, client: aiomqtt.Client) -> None:
        try:
            async for message in client.messages:
                _, correlation = session.response_of(message)
                if not isinstance(message.payload, bytes):
                    continue
                try:
                    answer = decode(message.payload, expect=(AppResult, ErrorReply))
                except ProtocolError as exc:
                    self._calls.fail(correlation or b"", exc)
                else:
                    assert isinstance(answer, AppResult | ErrorReply)
                    self._calls.resolve(correlation or b"", answer)
        except session.MQTT_ERRORS as exc:  # the broker is gone: every waiting call fails now, not at its timeout
            self._calls.fail_all(BrokerLost(f"broker connection lost: {exc}"))
            raise


_app_ids = itertools.count()


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
