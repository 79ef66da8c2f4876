"""Wire messages: frozen dataclasses that validate themselves, and their msgpack envelope.

Every payload is a msgpack map ``{"v": PROTOCOL_VERSION, "kind": ..., **fields}``; ``decode``
checks size, version, kind and every field before returning a message, so nothing unchecked reaches
compute. Tensors travel as ``protocol.tensors`` maps. Never pickle.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import msgpack
import numpy as np
import numpy.typing as npt

from protocol import PROTOCOL_VERSION
from protocol.errors import ErrorCode, MalformedMessage, MessageTooLarge, ProtocolError, TensorError, VersionMismatch
from protocol.tensors import ENCODINGS, PLAIN, decode_tensor, encode_tensor
from protocol.topics import check_id

MAX_MESSAGE_BYTES = 64 * 1024 * 1024 + 65536
MAX_TENSORS = 16
_HEX = set("0123456789abcdef")

Tensors = Mapping[str, npt.NDArray[Any]]


@dataclass(frozen=True, slots=True, kw_only=True)
class InferRequest:
    """Device -> edge: run the tail of ``exit`` from layer ``cut`` on ``tensors`` (the cut tensors)."""

    kind: ClassVar[str] = "infer"
    request_id: str
    device_id: str
    bundle: str  # sha256 digest of the bundle manifest
    exit: int  # 1-based
    cut: int  # layers already run on the device (0: ``tensors`` holds the model input)
    tensors: Tensors
    budget_s: float  # time left for the edge's part when sent: admission control and expiry
    encoding: str = PLAIN  # how ``tensors`` cross (``protocol.tensors.ENCODINGS``); each tensor also declares it

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        check_id(self.device_id, "device id")
        _check_digest(self.bundle)
        _check_int(self.exit, "exit", 1)
        _check_int(self.cut, "cut", 0)
        _check_tensors(self.tensors)
        _check_float(self.budget_s, "budget_s")
        if self.encoding not in ENCODINGS:
            raise TensorError(f"unknown encoding {self.encoding!r}; known: {', '.join(ENCODINGS)}")


@dataclass(frozen=True, slots=True, kw_only=True)
class InferResult:
    """Edge -> device: the exit's output, and where the edge spent its time."""

    kind: ClassVar[str] = "result"
    request_id: str
    edge_id: str
    exit: int
    outputs: Tensors
    queue_s: float
    compute_s: float

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        check_id(self.edge_id, "edge id")
        _check_int(self.exit, "exit", 1)
        _check_tensors(self.outputs)
        _check_float(self.queue_s, "queue_s")
        _check_float(self.compute_s, "compute_s")


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorReply:
    """An explicit failure answering a request (``request_id`` empty when the request was unreadable)."""

    kind: ClassVar[str] = "error"
    request_id: str
    code: ErrorCode
    message: str
    sender: str

    def __post_init__(self) -> None:
        if self.request_id:
            _check_request_id(self.request_id)
        if not isinstance(self.code, ErrorCode):
            object.__setattr__(self, "code", _enum(self.code))
        _check_str(self.message, "message", 2000)
        check_id(self.sender, "sender")


@dataclass(frozen=True, slots=True, kw_only=True)
class Probe:
    """Device -> edge: ``padding`` bytes whose arrival time measures the uplink."""

    kind: ClassVar[str] = "probe"
    probe_id: str
    device_id: str
    padding: bytes

    def __post_init__(self) -> None:
        _check_request_id(self.probe_id)
        check_id(self.device_id, "device id")
        if not isinstance(self.padding, bytes):
            raise MalformedMessage("padding must be bytes")


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeReply:
    """Edge -> device: acknowledges a probe (carries its size, not its bytes)."""

    kind: ClassVar[str] = "probe_reply"
    probe_id: str
    edge_id: str
    size: int

    def __post_init__(self) -> None:
        _check_request_id(self.probe_id)
        check_id(self.edge_id, "edge id")
        _check_int(self.size, "size", 0)


@dataclass(frozen=True, slots=True, kw_only=True)
class Advert:
    """Edge -> everyone (retained): what it serves, how fast it is, how loaded it is now."""

    kind: ClassVar[str] = "advert"
    edge_id: str
    bundles: Mapping[str, str]  # digest -> name
    latency_model: Mapping[str, Any]  # a planner.latency JSON document
    queue_depth: int
    service_s: float  # recent mean service time of one request
    workers: int
    protocol: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        check_id(self.edge_id, "edge id")
        if not isinstance(self.bundles, Mapping) or not all(isinstance(v, str) for v in self.bundles.values()):
            raise MalformedMessage("bundles must map digest -> name")
        for digest in self.bundles:
            _check_digest(digest)
        if not isinstance(self.latency_model, Mapping):
            raise MalformedMessage("latency_model must be a map")
        try:  # a JSON document: devices key and parse it as one
            json.dumps(self.latency_model)
        except (TypeError, ValueError) as exc:
            raise MalformedMessage(f"latency_model is not a JSON document: {exc}") from exc
        _check_int(self.queue_depth, "queue_depth", 0)
        _check_float(self.service_s, "service_s")
        _check_int(self.workers, "workers", 1)
        _check_int(self.protocol, "protocol", 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class Status:
    """Retained liveness of an edge or device; the broker publishes ``offline`` as the last will."""

    kind: ClassVar[str] = "status"
    state: str
    sender: str = field(default="")

    def __post_init__(self) -> None:
        if self.state not in ("online", "offline"):
            raise MalformedMessage(f"bad status {self.state!r}")
        if self.sender:
            check_id(self.sender, "sender")


@dataclass(frozen=True, slots=True, kw_only=True)
class AppRequest:
    """Application -> its device's deviced (``Topics.device_infer``): one model input and a deadline."""

    kind: ClassVar[str] = "app_infer"
    request_id: str
    tensors: Tensors  # one tensor: the model input (deviced checks its size against the bundle)
    deadline_s: float = 0.0  # 0: deviced's default deadline

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check_tensors(self.tensors)
        if len(self.tensors) != 1:
            raise MalformedMessage("an app request carries exactly one input tensor")
        _check_float(self.deadline_s, "deadline_s")


@dataclass(frozen=True, slots=True, kw_only=True)
class AppResult:
    """deviced -> application: the answer and how it was reached (an ``Outcome`` on the wire)."""

    kind: ClassVar[str] = "app_result"
    request_id: str
    outputs: Tensors  # {"logits": ...}
    exit: int
    where: str  # device | edge | split | fallback
    latency_s: float
    deadline_s: float
    fallback: str = ""  # why the edge part was abandoned, if it was
    edge_id: str = ""

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check_tensors(self.outputs)
        _check_int(self.exit, "exit", 1)
        if self.where not in ("device", "edge", "split", "fallback"):
            raise MalformedMessage(f"bad where {self.where!r}")
        _check_float(self.latency_s, "latency_s")
        _check_float(self.deadline_s, "deadline_s")
        _check_str(self.fallback, "fallback", 64)
        if self.edge_id:
            check_id(self.edge_id, "edge id")


Message = (InferRequest | InferResult | ErrorReply | Probe | ProbeReply | Advert | Status | AppRequest
           | AppResult)
KINDS: dict[str, type[Message]] = {c.kind: c for c in (InferRequest, InferResult, ErrorReply, Probe,
                                                        ProbeReply, Advert, Status, AppRequest, AppResult)}
_TENSOR_FIELDS = ("tensors", "outputs")


def encode(msg: Message) -> bytes:
    """The msgpack envelope of ``msg``."""
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "kind": msg.kind}
    encoding = getattr(msg, "encoding", PLAIN)
    for f in fields(msg):
        value = getattr(msg, f.name)
        if f.name in _TENSOR_FIELDS:
            value = {k: encode_tensor(v, encoding) for k, v in value.items()}
        elif isinstance(value, ErrorCode):
            value = value.value
        elif isinstance(value, Mapping):
            value = dict(value)
        body[f.name] = value
    raw: bytes = msgpack.packb(body, use_bin_type=True)
    if len(raw) > MAX_MESSAGE_BYTES:
        raise MessageTooLarge(f"message of {len(raw)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return raw


def decode(raw: bytes, *, expect: type[Message] | tuple[type[Message], ...] | None = None) -> Message:
    """Validate and decode an envelope; any defect raises a ``ProtocolError`` subclass."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise MessageTooLarge(f"message of {len(raw)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        body = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=MAX_MESSAGE_BYTES,
                               max_str_len=1 << 20, max_array_len=1 << 16, max_map_len=1 << 12)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise MalformedMessage(f"not a msgpack envelope: {exc}") from exc
    if not isinstance(body, dict):
        raise MalformedMessage("envelope is not a map")
    version = body.pop("v", None)
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(f"protocol version {version!r}; this side speaks {PROTOCOL_VERSION}")
    kind = body.pop("kind", None)
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise MalformedMessage("unknown or missing message kind")
    if expect is not None and not issubclass(cls, expect):
        raise MalformedMessage(f"unexpected {cls.kind} message here")
    names = {f.name for f in fields(cls)}
    if set(body) - names:
        raise MalformedMessage(f"{cls.kind}: unknown field(s) {sorted(set(body) - names)}")
    for name in _TENSOR_FIELDS:
        if name in body:
            tensors = body[name]
            if not isinstance(tensors, dict) or len(tensors) > MAX_TENSORS:
                raise MalformedMessage(f"{name} must be a map of at most {MAX_TENSORS} tensors")
            encoding = body.get("encoding", PLAIN)
            for key, wire in tensors.items():
                declared = wire.get("enc", PLAIN) if isinstance(wire, dict) else PLAIN
                if declared != encoding:
                    raise TensorError(f"tensor {key!r} declares {declared}, the request {encoding}")
            body[name] = {k: decode_tensor(v) for k, v in tensors.items()}
    try:
        return cls(**body)
    except ProtocolError:
        raise
    except (TypeError, ValueError) as exc:
        raise MalformedMessage(f"{cls.kind}: {exc}") from exc


def _check_request_id(value: Any) -> None:
    if not isinstance(value, str) or not 1 <= len(value) <= 64 or not value.isascii() or not value.isprintable():
        raise MalformedMessage(f"bad request id {value!r}")


def _check_digest(value: Any) -> None:
    if not isinstance(value, str) or len(value) != 64 or not set(value) <= _HEX:
        raise MalformedMessage(f"bad bundle digest {value!r}: expected 64 lowercase hex digits")


def _check_int(value: Any, name: str, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise MalformedMessage(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_float(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise MalformedMessage(f"{name} must be a finite number >= 0, got {value!r}")


def _check_str(value: Any, name: str, limit: int) -> None:
    if not isinstance(value, str) or len(value) > limit:
        raise MalformedMessage(f"{name} must be a string of at most {limit} characters")


def _check_tensors(tensors: Any) -> None:
    if not isinstance(tensors, Mapping) or not tensors or len(tensors) > MAX_TENSORS:
        raise MalformedMessage(f"expected 1..{MAX_TENSORS} tensors")
    for name, value in tensors.items():
        _check_str(name, "tensor name", 256)
        if not isinstance(value, np.ndarray):
            raise MalformedMessage(f"tensor {name!r} is not an array")


def _enum(code: Any) -> ErrorCode:
    try:
        return ErrorCode(code)
    except ValueError as exc:
        raise MalformedMessage(f"unknown error code {code!r}") from exc
