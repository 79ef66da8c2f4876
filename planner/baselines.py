"""The comparison methods as policies: Edgent's baselines (device-only, edge-only, Neurosurgeon's partition-only,
right-sizing's exit-only) and ``Fixed``, a forced plan for experiments."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from planner.candidates import Stateless, costs_of, fixed_plan, local_of, plan_at
from planner.core import PLAIN, Candidates, Conditions, Decision, ExitInfo, Infeasible, Prepared, View
from planner.errors import PlannerError
from planner.latency import LatencyModel

BASELINES = ("device_only", "edge_only", "partition_only", "exit_only")


def baselines(c: Candidates, cond: Conditions) -> dict[str, Decision | Infeasible]:
    """The comparison methods, each reported with its own deadline verdict.

    device_only and edge_only run the most accurate exit wholly on one side; partition_only
    (Neurosurgeon) takes that exit's fastest cut; exit_only (right-sizing without partitioning) runs
    on the device the most accurate exit that meets the deadline there.
    """
    costs = costs_of(c, cond)
    total = costs[0]
    _top, first, stop = c.rank[0]
    span = np.arange(first, stop)
    device_only = int(span[c.cut[span] == c.n_layers[span]][0])
    edge_only = int(span[c.cut[span] == 0][0])
    partition = first + int(np.argmin(total[first:stop]))
    local = local_of(c, cond, costs)
    return {"device_only": plan_at(c, device_only, costs, cond),
            "edge_only": plan_at(c, edge_only, costs, cond),
            "partition_only": plan_at(c, partition, costs, cond),
            "exit_only": local if local.feasible else Infeasible("no exit meets the deadline on the device")}


class Baseline(Stateless):
    """One of the comparison methods of ``baselines`` (``BASELINES``) as a policy."""

    def __init__(self, name: str) -> None:
        if name not in BASELINES:
            raise PlannerError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
        self.name = name

    def decide(self, view: View) -> Decision | Infeasible:
        return baselines(view.candidates, view.conditions)[self.name]


class Fixed(Stateless):
    """Always the same exit, cut (tensor names, or a chain's layer count) and encoding of the cut's tensors: forced
    plans in experiments."""

    def __init__(self, exit: int, cut: int | frozenset[str], encoding: str = PLAIN) -> None:
        self.exit, self.cut, self.encoding = exit, cut, encoding

    def compile(self, exits: Sequence[ExitInfo], device: LatencyModel, edge: LatencyModel) -> Prepared:
        """The exits' candidates, with this plan's cut among them where it is a DAG cut no exit lists."""
        if isinstance(self.cut, frozenset) and 1 <= self.exit <= len(exits):
            ex = exits[self.exit - 1]
            if self.cut and self.cut != {ex.input} and all(c.tensors != self.cut for c in ex.cuts):
                exits = [*exits[:self.exit - 1], replace(ex, cuts=(*ex.cuts, ex.cut_through(self.cut))),
                         *exits[self.exit:]]
        return super().compile(exits, device, edge)

    def decide(self, view: View) -> Decision | Infeasible:
        return fixed_plan(view.candidates, view.conditions, self.exit, self.cut, self.encoding)
