"""The Edgent search: per request, the exit and the cut that maximise accuracy within the deadline.

``compile_candidates`` turns a multi-exit model's description and the two hosts' latency models into
flat arrays of every (exit, cut) candidate once; ``plan`` then costs one request in a handful of
vectorised operations (microseconds), and the baselines reuse the same arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from planner.errors import PlannerError
from planner.latency import LatencyModel

BASELINES = ("device_only", "edge_only", "partition_only", "exit_only")


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerInfo:
    """A layer as the planner sees it: its type and its variables (sizes, FLOPs)."""

    name: str
    kind: str
    features: Mapping[str, float]


@dataclass(frozen=True, slots=True, kw_only=True)
class CutPoint:
    """A place to cut an exit's layer sequence: ``index`` layers run on the device, ``bytes`` cross."""

    index: int
    bytes: int
    tensors: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ExitInfo:
    """One exit: its accuracy, its layers in execution order and where it can be cut.

    ``cuts`` are the interior cuts; edge-only (index 0, the input crosses) and device-only (index N,
    nothing crosses) are always candidates and need not be listed.
    """

    accuracy: float
    layers: tuple[LayerInfo, ...]
    cuts: tuple[CutPoint, ...]
    input_bytes: int
    result_bytes: int

    def __post_init__(self) -> None:
        if not self.layers:
            raise PlannerError("an exit needs at least one layer")
        if any(not 0 < c.index < len(self.layers) for c in self.cuts):
            raise PlannerError(f"cut index out of range 1..{len(self.layers) - 1}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidates:
    """Every (exit, cut) candidate of a model under one pair of latency models, as flat arrays."""

    exit: npt.NDArray[np.int64]  # 0-based exit of each candidate
    cut: npt.NDArray[np.int64]  # layers run on the device
    n_layers: npt.NDArray[np.int64]  # layers of the candidate's exit
    accuracy: npt.NDArray[np.float64]
    device_s: npt.NDArray[np.float64]
    edge_s: npt.NDArray[np.float64]
    up_bytes: npt.NDArray[np.float64]
    down_bytes: npt.NDArray[np.float64]
    uses_edge: npt.NDArray[np.bool_]
    tensors: tuple[tuple[str, ...], ...]
    rank: tuple[tuple[int, int, int], ...]  # (exit, first, stop) groups, most accurate exit first


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """The decision for one request, with its predicted latency split into parts."""

    feasible: bool
    exit: int | None  # 1-based
    cut: int | None  # layers on the device: 0 = edge-only, n_layers = device-only
    n_layers: int | None
    cut_tensors: tuple[str, ...]
    predicted_s: float | None
    bound_s: float | None  # the prediction with the margins: what met (or missed) the deadline
    device_s: float | None
    transfer_s: float | None
    edge_s: float | None
    accuracy: float | None

    @property
    def where(self) -> str:
        if self.cut is None:
            return "none"
        return "device" if self.cut == self.n_layers else "edge" if self.cut == 0 else "split"

    def to_json(self) -> dict[str, Any]:
        return {"feasible": self.feasible, "exit": self.exit, "cut": self.cut, "n_layers": self.n_layers,
                "cut_tensors": list(self.cut_tensors), "where": self.where, "predicted_s": self.predicted_s,
                "bound_s": self.bound_s, "device_s": self.device_s, "transfer_s": self.transfer_s,
                "edge_s": self.edge_s, "accuracy": self.accuracy}


INFEASIBLE = Plan(feasible=False, exit=None, cut=None, n_layers=None, cut_tensors=(), predicted_s=None,
                  bound_s=None, device_s=None, transfer_s=None, edge_s=None, accuracy=None)


def compile_candidates(exits: Sequence[ExitInfo], device: LatencyModel, edge: LatencyModel) -> Candidates:
    """Cost every (exit, cut) candidate's compute parts under the device's and the edge's models."""
    if not exits:
        raise PlannerError("a model needs at least one exit")
    cols: dict[str, list[Any]] = {k: [] for k in ("exit", "cut", "n", "acc", "dev", "edge", "up", "down", "t")}
    for e, ex in enumerate(exits):
        feats = [(lay.kind, lay.features) for lay in ex.layers]
        dev_cum = np.concatenate([[0.0], np.cumsum(device.predict_many(feats))])
        dev_stage = np.concatenate([[0.0], device.stage_s(dev_cum[1:])])  # a head runs as one stage
        edge_cum = np.concatenate([[0.0], np.cumsum(edge.predict_many(feats))])
        n = len(ex.layers)
        points = [CutPoint(index=0, bytes=ex.input_bytes, tensors=("input",)), *ex.cuts,
                  CutPoint(index=n, bytes=0, tensors=())]
        for point in sorted(points, key=lambda c: c.index):
            p = point.index
            on_edge = p < n
            cols["exit"].append(e)
            cols["cut"].append(p)
            cols["n"].append(n)
            cols["acc"].append(ex.accuracy)
            cols["dev"].append(dev_stage[p])
            cols["edge"].append(float(edge.stage_s(edge_cum[n] - edge_cum[p])) if on_edge else 0.0)
            cols["up"].append(point.bytes if on_edge else 0)
            cols["down"].append(ex.result_bytes if on_edge else 0)
            cols["t"].append(point.tensors)
    exit_arr = np.array(cols["exit"], dtype=np.int64)
    order = sorted(range(len(exits)), key=lambda i: (-exits[i].accuracy, -i))
    rank = []
    for e in order:
        idx = np.flatnonzero(exit_arr == e)
        rank.append((e, int(idx[0]), int(idx[-1]) + 1))
    return Candidates(exit=exit_arr, cut=np.array(cols["cut"], dtype=np.int64),
                      n_layers=np.array(cols["n"], dtype=np.int64), accuracy=np.array(cols["acc"], dtype=np.float64),
                      device_s=np.array(cols["dev"]), edge_s=np.array(cols["edge"]),
                      up_bytes=np.array(cols["up"], dtype=np.float64),
                      down_bytes=np.array(cols["down"], dtype=np.float64),
                      uses_edge=np.array([p < n for p, n in zip(cols["cut"], cols["n"], strict=True)]),
                      tensors=tuple(cols["t"]), rank=tuple(rank))


@dataclass(frozen=True, slots=True, kw_only=True)
class Conditions:
    """What the device knows when a request arrives."""

    bandwidth_bps: float  # uplink
    deadline_s: float
    downlink_bps: float | None = None  # defaults to the uplink
    rtt_s: float = 0.0  # fixed cost of one round trip to the edge
    edge_queue_s: float = 0.0  # expected wait in the edge's queue (its advertised load)
    uplink_backlog_bytes: float = 0.0  # our own earlier uploads still ahead of this one on the uplink
    device_speed: float = 1.0  # measured / modelled stage times on the device now (``latency.SpeedFactor``)
    edge_speed: float = 1.0  # the same on the edge
    # How much longer than predicted the device's part and the rest (link, edge) may take (``latency.Margin``):
    # a plan is feasible when its prediction with these margins meets the deadline. Seconds added to any plan
    # that computes on the device; a factor on the rest of any plan that uses the edge.
    device_margin_s: float = 0.0
    remote_margin: float = 1.0

    def __post_init__(self) -> None:
        if not self.bandwidth_bps > 0 or (self.downlink_bps is not None and not self.downlink_bps > 0):
            raise PlannerError("bandwidth must be positive")
        if not self.deadline_s > 0:
            raise PlannerError("deadline must be positive")
        if self.rtt_s < 0 or self.edge_queue_s < 0 or self.uplink_backlog_bytes < 0:
            raise PlannerError("rtt, edge queue time and uplink backlog cannot be negative")
        if not (self.device_speed > 0 and self.edge_speed > 0):
            raise PlannerError("speed factors must be positive")
        if not (self.device_margin_s >= 0 and self.remote_margin >= 1):
            raise PlannerError("margins add time: device_margin_s >= 0, remote_margin >= 1")


def latencies(c: Candidates, cond: Conditions) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(end-to-end, transfer) predicted seconds of every candidate."""
    down = cond.downlink_bps or cond.bandwidth_bps
    transfer = c.up_bytes * (8.0 / cond.bandwidth_bps) + c.down_bytes * (8.0 / down)
    transfer = transfer + c.uses_edge * (cond.rtt_s + cond.uplink_backlog_bytes * 8.0 / cond.bandwidth_bps)
    compute = c.device_s * cond.device_speed + c.edge_s * cond.edge_speed + c.uses_edge * cond.edge_queue_s
    return compute + transfer, transfer


def bounds(c: Candidates, cond: Conditions, total: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """What each candidate's latency (``total``, from ``latencies``) may reach with the margins: the device's
    part plus ``device_margin_s``, the rest times ``remote_margin``. This is what must meet the deadline."""
    if cond.device_margin_s == 0 and cond.remote_margin == 1:
        return total
    device = c.device_s * cond.device_speed
    return total + (device > 0) * cond.device_margin_s + (total - device) * (cond.remote_margin - 1)


def plan(c: Candidates, cond: Conditions) -> Plan:
    """Edgent's Algorithm 1: the most accurate exit whose best cut meets the deadline, at that best cut (the
    fastest predicted of those that meet it, margins included)."""
    total, transfer, bound = _costs(c, cond)
    ok = bound <= cond.deadline_s
    if not ok.any():
        return INFEASIBLE
    for _, first, stop in c.rank:
        if ok[first:stop].any():
            best = first + int(np.argmin(np.where(ok[first:stop], total[first:stop], np.inf)))
            return _plan_at(c, best, total, transfer, bound, cond)
    return INFEASIBLE  # pragma: no cover - unreachable: some candidate was feasible


def baselines(c: Candidates, cond: Conditions) -> dict[str, Plan]:
    """The comparison methods, each reported with its own deadline verdict.

    device_only and edge_only run the most accurate exit wholly on one side; partition_only
    (Neurosurgeon) takes that exit's fastest cut; exit_only (right-sizing without partitioning) runs
    on the device the most accurate exit that meets the deadline there.
    """
    costs = _costs(c, cond)
    total = costs[0]
    _top, first, stop = c.rank[0]
    span = np.arange(first, stop)
    device_only = int(span[c.cut[span] == c.n_layers[span]][0])
    edge_only = int(span[c.cut[span] == 0][0])
    partition = first + int(np.argmin(total[first:stop]))
    local = local_plan(c, cond)
    exit_only = local if local.feasible else INFEASIBLE
    return {"device_only": _plan_at(c, device_only, *costs, cond),
            "edge_only": _plan_at(c, edge_only, *costs, cond),
            "partition_only": _plan_at(c, partition, *costs, cond),
            "exit_only": exit_only}


def candidate(c: Candidates, exit_index: int, cut: int) -> int:
    """The index of exit ``exit_index`` (1-based) with ``cut`` layers on the device among ``c``."""
    hits = np.flatnonzero((c.exit == exit_index - 1) & (c.cut == cut))
    if hits.size == 0:
        raise PlannerError(f"exit {exit_index} has no cut after {cut} layers")
    return int(hits[0])


def fixed_plan(c: Candidates, cond: Conditions, exit_index: int, cut: int) -> Plan:
    """The plan running exit ``exit_index`` (1-based) with ``cut`` layers on the device, as predicted now."""
    i = candidate(c, exit_index, cut)
    return _plan_at(c, i, *_costs(c, cond), cond)


def local_plan(c: Candidates, cond: Conditions) -> Plan:
    """The most accurate exit that meets the deadline on the device alone; else the fastest (infeasible)."""
    total, transfer, bound = _costs(c, cond)
    on_device = np.flatnonzero(~c.uses_edge)
    fits = on_device[bound[on_device] <= cond.deadline_s]
    if fits.size:
        best = max(fits, key=lambda i: (c.accuracy[i], c.exit[i]))
    else:
        best = on_device[int(np.argmin(total[on_device]))]
    return _plan_at(c, int(best), total, transfer, bound, cond)


_Costs = tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]


def _costs(c: Candidates, cond: Conditions) -> _Costs:
    """(end-to-end, transfer, with the margins) seconds of every candidate, computed once per decision."""
    total, transfer = latencies(c, cond)
    return total, transfer, bounds(c, cond, total)


def _plan_at(c: Candidates, i: int, total: npt.NDArray[np.float64], transfer: npt.NDArray[np.float64],
             bound: npt.NDArray[np.float64], cond: Conditions) -> Plan:
    return Plan(feasible=bool(bound[i] <= cond.deadline_s), exit=int(c.exit[i]) + 1, cut=int(c.cut[i]),
                n_layers=int(c.n_layers[i]), cut_tensors=c.tensors[i], predicted_s=float(total[i]),
                bound_s=float(bound[i]),
                device_s=float(c.device_s[i] * cond.device_speed), transfer_s=float(transfer[i]),
                edge_s=float(c.edge_s[i] * cond.edge_speed + c.uses_edge[i] * cond.edge_queue_s),
                accuracy=float(c.accuracy[i]))


def exits_from_manifest(manifest: Mapping[str, Any]) -> list[ExitInfo]:
    """The planner's view of a bundle manifest (``models.bundle``): layers, cuts and accuracy per exit."""
    try:
        by_name = {lay["name"]: lay for lay in manifest["layers"]}
        input_bytes = 4 * int(np.prod(manifest["input"]["shape"]))
        exits = []
        for e in manifest["exits"]:
            layers = tuple(LayerInfo(name=n, kind=str(by_name[n]["type"]),
                                     features={k: float(v) for k, v in by_name[n].items()
                                               if isinstance(v, (int, float)) and k != "index"})
                           for n in e["layers"])
            cuts = tuple(CutPoint(index=int(c["index"]), bytes=int(c["bytes"]), tensors=tuple(c["tensors"]))
                         for c in e["cuts"])
            exits.append(ExitInfo(accuracy=float(e["accuracy"]), layers=layers, cuts=cuts, input_bytes=input_bytes,
                                  result_bytes=int(layers[-1].features["output_bytes"])))
    except (KeyError, TypeError, ValueError) as exc:
        raise PlannerError(f"malformed bundle manifest: {exc!r}") from exc
    return exits
