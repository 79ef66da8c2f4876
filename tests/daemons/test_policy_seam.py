"""A policy is one class and one registry line: deviced picks it by name from its config and calls only the seam."""

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from deviced.config import DevicedConfig, load
from deviced.service import Client
from models.data import load_fashion_mnist, preprocess
from planner import baselines, candidates, core, edgent, policies
from planner.errors import PlannerError
from planner.latency import LatencyModel
from protocol.config import ConfigError
from tests.daemons.conftest import Broker, EdgeProcess


class EdgeAlways(candidates.Stateless):
    """The trivial policy of this test: the top exit, wholly on the edge; it counts what it was told."""

    def __init__(self) -> None:
        self.seen: list[core.Observation] = []

    def decide(self, view: core.View) -> core.Decision | core.Infeasible:
        top = view.candidates.exits[-1]
        return candidates.fixed_plan(view.candidates, view.conditions, top.index, frozenset({top.input}))

    def observe(self, outcome: core.Observation) -> None:
        self.seen.append(outcome)


async def test_a_new_policy_is_one_class_and_one_registry_line(broker: Broker, prefix: str, edge: EdgeProcess,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(policies.POLICIES, "edge_always", EdgeAlways)  # the registry line
    x = preprocess(load_fashion_mnist("test")[0][:5])
    cfg = DevicedConfig(device_id="pi-seam", topic_prefix=prefix, broker=broker.config, probe_interval_s=0,
                        planner={"policy": "edge_always"})
    async with Client(cfg) as client:
        assert await client.wait_for_edge(5)
        outcomes = [await client.infer(xi, deadline=2.0) for xi in x]
    policy = client.device.policy
    assert isinstance(policy, EdgeAlways)
    assert [o.where for o in outcomes] == ["edge"] * 5 and all(o.exit == 5 for o in outcomes)
    assert [o.decision.cut_tensors for o in policy.seen] == [frozenset({"input"})] * 5
    assert all(o.edge_s is not None and o.latency_s > 0 for o in policy.seen)
    assert np.array_equal([o.latency_s for o in outcomes], [o.latency_s for o in policy.seen])


def test_the_policy_comes_from_the_planner_table(tmp_path: Path) -> None:
    conf = tmp_path / "deviced.toml"
    conf.write_text('[deviced]\ndevice_id = "pi-t"\n\n[planner]\npolicy = "fixed"\nexit = 5\ncut = 0\n')
    policy = load(conf).make_policy()
    assert isinstance(policy, baselines.Fixed) and (policy.exit, policy.cut) == (5, 0)
    assert isinstance(DevicedConfig().make_policy(), edgent.Edgent)  # the default
    conf.write_text('[deviced]\ndevice_id = "pi-t"\n\n[planner]\npolicy = "nope"\n')
    with pytest.raises(ConfigError, match="unknown planning policy 'nope'"):
        load(conf)
    with pytest.raises(PlannerError, match="unknown baseline"):
        baselines.Baseline("nope")


CROSSING = frozenset({"stem_relu", "b0_relu1"})  # inside the first residual block: the skip and the branch


class InsideTheBlock(candidates.Stateless):
    """Always the multi-tensor cut inside the first residual block (a DAG cut no chain planner can make)."""

    def compile(self, exits: Sequence[core.ExitInfo], device: LatencyModel, edge: LatencyModel) -> core.Prepared:
        ex = exits[0]
        cut = ex.cut_through(CROSSING)  # found from the graph: its head is what the two tensors depend on
        assert cut.head == {"stem", "stem_relu", "b0_conv1", "b0_relu1"} and cut.bytes == 2 * 16 * 16 * 16 * 4
        return super().compile([replace(ex, cuts=(*ex.cuts, cut))], device, edge)

    def decide(self, view: core.View) -> core.Decision | core.Infeasible:
        return candidates.fixed_plan(view.candidates, view.conditions, 1, CROSSING)


async def test_a_multi_tensor_cut_runs_end_to_end(broker: Broker, prefix: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A DAG bundle through deviced, the broker and edged: the head on the device, two tensors on the wire,
    edged admitting the tail by the tensors it carries; the answer is the whole model's."""
    from models import graph, synth
    from models.bundle import load_bundle, write_bundle
    from models.runtime import StageRunner
    from tests.daemons.conftest import serve_and_infer, whole_exit

    rng = np.random.default_rng(0)
    images = rng.standard_normal((20, 3, 16, 16)).astype(np.float32)
    path = write_bundle(synth.residual_net(blocks=2), tmp_path / "residual", name="residual-test",
                        test_images=images, test_labels=rng.integers(0, 10, 20), training={"weights": "random"})
    bundle = load_bundle(path)
    monkeypatch.setitem(policies.POLICIES, "inside_the_block", InsideTheBlock)
    outcomes = await serve_and_infer(broker, prefix, path, images[:3], deadline=5.0, device_id="pi-dag",
                                     planner={"policy": "inside_the_block"})
    runner = StageRunner(bundle)
    whole = [whole_exit(runner, 1, x) for x in images[:3]]
    for o, expected in zip(outcomes, whole, strict=True):
        assert o.where == "split" and o.fallback is None and o.plan.cut_tensors == CROSSING
        assert o.plan.route[0].segment.outputs == CROSSING  # the head ends where the two tensors cross
        np.testing.assert_allclose(o.logits, expected, rtol=1e-5, atol=1e-5)
    assert graph.find_cut(bundle.exit_model(1), "+".join(sorted(CROSSING))).index == 4

