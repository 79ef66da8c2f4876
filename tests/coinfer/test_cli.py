import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from coinfer.cli import main
from models import synth
from models.bundle import DEFAULT_BUNDLE


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> object:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_layers_json_lists_cuts_that_split_accepts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_path = tmp_path / "res.onnx"
    onnx.save(synth.residual_net(), str(model_path))
    doc = _json(capsys, ["layers", str(model_path), "--json"])
    assert isinstance(doc, dict) and doc["cuts"] and len(doc["layers"]) == 20
    name = doc["cuts"][2]["name"]
    head, tail = tmp_path / "h.onnx", tmp_path / "t.onnx"
    assert main(["split", str(model_path), "--at", name, "--head", str(head), "--tail", str(tail)]) == 0
    assert [o.name for o in onnx.load(str(head)).graph.output] == [name]
    assert [i.name for i in onnx.load(str(tail)).graph.input] == [name]


def test_layers_of_one_bundle_exit(capsys: pytest.CaptureFixture[str]) -> None:
    doc = _json(capsys, ["layers", str(DEFAULT_BUNDLE), "--output", "exit2", "--json"])
    assert isinstance(doc, dict)
    assert len(doc["cuts"]) == len(doc["layers"]) - 1


def test_split_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_path = tmp_path / "m.onnx"
    onnx.save(synth.mlp(), str(model_path))
    assert main(["split", str(model_path), "--at", "zzz", "--head", "h", "--tail", "t"]) == 2
    assert "unknown cut 'zzz'" in capsys.readouterr().err
    (tmp_path / "corrupt.onnx").write_bytes(b"\x00\x01\x02")
    assert main(["layers", str(tmp_path / "corrupt.onnx")]) == 2
    assert "not a valid ONNX model" in capsys.readouterr().err


def test_plan_json_fields(capsys: pytest.CaptureFixture[str]) -> None:
    doc = _json(capsys, ["plan", "--bandwidth", "500kbps", "--deadline", "1s", "--json"])
    assert isinstance(doc, dict)
    for key in ("feasible", "exit", "cut", "predicted_s", "device_s", "transfer_s", "edge_s", "accuracy"):
        assert key in doc
    assert doc["feasible"] is True and 1 <= doc["exit"] <= 5
    assert set(doc["baselines"]) == {"device_only", "edge_only", "partition_only", "exit_only"}
    assert doc["predicted_s"] == pytest.approx(doc["device_s"] + doc["transfer_s"] + doc["edge_s"])


def test_plan_infeasible_and_bad_units(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--bandwidth", "50kbps", "--deadline", "1ms", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["feasible"] is False and doc["exit"] is None
    assert main(["plan", "--bandwidth", "500kb", "--deadline", "1s"]) == 2
    assert "bad bandwidth '500kb'" in capsys.readouterr().err


def test_profile_then_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile, model = tmp_path / "p.json", tmp_path / "m.json"
    assert main(["profile", "--out", str(profile), "--sweep", "3", "--runs", "5", "--warmup", "2"]) == 0
    assert main(["fit", str(profile), "--out", str(model), "--name", "test-host"]) == 0
    doc = json.loads(model.read_text())
    assert doc["name"] == "test-host" and {"conv", "relu", "pool", "fc", "load"} <= set(doc["types"])
    assert "R2" in capsys.readouterr().out
    # the fitted model plans the bundle
    doc = _json(capsys, ["plan", "--device-model", str(model), "--edge-model", str(model), "--bandwidth", "10Mbps",
                         "--deadline", "1s", "--json"])
    assert isinstance(doc, dict) and doc["feasible"] is True


def test_bench_planner_writes_distribution(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    assert main(["bench", "planner", "--out", str(out), "--requests", "300"]) == 0
    doc = json.loads(out.read_text())
    for key in ("bundle", "synthetic_500"):
        assert 0 < doc[key]["p50_s"] <= doc[key]["p99_s"]
    assert doc["synthetic_500"]["candidates"] > doc["bundle"]["candidates"]
    assert np.isfinite(doc["bundle"]["mean_s"])


def test_bench_transport_rows() -> None:
    from coinfer.bench import transport

    doc = transport.transport_bench(sizes=(4096, 65536), repeats=3)
    assert [r["bytes"] for r in doc["rows"]] == [4096, 65536]
    for row in doc["rows"]:
        assert row["mqtt_s"] > 0 and row["tcp_s"] > 0 and row["ratio"] == pytest.approx(row["mqtt_s"] / row["tcp_s"])
        assert set(row["parts_s"]) == {"encode_s", "publish_s", "arrive_s", "decode_s"}
    wire = {(e["bytes"], e["encoding"]): e["wire_bytes"] for e in doc["encodings"]}
    for size in (4096, 65536):  # each encoding crosses fewer bytes than float32, zstd fewer than its precision
        assert wire[(size, "int8")] < wire[(size, "float16")] < wire[(size, "float32")]
        assert wire[(size, "int8+zstd")] < wire[(size, "int8")]


def test_plan_any_onnx_model_with_the_min_cut(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "inception.onnx"
    onnx.save(synth.inception_net(), str(model))
    for bw in ("100kbps", "2Mbps", "100Mbps"):
        doc = _json(capsys, ["plan", str(model), "--bandwidth", bw, "--policy", "mincut", "--json"])
        assert isinstance(doc, dict) and doc["policy"] == "mincut" and doc["feasible"] is True
        assert isinstance(doc["cut_tensors"], list) and doc["n_candidates"] >= 2
        # never slower than the best cut where one tensor crosses (what the chain planner would choose)
        assert doc["predicted_s"] <= doc["best_single_cut"]["predicted_s"] + 1e-12
        assert set(doc["baselines"]) == {"device_only", "edge_only", "partition_only", "exit_only"}


def test_bench_dag_the_min_cut_never_loses_to_a_single_cut(tmp_path: Path) -> None:
    from coinfer.bench import dag

    doc = dag.run(tmp_path, requests=50, cache=tmp_path / "corpus", names=["squeezenet1_1"], fit_nets=3, runs=2,
                  log=lambda _: None)
    assert (tmp_path / "dag.json").exists() and (tmp_path / "dag.png").stat().st_size > 0
    assert (tmp_path / "host-latency.json").exists()
    assert {"squeezenet1_1", "residual_net", "inception_net", "reduction_net"} <= set(doc["models"])
    for entry in doc["models"].values():
        assert entry["exact"]["max_abs_diff"] <= 1e-5  # every multi-tensor cut chosen computes the whole model
        for device in entry["devices"].values():
            assert all(r["mincut_s"] <= r["single_cut_s"] * (1 + 1e-12) for r in device["rows"])
            assert device["exactness"]["slower_than_single_cut"] == device["exactness"]["slower_than_min_cut"] == 0
    squeeze = doc["models"]["squeezenet1_1"]
    assert squeeze["prediction"]["measured_run_s"] > 0 and squeeze["raw_nodes"] >= squeeze["nodes"]
    assert set(squeeze["prediction"]) >= {"before", "after", "by_kind"}
    assert doc["loop_stall"]["model"] == "squeezenet1_1" and doc["loop_stall"]["ticks"] >= 1
    # the reduction modules' few-channel branches: crossing all three beats any single tensor at a slow uplink
    gains = [r["gain"] for r in doc["models"]["reduction_net"]["devices"]["pi3"]["rows"]]
    assert max(gains) > 1.05
