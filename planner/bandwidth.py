"""Uplink estimates: active probes of two sizes (separating RTT from rate) and passive transfer samples."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from planner.errors import PlannerError

# Weight of a new passive sample, applied in log space: a 10x drop is within 2x after three samples.
PASSIVE_ALPHA = 0.5
# Passive samples may read at most this much above the last probe. A shaped link (a token bucket) lets a
# transfer smaller than its burst through at line rate: a 12 KB request on a 10 Mbps link read as 55 Mbps, and
# the estimate then sent a probe sized for that into a link that had dropped to 200 kbps.
PASSIVE_HEADROOM = 2.0
MIN_TRANSFER_S = 1e-5


@dataclass(frozen=True, slots=True)
class LinkEstimate:
    """The device's current belief about its uplink."""

    bandwidth_bps: float
    rtt_s: float = 0.0
    samples: int = 0
    probed_bps: float = 0.0  # the last actively measured rate (0: none yet), which bounds passive samples

    def __post_init__(self) -> None:
        if not self.bandwidth_bps > 0 or self.rtt_s < 0 or self.probed_bps < 0:
            raise PlannerError(f"bad link estimate {self.bandwidth_bps} bps, rtt {self.rtt_s} s")

    def with_transfer(self, nbytes: int, seconds: float, *, alpha: float = PASSIVE_ALPHA) -> LinkEstimate:
        """Fold in one transfer of ``nbytes`` that took ``seconds`` on the wire (RTT included)."""
        if nbytes <= 0 or seconds <= 0:
            return self
        sample = 8.0 * nbytes / max(seconds - self.rtt_s, MIN_TRANSFER_S)
        if self.probed_bps:
            sample = min(sample, PASSIVE_HEADROOM * self.probed_bps)
        log_bw = (1 - alpha) * math.log(self.bandwidth_bps) + alpha * math.log(sample)
        return replace(self, bandwidth_bps=math.exp(log_bw), samples=self.samples + 1)


def from_probes(samples: Sequence[tuple[int, float]]) -> LinkEstimate:
    """Fit ``seconds = rtt + 8 * bytes / bandwidth`` to (bytes, round-trip seconds) of at least two sizes."""
    sizes = {b for b, _ in samples}
    if len(sizes) < 2:
        raise PlannerError("probing needs at least two payload sizes")
    n = len(samples)
    mean_b = sum(b for b, _ in samples) / n
    mean_t = sum(t for _, t in samples) / n
    cov = sum((b - mean_b) * (t - mean_t) for b, t in samples)
    var = sum((b - mean_b) ** 2 for b, _ in samples)
    slope = max(cov / var, 8.0 / 1e11)  # seconds per byte, floored at 100 Gbps
    rtt = max(mean_t - slope * mean_b, 0.0)
    return LinkEstimate(bandwidth_bps=8.0 / slope, rtt_s=rtt, samples=n, probed_bps=8.0 / slope)
