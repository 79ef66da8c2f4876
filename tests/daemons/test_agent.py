"""The bench's device agent, driven over its JSON-lines pipe against a real broker and edged."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from coinfer.lab.client import Agent
from models.loaders import PI3_MODEL
from tests.daemons.conftest import REPO, Broker, EdgeProcess


async def test_agent_runs_methods_fixed_plans_stages_and_streams(broker: Broker, prefix: str,
                                                                 edge: EdgeProcess) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "coinfer.lab.agent", "--broker-port", str(broker.port),
                             "--topic-prefix", prefix, "--images", "20", "--device-model",
                             str(PI3_MODEL), "--emulate-uplink", "2Mbps"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    agent = Agent(proc)
    try:
        assert (await asyncio.to_thread(agent.read))["ready"]

        def ask(**cmd: object) -> dict[str, object]:
            return agent.ask(**cmd)

        probe = await asyncio.to_thread(ask, op="probe", repeats=2)
        assert 2e5 < float(probe["bandwidth_bps"]) < 2e7  # type: ignore[arg-type]
        edge_only = (await asyncio.to_thread(ask, op="run", method="fixed", exit=5, cut=0, deadline_s=1.0,
                                             first=0, count=3))["records"]
        assert [r["where"] for r in edge_only] == ["edge"] * 3  # type: ignore[index]
        by_tensors = (await asyncio.to_thread(ask, op="run", method="fixed", exit=5, cut=["input"], encoding="int8",
                                              deadline_s=1.0, first=0, count=1))["records"]  # a cut by its tensors
        assert [(r["where"], r["encoding"]) for r in by_tensors] == [("edge", "int8")]  # type: ignore[index]
        for method in ("coinfer", "coinfer_point", "device_only", "exit_only"):
            recs = (await asyncio.to_thread(ask, op="run", method=method, deadline_s=1.0, first=3,
                                            count=2))["records"]
            assert len(recs) == 2 and all(r["method"] == method for r in recs)  # type: ignore[index]
            if method == "coinfer_point":  # planned on the prediction alone
                assert all(r["bound_s"] == r["predicted_s"] for r in recs)  # type: ignore[index]
        stages = (await asyncio.to_thread(ask, op="stages", repeats=2))["stages"]
        assert len(stages) >= 10 and all(s["median_s"] > 0 for s in stages)  # type: ignore[index]
        stream = (await asyncio.to_thread(ask, op="stream", mode="fixed", deadline_s=1.0, duration_s=1.0,
                                          emulate_trace=True))["records"]
        assert len(stream) >= 3 and len({(r["plan_exit"], r["plan_cut"]) for r in stream}) == 1  # type: ignore[index]
        with pytest.raises(RuntimeError, match="unknown op"):  # answered with an error; the agent goes on
            await asyncio.to_thread(ask, op="nonsense")
        assert (await asyncio.to_thread(ask, op="uplink", bps=1e6)) == {}
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        await asyncio.to_thread(proc.wait, 20)

