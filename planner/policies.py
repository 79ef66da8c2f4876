"""Every planning policy by name: the one place deviced, ``coinfer plan`` and the experiments choose from.

Adding a policy is a module under ``planner/`` with a class that implements ``planner.core.Planner`` and
one line here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from planner import baselines, edgent, lyapunov, mincut
from planner.core import Planner
from planner.errors import PlannerError

DEFAULT = "edgent"
POLICIES: dict[str, Callable[..., Planner]] = {
    "edgent": edgent.Edgent,
    **{name: functools.partial(baselines.Baseline, name) for name in baselines.BASELINES},
    "fixed": baselines.Fixed,  # parameters: exit, cut, encoding
    "mincut": mincut.MinCut,
    "lyapunov": lyapunov.Lyapunov,  # parameters: v, slot, latency_target, min_throughput, profile, exit
}


def make(name: str, **params: Any) -> Planner:
    """A new instance of policy ``name`` (``params`` are its own, e.g. ``fixed``'s exit and cut)."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise PlannerError(f"unknown planning policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
    try:
        return factory(**params)
    except TypeError as exc:
        raise PlannerError(f"policy {name!r}: {exc}") from exc
