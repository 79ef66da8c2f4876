"""The Edgent policy: per request, the exit and the cut that maximise accuracy within the deadline.

Edgent's Algorithm 1 over the exits' listed cuts, costed by ``planner.candidates`` (a handful of vectorised
operations per request); ``Edgent`` is it as a ``planner.core.Planner`` (registered in ``planner.policies``).
"""

from __future__ import annotations

from planner.candidates import Stateless, most_accurate
from planner.core import Candidates, Conditions, Decision, Infeasible, View


def plan(c: Candidates, cond: Conditions) -> Decision | Infeasible:
    """Edgent's Algorithm 1: the most accurate exit whose best cut meets the deadline, at that best cut (the
    fastest predicted of those that meet it, margins included)."""
    chosen = most_accurate(c, cond)
    return chosen if isinstance(chosen, Decision) else Infeasible(chosen.reason)


class Edgent(Stateless):
    """Edgent's search (``plan``). When nothing meets the deadline it still names a plan to run (judged at the
    deadline, so flagged as missing it): the most accurate exit at its fastest cut if that uses the edge, else
    the most accurate exit that fits locally. ``encodings=False``: only plans whose tensors cross as float32."""

    def __init__(self, *, encodings: bool = True) -> None:
        self.encodings = bool(encodings)

    def decide(self, view: View) -> Decision | Infeasible:
        return most_accurate(view.candidates, view.conditions, plain_only=not self.encodings)
