import pytest

from planner import bandwidth
from planner.errors import PlannerError


def test_probes_of_two_sizes_separate_rtt_from_rate() -> None:
    # 1 Mbps and 5 ms: 1000 bytes take 13 ms, 10000 bytes 85 ms
    est = bandwidth.from_probes([(1000, 0.013), (10_000, 0.085), (1000, 0.013), (10_000, 0.085)])
    assert est.bandwidth_bps == pytest.approx(1e6) and est.rtt_s == pytest.approx(0.005)
    assert est.probed_bps == est.bandwidth_bps and est.samples == 4
    with pytest.raises(PlannerError, match="two payload sizes"):
        bandwidth.from_probes([(1000, 0.01), (1000, 0.02)])


def test_passive_samples_move_the_estimate_in_log_space() -> None:
    est = bandwidth.LinkEstimate(bandwidth_bps=10e6)
    for _ in range(3):  # three transfers at 1 Mbps: within 2x of it
        est = est.with_transfer(12_500, 0.1)
    assert 1e6 < est.bandwidth_bps < 2e6 and est.samples == 3
    assert est.with_transfer(0, 0.1) == est and est.with_transfer(100, 0.0) == est


def test_passive_samples_read_at_most_twice_the_last_probe() -> None:
    """A transfer inside a token bucket's burst crosses at line rate: it must not lift the estimate far above
    what the last probe measured, but it may lower it freely."""
    probed = bandwidth.LinkEstimate(bandwidth_bps=10e6, probed_bps=10e6)
    fast = probed
    for _ in range(20):
        fast = fast.with_transfer(12_500, 0.0002)  # 500 Mbps
    assert fast.bandwidth_bps == pytest.approx(bandwidth.PASSIVE_HEADROOM * 10e6)
    slow = probed.with_transfer(12_500, 1.0)
    assert slow.bandwidth_bps < 10e6
    unprobed = bandwidth.LinkEstimate(bandwidth_bps=10e6).with_transfer(12_500, 0.0002)
    assert unprobed.bandwidth_bps > 20e6  # no probe yet: nothing bounds it
