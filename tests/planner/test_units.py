import pytest

from planner.errors import UnitError
from planner.units import format_bandwidth, parse_bandwidth, parse_duration


@pytest.mark.parametrize(("text", "bps"), [("500kbps", 5e5), ("1.5Mbps", 1.5e6), ("50 kbps", 5e4),
                                           ("2Gbps", 2e9), ("800bps", 800.0), ("1e3kbps", 1e6)])
def test_bandwidth_units(text: str, bps: float) -> None:
    assert parse_bandwidth(text) == pytest.approx(bps)


@pytest.mark.parametrize(("text", "seconds"), [("300ms", 0.3), ("1s", 1.0), ("250us", 2.5e-4), ("0.5 s", 0.5)])
def test_duration_units(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["500", "500kb", "500KBPS", "fast", "-1Mbps", "0kbps", "1.5 Mb/s", ""])
def test_bad_bandwidth_is_a_clear_error(text: str) -> None:
    with pytest.raises(UnitError, match="bandwidth"):
        parse_bandwidth(text)


@pytest.mark.parametrize("text", ["300", "300 msec", "1m", "1h", "0s"])
def test_bad_duration_is_a_clear_error(text: str) -> None:
    with pytest.raises(UnitError, match="duration"):
        parse_duration(text)


def test_format_round_trips() -> None:
    for bps in (5e4, 1.5e6, 2e9, 300.0):
        assert parse_bandwidth(format_bandwidth(bps)) == pytest.approx(bps)
