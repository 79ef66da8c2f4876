"""Files the tools and daemons are configured with, each read by one function here: latency models (a JSON file,
or a reference name) and fleets (``*.workers.toml``)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from planner import REFERENCE_DIR
from planner.errors import LatencyModelError
from planner.fleet import Fleet, PipelineError, fleet_from_doc
from planner.latency import LatencyModel

# Edgent's Table II regressions (a Raspberry Pi 3 and a desktop), shipped beside the planner
PI3_MODEL = REFERENCE_DIR / "edgent2018-raspberry-pi-3.json"
DESKTOP_MODEL = REFERENCE_DIR / "edgent2018-desktop.json"
REFERENCE_MODELS = {"pi3": PI3_MODEL, "desktop": DESKTOP_MODEL}  # names a fleet file may use


def read_latency_model(path: Path | str) -> dict[str, Any]:
    """The JSON document of a latency-model file (checked: it must load), as edged advertises it."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise LatencyModelError(f"cannot read latency model {path}: {exc}") from exc
    try:
        LatencyModel.from_json(doc)  # a JSON object of the right format, or an error
    except LatencyModelError as exc:
        raise LatencyModelError(f"{path}: {exc}") from exc
    return dict(doc)


def load_latency_model(path: Path | str) -> LatencyModel:
    """A latency model from its JSON file (or a reference name: ``pi3``, ``desktop``); unreadable or malformed
    files raise ``LatencyModelError``."""
    return LatencyModel.from_json(read_latency_model(REFERENCE_MODELS.get(str(path), Path(path))))


def load_fleet(path: Path | str) -> Fleet:
    """A fleet file (TOML, ``*.workers.toml``; ``latency_model`` is ``pi3``, ``desktop`` or a JSON path relative
    to the file); every problem is a ``PipelineError``."""
    try:
        doc = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PipelineError(f"cannot read fleet {path}: {exc}") from exc
    models: dict[str, LatencyModel] = {}
    for w in doc.get("workers", []) if isinstance(doc.get("workers"), list) else []:
        name = str(w.get("latency_model", "")) if isinstance(w, dict) else ""
        ref = REFERENCE_MODELS.get(name) or (Path(path).parent / name)
        if name and name not in models and ref.is_file():
            try:
                models[name] = load_latency_model(ref)
            except LatencyModelError as exc:
                raise PipelineError(f"{path}: latency model {name}: {exc}") from exc
    try:
        return fleet_from_doc(doc, models)
    except PipelineError as exc:
        raise PipelineError(f"{path}: {exc}") from exc
