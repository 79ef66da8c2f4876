"""The orchestrator's side of a testbed run: edged on the edge side, and the device agent (``coinfer.lab.agent``)
with its JSON-lines conversation."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from coinfer.lab.procs import REPO
from coinfer.lab.testbed import BROKER_PORT, Testbed, process


@contextmanager
def edged(bed: Testbed, tmp: Path, model: Path, bundle: Path) -> Iterator[None]:
    """edged on the testbed's edge side, advertising ``model`` and serving ``bundle``."""
    conf = tmp / "edged.toml"
    conf.write_text(f'[edged]\nedge_id = "testbed-edge"\nlatency_model = "{model}"\nadvert_interval_s = 1.0\n'
                    f'bundles = ["{bundle.resolve()}"]\n\n[broker]\nhost = "{bed.edge_host}"\nport = {BROKER_PORT}\n')
    with process(bed.edge_argv([sys.executable, "-m", "edged.cli", "--config", str(conf), "--log-level",
                                "warning"]), cwd=REPO):
        yield


class Agent:
    """The device-side process (``coinfer.lab.agent``) and its JSON-lines conversation."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the device agent exited (code {self.proc.poll()})")
        doc: dict[str, Any] = json.loads(line)
        if "error" in doc:
            raise RuntimeError(f"device agent: {doc['error']}")
        return doc


@contextmanager
def run_agent(bed: Testbed, argv: list[str]) -> Iterator[Agent]:
    """The device agent (``argv``: ``python -m coinfer.lab.agent ...``) in the device's namespace and cgroup, ready."""
    with process(bed.device_argv(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO) as proc:
        agent = Agent(proc)
        if not agent.read().get("ready"):
            raise RuntimeError("the device agent found no edge server")
        yield agent
        assert proc.stdin is not None
        proc.stdin.close()
