"""Exceptions raised by the planner."""


class PlannerError(Exception):
    """Root of every error raised by ``planner``."""


class UnitError(PlannerError, ValueError):
    """A quantity has a missing or unknown unit, or is not a positive number."""


class LatencyModelError(PlannerError, ValueError):
    """A latency model document is malformed or cannot predict a layer type."""
