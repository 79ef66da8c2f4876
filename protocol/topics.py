"""MQTT topic names: the only place in coinfer that builds or parses a topic string."""

from __future__ import annotations

import re
from dataclasses import dataclass

from protocol.errors import MalformedMessage

_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
DEFAULT_PREFIX = "coinfer"
POOL_GROUP = "edged"


def check_id(value: str, what: str = "id") -> str:
    """An edge or device id: 1-64 characters of letters, digits, ``_ . -`` (no MQTT wildcards or ``/``)."""
    if not isinstance(value, str) or not _ID.match(value):
        raise MalformedMessage(f"bad {what} {value!r}: use 1-64 letters, digits, '_', '.' or '-'")
    return value


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names under one prefix (a deployment, or one test)."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix or any(c in self.prefix for c in "#+$") or self.prefix.startswith("/"):
            raise ValueError(f"bad topic prefix {self.prefix!r}")

    # edge side
    def edge_status(self, edge_id: str) -> str:
        return f"{self.prefix}/edge/{check_id(edge_id)}/status"

    def edge_advert(self, edge_id: str) -> str:
        return f"{self.prefix}/edge/{check_id(edge_id)}/advert"

    def edge_request(self, edge_id: str, device_id: str) -> str:
        return f"{self.prefix}/edge/{check_id(edge_id)}/req/{check_id(device_id)}"

    def edge_requests(self, edge_id: str) -> str:
        return f"{self.prefix}/edge/{check_id(edge_id)}/req/+"

    def edge_probe(self, edge_id: str, device_id: str) -> str:
        return f"{self.prefix}/edge/{check_id(edge_id)}/probe/{check_id(device_id)}"

    def edge_probes(self, edge_id: str) -> str:
        return f"{self.prefix}/edge/{check_id(edge_id)}/probe/+"

    def pool_request(self, device_id: str) -> str:
        """Untargeted work: whichever edged of the shared-subscription pool takes it."""
        return f"{self.prefix}/pool/req/{check_id(device_id)}"

    def pool_requests(self, group: str = POOL_GROUP) -> str:
        return f"$share/{check_id(group)}/{self.prefix}/pool/req/+"

    def all_edge_status(self) -> str:
        return f"{self.prefix}/edge/+/status"

    def all_edge_adverts(self) -> str:
        return f"{self.prefix}/edge/+/advert"

    # device side
    def device_responses(self, device_id: str) -> str:
        return f"{self.prefix}/dev/{check_id(device_id)}/resp"

    def device_infer(self, device_id: str) -> str:
        """Where local applications send requests to a device's deviced."""
        return f"{self.prefix}/dev/{check_id(device_id)}/infer"

    def device_status(self, device_id: str) -> str:
        return f"{self.prefix}/dev/{check_id(device_id)}/status"

    def stage_inbox(self, worker_id: str, sender_id: str) -> str:
        """Where a pipeline worker receives plans, stops and frames; the last level is the sender (as the
        broker's ACL enforces): a stream's owner for plans, the previous stage (or the owner) for frames."""
        return f"{self.prefix}/dev/{check_id(worker_id)}/stage/{check_id(sender_id)}"

    def stage_inboxes(self, worker_id: str) -> str:
        return f"{self.prefix}/dev/{check_id(worker_id)}/stage/+"

    def stream_inbox(self, owner_id: str, sender_id: str) -> str:
        """Where a stream's owner receives its workers' acks, results and errors (the last level: the sender)."""
        return f"{self.prefix}/dev/{check_id(owner_id)}/stream/{check_id(sender_id)}"

    def stream_inboxes(self, owner_id: str) -> str:
        return f"{self.prefix}/dev/{check_id(owner_id)}/stream/+"

    def all_device_status(self) -> str:
        return f"{self.prefix}/dev/+/status"

    def app_responses(self, device_id: str, client_id: str) -> str:
        """Response topic of one application client of a device."""
        return f"{self.prefix}/dev/{check_id(device_id)}/app/{check_id(client_id)}"

    def is_app_response(self, device_id: str, topic: str) -> bool:
        """Whether ``topic`` is one of ``app_responses(device_id, ...)`` (deviced answers nowhere else)."""
        base = f"{self.prefix}/dev/{check_id(device_id)}/app/"
        return topic.startswith(base) and _ID.match(topic[len(base):]) is not None

    # broker access control: what each role may touch, as (access, topic filter) for mosquitto's acl_file
    def device_acl(self, device_id: str) -> list[tuple[str, str]]:
        """A device reads and writes only under its own ``dev/<id>/``, sends requests and probes only as itself,
        reads the edges' status and adverts, and, as a pipeline worker or a stream's owner, writes to other
        devices' stage and stream inboxes only as itself and reads the devices' status."""
        d = check_id(device_id, "device id")
        return [("readwrite", f"{self.prefix}/dev/{d}/#"),
                ("write", f"{self.prefix}/dev/+/stage/{d}"),
                ("write", f"{self.prefix}/dev/+/stream/{d}"),
                ("read", self.all_device_status()),
                ("write", f"{self.prefix}/edge/+/req/{d}"),
                ("write", f"{self.prefix}/edge/+/probe/{d}"),
                ("write", self.pool_request(d)),
                ("read", self.all_edge_status()),
                ("read", self.all_edge_adverts())]

    def edge_acl(self, edge_id: str) -> list[tuple[str, str]]:
        """An edge reads and writes only under its own ``edge/<id>/``, takes pool work, and answers devices on
        their response topics (and nowhere else under ``dev/``)."""
        e = check_id(edge_id, "edge id")
        return [("readwrite", f"{self.prefix}/edge/{e}/#"),
                ("read", f"{self.prefix}/pool/req/+"),
                ("write", f"{self.prefix}/dev/+/resp")]

    def app_acl(self, device_id: str, app: str) -> list[tuple[str, str]]:
        """An application on a device sends requests to that device's deviced and reads its own answers: nothing
        else (it cannot act as the device, read other applications' answers or reach an edge)."""
        return [("write", self.device_infer(device_id)), ("read", self.app_responses(device_id, app))]

    def dev_topic(self, topic: str) -> tuple[str, str] | None:
        """(device id, what) of a ``.../dev/<id>/<what>/...`` topic, else None."""
        return self._under("dev", topic)

    def edge_topic(self, topic: str) -> tuple[str, str] | None:
        """(edge id, what) of a ``.../edge/<id>/<what>`` topic, else None."""
        return self._under("edge", topic)

    def _under(self, root: str, topic: str) -> tuple[str, str] | None:
        parts = topic.split("/")
        base = self.prefix.count("/") + 1
        if len(parts) < base + 3 or parts[base] != root:
            return None
        return parts[base + 1], parts[base + 2]

    def edge_id_of(self, topic: str) -> str:
        """The edge id in an ``.../edge/<id>/...`` topic."""
        parts = topic.split("/")
        base = self.prefix.count("/") + 1
        if len(parts) < base + 3 or parts[base] != "edge":
            raise MalformedMessage(f"not an edge topic: {topic!r}")
        return check_id(parts[base + 1], "edge id")

    def device_id_of(self, topic: str) -> str:
        """The last level of a request, probe, stage or stream topic: the sender's id."""
        return check_id(topic.rsplit("/", 1)[-1], "device id")
