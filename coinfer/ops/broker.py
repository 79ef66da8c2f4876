"""Provisioning of the production broker (deploy/mosquitto/coinfer.conf): certificates, credentials, ACLs.

One folder (default ``/etc/mosquitto/coinfer``) holds the CA and the broker's certificate, mosquitto's
``passwd`` and ``acl`` files, and ``secrets/<id>.password`` for each provisioned user (to copy to that
device once). The ACL file is owned by coinfer: it is rewritten whole from the users it records, with each
user's rules taken from ``protocol.topics`` (the one place topic names are built). Passwords are hashed by
``mosquitto_passwd``, certificates made by ``openssl``: the tools mosquitto itself documents.
"""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from protocol.topics import DEFAULT_PREFIX, Topics, check_id

DEFAULT_DIR = Path("/etc/mosquitto/coinfer")
ROLES = ("device", "edge", "app")
METRICS_PORTS = {"edge": 9101, "device": 9102}  # as in deploy/config/*.toml
_ENTRY = re.compile(r"^# coinfer-user role=(\w+) id=(\S+) prefix=(\S+)$")
CERT_DAYS = 825


class BrokerSetupError(RuntimeError):
    """A provisioning step failed (missing tool, unknown user, bad folder)."""


@dataclass(frozen=True, slots=True)
class Entry:
    role: str
    ident: str
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise BrokerSetupError(f"role must be one of {ROLES}, not {self.role!r}")
        check_id(self.ident, f"{self.role} id")
        Topics(self.prefix)

        if self.role == "app" and "." not in self.ident:
            raise BrokerSetupError(f"an application's id is DEVICE.APP (e.g. pi-1.camera), not {self.ident!r}")

    def rules(self) -> list[tuple[str, str]]:
        t = Topics(self.prefix)
        if self.role == "app":
            device, app = self.ident.rsplit(".", 1)
            return t.app_acl(device, app)
        return t.device_acl(self.ident) if self.role == "device" else t.edge_acl(self.ident)


def entries(directory: Path) -> list[Entry]:
    """The users the ACL file records, in file order."""
    acl = directory / "acl"
    if not acl.exists():
        return []
    found = []
    for line in acl.read_text().splitlines():
        m = _ENTRY.match(line)
        if m:
            found.append(Entry(m.group(1), m.group(2), m.group(3)))
    return found


def render_acl(users: list[Entry]) -> str:
    """mosquitto's acl_file: one ``user`` block per entry, nothing for anyone else (deny by default)."""
    lines = ["# Written by `coinfer broker`; edits by hand are lost on the next add/revoke.", ""]
    for e in users:
        lines += [f"# coinfer-user role={e.role} id={e.ident} prefix={e.prefix}", f"user {e.ident}"]
        lines += [f"topic {access} {topic}" for access, topic in e.rules()]
        lines.append("")
    return "\n".join(lines)


def scrape_config(users: list[Entry], *, domain: str = "lan", targets: dict[str, str] | None = None) -> str:
    """Prometheus' scrape config for the provisioned edges and devices (applications export no metrics):
    ``ID.DOMAIN:PORT`` for each, unless ``targets`` gives an ID its ``HOST:PORT``."""
    targets = targets or {}
    unknown = sorted(set(targets) - {e.ident for e in users})
    if unknown:
        raise BrokerSetupError(f"--target for {unknown}: not provisioned (`coinfer broker list`)")
    lines = ["# Written by `coinfer broker scrape-config` from the provisioned users; regenerate after add/revoke.",
             "global:", "  scrape_interval: 5s", "  evaluation_interval: 5s", "", "rule_files:",
             "  - coinfer.rules.yml  # relative to this file", "", "scrape_configs:"]
    for role, job in (("edge", "coinfer-edges"), ("device", "coinfer-devices")):
        members = [e for e in users if e.role == role]
        lines += [f"  - job_name: {job}", "    static_configs:"]
        if not members:
            lines[-1] = "    static_configs: []"
        for e in members:
            address = targets.get(e.ident, f"{e.ident}.{domain}:{METRICS_PORTS[role]}" if domain else
                                  f"{e.ident}:{METRICS_PORTS[role]}")
            lines += [f'      - targets: ["{address}"]', f"        labels: {{{role}: {e.ident}}}"]
    return "\n".join(lines) + "\n"


def init(directory: Path, hosts: list[str], *, days: int = CERT_DAYS) -> list[Path]:
    """Create the folder, a CA (kept if present) and a broker certificate for ``hosts`` (names or IPs),
    and empty passwd/acl files. Returns the files written."""
    if not hosts:
        raise BrokerSetupError("name at least one --host the devices will connect to (DNS name or IP)")
    openssl = _tool("openssl")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "secrets").mkdir(mode=0o700, exist_ok=True)
    written = []
    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    if not ca_crt.exists():
        _run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
              "-keyout", str(ca_key), "-out", str(ca_crt), "-days", str(days * 4), "-subj", "/CN=coinfer broker CA",
              "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        ca_key.chmod(0o600)
        written += [ca_key, ca_crt]
    key, csr, crt = directory / "server.key", directory / "server.csr", directory / "server.crt"
    _run([openssl, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
          "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={hosts[0]}"])
    san = ",".join(f"IP:{h}" if _is_ip(h) else f"DNS:{h}" for h in hosts)
    with tempfile.NamedTemporaryFile("w", suffix=".ext") as ext:
        ext.write(f"subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\n"
                  "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
                  "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n")
        ext.flush()
        _run([openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
              "-CAcreateserial", "-out", str(crt), "-days", str(days), "-extfile", ext.name])
    csr.unlink()
    _share_with_mosquitto(key)
    written += [key, crt]
    for name in ("passwd", "acl"):
        path = directory / name
        if not path.exists():
            path.write_text("" if name == "passwd" else render_acl([]))
            _share_with_mosquitto(path)
            written.append(path)
    return written


def add(directory: Path, entry: Entry, *, password: str | None = None) -> tuple[str, Path]:
    """Give ``entry`` a password (new random one unless given) and its ACL block; replaces an earlier one
    of the same id. Returns the password and the secret file it was also written to (mode 0600)."""
    _require_init(directory)
    password = password or secrets.token_urlsafe(24)
    _run([_tool("mosquitto_passwd"), "-b", str(directory / "passwd"), entry.ident, password])
    users = [e for e in entries(directory) if e.ident != entry.ident] + [entry]
    _write(directory / "acl", render_acl(users))
    secret = directory / "secrets" / f"{entry.ident}.password"
    secret.parent.mkdir(mode=0o700, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        secret.unlink()
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return password, secret


def revoke(directory: Path, ident: str) -> Entry:
    """Remove ``ident``'s password and ACL block (reload the broker to refuse it from then on)."""
    _require_init(directory)
    users = entries(directory)
    gone = [e for e in users if e.ident == ident]
    if not gone:
        raise BrokerSetupError(f"no user {ident!r} in {directory / 'acl'}")
    _run([_tool("mosquitto_passwd"), "-D", str(directory / "passwd"), ident])
    _write(directory / "acl", render_acl([e for e in users if e.ident != ident]))
    with contextlib.suppress(FileNotFoundError):
        (directory / "secrets" / f"{ident}.password").unlink()
    return gone[0]


def _require_init(directory: Path) -> None:
    if not (directory / "passwd").exists():
        raise BrokerSetupError(f"{directory} has no passwd file: run `coinfer broker init --dir {directory}` first")


def _write(path: Path, text: str) -> None:
    """Replace ``path`` atomically (the broker may re-read it at any moment), keeping its mode and group."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    if path.exists():
        st = path.stat()
        tmp.chmod(st.st_mode & 0o777)
        with contextlib.suppress(PermissionError):
            os.chown(tmp, st.st_uid, st.st_gid)
    tmp.replace(path)


def _share_with_mosquitto(path: Path) -> None:
    """Readable by the broker's group where it has one (Debian runs mosquitto as user ``mosquitto``)."""
    path.chmod(0o640)
    with contextlib.suppress(KeyError, PermissionError):
        os.chown(path, -1, grp.getgrnam("mosquitto").gr_gid)


def _tool(name: str) -> str:
    found = shutil.which(name) or next((p for p in (f"/usr/bin/{name}", f"/usr/sbin/{name}") if Path(p).exists()),
                                       None)
    if found is None:
        raise BrokerSetupError(f"{name} not found: apt-get install {'openssl' if name == 'openssl' else 'mosquitto'}")
    return found


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        shown = argv[:4] if "mosquitto_passwd" in argv[0] else argv  # never echo a password
        raise BrokerSetupError(f"{' '.join(shown)} failed: {done.stderr.strip() or done.stdout.strip()}")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
