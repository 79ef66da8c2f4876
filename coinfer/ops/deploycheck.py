"""``make deploy-check``: the README's deployment steps, in order, for an edge and a device on this one machine.

The README's Deployment section is the source of truth: every shell block there that follows a
``<!-- deploy-check: NAME -->`` marker is run here as written, as root, in a private mount namespace whose
``/etc``, ``/opt``, ``/usr/local``, ``/var`` and ``/run`` are overlays on a scratch folder (so the real ones are
never touched; ``/etc/hosts`` there maps ``edge.lan`` and ``pi-1.lan`` to this machine). There is no systemd
as PID 1 here, so ``systemctl``, ``journalctl`` and ``sudo`` are small stand-ins that run each unit's
``ExecStart`` as systemd would: as its ``User=`` (or a throwaway uid for ``DynamicUser=yes``), with its
``LoadCredential=`` files in ``$CREDENTIALS_DIRECTORY`` (owned by that uid, 0400), its ``Environment=`` and
``EnvironmentFile=``, and a notify socket (``Type=notify`` waits for READY=1). The one step done here and not in
the README is copying the device's files from the edge server to the Pi (the same machine). It then checks:
co-inference over TLS answered by the edge, refusals of unauthorised clients, sd_notify, Prometheus scraping.
Packages are installed for real (outside the overlays) first: this is not part of ``make test``.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OVERLAID = ("/etc", "/opt", "/usr/local", "/var", "/run")
PACKAGES = ("python3-venv", "python3-pip", "mosquitto", "mosquitto-clients", "openssl", "prometheus")
PORTS = (1883, 8883, 9090, 9101, 9102)
HOSTS = ("edge.lan", "pi-1.lan")
DYNAMIC_UID = 61184  # the first uid of systemd's DynamicUser= range
UNIT_DIRS = (Path("/etc/systemd/system"), Path("/lib/systemd/system"), Path("/usr/lib/systemd/system"))
MARKER = re.compile(r"^<!-- deploy-check: (\S+) -->\s*$")
FILE_MARKER = re.compile(r"^<!-- deploy-check-file: (\S+) -->\s*$")  # a file the steps use (the app's script)
IMAGES = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
READY_TIMEOUT_S = 180.0
NS_ENV = "COINFER_DEPLOY_CHECK_STATE"


class CheckFailed(RuntimeError):
    """A step or a check failed; the message says which and why."""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    tools = {"systemctl": _systemctl, "journalctl": _journalctl, "listen": _listen}
    if args and args[0] in tools:  # the stand-ins, called through the shims
        return tools[args[0]](args[1:])
    p = argparse.ArgumentParser(prog="coinfer-deploy-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--readme", type=Path, default=REPO / "README.md")
    p.add_argument("--keep", action="store_true", help="leave the scratch folder for inspection")
    opts = p.parse_args(args)
    if os.geteuid() != 0:
        print("deploy-check: run as root (it installs packages and uses a private mount namespace)", file=sys.stderr)
        return 2
    try:
        if os.environ.get(NS_ENV):
            return _inside(opts.readme.resolve(), Path(os.environ[NS_ENV]))
        return _outside(opts)
    except CheckFailed as exc:
        print(f"deploy-check: FAILED: {exc}", file=sys.stderr)
        return 1


# ---- outside the namespace: packages, scratch folder, then re-run inside ----------------------------------
def _outside(opts: argparse.Namespace) -> int:
    busy = [port for port in PORTS if not _port_free(port)]
    if busy:
        raise CheckFailed(f"ports {busy} are in use on this machine (the check's broker, daemons and Prometheus "
                          f"need {list(PORTS)})")
    _step(f"installing the system packages the steps use, for real: {' '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-qq"], env=env)
    _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], env=env)
    scratch = Path(tempfile.mkdtemp(prefix="coinfer-deploy-check-"))
    scratch.chmod(0o755)
    try:
        done = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", sys.executable, "-m",
                               "coinfer.ops.deploycheck", "--readme", str(opts.readme.resolve())],
                              env={**os.environ, NS_ENV: str(scratch), "PYTHONPATH": str(REPO)}, check=False)
        return done.returncode
    finally:
        if opts.keep:
            print(f"scratch folder kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


# ---- inside: overlays, the README's steps, the checks ------------------------------------------------------
def _inside(readme: Path, scratch: Path) -> int:
    state = scratch / "state"
    for name in ("logs", "notify", "pids", "creds"):
        (state / name).mkdir(parents=True, exist_ok=True)
    for path in OVERLAID:
        upper, work = scratch / "upper" / path.strip("/"), scratch / "work" / path.strip("/")
        upper.mkdir(parents=True)
        work.mkdir(parents=True)
        _run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={path},upperdir={upper},workdir={work}", path])
    with open("/etc/hosts", "a") as hosts:
        hosts.write(f"\n127.0.0.1 {' '.join(HOSTS)}  # coinfer deploy-check\n")
    src = scratch / "src"  # the source tree the user unpacked (no venv, no git)
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "*.pyc", "__pycache__", ".mypy_cache",
                                                             ".ruff_cache", ".pytest_cache", "bench-results"))
    shims = _shims(scratch / "shims", state)
    env = {"PATH": f"{shims}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
           "LANG": "C.UTF-8", NS_ENV: str(scratch), "PYTHONPATH": str(REPO)}
    blocks = readme_blocks(readme.read_text())
    for name, text in readme_files(readme.read_text()).items():
        (src / name).write_text(text)
        (src / name).chmod(0o644)
    try:
        return _steps(blocks, state, env, src)
    finally:  # every service started, stopped: nothing outlives the check
        for pids in (state / "pids").iterdir():
            _stop(pids.name, state)


def _steps(blocks: list[tuple[str, str]], state: Path, env: dict[str, str], src: Path) -> int:
    results: dict[str, str] = {}
    for name, script in blocks:
        if name == "pi":  # the one step not in the README: the files the edge server hands to the Pi
            for f in ("/etc/mosquitto/coinfer/secrets/pi-1.password",
                      "/etc/mosquitto/coinfer/secrets/pi-1.camera.password", "/etc/mosquitto/coinfer/ca.crt"):
                shutil.copy(f, src / Path(f).name)
            _step("copied pi-1.password, pi-1.camera.password and ca.crt from the edge server to the Pi")
        _step(f"README block `{name}`:\n" + "\n".join(f"    $ {line}" for line in script.strip().splitlines()))
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=src, env=env, capture_output=True,
                              text=True, check=False)
        print(_indent(done.stdout + done.stderr))
        if done.returncode != 0:
            raise CheckFailed(f"README block `{name}` exited with {done.returncode}")
        results[name] = done.stdout
    return _verify(results, state, env, src)


def _verify(results: dict[str, str], state: Path, env: dict[str, str], src: Path) -> int:
    """The checks after the README's blocks ran (``results``: each block's output by name)."""
    checks: list[tuple[str, bool, str]] = []
    answered = re.findall(r" on (edge|split|device|fallback)\s", results["app"])
    checks.append(("co-inference over TLS through deviced and camera.py, answered by the edge",
                   len(answered) >= 8 and all(w in ("edge", "split") for w in answered), f"{answered}"))
    own = re.findall(r" on (edge|split|device|fallback)\s", results["pi"])
    checks.append(("`deviced infer` as root co-infers with the device's credentials",
                   len(own) == 3 and all(w in ("edge", "split") for w in own), f"{own}"))
    infer = ["deviced", "infer", IMAGES, "--config", "/etc/coinfer/deviced.toml", "--count", "2"]
    for what, argv, extra, expected in (
            ("`deviced infer` with a wrong password", infer, {"COINFER_MQTT_PASSWORD": "wrong"}, "not authorized"),
            ("`deviced infer` as a user who cannot read the password", ["sudo", "-u", "camera", *infer], {},
             "cannot read the MQTT password"),
            ("an application with a wrong password", ["sudo", "-u", "camera", *infer, "--via-daemon", "--app",
                                                      "camera"], {"COINFER_MQTT_PASSWORD": "wrong"},
             "not authorized")):
        done = subprocess.run(argv, capture_output=True, text=True, env={**env, **extra}, cwd=src, check=False)
        line = done.stderr.strip()
        checks.append((f"{what} is refused in one line, exit 2, nothing answered",
                       done.returncode == 2 and expected in line and len(line.splitlines()) == 1
                       and " exit " not in done.stdout, line))
    bad = subprocess.run(["deploy/install.sh", "device", "--id", "pi-1", "--broker", "no-such-edge.invalid"],
                         capture_output=True, text=True, env=env, cwd=src, check=False)
    checks.append(("install.sh device stops naming a broker name that does not resolve",
                   bad.returncode == 2 and "'no-such-edge.invalid' does not resolve" in bad.stderr,
                   bad.stderr.strip()))
    for unit in ("edged", "deviced", "mosquitto"):
        notes = (state / "notify" / f"{unit}.log").read_text() if (state / "notify" / f"{unit}.log").exists() else ""
        checks.append((f"{unit}: sd_notify READY=1", "READY=1" in notes, _last_status(notes)))
    deviced_notes = (state / "notify" / "deviced.log").read_text()
    checks.append(("deviced: STATUS shows the broker connection", "connected to edge.lan:8883" in deviced_notes,
                   _last_status(deviced_notes)))
    sub = subprocess.run(["mosquitto_sub", "-h", "edge.lan", "-p", "8883", "--cafile", "/etc/coinfer/ca.crt",
                          "-t", "coinfer/#", "-C", "1", "-W", "3"], capture_output=True, text=True, env=env,
                         check=False)
    checks.append(("an anonymous client is refused", sub.returncode != 0, (sub.stderr or sub.stdout).strip()))
    peek = subprocess.run(["sudo", "-u", "camera", "cat", "/etc/coinfer/deviced.password"], capture_output=True,
                          text=True, env=env, check=False)
    checks.append(("the application cannot read deviced's password", peek.returncode != 0, peek.stderr.strip()))
    up = _prometheus_targets()
    checks.append(("Prometheus scrapes the provisioned edge and device",
                   up.get("edge-1") == "up" and up.get("pi-1") == "up", json.dumps(up)))
    _step("checks")
    for what, ok, detail in checks:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}" + (f"  [{detail}]" if detail else ""))
    failed = [what for what, ok, _ in checks if not ok]
    if failed:
        raise CheckFailed(f"{len(failed)} of {len(checks)} checks: {'; '.join(failed)}")
    print(f"deploy-check: all {len(checks)} checks passed")
    return 0


def readme_blocks(text: str) -> list[tuple[str, str]]:
    """The shell blocks of the README marked ``<!-- deploy-check: NAME -->``, in order."""
    blocks = _marked(text, MARKER)
    names = [n for n, _ in blocks]
    if names != ["edge", "pi", "app"]:
        raise CheckFailed(f"README deploy-check blocks are {names}, expected edge, pi, app")
    return blocks


def readme_files(text: str) -> dict[str, str]:
    """The README's code blocks marked ``<!-- deploy-check-file: NAME -->``: files the steps use, by name."""
    return dict(_marked(text, FILE_MARKER))


def _marked(text: str, marker: re.Pattern[str]) -> list[tuple[str, str]]:
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        m = marker.match(lines[i])
        if m:
            start = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            stop = next(j for j in range(start + 1, len(lines)) if lines[j].startswith("```"))
            blocks.append((m.group(1), "\n".join(lines[start + 1:stop]) + "\n"))
            i = stop
        i += 1
    return blocks


# ---- the stand-ins: systemctl, journalctl, sudo ---------------------------------------------------------------
def _shims(directory: Path, state: Path) -> Path:
    directory.mkdir(parents=True)
    py = f"PYTHONPATH={shlex.quote(str(REPO))} {shlex.quote(sys.executable)} -m coinfer.ops.deploycheck"
    scripts = {
        "systemctl": f'#!/bin/sh\nexec env {NS_ENV}={shlex.quote(str(state.parent))} {py} systemctl "$@"\n',
        "journalctl": f'#!/bin/sh\nexec env {NS_ENV}={shlex.quote(str(state.parent))} {py} journalctl "$@"\n',
        # sudo [-u USER] CMD...: root already; -u runs as that user, as sudo would
        "sudo": '#!/bin/sh\nif [ "$1" = -u ]; then u=$2; shift 2; exec runuser -u "$u" -- "$@"; fi\nexec "$@"\n',
    }
    for name, text in scripts.items():
        (directory / name).write_text(text)
        (directory / name).chmod(0o755)
    return directory


def _systemctl(args: list[str]) -> int:
    state = Path(os.environ[NS_ENV]) / "state"
    words = [a for a in args if not a.startswith("-")]
    if not words:
        return 0
    command, units = words[0], [u.removesuffix(".service") for u in words[1:]]
    if command == "is-system-running":  # the stand-in is the service manager here
        print("running")
        return 0
    if command in ("daemon-reload", "enable", "disable"):
        return 0
    for unit in units:
        if command == "start" and _running(unit, state):
            continue
        if command in ("stop", "restart"):
            _stop(unit, state)
        if command in ("start", "restart"):
            _start(unit, state)
        elif command == "reload":
            os.kill(_pid(unit, state), signal.SIGHUP)
        elif command == "status":
            notes = state / "notify" / f"{unit}.log"
            print(f"* {unit}.service: {'active (running)' if _running(unit, state) else 'inactive (dead)'}")
            print(f"     Status: {_last_status(notes.read_text() if notes.exists() else '')}")
            _journalctl(["-u", unit, "-n", "5"])
        elif command == "is-active":
            return 0 if _running(unit, state) else 3
    return 0


def _journalctl(args: list[str]) -> int:
    state = Path(os.environ[NS_ENV]) / "state"
    unit = args[args.index("-u") + 1].removesuffix(".service") if "-u" in args else ""
    n = int(args[args.index("-n") + 1]) if "-n" in args else 10
    log = state / "logs" / f"{unit}.log"
    for line in (log.read_text().splitlines() if log.exists() else [])[-n:]:
        print(line)
    return 0  # -f (follow) is not followed: a step must end


def _start(unit: str, state: Path) -> None:
    svc = _unit(unit)
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    for path in svc.get("EnvironmentFile", []):
        for line in Path(path.lstrip("-")).read_text().splitlines():
            if "=" in line and not line.lstrip().startswith("#"):
                key, value = line.split("=", 1)
                env[key.strip()] = value.strip().strip('"')
    for assignment in svc.get("Environment", []):
        env.update(dict(w.split("=", 1) for w in shlex.split(assignment)))
    uid, gid = (DYNAMIC_UID, DYNAMIC_UID) if svc.get("DynamicUser", ["no"])[-1] == "yes" else \
        _ids(svc.get("User", ["root"])[-1])
    creds = state / "creds" / unit
    shutil.rmtree(creds, ignore_errors=True)
    for spec in svc.get("LoadCredential", []):
        ident, source = spec.split(":", 1)
        creds.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, creds / ident)
        os.chown(creds / ident, uid, gid)
        (creds / ident).chmod(0o400)
        os.chown(creds, uid, gid)
        env["CREDENTIALS_DIRECTORY"] = str(creds)
    for pre in svc.get("ExecStartPre", []):
        subprocess.run(shlex.split(pre.lstrip("-+")), check=False)
    notify = state / "notify" / f"{unit}.log"
    notify.write_text("")
    sock = state / "notify" / f"{unit}.sock"
    sock.unlink(missing_ok=True)
    listener = subprocess.Popen([sys.executable, "-m", "coinfer.ops.deploycheck", "listen", str(sock), str(notify)],
                                env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        if sock.exists():
            break
        time.sleep(0.05)
    env["NOTIFY_SOCKET"] = str(sock)
    if "WatchdogSec" in svc:
        env["WATCHDOG_USEC"] = str(int(float(svc["WatchdogSec"][-1].rstrip("s")) * 1e6))
    argv = _expand(svc["ExecStart"][-1], env)
    log = open(state / "logs" / f"{unit}.log", "a")  # noqa: SIM115 - handed to the service, which outlives us
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd="/",
                            user=uid, group=gid, extra_groups=[], umask=0o077 if "UMask" in svc else -1)
    (state / "pids" / unit).write_text(f"{proc.pid} {listener.pid}\n")
    if svc.get("Type", ["simple"])[-1] != "notify":
        time.sleep(1.0)
        if proc.poll() is not None:
            raise SystemExit(f"systemctl: {unit} exited with {proc.returncode}; see journalctl -u {unit}")
        return
    deadline = time.monotonic() + READY_TIMEOUT_S
    while "READY=1" not in notify.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = (state / "logs" / f"{unit}.log").read_text().splitlines()[-5:]
            raise SystemExit(f"systemctl: {unit} did not become ready (exit {proc.poll()}): " + " | ".join(tail))
        time.sleep(0.1)


def _stop(unit: str, state: Path) -> None:
    pids = state / "pids" / unit
    if not pids.exists():
        return
    main_pid, listener = (int(p) for p in pids.read_text().split())
    for pid, sig in ((main_pid, signal.SIGTERM), (listener, signal.SIGTERM)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            continue
        for _ in range(300):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
    pids.unlink()


def _listen(args: list[str]) -> int:
    """Receive a unit's sd_notify messages on ``args[0]`` and append them to ``args[1]``, for good."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(args[0])
    os.chmod(args[0], 0o777)  # the service runs as another user
    with open(args[1], "a") as out:
        while True:
            out.write(sock.recv(65536).decode(errors="replace").replace("\n", " | ") + "\n")
            out.flush()


def _unit(name: str) -> dict[str, list[str]]:
    path = next((d / f"{name}.service" for d in UNIT_DIRS if (d / f"{name}.service").exists()), None)
    if path is None:
        raise SystemExit(f"systemctl: unit {name}.service not found")
    section, found = "", dict[str, list[str]]()
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def _expand(command: str, env: dict[str, str]) -> list[str]:
    """systemd's ExecStart expansion: ``$VAR`` becomes its words, ``${VAR}`` one word."""
    words: list[str] = []
    for word in shlex.split(command.lstrip("-+@")):
        if re.fullmatch(r"\$\w+", word):
            words += env.get(word[1:], "").split()
        else:
            words.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word))
    return words


def _ids(user: str) -> tuple[int, int]:
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


def _pid(unit: str, state: Path) -> int:
    return int((state / "pids" / unit).read_text().split()[0])


def _running(unit: str, state: Path) -> bool:
    try:
        os.kill(_pid(unit, state), 0)
    except (FileNotFoundError, ProcessLookupError):
        return False
    return True


# ---- helpers -------------------------------------------------------------------------------------------------
def _last_status(notes: str) -> str:
    found = re.findall(r"STATUS=([^|\n]*)", notes)
    return found[-1].strip() if found else ""


def _prometheus_targets(wait_s: float = 40.0) -> dict[str, str]:
    """Health of the scraped coinfer targets by edge / device label, once both have been scraped."""
    deadline, health = time.monotonic() + wait_s, {}
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen("http://127.0.0.1:9090/api/v1/targets", timeout=3) as response:
                doc = json.load(response)
            health = {t["labels"].get("edge") or t["labels"].get("device", "?"): t["health"]
                      for t in doc["data"]["activeTargets"]}
        except (OSError, ValueError, KeyError):
            pass
        if health and all(h == "up" for h in health.values()):
            break
        time.sleep(1.0)
    return health


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _run(argv: list[str], env: dict[str, str] | None = None) -> None:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise CheckFailed(f"{' '.join(argv)}: {(done.stderr or done.stdout).strip()[-500:]}")


def _step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _indent(text: str) -> str:
    return "\n".join(f"    | {line}" for line in text.rstrip().splitlines())


if __name__ == "__main__":
    sys.exit(main())
