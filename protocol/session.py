"""The MQTT v5 session both daemons use: client options, last will, reconnect backoff, logging, signals.

This is the wire contract's binding to aiomqtt (pinned < 3); message content stays in ``messages``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import random
import signal
import socket
import struct
import sys
import termios
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO, cast

import aiomqtt
import sdnotify
import structlog
from paho.mqtt import client as mqtt_client
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from protocol.messages import Status, encode

BACKOFF_INITIAL_S = 0.2
BACKOFF_MAX_S = 10.0
KEEPALIVE_S = 10
PASSWORD_ENV = "COINFER_MQTT_PASSWORD"
# systemd's LoadCredential=mqtt-password:/etc/coinfer/... puts the file under $CREDENTIALS_DIRECTORY
PASSWORD_CREDENTIAL = "mqtt-password"
# CONNACK codes of a broker that refused our credentials: MQTT 3.1.1's 4 and 5, MQTT 5's 134 and 135
REFUSED_CREDENTIALS = frozenset({4, 5, 134, 135})
MQTT_ERRORS = (aiomqtt.MqttError,)
# Requests, replies and probes are deadline-bound: a redelivered copy would arrive too late to matter, and a
# lost one is covered by the device's bounded wait and local fallback. QoS 0 saves the PUBACK round trip
# (~0.2 ms per message on loopback). Retained status and adverts stay at QoS 1.
TRAFFIC_QOS = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerConfig:
    """Where the broker is and who we are to it. The password is never in the config: it comes from
    ``$COINFER_MQTT_PASSWORD``, the systemd credential ``mqtt-password``, or ``password_file``."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str = ""
    tls: bool = False
    ca_file: str = ""  # CA that signed the broker's certificate ("": the system's CAs)
    password_file: str = ""  # a file holding the password (an application's, e.g. /etc/coinfer/apps/NAME.password)

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"bad broker port {self.port}")
        if self.ca_file and not self.tls:
            raise ValueError("ca_file is set but tls is false")


def password(cfg: BrokerConfig | None = None) -> str | None:
    """The MQTT password: ``$COINFER_MQTT_PASSWORD``, else the systemd credential file, else the config's
    ``password_file``, else none."""
    if os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV]
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds:
        with contextlib.suppress(OSError):
            return (Path(creds) / PASSWORD_CREDENTIAL).read_text().strip() or None
    if cfg is not None and cfg.password_file:
        try:
            return Path(cfg.password_file).read_text().strip() or None
        except OSError as exc:
            raise CredentialsRefused(f"cannot read the MQTT password from {cfg.password_file}: "
                                     f"{exc.strerror}") from exc
    return None


class BrokerRefused(Exception):
    """The broker could not be reached or refused us; the message is one line a user can act on."""


class CredentialsRefused(BrokerRefused):
    """The broker refused our credentials, or there is no password for our user: retrying cannot help."""


def check_credentials(cfg: BrokerConfig) -> None:
    """``CredentialsRefused`` when ``cfg`` names a user but no password can be found for it (before connecting:
    the broker would only answer "not authorized")."""
    if cfg.username and password(cfg) is None:
        raise CredentialsRefused(f"broker {cfg.host}:{cfg.port}: no password for user {cfg.username!r} (set "
                                 f"${PASSWORD_ENV}, [broker] password_file, or the systemd credential "
                                 f"{PASSWORD_CREDENTIAL})")


def refusal(cfg: BrokerConfig, exc: BaseException) -> BrokerRefused:
    """A failed connection to ``cfg``'s broker as one clear line: refused credentials, unreachable, TLS."""
    text = str(exc)
    where = f"broker {cfg.host}:{cfg.port}"
    rc = exc.rc if isinstance(exc, aiomqtt.MqttCodeError) else None
    code = rc if isinstance(rc, int) or rc is None else rc.value  # paho's ReasonCode (MQTT 5) or an int (3.1.1)
    if code in REFUSED_CREDENTIALS:
        who = f"user {cfg.username!r}" if cfg.username else "an anonymous client"
        try:
            known = password(cfg) is not None
        except BrokerRefused:
            known = False
        hint = f"{who} with {'this password' if known else 'no password'}"
        return CredentialsRefused(f"{where} refused {hint}: not authorized (check [broker] username and the password "
                             f"file or ${PASSWORD_ENV})")
    if "CERTIFICATE" in text.upper() or "SSL" in text.upper() or "TLS" in text.upper():
        return BrokerRefused(f"{where}: TLS failed ({text.strip()}); check [broker] host (the name in the broker's "
                             f"certificate) and ca_file")
    return BrokerRefused(f"{where} unreachable: {text.strip() or type(exc).__name__} (is mosquitto running, and is "
                         f"[broker] host/port right?)")


def client(cfg: BrokerConfig, *, identifier: str, will_topic: str = "", sender: str = "") -> aiomqtt.Client:
    """A fresh client; with ``will_topic``, its last will marks that topic offline (retained)."""
    will = (aiomqtt.Will(will_topic, encode(Status(state="offline", sender=sender)), qos=1, retain=True)
            if will_topic else None)
    return aiomqtt.Client(
        cfg.host, cfg.port, identifier=identifier, protocol=aiomqtt.ProtocolVersion.V5, will=will,
        username=cfg.username or None, password=password(cfg),
        keepalive=KEEPALIVE_S, tls_params=aiomqtt.TLSParameters(ca_certs=cfg.ca_file or None) if cfg.tls else None,
        # small request/reply messages: Nagle plus delayed ACKs would add ~40 ms to each
        socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
    )


async def send(client: aiomqtt.Client, topic: str, payload: bytes, properties: Properties | None = None) -> None:
    """Publish one request, reply or probe (``TRAFFIC_QOS``), written to the socket now, in this event loop turn;
    what the socket does not take yet goes out as it drains (``unsent_bytes`` counts it).

    aiomqtt's ``publish`` queues the packet, registers a socket writer, awaits its write a turn or two later and
    unregisters it: about eight loop turns per request and answer on loopback. Without a writer callback set, paho
    writes the packet in ``publish`` itself (its mode for callers without an event loop); only a packet the
    socket could not take whole registers the writer, as aiomqtt would have.
    """
    paho = client._client  # aiomqtt has no public accessor for its paho client
    register = paho.on_socket_register_write
    paho.on_socket_register_write = None
    try:
        info = paho.publish(topic, payload, qos=TRAFFIC_QOS, properties=properties)
    finally:
        paho.on_socket_register_write = register
    if paho.want_write():  # the socket is full (or paho could not write now): the writer sends the rest
        paho._registered_write = False  # paho marked it registered without a callback to call
        paho._call_socket_register_write()
    if info.rc not in (mqtt_client.MQTT_ERR_SUCCESS, mqtt_client.MQTT_ERR_AGAIN):
        raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
    await asyncio.sleep(0)  # a turn for the loop, as an awaited publish gave


def unsent_bytes(client: aiomqtt.Client) -> int:
    """Bytes this client has handed to its connection that the broker has not yet acknowledged: paho's own send
    queue plus the socket's (unsent and in flight). A new message queues behind them on a slow uplink."""
    paho = client._client  # aiomqtt has no public accessor for its paho client
    queued = sum(len(p["packet"]) - p["pos"] for p in list(getattr(paho, "_out_packet", ())))
    return int(queued) + socket_unsent(paho.socket())


def socket_unsent(sock: object) -> int:
    """Bytes written to a TCP socket and not yet acknowledged by the peer (Linux ``SIOCOUTQ``); 0 where the
    platform cannot tell or there is no socket."""
    fileno = getattr(sock, "fileno", None)
    if fileno is None or not hasattr(termios, "TIOCOUTQ"):
        return 0
    try:
        out = fcntl.ioctl(fileno(), termios.TIOCOUTQ, b"\0" * 4)
    except (OSError, ValueError):  # closed, or not a socket the kernel can tell about
        return 0
    return max(int(struct.unpack("i", out)[0]), 0)


TCP_IP_HEADER_BYTES = 52  # per segment: IPv4 (20) and TCP with timestamps (32)
TCP_MSS = 1448


def wire_bytes(topic: str, payload: int, properties: Properties | None = None) -> int:
    """What one MQTT v5 PUBLISH (QoS 0) of ``payload`` bytes to ``topic`` puts on the wire: the packet (fixed
    header, topic, properties, payload) and the TCP/IP headers of its segments."""
    props = len(properties.pack()) if properties is not None else 1  # type: ignore[no-untyped-call]
    body = 2 + len(topic.encode()) + props + payload
    packet = 1 + (1 if body < 128 else 2 if body < 16_384 else 3 if body < 2_097_152 else 4) + body
    return packet + TCP_IP_HEADER_BYTES * -(-packet // TCP_MSS)


def request_properties(*, response_topic: str, correlation: str, expiry_s: float) -> Properties:
    """MQTT v5 publish properties of a request: where to answer, its id, and when it expires."""
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = response_topic
    props.CorrelationData = correlation.encode()
    props.MessageExpiryInterval = max(1, int(expiry_s + 0.999))
    return props


def reply_properties(correlation: bytes | None) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if correlation:
        props.CorrelationData = correlation
    return props


def response_of(message: aiomqtt.Message) -> tuple[str | None, bytes | None]:
    """(response topic, correlation data) of a received request."""
    props = message.properties
    topic = getattr(props, "ResponseTopic", None) if props else None
    corr = getattr(props, "CorrelationData", None) if props else None
    return topic, corr


class Backoff:
    """Jittered exponential reconnect delays, capped."""

    def __init__(self) -> None:
        self._next = BACKOFF_INITIAL_S

    def reset(self) -> None:
        self._next = BACKOFF_INITIAL_S

    def next(self) -> float:
        delay = self._next * random.uniform(0.5, 1.0)
        self._next = min(self._next * 2, BACKOFF_MAX_S)
        return delay


async def sleep_unless(shutdown: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds`` or until ``shutdown`` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(shutdown.wait(), timeout=seconds)


def configure_logging(level: str = "info", stream: TextIO = sys.stdout) -> None:
    """structlog as JSON lines to stdout (journald collects them) or ``stream``; call once in ``main``."""
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso"), structlog.processors.format_exc_info,
                    structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(cast(TextIO, _SafeStream(stream))),
    )


class _SafeStream:
    """A log stream that never raises into a daemon's tasks: a closed or broken stream drops the line."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (OSError, ValueError):
            return 0

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()


def install_signal_handlers(shutdown: asyncio.Event) -> None:
    """SIGTERM and SIGINT set ``shutdown`` (the daemon then drains and exits)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, shutdown.set)


class Systemd:
    """sd_notify to systemd (``Type=notify``): readiness, status lines, and the watchdog heartbeat. Every
    call is a no-op when the daemon was not started by systemd."""

    def __init__(self) -> None:
        self._notifier = sdnotify.SystemdNotifier() if os.environ.get("NOTIFY_SOCKET") else None
        usec, pid = os.environ.get("WATCHDOG_USEC", ""), os.environ.get("WATCHDOG_PID", "")
        mine = not pid or (pid.isdigit() and int(pid) == os.getpid())
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and mine else 0.0

    def notify(self, *fields: str) -> None:
        if self._notifier is not None:
            self._notifier.notify("\n".join(fields))

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def status(self, text: str) -> None:
        self.notify(f"STATUS={text}")

    async def _watchdog(self) -> None:
        """WATCHDOG=1 at half the configured interval for as long as the event loop runs: a stuck loop misses
        it and systemd restarts the daemon."""
        if self._notifier is None or not self.watchdog_s:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_s / 2)

    @contextlib.asynccontextmanager
    async def serving(self, status: str) -> AsyncIterator[Systemd]:
        """READY=1 with ``status`` and the watchdog on entry (the daemon is loaded); STOPPING=1 on exit."""
        watchdog = asyncio.create_task(self._watchdog(), name="watchdog")
        self.ready(status)
        try:
            yield self
        finally:
            self.notify("STOPPING=1")
            watchdog.cancel()
