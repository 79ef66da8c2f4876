"""Energy of a device: compute power against its compute setting, idle power, and radio power while sending.

There is no energy counter on the machines coinfer is built on (no RAPL, no cpufreq); energy is modelled from a
profile and measured (or predicted) times. Published figures the shipped profiles start from:

- Raspberry Pi power, idle / all cores busy: 3 B 1.4 / 3.7 W, 3 B+ 1.9 / 5.1 W, 4 B 2.7 / 6.4 W (the Raspberry
  Pi Foundation's and independent bench measurements, at the top clock).
- Over the cpufreq range (steps of 100 MHz; 600-1500 MHz on a Pi 4, 600-1200 MHz on a Pi 3) busy power rises
  about linearly with frequency, not with its cube. The line's value at the lowest clock is not in those
  figures: the profiles assume a frame costs 20% less energy above idle at the lowest clock than at the top one
  (the gain of the lower core voltage there), i.e. busy power at the lowest clock f is idle + 0.8 x (busy -
  idle) x f / top. Calibrate it (below).
- Uplink radio power while sending at throughput r: P = alpha * r + beta (Huang et al., MobiSys 2012, measured on
  phones): LTE alpha = 438.39 mW/Mbps, beta = 1288.04 mW; Wi-Fi alpha = 283.17 mW/Mbps, beta = 132.86 mW. After
  the last packet an LTE radio stays connected for a *tail* (same paper: 11.576 s at 1060.04 mW) before it
  sleeps; Wi-Fi's power-save tail is short and not modelled. Under this model sending faster is always cheaper
  per bit (beta is paid per second), and waiting to send frames together saves tail energy.

Calibrating a profile: run a fixed load at each setting (e.g. ``coinfer profile`` in a loop, pinned to the
setting) and read the board's power with a USB power meter on its supply or an INA219/INA226 sensor on the
5 V rail; ``idle_w`` is the reading with coinfer stopped, ``busy_w`` / ``busy_w_min`` the readings at the top
and lowest setting; for the radio, send at several paced rates and fit alpha and beta to the reading minus idle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from planner.errors import PlannerError, reject_unknown

PROFILE_KEYS = {"name", "idle_w", "busy_w", "busy_w_min", "settings", "radio", "radio_alpha_w_per_mbps",
                "radio_beta_w", "radio_tail_s", "radio_tail_w"}
RADIOS = {  # (alpha W per Mbit/s, beta W, tail s, tail W): Huang et al., MobiSys 2012, uplink
    "lte": (0.43839, 1.28804, 11.576, 1.06004),
    "wifi": (0.28317, 0.13286, 0.0, 0.0),
}
LOW_CLOCK_ENERGY = 0.8  # assumed energy of a frame at the lowest clock, relative to the top clock (above idle)


class EnergyError(PlannerError, ValueError):
    """An energy profile is malformed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EnergyProfile:
    """A device's power: idle, busy at each compute setting (a fraction of the top speed), radio while sending."""

    name: str
    idle_w: float
    busy_w: float  # all cores busy at the top setting
    busy_w_min: float  # all cores busy at the lowest setting
    settings: tuple[float, ...]  # compute settings, ascending, as fractions of the top speed (the last is 1)
    radio: str = "wifi"
    radio_alpha_w_per_mbps: float = RADIOS["wifi"][0]
    radio_beta_w: float = RADIOS["wifi"][1]
    radio_tail_s: float = 0.0  # the radio stays up this long after sending, drawing radio_tail_w
    radio_tail_w: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.idle_w <= self.busy_w_min <= self.busy_w:
            raise EnergyError(f"profile {self.name}: need 0 < idle_w <= busy_w_min <= busy_w")
        s = self.settings
        if not s or any(not 0 < x <= 1 for x in s) or list(s) != sorted(set(s)) or s[-1] != 1.0:
            raise EnergyError(f"profile {self.name}: settings must ascend within (0, 1] and end at 1")
        if min(self.radio_alpha_w_per_mbps, self.radio_beta_w, self.radio_tail_s, self.radio_tail_w) < 0:
            raise EnergyError(f"profile {self.name}: radio alpha, beta and tail cannot be negative")

    def busy_power_w(self, setting: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Busy power at ``setting``: linear between the lowest setting and the top one."""
        s = np.asarray(setting, dtype=np.float64)
        lo = self.settings[0]
        if lo == 1.0:
            return np.full_like(s, self.busy_w)
        return self.busy_w_min + (self.busy_w - self.busy_w_min) * (s - lo) / (1.0 - lo)

    def compute_j(self, full_speed_s: npt.ArrayLike, setting: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Energy above idle of work taking ``full_speed_s`` at the top setting, run at ``setting``."""
        s = np.asarray(setting, dtype=np.float64)
        return (self.busy_power_w(s) - self.idle_w) * np.asarray(full_speed_s, dtype=np.float64) / s

    def radio_w(self, rate_bps: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Radio power above idle while sending at ``rate_bps``."""
        return self.radio_alpha_w_per_mbps * np.asarray(rate_bps, dtype=np.float64) / 1e6 + self.radio_beta_w

    def send_j(self, bits: npt.ArrayLike, rate_bps: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Energy above idle of sending ``bits`` at ``rate_bps``."""
        r = np.maximum(np.asarray(rate_bps, dtype=np.float64), 1.0)
        return self.radio_w(r) * np.asarray(bits, dtype=np.float64) / r

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in PROFILE_KEYS} | {"settings": list(self.settings)}


def _pi(name: str, idle: float, busy: float, mhz: range, radio: str) -> EnergyProfile:
    alpha, beta, tail_s, tail_w = RADIOS[radio]
    top = mhz[-1]
    low = mhz[0] / top
    return EnergyProfile(name=name, idle_w=idle, busy_w=busy, busy_w_min=idle + LOW_CLOCK_ENERGY * (busy - idle) * low,
                         settings=tuple(f / top for f in mhz), radio=radio, radio_alpha_w_per_mbps=alpha,
                         radio_beta_w=beta, radio_tail_s=tail_s, radio_tail_w=tail_w)


PROFILES: dict[str, EnergyProfile] = {
    "pi3b-wifi": _pi("pi3b-wifi", 1.4, 3.7, range(600, 1201, 100), "wifi"),
    "pi3b-lte": _pi("pi3b-lte", 1.4, 3.7, range(600, 1201, 100), "lte"),
    "pi3bplus-wifi": _pi("pi3bplus-wifi", 1.9, 5.1, range(600, 1401, 100), "wifi"),
    "pi4b-wifi": _pi("pi4b-wifi", 2.7, 6.4, range(600, 1501, 100), "wifi"),
    "pi4b-lte": _pi("pi4b-lte", 2.7, 6.4, range(600, 1501, 100), "lte"),
}
DEFAULT_PROFILE = "pi3b-lte"


def profile_from_doc(doc: Mapping[str, Any]) -> EnergyProfile:
    """A profile from a document (a profile file's table): ``base`` names a shipped profile to start from."""
    reject_unknown(doc, PROFILE_KEYS | {"base"}, "energy profile", EnergyError)
    base_name = str(doc.get("base", DEFAULT_PROFILE))
    if base_name not in PROFILES:
        raise EnergyError(f"energy profile: unknown base {base_name!r}; expected one of {', '.join(PROFILES)}")
    fields: dict[str, Any] = {k: v for k, v in doc.items() if k != "base"}
    if "radio" in fields:
        if fields["radio"] not in RADIOS:
            raise EnergyError(f"energy profile: radio must be one of {', '.join(RADIOS)}")
        alpha, beta, tail_s, tail_w = RADIOS[fields["radio"]]
        fields.setdefault("radio_alpha_w_per_mbps", alpha)
        fields.setdefault("radio_beta_w", beta)
        fields.setdefault("radio_tail_s", tail_s)
        fields.setdefault("radio_tail_w", tail_w)
    if "settings" in fields:
        fields["settings"] = tuple(float(x) for x in fields["settings"])
    try:
        return replace(PROFILES[base_name], **{"name": f"{base_name}+file", **fields})
    except TypeError as exc:
        raise EnergyError(f"energy profile: {exc}") from exc
