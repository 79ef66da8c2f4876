"""Shared fixtures: the shipped bundle and the reference latency models, loaded once."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog

from models import loaders
from models.bundle import Bundle, load_bundle
from planner.latency import LatencyModel


@pytest.fixture(scope="session")
def bundle() -> Bundle:
    return load_bundle()


@pytest.fixture(scope="session")
def pi3() -> LatencyModel:
    return loaders.load_latency_model(loaders.PI3_MODEL)


@pytest.fixture(scope="session")
def desktop() -> LatencyModel:
    return loaders.load_latency_model(loaders.DESKTOP_MODEL)


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """A CLI under test configures structlog for its (captured, then closed) stream: undo that after."""
    yield
    structlog.reset_defaults()
