"""Run the parts of a bundle's exits with onnxruntime: sessions per (exit, cut, part), lazily cached."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from models import graph
from models.bundle import Bundle
from models.errors import CutError, ModelError
from models.profile import session_options

HEAD, TAIL = "head", "tail"


class StageInputError(ModelError):
    """The tensors handed to a stage do not match its inputs (names, dtype or shape)."""


@dataclass(frozen=True, slots=True)
class Stage:
    """One runnable part: its session and the names and shapes of its inputs and outputs."""

    session: ort.InferenceSession
    inputs: dict[str, list[int]]
    outputs: tuple[str, ...]

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
    """Head and tail stages of every (exit, cut) of one bundle; thread-safe, sessions built on first use."""

    def __init__(self, bundle: Bundle, *, threads: int = 1) -> None:
        self.bundle = bundle
        self.threads = threads
        self._stages: dict[tuple[int, int, str], Stage] = {}
        self._exit_models: dict[int, Any] = {}
        self._lock = threading.Lock()

    def stage(self, exit_index: int, cut: int, part: str) -> Stage:
        """The ``head`` (layers [0, cut)) or ``tail`` (layers [cut, N)) of exit ``exit_index``."""
        key = (exit_index, cut, part)
        with self._lock:
            found = self._stages.get(key)
            if found is None:
                found = self._stages[key] = self._build(exit_index, cut, part)
            return found

    def warm(self, keys: Iterable[tuple[int, int, str]]) -> None:
        """Build the stages ``(exit, cut, part)`` now, so that their first request does not wait for them."""
        for key in keys:
            self.stage(*key)

    @property
    def built(self) -> frozenset[tuple[int, int, str]]:
        """The (exit, cut, part) stages built so far."""
        with self._lock:
            return frozenset(self._stages)

    def cut_tensors(self, exit_index: int, cut: int) -> tuple[str, ...]:
        """Names of the tensors crossing at ``cut`` of an exit (the input name at cut 0)."""
        info = self.bundle.exit(exit_index)
        if cut == 0:
            return (self.bundle.input_name,)
        for c in info.cuts:
            if c.index == cut:
                return tuple(sorted(c.tensors))
        raise CutError(f"exit {exit_index} has no cut after {cut} layers (valid: 0..{len(info.layers)})")

    def _build(self, exit_index: int, cut: int, part: str) -> Stage:
        info = self.bundle.exit(exit_index)
        n = len(info.layers)
        if exit_index not in self._exit_models:
            self._exit_models[exit_index] = self.bundle.exit_model(exit_index)
        model = self._exit_models[exit_index]
        if (part == HEAD and cut == n) or (part == TAIL and cut == 0):
            pass  # the whole exit
        elif 0 < cut < n:
            head, tail = graph.split(model, self.cut_tensors(exit_index, cut))
            model = head if part == HEAD else tail
        else:
            raise CutError(f"no {part} for exit {exit_index} at cut {cut} (valid: 0..{n})")
        session = ort.InferenceSession(model.SerializeToString(), session_options(self.threads),
                                       providers=["CPUExecutionProvider"])
        return Stage(session=session, inputs={i.name: list(i.shape) for i in session.get_inputs()},
                     outputs=tuple(o.name for o in session.get_outputs()))
