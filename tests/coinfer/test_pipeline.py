"""Pipelines: the fleet file and `coinfer pipeline plan`, and the simulation that checks the planner's predictions."""

import json
from pathlib import Path

import pytest

from coinfer.bench import pipeline
from coinfer.cli import main
from coinfer.lab import pipesim
from models.bundle import BUNDLES_DIR
from models.loaders import REFERENCE_MODELS, load_fleet
from planner import pipeline as planner_pipeline
from planner.core import LayerInfo
from planner.fleet import Chain, Fleet, PipelineError, Worker
from planner.latency import LatencyModel, TypeModel

FLEET = pipeline.EXAMPLE_FLEET


def test_the_example_fleet_plans_through_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pipeline", "plan", "--workers", str(FLEET), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["method"] == "exact" and doc["source"] == "cam" and doc["frames_per_s"] > 0
    assert doc["stages"][0]["first"] == 0 and doc["stages"][-1]["stop"] > doc["stages"][0]["first"]
    stage = doc["stages"][0]
    assert stage["period_s"] >= max(stage["compute_s"]) / len(stage["workers"]) - 1e-12
    assert main(["pipeline", "plan", str(BUNDLES_DIR / "fmnist-branchy-resnet"), "--workers", str(FLEET),
                 "--method", "greedy", "--latency-bound", "2s"]) == 0
    text = capsys.readouterr().out
    assert "fmnist-branchy-resnet exit 3:" in text and "frames/s" in text and "bottleneck" in text


def test_bad_fleets_and_bounds_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.workers.toml"
    bad.write_text(FLEET.read_text().replace('uplink = "20Mbps"', 'uplink = "-20Mbps"', 1))
    assert main(["pipeline", "plan", "--workers", str(bad)]) == 2
    assert "worker cam: bad bandwidth '-20Mbps'" in capsys.readouterr().err
    bad.write_text("source = [")
    assert main(["pipeline", "plan", "--workers", str(bad)]) == 2
    assert "cannot read fleet" in capsys.readouterr().err
    assert main(["pipeline", "plan", "--workers", str(FLEET), "--latency-bound", "1ms"]) == 2
    assert "no plan meets the latency bound 1.0 ms" in capsys.readouterr().err
    assert main(["pipeline", "plan", "--workers", str(FLEET), "--exit", "9"]) == 2
    assert "has exits 1..5, not 9" in capsys.readouterr().err


def test_a_fleet_file_names_latency_models_relative_to_itself(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mine.json").write_text(REFERENCE_MODELS["pi3"].read_text())
    fleet_file = tmp_path / "lab.workers.toml"
    fleet_file.write_text('[[workers]]\nname = "cam"\nlatency_model = "models/mine.json"\nmemory = "1GB"\n'
                          'uplink = "10Mbps"\ndownlink = "10Mbps"\n')
    fleet = load_fleet(fleet_file)
    assert fleet.source == "cam" and fleet.workers[0].latency.name
    fleet_file.write_text(fleet_file.read_text().replace("mine.json", "missing.json"))
    with pytest.raises(PipelineError, match=r"unknown latency model 'models/missing\.json'"):
        load_fleet(fleet_file)


@pytest.mark.parametrize("names", [("cam", "pi3b-2", "pi3bplus", "pi4-a", "edge"),  # replicas, splits, the edge
                                   ("cam", "pi3b-2", "pi3bplus", "zero2w")])
def test_the_simulation_matches_the_planned_throughput(names: tuple[str, ...]) -> None:
    fleet = load_fleet(FLEET).subset(list(names))
    chain = pipeline.load_chain(BUNDLES_DIR / "fmnist-branchy-alexnet")
    p = planner_pipeline.plan(chain, fleet)
    sim = pipesim.simulate(p, frames=400, cv=0.05, seed=1)
    assert sim.frames == 400  # every frame came back (the simulation raises otherwise)
    assert sim.frames_per_s == pytest.approx(p.frames_per_s, rel=0.05)
    senders = max(len(s.workers) for s in p.stages)
    assert sim.max_inbox <= planner_pipeline.QUEUE_SLOTS * senders  # credits bound every queue
    paced = pipesim.simulate(p, frames=200, cv=0.05, seed=2, rate=0.5 * p.frames_per_s)
    assert paced.latency_p50_s == pytest.approx(p.latency_s, rel=0.1)


def test_the_simulation_joins_split_slices_and_runs_embedded_plans() -> None:
    # a 300 MB fully connected layer that no 200 MB worker holds alone: the plan must split it
    model = LatencyModel(name="flops", unit="ms", types={"other": TypeModel(variables=("flops",), coef=(1.0,),
                                                                            intercept=0.0)})
    blocks = tuple(LayerInfo(name=f"b{i}", kind=k, features={"flops": f}) for i, (k, f) in
                   enumerate((("conv", 10.0), ("fc", 50.0), ("fc", 5.0))))
    chain = Chain(name="t", blocks=blocks, boundary_bytes=(1e3, 1e4, 1e3, 40.0),
                  boundary_tensors=tuple(frozenset({f"t{i}"}) for i in range(4)), weight_bytes=(1e5, 3e8, 1e5),
                  work_bytes=(1.1e4, 1.1e4, 1.04e3))
    workers = tuple(Worker(name=n, latency=model, memory_bytes=2e8, uplink_bps=1e7, downlink_bps=1e7, speed=s)
                    for n, s in (("cam", 1.0), ("a", 1.0), ("b", 2.0), ("c", 1.0)))
    split = planner_pipeline.plan(chain, Fleet(workers=workers, source="cam"))
    assert [s.mode for s in split.stages] == ["single", "split", "single"]
    speeds = [{w.name: w.speed for w in workers}[n] for n in split.stages[1].workers]
    assert split.stages[1].fractions == pytest.approx(tuple(v / sum(speeds) for v in speeds))  # shares by speed
    fleet = load_fleet(FLEET)
    one = Fleet(workers=(fleet.workers[3],), source=fleet.workers[3].name)
    embedded = planner_pipeline.plan(pipeline.load_chain(BUNDLES_DIR / "fmnist-branchy-alexnet"), one,
                                     method="embedded")
    assert sum(len(s.cores) for s in embedded.stages) <= fleet.workers[3].cores
    for p in (split, embedded):
        sim = pipesim.simulate(p, frames=300, cv=0.0)
        assert sim.frames_per_s == pytest.approx(p.frames_per_s, rel=0.05)
        assert sim.latency_p50_s >= p.latency_s * 0.99  # queueing only adds
