"""The systemd side: units pass `systemd-analyze verify`, example configs load, and both daemons speak the
sd_notify protocol (READY, WATCHDOG heartbeats, STOPPING on SIGTERM) as Type=notify units need."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deviced import config as deviced_config
from edged import config as edged_config
from tests.daemons.conftest import REPO, free_port

UNITS = {"edged": REPO / "deploy/systemd/edged.service", "deviced": REPO / "deploy/systemd/deviced.service"}


@pytest.mark.parametrize("daemon", sorted(UNITS))
def test_unit_verifies_clean(daemon: str, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze (package systemd) is needed to check the units"
    text = UNITS[daemon].read_text()
    assert "Type=notify" in text and "WatchdogSec=" in text and "DynamicUser=yes" in text
    # point ExecStart at this checkout's entry point: verify checks that the binary exists
    unit = tmp_path / f"{daemon}.service"
    unit.write_text(text.replace("/opt/coinfer/venv/bin/", str(Path(sys.executable).parent) + "/"))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr


def test_example_configs_load() -> None:
    e = edged_config.load(REPO / "deploy/config/edged.toml")
    d = deviced_config.load(REPO / "deploy/config/deviced.toml")
    assert e.broker.username == e.edge_id and e.metrics_port
    assert d.broker.tls and d.broker.ca_file == "/etc/coinfer/ca.crt" and d.broker.username == d.device_id
    # each daemon its own credential file: an edge and a device can share one host
    creds = {name: next(line for line in unit.read_text().splitlines() if line.startswith("LoadCredential="))
             for name, unit in UNITS.items()}
    assert creds == {name: f"LoadCredential=mqtt-password:/etc/coinfer/{name}.password" for name in UNITS}


def _notify_socket(tmp_path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(30)
    return sock


@pytest.mark.parametrize("argv", [["edged"], ["deviced", "run"]], ids=["edged", "deviced"])
def test_daemon_speaks_sd_notify(argv: list[str], tmp_path: Path) -> None:
    conf = tmp_path / "d.toml"
    table = "edged" if argv[0] == "edged" else "deviced"
    conf.write_text(f"[{table}]\n\n[broker]\nport = {free_port()}\n")  # no broker there: readiness must not wait
    sock = _notify_socket(tmp_path)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "400000"}
    exe = str(Path(sys.executable).parent / argv[0])
    proc = subprocess.Popen([exe, *argv[1:], "--config", str(conf)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        messages: list[str] = []
        deadline = time.monotonic() + 60
        def unreachable() -> bool:
            return any("STATUS=" in m and "unreachable" in m for m in messages)

        while (messages.count("WATCHDOG=1") < 3 or not unreachable()) and time.monotonic() < deadline:
            messages.append(sock.recv(4096).decode())
        assert any(m.startswith("READY=1") for m in messages), messages
        # STATUS follows the broker connection: `systemctl status` says why it is not connected
        assert unreachable() and any("is mosquitto running" in m for m in messages), messages
        assert messages.count("WATCHDOG=1") >= 3, messages
        proc.send_signal(signal.SIGTERM)
        tail = []
        while "STOPPING=1" not in tail:
            tail.append(sock.recv(4096).decode())
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        sock.close()
