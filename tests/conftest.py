"""Shared fixtures: the shipped bundle and the reference latency models, loaded once."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog

from coinfer import resources
from models.bundle import Bundle
from planner.latency import LatencyModel


@pytest.fixture(scope="session")
def bundle() -> Bundle:
    return resources.default_bundle()


@pytest.fixture(scope="session")
def pi3() -> LatencyModel:
    return resources.load_latency_model(resources.PI3_MODEL)


@pytest.fixture(scope="session")
def desktop() -> LatencyModel:
    return resources.load_latency_model(resources.DESKTOP_MODEL)


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """A CLI under test configures structlog for its (captured, then closed) stream: undo that after."""
    yield
    structlog.reset_defaults()
