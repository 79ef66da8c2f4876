"""What the device believes about its uplink: probes, transfer samples, timeout caps and late answers."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace

import structlog

from deviced.metrics import DeviceMetrics
from planner import bandwidth

log = structlog.get_logger()
PROBE_TIMEOUT_S = 2.0
PROBE_TARGET_S = 0.05  # the large probe is sized to take about this long at the current estimate
PROBE_MIN_SIGNAL_S = 0.01  # below this extra time for its extra bytes, a probe pair says nothing
PROBE_MAX_BYTES = 64 * 1024
PROBE_IDLE_BYTES = 1500  # an uplink with no more than a packet of ours unacknowledged is idle enough to probe
# An unanswered transfer caps the estimate, but it is a guess (the path may just have stalled): the cap holds
# this long, then the last measured estimate comes back and the edge is tried again.
CAP_HOLD_S = 5.0
LATE_REMEMBERED = 256  # given-up requests whose late answers still count as transfer samples
MESSAGE_ALPHA = 0.2  # weight of a new request in the running mean of the bytes a request carries besides tensors

# sends one probe with this much padding and waits for its reply; returns the bytes sent (TimeoutError: none)
RoundTrip = Callable[[int], Awaitable[int]]


class LinkEstimator:
    """The uplink estimate: set by probes and by the operator, moved by transfer samples, capped for a while
    by unanswered transfers. Only its methods change it."""

    def __init__(self, initial_bps: float, probe_sizes: Sequence[int], metrics: DeviceMetrics) -> None:
        self._estimate = bandwidth.LinkEstimate(bandwidth_bps=initial_bps)
        self._sizes = tuple(probe_sizes)
        self._probe_bytes = self._sizes[-1]
        self._metrics = metrics
        self._measured: bandwidth.LinkEstimate | None = None  # the estimate a timeout cap replaced
        self._cap_expires = 0.0
        # given-up requests: (bytes to cross, sent at); a late answer still times them
        self._late: dict[str, tuple[int, float]] = {}
        self._message_bytes = 0.0  # what a request carries up besides its tensors, on the wire (learned)
        metrics.bandwidth.set(initial_bps)

    @property
    def estimate(self) -> bandwidth.LinkEstimate:
        """The estimate now (a timeout cap included)."""
        return self._estimate

    @property
    def message_bytes(self) -> float:
        """The bytes a request carries up besides its tensors (envelope, MQTT and TCP/IP headers), as measured."""
        return self._message_bytes

    def request_sent(self, wire_bytes: int, tensor_bytes: float) -> None:
        """A request put ``wire_bytes`` on the uplink for ``tensor_bytes`` of tensors (as costed by its plan)."""
        extra = max(wire_bytes - tensor_bytes, 0.0)
        self._message_bytes = extra if not self._message_bytes else \
            (1 - MESSAGE_ALPHA) * self._message_bytes + MESSAGE_ALPHA * extra

    @property
    def capped(self) -> bandwidth.LinkEstimate | None:
        """While a timeout cap holds: the measured estimate that returns when it expires."""
        return self._measured

    def current(self, now: float) -> bandwidth.LinkEstimate:
        """The estimate to plan with at monotonic time ``now``: an expired cap gives way to the measured one."""
        if self._measured is not None and now >= self._cap_expires:
            log.info("link_cap_expired", bandwidth_bps=round(self._measured.bandwidth_bps))
            self.set(self._measured)
        return self._estimate

    def set(self, estimate: bandwidth.LinkEstimate) -> None:
        """A measured estimate (probe, transfer, or set by the operator): it replaces any timeout cap."""
        self._measured = None
        self._estimate = estimate
        self._metrics.bandwidth.set(estimate.bandwidth_bps)
        self._metrics.message_seconds.set(estimate.rtt_s)
        self._metrics.free_bytes.set(estimate.free_bytes)

    def transfer(self, nbytes: int, wire_s: float) -> None:
        """An answered request put ``nbytes`` on the uplink (its own and what was queued ahead of it) and its answer
        came ``wire_s`` after it was sent (the edge's queue and compute taken out): the answer's way back is part
        of the per-message cost (downlinks are the faster way)."""
        self.set(self._estimate.with_transfer(nbytes, wire_s))

    def unanswered(self, request_id: str, nbytes: int, sent_at: float, now: float) -> None:
        """A request's ``nbytes`` did not make it there and back by ``now``: evidence too. Cap the estimate at
        that rate for a while, and remember the request so that a late answer still times it."""
        self._cap(8.0 * nbytes / max(now - sent_at, 1e-3), now)
        self._late[request_id] = (nbytes, sent_at)
        while len(self._late) > LATE_REMEMBERED:
            del self._late[next(iter(self._late))]

    def late_answer(self, request_id: str, edge_s: float, now: float) -> None:
        """An answer that came after we gave up still times its transfer: a rate sample from a slow link."""
        sent = self._late.pop(request_id, None)
        if sent is None:
            return
        nbytes, sent_at = sent
        sample = (nbytes, now - sent_at - edge_s)
        measured, expires = self._measured, self._cap_expires
        self.set(self._estimate.with_transfer(*sample))
        if measured is not None:
            # the timeout cap still holds, and what returns when it expires learns the sample too: otherwise a
            # device whose plans stay local (no more samples) would keep this one estimate for good
            self._measured, self._cap_expires = measured.with_transfer(*sample), expires
        log.info("late_answer", request_id=request_id, bandwidth_bps=round(self._estimate.bandwidth_bps))

    async def probe(self, edge_id: str, round_trip: RoundTrip, backlog: int) -> bandwidth.LinkEstimate | None:
        """Time probes of two (or more) sizes through ``round_trip``; update and return the estimate (None if a
        probe went unanswered, the uplink was busy, or the pair was too close in time to tell a rate)."""
        if backlog > PROBE_IDLE_BYTES:
            # a probe behind our own queued bytes times the queue, and adds to it: wait for an idle uplink
            log.info("probe_deferred", edge_id=edge_id, uplink_backlog_bytes=backlog)
            return None
        samples = []
        # the sizes twice, back to back: the first round drains any burst allowance the link saved up while
        # idle (a token bucket lets a probe smaller than its burst through at line rate), the second is timed
        for size in (*self._sizes[:-1], self._probe_bytes) * 2:
            start = time.monotonic()
            try:
                sent = await round_trip(size)
            except TimeoutError:  # evidence too: the link may be slower than this probe needed; probe smaller
                self._cap(8.0 * size / PROBE_TIMEOUT_S, time.monotonic())
                self._probe_bytes = max(self._sizes[-1], self._probe_bytes // 4)
                return None
            samples.append((sent, time.monotonic() - start))
        samples = samples[len(samples) // 2:]
        if samples[-1][1] - samples[0][1] < PROBE_MIN_SIGNAL_S:
            # the large probe's extra bytes took less than the device's timing jitter: no rate, but a floor
            # (they crossed in under PROBE_MIN_SIGNAL_S). An estimate below it is stale (a cap left by a
            # timeout on a clogged link): raise it. Probe larger next time.
            floor = 8.0 * (samples[-1][0] - samples[0][0]) / PROBE_MIN_SIGNAL_S
            if floor > self._estimate.bandwidth_bps:
                self.set(replace(self._estimate, bandwidth_bps=floor, probed_bps=floor))
                log.info("link_floor_raised", edge_id=edge_id, bandwidth_bps=round(floor))
            self._probe_bytes = min(PROBE_MAX_BYTES, self._probe_bytes * 4)
            return None
        estimate = bandwidth.from_probes(samples)
        # the probes drained the link: its rate and per-message cost; what passive transfers learned stays
        self.set(replace(estimate, samples=self._estimate.samples + len(samples), recent=self._estimate.recent,
                         free_bytes=self._estimate.free_bytes))
        # next time, the large probe takes ~PROBE_TARGET_S at this rate
        self._probe_bytes = min(PROBE_MAX_BYTES, max(self._sizes[-1], int(estimate.bandwidth_bps / 8 * PROBE_TARGET_S)))
        log.info("link_probed", edge_id=edge_id, bandwidth_bps=round(estimate.bandwidth_bps), rtt_s=estimate.rtt_s)
        return self._estimate

    def _cap(self, bound_bps: float, now: float) -> None:
        if bound_bps >= self._estimate.bandwidth_bps:
            return
        measured = self._measured or self._estimate
        self.set(replace(self._estimate, bandwidth_bps=bound_bps))
        self._measured, self._cap_expires = measured, now + CAP_HOLD_S
