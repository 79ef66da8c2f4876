"""The pipeline planner: which workers run which blocks of a model, with how many threads and replicas.

A stream's frames enter at the fleet's source and their results return there. A plan is an ordered list of
stages; a stage runs a contiguous range of blocks on one worker, on a group of *replicas* that take frames
round-robin (data parallelism), or, for one conv/fc layer, *split* by output channels across a group (each
member computes a share proportional to its speed; the next stage concatenates the slices).

**A stage's period** (the one definition the planner, the simulation and the executor share): a stage's
worker computes one frame while it receives the next and sends the previous one, so the three overlap and

    period = max(compute, bytes_in / downlink, bytes_out / uplink)     (a worker)
    period = max over the replicas of that, / the number of replicas   (round-robin replicas)

A message goes through the broker (store and forward), so a hop costs the sender's upload, the broker's
``per_message_s`` and the receiver's download; a publisher sends a split stage's input once (the broker fans
it out). The pipeline's period is its slowest stage's, and the source's upload of the input when the first
stage is elsewhere; frames/s = 1 / period. A frame's latency without queueing is the sum over its stages of
receive + compute + send, plus the broker per hop. Memory per worker: its blocks' weights + the largest
block's activations + ``QUEUE_SLOTS`` frames in and out.

Methods: ``exact`` (dynamic programming over subsets of workers and over cuts, k <= ``EXACT_MAX``), ``pso``
(the multi-device paper's particle-swarm placement; random keys give an order, the fixed-order DP
partitions it), ``greedy`` (the source first, the rest by speed, the fixed-order DP) and, for one worker,
``embedded`` (stages pinned to core sets: the number of stages, threads and replicas per stage).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt

from planner.fleet import Chain, Fleet, PipelineError, Worker

QUEUE_SLOTS = 4  # frames a stage holds waiting in front of it and behind it (the executor's credits)
SPLIT_KINDS = frozenset({"conv", "fc"})
EXACT_MAX = 8
METHODS = ("exact", "pso", "greedy", "embedded")
PSO_PARTICLES = 16
PSO_ITERATIONS = 40
PSO_INERTIA, PSO_COGNITIVE, PSO_SOCIAL = 0.72, 1.49, 1.49  # Clerc & Kennedy's constriction values
TOLERANCE = 1e-9
INF = np.inf

Matrix = npt.NDArray[np.float64]


class Mode(StrEnum):
    """How a stage's members share its blocks."""

    SINGLE = "single"  # one worker
    REPLICAS = "replicas"  # each member runs every block, frames round-robin
    SPLIT = "split"  # each member computes its share of one layer's output channels


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineStage:
    """Blocks ``first``..``stop - 1`` on ``workers``; compute, receive and send are per frame, per member."""

    workers: tuple[str, ...]
    mode: Mode
    first: int
    stop: int
    first_layer: str
    last_layer: str
    threads: int
    compute_s: tuple[float, ...]
    receive_s: tuple[float, ...]
    send_s: tuple[float, ...]
    period_s: float
    latency_s: float
    memory_bytes: tuple[float, ...]  # per member
    sends: frozenset[str]  # the tensors it sends on (the result at the last stage)
    fractions: tuple[float, ...] = ()  # split: each member's share of the layer's output channels
    cores: tuple[int, ...] = ()  # embedded: the cores it is pinned to

    def to_json(self) -> dict[str, Any]:
        doc = {k: getattr(self, k) for k in ("mode", "first", "stop", "first_layer", "last_layer", "threads",
                                              "period_s", "latency_s")}
        per_member = {k: list(getattr(self, k)) for k in ("workers", "compute_s", "receive_s", "send_s",
                                                           "memory_bytes", "fractions", "cores")}
        return {**doc, **per_member, "sends": sorted(self.sends)}


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelinePlan:
    """Stages in order, the period (the slowest stage, or the source's upload), frames/s and latency."""

    model: str
    method: str
    source: str
    stages: tuple[PipelineStage, ...]
    period_s: float
    latency_s: float
    source_send_s: float  # the source's upload of one input (0 when it is the first stage)
    result_receive_s: float  # the source's download of one result (0 when it is the last stage)
    per_message_s: float
    bottleneck: str

    @property
    def frames_per_s(self) -> float:
        return 1.0 / self.period_s

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "method": self.method, "source": self.source, "period_s": self.period_s,
                "frames_per_s": self.frames_per_s, "latency_s": self.latency_s,
                "source_send_s": self.source_send_s, "result_receive_s": self.result_receive_s,
                "per_message_s": self.per_message_s, "bottleneck": self.bottleneck,
                "stages": [s.to_json() for s in self.stages]}


def default_method(fleet: Fleet) -> str:
    """Exact up to ``EXACT_MAX`` workers, PSO beyond."""
    return "exact" if len(fleet.workers) <= EXACT_MAX else "pso"


def plan(chain: Chain, fleet: Fleet, *, method: str | None = None, latency_bound_s: float | None = None,
         seed: int = 0, split: bool = True) -> PipelinePlan:
    """The plan of ``method`` (default: ``default_method``) with the most frames/s (the lowest latency among
    those) within the bound; ``split`` False leaves intra-layer splits out (replicas stay: ``fleet.max_group`` 1
    leaves both out)."""
    method = method or default_method(fleet)
    if method not in METHODS:
        raise PipelineError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    costs = Costs(chain, fleet, split=split)
    if method == "embedded":
        if len(fleet.workers) != 1:
            raise PipelineError("the embedded method plans one worker's cores: give a fleet of one worker")
        return _embedded(costs, latency_bound_s)
    if method == "exact":
        if len(fleet.workers) > EXACT_MAX:
            raise PipelineError(f"exact planning is for at most {EXACT_MAX} workers; use pso or greedy")
        return _best(costs, _subset_space(costs), latency_bound_s, method)
    order = greedy_order(costs) if method == "greedy" else pso_order(costs, seed=seed)
    return _best(costs, _order_space(costs, order), latency_bound_s, method)


def greedy_order(costs: Costs) -> tuple[int, ...]:
    """The source first, then the others fastest first or slowest first, whichever partitions better."""
    src = costs.fleet.source_index
    rest = sorted((w for w in range(costs.k) if w != src), key=lambda w: costs.whole_s[w])
    orders = [(src, *rest), (src, *rest[::-1])]
    return min(orders, key=lambda o: _dp(_order_space(costs, o), None).value)


def pso_order(costs: Costs, *, seed: int = 0, particles: int = PSO_PARTICLES,
              iterations: int = PSO_ITERATIONS) -> tuple[int, ...]:
    """Particle-swarm placement: a particle's random keys sort the workers; its fitness is the fixed-order DP's."""
    rng = np.random.default_rng(seed)
    k = costs.k
    seen: dict[tuple[int, ...], float] = {}

    def fitness(keys: npt.NDArray[np.float64]) -> float:
        order = tuple(int(i) for i in np.argsort(keys))
        if order not in seen:
            seen[order] = _dp(_order_space(costs, order), None).value
        return seen[order]

    x = rng.random((particles, k))
    v = rng.uniform(-0.5, 0.5, (particles, k))
    best_x, best_f = x.copy(), np.array([fitness(p) for p in x])
    g = int(np.argmin(best_f))
    for _ in range(iterations):
        r1, r2 = rng.random((particles, k)), rng.random((particles, k))
        v = PSO_INERTIA * v + PSO_COGNITIVE * r1 * (best_x - x) + PSO_SOCIAL * r2 * (best_x[g] - x)
        x = np.clip(x + v, 0.0, 1.0)
        f = np.array([fitness(p) for p in x])
        better = f < best_f
        best_x[better], best_f[better] = x[better], f[better]
        g = int(np.argmin(best_f))
    return tuple(int(i) for i in np.argsort(best_x[g]))


class Costs:
    """Every worker's period and latency for every block range, as (n + 1) x (n + 1) matrices (inf: cannot)."""

    def __init__(self, chain: Chain, fleet: Fleet, *, split: bool = True) -> None:
        self.chain, self.fleet, self.allow_split = chain, fleet, split
        self.k, n = len(fleet.workers), chain.n
        self.n = n
        feats = [(b.kind, b.features) for b in chain.blocks]
        self.layer_s = np.array([w.latency.predict_many(feats) / w.speed * _scale(w, n) for w in fleet.workers])
        cum = np.concatenate([np.zeros((self.k, 1)), np.cumsum(self.layer_s, axis=1)], axis=1)
        overhead = np.array([w.latency.stage_overhead_s / w.speed for w in fleet.workers])
        # [w, a, b]: wall seconds of a stage of blocks a..b-1 on worker w (its CPU quota, if it has one, applied
        # to the stage as a whole: a busy stage resumes at a refill, as ``LatencyModel.stage_s`` models)
        self.compute = self.wall(cum[:, None, :] - cum[:, :, None] + overhead[:, None, None])
        self.whole_s = self.compute[:, 0, n]
        self.bits = np.asarray(chain.boundary_bytes) * 8.0
        weights = np.concatenate([[0.0], np.cumsum(chain.weight_bytes)])
        work = np.asarray(chain.work_bytes)
        peak = np.full((n + 1, n + 1), 0.0)
        for a in range(n):
            peak[a, a + 1:] = np.maximum.accumulate(work[a:])
        buffers = QUEUE_SLOTS * (np.asarray(chain.boundary_bytes)[:, None] + np.asarray(chain.boundary_bytes)[None])
        self.weights = weights[None, :] - weights[:, None]
        self.memory = self.weights + peak + buffers  # a worker running blocks a..b-1
        self.valid = np.triu(np.ones((n + 1, n + 1), dtype=bool), 1)
        src = fleet.workers[fleet.source_index]
        self.source_send_s = self.bits[0] / src.uplink_bps
        self.receive = np.array([self.bits / w.downlink_bps for w in fleet.workers])  # [w, a]
        self.send = np.array([self.bits / w.uplink_bps for w in fleet.workers])  # [w, b]
        si = fleet.source_index
        self.receive[si, 0] = 0.0  # the source has its own frames
        self.send[si, n] = 0.0  # and keeps its own results
        self.result_hop_s = fleet.per_message_s + self.bits[n] / src.downlink_bps  # the result back to the source
        self.overhead_s = overhead
        self.uplink = np.array([w.uplink_bps for w in fleet.workers])
        self.downlink = np.array([w.downlink_bps for w in fleet.workers])
        self.memory_limit = np.array([w.memory_bytes for w in fleet.workers])
        self.split_at = np.array([a for a, b in enumerate(chain.blocks) if b.kind in SPLIT_KINDS], dtype=np.int64)
        singles = [self._single(w) for w in range(self.k)]
        self.period = np.array([p for p, _ in singles])  # [w, a, b]: worker w alone runs blocks a..b-1
        self.latency = np.array([lat for _, lat in singles])
        self.options: dict[tuple[int, ...], list[_Option]] = {}  # by group of workers (``_group_options``)

    def _single(self, w: int) -> tuple[Matrix, Matrix]:
        recv, send = self.receive[w][:, None], self.send[w][None, :]
        period = np.maximum(self.compute[w], np.maximum(recv, send))
        latency = recv + self.compute[w] + send + self.fleet.per_message_s  # the hop in: the broker's share
        ok = self.valid & (self.memory <= self.memory_limit[w])
        if w == self.fleet.source_index:
            ok[1:, :] = False  # the source can only be the first stage: its uplink carries the input otherwise
            latency[0, :] -= self.fleet.per_message_s  # its frames are already there
        else:
            period[0, :] = np.maximum(period[0, :], self.source_send_s)
            latency[0, :] += self.source_send_s
            latency[:, self.n] += self.result_hop_s
        return np.where(ok, period, INF), np.where(ok, latency, INF)

    def wall(self, busy: Matrix, workers: Sequence[int] | npt.NDArray[np.int64] | None = None) -> Matrix:
        """Each row's CPU seconds as wall seconds on its worker (row i: ``workers[i]``, default worker i)."""
        rows = range(self.k) if workers is None else [int(w) for w in workers]
        out = np.array(busy, dtype=np.float64)
        for i, w in enumerate(rows):
            quota = self.fleet.workers[w].latency.cpu_quota
            if quota is not None:
                out[i] = quota.wall_s(np.maximum(out[i], 0.0))
        return out

    def split(self, group: Sequence[int]) -> tuple[Matrix, Matrix, Matrix]:
        """(period, latency, shares) of one conv/fc layer split across ``group``; ``shares[m, i]`` is member m's
        share of the output channels of the i-th splittable layer (``split_at[i]``)."""
        n, at = self.n, self.split_at
        period, latency = np.full((n + 1, n + 1), INF), np.full((n + 1, n + 1), INF)
        if self.fleet.source_index in group or at.size == 0 or not self.allow_split:
            return period, latency, np.zeros((len(group), at.size))
        g = np.asarray(group)
        layer_s = np.maximum(self.layer_s[g][:, at], 1e-12)  # members x splittable layers
        f = (1.0 / layer_s) / (1.0 / layer_s).sum(axis=0)  # shares that equalise the members' compute
        comp = self.wall(self.overhead_s[g][:, None] + f * layer_s, g)
        recv = self.bits[at][None, :] / self.downlink[g][:, None]
        send = f * self.bits[at + 1][None, :] / self.uplink[g][:, None]
        mem = (f * np.asarray(self.chain.weight_bytes)[at] + np.asarray(self.chain.work_bytes)[at]
               + QUEUE_SLOTS * (self.bits[at] + self.bits[at + 1]) / 8)
        fits = (mem <= self.memory_limit[g][:, None]).all(axis=0)
        p = np.maximum(comp, np.maximum(recv, send)).max(axis=0)
        lat = (recv + comp + send).max(axis=0) + self.fleet.per_message_s
        first, last = at == 0, at + 1 == n
        p[first] = np.maximum(p[first], self.source_send_s)
        lat[first] += self.source_send_s
        lat[last] += self.result_hop_s
        period[at[fits], at[fits] + 1], latency[at[fits], at[fits] + 1] = p[fits], lat[fits]
        return period, latency, f

    def replicas(self, group: Sequence[int]) -> tuple[Matrix, Matrix]:
        """(period, latency) of ``group`` serving blocks a..b-1 round-robin."""
        if self.fleet.source_index in group:
            inf = np.full((self.n + 1, self.n + 1), INF)
            return inf, inf
        g = np.asarray(group)
        period = self.period[g].max(axis=0) / len(group)
        period[0, :] = np.maximum(period[0, :], self.source_send_s)  # the source uploads every frame all the same
        return period, self.latency[g].max(axis=0)


@dataclass(frozen=True, slots=True)
class _Option:
    """One way to serve a block range: a worker, replicas or a split (with its threads and cores, embedded)."""

    mode: Mode
    workers: tuple[int, ...]
    period: Matrix
    latency: Matrix
    threads: int = 0
    cores: tuple[int, ...] = ()
    shares: Matrix | None = None  # split: members x ``Costs.split_at``


@dataclass(frozen=True, slots=True)
class _Space:
    """States in topological order (the first is the start) and the moves out of each: (next, option or skip)."""

    states: list[Hashable]
    moves: Callable[[Hashable], Iterable[tuple[Hashable, _Option | None]]]
    n: int


@dataclass(frozen=True, slots=True)
class _Solution:
    value: float  # the objective at the end: the period (min-max) or the latency (threshold)
    path: list[tuple[int, int, _Option]]  # (first, stop, option) per stage


def _dp(space: _Space, threshold: float | None) -> _Solution:
    """Min-max period over the space (``threshold`` None) or min latency with every period <= ``threshold``."""
    n = space.n
    cols = np.arange(n + 1)
    start = np.full(n + 1, INF)
    start[0] = 0.0
    best: dict[Hashable, npt.NDArray[np.float64]] = {space.states[0]: start}
    # back pointers per state and boundary: the previous state, boundary and the move's option
    back: dict[Hashable, tuple[npt.NDArray[np.object_], npt.NDArray[np.int64], npt.NDArray[np.object_]]] = {}
    for s in space.states:
        f = best.get(s)
        if f is None or not np.isfinite(f).any():
            continue
        for nxt, opt in space.moves(s):
            if opt is None:
                cand, arg = f, cols
            else:
                if threshold is None:
                    m = np.maximum(f[:, None], opt.period)
                else:
                    m = f[:, None] + np.where(opt.period <= threshold * (1 + TOLERANCE), opt.latency, INF)
                arg = np.argmin(m, axis=0)
                cand = m[arg, cols]
            if nxt not in best:
                best[nxt] = np.full(n + 1, INF)
                back[nxt] = (np.empty(n + 1, dtype=object), np.zeros(n + 1, dtype=np.int64),
                             np.empty(n + 1, dtype=object))
            cur, (b_state, b_j, b_opt) = best[nxt], back[nxt]
            better = cand < cur
            if better.any():
                cur[better] = cand[better]
                b_state[better], b_j[better], b_opt[better] = s, arg[better], opt
    end = min(best, key=lambda s: best[s][n])
    value = float(best[end][n])
    path: list[tuple[int, int, _Option]] = []
    s, j = end, n
    while np.isfinite(value) and (s, j) != (space.states[0], 0):
        b_state, b_j, b_opt = back[s]
        prev, i, opt = b_state[j], int(b_j[j]), b_opt[j]
        if opt is not None:
            path.append((i, j, opt))
        s, j = prev, i
    return _Solution(value=value, path=path[::-1])


def _best(costs: Costs, space: _Space, latency_bound_s: float | None, method: str) -> PipelinePlan:
    """The min-max period, then the lowest latency at it; with a bound, the smallest period whose plan meets it."""
    fastest = _dp(space, None).value
    if not np.isfinite(fastest):
        raise PipelineError(_nowhere(costs))
    if latency_bound_s is None:
        return _plan(costs, _dp(space, fastest).path, method)
    periods = np.unique(_periods(space))
    periods = periods[np.isfinite(periods) & (periods >= fastest * (1 - TOLERANCE))]
    lo, hi = 0, len(periods) - 1
    if _dp(space, float(periods[hi])).value > latency_bound_s:
        quickest = _dp(space, float(periods[hi])).value
        raise PipelineError(f"no plan meets the latency bound {latency_bound_s * 1e3:.1f} ms: the quickest plan "
                            f"takes {quickest * 1e3:.1f} ms")
    while lo < hi:  # the smallest period at which some plan meets the bound (feasibility grows with the period)
        mid = (lo + hi) // 2
        if _dp(space, float(periods[mid])).value <= latency_bound_s:
            hi = mid
        else:
            lo = mid + 1
    return _plan(costs, _dp(space, float(periods[lo])).path, method)


def _periods(space: _Space) -> npt.NDArray[np.float64]:
    values = {id(opt.period): opt.period.ravel() for s in space.states for _, opt in space.moves(s) if opt is not None}
    return np.concatenate(list(values.values()))


def _subset_space(costs: Costs) -> _Space:
    """States: the set of workers used so far (a bitmask); a move adds a group of unused workers as a stage."""
    k = costs.k

    def moves(used: Hashable) -> Iterable[tuple[Hashable, _Option | None]]:
        assert isinstance(used, int)
        free = [w for w in range(k) if not used >> w & 1]
        for size in range(1, min(costs.fleet.max_group, len(free)) + 1):
            for group in itertools.combinations(free, size):
                mask = sum(1 << w for w in group)
                for opt in _group_options(costs, group):
                    yield used | mask, opt

    return _Space(states=list(range(1 << k)), moves=moves, n=costs.n)


def _order_space(costs: Costs, order: Sequence[int]) -> _Space:
    """States: positions in a fixed order; a move skips a worker or makes the next run of workers a stage."""
    k = len(order)

    def moves(pos: Hashable) -> Iterable[tuple[Hashable, _Option | None]]:
        assert isinstance(pos, int)
        if pos < k:
            yield pos + 1, None
        for size in range(1, min(costs.fleet.max_group, k - pos) + 1):
            for opt in _group_options(costs, tuple(order[pos:pos + size])):
                yield pos + size, opt

    return _Space(states=list(range(k + 1)), moves=moves, n=costs.n)


def _group_options(costs: Costs, group: tuple[int, ...]) -> list[_Option]:
    key = tuple(sorted(group))
    if key not in costs.options:
        costs.options[key] = _new_options(costs, key)
    return costs.options[key]


def _new_options(costs: Costs, group: tuple[int, ...]) -> list[_Option]:
    threads = min(costs.fleet.workers[w].cores for w in group)
    if len(group) == 1:
        return [_Option(Mode.SINGLE, group, costs.period[group[0]], costs.latency[group[0]], threads)]
    rp, rl = costs.replicas(group)
    sp, sl, shares = costs.split(group)
    return [_Option(Mode.REPLICAS, group, rp, rl, threads), _Option(Mode.SPLIT, group, sp, sl, threads, shares=shares)]


def _embedded(costs: Costs, latency_bound_s: float | None) -> PipelinePlan:
    """One worker's cores: stages with t threads and r replicas on t x r cores of their own, hand-offs local."""
    w = costs.fleet.workers[0]
    local = Worker(name=w.name, latency=w.latency, memory_bytes=w.memory_bytes, uplink_bps=w.loopback_bps,
                   downlink_bps=w.loopback_bps, speed=w.speed, cores=w.cores, parallel_fraction=w.parallel_fraction)
    lc = Costs(costs.chain, Fleet(workers=(local,), source=w.name, per_message_s=costs.fleet.per_message_s))
    lc.receive[0, 1:] = lc.bits[1:] / w.loopback_bps  # stage to stage through the local broker
    lc.send[0, :-1] = lc.bits[:-1] / w.loopback_bps
    options: dict[int, list[_Option]] = {}
    for t in range(1, w.cores + 1):
        comp = lc.compute[0] * w.amdahl(t)
        p, lat = _embedded_single(lc, comp)
        options[t] = [_Option(Mode.REPLICAS if r > 1 else Mode.SINGLE, (0,) * r, p / r, lat, t) for r in
                      range(1, w.cores // t + 1)]

    def moves(used: Hashable) -> Iterable[tuple[Hashable, _Option | None]]:
        assert isinstance(used, int)
        for t, opts in options.items():
            for opt in opts:
                cores = t * len(opt.workers)
                if used + cores <= w.cores:
                    yield used + cores, _Option(opt.mode, opt.workers, opt.period, opt.latency, t,
                                                cores=tuple(range(used, used + cores)))

    space = _Space(states=list(range(w.cores + 1)), moves=moves, n=lc.n)
    return _best(lc, space, latency_bound_s, "embedded")


def _embedded_single(lc: Costs, comp: Matrix) -> tuple[Matrix, Matrix]:
    """A stage inside one host: the source rule does not apply (every stage is on the source)."""
    recv, send = lc.receive[0][:, None], lc.send[0][None, :]
    period = np.maximum(comp, np.maximum(recv, send))
    latency = recv + comp + send + lc.fleet.per_message_s
    latency[0, :] -= lc.fleet.per_message_s  # the first stage has the frame already
    ok = lc.valid & (lc.memory <= lc.fleet.workers[0].memory_bytes)
    return np.where(ok, period, INF), np.where(ok, latency, INF)


def _plan(costs: Costs, path: list[tuple[int, int, _Option]], method: str) -> PipelinePlan:
    chain, fleet = costs.chain, costs.fleet
    stages = []
    for a, b, opt in path:
        names = tuple(fleet.workers[w].name for w in opt.workers)
        fractions: tuple[float, ...] = ()
        if opt.mode is Mode.SPLIT and opt.shares is not None:
            fractions = tuple(float(x) for x in opt.shares[:, int(np.flatnonzero(costs.split_at == a)[0])])
        shares = fractions or (1.0,) * len(opt.workers)
        comp = tuple(_compute(costs, w, a, b, f, opt.threads, method) for w, f in zip(opt.workers, shares, strict=True))
        recv = tuple(float(costs.receive[w, a]) for w in opt.workers)
        send = tuple(float(costs.send[w, b]) * f for w, f in zip(opt.workers, shares, strict=True))
        buffers = QUEUE_SLOTS * (costs.bits[a] + costs.bits[b]) / 8
        memory = tuple(float(costs.memory[a, b]) if opt.mode is not Mode.SPLIT else
                       f * chain.weight_bytes[a] + chain.work_bytes[a] + buffers for f in shares)
        stages.append(PipelineStage(workers=names, mode=opt.mode, first=a, stop=b, first_layer=chain.blocks[a].name,
                            last_layer=chain.blocks[b - 1].name, threads=opt.threads, compute_s=comp,
                            receive_s=recv, send_s=send, period_s=float(opt.period[a, b]),
                            latency_s=float(opt.latency[a, b]), memory_bytes=memory,
                            sends=chain.boundary_tensors[b], fractions=fractions, cores=opt.cores))
    if method == "embedded":  # the stages share the host (replicas share one session's weights)
        total = sum(s.memory_bytes[0] for s in stages)  # replicas share one session: counted once
        if total > fleet.workers[0].memory_bytes:
            raise PipelineError(f"the plan needs {total / 1e6:.1f} MB on {fleet.source}, which has "
                                f"{fleet.workers[0].memory_bytes / 1e6:.1f} MB")
    source_send = 0.0 if method == "embedded" or fleet.source in stages[0].workers else float(costs.source_send_s)
    result = 0.0 if method == "embedded" or fleet.source in stages[-1].workers else float(
        costs.bits[costs.n] / fleet.workers[fleet.source_index].downlink_bps)
    period = max(s.period_s for s in stages)
    return PipelinePlan(model=chain.name, method=method, source=fleet.source, stages=tuple(stages),
                        period_s=period, latency_s=sum(s.latency_s for s in stages), source_send_s=source_send,
                        result_receive_s=result, per_message_s=fleet.per_message_s,
                        bottleneck=_bottleneck(stages, source_send, period))


def _scale(worker: Worker, n: int) -> npt.NDArray[np.float64] | float:
    if not worker.block_scale:
        return 1.0
    if len(worker.block_scale) != n:
        raise PipelineError(f"worker {worker.name}: block_scale has {len(worker.block_scale)} factors for {n} blocks")
    return np.asarray(worker.block_scale, dtype=np.float64)


def _compute(costs: Costs, w: int, a: int, b: int, share: float, threads: int, method: str) -> float:
    worker = costs.fleet.workers[w]
    if share != 1.0:
        busy = worker.latency.stage_overhead_s / worker.speed + share * float(costs.layer_s[w, a])
        return float(costs.wall(np.array([[busy]]), [w])[0, 0])
    base = float(costs.compute[w, a, b])
    return base * worker.amdahl(threads) if method == "embedded" else base


def _bottleneck(stages: Sequence[PipelineStage], source_send: float, period: float) -> str:
    """What limits the throughput: a stage's compute, receive or send, or the source's upload."""
    if source_send >= period * (1 - TOLERANCE):
        return "source uplink"
    for i, s in enumerate(stages):
        if s.period_s >= period * (1 - TOLERANCE):
            copies = len(s.workers) if s.mode is Mode.REPLICAS else 1
            part = max((("compute", max(s.compute_s)), ("receive", max(s.receive_s)), ("send", max(s.send_s))),
                       key=lambda x: x[1])
            what = part[0]
            if s.stop - s.first == 1 and what == "compute":
                what = "a split layer's compute" if s.mode is Mode.SPLIT else "an indivisible layer"
            return f"stage {i + 1} ({'+'.join(s.workers)}{f' x{copies}' if copies > 1 else ''}): {what}"
    return "unknown"


def _nowhere(costs: Costs) -> str:
    """Why no plan exists: a block too big for every worker, or too few workers for the rules."""
    largest = max(w.memory_bytes for w in costs.fleet.workers)
    for a in range(costs.n):
        if costs.memory[a, a + 1] > largest:
            block = costs.chain.blocks[a]
            why = (f"the model fits nowhere: block {block.name!r} needs {costs.memory[a, a + 1] / 1e6:.1f} MB, more "
                   f"than any worker has ({largest / 1e6:.1f} MB)")
            others = sorted((w for w in range(costs.k) if w != costs.fleet.source_index),
                            key=lambda w: -costs.memory_limit[w])[:costs.fleet.max_group]
            if len(others) < 2 or not np.isfinite(costs.split(others)[0][a, a + 1]):
                return why + (", and no split of it over the others fits" if block.kind in SPLIT_KINDS else "")
    return ("no plan covers the model with these workers: each runs one stage, the source only the first, and "
            "every stage must fit its workers' memory")
