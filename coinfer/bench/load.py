"""``coinfer bench load``: many devices against one and then two edged, a soak, and faults under load.

Loopback only (one mosquitto, edged as child processes). Three parts, each bounded in time:

1. **Throughput**: simulated devices (one MQTT connection each, edge-only requests for the whole network
   at exit 5 on the shared pool topic) send open-loop Poisson traffic at rising rates. A rate is
   *sustained* when at least 99% of its requests come back as results within the deadline. Run with one
   edged, then two (the pool's shared subscription spreads the work).
2. **Soak**: a real ``deviced run`` process serves an application over the broker while simulated devices
   keep both edged busy; RSS of every daemon is sampled from start to end.
3. **Faults**: in-process devices (deviced's engine, with its bounded wait and local fallback) send
   requests while the broker restarts, edged is SIGKILLed and restarted, and the broker freezes (every
   connection stalls, as on a dead link). Every request must end as a result or an explicit error.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import psutil

from coinfer.lab.procs import REPO, Daemon, Mosquitto
from deviced.config import DevicedConfig
from deviced.service import Client, RemoteClient, RemoteError
from models.bundle import DEFAULT_BUNDLE, load_bundle
from models.data import load_fashion_mnist, preprocess
from protocol import session
from protocol.errors import ProtocolError
from protocol.messages import ErrorReply, InferRequest, InferResult, decode, encode
from protocol.session import BrokerConfig
from protocol.topics import Topics

PREFIX = "load"
EXIT = 5  # the whole network on the edge: the heaviest tail a device can ask for
DEVICED_START_TRIES = 20  # 1 s each: the soak's deviced loads its bundle and sessions before it answers


@dataclass(frozen=True, slots=True)
class LoadSettings:
    devices: int = 16  # simulated devices for throughput and soak
    deadline_s: float = 0.1
    rates: tuple[float, ...] = (50, 75, 100, 125, 150, 175, 200, 250, 300, 350, 400, 500)
    step_s: float = 4.0
    soak_s: float = 180.0
    soak_fraction: float = 0.5  # soak load: this share of the two-edge sustained rate
    fault_devices: int = 4
    fault_rate: float = 40.0  # requests/s from all fault devices together
    fault_deadline_s: float = 0.2
    fault_s: float = 12.0
    faults: tuple[str, ...] = ("broker_restart", "edged_kill", "broker_freeze")


@dataclass
class StepResult:
    rate: float
    seconds: float
    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    met: float = 0.0  # results within the deadline / sent
    cpu: dict[str, float] = field(default_factory=dict)  # cores used by each process during the step

    @property
    def throughput(self) -> float:
        return self.ok / self.seconds


class Stack:
    """mosquitto plus edged processes on this machine, all stopped on exit."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.broker = Mosquitto.from_template(REPO / "mosquitto.conf", tmp).start()
        self.edges: dict[str, Daemon] = {}

    @property
    def config(self) -> BrokerConfig:
        return self.broker.config

    def edge(self, edge_id: str) -> Daemon:
        conf = self.tmp / f"{edge_id}.toml"
        conf.write_text(f'[edged]\nedge_id = "{edge_id}"\ntopic_prefix = "{PREFIX}"\nworkers = 1\n\n'
                        f"[broker]\nport = {self.broker.port}\n")
        self.edges[edge_id] = Daemon("edged.cli", ["--config", str(conf), "--log-level", "error"]).start()
        return self.edges[edge_id]

    async def wait_adverts(self, edge_ids: list[str], timeout: float = 30) -> None:
        """Until every edge's retained advert is on the broker (edged subscribes before it announces)."""
        t = Topics(PREFIX)
        async with aiomqtt.Client("127.0.0.1", self.broker.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
            await c.subscribe(t.all_edge_adverts())
            seen: set[str] = set()
            async with asyncio.timeout(timeout):
                async for message in c.messages:
                    if not message.payload:
                        continue
                    seen.add(t.edge_id_of(str(message.topic)))
                    if seen >= set(edge_ids):
                        return

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) used so far by each process of the stack and by this one (the load)."""
        pids = {"broker": self.broker.proc.pid if self.broker.proc else 0, "load generator": os.getpid(),
                **{name: d.pid for name, d in self.edges.items() if d.proc is not None}}
        out = {}
        for name, pid in pids.items():
            with contextlib.suppress(psutil.Error):
                t = psutil.Process(pid).cpu_times()
                out[name] = t.user + t.system
        return out

    def rss_mb(self) -> dict[str, float]:
        return {name: rss_mb(d.pid) for name, d in self.edges.items() if d.proc is not None}

    def close(self) -> None:
        for d in self.edges.values():
            d.stop()
        self.broker.stop()


def rss_mb(pid: int) -> float:
    try:
        return round(float(psutil.Process(pid).memory_info().rss) / 2**20, 1)
    except psutil.Error:
        return float("nan")


@contextlib.contextmanager
def stack() -> Iterator[Stack]:
    with tempfile.TemporaryDirectory(prefix="coinfer-load-") as tmp:
        s = Stack(Path(tmp))
        try:
            yield s
        finally:
            s.close()


# ---- 1. open-loop simulated devices ---------------------------------------------------------------------
async def open_loop(port: int, rate: float, seconds: float, devices: int, deadline_s: float,
                    images: np.ndarray, digest: str) -> StepResult:
    """``rate`` requests/s (Poisson) for ``seconds`` from ``devices`` connections; every request accounted."""
    t = Topics(PREFIX)
    sent_at: dict[str, float] = {}
    latencies: list[float] = []
    result = StepResult(rate=rate, seconds=seconds)
    errors: Counter[str] = Counter()
    ids = itertools.count()

    async def device(i: int, client: aiomqtt.Client) -> None:
        dev = f"sim-{i}"
        rng = random.Random(i)
        end = time.monotonic() + seconds
        next_at = time.monotonic() + rng.expovariate(rate / devices)
        while next_at < end:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            rid = f"{dev}-{next(ids)}"
            x = images[rng.randrange(len(images))][None]
            payload = encode(InferRequest(request_id=rid, device_id=dev, bundle=digest, exit=EXIT, cut=0,
                                          budget_s=deadline_s, tensors={"input": x}))
            sent_at[rid] = time.monotonic()
            await client.publish(t.pool_request(dev), payload, qos=session.TRAFFIC_QOS,
                                 properties=session.request_properties(response_topic=t.device_responses(dev),
                                                                       correlation=rid, expiry_s=deadline_s))
            next_at += rng.expovariate(rate / devices)

    async def reader(client: aiomqtt.Client) -> None:
        async for message in client.messages:
            now = time.monotonic()
            try:
                msg = decode(message.payload if isinstance(message.payload, bytes) else b"")
            except ProtocolError:
                continue
            if not isinstance(msg, InferResult | ErrorReply) or msg.request_id not in sent_at:
                continue
            start = sent_at.pop(msg.request_id)
            if isinstance(msg, InferResult):
                latencies.append(now - start)
            else:
                errors[msg.code.value] += 1

    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for i in range(devices):
            c = await stack.enter_async_context(aiomqtt.Client("127.0.0.1", port, identifier=f"sim-{i}-{rate}",
                                                               protocol=aiomqtt.ProtocolVersion.V5))
            await c.subscribe(t.device_responses(f"sim-{i}"), qos=0)
            clients.append(c)
        readers = [asyncio.create_task(reader(c)) for c in clients]
        await asyncio.gather(*(device(i, c) for i, c in enumerate(clients)))
        total = len(sent_at) + len(latencies) + sum(errors.values())
        await asyncio.sleep(deadline_s + 1.0)  # stragglers
        for r in readers:
            r.cancel()
    lat = np.array(latencies) if latencies else np.array([np.nan])
    result.sent, result.ok, result.errors, result.lost = total, len(latencies), dict(errors), len(sent_at)
    result.p50_ms, result.p95_ms, result.p99_ms = (round(float(np.percentile(lat, q)) * 1e3, 2) for q in (50, 95, 99))
    result.met = float(np.sum(lat <= deadline_s)) / max(total, 1)
    return result


async def sweep(s: Stack, settings: LoadSettings, images: np.ndarray, digest: str,
                log: Callable[[str], None]) -> dict[str, Any]:
    """Rising rates until two steps in a row miss; the sustained rate is the highest with >= 99% met."""
    steps: list[StepResult] = []
    misses = 0
    for rate in settings.rates:
        cpu0, t0 = s.cpu_seconds(), time.monotonic()
        r = await open_loop(s.broker.port, rate, settings.step_s, settings.devices, settings.deadline_s, images, digest)
        cpu1, wall = s.cpu_seconds(), time.monotonic() - t0
        r.cpu = {k: round((cpu1[k] - cpu0[k]) / wall, 2) for k in cpu1 if k in cpu0}
        steps.append(r)
        log(f"  {rate:6.0f} req/s offered: {r.throughput:6.1f} results/s, p50 {r.p50_ms:6.1f} p99 {r.p99_ms:7.1f} "
            f"ms, met {r.met:6.1%}, errors {r.errors or '-'}, lost {r.lost}; cores busy "
            + " ".join(f"{k} {v:.2f}" for k, v in r.cpu.items()))
        misses = misses + 1 if r.met < 0.99 else 0
        if misses == 2:
            break
    sustained = max((r.rate for r in steps if r.met >= 0.99), default=0.0)
    return {"sustained_rps": sustained, "steps": [asdict(r) | {"throughput": r.throughput} for r in steps]}


# ---- 2. soak ----------------------------------------------------------------------------------------------
async def soak(s: Stack, settings: LoadSettings, rate: float, images: np.ndarray, digest: str,
               log: Callable[[str], None]) -> dict[str, Any]:
    conf = s.tmp / "soak-device.toml"
    conf.write_text(f'[deviced]\ndevice_id = "soak-dev"\ntopic_prefix = "{PREFIX}"\ninitial_bandwidth = "100Mbps"\n'
                    f"\n[broker]\nport = {s.broker.port}\n")
    samples: list[dict[str, Any]] = []
    app = Counter[str]()
    with Daemon("deviced.cli", ["run", "--config", str(conf), "--log-level", "error"]) as device:
        await asyncio.sleep(2.0)

        def sample(t0: float) -> None:
            samples.append({"t_s": round(time.monotonic() - t0, 1), "deviced": rss_mb(device.pid), **s.rss_mb()})

        async def application() -> None:
            async with RemoteClient(s.config, "soak-dev", prefix=PREFIX) as c:
                for _ in range(DEVICED_START_TRIES):  # deviced is up once it answers (not counted)
                    with contextlib.suppress(TimeoutError):
                        await c.infer(images[0], deadline=0.2, timeout=1.0)
                        break
                end = time.monotonic() + settings.soak_s
                i = 0
                while time.monotonic() < end:
                    try:
                        await c.infer(images[i % len(images)], deadline=0.2, timeout=5)
                        app["results"] += 1
                    except RemoteError:
                        app["errors"] += 1
                    except TimeoutError:
                        app["lost"] += 1
                    app["sent"] += 1
                    i += 1
                    await asyncio.sleep(0.05)

        async def sampler(t0: float) -> None:
            while True:
                sample(t0)
                await asyncio.sleep(max(settings.soak_s / 12, 1.0))

        t0 = time.monotonic()
        task = asyncio.create_task(sampler(t0))
        background, _ = await asyncio.gather(
            open_loop(s.broker.port, rate, settings.soak_s, settings.devices, settings.deadline_s, images, digest),
            application())
        task.cancel()
        sample(t0)
    first, last = samples[0], samples[-1]
    log(f"  RSS MB before -> after {settings.soak_s:.0f} s: "
        + ", ".join(f"{k} {first[k]} -> {last[k]}" for k in first if k != "t_s"))
    return {"seconds": settings.soak_s, "rate": rate, "background": asdict(background), "app": dict(app),
            "rss_mb": samples}


# ---- 3. faults under load ---------------------------------------------------------------------------------
FaultAction = Callable[[Stack], Awaitable[float]]


async def _broker_restart(s: Stack) -> float:
    s.broker.stop()
    await asyncio.sleep(1.0)
    s.broker.start()
    return time.monotonic()


async def _edged_kill(s: Stack) -> float:
    s.edges["edge-1"].kill()
    await asyncio.sleep(2.0)
    s.edges["edge-1"].start()
    return time.monotonic()


async def _broker_freeze(s: Stack) -> float:
    s.broker.freeze(True)
    await asyncio.sleep(3.0)
    s.broker.freeze(False)
    return time.monotonic()


FAULTS: dict[str, tuple[str, FaultAction]] = {
    "broker_restart": ("mosquitto stopped, restarted 1 s later (nothing persisted)", _broker_restart),
    "edged_kill": ("edged SIGKILLed, restarted 2 s later", _edged_kill),
    "broker_freeze": ("mosquitto frozen (SIGSTOP) for 3 s: every connection stalls, as on a dead link",
                      _broker_freeze),
}


async def fault_run(s: Stack, name: str, settings: LoadSettings, images: np.ndarray,
                    log: Callable[[str], None]) -> dict[str, Any]:
    """In-process devices under load while ``name`` happens 3 s in; every request must end."""
    what, action = FAULTS[name]
    records: list[tuple[float, str, bool]] = []  # (finished at, where, met)
    counts = Counter[str]()
    per_device = settings.fault_rate / settings.fault_devices

    async def device(i: int, client: Client, end: float) -> None:
        rng = random.Random(100 + i)
        pending: set[asyncio.Task[None]] = set()

        async def one(x: np.ndarray) -> None:
            counts["sent"] += 1
            try:
                o = await asyncio.wait_for(client.infer(x, deadline=settings.fault_deadline_s), timeout=10)
            except TimeoutError:
                counts["lost"] += 1
            except Exception:  # an explicit error from the device API
                counts["errors"] += 1
            else:
                counts["results"] += 1
                records.append((time.monotonic(), o.where, o.met))

        while time.monotonic() < end:
            task = asyncio.create_task(one(images[rng.randrange(len(images))]))
            pending.add(task)
            task.add_done_callback(pending.discard)
            await asyncio.sleep(rng.expovariate(per_device))
        if pending:
            await asyncio.wait(pending)

    cfgs = [DevicedConfig(device_id=f"f-{name[:8]}-{i}", topic_prefix=PREFIX, broker=s.config, probe_interval_s=0,
                          initial_bandwidth="100Mbps") for i in range(settings.fault_devices)]
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(Client(c)) for c in cfgs]
        for c in clients:
            await c.wait_for_edge(10)
        start = time.monotonic()
        end = start + settings.fault_s
        devices = asyncio.gather(*(device(i, c, end) for i, c in enumerate(clients)))
        await asyncio.sleep(3.0)
        injected = time.monotonic()
        cleared = await action(s)
        await devices
    after = sorted(t for t, where, _ in records if t > cleared and where != "device")
    recovery = round(after[0] - injected, 2) if after else None
    during = [r for r in records if injected <= r[0] <= cleared]
    row = {"fault": name, "what": what, **{k: counts[k] for k in ("sent", "results", "errors", "lost")},
           "met": round(float(np.mean([m for _, _, m in records])), 3) if records else 0.0,
           "local_during_fault": sum(1 for r in during if r[1] == "device"), "answered_during_fault": len(during),
           "fault_s": round(cleared - injected, 2), "recovery_s": recovery}
    log(f"  {name:<15} sent {row['sent']:4d} results {row['results']:4d} errors {row['errors']} lost {row['lost']}  "
        f"met {row['met']:.0%}  edge served again {recovery} s after the fault began")
    return row


# ---- the whole benchmark ----------------------------------------------------------------------------------
def run(out: Path, settings: LoadSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    return asyncio.run(_run(out, settings, log))


async def _run(out: Path, settings: LoadSettings, log: Callable[[str], None]) -> dict[str, Any]:
    session.configure_logging("error")
    started = time.monotonic()
    images = preprocess(load_fashion_mnist("test")[0][:256])
    digest = load_bundle(DEFAULT_BUNDLE).digest
    doc: dict[str, Any] = {"settings": asdict(settings), "note": (
        "loopback only: mosquitto, edged processes (1 worker, 1 onnxruntime thread each) and the load generator "
        "share this host's CPUs; requests are edge-only, the whole network to exit 5")}
    with stack() as s:
        results: dict[str, Any] = {}
        for n in (1, 2):
            for i in range(len(s.edges), n):
                s.edge(f"edge-{i + 1}")
            await s.wait_adverts(list(s.edges))
            log(f"throughput, {n} edged, {settings.devices} simulated devices, deadline "
                f"{settings.deadline_s * 1e3:.0f} ms:")
            results[f"edges_{n}"] = await sweep(s, settings, images, digest, log)
        one, two = results["edges_1"]["sustained_rps"], results["edges_2"]["sustained_rps"]
        doc["throughput"] = results | {"scaling": round(two / one, 2) if one else None}
        log(f"  sustained at >= 99% met: 1 edged {one:.0f} req/s, 2 edged {two:.0f} req/s "
            f"(x{doc['throughput']['scaling']})")
        if settings.soak_s > 0:
            rate = max(settings.soak_fraction * two, 10.0)
            log(f"soak: {settings.soak_s:.0f} s, {rate:.0f} req/s simulated + one deviced serving an application:")
            doc["soak"] = await soak(s, settings, rate, images, digest, log)
        log(f"faults under load ({settings.fault_devices} devices, {settings.fault_rate:.0f} req/s, deadline "
            f"{settings.fault_deadline_s * 1e3:.0f} ms, 1 edged):")
        s.edges.pop("edge-2").stop()
        doc["faults"] = [await fault_run(s, name, settings, images, log) for name in settings.faults]
    doc["wall_s"] = round(time.monotonic() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    log(f"wrote {out} ({doc['wall_s']} s)")
    return doc
