"""The ``coinfer`` commands, by family (``models``: model tools; ``planning``; ``ops``: the demo, the testbed and
the broker; ``bench``), each a table of ``Command`` rows that ``coinfer.cli`` builds its parser from."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Command:
    """One ``coinfer`` command: its name, help line, arguments and what runs it (returns the exit status)."""

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
