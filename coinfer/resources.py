"""Files shipped inside the packages: reference latency models and the default bundle."""

from __future__ import annotations

import json
from pathlib import Path

import planner
from models.bundle import DEFAULT_BUNDLE, Bundle, load_bundle
from planner.errors import LatencyModelError
from planner.latency import LatencyModel

REFERENCE_DIR = planner.REFERENCE_DIR
PI3_MODEL = REFERENCE_DIR / "edgent2018-raspberry-pi-3.json"
DESKTOP_MODEL = REFERENCE_DIR / "edgent2018-desktop.json"


def load_latency_model(path: Path | str) -> LatencyModel:
    """Read a latency-model JSON file; unreadable or malformed files raise ``LatencyModelError``."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise LatencyModelError(f"cannot read latency model {path}: {exc}") from exc
    try:
        return LatencyModel.from_json(doc)
    except LatencyModelError as exc:
        raise LatencyModelError(f"{path}: {exc}") from exc


def default_bundle() -> Bundle:
    return load_bundle(DEFAULT_BUNDLE)
