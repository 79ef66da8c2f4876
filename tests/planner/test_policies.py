"""The policy seam: policies by name, decisions with routes, infeasible as its own type."""

import pytest

from models.bundle import Bundle
from planner import baselines, candidates, core, edgent, policies
from planner.errors import PlannerError
from planner.latency import LatencyModel


@pytest.fixture
def cands(bundle: Bundle, pi3: LatencyModel, desktop: LatencyModel) -> core.Candidates:
    return candidates.compile_candidates(bundle.exits, pi3, desktop)


def _view(c: core.Candidates | core.Prepared, bps: float, deadline_s: float) -> core.View:
    prepared = c if isinstance(c, core.Prepared) else core.Prepared(candidates=c)
    return core.View(prepared=prepared, conditions=core.Conditions(bandwidth_bps=bps, deadline_s=deadline_s))


def test_every_registered_policy_decides_through_the_one_interface(bundle: Bundle, pi3: LatencyModel,
                                                                   desktop: LatencyModel,
                                                                   cands: core.Candidates) -> None:
    for name in sorted(set(policies.POLICIES) - {"fixed"}):
        policy = policies.make(name)
        view = _view(policy.compile(bundle.exits, pi3, desktop), 4e5, 0.3)  # each decides over what it prepared
        decision = policy.decide(view)
        assert isinstance(decision, core.Decision | core.Infeasible), name
        if isinstance(decision, core.Decision):
            policy.observe(core.Observation(decision=decision, latency_s=0.1, deadline_s=0.3, device_s=0.0,
                                            edge_s=None, fallback=None))
    view = _view(cands, 4e5, 0.3)
    assert policies.make("edgent").decide(view) == edgent.plan(cands, view.conditions)
    for name in baselines.BASELINES:
        assert policies.make(name).decide(view) == baselines.baselines(cands, view.conditions)[name]
    for name in ("mincut", "lyapunov"):  # what another policy prepared is refused, not silently searched
        with pytest.raises(PlannerError, match=f"{name} decides over what its own compile prepared"):
            policies.make(name).decide(view)


def test_unknown_policies_and_parameters_are_clear_errors() -> None:
    with pytest.raises(PlannerError, match=r"unknown planning policy 'nope'; known: .*edgent"):
        policies.make("nope")
    with pytest.raises(PlannerError, match="policy 'fixed'"):
        policies.make("fixed", exit=1, depth=3)


def test_infeasible_is_its_own_type_with_what_edgent_runs_anyway(cands: core.Candidates) -> None:
    view = _view(cands, 5e4, 0.001)
    assert isinstance(edgent.plan(cands, view.conditions), core.Infeasible)
    decided = policies.make("edgent").decide(view)
    assert isinstance(decided, core.Infeasible) and not decided.feasible
    assert decided.to_json()["exit"] is None
    # what runs anyway is the plan predicted to finish first of all (exits, cuts, encodings, the device alone),
    # judged at the real deadline: at 50 kbps exit 1 on the device; at 200 kbps exit 1 on the edge, encoded
    for bps, where, exit_index in ((5e4, "device", 1), (2e5, "edge", 1)):
        view = _view(cands, bps, 0.001)
        anyway = policies.make("edgent").decide(view).best_effort
        bound = candidates.costs_of(cands, view.conditions)[2]
        assert isinstance(anyway, core.Decision) and not anyway.feasible
        assert anyway.bound_s == pytest.approx(bound.min()) and (anyway.where, anyway.exit) == (where, exit_index)
        assert anyway.where == "device" or anyway.encoding != "float32"  # never float32 when encoded is faster
    # the baseline that only runs locally has no best effort: the engine's own fastest local way
    exit_only = policies.make("exit_only").decide(view)
    assert isinstance(exit_only, core.Infeasible) and exit_only.best_effort is None


def test_decisions_name_their_cut_by_tensors_and_carry_their_route(bundle: Bundle, cands: core.Candidates) -> None:
    cond = core.Conditions(bandwidth_bps=4e5, deadline_s=0.3)
    ex = bundle.exit(5)
    point = ex.cuts[3]
    split = candidates.fixed_plan(cands, cond, 5, point.tensors)
    assert split == candidates.fixed_plan(cands, cond, 5, point.index)  # a chain's layer count names the same cut
    assert split.where == core.Where.SPLIT and split.cut == point.index and split.cut_tensors == point.tensors
    assert split.route == (core.Step(core.DEVICE, core.Segment(5, frozenset({ex.input}), point.tensors)),
                           core.Step(core.EDGE, core.Segment(5, point.tensors, frozenset({ex.output}))))
    edge_only = candidates.fixed_plan(cands, cond, 5, frozenset({ex.input}))
    assert edge_only.where == "edge" and [s.host for s in edge_only.route] == [core.EDGE]
    device_only = candidates.fixed_plan(cands, cond, 5, frozenset())
    assert device_only.where == "device" and device_only.step(core.EDGE) is None
    assert split.to_json()["route"][1] == {"host": "edge", "inputs": sorted(point.tensors), "outputs": [ex.output]}
    with pytest.raises(PlannerError, match="no cut at"):
        candidates.fixed_plan(cands, cond, 5, frozenset({"nonsense"}))


def test_exits_are_numbered_from_one_everywhere(bundle: Bundle, cands: core.Candidates, pi3: LatencyModel) -> None:
    assert [e.index for e in bundle.exits] == [1, 2, 3, 4, 5]
    assert set(cands.exit.tolist()) == {1, 2, 3, 4, 5}
    assert cands.rank[0][0] == max(bundle.exits, key=lambda e: e.accuracy).index
    shuffled = (bundle.exits[1], bundle.exits[0], *bundle.exits[2:])
    with pytest.raises(PlannerError, match=r"numbered 1\.\.N"):
        candidates.compile_candidates(shuffled, pi3, pi3)
