"""Stages of any segment: a head, a pipeline's middle stage and a tail compose to the whole exit."""

import numpy as np
import pytest

from models import graph, synth
from models.bundle import Bundle
from models.errors import CutError, UnknownTensorError
from models.runtime import StageInputError, StageRunner
from planner.core import Segment


def test_head_middle_and_tail_compose_to_the_whole_exit(bundle: Bundle) -> None:
    runner = StageRunner(bundle)
    ex = bundle.exit(5)
    a, b = ex.cuts[2], ex.cuts[10]
    x = np.random.default_rng(1).standard_normal((1, 1, 28, 28)).astype(np.float32)
    whole = runner.stage(runner.whole(5)).run({"input": x})
    head = runner.stage(Segment(5, frozenset({ex.input}), a.tensors))
    middle = runner.stage(Segment(5, a.tensors, b.tensors))
    tail = runner.stage(Segment(5, b.tensors, frozenset({ex.output})))
    out = tail.run(middle.run(head.run({"input": x})))
    assert np.array_equal(out[ex.output], whole[ex.output])
    # each stage states what it takes, and a tail how many of its exit's layers ran before it
    assert set(middle.inputs) == set(a.tensors) and set(middle.outputs) == set(b.tensors)
    assert tail.skipped == b.index and head.skipped == 0
    with pytest.raises(StageInputError, match="expected float32"):
        middle.run({next(iter(a.tensors)): np.zeros((1, 3), np.float32)})
    assert runner.built == {runner.whole(5), Segment(5, frozenset({ex.input}), a.tensors),
                            Segment(5, a.tensors, b.tensors), Segment(5, b.tensors, frozenset({ex.output}))}


def test_bad_segments_are_clear_errors(bundle: Bundle) -> None:
    runner = StageRunner(bundle)
    ex = bundle.exit(2)
    with pytest.raises(UnknownTensorError, match="unknown segment tensor"):
        runner.stage(Segment(2, frozenset({"nonsense"}), frozenset({ex.output})))
    # a later cut cannot feed an earlier one
    with pytest.raises(CutError, match="do not compute"):
        runner.stage(Segment(2, ex.cuts[3].tensors, ex.cuts[1].tensors))


def test_a_multi_tensor_cut_is_a_segment_like_any_other() -> None:
    model = graph.prepare(synth.residual_net(blocks=2))
    cut = graph.find_cut(model, "stem_relu+b0_relu1")  # inside a residual block: two tensors cross
    head, tail = graph.split(model, cut)
    outputs = [o.name for o in model.graph.output]
    middle = graph.segment(model, cut.tensors, ["b0_out"])  # the rest of the block: a pipeline's middle stage
    assert [n.name for n in graph.segment(model, graph.graph_inputs(model), cut.tensors).graph.node] == \
        [n.name for n in head.graph.node]
    assert [n.name for n in graph.segment(model, cut.tensors, outputs).graph.node] == [n.name for n in tail.graph.node]
    assert {i.name for i in middle.graph.input} == set(cut.tensors)
    assert [n.name for n in middle.graph.node] == ["b0_conv2", "b0_add", "b0_out"]
    with pytest.raises(CutError, match="would also be needed"):  # one of the two alone does not suffice
        graph.segment(model, ["b0_relu1"], outputs)

