"""`coinfer bench load` end to end, shortened: every request is accounted for, under faults too."""

import json
from pathlib import Path

from coinfer.bench import load


def test_bench_load_accounts_for_every_request(tmp_path: Path) -> None:
    settings = load.LoadSettings(devices=4, rates=(30,), step_s=1.5, soak_s=3.0, fault_devices=2, fault_rate=20,
                                 fault_s=6.0, faults=("edged_kill", "broker_freeze"))
    doc = load.run(tmp_path / "load.json", settings, log=lambda _: None)
    assert json.loads((tmp_path / "load.json").read_text())["settings"]["devices"] == 4
    for n in ("edges_1", "edges_2"):
        [step] = doc["throughput"][n]["steps"]
        assert step["sent"] > 20
        assert step["sent"] == step["ok"] + sum(step["errors"].values()) + step["lost"]
        assert step["ok"] > 0
    assert {"deviced", "edge-1", "edge-2"} <= set(doc["soak"]["rss_mb"][-1])
    assert doc["soak"]["app"]["sent"] == doc["soak"]["app"]["results"] + doc["soak"]["app"].get("errors", 0) \
        + doc["soak"]["app"].get("lost", 0)
    for row in doc["faults"]:
        assert row["sent"] > 50 and row["lost"] == 0, row
        assert row["sent"] == row["results"] + row["errors"], row
