"""The costing every planning policy shares: candidates compiled from two latency models, their predicted times
under the conditions of one request, and the plans built from them (a fixed one, the local fallback, the most
accurate that meets the deadline).

``compile_candidates`` turns a multi-exit model's description and the two hosts' latency models into flat arrays
of every (exit, cut, encoding) candidate once; a request is then costed in a handful of vectorised operations
(microseconds). ``Stateless`` is the base of the policies that prepare only these candidates and learn nothing.
Imports only ``core`` (and the latency and encoding models): no policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from planner.core import (
    PLAIN,
    Candidates,
    Conditions,
    Decision,
    ExitInfo,
    Infeasible,
    Modelled,
    Observation,
    Prepared,
    route,
)
from planner.encodings import cost_s as encoding_cost_s
from planner.errors import PlannerError
from planner.latency import LatencyModel


class Stateless:
    """Base of the policies that prepare only the exits' costed candidates and learn nothing from outcomes."""

    def compile(self, exits: Sequence[ExitInfo], device: LatencyModel, edge: LatencyModel) -> Prepared:
        """Every (exit, listed cut, encoding) costed under the two models."""
        return Prepared(candidates=compile_candidates(exits, device, edge))

    def observe(self, outcome: Observation) -> None:
        """Nothing to learn."""


def compile_candidates(exits: Sequence[ExitInfo], device: LatencyModel, edge: LatencyModel) -> Candidates:
    """Cost every (exit, cut, encoding) candidate's compute parts under the device's and the edge's models.

    An encoded candidate crosses its measured bytes, at its measured accuracy (never above the exit's own), and
    adds its encoding's compute to both sides (``planner.encodings``)."""
    if not exits:
        raise PlannerError("a model needs at least one exit")
    if [ex.index for ex in exits] != list(range(1, len(exits) + 1)):
        raise PlannerError("exits must be numbered 1..N in order")
    cols: dict[str, list[Any]] = {k: [] for k in ("exit", "cut", "n", "acc", "dev", "edge", "up", "down", "t", "enc",
                                                  "head", "rest")}
    rank = []
    for ex in exits:
        feats = [(lay.kind, lay.features) for lay in ex.layers]
        dev_cum = np.concatenate([[0.0], np.cumsum(device.predict_many(feats))])
        edge_cum = np.concatenate([[0.0], np.cumsum(edge.predict_many(feats))])
        n = len(ex.layers)
        dev_layer, edge_layer = np.diff(dev_cum), np.diff(edge_cum)
        names = [lay.name for lay in ex.layers]
        # a cut's head is its listed layers, or (a chain, and every single-tensor cut ``models.graph.cuts`` finds)
        # the exit's first ``index`` layers: prefix sums
        points = [(0, ex.input_bytes, frozenset({ex.input}), None, ex.input_encodings),
                  *((c.index, c.bytes, c.tensors, c.head, c.encodings) for c in ex.cuts), (n, 0, frozenset(), None, ())]
        whole_s = _wall(device, float(dev_cum[n]), True)  # the exit on the device as one stage
        plain, encoded = [], []
        for p, nbytes, tensors, head, encodings in sorted(points, key=lambda c: c[0]):
            on_edge = p < n
            if head is None:
                head_s, rest_s = float(dev_cum[p]), float(edge_cum[n] - edge_cum[p])
            else:
                on_device = np.array([name in head for name in names])
                head_s, rest_s = float(dev_layer[on_device].sum()), float(edge_layer[~on_device].sum())
            dev_s = _wall(device, head_s, p > 0)
            edge_s = _wall(edge, rest_s, on_edge)
            local = (dev_s, max(whole_s - dev_s, 0.0))  # the head alone, and a local finish from the cut
            plain.append((p, n, ex.accuracy, dev_s, edge_s, nbytes if on_edge else 0, tensors, PLAIN, local))
            for e in encodings if on_edge else ():
                enc_s, dec_s = encoding_cost_s(e.name, nbytes, device, edge)
                # encoding runs with the head (one stage), or alone before an edge-only upload: no stage of its own
                enc_wall = _wall(device, head_s + enc_s, True) if p else float(device.stage_s(enc_s, overhead=False))
                encoded.append((p, n, min(e.accuracy, ex.accuracy), enc_wall, _wall(edge, rest_s + dec_s, True),
                                e.bytes, tensors, e.name, local))
        first = len(cols["exit"])
        rank.append((ex.index, first, first + len(plain)))
        for p, n, accuracy, dev_s, edge_s, up, tensors, enc, (head_wall, rest) in [
                *plain, *sorted(encoded, key=lambda r: (-r[2], r[0]))]:
            cols["exit"].append(ex.index)
            cols["cut"].append(p)
            cols["n"].append(n)
            cols["acc"].append(accuracy)
            cols["dev"].append(dev_s)
            cols["edge"].append(edge_s)
            cols["up"].append(up)
            cols["down"].append(ex.result_bytes if p < n else 0)
            cols["t"].append(tensors)
            cols["enc"].append(enc)
            cols["head"].append(head_wall)
            cols["rest"].append(rest)
    exit_arr, acc = np.array(cols["exit"], dtype=np.int64), np.array(cols["acc"], dtype=np.float64)
    uses_edge = np.array([p < n for p, n in zip(cols["cut"], cols["n"], strict=True)])
    order = sorted({(-a, -e) for a, e in zip(acc.tolist(), exit_arr.tolist(), strict=True)})
    level = {key: i for i, key in enumerate(order)}
    top = {ex.index: ex.accuracy for ex in exits}
    # one matrix; the named arrays are its columns (column-major: each one contiguous)
    parts = np.asfortranarray(np.column_stack([cols["up"], cols["down"], uses_edge, cols["dev"], cols["edge"]]),
                              dtype=np.float64)
    return Candidates(exits=tuple(exits), exit=exit_arr, cut=np.array(cols["cut"], dtype=np.int64),
                      n_layers=np.array(cols["n"], dtype=np.int64), accuracy=acc,
                      device_s=parts[:, 3], edge_s=parts[:, 4], up_bytes=parts[:, 0], down_bytes=parts[:, 1],
                      uses_edge=uses_edge, parts=parts, head_s=np.array(cols["head"], dtype=np.float64),
                      rest_s=np.array(cols["rest"], dtype=np.float64),
                      tensors=tuple(cols["t"]), encoding=tuple(cols["enc"]),
                      routes=tuple(route(exits[e - 1], t) for e, t in zip(cols["exit"], cols["t"], strict=True)),
                      positions={k: i for i, k in reversed(list(enumerate(zip(cols["exit"], cols["t"], cols["enc"],
                                                                               strict=True))))},
                      plain=np.array([e == PLAIN for e in cols["enc"]], dtype=np.bool_),
                      level=np.array([level[(-a, -e)] for a, e in zip(acc.tolist(), exit_arr.tolist(), strict=True)],
                                     dtype=np.int64),
                      rank=tuple(sorted(rank, key=lambda r: (-top[r[0]], -r[0]))))


def _wall(model: LatencyModel, compute_s: float, runs: bool) -> float:
    """Wall seconds of one stage of ``compute_s`` on ``model``'s host (0 where no stage runs there)."""
    return float(model.stage_s(compute_s)) if runs else 0.0


def latencies(c: Candidates, cond: Conditions) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(end-to-end, transfer) predicted seconds of every candidate."""
    down = cond.downlink_bps or cond.bandwidth_bps
    # what any plan that uses the edge pays besides its tensors: the per-message cost, the request's own bytes, and
    # our earlier uploads still ahead of it
    wire = cond.rtt_s + (cond.uplink_backlog_bytes + cond.message_bytes) * 8.0 / cond.bandwidth_bps
    transfer = c.parts[:, :3] @ np.array([8.0 / cond.bandwidth_bps, 8.0 / down, wire])
    if cond.free_bytes:  # a token bucket's burst: that many of a request's bytes cross without waiting for the rate
        sent = c.up_bytes + cond.uplink_backlog_bytes + cond.message_bytes
        transfer = transfer - np.minimum(sent, cond.free_bytes) * 8.0 / cond.bandwidth_bps * c.uses_edge
    total = transfer + c.parts[:, 2:] @ np.array([cond.edge_queue_s, cond.device_speed, cond.edge_speed])
    return total, transfer


def bounds(c: Candidates, cond: Conditions, total: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """What each candidate's latency (``total``, from ``latencies``) may reach with the margins: the device's
    part plus ``device_margin_s``, the rest times ``remote_margin``. This is what must meet the deadline."""
    if cond.device_margin_s == 0 and cond.remote_margin == 1:
        return total
    device = c.device_s * cond.device_speed
    return total + (device > 0) * cond.device_margin_s + (total - device) * (cond.remote_margin - 1)


def most_accurate(c: Candidates, cond: Conditions, *, plain_only: bool = False) -> Decision | Infeasible:
    """Edgent's rule (its Algorithm 1) over ``c``: the most accurate exit whose best candidate meets the deadline,
    at that best one (the fastest predicted of those that meet it, margins included). When nothing meets it, the
    ``Infeasible`` still names the plan to run: the one predicted to finish first of all (any exit, cut, encoding
    or the device alone; margins included), flagged as missing the deadline.
    ``plain_only``: only candidates whose tensors cross as float32."""
    costs = costs_of(c, cond)
    chosen = _search(c, cond, costs, plain_only=plain_only)
    if isinstance(chosen, Decision):
        return chosen
    allowed = np.flatnonzero(c.plain) if plain_only else np.arange(c.exit.size)
    fastest = int(allowed[np.argmin(costs[2][allowed])])
    return Infeasible(f"{chosen.reason}; running the fastest predicted plan", plan_at(c, fastest, costs, cond))


def fixed_plan(c: Candidates, cond: Conditions, exit_index: int, cut: int | frozenset[str],
               encoding: str = PLAIN) -> Decision:
    """The plan running exit ``exit_index`` cut at ``cut`` (tensors, or a chain's layer count), its tensors crossing
    in ``encoding``, as predicted now."""
    return plan_at(c, c.index(exit_index, cut, encoding), costs_of(c, cond), cond)


def local_plan(c: Candidates, cond: Conditions) -> Decision:
    """The most accurate exit that meets the deadline on the device alone; else the fastest (infeasible)."""
    return local_of(c, cond, costs_of(c, cond))


_NONE = np.int64(2**62)  # the accuracy level of a candidate that misses the deadline
Costs = tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]


def _search(c: Candidates, cond: Conditions, costs: Costs, *, plain_only: bool = False) -> Decision | Infeasible:
    """The most accurate candidate that meets the deadline (``c.level``), the fastest of equally accurate ones."""
    total, _transfer, bound = costs
    ok = bound <= cond.deadline_s
    if plain_only:
        ok &= c.plain
    level = np.where(ok, c.level, _NONE)
    top = int(level.argmin())
    if not ok[top]:
        return Infeasible(f"no exit meets {cond.deadline_s * 1e3:.0f} ms")
    best = int(np.argmin(np.where(level == level[top], total, np.inf)))
    return plan_at(c, best, costs, cond)


def local_of(c: Candidates, cond: Conditions, costs: Costs) -> Decision:
    total, _transfer, bound = costs
    on_device = np.flatnonzero(~c.uses_edge)
    fits = on_device[bound[on_device] <= cond.deadline_s]
    if fits.size:
        best = max(fits, key=lambda i: (c.accuracy[i], c.exit[i]))
    else:
        best = on_device[int(np.argmin(total[on_device]))]
    return plan_at(c, int(best), costs, cond)


def costs_of(c: Candidates, cond: Conditions) -> Costs:
    """(end-to-end, transfer, with the margins) seconds of every candidate, computed once per decision."""
    total, transfer = latencies(c, cond)
    return total, transfer, bounds(c, cond, total)


def plan_at(c: Candidates, i: int, costs: Costs, cond: Conditions) -> Decision:
    """Candidate ``i`` as the plan it is, with its times under ``cond`` (``costs``: ``costs_of(c, cond)``)."""
    total, transfer, bound = costs
    ex = c.exits[int(c.exit[i]) - 1]
    uses_edge = bool(c.uses_edge[i])
    return Decision(feasible=bool(bound[i] <= cond.deadline_s), exit=ex.index, cut=int(c.cut[i]),
                    n_layers=int(c.n_layers[i]), cut_tensors=c.tensors[i], route=c.routes[i],
                    predicted_s=float(total[i]), bound_s=float(bound[i]),
                    device_s=float(c.device_s[i] * cond.device_speed), transfer_s=float(transfer[i]),
                    edge_s=float(c.edge_s[i] * cond.edge_speed + uses_edge * cond.edge_queue_s),
                    accuracy=float(c.accuracy[i]), encoding=c.encoding[i],
                    modelled=Modelled(head_s=float(c.head_s[i]), rest_s=float(c.rest_s[i]),
                                      tail_s=float(c.edge_s[i]), up_bytes=float(c.up_bytes[i])))
