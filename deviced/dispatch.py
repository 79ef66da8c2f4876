"""deviced's MQTT side: what it sends to edges, how replies find their waiters, and what a lost broker ends."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import aiomqtt
import structlog

from deviced.calls import PendingCalls
from deviced.edges import EdgeDirectory
from deviced.errors import BrokerLost
from deviced.inbound import Inbound
from deviced.link import PROBE_TIMEOUT_S
from protocol import session
from protocol.errors import MalformedMessage
from protocol.messages import ErrorReply, InferResult, Message, Probe, ProbeReply, encode
from protocol.topics import Topics

log = structlog.get_logger()


class Connection(Enum):
    """Where the MQTT session stands."""

    DOWN = "down"
    UP = "up"


@dataclass(frozen=True, slots=True, kw_only=True)
class Outgoing:
    """A request or probe ready to send: its id, topic, payload, MQTT properties, and the bytes it puts on the uplink
    (MQTT and TCP/IP headers included), computed once."""

    correlation: str
    topic: str
    payload: bytes
    properties: Any
    wire_bytes: int


class Dispatch:
    """Sends requests and probes and matches the replies (``on_reply``, from the router) to their waiters.

    ``attach`` and ``detach`` follow the MQTT session; ``detach`` fails every waiter at once with
    ``BrokerLost`` (the real cause), so no request waits out a timeout for a reply that cannot come.
    """

    def __init__(self, *, device_id: str, topics: Topics, edges: EdgeDirectory, id_prefix: str,
                 on_late_result: Callable[[InferResult], None], emulated_uplink_bps: float = 0.0) -> None:
        self.device_id = device_id
        self.topics = topics
        self.edges = edges
        self.state = Connection.DOWN
        self.last_error: BaseException | None = None  # why the last session ended (or could not start)
        self._client: aiomqtt.Client | None = None
        self._calls: PendingCalls[str, Message] = PendingCalls()
        self._ids = itertools.count()
        self._prefix = id_prefix
        self._on_late_result = on_late_result
        self._uplink = asyncio.Lock()
        self._emulated_bps = emulated_uplink_bps
        self._emulated_queued = 0  # with an emulated uplink: bytes waiting in it

    # ---- the session ------------------------------------------------------------------------------
    def attach(self, client: aiomqtt.Client) -> None:
        self._client, self.state = client, Connection.UP

    def detach(self, cause: BaseException | None = None) -> None:
        """The session ended: fail every waiter now with ``BrokerLost``. Safe to call twice."""
        self._client, self.state = None, Connection.DOWN
        if cause is not None:
            self.last_error = cause
        failed = self._calls.fail_all(BrokerLost(f"broker connection lost: {cause}" if cause else
                                                 "broker connection closed"))
        if failed:
            log.warning("pending_failed", waiters=failed, error=str(cause))

    @property
    def connected(self) -> bool:
        return self.state is Connection.UP

    @property
    def waiting(self) -> int:
        """Requests and probes sent and waiting for their answers."""
        return len(self._calls)

    def new_id(self, tag: str = "") -> str:
        return f"{self._prefix}-{tag}{next(self._ids)}"

    # ---- outgoing ---------------------------------------------------------------------------------
    def request(self, edge_id: str, request_id: str, payload: bytes, *, expiry_s: float) -> Outgoing:
        """An encoded ``InferRequest`` for ``edge_id``, ready to send (and what it will put on the uplink)."""
        return self._outgoing(self.topics.edge_request(edge_id, self.device_id), request_id, payload, expiry_s)

    async def infer(self, request: Outgoing, *, timeout_s: float) -> InferResult | ErrorReply:
        """Send ``request`` and wait for its answer at most ``timeout_s``, the upload included (it goes on if the
        wait ends first: bytes handed to the link are sent, and a late answer still teaches the link estimate).
        Raises TimeoutError (no answer in time) or BrokerLost (no session, or it ended meanwhile)."""
        request_id = request.correlation
        with self._calls.expect(request_id) as answer:
            sending = asyncio.ensure_future(self._upload(request))
            sending.add_done_callback(_seen)
            async with asyncio.timeout(max(timeout_s, 0.0)):
                await asyncio.shield(sending)
                reply = await answer
        if not isinstance(reply, InferResult | ErrorReply):
            raise MalformedMessage(f"a {reply.kind} message answered request {request_id}")
        return reply

    async def probe(self, edge_id: str, padding: int, *, timeout_s: float = PROBE_TIMEOUT_S) -> int:
        """One probe of ``padding`` bytes there and back; returns the bytes it put on the uplink (TimeoutError,
        BrokerLost)."""
        probe_id = self.new_id("p")
        payload = encode(Probe(probe_id=probe_id, device_id=self.device_id, padding=bytes(padding)))
        probe = self._outgoing(self.topics.edge_probe(edge_id, self.device_id), probe_id, payload, PROBE_TIMEOUT_S)
        with self._calls.expect(probe_id) as answer:
            await self._upload(probe)
            await asyncio.wait_for(answer, timeout=timeout_s)
        return probe.wire_bytes

    async def publish(self, topic: str, payload: bytes) -> None:
        """Publish one message (a pipeline stage's plan, frame, result or heartbeat); BrokerLost without a session."""
        await self._publish(topic, payload, None)

    def uplink_backlog(self) -> int:
        """Bytes of our earlier messages not yet across the uplink (measured on the connection, not modelled): a
        new upload queues behind them."""
        on_socket = session.unsent_bytes(self._client) if self._client is not None else 0
        return on_socket + self._emulated_queued

    def socket(self) -> socket.socket | None:
        """The MQTT connection's socket (for pacing), if connected."""
        if self._client is None:
            return None
        sock = self._client._client.socket()  # aiomqtt has no public accessor for its paho client
        return sock if isinstance(sock, socket.socket) else None

    def set_emulated_uplink(self, bps: float) -> None:
        """Change the in-application uplink emulation (0: off) while running."""
        self._emulated_bps = bps

    # ---- incoming ---------------------------------------------------------------------------------
    def on_reply(self, inbound: Inbound) -> None:
        """An edge's answer on our response topic: to the waiting request or probe (a late result is evidence for
        the link estimator)."""
        msg = inbound.message
        assert isinstance(msg, InferResult | ErrorReply | ProbeReply)
        self.edges.heard_from(msg.sender if isinstance(msg, ErrorReply) else msg.edge_id)
        if isinstance(msg, InferResult):
            self.edges.served(msg.edge_id)
            if not self._calls.resolve(msg.request_id, msg):
                self._on_late_result(msg)
        else:
            self._calls.resolve(msg.probe_id if isinstance(msg, ProbeReply) else msg.request_id, msg)

    # ---- private ----------------------------------------------------------------------------------
    async def _publish(self, topic: str, payload: bytes, props: Any) -> None:
        client = self._client
        if client is None:
            raise BrokerLost("not connected to the broker")
        try:
            await session.send(client, topic, payload, props)
        except session.MQTT_ERRORS as exc:
            self.detach(exc)
            raise BrokerLost(f"publish failed: {exc}") from exc

    def _outgoing(self, topic: str, correlation: str, payload: bytes, expiry_s: float) -> Outgoing:
        props = session.request_properties(response_topic=self.topics.device_responses(self.device_id),
                                           correlation=correlation, expiry_s=max(expiry_s, 0.001))
        return Outgoing(correlation=correlation, topic=topic, payload=payload, properties=props,
                        wire_bytes=session.wire_bytes(topic, len(payload), props))

    async def _upload(self, out: Outgoing) -> None:
        """The (emulated) uplink's transfer of what ``out`` puts on the wire, then its publish."""
        await self._emulate_upload(out.wire_bytes)
        await self._publish(out.topic, out.payload, out.properties)

    async def _emulate_upload(self, nbytes: int) -> None:
        """With an emulated uplink: wait out the transfer of ``nbytes``, behind any queued before them."""
        if not self._emulated_bps:
            return
        self._emulated_queued += nbytes
        try:
            async with self._uplink:
                await asyncio.sleep(8.0 * nbytes / self._emulated_bps)
        finally:
            self._emulated_queued -= nbytes


def _seen(task: asyncio.Future[None]) -> None:
    """An upload whose waiter gave up: its failure (the broker gone) was already met by that waiter, or is moot."""
    if not task.cancelled():
        task.exception()
