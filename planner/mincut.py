"""Optimal device/edge partitions of a DAG model by s-t minimum cut (DADS' construction), and the handful of cuts
that are ever optimal, found offline so that a request's decision stays a vectorised search (CIC's idea).

The layer graph: nodes with device and edge seconds; tensors with bytes, one producer (or the model input) and
their consumers. A partition puts a *closed* head on the device (every producer of a device node is on the
device) and the rest on the edge; it costs device time of the head + edge time of the rest + the bytes of every
tensor that crosses (once, however many edge layers read it) + the result's return. The flow network:

- source = device side, sink = edge side; node v: source -> v costs its edge time (paid when v is on the edge),
  v -> sink its device time (paid when v stays on the device);
- a tensor with consumers gets one auxiliary node: producer -> aux costs its bytes (paid once when any consumer
  is on the edge: aux -> consumer arcs are infinite); the model input's aux hangs off the source;
- an infinite reverse arc along every graph edge (consumer -> producer), so no edge layer feeds a device layer;
- the exit's output node is pinned to the edge (output -> sink infinite): candidates here are the plans that use
  the edge; device-only is always a candidate of its own. Its result's return is the same for all of them.

scipy's Dinic takes int32 capacities: seconds are scaled so that all finite capacities sum below 2^29, the
infinite ones are 2^30, and the cut's cost, recomputed in floats from the partition, is checked against the flow.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
from scipy.sparse import csr_array
from scipy.sparse.csgraph import breadth_first_order, maximum_flow

from planner.candidates import Stateless, compile_candidates, most_accurate
from planner.core import CutPoint, Decision, ExitInfo, Infeasible, Prepared, View
from planner.errors import PlannerError
from planner.latency import LatencyModel

INF = 1 << 30
FINITE_TOTAL = 1 << 29
MAX_BRUTE_FORCE_NODES = 22
# The conditions the offline candidate set is exact for, as ratios to the device's speed: edge / device speed,
# and seconds per uplink byte (1 kbps .. 100 Gbps at a device speed factor of 1/16 .. 16).
SPEED_RATIO = (1 / 256, 256.0)
SECONDS_PER_BYTE = (8 / 100e9 / 16, 8 / 1e3 * 16)
MAX_CANDIDATE_ROUNDS = 200
TINY = 1e-200  # a coefficient difference below this: parallel planes (no vertex from them)


@dataclass(frozen=True, slots=True)
class Tensor:
    """An activation: its bytes, the node making it (-1: the model input, made on the device), its readers."""

    name: str
    bytes: float
    producer: int
    consumers: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class LayerGraph:
    """A model (one exit) as the min-cut sees it; ``output`` is the node making the exit's result."""

    names: tuple[str, ...]
    device_s: npt.NDArray[np.float64]
    edge_s: npt.NDArray[np.float64]
    tensors: tuple[Tensor, ...]
    output: int

    def __post_init__(self) -> None:
        n = len(self.names)
        if not n or self.device_s.shape != (n,) or self.edge_s.shape != (n,) or not 0 <= self.output < n:
            raise PlannerError("a layer graph needs its nodes' device and edge times and an output node")
        if (self.device_s < 0).any() or (self.edge_s < 0).any():
            raise PlannerError("layer times cannot be negative")
        for t in self.tensors:
            if t.bytes < 0 or not -1 <= t.producer < n or any(not 0 <= c < n for c in t.consumers):
                raise PlannerError(f"tensor {t.name!r}: bad bytes, producer or consumers")

    @property
    def n(self) -> int:
        return len(self.names)

    def predecessors(self) -> list[set[int]]:
        preds: list[set[int]] = [set() for _ in range(self.n)]
        for t in self.tensors:
            if t.producer >= 0:
                for c in t.consumers:
                    preds[c].add(t.producer)
        return preds


@dataclass(frozen=True, slots=True)
class Partition:
    """A closed head (node indices on the device), what crosses, and its cost split into parts (seconds)."""

    head: frozenset[int]
    crossing: frozenset[str]
    device_s: float
    edge_s: float
    up_bytes: float

    def cost(self, speed_ratio: float = 1.0, seconds_per_byte: float = 0.0) -> float:
        """Device seconds + ``speed_ratio`` x edge seconds + ``seconds_per_byte`` x crossing bytes."""
        return self.device_s + speed_ratio * self.edge_s + seconds_per_byte * self.up_bytes


def from_exit(ex: ExitInfo, device: LatencyModel, edge: LatencyModel) -> LayerGraph:
    """The layer graph of one exit, its layers timed by the two hosts' latency models."""
    names = tuple(lay.name for lay in ex.layers)
    feats = [(lay.kind, lay.features) for lay in ex.layers]
    producer: dict[str, int] = {}
    sizes: dict[str, float] = {ex.input: float(ex.input_bytes)}
    for i, lay in enumerate(ex.layers):
        if not lay.outputs:
            raise PlannerError(f"layer {lay.name!r} names no outputs: the min-cut needs the graph (a newer bundle)")
        for t in lay.outputs:
            producer[t] = i
            sizes[t] = float(lay.features.get("output_bytes", 0.0)) / len(lay.outputs)
    readers: dict[str, list[int]] = {}
    for i, lay in enumerate(ex.layers):
        for t in lay.inputs:
            if t in producer or t == ex.input:
                readers.setdefault(t, []).append(i)
    tensors = tuple(Tensor(name=t, bytes=sizes[t], producer=producer.get(t, -1), consumers=tuple(c))
                    for t, c in readers.items())
    if ex.output not in producer:
        raise PlannerError(f"exit {ex.index}: no layer makes its output {ex.output!r}")
    return LayerGraph(names=names, device_s=device.predict_many(feats), edge_s=edge.predict_many(feats),
                      tensors=tensors, output=producer[ex.output])


def min_cut(g: LayerGraph, speed_ratio: float = 1.0, seconds_per_byte: float = 0.0) -> Partition:
    """The cheapest partition that uses the edge, under device seconds + ``speed_ratio`` x edge seconds +
    ``seconds_per_byte`` x crossing bytes."""
    n, aux = g.n, len(g.tensors)
    source, sink = n + aux, n + aux + 1
    finite: list[tuple[int, int, float]] = []
    for v in range(n):
        finite.append((source, v, speed_ratio * float(g.edge_s[v])))
        finite.append((v, sink, float(g.device_s[v])))
    infinite: set[tuple[int, int]] = {(g.output, sink)}
    for k, t in enumerate(g.tensors):
        a = n + k
        finite.append((source if t.producer < 0 else t.producer, a, seconds_per_byte * t.bytes))
        for c in t.consumers:
            infinite.add((a, c))
            if t.producer >= 0:
                infinite.add((c, t.producer))  # closed: no edge layer feeds a device layer
    total = sum(c for _, _, c in finite)
    scale = FINITE_TOTAL / max(total, 1e-12)  # below a picosecond in all, every cut costs nothing
    rows = [u for u, _, _ in finite] + [u for u, _ in infinite]
    cols = [v for _, v, _ in finite] + [v for _, v in infinite]
    caps = [round(c * scale) for _, _, c in finite] + [INF] * len(infinite)
    size = n + aux + 2
    capacity = csr_array((np.array(caps, dtype=np.int64), (rows, cols)), shape=(size, size))
    capacity.sum_duplicates()
    capacity.data = np.minimum(capacity.data, INF).astype(np.int32)
    flow = maximum_flow(capacity, source, sink, method="dinic")
    residual = (capacity - flow.flow).tocsr()
    residual.data = (residual.data > 0).astype(np.int8)
    residual.eliminate_zeros()
    reachable = breadth_first_order(residual, source, directed=True, return_predecessors=False)
    head = frozenset(int(v) for v in reachable if v < n)
    found = partition(g, head)
    expected = flow.flow_value / scale
    if abs(found.cost(speed_ratio, seconds_per_byte) - expected) > (len(finite) + 1) / scale + 1e-12:
        raise PlannerError(f"min-cut check failed: partition costs {found.cost(speed_ratio, seconds_per_byte)} s, "
                           f"the flow {expected} s")  # pragma: no cover - the solver's own invariant
    return found


def partition(g: LayerGraph, head: frozenset[int]) -> Partition:
    """The parts of the partition with ``head`` on the device (``PlannerError`` unless it is closed)."""
    preds = g.predecessors()
    if any(not preds[v] <= head for v in head):
        raise PlannerError("not a closed head: an edge layer would feed a device layer")
    crossing = frozenset(t.name for t in g.tensors
                         if (t.producer < 0 or t.producer in head) and any(c not in head for c in t.consumers))
    return Partition(head=head, crossing=crossing, device_s=float(g.device_s[list(head)].sum()) if head else 0.0,
                     edge_s=float(np.delete(g.edge_s, list(head)).sum()),
                     up_bytes=float(sum(t.bytes for t in g.tensors if t.name in crossing)))


def brute_force(g: LayerGraph, speed_ratio: float = 1.0, seconds_per_byte: float = 0.0) -> Partition:
    """The same optimum by trying every closed head that leaves the output on the edge (small graphs only)."""
    if g.n > MAX_BRUTE_FORCE_NODES:
        raise PlannerError(f"brute force is for graphs of at most {MAX_BRUTE_FORCE_NODES} nodes")
    return min((partition(g, h) for h in closed_heads(g)), key=lambda p: p.cost(speed_ratio, seconds_per_byte))


def closed_heads(g: LayerGraph) -> Iterator[frozenset[int]]:
    """Every closed head that leaves the output node on the edge."""
    preds = g.predecessors()
    others = [v for v in range(g.n) if v != g.output]
    for bits in itertools.product((False, True), repeat=len(others)):
        head = frozenset(v for v, on in zip(others, bits, strict=True) if on)
        if all(preds[v] <= head for v in head):
            yield head


def candidate_partitions(g: LayerGraph, *, speed_ratio: tuple[float, float] = SPEED_RATIO,
                         seconds_per_byte: tuple[float, float] = SECONDS_PER_BYTE) -> list[Partition]:
    """Every partition that is the min-cut for some (speed ratio, seconds per byte) in the given box: the faces
    of the concave cost envelope, found by probing its vertices until the min-cut agrees with it everywhere."""
    box = (speed_ratio, seconds_per_byte)
    probed: dict[tuple[float, float], Partition] = {}  # a vertex the envelope agreed at stays agreed: solve once

    def probe(r: float, y: float) -> Partition:
        if (r, y) not in probed:
            probed[r, y] = min_cut(g, r, y)
        return probed[r, y]

    found: dict[frozenset[int], Partition] = {}
    for r, y in itertools.product(*box):
        p = probe(r, y)
        found.setdefault(p.head, p)
    for _ in range(MAX_CANDIDATE_ROUNDS):
        planes = list(found.values())
        added = False
        for r, y in _vertices(planes, box):
            best = min(p.cost(r, y) for p in planes)
            p = probe(r, y)
            if p.head not in found and p.cost(r, y) < best * (1 - 1e-9) - 1e-15:
                found[p.head] = p
                added = True
        if not added:
            return sorted(found.values(), key=lambda p: len(p.head))
    raise PlannerError("the candidate search did not converge")  # pragma: no cover


def cut_points(g: LayerGraph, parts: Sequence[Partition]) -> tuple[CutPoint, ...]:
    """Partitions as an exit's listed cuts (the input-only and device-only ones are the planner's own)."""
    points = {}
    for p in parts:
        if p.head and p.crossing:
            points[p.head] = CutPoint(tensors=p.crossing, index=len(p.head), bytes=round(p.up_bytes),
                                      head=frozenset(g.names[v] for v in p.head))
    return tuple(sorted(points.values(), key=lambda c: (c.index, c.name)))


def _vertices(planes: Sequence[Partition], box: tuple[tuple[float, float], ...]) -> list[tuple[float, float]]:
    """The vertices of min over ``planes`` of cost(r, y) on the box: its corners, where two planes meet on its
    sides, and where three meet inside; only points where those planes are the minimum."""
    (r0, r1), (y0, y1) = box
    coef = np.array([[p.device_s, p.edge_s, p.up_bytes] for p in planes])
    points = list(itertools.product((r0, r1), (y0, y1)))
    for i, j in itertools.combinations(range(len(planes)), 2):
        d = coef[i] - coef[j]  # d0 + d1 r + d2 y = 0
        for r in (r0, r1):
            if abs(d[2]) > TINY:
                points.append((r, -(d[0] + d[1] * r) / d[2]))
        for y in (y0, y1):
            if abs(d[1]) > TINY:
                points.append((-(d[0] + d[2] * y) / d[1], y))
    for i, j, k in itertools.combinations(range(len(planes)), 3):
        a = np.array([coef[i, 1:] - coef[j, 1:], coef[i, 1:] - coef[k, 1:]])
        b = -np.array([coef[i, 0] - coef[j, 0], coef[i, 0] - coef[k, 0]])
        if abs(np.linalg.det(a)) > TINY:
            with np.errstate(over="ignore", invalid="ignore"):
                points.append(tuple(np.linalg.solve(a, b)))
    inside = {(float(r), float(y)) for r, y in points
              if np.isfinite(r) and np.isfinite(y) and r0 <= r <= r1 and y0 <= y <= y1}
    kept = []
    for r, y in inside:  # a vertex of the envelope has at least two minimal planes (or is a corner)
        costs = coef @ np.array([1.0, r, y])
        low = costs.min()
        corner = r in (r0, r1) and y in (y0, y1)
        if corner or int((costs <= low * (1 + 1e-9) + 1e-15).sum()) >= 2:
            kept.append((r, y))
    return kept


@dataclass(frozen=True, slots=True, kw_only=True)
class MinCutPrepared(Prepared):
    """What ``MinCut.compile`` made for one edge latency model: the candidates (every partition optimal somewhere in
    the box) and what a request outside the box needs for its own min-cut."""

    graphs: tuple[LayerGraph, ...]
    exits: tuple[ExitInfo, ...]
    device: LatencyModel
    edge: LatencyModel


class MinCut(Stateless):
    """Edgent's rule over DAG cuts: the most accurate exit whose best plan meets the deadline, where an exit's
    plans are every partition the min-cut finds optimal for some conditions in the box (``compile``, once per
    edge latency model); conditions outside the box get a per-request min-cut added. On a chain its plans are
    Edgent's."""

    def __init__(self, *, encodings: bool = True) -> None:
        self.encodings = bool(encodings)

    def compile(self, exits: Sequence[ExitInfo], device: LatencyModel, edge: LatencyModel) -> MinCutPrepared:
        graphs = tuple(from_exit(ex, device, edge) for ex in exits)
        richer = tuple(replace(ex, cuts=_measured(ex, cut_points(g, candidate_partitions(g))))
                       for ex, g in zip(exits, graphs, strict=True))
        return MinCutPrepared(candidates=compile_candidates(richer, device, edge), graphs=graphs, exits=richer,
                              device=device, edge=edge)

    def decide(self, view: View) -> Decision | Infeasible:
        prepared, cond = view.prepared, view.conditions
        if not isinstance(prepared, MinCutPrepared):
            raise PlannerError("mincut decides over what its own compile prepared")
        ratio, per_byte = cond.edge_speed / cond.device_speed, 8.0 / cond.bandwidth_bps / cond.device_speed
        high = max(cond.remote_margin, 1.0)
        inside = (SPEED_RATIO[0] <= ratio and ratio * high <= SPEED_RATIO[1]
                  and SECONDS_PER_BYTE[0] <= per_byte and per_byte * high <= SECONDS_PER_BYTE[1])
        c = prepared.candidates
        if not inside:  # outside the box the candidates may miss the optimum: add this request's own min-cut
            exits = [replace(ex, cuts=(*ex.cuts, *_measured(ex, cut_points(g, [min_cut(g, ratio * m, per_byte * m)
                                                                               for m in (1, high)]))))
                     for ex, g in zip(prepared.exits, prepared.graphs, strict=True)]
            c = compile_candidates(exits, prepared.device, prepared.edge)
        return most_accurate(c, cond, plain_only=not self.encodings)


def _measured(ex: ExitInfo, cuts: Sequence[CutPoint]) -> tuple[CutPoint, ...]:
    """``cuts`` with the encodings the exit's listed cut of the same tensors has measured (others: none)."""
    known = {c.tensors: c.encodings for c in ex.cuts}
    return tuple(replace(c, encodings=known.get(c.tensors, ())) for c in cuts)
