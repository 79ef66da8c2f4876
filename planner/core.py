"""What every planning policy shares: a model's exits and cuts, candidates, conditions, decisions, the seam.

A policy is a ``Planner``: ``compile`` prepares what it searches (a ``Prepared``), ``decide(view)`` returns a
``Decision`` (or ``Infeasible``), ``observe(outcome)`` learns from how a request went (a no-op for stateless
policies). The costing every policy shares is ``planner.candidates``. A cut is a set of tensors; its layer count
is kept as information and names a cut only where the model is a chain. Exits are numbered from 1 everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, ClassVar, Protocol

import numpy as np
import numpy.typing as npt

from planner.errors import PlannerError
from planner.latency import LatencyModel

DEVICE = "device"  # the host of a route's steps on the requesting device
EDGE = "edge"  # the host of steps on the chosen edge server
PLAIN = "float32"  # tensors cross as they are (the wire's ``protocol.tensors.ENCODINGS`` name the others)


class Where(StrEnum):
    """Where a plan computes: wholly on the device, wholly on the edge, or split between them."""

    DEVICE = "device"
    EDGE = "edge"
    SPLIT = "split"


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerInfo:
    """A layer as the planner sees it: its type and its variables (sizes, FLOPs)."""

    name: str
    kind: str
    features: Mapping[str, float]
    inputs: tuple[str, ...] = ()  # the activations it reads (the graph; empty where only a chain is known)
    outputs: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Encoded:
    """A cut's tensors crossing in encoding ``name``: the exit's accuracy measured so, and the bytes that cross
    (the mean over the measurement's inputs where a lossless codec makes them vary)."""

    name: str
    accuracy: float
    bytes: float

    def __post_init__(self) -> None:
        if self.name == PLAIN or not 0 <= self.accuracy <= 1 or not self.bytes >= 0:
            raise PlannerError(f"encoding {self.name!r}: a measured encoding other than {PLAIN}, accuracy in 0..1 "
                               "and bytes >= 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class CutPoint:
    """A place to cut an exit: the ``tensors`` that cross (``bytes`` in all); ``index`` layers run before it."""

    tensors: frozenset[str]
    index: int
    bytes: int
    head: frozenset[str] | None = None  # the layers on the device; None: the exit's first ``index`` (a chain)
    encodings: tuple[Encoded, ...] = ()  # how else they may cross: only encodings measured for this (exit, cut)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", frozenset(self.tensors))
        if self.head is not None:
            object.__setattr__(self, "head", frozenset(self.head))
            if len(self.head) != self.index:
                raise PlannerError(f"cut {self.name}: {len(self.head)} head layers, index says {self.index}")
        if not self.tensors:
            raise PlannerError("a cut crosses at least one tensor")

    @property
    def name(self) -> str:
        return "+".join(sorted(self.tensors))


@dataclass(frozen=True, slots=True, kw_only=True)
class ExitInfo:
    """One exit of a multi-exit model: its accuracy, layers in execution order and where it can be cut.

    ``cuts`` are the interior cuts; edge-only (the input crosses) and device-only (nothing crosses) are always
    candidates and need not be listed.
    """

    index: int  # 1-based
    output: str  # the exit's output tensor
    input: str  # the model's input tensor
    accuracy: float
    layers: tuple[LayerInfo, ...]
    cuts: tuple[CutPoint, ...]
    input_bytes: int
    result_bytes: int
    input_encodings: tuple[Encoded, ...] = ()  # the input crossing encoded (edge-only), as measured

    def __post_init__(self) -> None:
        if self.index < 1:
            raise PlannerError("exits are numbered from 1")
        if not self.layers:
            raise PlannerError("an exit needs at least one layer")
        if any(not 0 < c.index < len(self.layers) for c in self.cuts):
            raise PlannerError(f"cut index out of range 1..{len(self.layers) - 1}")

    def cut(self, tensors: frozenset[str]) -> CutPoint:
        """The listed cut crossing exactly ``tensors``."""
        for c in self.cuts:
            if c.tensors == tensors:
                return c
        raise PlannerError(f"exit {self.index} has no cut at {sorted(tensors)}")

    def cut_through(self, tensors: frozenset[str]) -> CutPoint:
        """The interior cut where exactly ``tensors`` cross, found from the graph (its head is every layer they
        depend on), for a cut the exit does not list (``cut`` finds those). ``PlannerError`` when the rest of the
        exit would need more than them."""
        producer = {t: lay for lay in self.layers for t in lay.outputs}
        if not tensors or not tensors <= producer.keys():
            raise PlannerError(f"exit {self.index}: {sorted(tensors)} are not all made by its layers (the cut of a "
                               "graph needs a bundle that names each layer's inputs and outputs)")
        head = self.ancestors(tensors)
        made = {t for lay in self.layers if lay.name in head for t in lay.outputs} | {self.input}
        needed = {t for lay in self.layers if lay.name not in head for t in lay.inputs if t in made}
        if needed - tensors or self.output in made:
            raise PlannerError(f"exit {self.index}: not a cut at {sorted(tensors)}: the rest also needs "
                               f"{sorted((needed - tensors) | ({self.output} & made))}")
        nbytes = sum(producer[t].features.get("output_bytes", 0.0) / len(producer[t].outputs) for t in tensors)
        return CutPoint(tensors=tensors, index=len(head), bytes=round(nbytes), head=frozenset(head))

    @property
    def is_chain(self) -> bool:
        """Every layer reads at most one activation and every activation is read at most once (or the bundle
        names no tensors, as the chain bundles of old): no cut of several tensors exists."""
        made = {t for lay in self.layers for t in lay.outputs} | {self.input}
        reads = [t for lay in self.layers for t in lay.inputs if t in made]
        return len(reads) == len(set(reads)) and all(sum(t in made for t in lay.inputs) <= 1 for lay in self.layers)

    def ancestors(self, tensors: frozenset[str]) -> frozenset[str]:
        """The layers that ``tensors`` depend on (those making them included): a cut's head."""
        producer = {t: lay for lay in self.layers for t in lay.outputs}
        head: set[str] = set()
        todo = [producer[t] for t in tensors if t in producer]
        while todo:
            lay = todo.pop()
            if lay.name not in head:
                head.add(lay.name)
                todo.extend(producer[t] for t in lay.inputs if t in producer)
        return frozenset(head)

    def with_graph_heads(self) -> ExitInfo:
        """The exit with each listed cut's head found from the graph where it is not the first ``index`` layers:
        in a DAG, a layer that reads no activation (a Constant making weights, a node onnxruntime would fold) may
        come early in the file yet belong to the rest; costing such a cut by its prefix is wrong."""
        if not all(lay.outputs for lay in self.layers):
            return self  # a chain bundle without graph information: its cuts are prefixes
        names = [lay.name for lay in self.layers]
        cuts = []
        for c in self.cuts:
            head = self.ancestors(c.tensors) if c.head is None else c.head
            prefix = c.head is None and head == frozenset(names[:c.index]) and len(head) == c.index
            cuts.append(c if prefix else replace(c, index=len(head), head=head))
        return replace(self, cuts=tuple(cuts))


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidates:
    """Every (exit, cut, encoding) candidate of a model under one pair of latency models, as flat arrays.

    Each exit's plain candidates come first (``rank`` spans them), then its encoded ones. ``level`` orders all
    of them by accuracy: 0 for the most accurate (a deeper exit first on ties), equal for equal accuracy.
    """

    exits: tuple[ExitInfo, ...]
    exit: npt.NDArray[np.int64]  # 1-based exit of each candidate
    cut: npt.NDArray[np.int64]  # layers run on the device (information; ``tensors`` names the cut)
    n_layers: npt.NDArray[np.int64]  # layers of the candidate's exit
    accuracy: npt.NDArray[np.float64]
    device_s: npt.NDArray[np.float64]
    edge_s: npt.NDArray[np.float64]
    up_bytes: npt.NDArray[np.float64]
    down_bytes: npt.NDArray[np.float64]
    uses_edge: npt.NDArray[np.bool_]
    tensors: tuple[frozenset[str], ...]  # what crosses: the input (edge-only), a cut, or nothing (device-only)
    encoding: tuple[str, ...]  # how it crosses (``PLAIN`` where nothing does)
    plain: npt.NDArray[np.bool_]  # encoding == PLAIN
    level: npt.NDArray[np.int64]  # accuracy order, 0 = most accurate
    head_s: npt.NDArray[np.float64]  # the device model's head stage alone, encoding excluded (what a head measures)
    rest_s: npt.NDArray[np.float64]  # the device model's rest of the exit after the cut (a local finish from there)
    # (up_bytes, down_bytes, uses_edge, device_s, edge_s) as the columns of one matrix (those arrays are views of
    # its columns): a request's costs are one matrix-vector product (``candidates.latencies``)
    parts: npt.NDArray[np.float64]
    routes: tuple[tuple[Step, ...], ...]  # each candidate's device / edge steps (``route``), built once
    positions: Mapping[tuple[int, frozenset[str], str], int]  # (exit, tensors, encoding) -> its first candidate
    rank: tuple[tuple[int, int, int], ...]  # (exit, first, stop) spans of the plain candidates, most accurate first

    def index(self, exit_index: int, cut: int | frozenset[str], encoding: str = PLAIN) -> int:
        """The candidate of exit ``exit_index`` cut at ``cut`` (a tensor set, or, for chains, a layer count) whose
        tensors cross in ``encoding``."""
        if isinstance(cut, int):
            hits = np.flatnonzero((self.exit == exit_index) & (self.cut == cut))
            found = next((int(i) for i in hits if self.encoding[i] == encoding), None)
        else:
            found = self.positions.get((exit_index, cut, encoding))
        if found is None:
            what = f"after {cut} layers" if isinstance(cut, int) else f"at {sorted(cut)}"
            raise PlannerError(f"exit {exit_index} has no cut {what} in {encoding}")
        return found


@dataclass(frozen=True, slots=True, kw_only=True)
class Conditions:
    """What the device knows when a request arrives."""

    bandwidth_bps: float  # uplink
    deadline_s: float
    downlink_bps: float | None = None  # defaults to the uplink
    rtt_s: float = 0.0  # the per-message cost of one round trip to the edge, whatever its size
    # bytes a request carries up besides its tensors (envelope, MQTT and TCP/IP headers): at a slow uplink a few
    # hundred bytes are tens of milliseconds
    message_bytes: float = 0.0
    free_bytes: float = 0.0  # bytes a request crosses without waiting for the rate (a token bucket's burst)
    edge_queue_s: float = 0.0  # expected wait in the edge's queue (its advertised load)
    uplink_backlog_bytes: float = 0.0  # our own earlier uploads still ahead of this one on the uplink
    device_speed: float = 1.0  # measured / modelled stage times on the device now (``latency.SpeedFactor``)
    edge_speed: float = 1.0  # the same on the edge
    # How much longer than predicted the device's part and the rest (link, edge) may take (``latency.Margin``):
    # a plan is feasible when its prediction with these margins meets the deadline. Seconds added to any plan
    # that computes on the device; a factor on the rest of any plan that uses the edge.
    device_margin_s: float = 0.0
    remote_margin: float = 1.0
    now_s: float | None = None  # the caller's monotonic clock, for policies that work in time slots
    held_s: float = 0.0  # > 0: a request a policy held (``Actuation.hold_s``) decided again, this long after it came

    def __post_init__(self) -> None:
        if not self.bandwidth_bps > 0 or (self.downlink_bps is not None and not self.downlink_bps > 0):
            raise PlannerError("bandwidth must be positive")
        if not self.deadline_s > 0:
            raise PlannerError("deadline must be positive")
        if (self.rtt_s < 0 or self.edge_queue_s < 0 or self.uplink_backlog_bytes < 0 or self.message_bytes < 0
                or self.free_bytes < 0):
            raise PlannerError("rtt, edge queue time and uplink backlog cannot be negative")
        if not (self.device_speed > 0 and self.edge_speed > 0):
            raise PlannerError("speed factors must be positive")
        if self.held_s < 0:
            raise PlannerError("held_s cannot be negative")
        if not (self.device_margin_s >= 0 and self.remote_margin >= 1):
            raise PlannerError("margins add time: device_margin_s >= 0, remote_margin >= 1")


@dataclass(frozen=True, slots=True, kw_only=True)
class Prepared:
    """What a policy's ``compile`` made for one pair of latency models (an edge's advert): at least the candidates
    its ``decide`` searches. A policy that prepares more subclasses it and gets its own type back in the view."""

    candidates: Candidates


@dataclass(frozen=True, slots=True, kw_only=True)
class View:
    """What a policy decides from: what it prepared for the chosen edge, and the conditions now."""

    prepared: Prepared
    conditions: Conditions

    @property
    def candidates(self) -> Candidates:
        return self.prepared.candidates


@dataclass(frozen=True, slots=True)
class Segment:
    """A part of exit ``exit`` from the tensors ``inputs`` to the tensors ``outputs`` (head, tail or middle)."""

    exit: int
    inputs: frozenset[str]
    outputs: frozenset[str]


@dataclass(frozen=True, slots=True)
class Step:
    """One stage of a route: ``host`` (``DEVICE``, ``EDGE`` or a worker's id) runs ``segment``."""

    host: str
    segment: Segment


@dataclass(frozen=True, slots=True, kw_only=True)
class Actuation:
    """Settings a policy may choose beside the route (None: leave as is)."""

    cpu_share: float | None = None  # of the device's CPU, 0..1
    tx_rate_bps: float | None = None  # uplink transmit rate
    # hold the request this long, then decide again (``Conditions.held_s`` > 0): the energy controller keeps frames
    # to send them together, where the radio's tail makes each wake dear
    hold_s: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Modelled:
    """A plan's stages as the latency models cost them, before speed factors: what measurements are compared with
    and what a local finish would take."""

    head_s: float = 0.0  # the device's stage (the head, or the whole exit), encoding excluded
    rest_s: float = 0.0  # the device finishing the exit from the cut (fallback); 0 for a device-only plan
    tail_s: float = 0.0  # the edge's stage, decoding included; 0 when the plan does not use the edge
    up_bytes: float = 0.0  # the tensors' bytes that cross up, as costed (the message's own bytes not included)


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """A plan for one request: the exit, the cut, the route's stages, predicted times and optional actuation."""

    feasible: bool  # its prediction with the margins (``bound_s``) meets the deadline
    exit: int  # 1-based
    cut_tensors: frozenset[str]  # what crosses to the edge: empty when nothing does
    cut: int  # layers on the device (information): 0 = edge-only, n_layers = device-only
    n_layers: int
    route: tuple[Step, ...]
    predicted_s: float
    bound_s: float  # the prediction with the margins: what met (or missed) the deadline
    device_s: float
    transfer_s: float
    edge_s: float
    accuracy: float
    actuation: Actuation | None = None
    encoding: str = PLAIN  # how ``cut_tensors`` cross
    modelled: Modelled = Modelled()

    @property
    def where(self) -> Where:
        hosts = [s.host for s in self.route]
        if all(h == DEVICE for h in hosts):
            return Where.DEVICE
        return Where.SPLIT if hosts[0] == DEVICE else Where.EDGE

    def step(self, host: str) -> Step | None:
        """The route's step on ``host``, if it has one."""
        return next((s for s in self.route if s.host == host), None)

    def to_json(self) -> dict[str, Any]:
        return {"feasible": self.feasible, "exit": self.exit, "cut": self.cut, "n_layers": self.n_layers,
                "cut_tensors": sorted(self.cut_tensors), "where": self.where.value, "predicted_s": self.predicted_s,
                "bound_s": self.bound_s, "device_s": self.device_s, "transfer_s": self.transfer_s,
                "edge_s": self.edge_s, "accuracy": self.accuracy, "encoding": self.encoding,
                "route": [{"host": s.host, "inputs": sorted(s.segment.inputs), "outputs": sorted(s.segment.outputs)}
                          for s in self.route],
                **({"actuation": {"cpu_share": self.actuation.cpu_share, "tx_rate_bps": self.actuation.tx_rate_bps,
                                  **({"hold_s": self.actuation.hold_s} if self.actuation.hold_s else {})}}
                   if self.actuation else {})}


@dataclass(frozen=True, slots=True)
class Infeasible:
    """No plan meets the deadline; ``best_effort`` is what the policy would run anyway (None: the caller's
    fastest local way)."""

    reason: str
    best_effort: Decision | None = None
    feasible: ClassVar[bool] = False

    def to_json(self) -> dict[str, Any]:
        return {"feasible": False, "exit": None, "cut": None, "where": "none", "reason": self.reason}


@dataclass(frozen=True, slots=True, kw_only=True)
class Observation:
    """How one request went, as a policy learns it."""

    decision: Decision  # what ran
    latency_s: float
    deadline_s: float
    device_s: float  # measured time in device stages
    edge_s: float | None  # measured by the edge (None: no answer used)
    fallback: str | None  # why the edge part was abandoned


class Planner(Protocol):
    """A planning policy. Registered by name in ``planner.policies``; the device engine calls only this.

    ``compile`` prepares, once per pair of latency models (an edge's advert), what its ``decide`` searches per
    request (what can be done offline is done there) and returns it; ``decide`` gets it back in the ``View``.
    """

    def compile(self, exits: Sequence[ExitInfo], device: LatencyModel, edge: LatencyModel) -> Prepared: ...

    def decide(self, view: View) -> Decision | Infeasible: ...

    def observe(self, outcome: Observation) -> None: ...


def route(ex: ExitInfo, tensors: frozenset[str]) -> tuple[Step, ...]:
    """The device / edge steps of exit ``ex`` cut where ``tensors`` cross (the input: edge-only; none:
    device-only)."""
    whole_in, out = frozenset({ex.input}), frozenset({ex.output})
    if not tensors:
        return (Step(DEVICE, Segment(ex.index, whole_in, out)),)
    if tensors == whole_in:
        return (Step(EDGE, Segment(ex.index, whole_in, out)),)
    return Step(DEVICE, Segment(ex.index, whole_in, tensors)), Step(EDGE, Segment(ex.index, tensors, out))


def allow_encodings(exits: Sequence[ExitInfo], allowed: Sequence[str]) -> tuple[ExitInfo, ...]:
    """``exits`` whose cuts (and inputs) keep only the encodings in ``allowed``."""
    def keep(encodings: tuple[Encoded, ...]) -> tuple[Encoded, ...]:
        return tuple(e for e in encodings if e.name in allowed)

    return tuple(replace(ex, input_encodings=keep(ex.input_encodings),
                         cuts=tuple(replace(c, encodings=keep(c.encodings)) for c in ex.cuts)) for ex in exits)


def exits_from_manifest(manifest: Mapping[str, Any]) -> tuple[ExitInfo, ...]:
    """The planner's view of a bundle manifest (``models.bundle``): layers, cuts and accuracy per exit."""
    try:
        by_name = {lay["name"]: lay for lay in manifest["layers"]}
        input_name = str(manifest["input"]["name"])
        input_bytes = 4 * int(np.prod(manifest["input"]["shape"]))
        exits = []
        for e in manifest["exits"]:
            layers = tuple(LayerInfo(name=n, kind=str(by_name[n]["type"]),
                                     features={k: float(v) for k, v in by_name[n].items()
                                               if isinstance(v, (int, float)) and k != "index"},
                                     inputs=tuple(by_name[n].get("inputs", ())),
                                     outputs=tuple(by_name[n].get("outputs", ())))
                           for n in e["layers"])
            cuts = tuple(CutPoint(index=int(c["index"]), bytes=int(c["bytes"]), tensors=frozenset(c["tensors"]),
                                  encodings=_encodings(c.get("encodings", {})))
                         for c in e["cuts"])
            exits.append(ExitInfo(index=int(e["index"]), output=str(e["output"]), input=input_name,
                                  accuracy=float(e["accuracy"]), layers=layers, cuts=cuts, input_bytes=input_bytes,
                                  result_bytes=int(layers[-1].features["output_bytes"]),
                                  input_encodings=_encodings(e.get("input_encodings", {}))).with_graph_heads())
    except (KeyError, TypeError, ValueError) as exc:
        raise PlannerError(f"malformed bundle manifest: {exc!r}") from exc
    if [e.index for e in exits] != list(range(1, len(exits) + 1)):
        raise PlannerError("malformed bundle manifest: exits must be numbered 1..N in order")
    return tuple(exits)


def _encodings(doc: Mapping[str, Any]) -> tuple[Encoded, ...]:
    """A manifest's measured encodings of one cut: ``{name: {"accuracy", "bytes"}}``."""
    return tuple(Encoded(name=str(name), accuracy=float(m["accuracy"]), bytes=float(m["bytes"]))
                 for name, m in sorted(doc.items()))
