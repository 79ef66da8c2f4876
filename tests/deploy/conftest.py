"""mosquitto started with the production config (deploy/mosquitto/coinfer.conf) on free ports, its
certificates, passwords and ACLs made by `coinfer broker`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import pytest

from coinfer.ops import broker as provisioning
from protocol.session import BrokerConfig
from tests.daemons.conftest import REPO, Broker, free_port

USERS = (("edge", "edge-1"), ("edge", "edge-2"), ("device", "pi-1"), ("device", "pi-2"), ("app", "pi-1.camera"),
         ("app", "pi-1.logger"))


@dataclass
class SecureBroker:
    broker: Broker
    directory: Path
    tls_port: int
    local_port: int
    passwords: dict[str, str] = field(default_factory=dict)

    @property
    def ca(self) -> str:
        return str(self.directory / "ca.crt")

    def config(self, username: str = "", *, tls: bool = True) -> BrokerConfig:
        if tls:
            return BrokerConfig(host="127.0.0.1", port=self.tls_port, username=username, tls=True, ca_file=self.ca)
        return BrokerConfig(host="127.0.0.1", port=self.local_port, username=username)

    def client(self, username: str | None, password: str | None = None, *, tls: bool = True,
               identifier: str | None = None) -> aiomqtt.Client:
        """A raw MQTT v5 client as ``username`` (its provisioned password unless one is given)."""
        if username is not None and password is None:
            password = self.passwords.get(username)
        return aiomqtt.Client("127.0.0.1", self.tls_port if tls else self.local_port, username=username,
                              password=password, identifier=identifier, protocol=aiomqtt.ProtocolVersion.V5,
                              tls_params=aiomqtt.TLSParameters(ca_certs=self.ca) if tls else None)

    def reload(self) -> None:
        """What `systemctl reload mosquitto` does: SIGHUP, re-reading the password and ACL files."""
        assert self.broker.proc is not None
        self.broker.proc.send_signal(1)


def production_conf(directory: Path, tls_port: int, local_port: int) -> str:
    text = (REPO / "deploy/mosquitto/coinfer.conf").read_text()
    text = text.replace("/etc/mosquitto/coinfer", str(directory))
    text = text.replace("listener 8883", f"listener {tls_port} 127.0.0.1")
    text = text.replace("listener 1883 127.0.0.1", f"listener {local_port} 127.0.0.1")
    if os.geteuid() == 0:
        text += "\n# test: stay root to read the pytest folder\nuser root\n"
    return text


@pytest.fixture(scope="session")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    directory = tmp_path_factory.mktemp("secure-broker")
    provisioning.init(directory, ["localhost", "127.0.0.1"])
    passwords = {}
    for role, ident in USERS:
        passwords[ident], _ = provisioning.add(directory, provisioning.Entry(role, ident))
    tls_port, local_port = free_port(), free_port()
    conf = directory / "mosquitto.conf"
    conf.write_text(production_conf(directory, tls_port, local_port))
    b = Broker(conf, tls_port)
    b.start()
    yield SecureBroker(broker=b, directory=directory, tls_port=tls_port, local_port=local_port, passwords=passwords)
    b.stop()
