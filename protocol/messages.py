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


# ---- pipelined streams (deviced/stages.py runs a stage; deviced/stream.py owns a stream) ----------------------
MAX_NEXT = 16  # members of the next stage a worker may send to (round-robin replicas)
MAX_CREDITS = 1024
STAGE_STATES = ("ready", "running", "stopped")


@dataclass(frozen=True, slots=True, kw_only=True)
class StagePlan:
    """Owner -> worker: from epoch ``epoch`` on, run exit ``exit`` from ``inputs`` to ``outputs`` for stream
    ``stream_id``, and send frame ``f``'s outputs to ``next[f % len(next)]`` (empty: back to the owner as a
    ``StageResult``). It takes frames only from ``previous`` (the previous stage's workers; the owner for stage 0)
    and holds at most ``credits`` waiting; the owner keeps no more than that in flight. Accepted only from
    ``owner`` itself (the topic's sender)."""

    kind: ClassVar[str] = "stage_plan"
    stream_id: str
    owner: str
    epoch: int
    bundle: str
    exit: int
    stage: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    next: tuple[str, ...]
    previous: tuple[str, ...]
    credits: int

    def __post_init__(self) -> None:
        check_id(self.stream_id, "stream id")
        check_id(self.owner, "owner")
        _check_int(self.epoch, "epoch", 1)
        _check_digest(self.bundle)
        _check_int(self.exit, "exit", 1)
        _check_int(self.stage, "stage", 0)
        for name in ("input_names", "output_names"):
            value = _str_tuple(getattr(self, name), name, 1, MAX_TENSORS, 256)
            object.__setattr__(self, name, value)
        for name, least in (("next", 0), ("previous", 1)):
            workers = _str_tuple(getattr(self, name), name, least, MAX_NEXT, 64)
            for worker in workers:
                check_id(worker, f"{name} worker")
            object.__setattr__(self, name, workers)
        _check_int(self.credits, "credits", 1)
        if self.credits > MAX_CREDITS:
            raise MalformedMessage(f"credits must be at most {MAX_CREDITS}")


@dataclass(frozen=True, slots=True, kw_only=True)
class StageFrame:
    """Owner or previous stage -> worker: frame ``frame``'s tensors entering stage ``stage``."""

    kind: ClassVar[str] = "stage_frame"
    stream_id: str
    owner: str
    epoch: int
    frame: int
    stage: int
    tensors: Tensors

    def __post_init__(self) -> None:
        check_id(self.stream_id, "stream id")
        check_id(self.owner, "owner")
        _check_int(self.epoch, "epoch", 1)
        _check_int(self.frame, "frame", 0)
        _check_int(self.stage, "stage", 0)
        _check_tensors(self.tensors)


@dataclass(frozen=True, slots=True, kw_only=True)
class StageResult:
    """Last stage -> owner: frame ``frame``'s outputs (``compute_s``: the last stage's own compute time)."""

    kind: ClassVar[str] = "stage_result"
    stream_id: str
    epoch: int
    frame: int
    sender: str
    outputs: Tensors
    compute_s: float

    def __post_init__(self) -> None:
        check_id(self.stream_id, "stream id")
        _check_int(self.epoch, "epoch", 1)
        _check_int(self.frame, "frame", 0)
        check_id(self.sender, "sender")
        _check_tensors(self.outputs)
        _check_float(self.compute_s, "compute_s")


@dataclass(frozen=True, slots=True, kw_only=True)
class StageAck:
    """Worker -> owner: a plan taken (``ready``), then a heartbeat while it runs (``running``) or its end
    (``stopped``): frames waiting, frames done, and the median compute time of the last few frames."""

    kind: ClassVar[str] = "stage_ack"
    stream_id: str
    epoch: int
    stage: int
    sender: str
    state: str
    queued: int
    done: int
    compute_s: float

    def __post_init__(self) -> None:
        check_id(self.stream_id, "stream id")
        _check_int(self.epoch, "epoch", 1)
        _check_int(self.stage, "stage", 0)
        check_id(self.sender, "sender")
        if self.state not in STAGE_STATES:
            raise MalformedMessage(f"bad stage state {self.state!r}")
        _check_int(self.queued, "queued", 0)
        _check_int(self.done, "done", 0)
        _check_float(self.compute_s, "compute_s")


@dataclass(frozen=True, slots=True, kw_only=True)
class StageStop:
    """Owner -> worker: the stream is over (or moved off this worker): drop its plan and frames."""

    kind: ClassVar[str] = "stage_stop"
    stream_id: str
    owner: str

    def __post_init__(self) -> None:
        check_id(self.stream_id, "stream id")
        check_id(self.owner, "owner")


@dataclass(frozen=True, slots=True, kw_only=True)
class StageError:
    """Worker -> owner: a plan or a frame it could not take (``frame`` -1: not about one frame; ``epoch`` 0:
    the message was unreadable)."""

    kind: ClassVar[str] = "stage_error"
    stream_id: str
    epoch: int
    frame: int
    code: ErrorCode
    message: str
    sender: str

    def __post_init__(self) -> None:
        if self.stream_id:
            check_id(self.stream_id, "stream id")
        _check_int(self.epoch, "epoch", 0)
        _check_int(self.frame, "frame", -1)
        if not isinstance(self.code, ErrorCode):
            object.__setattr__(self, "code", _enum(self.code))
        _check_str(self.message, "message", 2000)
        check_id(self.sender, "sender")


STAGE_INBOX = (StagePlan, StageFrame, StageStop)  # what a worker's stage inbox takes
STREAM_INBOX = (StageResult, StageAck, StageError)  # what an owner's stream inbox takes
Message = (InferRequest | InferResult | ErrorReply | Probe | ProbeReply | Advert | Status | AppRequest
           | AppResult | StagePlan | StageFrame | StageResult | StageAck | StageStop | StageError)
KINDS: dict[str, type[Message]] = {c.kind: c for c in (InferRequest, InferResult, ErrorReply, Probe,
                                                        ProbeReply, Advert, Status, AppRequest, AppResult,
                                                        StagePlan, StageFrame, StageResult, StageAck, StageStop,
                                                        StageError)}
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
        elif isinstance(value, tuple):
            value = list(value)
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


def _str_tuple(value: Any, name: str, least: int, most: int, length: int) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not least <= len(value) <= most:
        raise MalformedMessage(f"{name} must be a list of {least}..{most} names")
    for item in value:
        _check_str(item, name, length)
        if not item:
            raise MalformedMessage(f"{name}: empty name")
    if len(set(value)) != len(value):
        raise MalformedMessage(f"{name}: names repeat")
    return tuple(value)


def _enum(code: Any) -> ErrorCode:
    try:
        return ErrorCode(code)
    except ValueError as exc:
        raise MalformedMessage(f"unknown error code {code!r}") from exc
