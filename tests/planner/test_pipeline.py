"""The pipeline planner: the DP against brute force, the period, memory, splits, methods, the embedded case."""

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner import pipeline
from planner.core import LayerInfo
from planner.fleet import Chain, Fleet, PipelineError, Worker, fleet_from_doc
from planner.latency import CpuQuota, LatencyModel, TypeModel

MS_PER_FLOP = LatencyModel(name="flops", unit="ms", types={"other": TypeModel(variables=("flops",), coef=(1.0,),
                                                                                intercept=0.0)})


def chain(flops: list[float], bytes_: list[float], weights: list[float] | None = None,
          kinds: list[str] | None = None) -> Chain:
    """Blocks costing ``flops`` ms on a speed-1 worker; ``bytes_`` cross at the n + 1 boundaries."""
    n = len(flops)
    weights = weights or [1e3] * n
    kinds = kinds or ["conv"] * n
    blocks = tuple(LayerInfo(name=f"b{i}", kind=kinds[i], features={"flops": flops[i]}) for i in range(n))
    return Chain(name="t", blocks=blocks, boundary_bytes=tuple(bytes_), boundary_tensors=tuple(
        frozenset({f"t{i}"}) for i in range(n + 1)), weight_bytes=tuple(weights),
        work_bytes=tuple(bytes_[i] + bytes_[i + 1] for i in range(n)))


def worker(name: str, speed: float = 1.0, up: float = 1e9, down: float = 1e9, memory: float = 1e9,
           cores: int = 4) -> Worker:
    return Worker(name=name, latency=MS_PER_FLOP, speed=speed, uplink_bps=up, downlink_bps=down, memory_bytes=memory,
                  cores=cores)


def brute_force(costs: pipeline.Costs) -> list[tuple[float, float]]:
    """(period, latency) of every plan: every sequence of disjoint groups, option and cut."""
    groups = [g for size in range(1, costs.fleet.max_group + 1) for g in itertools.combinations(range(costs.k), size)]
    found: list[tuple[float, float]] = []

    def extend(used: int, j: int, period: float, latency: float) -> None:
        if j == costs.n:
            found.append((period, latency))
            return
        for g in groups:
            mask = sum(1 << w for w in g)
            if used & mask:
                continue
            for opt in pipeline._group_options(costs, g):
                for b in range(j + 1, costs.n + 1):
                    if math.isfinite(opt.period[j, b]):
                        extend(used | mask, b, max(period, opt.period[j, b]), latency + opt.latency[j, b])

    extend(0, 0, 0.0, 0.0)
    return found


@st.composite
def instances(draw: st.DrawFn) -> tuple[Chain, Fleet]:
    n = draw(st.integers(1, 5))
    flops = draw(st.lists(st.floats(1.0, 100.0), min_size=n, max_size=n))
    bytes_ = draw(st.lists(st.floats(1e3, 1e6), min_size=n + 1, max_size=n + 1))
    weights = draw(st.lists(st.floats(1e3, 5e6), min_size=n, max_size=n))
    kinds = draw(st.lists(st.sampled_from(["conv", "fc", "relu"]), min_size=n, max_size=n))
    k = draw(st.integers(1, 3))
    workers = tuple(worker(f"w{i}", speed=draw(st.floats(0.5, 3.0)), up=draw(st.floats(1e6, 1e9)),
                           down=draw(st.floats(1e6, 1e9)), memory=draw(st.floats(2e6, 2e7))) for i in range(k))
    return chain(flops, bytes_, weights, kinds), Fleet(workers=workers, source="w0", per_message_s=1e-3,
                                                       max_group=draw(st.integers(1, 3)))


@settings(max_examples=120, deadline=None)
@given(instances(), st.floats(0.0, 1.0))
def test_the_exact_dp_equals_brute_force(inst: tuple[Chain, Fleet], bound_share: float) -> None:
    ch, fleet = inst
    plans = brute_force(pipeline.Costs(ch, fleet))
    if not plans:
        with pytest.raises(PipelineError):
            pipeline.plan(ch, fleet)
        return
    best = min(p for p, _ in plans)
    p = pipeline.plan(ch, fleet, method="exact")
    assert p.period_s == pytest.approx(best, rel=1e-9)
    assert p.latency_s == pytest.approx(min(lat for per, lat in plans if per <= best * (1 + 1e-9)), rel=1e-9)
    # with a latency bound: the best period among the plans that meet it
    lats = sorted(lat for _, lat in plans)
    bound = lats[0] + bound_share * (lats[-1] - lats[0])
    bounded = pipeline.plan(ch, fleet, method="exact", latency_bound_s=bound)
    assert bounded.latency_s <= bound * (1 + 1e-9)
    assert bounded.period_s == pytest.approx(min(per for per, lat in plans if lat <= bound * (1 + 1e-9)), rel=1e-9)
    for method in ("greedy", "pso"):  # never better than exact, and valid
        other = pipeline.plan(ch, fleet, method=method)
        assert other.period_s >= best * (1 - 1e-9)
        _check_plan(other, ch, fleet)
    _check_plan(p, ch, fleet)


def _check_plan(p: pipeline.PipelinePlan, ch: Chain, fleet: Fleet) -> None:
    """Contiguous stages cover the model; the source only first; memory respected; the period's definition."""
    assert [s.first for s in p.stages] == [0, *(s.stop for s in p.stages[:-1])] and p.stages[-1].stop == ch.n
    used = [w for s in p.stages for w in s.workers]
    assert len(used) == len(set(used))
    assert all(fleet.source not in s.workers for s in p.stages[1:])
    by_name = {w.name: w for w in fleet.workers}
    for s in p.stages:
        assert all(m <= by_name[w].memory_bytes for m, w in zip(s.memory_bytes, s.workers, strict=True))
        parts = [max(c, r, t) for c, r, t in zip(s.compute_s, s.receive_s, s.send_s, strict=True)]
        expected = max(parts) / (len(s.workers) if s.mode == "replicas" else 1)
        if s.first == 0 and fleet.source not in s.workers:
            expected = max(expected, p.source_send_s)
        assert s.period_s == pytest.approx(expected, rel=1e-9)
        if s.mode == "split":
            assert s.stop - s.first == 1 and sum(s.fractions) == pytest.approx(1.0)
    assert p.period_s == pytest.approx(max(s.period_s for s in p.stages))


def test_two_workers_halve_the_period_of_one() -> None:
    ch = chain([100.0, 100.0], [1e3, 1e3, 40.0])
    fleet = Fleet(workers=(worker("cam"), worker("helper")), source="cam", per_message_s=0.0)
    p = pipeline.plan(ch, fleet)
    assert [s.workers for s in p.stages] == [("cam",), ("helper",)]
    assert p.period_s == pytest.approx(0.1 + 1e-9, rel=1e-6)  # 100 ms each; 8 kbit over 1 Gbit/s is 8 us
    assert p.frames_per_s == pytest.approx(10.0, rel=1e-3)
    # two 100 ms stages, 8 kbit up and down between them, the 320-bit result up and down to the source
    assert p.latency_s == pytest.approx(0.2 + 2 * 8e3 / 1e9 + 2 * 320 / 1e9, rel=1e-9)


def test_a_worker_under_a_cpu_quota_runs_a_stage_in_the_quotas_wall_time() -> None:
    """A stage's CPU time under a CFS quota is throttled as a whole (``LatencyModel.stage_s``): 100 ms of CPU at a
    quota of 1 ms per 10 ms take about 1 s, and the planner moves work to the unthrottled worker."""
    quota = CpuQuota(quota_s=1e-3, period_s=10e-3)
    throttled = LatencyModel(name="q", unit="ms", types=MS_PER_FLOP.types, cpu_quota=quota)
    ch = chain([50.0, 50.0], [1e3, 1e3, 40.0])
    cam = Worker(name="cam", latency=throttled, uplink_bps=1e9, downlink_bps=1e9, memory_bytes=1e9)
    costs = pipeline.Costs(ch, Fleet(workers=(cam, worker("helper")), source="cam"))
    assert costs.compute[0, 0, 2] == pytest.approx(float(throttled.stage_s(0.1)))
    assert costs.compute[0, 0, 2] > 9 * costs.compute[1, 0, 2]
    p = pipeline.plan(ch, Fleet(workers=(cam, worker("helper")), source="cam", per_message_s=0.0))
    assert [s.workers for s in p.stages] == [("helper",)]


def test_a_slow_link_keeps_the_model_on_the_source() -> None:
    ch = chain([100.0, 100.0], [1e3, 1e6, 40.0])  # 8 Mbit cross in the middle
    fleet = Fleet(workers=(worker("cam"), worker("helper", down=1e6)), source="cam")
    p = pipeline.plan(ch, fleet)
    assert [s.workers for s in p.stages] == [("cam",)]
    assert p.bottleneck == "stage 1 (cam): compute"


def test_a_layer_too_big_for_any_one_worker_is_split_across_two() -> None:
    ch = chain([10.0, 50.0, 5.0], [1e3, 1e4, 1e3, 40.0], weights=[1e5, 3e8, 1e5], kinds=["conv", "fc", "fc"])
    fleet = Fleet(workers=tuple(worker(n, memory=2e8) for n in ("cam", "a", "b", "c")), source="cam")
    p = pipeline.plan(ch, fleet)
    split = [s for s in p.stages if s.first == 1]
    assert split and split[0].mode == "split" and set(split[0].workers) == {"a", "b"}
    assert max(split[0].memory_bytes) <= 2e8 and sum(split[0].fractions) == pytest.approx(1.0)
    with pytest.raises(PipelineError, match=r"fits nowhere: block 'b1' needs 30\d\.\d MB, more than any worker has "
                                            r"\(200\.0 MB\), and no split of it over the others fits"):
        pipeline.plan(ch, Fleet(workers=fleet.workers[:2], source="cam"))
    with pytest.raises(PipelineError, match="no plan covers the model"):  # b2 has nowhere to go after the split
        pipeline.plan(ch, Fleet(workers=fleet.workers[:3], source="cam"))


def test_replicas_serve_a_heavy_stage_round_robin() -> None:
    ch = chain([10.0, 300.0], [1e3, 1e3, 40.0], kinds=["conv", "relu"])
    fleet = Fleet(workers=(worker("cam"), worker("a"), worker("b"), worker("c")), source="cam", per_message_s=0.0)
    p = pipeline.plan(ch, fleet)
    assert p.stages[-1].mode == "replicas" and len(p.stages[-1].workers) == 3
    assert p.period_s == pytest.approx(0.1, rel=1e-3)
    one = pipeline.plan(ch, Fleet(workers=fleet.workers, source="cam", max_group=1))
    assert one.period_s == pytest.approx(0.3, rel=1e-3)


def test_an_unmeetable_latency_bound_says_how_quick_the_quickest_plan_is() -> None:
    ch = chain([100.0, 100.0], [1e3, 1e3, 40.0])
    fleet = Fleet(workers=(worker("cam"), worker("helper")), source="cam")
    with pytest.raises(PipelineError, match=r"latency bound 50\.0 ms: the quickest plan takes 200\.\d ms"):
        pipeline.plan(ch, fleet, latency_bound_s=0.05)


def test_pso_is_reproducible_and_greedy_is_close_on_a_bigger_fleet() -> None:
    rng = np.random.default_rng(3)
    ch = chain(list(rng.uniform(5, 80, 12)), list(rng.uniform(1e3, 2e5, 13)))
    fleet = Fleet(workers=tuple(worker(f"w{i}", speed=float(rng.uniform(0.5, 3)), up=float(rng.uniform(1e7, 1e8)),
                                       down=float(rng.uniform(1e7, 1e8))) for i in range(6)), source="w0")
    a, b = pipeline.plan(ch, fleet, method="pso", seed=7), pipeline.plan(ch, fleet, method="pso", seed=7)
    assert a.to_json() == b.to_json()
    exact = pipeline.plan(ch, fleet)
    for p in (a, pipeline.plan(ch, fleet, method="greedy")):
        assert exact.period_s <= p.period_s <= 1.5 * exact.period_s
        _check_plan(p, ch, fleet)


def test_embedded_stages_get_disjoint_cores_and_trade_latency_for_throughput() -> None:
    ch = chain([40.0, 40.0, 40.0, 40.0], [1e3, 1e4, 1e4, 1e4, 40.0])
    pi = Fleet(workers=(worker("pi", cores=4),), source="pi")
    free = pipeline.plan(ch, pi, method="embedded")
    cores = [c for s in free.stages for c in s.cores]
    assert len(cores) == len(set(cores)) <= 4
    one_stage = 0.16  # every block on all four cores
    assert free.period_s < one_stage  # more stages / replicas on fewer threads each beat one stage's period
    tight = pipeline.plan(ch, pi, method="embedded", latency_bound_s=one_stage * (1 + 1e-6))
    assert tight.latency_s <= one_stage * (1 + 1e-6) and len(tight.stages) == 1 and tight.stages[0].threads == 4
    assert free.latency_s > tight.latency_s
    with pytest.raises(PipelineError, match="one worker"):
        pipeline.plan(ch, Fleet(workers=(worker("a"), worker("b")), source="a"), method="embedded")


def test_fleet_files_are_validated() -> None:
    good = {"source": "cam", "workers": [{"name": "cam", "latency_model": "m", "memory": "256MB",
                                          "uplink": "20Mbps", "downlink": "30Mbps", "cores": 4, "speed": 1.5}]}
    fleet = fleet_from_doc(good, {"m": MS_PER_FLOP})
    assert fleet.workers[0].memory_bytes == 256e6 and fleet.workers[0].uplink_bps == 20e6
    cases = [
        ({**good, "colour": "red"}, "unknown field"),
        ({"workers": [{**good["workers"][0], "bandwidth": "1Mbps"}]}, r"worker cam: unknown field\(s\) bandwidth"),
        ({"workers": [{**good["workers"][0], "uplink": "-5Mbps"}]}, "bad bandwidth '-5Mbps'"),
        ({"workers": [{**good["workers"][0], "memory": "lots"}]}, "bad size 'lots'"),
        ({"workers": [{**good["workers"][0], "latency_model": "pi9"}]}, "unknown latency model 'pi9'"),
        ({"workers": [{"name": "cam"}]}, "missing downlink, latency_model, memory, uplink"),
        ({**good, "source": "nobody"}, "the source 'nobody' is not one of the workers"),
        ({"workers": []}, "no \\[\\[workers\\]\\]"),
        ({"workers": [{**good["workers"][0], "speed": "fast"}]}, "speed must be a number"),
    ]
    for doc, message in cases:
        with pytest.raises(PipelineError, match=message):
            fleet_from_doc(doc, {"m": MS_PER_FLOP})


def test_replicas_of_the_first_stage_cannot_outrun_the_sources_upload() -> None:
    ch = chain([200.0], [1e6, 40.0], kinds=["relu"])  # 8 Mbit in: 0.15 s on the camera's uplink
    fleet = Fleet(workers=(worker("cam", up=8e6 / 0.15), worker("a"), worker("b")), source="cam", per_message_s=0.0)
    p = pipeline.plan(ch, fleet)
    assert p.stages[0].mode == "replicas" and p.period_s == pytest.approx(0.15, rel=1e-6)  # not 0.2 / 2
    assert p.bottleneck == "source uplink"


def test_a_split_members_memory_is_its_own_share() -> None:
    # the faster member takes 2/3 of a 2.6 MB layer: 2.0 MB, which only it can hold (found by CI's property test)
    ch = chain([1.0, 1.0], [1e3, 1e3, 5e4], [1e3, 2617501.0])
    fleet = Fleet(workers=(worker("w0", memory=2e6), worker("w1", memory=2e6), worker("w2", speed=2.0,
                                                                                    memory=2000001.0)),
                  source="w0", per_message_s=1e-3, max_group=2)
    for method in ("exact", "greedy"):
        p = pipeline.plan(ch, fleet, method=method)
        _check_plan(p, ch, fleet)
        assert p.stages[1].mode == "split" and p.stages[1].memory_bytes[1] > 2e6 > p.stages[1].memory_bytes[0]


def test_measured_block_corrections_move_work_off_the_blocks_that_ran_slow() -> None:
    ch = chain([100.0, 100.0], [1e3, 1e3, 40.0])
    fleet = Fleet(workers=(worker("cam"), worker("helper")), source="cam", per_message_s=0.0)
    assert pipeline.Costs(ch, fleet).compute[1, 0, 2] == pytest.approx(0.2)
    slow_first = Fleet(workers=(worker("cam"), replace(worker("helper"), block_scale=(3.0, 1.0))), source="cam",
                       per_message_s=0.0)
    assert pipeline.Costs(ch, slow_first).compute[1, 0, 2] == pytest.approx(0.4)  # 300 ms + 100 ms
    p = pipeline.plan(ch, slow_first)
    assert [(s.workers, s.first, s.stop) for s in p.stages] == [(("cam",), 0, 1), (("helper",), 1, 2)]
    with pytest.raises(PipelineError, match="block_scale has 1 factors for 2 blocks"):
        pipeline.Costs(ch, Fleet(workers=(replace(worker("cam"), block_scale=(2.0,)),), source="cam"))
    with pytest.raises(PipelineError, match="positive"):
        replace(worker("cam"), block_scale=(0.0, 1.0))
