"""Encoded cut tensors as planner candidates: only where measured, costed, chosen accuracy first."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.bundle import Bundle
from planner import baselines, candidates, core, edgent, encodings, policies
from planner.errors import PlannerError
from planner.latency import LatencyModel
from protocol.tensors import ENCODINGS, PLAIN
from tests.planner.test_edgent import _linear, conditions, models


def _encode(exits: list[core.ExitInfo] | tuple[core.ExitInfo, ...], drop: float = 0.01,
            names: tuple[str, ...] = ("float16", "int8")) -> tuple[core.ExitInfo, ...]:
    """Every cut and input measured: float16 loses nothing, int8 ``drop``; bytes 1/2 and 1/4."""
    def enc(nbytes: float, acc: float) -> tuple[core.Encoded, ...]:
        known = {"float16": (acc, nbytes / 2), "int8": (max(acc - drop, 0.0), nbytes / 4),
                 "int8+zstd": (max(acc - drop, 0.0), nbytes / 8)}
        return tuple(core.Encoded(name=n, accuracy=known[n][0], bytes=known[n][1]) for n in names)

    return tuple(replace(ex, input_encodings=enc(ex.input_bytes, ex.accuracy),
                         cuts=tuple(replace(c, encodings=enc(c.bytes, ex.accuracy)) for c in ex.cuts))
                 for ex in exits)


def test_the_planner_knows_exactly_the_wire_encodings() -> None:
    assert set(encodings.PASSES) == set(ENCODINGS) - {PLAIN}


def test_encoded_candidates_exist_only_where_measured(bundle: Bundle, pi3: LatencyModel,
                                                      desktop: LatencyModel) -> None:
    plain = candidates.compile_candidates(core.allow_encodings(bundle.exits, ()), pi3, desktop)
    assert plain.plain.all() and set(plain.encoding) == {PLAIN}
    exits = list(_encode(bundle.exits))
    exits[0] = replace(exits[0], cuts=tuple(replace(c, encodings=()) for c in exits[0].cuts), input_encodings=())
    c = candidates.compile_candidates(exits, pi3, desktop)
    assert not (~c.plain & (c.exit == 1)).any()  # exit 1 measured nothing
    assert not (~c.plain & ~c.uses_edge).any()  # nothing crosses on the device alone: nothing to encode
    for i in np.flatnonzero(~c.plain):
        p = c.index(int(c.exit[i]), c.tensors[i])
        assert c.encoding[i] in ("float16", "int8")
        assert c.up_bytes[i] == pytest.approx(c.up_bytes[p] / (2 if c.encoding[i] == "float16" else 4))
        # encoding costs the device and decoding the edge, never less than the plain plan's compute
        assert c.device_s[i] > c.device_s[p] and c.edge_s[i] > c.edge_s[p]
        enc_s, dec_s = encodings.cost_s(c.encoding[i], c.up_bytes[p], pi3, desktop)
        assert c.device_s[i] - c.device_s[p] == pytest.approx(enc_s, rel=1e-6, abs=1e-9)
        assert c.edge_s[i] - c.edge_s[p] == pytest.approx(dec_s, rel=1e-6, abs=1e-9)


def test_an_encoding_never_claims_more_accuracy_than_its_exit(pi3: LatencyModel, desktop: LatencyModel,
                                                              bundle: Bundle) -> None:
    exits = _encode(bundle.exits, drop=-0.05)  # measured noise above the exit's own accuracy
    c = candidates.compile_candidates(exits, pi3, desktop)
    for ex in exits:
        assert c.accuracy[c.exit == ex.index].max() == pytest.approx(ex.accuracy)


def test_low_bandwidth_takes_an_encoding_and_high_bandwidth_float32(bundle: Bundle, pi3: LatencyModel,
                                                                   desktop: LatencyModel) -> None:
    c = candidates.compile_candidates(_encode(bundle.exits), pi3, desktop)
    fast = edgent.plan(c, core.Conditions(bandwidth_bps=1e9, deadline_s=1.0))
    assert isinstance(fast, core.Decision) and fast.encoding in (PLAIN, "float16")  # float16: no accuracy lost
    tight = core.Conditions(bandwidth_bps=50e3, deadline_s=0.15)
    view = core.View(prepared=core.Prepared(candidates=c), conditions=tight)
    plain_only, chosen = policies.make("edgent", encodings=False).decide(view), policies.make("edgent").decide(view)
    assert isinstance(chosen, core.Decision) and chosen.encoding != PLAIN and chosen.transfer_s > 0
    assert not isinstance(plain_only, core.Decision) or (plain_only.encoding == PLAIN and
                                                         chosen.accuracy >= plain_only.accuracy)
    assert chosen.to_json()["encoding"] == chosen.encoding


@settings(max_examples=300, deadline=None)
@given(models(), conditions, st.floats(0.0, 0.05), st.sampled_from([("float16",), ("int8",), ("float16", "int8"),
                                                                     ("float16", "int8", "int8+zstd")]))
def test_encodings_never_make_a_plan_worse(exits: list[core.ExitInfo], cond: core.Conditions, drop: float,
                                           names: tuple[str, ...]) -> None:
    c = candidates.compile_candidates(_encode(exits, drop, names), _linear(1.0), _linear(0.1))
    view = core.View(prepared=core.Prepared(candidates=c), conditions=cond)
    with_enc = policies.make("edgent").decide(view)
    without = policies.make("edgent", encodings=False).decide(view)
    plain = edgent.plan(candidates.compile_candidates(exits, _linear(1.0), _linear(0.1)), cond)
    assert isinstance(without, core.Decision) == isinstance(plain, core.Decision)
    if isinstance(plain, core.Decision):  # without encodings: exactly the plain planner's choice
        assert isinstance(without, core.Decision) and without.encoding == PLAIN
        assert (without.exit, without.cut_tensors, without.predicted_s) == (plain.exit, plain.cut_tensors,
                                                                              pytest.approx(plain.predicted_s))
        # with them: at least as accurate, and no slower at the same accuracy
        assert isinstance(with_enc, core.Decision) and with_enc.accuracy >= plain.accuracy
        if with_enc.accuracy == plain.accuracy:
            assert with_enc.predicted_s <= plain.predicted_s + 1e-12
    if isinstance(with_enc, core.Decision):
        total, _ = candidates.latencies(c, cond)
        ok = candidates.bounds(c, cond, total) <= cond.deadline_s
        assert with_enc.feasible and not (ok & (c.accuracy > with_enc.accuracy)).any()


def test_baselines_and_fixed_plans_send_float32(bundle: Bundle, pi3: LatencyModel, desktop: LatencyModel) -> None:
    c = candidates.compile_candidates(_encode(bundle.exits), pi3, desktop)
    cond = core.Conditions(bandwidth_bps=50e3, deadline_s=0.15)
    for name, p in baselines.baselines(c, cond).items():
        assert not isinstance(p, core.Decision) or p.encoding == PLAIN, name
    assert candidates.fixed_plan(c, cond, 5, 0).encoding == PLAIN
    view = core.View(prepared=core.Prepared(candidates=c), conditions=cond)
    encoded = policies.make("fixed", exit=5, cut=0, encoding="int8").decide(view)
    assert isinstance(encoded, core.Decision) and encoded.encoding == "int8" and encoded.cut_tensors == {"input"}
    with pytest.raises(PlannerError, match="no cut"):
        candidates.fixed_plan(c, cond, 5, 0, "int4")


def test_the_manifest_carries_measured_encodings(bundle: Bundle) -> None:
    manifest = dict(bundle.manifest)
    ex = dict(manifest["exits"][0])
    ex["input_encodings"] = {"int8": {"accuracy": 0.85, "bytes": 784}}
    ex["cuts"] = [{**ex["cuts"][0], "encodings": {"float16": {"accuracy": 0.86, "bytes": 50176}}}, *ex["cuts"][1:]]
    manifest["exits"] = [ex, *manifest["exits"][1:]]
    exits = core.exits_from_manifest(manifest)
    assert exits[0].input_encodings == (core.Encoded(name="int8", accuracy=0.85, bytes=784),)
    assert exits[0].cuts[0].encodings == (core.Encoded(name="float16", accuracy=0.86, bytes=50176),)
    assert core.allow_encodings(exits, ["float16"])[0].input_encodings == ()
    ex["input_encodings"] = {"int8": {"accuracy": 1.5, "bytes": 784}}
    with pytest.raises(PlannerError, match=r"accuracy in 0\.\.1"):
        core.exits_from_manifest(manifest)
    ex["input_encodings"] = {"int4": {"accuracy": 0.5, "bytes": 784}}
    c = core.exits_from_manifest(manifest)
    with pytest.raises(PlannerError, match="unknown encoding 'int4'"):
        candidates.compile_candidates(c, _linear(1.0), _linear(1.0))
