"""deviced's one inbound path: every message is decoded once, then its handler is looked up in one table by the
channel it came on (which the topic names) and its message type."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import structlog

from protocol.errors import ProtocolError
from protocol.messages import Message, decode
from protocol.topics import Topics, check_id

log = structlog.get_logger()


class Channel(StrEnum):
    """Where a message came in; ``Inbound.sender`` is the id the topic names for it."""

    EDGE_STATUS = "edge_status"  # an edge's retained status (sender: the edge)
    EDGE_ADVERT = "edge_advert"  # an edge's retained advert (sender: the edge)
    RESPONSES = "responses"  # answers to this device's requests and probes
    APPS = "apps"  # requests of this device's local applications
    STAGE = "stage"  # this device as a pipeline worker: plans, frames, stops (sender: the topic's last level)
    STREAM = "stream"  # this device as a stream's owner: acks, results, errors (sender: the topic's last level)
    DEVICE_STATUS = "device_status"  # another device's retained status (sender: that device)


@dataclass(frozen=True, slots=True, kw_only=True)
class Inbound:
    """One decoded message and what its topic and properties say about it."""

    channel: Channel
    sender: str  # the edge or device the topic names (the broker's ACL vouches for it)
    message: Message
    topic: str
    reply_to: str | None = None  # MQTT v5 response topic and correlation data (application requests)
    correlation: bytes | None = None


Handler = Callable[[Inbound], None]
Reject = Callable[["Rejected"], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class Rejected:
    """A message that failed validation, with where it came from (a channel's reject handler may answer it)."""

    channel: Channel
    sender: str
    topic: str
    error: ProtocolError
    reply_to: str | None = None
    correlation: bytes | None = None


class Router:
    """``on(channel, type, handler)`` fills the table; ``handle`` decodes once and calls the one handler.

    A message of a type its channel does not take, or that fails validation, goes to the channel's reject handler
    (``on_reject``; default: logged) and never reaches a handler. A handler's own failure is logged and the daemon
    keeps serving."""

    def __init__(self, topics: Topics, device_id: str) -> None:
        self.topics = topics
        self.device_id = device_id
        self._handlers: dict[tuple[Channel, type[Message]], Handler] = {}
        self._rejects: dict[Channel, Reject] = {}

    def on(self, channel: Channel, *types: type[Message], handler: Handler) -> None:
        for t in types:
            self._handlers[channel, t] = handler

    def on_reject(self, channel: Channel, handler: Reject) -> None:
        self._rejects[channel] = handler

    def channel_of(self, topic: str) -> tuple[Channel, str] | None:
        """(channel, sender) of a topic this device subscribes to; None for one it ignores (its own status)."""
        if (edge := self.topics.edge_topic(topic)) is not None:
            edge_id, what = edge
            channel = {"status": Channel.EDGE_STATUS, "advert": Channel.EDGE_ADVERT}.get(what)
            return (channel, check_id(edge_id, "edge id")) if channel is not None else None
        if (dev := self.topics.dev_topic(topic)) is None:
            return None
        device_id, what = dev
        if device_id != self.device_id:
            return (Channel.DEVICE_STATUS, check_id(device_id, "device id")) if what == "status" else None
        if what in ("stage", "stream"):
            return Channel(what), self.topics.device_id_of(topic)
        channel = {"resp": Channel.RESPONSES, "infer": Channel.APPS}.get(what)
        return (channel, device_id) if channel is not None else None

    def handle(self, topic: str, payload: bytes, *, reply_to: str | None = None,
               correlation: bytes | None = None) -> None:
        try:
            where = self.channel_of(topic)
        except ProtocolError as exc:  # a sender id no ACL would allow; nothing to answer
            log.warning("message_rejected", topic=topic, error=str(exc))
            return
        if where is None:
            return
        channel, sender = where
        takes = tuple(t for c, t in self._handlers if c is channel)
        if not takes:
            return  # a channel nothing listens on now (a one-shot client takes no application requests)
        if not payload and channel not in self._rejects:
            return  # a retained message cleared; only a channel that answers its rejects answers an empty one
        try:
            msg = decode(payload, expect=takes)
        except ProtocolError as exc:
            self._reject(Rejected(channel=channel, sender=sender, topic=topic, error=exc, reply_to=reply_to,
                                  correlation=correlation))
            return
        handler = self._handlers[channel, type(msg)]
        try:
            handler(Inbound(channel=channel, sender=sender, message=msg, topic=topic, reply_to=reply_to,
                            correlation=correlation))
        except ProtocolError as exc:
            log.warning("message_rejected", topic=topic, error=str(exc))
        except Exception:  # a message that validated but still broke its handler: log it, keep serving
            log.exception("message_failed", topic=topic, kind=msg.kind)

    def _reject(self, rejected: Rejected) -> None:
        handler = self._rejects.get(rejected.channel)
        if handler is None:
            log.warning("message_rejected", topic=rejected.topic, error=str(rejected.error))
        else:
            handler(rejected)
