"""Applying a policy's ``Actuation`` to the real device: its compute setting and its uplink's transmit rate.

Compute: the CPU share maps to what Linux offers, found once at start-up, in this order:

- ``cpufreq``: ``scaling_max_freq`` of every cpufreq policy, set to the share of ``cpuinfo_max_freq`` (rounded to
  an available frequency), where the files are writable (a Pi with its governor's limits, as root);
- ``cgroup``: this process's own cgroup's CPU quota (``cpu.max`` under cgroup v2, ``cpu.cfs_quota_us`` under v1)
  set to the share of the quota it had at start-up (or of all CPUs when it had none): what the testbed emulates;
- ``none``: the share is not applied (reported; the plan still assumed it).

Transmit rate: ``SO_MAX_PACING_RATE`` on the MQTT connection's socket (no root needed; TCP paces internally).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import structlog

from planner.core import Actuation

log = structlog.get_logger()
SO_MAX_PACING_RATE = getattr(socket, "SO_MAX_PACING_RATE", 47)  # Linux
CGROUP_ROOT = Path("/sys/fs/cgroup")
CPUFREQ_ROOT = Path("/sys/devices/system/cpu/cpufreq")
PERIOD_US = 100_000  # the CFS period written with a quota where none was set
MIN_QUOTA_US, MAX_PERIOD_US = 1000, 1_000_000  # the kernel's bounds on a CFS quota and period
MODES = ("auto", "cpufreq", "cgroup", "none")
# The pacing rate never goes below this: the MQTT connection carries keepalives, probes and answers too, and a
# socket paced at a few hundred bytes a second (a policy's share of a collapsed estimate) stalls all of them.
MIN_PACING_BPS = 64e3


class ComputeKnob(StrEnum):
    CPUFREQ = "cpufreq"
    CGROUP = "cgroup"
    NONE = "none"


@dataclass(slots=True)
class Actuator:
    """Finds the compute knob at start-up and applies shares and rates, only when they change."""

    mode: str = "auto"  # auto, cpufreq, cgroup or none: which compute knob may be used
    cgroup_root: Path = CGROUP_ROOT
    cpufreq_root: Path = CPUFREQ_ROOT
    proc_cgroup: Path = Path("/proc/self/cgroup")
    knob: ComputeKnob = ComputeKnob.NONE
    _files: list[tuple[Path, int, list[int]]] = field(default_factory=list)  # (file, full value, allowed values)
    _period: int = PERIOD_US
    _v1: bool = False
    share: float | None = None
    rate_bps: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"compute_knob must be one of {', '.join(MODES)}, not {self.mode!r}")
        found = self.mode in ("auto", "cpufreq") and self._find_cpufreq()
        if not found and self.mode in ("auto", "cgroup"):
            self._find_cgroup()
        log.info("actuation_knobs", compute=self.knob.value, transmit="so_max_pacing_rate")

    def apply(self, actuation: Actuation | None, sock: socket.socket | None) -> None:
        if actuation is None:
            return
        if actuation.cpu_share is not None and actuation.cpu_share != self.share:
            self.set_share(actuation.cpu_share)
        if actuation.tx_rate_bps is not None and actuation.tx_rate_bps != self.rate_bps and sock is not None:
            pace(sock, actuation.tx_rate_bps)
            self.rate_bps = actuation.tx_rate_bps

    def set_share(self, share: float) -> None:
        """Run at ``share`` (0..1] of full compute."""
        share = min(max(share, 0.01), 1.0)
        try:
            if self.knob == ComputeKnob.CPUFREQ:
                for path, full, allowed in self._files:
                    want = share * full
                    value = min((f for f in allowed if f >= want), default=full) if allowed else round(want)
                    path.write_text(f"{value}\n")
            elif self.knob == ComputeKnob.CGROUP:
                path, full, _ = self._files[0]
                quota, period = int(full * share), self._period
                if quota < MIN_QUOTA_US:  # the kernel's floor: stretch the period instead (the same share)
                    period, quota = min(int(period * MIN_QUOTA_US / max(quota, 1)), MAX_PERIOD_US), MIN_QUOTA_US
                if self._v1:
                    (path.parent / "cpu.cfs_period_us").write_text(f"{period}\n")
                    path.write_text(f"{quota}\n")
                else:
                    path.write_text(f"{quota} {period}\n")
        except OSError as exc:
            log.warning("actuation_failed", knob=self.knob.value, share=share, error=str(exc))
            return
        self.share = share

    def restore(self) -> None:
        """Back to full compute (at shutdown)."""
        if self.knob != ComputeKnob.NONE and self.share not in (None, 1.0):
            self.set_share(1.0)

    def _find_cpufreq(self) -> bool:
        for policy in sorted(self.cpufreq_root.glob("policy*")):
            target = policy / "scaling_max_freq"
            try:
                full = int((policy / "cpuinfo_max_freq").read_text())
                allowed_file = policy / "scaling_available_frequencies"
                allowed = sorted(int(f) for f in allowed_file.read_text().split()) if allowed_file.exists() else []
            except (OSError, ValueError):
                continue
            if os.access(target, os.W_OK):
                self._files.append((target, full, allowed))
        if self._files:
            self.knob = ComputeKnob.CPUFREQ
        return bool(self._files)

    def _find_cgroup(self) -> bool:
        try:
            lines = self.proc_cgroup.read_text().splitlines()
        except OSError:
            return False
        for line in lines:
            _, controllers, rel = line.split(":", 2)
            rel = rel.lstrip("/")
            if controllers == "":  # v2
                path = self.cgroup_root / rel / "cpu.max"
                if rel and path.exists() and os.access(path, os.W_OK):
                    max_quota, max_period = path.read_text().split()
                    self._period = int(max_period)
                    full = int(max_quota) if max_quota != "max" else self._period * (os.cpu_count() or 1)
                    self._files.append((path, full, []))
                    self.knob = ComputeKnob.CGROUP
                    return True
            elif "cpu" in controllers.split(","):  # v1
                base = self.cgroup_root / controllers / rel
                path = base / "cpu.cfs_quota_us"
                if rel and path.exists() and os.access(path, os.W_OK):
                    cfs_quota = int(path.read_text())
                    self._period = int((base / "cpu.cfs_period_us").read_text())
                    full = cfs_quota if cfs_quota > 0 else self._period * (os.cpu_count() or 1)
                    self._files.append((path, full, []))
                    self._v1, self.knob = True, ComputeKnob.CGROUP
                    return True
        return False


def pace(sock: socket.socket, rate_bps: float) -> None:
    """Cap the socket's sending rate (``SO_MAX_PACING_RATE``, bytes per second)."""
    sock.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, int(max(rate_bps, MIN_PACING_BPS) / 8))
