"""What a device knows of the edge servers: their retained status and adverts, and which one to use."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import structlog

from deviced.inbound import Inbound
from planner.core import ExitInfo, Planner, Prepared
from planner.errors import PlannerError
from planner.latency import LatencyModel, SpeedFactor
from protocol import PROTOCOL_VERSION
from protocol.messages import Advert, Status

log = structlog.get_logger()
SUSPECT_S = 5.0
OVERRIDES_KEPT = 8  # policies other than the configured one (a request's override) whose preparation is kept
# A short deadline makes the device stop waiting early, so one unanswered request says little about the
# edge; this many in a row with nothing heard from it in between does.
SUSPECT_AFTER = 3


@dataclass(slots=True)
class EdgeView:
    edge_id: str
    online: bool = False
    advert: Advert | None = None
    model: LatencyModel | None = None  # its advertised latency model
    prepared: Prepared | None = None  # what the configured policy prepared for it
    overrides: dict[Planner, Prepared] = field(default_factory=dict)  # what other policies prepared for it
    model_key: str = ""
    pending_key: str = ""  # a newer latency model being prepared off the loop (the current one serves meanwhile)
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

    def __init__(self, *, digest: str, exits: Sequence[ExitInfo], device_model: LatencyModel, policy: Planner,
                 wanted: str = "") -> None:
        self.digest = digest
        self.exits = exits
        self.policy = policy  # the configured one: it prepares for every edge latency model as it arrives
        self.device_model = device_model
        self.wanted = wanted
        self.edges: dict[str, EdgeView] = {}
        # an edge's new latency model is prepared here, never on the event loop (a min-cut over a DAG of hundreds
        # of layers takes long enough to stall every other message); one at a time, leaving the loop a core
        self._preparing: ThreadPoolExecutor | None = None

    def on_status(self, inbound: Inbound) -> None:
        edge_id, status = inbound.sender, inbound.message
        assert isinstance(status, Status)
        view = self.edges.setdefault(edge_id, EdgeView(edge_id))
        if view.online != (status.state == "online"):
            log.info("edge_status", edge_id=edge_id, state=status.state)
        view.online = status.state == "online"
        view.suspect_until = 0.0

    def on_advert(self, inbound: Inbound) -> None:
        edge_id, advert = inbound.sender, inbound.message
        assert isinstance(advert, Advert)
        view = self.edges.setdefault(edge_id, EdgeView(edge_id))
        view.advert, view.queue_depth = advert, advert.queue_depth
        key = json.dumps(advert.latency_model, sort_keys=True)
        if key in (view.model_key, view.pending_key):
            return
        try:
            model = LatencyModel.from_json(advert.latency_model)
        except PlannerError as exc:
            self._unusable(view, exc)
            return
        view.pending_key = key
        started = time.monotonic()
        if self._preparing is None:
            self._preparing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coinfer-prepare")
        job = self._preparing.submit(self.policy.compile, self.exits, self.device_model, model)
        loop = asyncio.get_running_loop()
        def finished(done: Future[Prepared]) -> None:  # in the worker: hand the result to the loop
            if not done.cancelled() and not loop.is_closed():
                loop.call_soon_threadsafe(self._install, view, key, model, done, started)

        job.add_done_callback(finished)

    def _install(self, view: EdgeView, key: str, model: LatencyModel, job: Future[Prepared], started: float) -> None:
        """On the loop: what the worker prepared for ``key``, unless a newer advert superseded it."""
        if view.pending_key != key:
            return
        view.pending_key = ""
        try:
            prepared = job.result()
        except PlannerError as exc:
            self._unusable(view, exc)
            return
        view.overrides.clear()
        view.model, view.prepared = model, prepared
        view.model_key, view.speed = key, SpeedFactor()  # a new model: its own speed is unknown
        log.info("edge_prepared", edge_id=view.edge_id, seconds=round(time.monotonic() - started, 3),
                 candidates=int(prepared.candidates.exit.size))

    @staticmethod
    def _unusable(view: EdgeView, exc: PlannerError) -> None:
        view.model = view.prepared = None
        view.model_key = view.pending_key = ""
        view.overrides.clear()
        log.warning("edge_advert_unusable", edge_id=view.edge_id, error=str(exc))

    def close(self) -> None:
        """Stop preparing (a preparation under way is abandoned; a later advert starts a new worker)."""
        if self._preparing is not None:
            self._preparing.shutdown(wait=False, cancel_futures=True)
            self._preparing = None
        for view in self.edges.values():
            view.pending_key = ""

    def prepared(self, view: EdgeView, policy: Planner) -> Prepared | None:
        """What ``policy`` prepared for ``view``'s latency model (prepared now for a policy other than the
        configured one, and kept for its next request); None while the edge has no usable model."""
        if view.model is None or view.prepared is None:
            return None
        if policy is self.policy:
            return view.prepared
        if policy not in view.overrides:
            while len(view.overrides) >= OVERRIDES_KEPT:
                del view.overrides[next(iter(view.overrides))]
            view.overrides[policy] = policy.compile(self.exits, self.device_model, view.model)
        return view.overrides[policy]

    def usable(self, view: EdgeView, now: float) -> bool:
        return (view.online and now >= view.suspect_until and view.advert is not None and view.prepared is not None
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
