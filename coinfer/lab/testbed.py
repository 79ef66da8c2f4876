"""The emulated testbeds: a device and an edge server, or a fleet of devices, on one Linux machine.

``Testbed``: two network namespaces (device, edge) joined by a veth pair; the device's uplink shaped with
``tc tbf`` (changeable while running); the device's processes in a cgroup with a CPU quota (v1
``cpu.cfs_quota_us`` or v2 ``cpu.max``) so that its compute is Pi-class. Needs root. Without it,
``Testbed(loopback=True)`` runs everything on 127.0.0.1 with the uplink and the device's slowness emulated
inside deviced, and every output says so (``describe()``).

``Fleetbed``: N device namespaces, each with its own CPU quota (cgroup) and its own shaped uplink and downlink
(``tc tbf`` on both ends of its veth), all bridged to a hub namespace where the broker and the edge run
unconstrained: heterogeneous Pi-class workers of a pipeline. Also needs root.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from coinfer.lab.procs import DEFAULT_PORT, REPO, mosquitto_binary

NS_DEVICE, NS_EDGE = "coinfer-dev", "coinfer-edge"
VETH_DEVICE, VETH_EDGE = "cfdev0", "cfedge0"
DEVICE_IP, EDGE_IP = "10.77.0.2", "10.77.0.1"
CGROUP_NAME = "coinfer-device"
CGROUP_ROOT = Path("/sys/fs/cgroup")
BROKER_PORT = DEFAULT_PORT  # mosquitto.conf's port, which the testbeds' broker keeps


class TestbedError(RuntimeError):
    """The testbed cannot be set up here (no root, no ``ip``/``tc``, no cgroup cpu controller)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Emulation:
    """What the testbed emulates; stated beside every figure."""

    uplink_bps: float = 1e6
    cpu_quota: float = 0.1  # share of one core the device gets
    cpu_period_us: int = 10_000  # short, so one inference spans many periods

    def __post_init__(self) -> None:
        if not 0.01 <= self.cpu_quota <= 1.0 or not 1000 <= self.cpu_period_us <= 1_000_000:
            raise ValueError("cpu_quota must be in [0.01, 1] and cpu_period_us in [1000, 1000000]")
        if self.cpu_quota * self.cpu_period_us < 1000:
            raise ValueError("the kernel's smallest CPU quota is 1 ms per period: lengthen the period")

    @classmethod
    def with_quota(cls, cpu_quota: float, *, period_us: int = 10_000, **kw: Any) -> Emulation:
        """``cpu_quota`` of a core in periods of ``period_us``, lengthened where the share would be under the
        kernel's smallest quota (1 ms per period): 2.5% is 1 ms per 40 ms."""
        if not cpu_quota > 0:
            raise ValueError("cpu_quota must be positive")
        return cls(cpu_quota=cpu_quota, cpu_period_us=max(period_us, math.ceil(1000 / cpu_quota)), **kw)


def tbf_args(bps: float) -> list[str]:
    """``tc`` arguments of a token bucket at ``bps``: 20 ms of burst (at least one MTU) and 2 s of queue."""
    burst = max(1600, int(bps / 8 * 0.02))
    limit = max(64_000, int(bps / 8 * 2.0))
    return ["tbf", "rate", f"{int(bps)}bit", "burst", str(burst), "limit", str(limit)]


class _Bed:
    """``with bed:`` runs ``up``, and always ``down`` at the end (also on SIGTERM, and when ``up`` fails)."""

    def up(self) -> None:
        raise NotImplementedError

    def down(self) -> None:
        raise NotImplementedError

    def __enter__(self: _B) -> _B:
        self._previous_sigterm = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            self.up()
        except BaseException:
            self.down()
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()
        signal.signal(signal.SIGTERM, self._previous_sigterm)


_B = TypeVar("_B", bound=_Bed)


class Testbed(_Bed):
    """``with Testbed(Emulation(...)) as bed:`` sets it up, and always tears it down (also on SIGTERM)."""

    def __init__(self, emulation: Emulation, *, loopback: bool = False) -> None:
        self.emulation = emulation
        self.loopback = loopback
        self.uplink_bps = emulation.uplink_bps
        self._cgroup: Path | None = None
        self._procs_file: Path | None = None

    # ---- where things run ------------------------------------------------------------------------
    @property
    def edge_host(self) -> str:
        return "127.0.0.1" if self.loopback else EDGE_IP

    def device_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as a process of the emulated device: in its cgroup, then in its namespace."""
        if self.loopback:
            return list(argv)
        assert self._procs_file is not None
        return ["sh", "-c", 'echo $$ > "$0" && exec ip netns exec ' + NS_DEVICE + ' "$@"', str(self._procs_file),
                *argv]

    def edge_argv(self, argv: Sequence[str]) -> list[str]:
        return list(argv) if self.loopback else ["ip", "netns", "exec", NS_EDGE, *argv]

    def describe(self) -> dict[str, Any]:
        """The emulation parameters, for every output that uses the testbed."""
        e = self.emulation
        if self.loopback:
            return {"mode": "loopback (NOT the namespace testbed: no root)", "uplink": "emulated in deviced "
                    "(each upload delayed by bytes / rate)", "device_cpu": f"deviced stretches its compute by "
                    f"{1 / e.cpu_quota:.0f}x", "edge_cpu": "this host, unconstrained"}
        return {"mode": "netns testbed", "link": f"veth {VETH_DEVICE} ({NS_DEVICE}, {DEVICE_IP}) <-> {VETH_EDGE} "
                f"({NS_EDGE}, {EDGE_IP})",
                "uplink": f"tc tbf on {VETH_DEVICE} egress (GSO off: one segment per packet); downlink unshaped",
                "device_cpu": f"cgroup {self._cgroup}: {e.cpu_quota * 100:g}% of one core "
                f"(quota {int(e.cpu_quota * e.cpu_period_us)} us per {e.cpu_period_us} us)",
                "edge_cpu": "this host, unconstrained", "delay": "none added (netem unavailable)"}

    # ---- lifecycle -------------------------------------------------------------------------------
    def up(self) -> None:
        if self.loopback:
            return
        check_privileges()
        down()  # a testbed left over by a killed run
        self._cgroup, self._procs_file = _make_cgroup(self.emulation)
        for ns in (NS_DEVICE, NS_EDGE):
            _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", VETH_DEVICE, "type", "veth", "peer", "name", VETH_EDGE)
        for ns, dev, ip in ((NS_DEVICE, VETH_DEVICE, DEVICE_IP), (NS_EDGE, VETH_EDGE, EDGE_IP)):
            _sh("ip", "link", "set", dev, "netns", ns)
            _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _sh("ip", "-n", ns, "link", "set", dev, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        # static neighbours: a saturated uplink queue would drop ARP, and the link would look down
        macs = {ns: _mac(ns, dev) for ns, dev in ((NS_DEVICE, VETH_DEVICE), (NS_EDGE, VETH_EDGE))}
        for ns, dev, peer_ip, peer_ns in ((NS_DEVICE, VETH_DEVICE, EDGE_IP, NS_EDGE),
                                          (NS_EDGE, VETH_EDGE, DEVICE_IP, NS_DEVICE)):
            _sh("ip", "-n", ns, "neigh", "replace", peer_ip, "lladdr", macs[peer_ns], "dev", dev, "nud", "permanent")
        # one TCP segment per packet on the shaped side: tbf splits an oversized GSO packet only as it enqueues
        # it, so a 20 KB packet queued at 10 Mbps (25 KB burst) sits at the head for good once the rate drops to
        # 1 Mbps (2.5 KB burst), and the uplink, new connections included, is dead until the rate rises again
        _sh("ip", "-n", NS_DEVICE, "link", "set", "dev", VETH_DEVICE, "gso_max_segs", "1")
        _sh("ip", "netns", "exec", NS_DEVICE, "tc", "qdisc", "add", "dev", VETH_DEVICE, "root",
            *tbf_args(self.uplink_bps))

    def set_uplink(self, bps: float) -> None:
        """Change the device's uplink rate while everything runs (loopback: the caller tells deviced)."""
        self.uplink_bps = bps
        if not self.loopback:
            _sh("ip", "netns", "exec", NS_DEVICE, "tc", "qdisc", "change", "dev", VETH_DEVICE, "root",
                *tbf_args(bps))

    def down(self) -> None:
        if not self.loopback:
            down()


def check_privileges() -> None:
    if os.geteuid() != 0:
        raise TestbedError("the namespace testbed needs root (network namespaces, tc, cgroups); run as root, "
                           "or pass --loopback for the in-application emulation (labelled as such)")
    for tool in ("ip", "tc"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode != 0:
            raise TestbedError(f"`{tool}` not found: install iproute2")


def down() -> None:
    """Remove the testbed's namespaces, veth pair and cgroup, killing what runs in them (idempotent)."""
    _remove([NS_DEVICE, NS_EDGE], [CGROUP_NAME])


def _remove(namespaces: Sequence[str], cgroups: Sequence[str]) -> None:
    for ns in namespaces:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    for cgroup in [base / name for name in cgroups for base in (CGROUP_ROOT / "cpu", CGROUP_ROOT)]:
        for _ in range(50):
            try:
                procs = (cgroup / "cgroup.procs").read_text().split()
            except OSError:
                break  # no such cgroup (any more)
            for pid in procs:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            with contextlib.suppress(OSError):
                cgroup.rmdir()
                break
            time.sleep(0.1)


def _make_cgroup(e: Emulation, name: str = CGROUP_NAME) -> tuple[Path, Path]:
    v1 = CGROUP_ROOT / "cpu"
    quota = int(e.cpu_quota * e.cpu_period_us)
    if (v1 / "cpu.cfs_quota_us").exists():
        cg = v1 / name
        cg.mkdir(exist_ok=True)
        (cg / "cpu.cfs_period_us").write_text(str(e.cpu_period_us))
        (cg / "cpu.cfs_quota_us").write_text(str(quota))
        return cg, cg / "cgroup.procs"
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        if "cpu" not in (CGROUP_ROOT / "cgroup.subtree_control").read_text().split():
            (CGROUP_ROOT / "cgroup.subtree_control").write_text("+cpu")
        cg = CGROUP_ROOT / name
        cg.mkdir(exist_ok=True)
        (cg / "cpu.max").write_text(f"{quota} {e.cpu_period_us}")
        return cg, cg / "cgroup.procs"
    raise TestbedError("no cgroup cpu controller found under /sys/fs/cgroup (v1 cpu/ or v2 cpu.max)")


# ---- the fleet testbed ---------------------------------------------------------------------------------------------
NS_HUB, BRIDGE, HUB_IP, HUB_MAC = "coinfer-hub", "cfbr0", "10.78.0.1", "02:78:00:00:00:01"
FLEET_MAX = 16


@dataclass(frozen=True, slots=True, kw_only=True)
class Member:
    """One emulated worker: its CPU share of one core and its links to the hub (where the broker runs)."""

    name: str
    cpu_quota: float
    uplink_bps: float
    downlink_bps: float


class Fleetbed(_Bed):
    """``with Fleetbed(members) as bed:``: member ``i`` in namespace ``coinfer-w<i>`` (10.78.0.<10+i>), its cgroup
    ``coinfer-w<i>``; the hub (``bed.hub_argv``) holds the bridge, the broker and the edge. Torn down on exit."""

    def __init__(self, members: Sequence[Member], *, cpu_period_us: int = 10_000) -> None:
        if not 1 <= len(members) <= FLEET_MAX:
            raise TestbedError(f"a fleet testbed has 1..{FLEET_MAX} members")
        for m in members:
            Emulation(uplink_bps=m.uplink_bps, cpu_quota=m.cpu_quota, cpu_period_us=cpu_period_us)  # validates
        self.members = list(members)
        self.cpu_period_us = cpu_period_us
        self._procs: dict[str, Path] = {}

    @property
    def hub_host(self) -> str:
        return HUB_IP

    def _ns(self, i: int) -> str:
        return f"coinfer-w{i}"

    def argv(self, name: str, argv: Sequence[str]) -> list[str]:
        """``argv`` as a process of member ``name``: in its cgroup, then in its namespace."""
        i = [m.name for m in self.members].index(name)
        return ["sh", "-c", 'echo $$ > "$0" && exec ip netns exec ' + self._ns(i) + ' "$@"', str(self._procs[name]),
                *argv]

    def hub_argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", NS_HUB, *argv]

    def set_quota(self, name: str, cpu_quota: float) -> None:
        """Throttle (or release) member ``name``'s CPU while it runs (a share below 1 ms per period lengthens the
        period: the kernel's smallest quota is 1 ms)."""
        e = Emulation.with_quota(cpu_quota, period_us=self.cpu_period_us)
        i = [m.name for m in self.members].index(name)
        _make_cgroup(e, self._ns(i))

    def describe(self) -> dict[str, Any]:
        return {"mode": "fleet netns testbed", "hub": f"{NS_HUB} ({HUB_IP}, bridge {BRIDGE}): broker and edge, "
                "this host unconstrained",
                "members": [{"name": m.name, "namespace": self._ns(i), "ip": f"10.78.0.{10 + i}",
                             "cpu": f"{m.cpu_quota:.0%} of one core (cgroup, period {self.cpu_period_us} us)",
                             "uplink_bps": m.uplink_bps, "downlink_bps": m.downlink_bps}
                            for i, m in enumerate(self.members)],
                "links": "tc tbf on each end of the member's veth (GSO off), no delay added (netem unavailable)"}

    def up(self) -> None:
        check_privileges()
        self.down()
        _sh("ip", "netns", "add", NS_HUB)
        # a fixed address: a bridge otherwise takes its lowest port's, and the members' static neighbours go stale
        _sh("ip", "-n", NS_HUB, "link", "add", BRIDGE, "address", HUB_MAC, "type", "bridge")
        _sh("ip", "-n", NS_HUB, "addr", "add", f"{HUB_IP}/24", "dev", BRIDGE)
        _sh("ip", "-n", NS_HUB, "link", "set", BRIDGE, "up")
        _sh("ip", "-n", NS_HUB, "link", "set", "lo", "up")
        for i, m in enumerate(self.members):
            ns, dev, peer, ip = self._ns(i), f"cfw{i}", f"cfw{i}h", f"10.78.0.{10 + i}"
            _, procs = _make_cgroup(Emulation(cpu_quota=m.cpu_quota, cpu_period_us=self.cpu_period_us), ns)
            self._procs[m.name] = procs
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", dev, "type", "veth", "peer", "name", peer)
            _sh("ip", "link", "set", dev, "netns", ns)
            _sh("ip", "link", "set", peer, "netns", NS_HUB)
            _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            for where, link in ((ns, dev), (ns, "lo"), (NS_HUB, peer)):
                _sh("ip", "-n", where, "link", "set", link, "up")
            _sh("ip", "-n", NS_HUB, "link", "set", peer, "master", BRIDGE)
            # static neighbours both ways (a saturated queue would drop ARP), one segment per packet (see Testbed)
            _sh("ip", "-n", ns, "neigh", "replace", HUB_IP, "lladdr", HUB_MAC, "dev", dev, "nud", "permanent")
            _sh("ip", "-n", NS_HUB, "neigh", "replace", ip, "lladdr", _mac(ns, dev), "dev", BRIDGE, "nud",
                "permanent")
            for where, link, bps in ((ns, dev, m.uplink_bps), (NS_HUB, peer, m.downlink_bps)):
                _sh("ip", "-n", where, "link", "set", "dev", link, "gso_max_segs", "1")
                _sh("ip", "netns", "exec", where, "tc", "qdisc", "add", "dev", link, "root", *tbf_args(bps))

    def down(self) -> None:
        names = [self._ns(i) for i in range(FLEET_MAX)]
        _remove([*names, NS_HUB], names)


@contextlib.contextmanager
def broker(tmp: Path, host: str, wrap: Callable[[list[str]], list[str]]) -> Iterator[None]:
    """mosquitto from the repository's ``mosquitto.conf`` on ``BROKER_PORT``, listening on ``host``, run as
    ``wrap`` makes it (in the edge's or the hub's namespace)."""
    conf = tmp / "mosquitto.conf"
    conf.write_text((REPO / "mosquitto.conf").read_text().replace(f"listener {BROKER_PORT} 127.0.0.1",
                                                                   f"listener {BROKER_PORT} {host}"))
    with process(wrap([mosquitto_binary(), "-c", str(conf)]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
        time.sleep(0.5)
        yield


def _sh(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise TestbedError(f"`{' '.join(argv)}` failed: {done.stderr.strip()}")


def _mac(ns: str, dev: str) -> str:
    done = subprocess.run(["ip", "-n", ns, "-j", "link", "show", "dev", dev], capture_output=True, text=True)
    if done.returncode != 0:
        raise TestbedError(f"cannot read {dev}'s address in {ns}: {done.stderr.strip()}")
    return str(json.loads(done.stdout)[0]["address"])


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def process(argv: Sequence[str], **kwargs: Any) -> Iterator[subprocess.Popen[str]]:
    """A child process that is terminated (then killed) when the block ends, however it ends."""
    proc = subprocess.Popen(list(argv), text=True, **kwargs)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
