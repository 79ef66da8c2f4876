"""Strict parsing of bandwidths (``500kbps``, ``1.5Mbps``), durations (``300ms``, ``1s``) and sizes (``512MB``)."""

from __future__ import annotations

import re

from planner.errors import UnitError

BANDWIDTH_UNITS = {"bps": 1.0, "kbps": 1e3, "Mbps": 1e6, "Gbps": 1e9}
DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
BYTE_UNITS = {"B": 1.0, "kB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 2.0**10, "MiB": 2.0**20, "GiB": 2.0**30}
_QUANTITY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]+)\s*$")


def parse_bandwidth(text: str) -> float:
    """Bandwidth in bits per second; the unit is one of bps, kbps, Mbps, Gbps (case-sensitive)."""
    return _parse(text, BANDWIDTH_UNITS, "bandwidth")


def parse_duration(text: str) -> float:
    """Duration in seconds; the unit is one of us, ms, s."""
    return _parse(text, DURATION_UNITS, "duration")


def parse_bytes(text: str) -> float:
    """A size in bytes; the unit is one of B, kB, MB, GB, KiB, MiB, GiB."""
    return _parse(text, BYTE_UNITS, "size")


def format_bandwidth(bps: float) -> str:
    for unit in ("Gbps", "Mbps", "kbps"):
        if bps >= BANDWIDTH_UNITS[unit]:
            return f"{bps / BANDWIDTH_UNITS[unit]:g}{unit}"
    return f"{bps:g}bps"


def _parse(text: str, units: dict[str, float], what: str) -> float:
    match = _QUANTITY.match(text)
    if match is None or match.group(2) not in units:
        raise UnitError(f"bad {what} {text!r}: expected a number followed by one of {', '.join(units)}")
    value = float(match.group(1)) * units[match.group(2)]
    if value <= 0:
        raise UnitError(f"bad {what} {text!r}: must be positive")
    return value
