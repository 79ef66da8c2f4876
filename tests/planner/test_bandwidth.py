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


def test_after_probes_a_fast_transfer_is_the_token_buckets_burst_and_a_slow_one_the_rate() -> None:
    """A transfer inside a token bucket's burst crosses at line rate: after probes measured the rate on a drained
    link, it measures the free bytes (a 12.5 KB request on a 10 Mbps link had read as 55 Mbps), and it must not
    lift the rate; a slower transfer lowers it."""
    probed = bandwidth.LinkEstimate(bandwidth_bps=400e3, rtt_s=0.003, probed_bps=400e3)
    burst = probed
    for _ in range(8):  # 1900 B through a 1600 B burst: 300 B wait for the rate
        burst = burst.with_transfer(1900, 0.003 + 8 * 300 / 400e3)
    assert burst.free_bytes == pytest.approx(1600, rel=0.01) and burst.bandwidth_bps == pytest.approx(400e3)
    flat = probed
    for _ in range(8):  # no burst: every byte waits
        flat = flat.with_transfer(1900, 0.003 + 8 * 1900 / 400e3)
    assert flat.free_bytes == 0 and flat.bandwidth_bps == pytest.approx(400e3)
    slow = probed.with_transfer(20_000, 0.003 + 8 * 20_000 / 100e3)  # the link slowed down to 100 kbps
    assert slow.bandwidth_bps < 400e3 and slow.free_bytes == 0
    unprobed = bandwidth.LinkEstimate(bandwidth_bps=10e6).with_transfer(12_500, 0.0002)
    assert unprobed.bandwidth_bps > 20e6 and unprobed.free_bytes == 0  # no probe yet: every sample moves the rate


def test_transfers_of_several_sizes_separate_the_per_message_cost() -> None:
    est = bandwidth.LinkEstimate(bandwidth_bps=1e6)
    for size in (500, 2000, 8000, 32_000) * 2:  # 2 Mbps and 4 ms per message
        est = est.with_transfer(size, 0.004 + 8 * size / 2e6)
    assert est.rtt_s == pytest.approx(0.004, rel=1e-6)
    assert bandwidth.fit_transfers([(1000, 0.01)] * 5) is None  # one size: the two parts cannot be told apart
