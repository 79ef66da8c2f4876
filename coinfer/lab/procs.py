"""Local processes the tools start: mosquitto (from a config, on a free port) and the daemons."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from protocol.session import BrokerConfig

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PORT = 18830  # the listener in mosquitto.conf


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if found is None:
        raise RuntimeError("mosquitto is not installed: `make run` and `make test` install it (apt package mosquitto)")
    return found


class Mosquitto:
    """mosquitto with config ``conf`` listening on ``port``; it can be restarted on the same port, or frozen
    (SIGSTOP) to stall every connection the way a dead link does."""

    def __init__(self, conf: Path, port: int) -> None:
        self.conf, self.port = conf, port
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def from_template(cls, template: Path, tmp: Path, port: int | None = None) -> Mosquitto:
        """``template`` (e.g. the repository's mosquitto.conf) with its listener moved to ``port``, or to
        DEFAULT_PORT when that is free, or else to a free port; the config is written to ``tmp``."""
        if port is None:
            port = DEFAULT_PORT if port_free(DEFAULT_PORT) else free_port()
        conf = tmp / "mosquitto.conf"
        conf.write_text(template.read_text().replace(f"listener {DEFAULT_PORT} ", f"listener {port} "))
        return cls(conf, port)

    @property
    def config(self) -> BrokerConfig:
        return BrokerConfig(host="127.0.0.1", port=self.port)

    def start(self) -> Mosquitto:
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with status {self.proc.returncode}")
            if not port_free(self.port):
                return self
            time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def freeze(self, frozen: bool) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP if frozen else signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: the broker dies; its clients see their connections close."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Daemon:
    """edged or deviced as a child process (``python -m edged.cli ...``), stopped the way systemd stops it."""

    def __init__(self, module: str, args: list[str]) -> None:
        self.argv = [sys.executable, "-m", module, *args]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        self.proc = subprocess.Popen(self.argv, env={**os.environ, "PYTHONPATH": str(REPO)},
                                     stdout=subprocess.DEVNULL)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: a crash, no drain, no offline status (the broker's last will says it)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
