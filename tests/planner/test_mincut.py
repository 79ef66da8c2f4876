"""The min-cut planner: optimal closed partitions of DAGs, each crossing tensor paid once, and the offline
candidate set that makes a request's decision a lookup."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.bundle import Bundle
from planner import candidates, core, edgent, mincut, policies
from planner.errors import PlannerError
from planner.latency import LatencyModel


@st.composite
def dags(draw: st.DrawFn, max_nodes: int = 10) -> mincut.LayerGraph:
    """Random DAGs: node i reads the model input or 1-2 earlier nodes' tensors; the last node is the output."""
    n = draw(st.integers(2, max_nodes))
    readers: dict[int, list[int]] = {}
    for i in range(n):
        sources = draw(st.lists(st.integers(-1, i - 1), min_size=1, max_size=2, unique=True)) if i else [-1]
        for s in sources:
            readers.setdefault(s, []).append(i)
    for i in range(n - 1):  # every node leads on to the output
        if i not in readers:
            readers[i] = [draw(st.integers(i + 1, n - 1))]
    sizes = st.floats(0.0, 1e6)
    tensors = tuple(mincut.Tensor(name=f"t{p}" if p >= 0 else "input", bytes=draw(sizes), producer=p,
                                  consumers=tuple(sorted(set(c)))) for p, c in sorted(readers.items()))
    times = st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n)
    return mincut.LayerGraph(names=tuple(f"n{i}" for i in range(n)), device_s=np.array(draw(times)),
                             edge_s=np.array(draw(times)), tensors=tensors, output=n - 1)


params = st.tuples(st.floats(1 / 64, 64), st.floats(0.0, 1e-4))


@settings(max_examples=200, deadline=None)
@given(dags(), params)
def test_min_cut_equals_brute_force(g: mincut.LayerGraph, p: tuple[float, float]) -> None:
    fast, slow = mincut.min_cut(g, *p), mincut.brute_force(g, *p)
    assert fast.cost(*p) == pytest.approx(slow.cost(*p), rel=1e-6, abs=1e-9)
    assert g.output not in fast.head  # a plan that uses the edge
    mincut.partition(g, fast.head)  # closed: raises otherwise


@settings(max_examples=60, deadline=None)
@given(dags(max_nodes=8), st.lists(params, min_size=5, max_size=5))
def test_the_offline_candidates_decide_as_the_per_request_min_cut(g: mincut.LayerGraph,
                                                                  probes: list[tuple[float, float]]) -> None:
    parts = mincut.candidate_partitions(g)
    for r, y in probes:
        best = min(p.cost(r, y) for p in parts)
        assert best == pytest.approx(mincut.min_cut(g, r, y).cost(r, y), rel=1e-6, abs=1e-9)


def _diamond() -> mincut.LayerGraph:
    """a reads the input; b and c both read a; d joins them. a's tensor is big, b's and c's are small."""
    tensors = (mincut.Tensor("input", 1000.0, -1, (0,)), mincut.Tensor("a", 5000.0, 0, (1, 2)),
               mincut.Tensor("b", 10.0, 1, (3,)), mincut.Tensor("c", 10.0, 2, (3,)))
    return mincut.LayerGraph(names=("a", "b", "c", "d"), device_s=np.array([0.1, 0.1, 0.1, 0.1]),
                             edge_s=np.array([0.01, 0.01, 0.01, 0.01]), tensors=tensors, output=3)


def test_a_tensor_read_by_several_edge_layers_crosses_once() -> None:
    g = _diamond()
    after_a = mincut.partition(g, frozenset({0}))
    assert after_a.crossing == {"a"} and after_a.up_bytes == 5000.0  # read by b and c on the edge: paid once
    # at 1 ms per KB the big tensor costs 5 s: crossing b and c (20 bytes) wins, a multi-tensor cut
    best = mincut.min_cut(g, 1.0, 1e-3)
    assert best.head == frozenset({0, 1, 2}) and best.crossing == {"b", "c"}
    assert best.cost(1.0, 1e-3) == pytest.approx(0.3 + 0.01 + 0.02)


def test_only_closed_partitions_are_plans() -> None:
    g = _diamond()
    with pytest.raises(PlannerError, match="not a closed head"):
        mincut.partition(g, frozenset({1}))  # b on the device, its producer a on the edge
    # with edge time free and transfers free, everything goes to the edge: nothing is left behind on the device
    assert mincut.min_cut(g, 0.0, 0.0).cost(0.0, 0.0) == pytest.approx(0.0)
    heads = list(mincut.closed_heads(g))
    assert frozenset({1}) not in heads and frozenset({0, 1}) in heads and len(heads) == 5


def test_on_a_chain_the_min_cut_policy_plans_as_edgent(bundle: Bundle, pi3: LatencyModel,
                                                       desktop: LatencyModel) -> None:
    policy = policies.make("mincut")
    c_min = policy.compile(bundle.exits, pi3, desktop)
    c_edgent = candidates.compile_candidates(bundle.exits, pi3, desktop)
    assert c_min.candidates.exit.size <= c_edgent.exit.size  # only the cuts ever optimal
    rng = np.random.default_rng(0)
    for bps, deadline, speed in zip(10 ** rng.uniform(4, 7.5, 60), rng.uniform(0.02, 1.5, 60),
                                    10 ** rng.uniform(-1, 1, 60), strict=True):
        cond = core.Conditions(bandwidth_bps=float(bps), deadline_s=float(deadline), device_speed=float(speed))
        ours, theirs = policy.decide(core.View(prepared=c_min, conditions=cond)), edgent.plan(c_edgent, cond)
        assert type(ours) is type(theirs)
        if isinstance(ours, core.Decision) and isinstance(theirs, core.Decision):
            assert (ours.exit, ours.predicted_s) == (theirs.exit, pytest.approx(theirs.predicted_s))


def test_conditions_outside_the_prepared_box_get_their_own_min_cut(bundle: Bundle, pi3: LatencyModel,
                                                                   desktop: LatencyModel) -> None:
    policy = policies.make("mincut")
    c = policy.compile(bundle.exits, pi3, desktop)
    # an edge 1000x faster than the device: outside the box (speed ratio down to 1/256)
    cond = core.Conditions(bandwidth_bps=1e6, deadline_s=1.0, edge_speed=1e-3)
    chosen = policy.decide(core.View(prepared=c, conditions=cond))
    full = edgent.plan(candidates.compile_candidates(bundle.exits, pi3, desktop), cond)
    assert isinstance(chosen, core.Decision) and isinstance(full, core.Decision)
    assert chosen.exit == full.exit and chosen.predicted_s == pytest.approx(full.predicted_s)


def test_a_forced_plan_prepares_the_dag_cut_it_names(pi3: LatencyModel, desktop: LatencyModel) -> None:
    from dataclasses import replace

    from models.bundle import BUNDLES_DIR, load_bundle

    resnet = load_bundle(BUNDLES_DIR / "fmnist-branchy-resnet")
    ex = resnet.exits[-1]
    g = mincut.from_exit(ex, pi3, desktop)
    # the heads of the first k layers (execution order): inside a residual block two tensors cross
    parts = [mincut.partition(g, frozenset(range(k))) for k in range(1, g.n)]
    multi = [p for p in parts if len(p.crossing) > 1]
    assert multi and all(p.crossing not in {c.tensors for c in ex.cuts} for p in multi)  # no exit lists them
    cond = core.Conditions(bandwidth_bps=1e6, deadline_s=1.0)
    for p in multi:
        forced = policies.make("fixed", exit=ex.index, cut=p.crossing)  # it prepares that cut itself, from the graph
        ours = forced.decide(core.View(prepared=forced.compile(resnet.exits, pi3, desktop), conditions=cond))
        exits = [*resnet.exits[:-1], replace(ex, cuts=mincut.cut_points(g, [p]))]
        theirs = candidates.fixed_plan(candidates.compile_candidates(exits, pi3, desktop), cond, ex.index, p.crossing)
        assert isinstance(ours, core.Decision) and ours.cut_tensors == p.crossing
        assert (ours.cut, ours.predicted_s) == (theirs.cut, pytest.approx(theirs.predicted_s))
    refused = []
    for t in sorted(multi[0].crossing):  # the later of the two alone is no cut: the other is needed beyond it
        try:
            ex.cut_through(frozenset({t}))
        except PlannerError as exc:
            refused.append(str(exc))
    assert len(refused) == 1 and "the rest also needs" in refused[0]
