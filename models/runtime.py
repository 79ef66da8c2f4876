"""Run the parts of a bundle's exits with onnxruntime: one session per segment, built on first use, cached.

A segment (``planner.core.Segment``) runs an exit from a set of input tensors to a set of output tensors: a
device's head, an edge's tail, the whole exit and a pipeline's middle stage are the same thing.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from models import graph
from models.bundle import Bundle
from models.errors import ModelError
from models.ort import onnxruntime as ort
from models.profile import session_options
from planner.core import Segment

MAX_STAGES = 256  # sessions kept per runner: any valid tensor set makes a segment, so the cache is bounded


class StageInputError(ModelError):
    """The tensors handed to a stage do not match its inputs (names, dtype or shape)."""


@dataclass(frozen=True, slots=True)
class Stage:
    """One runnable segment: its session, its inputs' names and shapes, its outputs, and how many of its exit's
    layers run before it (``skipped``: 0 for a head, the head's size for a tail)."""

    session: ort.InferenceSession
    inputs: dict[str, list[int]]
    outputs: tuple[str, ...]
    skipped: int

    def run(self, feed: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        """Validate ``feed`` against the stage's inputs, then run it."""
        if set(feed) != set(self.inputs):
            raise StageInputError(f"stage needs tensors {sorted(self.inputs)}, got {sorted(feed)}")
        for name, shape in self.inputs.items():
            value = feed[name]
            if value.dtype != np.float32 or list(value.shape) != shape:
                raise StageInputError(f"tensor {name!r}: expected float32 {shape}, got {value.dtype} "
                                      f"{list(value.shape)}")
        return dict(zip(self.outputs, self.session.run(list(self.outputs), dict(feed)), strict=True))


class StageRunner:
    """Stages of one bundle's exits by segment; thread-safe, sessions built on first use."""

    def __init__(self, bundle: Bundle, *, threads: int = 1) -> None:
        self.bundle = bundle
        self.threads = threads
        self._stages: OrderedDict[Segment, Stage] = OrderedDict()
        self._exit_models: dict[int, Any] = {}
        self._lock = threading.Lock()

    def stage(self, segment: Segment) -> Stage:
        """The stage computing ``segment``; ``CutError`` / ``BundleError`` when it is not one of this bundle."""
        with self._lock:
            found = self._stages.get(segment)
            if found is None:
                found = self._stages[segment] = self._build(segment)
                while len(self._stages) > MAX_STAGES:
                    self._stages.popitem(last=False)
            else:
                self._stages.move_to_end(segment)
            return found

    def cached(self, segment: Segment) -> Stage | None:
        """The stage of ``segment`` if it is built already (no session is built here)."""
        with self._lock:
            return self._stages.get(segment)

    def whole(self, exit_index: int) -> Segment:
        """The segment of exit ``exit_index`` from the model's input to its output."""
        info = self.bundle.exit(exit_index)
        return Segment(exit_index, frozenset({info.input}), frozenset({info.output}))

    def warm(self, segments: Iterable[Segment]) -> None:
        """Build these stages now, so that their first request does not wait for them."""
        for segment in segments:
            self.stage(segment)

    @property
    def built(self) -> frozenset[Segment]:
        """The segments built (and still cached)."""
        with self._lock:
            return frozenset(self._stages)

    def _build(self, segment: Segment) -> Stage:
        info = self.bundle.exit(segment.exit)
        if segment.exit not in self._exit_models:
            self._exit_models[segment.exit] = self.bundle.exit_model(segment.exit)
        model = self._exit_models[segment.exit]
        part = model if segment == self.whole(segment.exit) else graph.segment(model, segment.inputs, segment.outputs)
        session = ort.InferenceSession(part.SerializeToString(), session_options(self.threads),
                                       providers=["CPUExecutionProvider"])
        skipped = len(info.layers) - len(part.graph.node) if segment.outputs == {info.output} else 0
        return Stage(session=session, inputs={i.name: list(i.shape) for i in session.get_inputs()},
                     outputs=tuple(o.name for o in session.get_outputs()), skipped=skipped)
