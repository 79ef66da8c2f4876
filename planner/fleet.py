"""The pipeline planner's problem: a fleet of workers and a model as a chain of blocks.

A *worker* is a host that can run a pipeline stage: a latency model (scaled by ``speed``), cores, memory for
coinfer and its links to the broker. A *fleet* adds the *source*, the worker whose camera makes the frames
and to which results return. A *chain* is one exit of a model as a sequence of blocks (its layers in
execution order) and, at every boundary, the tensors that cross there: in a DAG every prefix of the
execution order is a closed cut, so a boundary may cross several tensors (a residual's skip and its
branch), and their bytes are summed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from planner import units
from planner.core import ExitInfo, LayerInfo
from planner.errors import PlannerError, reject_unknown
from planner.latency import LatencyModel

# Share of a stage's compute that speeds up with more threads (Amdahl), unless the fleet file says otherwise;
# onnxruntime's convolutions scale to about 3.1x on a Pi 4's four cores (0.9 gives 3.08x).
PARALLEL_FRACTION = 0.9
# A hand-off between stages of one host (the embedded case) goes through the local broker: about 1 MB in
# 3.6 ms on coinfer's MQTT path (``coinfer bench transport``, loopback), i.e. ~2.2 Gbit/s.
LOOPBACK_BPS = 2.2e9
PER_MESSAGE_S = 0.5e-3  # the broker's store-and-forward cost per message, added per hop to a frame's latency
MAX_GROUP = 4  # most workers serving one stage together (replicas or a split)
FLEET_KEYS = {"source", "per_message", "max_group", "workers"}
WORKER_KEYS = {"name", "latency_model", "speed", "cores", "memory", "uplink", "downlink", "parallel_fraction",
               "loopback", "edge"}
WORKER_REQUIRED = {"name", "latency_model", "memory", "uplink", "downlink"}


class PipelineError(PlannerError, ValueError):
    """A fleet or a model the pipeline planner cannot plan: a bad field, or nowhere it fits."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Worker:
    """A host that can run a stage: its latency model divided by ``speed`` is its time using all ``cores``."""

    name: str
    latency: LatencyModel
    memory_bytes: float
    uplink_bps: float
    downlink_bps: float
    speed: float = 1.0
    cores: int = 1
    parallel_fraction: float = PARALLEL_FRACTION
    loopback_bps: float = LOOPBACK_BPS
    edge: bool = False  # an edge server (baselines compare against "the source + the edge")
    # measured corrections per block of the model being planned (1: as the latency model / speed predicts); a
    # stream's controller learns them from the stage times it sees, block range by block range
    block_scale: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise PipelineError("a worker needs a name")
        for field in ("memory_bytes", "uplink_bps", "downlink_bps", "speed", "loopback_bps"):
            if not getattr(self, field) > 0:
                raise PipelineError(f"worker {self.name}: {field} must be positive, not {getattr(self, field)}")
        if self.cores < 1:
            raise PipelineError(f"worker {self.name}: cores must be at least 1")
        if not 0 <= self.parallel_fraction <= 1:
            raise PipelineError(f"worker {self.name}: parallel_fraction must lie in [0, 1]")
        if not all(f > 0 for f in self.block_scale):
            raise PipelineError(f"worker {self.name}: block_scale factors must be positive")

    def amdahl(self, threads: int) -> float:
        """Compute time on ``threads`` of its cores relative to all of them."""
        p = self.parallel_fraction
        return ((1 - p) + p / threads) / ((1 - p) + p / self.cores)


@dataclass(frozen=True, slots=True, kw_only=True)
class Fleet:
    """The workers a stream may use, the one it starts and ends at, and the broker's cost per message."""

    workers: tuple[Worker, ...]
    source: str
    per_message_s: float = PER_MESSAGE_S
    max_group: int = MAX_GROUP

    def __post_init__(self) -> None:
        names = [w.name for w in self.workers]
        if not names:
            raise PipelineError("a fleet needs at least one worker")
        if len(set(names)) != len(names):
            raise PipelineError(f"worker names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}")
        if self.source not in names:
            raise PipelineError(f"the source {self.source!r} is not one of the workers {names}")
        if self.per_message_s < 0 or self.max_group < 1:
            raise PipelineError("per_message must be >= 0 and max_group >= 1")

    @property
    def source_index(self) -> int:
        return [w.name for w in self.workers].index(self.source)

    def subset(self, names: list[str] | tuple[str, ...]) -> Fleet:
        """The same fleet restricted to ``names`` (which must include the source)."""
        keep = tuple(w for w in self.workers if w.name in names)
        return Fleet(workers=keep, source=self.source, per_message_s=self.per_message_s, max_group=self.max_group)


@dataclass(frozen=True, slots=True, kw_only=True)
class Chain:
    """One exit as blocks: ``boundary_bytes[i]`` cross after the first ``i`` blocks (0: the input; n: the result)."""

    name: str
    blocks: tuple[LayerInfo, ...]
    boundary_bytes: tuple[float, ...]
    boundary_tensors: tuple[frozenset[str], ...]
    weight_bytes: tuple[float, ...]
    work_bytes: tuple[float, ...]  # a block's input + output activations: its working memory

    def __post_init__(self) -> None:
        n = len(self.blocks)
        if n == 0:
            raise PipelineError("a chain needs at least one block")
        if not len(self.boundary_bytes) == len(self.boundary_tensors) == n + 1:
            raise PipelineError("a chain of n blocks has n + 1 boundaries")
        if not len(self.weight_bytes) == len(self.work_bytes) == n:
            raise PipelineError("weights and working memory are per block")

    @property
    def n(self) -> int:
        return len(self.blocks)


def chain_from_exit(ex: ExitInfo, name: str = "") -> Chain:
    """The chain of one exit: every boundary of its execution order, with the tensors live across it."""
    layers = ex.layers
    size: dict[str, float] = {ex.input: float(ex.input_bytes)}
    produced_at: dict[str, int] = {ex.input: 0}
    last_read: dict[str, int] = {}
    for i, lay in enumerate(layers):
        outs = lay.outputs or (lay.name,)
        for t in outs:
            size[t] = float(lay.features.get("output_bytes", 0.0)) / len(outs)
            produced_at[t] = i + 1
        for t in lay.inputs or ((layers[i - 1].outputs or (layers[i - 1].name,))[0] if i else ex.input,):
            last_read[t] = i
    out = ex.output if ex.output in size else (layers[-1].outputs or (layers[-1].name,))[0]
    last_read[out] = len(layers)  # the result leaves the last stage
    tensors, nbytes = [], []
    for b in range(len(layers) + 1):
        live = frozenset(t for t, p in produced_at.items() if p <= b and last_read.get(t, -1) >= b)
        tensors.append(live)
        nbytes.append(float(sum(size[t] for t in live)))
    nbytes[-1] = float(ex.result_bytes)
    return Chain(name=name or f"exit{ex.index}", blocks=layers, boundary_bytes=tuple(nbytes),
                 boundary_tensors=tuple(tensors),
                 weight_bytes=tuple(float(lay.features.get("param_bytes", 0.0)) for lay in layers),
                 work_bytes=tuple(float(lay.features.get("input_bytes", 0.0) + lay.features.get("output_bytes", 0.0))
                                  for lay in layers))


def fleet_from_doc(doc: Mapping[str, Any], latency_models: Mapping[str, LatencyModel]) -> Fleet:
    """A fleet from a parsed fleet file (``workers.toml``); ``latency_models`` resolves each worker's model name."""
    reject_unknown(doc, FLEET_KEYS, "the fleet", PipelineError)
    raw = doc.get("workers")
    if not isinstance(raw, list) or not raw:
        raise PipelineError("the fleet lists no [[workers]]")
    workers = []
    for i, w in enumerate(raw):
        where = f"worker {w.get('name', i + 1) if isinstance(w, Mapping) else i + 1}"
        if not isinstance(w, Mapping):
            raise PipelineError(f"{where}: expected a table")
        reject_unknown(w, WORKER_KEYS, where, PipelineError)
        missing = WORKER_REQUIRED - set(w)
        if missing:
            raise PipelineError(f"{where}: missing {', '.join(sorted(missing))}")
        try:
            model = latency_models[str(w["latency_model"])]
            workers.append(Worker(
                name=str(w["name"]), latency=model, speed=_number(w.get("speed", 1.0), where, "speed"),
                cores=int(w.get("cores", 1)), memory_bytes=units.parse_bytes(str(w["memory"])),
                uplink_bps=units.parse_bandwidth(str(w["uplink"])),
                downlink_bps=units.parse_bandwidth(str(w["downlink"])),
                parallel_fraction=_number(w.get("parallel_fraction", PARALLEL_FRACTION), where, "parallel_fraction"),
                loopback_bps=units.parse_bandwidth(str(w["loopback"])) if "loopback" in w else LOOPBACK_BPS,
                edge=bool(w.get("edge", False))))
        except KeyError as exc:
            raise PipelineError(f"{where}: unknown latency model {w['latency_model']!r}") from exc
        except PlannerError as exc:
            raise PipelineError(f"{where}: {exc}") from exc
    source = doc.get("source", workers[0].name)
    per_message = units.parse_duration(str(doc["per_message"])) if "per_message" in doc else PER_MESSAGE_S
    return Fleet(workers=tuple(workers), source=str(source), per_message_s=per_message,
                 max_group=int(doc.get("max_group", MAX_GROUP)))


def _number(value: Any, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PipelineError(f"{where}: {key} must be a number, not {value!r}")
    return float(value)

