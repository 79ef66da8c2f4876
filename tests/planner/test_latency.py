import json
from dataclasses import replace

import numpy as np
import pytest

from planner.errors import LatencyModelError
from planner.latency import (
    MARGIN_MIN_SAMPLES,
    MARGIN_WINDOW,
    SPEED_FACTOR_LIMIT,
    TABLE_I_VARIABLES,
    LatencyModel,
    Margin,
    Sample,
    SpeedFactor,
    fit,
)


def test_reference_pi3_matches_table_ii(pi3: LatencyModel) -> None:
    # ReLU on the Pi: 1.5e-5 * x + 0.488 ms
    assert pi3.predict("relu", {"input_bytes": 100_000}) == pytest.approx((1.5e-5 * 1e5 + 0.488) * 1e-3)
    # Convolution: 6.13e-3*x1 + 2.67e-2*x2 - 9.909 ms
    got = pi3.predict("conv", {"input_bytes": 25_088, "filter_term": 3200})
    assert got == pytest.approx((6.13e-3 * 25_088 + 2.67e-2 * 3200 - 9.909) * 1e-3)


def test_prediction_is_clamped_at_zero(pi3: LatencyModel) -> None:
    # a tiny convolution would come out negative from the Pi's intercept of -9.909 ms
    assert pi3.predict("conv", {"input_bytes": 10, "filter_term": 1}) == 0.0


def test_unknown_type_falls_back_to_other(desktop: LatencyModel) -> None:
    feats = {"input_bytes": 4096.0}
    assert desktop.predict("flatten", feats) == desktop.predict("other", feats) > 0


def test_missing_fallback_is_an_error() -> None:
    doc = {"format": "coinfer.latency/1", "name": "x", "types": {"relu": {"variables": ["input_bytes"],
                                                                          "coef": [1.0], "intercept": 0.0}}}
    model = LatencyModel.from_json(doc)
    with pytest.raises(LatencyModelError, match="no 'conv' entry"):
        model.predict("conv", {"input_bytes": 1.0})


def test_json_round_trip(pi3: LatencyModel) -> None:
    again = LatencyModel.from_json(json.loads(json.dumps(pi3.to_json())))
    assert again == pi3


@pytest.mark.parametrize("doc", [
    {},
    {"format": "coinfer.latency/1", "types": {}},
    {"format": "coinfer.latency/1", "types": {"relu": {"variables": ["a"], "coef": [1, 2], "intercept": 0}}},
    {"format": "coinfer.latency/1", "types": {"relu": {"variables": ["a"], "coef": [1], "intercept": 0, "x": 1}}},
    {"format": "coinfer.latency/1", "surprise": 1, "types": {"relu": {"variables": [], "coef": [], "intercept": 0}}},
    {"format": "coinfer.latency/1", "latency_unit": "h", "types": {"r": {"variables": [], "coef": [], "intercept": 0}}},
    ["not", "an", "object"],
])
def test_malformed_documents_are_rejected(doc: object) -> None:
    with pytest.raises(LatencyModelError):
        LatencyModel.from_json(doc)


def test_fit_recovers_known_coefficients() -> None:
    rng = np.random.default_rng(3)
    samples = []
    for _ in range(60):
        x1, x2 = float(rng.uniform(1e3, 1e6)), float(rng.uniform(10, 5000))
        ms = 2e-5 * x1 + 3e-3 * x2 + 0.5
        samples.append(Sample(kind="conv", features={"input_bytes": x1, "filter_term": x2}, latency_s=ms * 1e-3))
    for _ in range(20):
        x = float(rng.uniform(1e3, 1e6))
        samples.append(Sample(kind="relu", features={"input_bytes": x}, latency_s=(1e-5 * x + 0.1) * 1e-3))
    model = fit(samples, name="synthetic", variables=TABLE_I_VARIABLES)
    conv = model.types["conv"]
    assert conv.coef == pytest.approx((2e-5, 3e-3), rel=1e-6)
    assert conv.intercept == pytest.approx(0.5, rel=1e-6)
    assert conv.fit["r2"] == pytest.approx(1.0) and conv.fit["n_test"] == 15
    assert model.predict("relu", {"input_bytes": 1e5}) == pytest.approx(1.1e-3)


def test_a_fit_without_other_layers_still_costs_any_layer() -> None:
    """Every profiled layer of a known type: the fallback is fitted on all of them, so a model of other types
    (a Resize, a custom op) can still be planned."""
    rng = np.random.default_rng(4)
    samples = [Sample(kind="relu", features={"input_bytes": x, "output_bytes": x, "flops": x / 4},
                      latency_s=(1e-5 * x + 0.1) * 1e-3) for x in rng.uniform(1e3, 1e6, 40)]
    model = fit(samples, name="relu-only", variables=TABLE_I_VARIABLES)
    assert set(model.types) == {"relu", "other"} and model.types["other"].fit["n"] == 40
    assert model.predict("resize", {"input_bytes": 1e5, "output_bytes": 1e5, "flops": 2.5e4}) == pytest.approx(
        1.1e-3, rel=0.01)


def test_fit_with_too_few_samples_fits_fewer_variables_and_says_so() -> None:
    """A bundle's own profile has two fc layers: four variables cannot be fitted, the one that explains most can."""
    fc = [Sample(kind="fc", features={"input_bytes": b, "output_bytes": 40.0, "flops": f, "param_bytes": 4e3},
                 latency_s=ms * 1e-3) for b, f, ms in ((1024.0, 5e3, 0.01), (512.0, 8e4, 0.05))]
    one = [Sample(kind="conv", features={"input_bytes": 1.0, "filter_term": 1.0}, latency_s=2e-3)]
    model = fit([*fc, *one], name="x")
    assert model.types["fc"].variables == ("flops",) and model.types["fc"].fit["reduced_from"] == 4
    assert model.predict("fc", {"input_bytes": 1024.0, "output_bytes": 40.0, "flops": 5e3, "param_bytes": 4e3}
                         ) == pytest.approx(1e-5)
    assert model.types["conv"].variables == () and model.predict("conv", {}) == pytest.approx(2e-3)  # one sample


def test_calibrate_stages_recovers_slowdown_and_overhead() -> None:
    from planner.latency import calibrate_stages

    predicted = [0.001, 0.002, 0.004, 0.008]
    slowdown, overhead = calibrate_stages(predicted, [13 * p + 0.007 for p in predicted])
    assert slowdown == pytest.approx(13, rel=1e-6) and overhead == pytest.approx(0.007, rel=1e-6)
    with pytest.raises(LatencyModelError):
        calibrate_stages([0.001, 0.001], [0.01, 0.02])


def test_scaled_model_multiplies_predictions(pi3: LatencyModel) -> None:
    feats = {"input_bytes": 4e4, "output_bytes": 4e4, "filter_term": 800.0, "flops": 1e6}
    slow = pi3.scaled(3.0, 0.002, name="x", meta={})
    assert slow.predict("relu", feats) == pytest.approx(3 * pi3.predict("relu", feats))
    assert slow.stage_overhead_s == pytest.approx(0.002)
    assert LatencyModel.from_json(slow.to_json()) == slow


def test_cpu_quota_wall_time_matches_a_simulated_cfs_throttle() -> None:
    """Against a step-by-step simulation of CFS bandwidth control (refill every period, full quota at start)."""
    from planner.latency import CpuQuota

    busy, idle = CpuQuota(quota_s=0.001, period_s=0.010), CpuQuota(quota_s=0.001, period_s=0.010, start="idle")

    def simulate(cpu: float, start: float, dt: float = 1e-6) -> float:
        t, left, done = start, busy.quota_s, 0.0
        while done < cpu - 1e-12:
            if int((t + dt) / busy.period_s) > int(t / busy.period_s):
                left = busy.quota_s  # refill at the period boundary
            if left > 0:
                done += dt
                left -= dt
            t += dt
        return t - start

    for cpu in (0.0005, 0.0015, 0.0042, 0.020):
        phases = [(i + 0.5) / 16 * idle.period_s for i in range(16)]
        expected = np.mean([simulate(cpu, idle.period_s - p) for p in phases])
        assert float(idle.wall_s(cpu)) == pytest.approx(expected, rel=0.03, abs=2e-4)
        assert float(busy.wall_s(cpu)) == pytest.approx(simulate(cpu, 1e-7), rel=0.01, abs=2e-5)
    for quota in (busy, idle):
        assert float(quota.wall_s(0.0005)) == pytest.approx(0.0005)  # fits in the quota: full speed
    # 1 ms at once, throttled to the refill (a whole period busy, half of one on average idle), 28 whole
    # periods, the last 1 ms
    assert float(busy.wall_s(0.030)) == pytest.approx(0.010 + 28 * 0.010 + 0.001, rel=5e-3)
    assert float(idle.wall_s(0.030)) == pytest.approx(0.005 + 28 * 0.010 + 0.001, rel=5e-3)
    with pytest.raises(LatencyModelError):
        CpuQuota(quota_s=0.02, period_s=0.01)
    with pytest.raises(LatencyModelError, match="start"):
        CpuQuota(quota_s=0.001, period_s=0.01, start="sometimes")


def test_calibrate_stages_under_a_quota_recovers_the_cpu_speed(pi3: LatencyModel) -> None:
    from planner.latency import CpuQuota, calibrate_stages

    quota = CpuQuota(quota_s=0.001, period_s=0.010, start="idle")
    predicted = np.array([0.0003, 0.001, 0.003, 0.008, 0.02, 0.035])
    measured = quota.wall_s(1.3 * predicted + 0.0004)
    slowdown, overhead = calibrate_stages(predicted, measured, cpu_quota=quota)
    assert slowdown == pytest.approx(1.3, rel=0.02) and overhead == pytest.approx(0.0004, abs=1e-4)
    model = pi3.scaled(slowdown, overhead, name="dev", meta={}, cpu_quota=quota)
    assert LatencyModel.from_json(model.to_json()) == model
    assert model.stage_s(0.0) > 0 and model.stage_s(0.02) > 9 * 0.02  # throttled about 10x
    with pytest.raises(LatencyModelError):
        LatencyModel.from_json({**model.to_json(), "cpu_quota": {"quota_s": 0.001}})


def test_speed_factor_learns_how_much_slower_the_machine_runs() -> None:
    speed = SpeedFactor()
    assert speed.value == 1.0  # no evidence: the model as it is
    for _ in range(60):
        speed = speed.update(0.39, 0.30)
    assert speed.value == pytest.approx(1.3, rel=0.01)
    assert speed.samples == 60


def test_speed_factor_weighs_stages_by_their_length() -> None:
    # a long stage runs at its model's speed; short ones meet a whole CPU-quota period now and then
    speed = SpeedFactor()
    for i in range(60):
        speed = speed.update(0.40, 0.40).update(0.010 if i % 2 else 0.003, 0.003)
    assert 1.0 < speed.value < 1.05  # the short stages' 2x average ratio hardly moves it


def test_speed_factor_ignores_nonsense_and_bounds_outliers() -> None:
    speed = SpeedFactor()
    assert speed.update(0.0, 0.1) == speed and speed.update(0.1, 0.0) == speed
    assert speed.update(float("nan"), 0.1) == speed
    stalled = speed
    for _ in range(100):
        stalled = stalled.update(100.0, 0.1)  # a stall, not the machine's speed
    assert stalled.value == pytest.approx(SPEED_FACTOR_LIMIT, rel=1e-3)


def test_margin_is_the_quantile_of_recent_overruns() -> None:
    margin = Margin(0.9, relative=False)
    for _ in range(MARGIN_MIN_SAMPLES - 1):
        margin = margin.update(0.040, 0.033)
    assert margin.value == 0.0  # too few requests to tell: the prediction itself
    # a device whose CPU quota turns a 33 ms prediction into 30, 40 or 50 ms: seconds over
    for i in range(100):
        margin = margin.update((0.030, 0.040, 0.040, 0.040, 0.050)[i % 5], 0.033)
    assert len(margin.overruns) == MARGIN_WINDOW
    assert margin.value == pytest.approx(0.017)
    assert replace(margin, quantile=0.5).value == pytest.approx(0.007)
    # a link: the same as factors
    link = Margin(0.9)
    for i in range(100):
        link = link.update((0.30, 0.40, 0.40, 0.40, 0.50)[i % 5], 0.33)
    assert link.value == pytest.approx(0.50 / 0.33)
    # predictions that run long only at random and rarely: no margin, never a negative one
    for relative in (True, False):
        early = Margin(0.9, relative=relative)
        for i in range(50):
            early = early.update(0.9 if i % 20 else 1.5, 1.0)
        assert early.value == (1.0 if relative else 0.0)


def test_margin_forgets_old_requests_and_ignores_nonsense() -> None:
    margin = Margin(0.9)
    for _ in range(MARGIN_WINDOW):
        margin = margin.update(2.0, 1.0)
    assert margin.value == pytest.approx(2.0)
    for _ in range(MARGIN_WINDOW):
        margin = margin.update(1.1, 1.0)
    assert margin.value == pytest.approx(1.1)  # the link got steadier: the margin follows
    assert margin.update(float("nan"), 1.0) == margin and margin.update(1.0, 0.0) == margin
    assert Margin(0.0).update(5.0, 1.0).value == 1.0  # off: the point prediction, as Edgent plans
    assert Margin(0.0, relative=False).update(5.0, 1.0).value == 0.0
    with pytest.raises(LatencyModelError):
        Margin(1.5)
