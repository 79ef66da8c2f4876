"""A policy is one class and one registry line: deviced picks it by name from its config and calls only the seam."""

from pathlib import Path

import numpy as np
import pytest

from deviced.config import DevicedConfig, load
from deviced.service import Client
from models.data import load_fashion_mnist, preprocess
from planner import core, edgent, policies
from planner.errors import PlannerError
from protocol.config import ConfigError
from tests.daemons.conftest import Broker, EdgeProcess


class EdgeAlways(core.Stateless):
    """The trivial policy of this test: the top exit, wholly on the edge; it counts what it was told."""

    def __init__(self) -> None:
        self.seen: list[core.Observation] = []

    def decide(self, view: core.View) -> core.Decision | core.Infeasible:
        top = view.candidates.exits[-1]
        return edgent.fixed_plan(view.candidates, view.conditions, top.index, frozenset({top.input}))

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
    assert isinstance(policy, edgent.Fixed) and (policy.exit, policy.cut) == (5, 0)
    assert isinstance(DevicedConfig().make_policy(), edgent.Edgent)  # the default
    conf.write_text('[deviced]\ndevice_id = "pi-t"\n\n[planner]\npolicy = "nope"\n')
    with pytest.raises(ConfigError, match="unknown planning policy 'nope'"):
        load(conf)
    with pytest.raises(PlannerError, match="unknown baseline"):
        edgent.Baseline("nope")
