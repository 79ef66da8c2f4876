"""What the device learns from its own requests: its speed against its latency model, and plan margins."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from deviced.metrics import DeviceMetrics
from planner.core import Where
from planner.latency import Margin, SpeedFactor


class Calibration:
    """The device's speed factor and the margins it plans with, each moved only by what was measured."""

    def __init__(self, plan_quantile: float, metrics: DeviceMetrics) -> None:
        self._quantile = plan_quantile
        self._metrics = metrics
        self._speed = SpeedFactor()  # this device's stage times against its latency model, learned online
        # how far requests ran over their predictions: the device's part, and the rest (link and edge)
        self._device_margin = Margin(plan_quantile, relative=False)  # seconds: CPU time comes in slices
        self._remote_margin = Margin(plan_quantile)  # a factor: a link's errors grow with the bytes
        self._suspended = False

    @property
    def device_speed(self) -> SpeedFactor:
        return self._speed

    @property
    def device_margin(self) -> Margin:
        return self._device_margin

    @property
    def remote_margin(self) -> Margin:
        return self._remote_margin

    def device_stage(self, took_s: float, modelled_s: float) -> None:
        """A device stage took ``took_s`` where the latency model says ``modelled_s``."""
        self._speed = self._speed.update(took_s, modelled_s)
        self._metrics.speed.labels("device").set(self._speed.value)

    def outcome(self, *, where: str, fallback: str | None, latency_s: float, stage_s: float, predicted_s: float,
                predicted_device_s: float) -> None:
        """Fold how far one request ran over its prediction into the margins, part by part.

        A device plan teaches the device margin; an edge answer the remote one; a split plan both; a timeout
        fallback the remote one (the time waited, a lower bound). Any other fallback (the broker gone, an
        error reply) says nothing about either.
        """
        if self._suspended:
            return
        if where == Where.DEVICE:  # all of it on the device, from arrival to answer
            self._device_margin = self._device_margin.update(latency_s, predicted_s)
        elif where in (Where.EDGE, Where.SPLIT) or fallback == "timeout":
            if where == Where.SPLIT:
                self._device_margin = self._device_margin.update(stage_s, predicted_device_s)
            self._remote_margin = self._remote_margin.update(latency_s - stage_s, predicted_s - predicted_device_s)
        self._metrics.device_margin.set(self._device_margin.value)
        self._metrics.remote_margin.set(self._remote_margin.value)

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Meanwhile plan on the point prediction (no margins) and learn no margin: Edgent's own rule."""
        saved = self._device_margin, self._remote_margin, self._suspended
        self._device_margin, self._remote_margin = Margin(0.0, relative=False), Margin(0.0)
        self._suspended = True
        try:
            yield
        finally:
            self._device_margin, self._remote_margin, self._suspended = saved
