"""Every planning policy by name: the one place deviced, ``coinfer plan`` and the experiments choose from.

Adding a policy is a module under ``planner/`` with a class that implements ``planner.core.Planner`` and
one line here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from planner import baselines, edgent, lyapunov, mincut
from planner.core import ExitInfo, Planner
from planner.errors import PlannerError

AUTO = "auto"  # the min-cut for a DAG model (it equals Edgent's search on a chain), Edgent's for a chain
DEFAULT = AUTO
POLICIES: dict[str, Callable[..., Planner]] = {
    "edgent": edgent.Edgent,
    **{name: functools.partial(baselines.Baseline, name) for name in baselines.BASELINES},
    "fixed": baselines.Fixed,  # parameters: exit, cut, encoding
    "mincut": mincut.MinCut,
    "lyapunov": lyapunov.Lyapunov,  # parameters: v, slot, latency_target, min_throughput, profile, exit
}


def resolve(name: str, exits: Sequence[ExitInfo]) -> str:
    """``name``, or for ``auto`` the policy for these exits: ``mincut`` when any is a DAG, else ``edgent``."""
    if name != AUTO:
        return name
    return "edgent" if all(ex.is_chain for ex in exits) else "mincut"


def make(name: str, exits: Sequence[ExitInfo] = (), **params: Any) -> Planner:
    """A new instance of policy ``name`` (``auto``: chosen for ``exits``; ``params`` are the policy's own, e.g.
    ``fixed``'s exit and cut)."""
    name = resolve(name, exits)
    try:
        factory = POLICIES[name]
    except KeyError:
        raise PlannerError(f"unknown planning policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
    try:
        return factory(**params)
    except TypeError as exc:
        raise PlannerError(f"policy {name!r}: {exc}") from exc
