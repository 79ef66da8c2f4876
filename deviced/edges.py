"""What a device knows of the edge servers: their retained status and adverts, and which one to use."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from planner import edgent
from planner.core import Candidates, ExitInfo
from planner.errors import PlannerError
from planner.latency import LatencyModel, SpeedFactor
from protocol import PROTOCOL_VERSION
from protocol.messages import Advert, Status

log = structlog.get_logger()
Compile = Callable[[Sequence[ExitInfo], LatencyModel, LatencyModel], Candidates]
SUSPECT_S = 5.0
# A short deadline makes the device stop waiting early, so one unanswered request says little about the
# edge; this many in a row with nothing heard from it in between does.
SUSPECT_AFTER = 3


@dataclass(slots=True)
class EdgeView:
    edge_id: str
    online: bool = False
    advert: Advert | None = None
    candidates: Candidates | None = None  # our exits costed with this edge's latency model
    model_key: str = ""
    suspect_until: float = 0.0  # a request timed out: avoid this edge until then
    unanswered: int = 0  # requests in a row that timed out with nothing heard from the edge
    queue_depth: int = 0  # the advert's, less our requests answered since
    speed: SpeedFactor = field(default_factory=SpeedFactor)  # its compute times vs its advertised model

    @property
    def queue_wait_s(self) -> float:
        """Expected wait in this edge's queue before our request is served."""
        if self.advert is None:
            return 0.0
        return self.queue_depth * self.advert.service_s / self.advert.workers


class EdgeDirectory:
    """Edges by id; ``choose`` returns a usable one (online, right protocol, serves our bundle)."""

    def __init__(self, *, digest: str, exits: Sequence[ExitInfo], device_model: LatencyModel,
                 compile: Compile = edgent.compile_candidates, wanted: str = "") -> None:
        self.digest = digest
        self.exits = exits
        self.compile = compile  # the policy's: what it prepares per edge latency model
        self.device_model = device_model
        self.wanted = wanted
        self.edges: dict[str, EdgeView] = {}

    def on_status(self, edge_id: str, status: Status) -> None:
        view = self.edges.setdefault(edge_id, EdgeView(edge_id))
        if view.online != (status.state == "online"):
            log.info("edge_status", edge_id=edge_id, state=status.state)
        view.online = status.state == "online"
        view.suspect_until = 0.0

    def on_advert(self, edge_id: str, advert: Advert) -> None:
        view = self.edges.setdefault(edge_id, EdgeView(edge_id))
        view.advert, view.queue_depth = advert, advert.queue_depth
        key = json.dumps(advert.latency_model, sort_keys=True)
        if key != view.model_key:
            try:
                edge_model = LatencyModel.from_json(advert.latency_model)
                view.candidates = self.compile(self.exits, self.device_model, edge_model)
                view.model_key, view.speed = key, SpeedFactor()  # a new model: its own speed is unknown
            except PlannerError as exc:
                view.candidates = None
                log.warning("edge_advert_unusable", edge_id=edge_id, error=str(exc))

    def usable(self, view: EdgeView, now: float) -> bool:
        return (view.online and now >= view.suspect_until and view.advert is not None and view.candidates is not None
                and view.advert.protocol == PROTOCOL_VERSION and self.digest in view.advert.bundles
                and (not self.wanted or view.edge_id == self.wanted))

    def choose(self, now: float) -> EdgeView | None:
        """The usable edge with the shortest expected queue at monotonic time ``now``, or None."""
        usable = [v for v in self.edges.values() if self.usable(v, now)]
        return min(usable, key=lambda v: (v.queue_wait_s, v.edge_id)) if usable else None

    def on_timeout(self, edge_id: str, now: float) -> None:
        """A request to ``edge_id`` went unanswered in time; after ``SUSPECT_AFTER`` in a row with nothing
        heard from it, prefer others (or the device) for ``SUSPECT_S``."""
        view = self.edges.get(edge_id)
        if view is None:
            return
        view.unanswered += 1
        if view.unanswered >= SUSPECT_AFTER:
            view.suspect_until, view.unanswered = now + SUSPECT_S, 0
            log.warning("edge_suspect", edge_id=edge_id, for_s=SUSPECT_S)

    def served(self, edge_id: str) -> None:
        """``edge_id`` answered one of our requests: it has left the queue the last advert may have counted
        (a device sending its next request at once would otherwise wait behind its previous one)."""
        view = self.edges.get(edge_id)
        if view is not None:
            view.queue_depth = max(view.queue_depth - 1, 0)

    def heard_from(self, edge_id: str) -> None:
        """Any reply from ``edge_id``, even one too late to use: it is alive."""
        view = self.edges.get(edge_id)
        if view is not None:
            view.unanswered = 0
