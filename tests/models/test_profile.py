import numpy as np

from models import synth
from models.profile import FORMAT, profile_models


def test_profile_times_every_layer() -> None:
    models = [("mlp", synth.mlp()), ("chain", synth.random_chain(np.random.default_rng(0), 0))]
    doc = profile_models(models, threads=1, warmup=2, runs=5)
    assert doc["format"] == FORMAT and doc["threads"] == 1 and doc["host"]["cpus"] >= 1
    for entry, (_, model) in zip(doc["models"], models, strict=True):
        assert len(entry["layers"]) == len(model.graph.node)
        assert all(lay["latency_s"] > 0 for lay in entry["layers"])
        assert entry["load_s"] > 0 and entry["run_s"] > 0 and entry["model_bytes"] > 0
