"""The corpus of standard topologies (the small ones; ``coinfer bench dag`` runs all): each exports, loads through
the normalisation, computes what the exported file computes, and splits exactly at the cuts the min-cut plans."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import pytest

from models import corpus, graph, synth
from models.bundle import describe
from models.ort import onnxruntime as ort
from planner import baselines, candidates, edgent, mincut, policies
from planner.core import Conditions, Decision, View, allow_encodings, exits_from_manifest
from planner.latency import LatencyModel

SMALL = [e.name for e in corpus.CORPUS if e.small]
BANDWIDTHS = (3e4, 3e5, 3e6, 3e7, 1e9)
SPEEDS = (1 / 16, 1.0, 16.0)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    cache = tmp_path_factory.mktemp("corpus")
    return {name: corpus.build(name, cache) for name in SMALL}


def _run(model: onnx.ModelProto | str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # what the file says, as written
    src = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed), strict=True))


def test_the_small_corpus_covers_every_export_style() -> None:
    assert {corpus.BY_NAME[n].style for n in SMALL} >= {corpus.Style.IR3, corpus.Style.UNFUSED_BN,
                                                        corpus.Style.INITIALIZERS}
    with pytest.raises(Exception, match="unknown corpus model"):
        corpus.build("alexnet-9000")


@pytest.mark.parametrize("name", SMALL)
def test_the_normalised_graph_computes_what_the_file_does(built: dict[str, Path], name: str) -> None:
    raw = onnx.load(str(built[name]))
    model = graph.load_model(built[name])
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"Constant", "Identity", "Dropout"}, ops  # folded / removed by onnxruntime
    if corpus.BY_NAME[name].style is corpus.Style.UNFUSED_BN:
        assert any(n.op_type == "BatchNormalization" for n in raw.graph.node)
        assert "BatchNormalization" not in ops  # every one follows a Conv here: fused into it
    assert len(model.graph.node) <= len(raw.graph.node)
    weights = sum(lay.features["param_bytes"] for lay in graph.layers(model))
    assert weights == pytest.approx(4 * corpus.parameter_count(raw), rel=0.01)  # BN folding adds a bias or two
    x = {"input": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    want, got = _run(str(built[name]), x)["logits"], _run(model, x)["logits"]
    assert np.max(np.abs(want - got)) < 1e-4


def test_weights_made_by_constant_nodes_become_parameters(built: dict[str, Path], tmp_path: Path) -> None:
    raw = onnx.load(str(built["squeezenet1_1"]))
    path = tmp_path / "constants.onnx"
    onnx.save(corpus.weights_as_constants(raw), str(path))
    plain = {lay.name: lay.features for lay in graph.layers(graph.load_model(built["squeezenet1_1"]))}
    folded = {lay.name: lay.features for lay in graph.layers(graph.load_model(path))}
    convs = [n for n in folded if n.endswith("Conv")]
    assert convs and all(folded[n]["param_bytes"] == plain[n]["param_bytes"] > 0 for n in convs)
    assert all(folded[n]["input_bytes"] == plain[n]["input_bytes"] for n in convs)


def test_onnxruntimes_own_output_of_an_ir3_model_loads(built: dict[str, Path], tmp_path: Path) -> None:
    """The optimised copy onnxruntime writes of an IR-3 file stays IR 3 with initializers it does not list as
    inputs; the checker alone refuses that ("in initializer but not in graph input")."""
    assert onnx.load(str(built["shufflenet_v2"])).ir_version == 3
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "ort.onnx")
    ort.InferenceSession(str(built["shufflenet_v2"]), opts, providers=["CPUExecutionProvider"])
    written = onnx.load(opts.optimized_model_filepath)
    assert written.ir_version == 3
    model = graph.load_model(tmp_path / "ort.onnx")
    assert graph.cuts(model) and model.ir_version >= graph.IR_INITIALIZERS_OPTIONAL


@pytest.mark.parametrize("name", SMALL)
def test_min_cut_is_exact_at_scale_and_its_cuts_split_exactly(built: dict[str, Path], name: str, pi3: LatencyModel,
                                                               desktop: LatencyModel) -> None:
    """Over a bandwidth x device speed x edge speed sweep: the prepared decision costs what a per-request min-cut
    costs, never more than the best single-tensor cut; head + tail of every multi-tensor cut chosen = the model."""
    model = graph.load_model(built[name])
    exits = allow_encodings(exits_from_manifest(describe(model)), ())
    policy = policies.make("mincut")
    prepared = policy.compile(exits, pi3, desktop)
    assert isinstance(prepared, mincut.MinCutPrepared)
    single = candidates.compile_candidates(exits, pi3, desktop)
    g = prepared.graphs[0]
    chosen = set()
    for bps, ds, es in itertools.product(BANDWIDTHS, SPEEDS, SPEEDS):
        cond = Conditions(bandwidth_bps=bps, deadline_s=1e6, device_speed=ds, edge_speed=es)
        ours, theirs = policy.decide(View(prepared=prepared, conditions=cond)), edgent.plan(single, cond)
        assert isinstance(ours, Decision) and isinstance(theirs, Decision)
        assert ours.predicted_s <= theirs.predicted_s * (1 + 1e-9)
        best = mincut.min_cut(g, es / ds, 8.0 / bps / ds)
        forced = baselines.Fixed(1, best.crossing)  # the per-request min-cut's partition, costed like any plan
        theirs = forced.decide(View(prepared=forced.compile(exits, pi3, desktop), conditions=cond))
        assert isinstance(theirs, Decision) and ours.predicted_s <= theirs.predicted_s * (1 + 1e-9)
        if len(ours.cut_tensors) > 1:
            chosen.add(ours.cut_tensors)
    x = {"input": np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    whole = _run(model, x)["logits"]
    for tensors in chosen:
        head, tail = graph.split(model, tensors)
        assert np.max(np.abs(_run(tail, _run(head, x))["logits"] - whole)) < 1e-4


def test_a_cut_whose_head_is_not_a_prefix_is_costed_by_its_head(pi3: LatencyModel, desktop: LatencyModel) -> None:
    """The shape that made min-cut plans look slower than single cuts: weights made by Constant nodes at the top
    of the file (not normalised) sit in the first ``index`` layers but belong to the rest; a listed cut is costed
    by the layers it depends on, so the best single cut is never cheaper than the min-cut's plan."""
    model = graph.prepare(corpus.weights_as_constants(synth.residual_net(blocks=3, channels=8, side=8)))
    exits = allow_encodings(exits_from_manifest(describe(model)), ())
    ex = exits[0]
    names = [lay.name for lay in ex.layers]
    moved = [c for c in ex.cuts if c.head is not None]
    assert moved and all(c.head != frozenset(names[:c.index]) and c.head == ex.ancestors(c.tensors) for c in moved)
    g = mincut.from_exit(ex, pi3, desktop)
    single = candidates.compile_candidates(exits, pi3, desktop)
    policy = policies.make("mincut")
    prepared = policy.compile(exits, pi3, desktop)
    index = {n: i for i, n in enumerate(g.names)}
    for bps, ds in itertools.product(BANDWIDTHS, SPEEDS):
        cond = Conditions(bandwidth_bps=bps, deadline_s=1e6, device_speed=ds)
        ours, theirs = policy.decide(View(prepared=prepared, conditions=cond)), edgent.plan(single, cond)
        assert isinstance(ours, Decision) and isinstance(theirs, Decision)
        assert ours.predicted_s <= theirs.predicted_s * (1 + 1e-9)
        if theirs.cut_tensors and theirs.cut_tensors != {ex.input} and theirs.modelled.head_s:
            head = frozenset(index[n] for n in ex.ancestors(frozenset(theirs.cut_tensors)))
            part = mincut.partition(g, head)
            # its wall times: the head's layers (and a stage overhead, if the model has one), the rest's
            assert theirs.modelled.head_s >= part.device_s * (1 - 1e-9)
            assert theirs.modelled.tail_s >= part.edge_s * (1 - 1e-9)
