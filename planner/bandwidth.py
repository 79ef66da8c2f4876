"""Uplink estimates: a transfer takes a per-message cost plus its bytes over the rate, both learned from active
probes of two sizes and from passive transfer samples of whatever sizes the requests had."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from planner.errors import PlannerError

# Weight of a new passive sample, applied in log space: a 10x drop is within 2x after three samples.
PASSIVE_ALPHA = 0.5
MIN_TRANSFER_S = 1e-5
WINDOW = 16  # the recent passive transfers the per-message cost is fitted on
SPREAD = 4.0  # transfers this far apart in size (largest / smallest) tell the per-message cost from the rate
MIN_FIT = 4  # and at least this many of them


@dataclass(frozen=True, slots=True)
class LinkEstimate:
    """The device's current belief about its uplink: a request of B bytes on the wire gets its answer
    ``rtt_s + 8 max(B - free_bytes, 0) / bandwidth_bps`` after it is sent."""

    bandwidth_bps: float
    rtt_s: float = 0.0  # the per-message cost: a request's round trip whatever its size (propagation, broker hops)
    samples: int = 0
    probed_bps: float = 0.0  # the last actively measured rate (0: none yet): after it, fast transfers are the burst
    recent: tuple[tuple[float, float], ...] = ()  # the last ``WINDOW`` passive transfers: (bytes, seconds)
    free_bytes: float = 0.0  # bytes a request crosses without waiting for the rate (a token bucket's burst)

    def __post_init__(self) -> None:
        if not self.bandwidth_bps > 0 or self.rtt_s < 0 or self.probed_bps < 0:
            raise PlannerError(f"bad link estimate {self.bandwidth_bps} bps, rtt {self.rtt_s} s")

    def with_transfer(self, nbytes: int, seconds: float, *, alpha: float = PASSIVE_ALPHA) -> LinkEstimate:
        """Fold in one transfer of ``nbytes`` that took ``seconds`` on the wire (its per-message cost included).

        The per-message cost is refitted whenever the recent transfers differ enough in size to separate it from
        the rate (``fit_transfers``), and kept otherwise (transfers of one size cannot tell a slower link from a
        costlier message). Once probes have measured the rate (on a drained link), a transfer faster than its
        bytes allow at that rate measures the link's free bytes (a token bucket's burst, refilled between
        requests), and only slower ones lower the rate (a probe raises it again); before, every transfer moves the
        rate (in log space, on the bytes beyond the free ones)."""
        if nbytes <= 0 or seconds <= 0:
            return self
        recent = (*self.recent, (float(nbytes), float(seconds)))[-WINDOW:]
        fitted = fit_transfers(recent)
        per_message = self.rtt_s if fitted is None else fitted[0]
        wire_s = max(seconds - per_message, MIN_TRANSFER_S)
        free, bandwidth = self.free_bytes, self.bandwidth_bps
        if self.probed_bps:
            implied = min(max(nbytes - wire_s * self.bandwidth_bps / 8.0, 0.0), float(nbytes))
            free = (1 - alpha) * self.free_bytes + alpha * implied
        sample = 8.0 * max(nbytes - free, 1.0) / wire_s
        if self.probed_bps:
            # after probes, a transfer faster than the rate is the burst's (its free bytes, above), and only a slower
            # one moves the rate (the link slowed down), when most of its bytes waited for the rate
            sample = min(sample, self.bandwidth_bps) if nbytes > 2 * free else self.bandwidth_bps
        bandwidth = math.exp((1 - alpha) * math.log(self.bandwidth_bps) + alpha * math.log(sample))
        return replace(self, bandwidth_bps=bandwidth, rtt_s=per_message, samples=self.samples + 1, recent=recent,
                       free_bytes=free)


def fit_transfers(samples: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """(per-message seconds, bits per second) fitted to (bytes, seconds) transfers by least squares on relative
    errors; None unless there are ``MIN_FIT`` of them ``SPREAD`` apart in size (or the fit makes no sense)."""
    b = np.array([x for x, _ in samples], dtype=np.float64)
    t = np.array([y for _, y in samples], dtype=np.float64)
    if len(samples) < MIN_FIT or b.max() < SPREAD * b.min():
        return None
    w = 1.0 / t
    (per_message, slope), *_ = np.linalg.lstsq(np.stack([np.ones_like(b), b], axis=1) * w[:, None], t * w,
                                               rcond=None)
    if not slope > 0:
        return None
    return max(float(per_message), 0.0), 8.0 / float(slope)


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
