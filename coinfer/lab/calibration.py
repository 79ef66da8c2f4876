"""What calibrating a testbed found, as one typed record (``calibration.json``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.latency import LatencyModel


@dataclass(frozen=True, slots=True, kw_only=True)
class Calibration:
    """Each side's per-layer profile fit, the edge's latency model, and (once its stages are timed) the device's.

    ``profiles``: per side (``edge``, ``device``), the fit's report, its per-layer error and the whole bundle
    predicted vs measured. Until ``device_model`` is set, the device runs on the per-layer fit made inside its CPU
    quota (``naive_device_model_path``)."""

    profiles: dict[str, dict[str, Any]]
    edge_model: LatencyModel
    edge_model_path: Path
    naive_device_model_path: Path
    device_model: LatencyModel | None = None
    device_model_path: Path | None = None
    device_stages: dict[str, Any] | None = None  # the whole-stage fit: slowdown, overhead, quota, errors, stages

    @property
    def device(self) -> LatencyModel:
        """The device's model fitted to whole stages (``RuntimeError`` before the stages were timed)."""
        if self.device_model is None:
            raise RuntimeError("the device's stages are not calibrated yet")
        return self.device_model

    def to_json(self) -> dict[str, Any]:
        return {**self.profiles, "device_stages": self.device_stages}
