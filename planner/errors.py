"""Exceptions raised by the planner, and the one check of a document's keys they share."""

from collections.abc import Iterable, Mapping
from typing import Any


class PlannerError(Exception):
    """Root of every error raised by ``planner``."""


class UnitError(PlannerError, ValueError):
    """A quantity has a missing or unknown unit, or is not a positive number."""


class LatencyModelError(PlannerError, ValueError):
    """A latency model document is malformed or cannot predict a layer type."""


def reject_unknown(doc: Mapping[str, Any], allowed: Iterable[str], where: str,
                   error: type[PlannerError] = PlannerError) -> None:
    """Raise ``error`` naming the keys of ``doc`` that are not ``allowed``."""
    allowed = set(allowed)
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise error(f"{where}: unknown field(s) {', '.join(unknown)}; expected {', '.join(sorted(allowed))}")
