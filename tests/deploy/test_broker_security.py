"""The production broker config against attempts a device or an outsider could make.

mosquitto 2.0 grants a SUBSCRIBE whatever the ACL says and then filters every delivery by read access, so
"cannot subscribe" is asserted as "receives nothing". Each test publishes from an authorised sender too,
so that silence means denial, not a broken setup.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from pathlib import Path

import aiomqtt
import numpy as np
import pytest

from coinfer.ops import broker as provisioning
from protocol.topics import Topics
from tests.daemons.conftest import REPO
from tests.deploy.conftest import SecureBroker

T = Topics()


async def _received(client: aiomqtt.Client, seconds: float = 0.7) -> list[str]:
    got: list[str] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            async for message in client.messages:
                got.append(str(message.topic))
    return got


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "loopback"])
async def test_anonymous_and_wrong_password_are_refused(secure_broker: SecureBroker, tls: bool) -> None:
    for username, password in ((None, None), ("pi-1", "not-the-password"), ("nobody", "x")):
        with pytest.raises(aiomqtt.MqttError):
            async with secure_broker.client(username, password, tls=tls):
                pass
    async with secure_broker.client("pi-1", tls=tls):  # the right password gets in on both listeners
        pass


async def test_plain_tcp_to_the_tls_listener_fails_and_a_wrong_ca_is_rejected(secure_broker: SecureBroker,
                                                                               tmp_path: Path) -> None:
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", secure_broker.tls_port, username="pi-1", timeout=3,
                                  password=secure_broker.passwords["pi-1"], protocol=aiomqtt.ProtocolVersion.V5):
            pass
    other = tmp_path / "other-ca"
    provisioning.init(other, ["localhost"])  # a different CA: the broker's certificate must not verify
    with pytest.raises((aiomqtt.MqttError, ssl.SSLError)):
        async with aiomqtt.Client("127.0.0.1", secure_broker.tls_port, username="pi-1",
                                  password=secure_broker.passwords["pi-1"], protocol=aiomqtt.ProtocolVersion.V5,
                                  tls_params=aiomqtt.TLSParameters(ca_certs=str(other / "ca.crt"))):
            pass


async def test_a_device_cannot_read_another_devices_topics(secure_broker: SecureBroker) -> None:
    async with secure_broker.client("pi-1") as spy, secure_broker.client("edge-1") as edge, \
            secure_broker.client("pi-2") as victim:
        for f in ("coinfer/dev/pi-2/#", "coinfer/edge/+/req/+", "coinfer/pool/req/+", "coinfer/#"):
            await spy.subscribe(f, qos=1)
        await victim.subscribe(T.device_responses("pi-2"), qos=1)
        await edge.publish(T.device_responses("pi-2"), b"result for pi-2", qos=1)
        await victim.publish(T.edge_request("edge-1", "pi-2"), b"pi-2's activations", qos=1)
        await victim.publish(T.device_infer("pi-2"), b"pi-2's app input", qos=1)
        assert await _received(victim) == [T.device_responses("pi-2")]  # the authorised path works
        assert await _received(spy, 0.3) == []


async def test_a_device_cannot_write_as_another_device_or_an_edge(secure_broker: SecureBroker) -> None:
    async with secure_broker.client("edge-1") as edge, secure_broker.client("pi-2") as victim, \
            secure_broker.client("pi-1") as attacker:
        await edge.subscribe(T.edge_requests("edge-1"), qos=1)
        await victim.subscribe("coinfer/dev/pi-2/#", qos=1)
        await victim.subscribe(T.all_edge_adverts(), qos=1)
        forged = [T.edge_request("edge-1", "pi-2"), T.device_responses("pi-2"), T.device_infer("pi-2"),
                  T.app_responses("pi-2", "app"), T.edge_advert("edge-1"), T.edge_status("edge-2")]
        for topic in forged:
            await attacker.publish(topic, b"forged", qos=1)
        await attacker.publish(T.edge_request("edge-1", "pi-1"), b"own request", qos=1)  # allowed
        assert await _received(edge) == [T.edge_request("edge-1", "pi-1")]
        assert await _received(victim, 0.3) == []


async def test_an_edge_is_confined_to_its_own_topics(secure_broker: SecureBroker) -> None:
    async with secure_broker.client("edge-1") as edge1, secure_broker.client("edge-2") as edge2, \
            secure_broker.client("pi-1") as device:
        await edge2.subscribe(T.edge_requests("edge-1"), qos=1)  # another edge's requests: denied
        await edge2.subscribe(T.device_infer("pi-1"), qos=1)  # a device's app inputs: denied
        await edge1.subscribe(T.pool_requests(), qos=1)  # the shared pool: allowed
        await device.subscribe(T.all_edge_adverts(), qos=1)
        await device.publish(T.edge_request("edge-1", "pi-1"), b"req", qos=1)
        await device.publish(T.device_infer("pi-1"), b"app", qos=1)
        await device.publish(T.pool_request("pi-1"), b"pool", qos=1)
        await edge2.publish(T.edge_advert("edge-1"), b"forged advert", qos=1)  # posing as edge-1: denied
        await edge2.publish(T.device_infer("pi-1"), b"forged app request", qos=1)  # into a device: denied
        assert await _received(edge1) == [T.pool_request("pi-1")]
        assert await _received(edge2, 0.3) == []
        assert await _received(device, 0.3) == []


async def test_a_revoked_device_is_refused(secure_broker: SecureBroker) -> None:
    password, _ = provisioning.add(secure_broker.directory, provisioning.Entry("device", "pi-revoked"))
    secure_broker.reload()
    await asyncio.sleep(0.3)
    async with secure_broker.client("pi-revoked", password):
        pass
    provisioning.revoke(secure_broker.directory, "pi-revoked")
    assert "pi-revoked" not in (secure_broker.directory / "passwd").read_text()
    secure_broker.reload()
    await asyncio.sleep(0.3)
    with pytest.raises(aiomqtt.MqttError):
        async with secure_broker.client("pi-revoked", password):
            pass
    async with secure_broker.client("pi-1"):  # everyone else still gets in after the reload
        pass


async def test_coinference_works_through_tls_credentials_and_acls(secure_broker: SecureBroker,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemons' real traffic (status, adverts, pool and targeted requests, replies) passes the ACLs."""
    from deviced.config import DevicedConfig
    from deviced.service import Client
    from edged.config import EdgedConfig
    from models.data import load_fashion_mnist, preprocess
    from tests.daemons.conftest import EdgeProcess

    x = preprocess(load_fashion_mnist("test")[0][:5])
    monkeypatch.setenv("COINFER_MQTT_PASSWORD", secure_broker.passwords["edge-1"])
    edge = EdgeProcess(EdgedConfig(edge_id="edge-1", broker=secure_broker.config("edge-1", tls=False)))
    try:
        await asyncio.sleep(1.0)  # edged connected (it reads the password once per connection)
        monkeypatch.setenv("COINFER_MQTT_PASSWORD", secure_broker.passwords["pi-1"])
        cfg = DevicedConfig(device_id="pi-1", broker=secure_broker.config("pi-1"), probe_interval_s=0,
                            initial_bandwidth="100Mbps", default_deadline="2s")
        async with Client(cfg) as client:
            assert await client.wait_for_edge(5)
            outcomes = [await client.infer(x[i], deadline=2.0) for i in range(len(x))]
    finally:
        await edge.stop()
    assert all(o.edge_id == "edge-1" and o.fallback is None for o in outcomes), [o.record() for o in outcomes]
    assert all(np.isfinite(o.logits).all() for o in outcomes)


async def test_an_application_may_only_ask_its_device_and_read_its_own_answers(secure_broker: SecureBroker) -> None:
    """`coinfer broker add-app pi-1.camera`: least privilege for a program on the Pi beside deviced."""
    async with secure_broker.client("pi-1") as device, secure_broker.client("pi-1.camera") as app, \
            secure_broker.client("pi-1.logger") as other:
        await device.subscribe(T.device_infer("pi-1"), qos=1)
        await app.subscribe("coinfer/#", qos=1)  # granted, and filtered by the ACL on every delivery
        await other.subscribe(T.app_responses("pi-1", "logger"), qos=1)
        await app.publish(T.device_infer("pi-1"), b"camera frame", qos=1)  # allowed: its own device's deviced
        await app.publish(T.device_infer("pi-2"), b"to another device", qos=1)  # dropped
        await app.publish(T.edge_request("edge-1", "pi-1"), b"straight to an edge", qos=1)  # dropped
        await app.publish(T.app_responses("pi-1", "logger"), b"forged answer", qos=1)  # dropped
        await device.publish(T.device_responses("pi-1"), b"the device's own edge result", qos=1)
        await device.publish(T.app_responses("pi-1", "logger"), b"the logger's answer", qos=1)
        await device.publish(T.app_responses("pi-1", "camera"), b"the camera's answer", qos=1)
        assert await _received(device) == [T.device_infer("pi-1")]
        assert await _received(app) == [T.app_responses("pi-1", "camera")]
        assert await _received(other, 0.3) == [T.app_responses("pi-1", "logger")]
    with pytest.raises(provisioning.BrokerSetupError, match=r"DEVICE\.APP"):
        provisioning.Entry("app", "camera")


async def test_an_application_on_a_deployed_device_reads_the_devices_config(secure_broker: SecureBroker,
                                                                           tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """RemoteClient.from_config: the README's example, unchanged, against deviced over TLS; a wrong password is
    one clear line, not a traceback."""
    from deviced.config import load
    from deviced.service import RemoteClient, build_device, run
    from models.data import load_fashion_mnist, preprocess
    from protocol.session import BrokerRefused

    conf = tmp_path / "deviced.toml"
    conf.write_text(f'[deviced]\ndevice_id = "pi-1"\nprobe_interval_s = 0\n\n[broker]\nhost = "localhost"\n'
                    f'port = {secure_broker.tls_port}\nusername = "pi-1"\ntls = true\nca_file = "{secure_broker.ca}"\n')
    secret = tmp_path / "camera.password"
    secret.write_text(secure_broker.passwords["pi-1.camera"] + "\n")
    monkeypatch.setenv("COINFER_MQTT_PASSWORD", secure_broker.passwords["pi-1"])  # deviced's own
    device = build_device(load(conf))
    shutdown = asyncio.Event()
    daemon = asyncio.create_task(run(device, shutdown=shutdown))
    try:
        await asyncio.sleep(1.0)
        monkeypatch.delenv("COINFER_MQTT_PASSWORD")
        x = preprocess(load_fashion_mnist("test")[0][:2])
        async with RemoteClient.from_config(conf, app="camera", password_file=secret) as app:
            answers = [await app.infer(xi, deadline=1.0) for xi in x]
        assert [a.where for a in answers] == ["device", "device"]  # no edge here: deviced answers locally
        secret.write_text("not-the-password\n")
        with pytest.raises(BrokerRefused, match=r"refused user 'pi-1.camera' with this password: not authorized"):
            async with RemoteClient.from_config(conf, app="camera", password_file=secret):
                pass
        with pytest.raises(BrokerRefused, match="cannot read the MQTT password"):
            async with RemoteClient.from_config(conf, app="camera", password_file=tmp_path / "missing"):
                pass
    finally:
        shutdown.set()
        await asyncio.wait_for(daemon, 10)


def test_the_scrape_config_lists_the_provisioned_daemons(secure_broker: SecureBroker, tmp_path: Path) -> None:
    import shutil
    import subprocess

    text = provisioning.scrape_config(provisioning.entries(secure_broker.directory),
                                      targets={"edge-1": "127.0.0.1:9101"})
    assert '"127.0.0.1:9101"' in text and '"edge-2.lan:9101"' in text and '"pi-2.lan:9102"' in text
    assert "camera" not in text  # applications export no metrics
    (tmp_path / "prometheus.yml").write_text(text)
    (tmp_path / "coinfer.rules.yml").write_text((Path(__file__).parents[2] / "deploy/prometheus/coinfer.rules.yml")
                                                .read_text())
    promtool = shutil.which("promtool")
    assert promtool
    done = subprocess.run([promtool, "check", "config", "prometheus.yml"], cwd=tmp_path, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    with pytest.raises(provisioning.BrokerSetupError, match="not provisioned"):
        provisioning.scrape_config(provisioning.entries(secure_broker.directory), targets={"pi-9": "x:1"})


def test_a_missing_or_refused_credential_is_one_line_and_exit_2_never_a_local_only_run(
        secure_broker: SecureBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`deviced infer` (co-inferring in its own process), `deviced run` and `edged` with no password or a wrong one:
    a one-line error naming the user and exit status 2, before any image is answered on the device alone."""
    from deviced import cli as deviced_cli
    from edged import cli as edged_cli
    from models.data import load_fashion_mnist

    images = tmp_path / "images.npy"
    np.save(images, load_fashion_mnist("test")[0][:3])
    broker = (f'\n\n[broker]\nhost = "localhost"\nport = {secure_broker.tls_port}\ntls = true\n'
              f'ca_file = "{secure_broker.ca}"\n')
    device = tmp_path / "deviced.toml"
    device.write_text(f'[deviced]\ndevice_id = "pi-1"\nprobe_interval_s = 0{broker}username = "pi-1"\n')
    edge = tmp_path / "edged.toml"
    edge.write_text(f'[edged]\nedge_id = "edge-1"{broker}username = "edge-1"\n')
    monkeypatch.delenv("COINFER_MQTT_PASSWORD", raising=False)
    runs = {"deviced infer": lambda: deviced_cli.main(["infer", str(images), "--count", "3", "--config", str(device)]),
            "deviced run": lambda: deviced_cli.main(["run", "--config", str(device)]),
            "edged": lambda: edged_cli.main(["--config", str(edge)])}
    for secret, expected in ((None, r"no password for user '(pi|edge)-1'"),
                             ("wrong", r"refused user '(pi|edge)-1' with this password: not authorized")):
        if secret:
            monkeypatch.setenv("COINFER_MQTT_PASSWORD", secret)
        for name, run_it in runs.items():
            capsys.readouterr()
            assert run_it() == 2, name
            out, err = capsys.readouterr()
            lines = [line for line in err.splitlines() if line.startswith(("deviced: error", "edged: error"))]
            assert len(lines) == 1 and re.search(expected, lines[0]), (name, err)
            assert "on device" not in out and " exit " not in out, (name, out)  # no image answered locally


def test_the_readmes_acl_table_is_what_coinfer_broker_writes(secure_broker: SecureBroker) -> None:
    """Each role's row of the README's ACL table, for pi-1, edge-1 and pi-1.camera, against the rules `coinfer
    broker add-*` wrote into the broker's acl file."""
    written: dict[str, set[tuple[str, str]]] = {}
    user = ""
    for line in (secure_broker.directory / "acl").read_text().splitlines():
        if line.startswith("user "):
            user = line.split()[1]
            written[user] = set()
        elif line.startswith("topic "):
            _, access, topic = line.split()
            written[user].add((access, topic))
    text = (REPO / "README.md").read_text()
    table = text[text.index("| user | rules (mosquitto's `acl_file`"):]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| (device|edge|application) `[^`]+` \| (.*) \|$", table,
                                                        re.M)}
    names = {"device": ("pi-1", {"D": "pi-1"}), "edge": ("edge-1", {"E": "edge-1"}),
             "application": ("pi-1.camera", {"D": "pi-1", "A": "camera"})}
    assert set(rows) == set(names)
    for role, (user, subst) in names.items():
        documented = set()
        for rule in rows[role].split("; "):
            access, topic = rule.split(" ", 1)
            parts = [subst.get(level, level) for level in topic.strip("`").split("/")]
            documented.add((access, "/".join(parts)))
        assert documented == written[user], (role, documented ^ written[user])
