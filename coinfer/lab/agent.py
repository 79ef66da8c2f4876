"""The device side of ``coinfer bench edgent``: deviced in one process, driven by JSON lines on stdin.

It runs inside the testbed's device namespace and CPU cgroup. Each command line gets one JSON answer line
on stdout (logs go to stderr). Commands::

    {"op": "probe", "repeats": 5}                          -> {"bandwidth_bps", "rtt_s"}
    {"op": "uplink", "bps": 5e5}                           -> {} (loopback mode: the in-app emulation)
    {"op": "run", "method": "coinfer", "deadline_s": 0.05, "first": 0, "count": 20}
    {"op": "run", "method": "fixed", "exit": 5, "cut": 0 | ["tensor", ...], "encoding": "int8", ...}
                                                           -> {"records": [...]}
    {"op": "stream", "mode": "coinfer"|"fixed", "deadline_s": 0.05, "duration_s": 30, "probe_every_s": 2}
    {"op": "stages", "repeats": 10}   -> {"stages": [{"exit", "cut", "median_s"}]} (head stages, timed)
    {"op": "arrivals", "offsets": [0.3, 1.1, ...], "deadline_s": 10}  -> {"records": [...]} (requests at those
        seconds from now, concurrently: an arrival process, for ``coinfer bench energy --testbed``)

``method`` is ``coinfer`` (the Edgent search with deviced's own fallback), ``coinfer_point`` (the same
with deviced's margins off for these requests: Edgent's own rule, the point prediction), one of the
baselines, or ``fixed``; a baseline or fixed plan is chosen at the request's deadline and then run to
completion (no fallback), and ``met`` is judged against that deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from coinfer.lab.traces import trace_bps
from deviced.config import DevicedConfig
from deviced.engine import Outcome
from deviced.service import Client
from models.bundle import DEFAULT_BUNDLE
from models.data import load_fashion_mnist
from planner import policies
from planner.bandwidth import LinkEstimate
from planner.core import Decision, ExitInfo, Infeasible, Observation, Planner, Prepared, Segment, View
from planner.latency import LatencyModel
from protocol.session import BrokerConfig, configure_logging
from protocol.topics import DEFAULT_PREFIX

RUN_TO_COMPLETION_S = 60.0  # execution deadline of forced plans: they finish wherever they run


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="coinfer-agent", description=__doc__.split("\n\n")[0])
    p.add_argument("--broker-host", default="127.0.0.1")
    p.add_argument("--broker-port", type=int, required=True)
    p.add_argument("--device-model", type=Path, required=True)
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    p.add_argument("--topic-prefix", default=DEFAULT_PREFIX)
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--emulate-uplink", default="", help="loopback mode only")
    p.add_argument("--emulate-slowdown", type=float, default=1.0, help="loopback mode only")
    p.add_argument("--policy", default=policies.DEFAULT, choices=[policies.AUTO, *sorted(policies.POLICIES)],
                   help="deviced's planning policy (method `coinfer`)")
    p.add_argument("--planner", default="{}", help="the policy's parameters, a JSON object")
    p.add_argument("--compute-knob", default="none", help="deviced's compute_knob (cgroup: the testbed's quota)")
    p.add_argument("--log-level", default="warning", help="deviced's log level (on stderr)")
    args = p.parse_args(argv)
    configure_logging(args.log_level, stream=sys.stderr)
    if args.compute_knob == "cgroup":
        _expose_cgroup()
    cfg = DevicedConfig(device_id="testbed-device", bundle=args.bundle, latency_model=args.device_model,
                        probe_interval_s=0,
                        topic_prefix=args.topic_prefix,
                        broker=BrokerConfig(host=args.broker_host, port=args.broker_port),
                        emulate_uplink=args.emulate_uplink, emulate_slowdown=args.emulate_slowdown,
                        planner={"policy": args.policy, **json.loads(args.planner)}, compute_knob=args.compute_knob)
    return asyncio.run(_serve(cfg, args.images))


async def _serve(cfg: DevicedConfig, n_images: int) -> int:
    images, labels = load_fashion_mnist("test")
    loop = asyncio.get_running_loop()
    async with Client(cfg) as client:
        x, y = client.device.bundle.preprocess(images[:n_images]), labels[:n_images]
        _answer({"ready": await client.wait_for_edge(60)})
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            cmd = json.loads(line)
            try:
                _answer(await _command(client, cmd, x, y))
            except Exception as exc:  # answered, so the orchestrator sees what failed
                _answer({"error": f"{type(exc).__name__}: {exc}"})
    return 0


def _answer(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


async def _command(client: Client, cmd: dict[str, Any], x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    device = client.device
    op = cmd["op"]
    if op == "uplink":
        device.dispatch.set_emulated_uplink(float(cmd["bps"]))
        return {}
    if op == "probe":
        return await _probe(client, int(cmd.get("repeats", 5)))
    if op == "run":
        deadline = float(cmd["deadline_s"])
        policy, exec_deadline = _policy(cmd, deadline, client.device.cfg.planner, client.device.bundle.exits)
        if policy is not None:  # an override prepares for the edge before the timed requests, not in the first
            await device.prepare(policy)
        records = []
        point = device.learning.suspended() if cmd["method"] == "coinfer_point" else contextlib.nullcontext()
        with point:
            for i in range(int(cmd["first"]), int(cmd["first"]) + int(cmd["count"])):
                j = i % len(x)
                outcome = await device.infer(x[j], exec_deadline, policy=policy)
                records.append(_record(outcome, deadline, int(y[j]), method=cmd["method"]))
        return {"records": records}
    if op == "stream":
        return await _stream(client, cmd, x, y)
    if op == "stages":
        return {"stages": await _stages(client, x, int(cmd.get("repeats", 10)))}
    if op == "arrivals":
        return await _arrivals(client, cmd, x, y)
    raise ValueError(f"unknown op {op!r}")


async def _probe(client: Client, repeats: int) -> dict[str, Any]:
    device = client.device
    # an edge marked suspect after timeouts is usable again within seconds
    if not await client.wait_for_edge(10.0):
        raise RuntimeError("no edge server known")
    edge = device.edges.choose(asyncio.get_running_loop().time())
    assert edge is not None
    found = [e for _ in range(repeats) if (e := await device.probe(edge.edge_id)) is not None]
    if not found:  # unanswered or uninformative: deviced keeps (and has bounded) its estimate
        return {"bandwidth_bps": device.link.estimate.bandwidth_bps, "rtt_s": device.link.estimate.rtt_s, "probes": 0}
    bps = statistics.median(e.bandwidth_bps for e in found)
    estimate = LinkEstimate(bandwidth_bps=bps, rtt_s=statistics.median(e.rtt_s for e in found), samples=len(found),
                            probed_bps=bps, free_bytes=device.link.estimate.free_bytes)
    device.link.set(estimate)
    return {"bandwidth_bps": estimate.bandwidth_bps, "rtt_s": estimate.rtt_s, "probes": len(found)}


async def _stages(client: Client, x: np.ndarray, repeats: int) -> list[dict[str, Any]]:
    """Median wall time of head stages (exit, cut) run the way deviced runs them: for calibration."""
    device, rows = client.device, []
    feed = {device.bundle.input_name: x[0].reshape(device.bundle.input_shape)}
    for info in device.bundle.exits:
        n, heads = len(info.layers), {c.index: c.tensors for c in info.cuts}
        # a quarter, half and three quarters in, or the nearest listed cut (a DAG has none inside its blocks)
        wanted = {_nearest(heads, t) for t in (n // 4, n // 2, 3 * n // 4)} if heads else set()
        for cut in sorted(wanted | {n}):
            segment = device.runner.whole(info.index) if cut == n else \
                Segment(info.index, frozenset({info.input}), heads[cut])
            stage = device.runner.stage(segment)
            await device.run_stage(stage, feed)  # warm: session creation is not a stage time
            times = [(await device.run_stage(stage, feed))[1] for _ in range(repeats)]
            rows.append({"exit": info.index, "cut": cut, "median_s": statistics.median(times)})
    return rows


def _nearest(indices: Iterable[int], target: int) -> int:
    return min(indices, key=lambda i: abs(i - target))


def _policy(cmd: dict[str, Any], deadline: float, planner: Mapping[str, Any],
            exits: Sequence[ExitInfo]) -> tuple[Planner | None, float]:
    """(policy, execution deadline) of a ``run`` command: deviced's own (its ``planner`` table) for coinfer, else
    the registered policy of that name (``fixed`` takes the command's exit and cut) judged at ``deadline`` and run
    to completion. The same command gets the same policy object again, and with it what that prepared."""
    method = cmd["method"]
    if method in ("coinfer", "coinfer_point"):
        return None, deadline
    key = json.dumps([method, cmd.get("exit"), cmd.get("cut"), cmd.get("encoding"), deadline], sort_keys=True)
    if key in _POLICIES:
        return _POLICIES[key]
    made: tuple[Planner, float]
    if method == "coinfer_float32":  # deviced's policy, its cut tensors never encoded
        own = dict(planner)
        made = policies.make(str(own.pop("policy", policies.DEFAULT)), exits, **own, encodings=False), deadline
    else:
        params: dict[str, Any] = {"exit": int(cmd["exit"])} if "exit" in cmd else {}
        if "cut" in cmd:  # a chain's layer count, or the tensors that cross (unambiguous on a DAG)
            params["cut"] = frozenset(map(str, cmd["cut"])) if isinstance(cmd["cut"], list) else int(cmd["cut"])
        if "encoding" in cmd:
            params["encoding"] = str(cmd["encoding"])
        made = _AtDeadline(policies.make(method, **params), deadline), RUN_TO_COMPLETION_S
    _POLICIES[key] = made
    return made


_POLICIES: dict[str, tuple[Planner, float]] = {}


class _AtDeadline:
    """A policy deciding for ``deadline_s`` while the request runs under another (to completion)."""

    def __init__(self, inner: Planner, deadline_s: float) -> None:
        self.inner, self.deadline_s = inner, deadline_s

    def compile(self, exits: Sequence[ExitInfo], device: LatencyModel, edge: LatencyModel) -> Prepared:
        return self.inner.compile(exits, device, edge)

    def decide(self, view: View) -> Decision | Infeasible:
        return self.inner.decide(replace(view, conditions=replace(view.conditions, deadline_s=self.deadline_s)))

    def observe(self, outcome: Observation) -> None:
        self.inner.observe(outcome)


async def _stream(client: Client, cmd: dict[str, Any], x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Requests back to back for ``duration_s`` while the orchestrator changes the link under them."""
    device, deadline = client.device, float(cmd["deadline_s"])
    fixed: Planner | None = None
    records, start, next_probe, i = [], time.monotonic(), 0.0, 0
    every = float(cmd.get("probe_every_s", 0))
    emulate_trace = bool(cmd.get("emulate_trace"))  # loopback mode: the trace is played in-app, here
    while (now := time.monotonic() - start) < float(cmd["duration_s"]):
        if emulate_trace:
            device.dispatch.set_emulated_uplink(trace_bps(now))
        if cmd["mode"] == "coinfer" and every and now >= next_probe:
            edge = device.edges.choose(asyncio.get_running_loop().time())
            if edge is not None:
                await device.probe(edge.edge_id)
            next_probe = now + every
        j = i % len(x)
        if cmd["mode"] == "coinfer":
            outcome = await device.infer(x[j], deadline)
        else:
            outcome = await device.infer(x[j], RUN_TO_COMPLETION_S if fixed else deadline, policy=fixed)
            if fixed is None:  # the plan the first request got, kept for the whole trace
                fixed = policies.make("fixed", exit=outcome.plan.exit, cut=outcome.plan.cut_tensors)
        records.append({**_record(outcome, deadline, int(y[j]), method=cmd["mode"]), "t": round(now, 4)})
        i += 1
    return {"records": records}


async def _arrivals(client: Client, cmd: dict[str, Any], x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """One request at each offset (seconds from now), each in its own task: an open-loop arrival process."""
    device, deadline, start = client.device, float(cmd["deadline_s"]), time.monotonic()

    async def one(i: int, at: float) -> dict[str, Any]:
        await asyncio.sleep(max(0.0, start + at - time.monotonic()))
        o = await device.infer(x[i % len(x)], deadline)
        act = o.plan.actuation
        return {**_record(o, deadline, int(y[i % len(x)]), method="arrivals"), "t": at,
                "cut_tensors": sorted(o.plan.cut_tensors), "cpu_share": act.cpu_share if act else None,
                "tx_rate_bps": act.tx_rate_bps if act else None}

    records = list(await asyncio.gather(*(one(i, float(t)) for i, t in enumerate(cmd["offsets"]))))
    return {"records": records, "compute_knob": device.actuator.knob.value}


def _expose_cgroup() -> None:
    """``ip netns exec`` gives the agent a fresh /sys without the cgroup mounts: mount this process's CPU
    controller again (private to its mount namespace) so that deviced's cgroup knob finds its own quota."""
    import subprocess

    root = Path("/sys/fs/cgroup")
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, rel = line.split(":", 2)
        if controllers == "" and rel != "/" and not (root / "cgroup.controllers").exists():
            subprocess.run(["mount", "-t", "cgroup2", "none", str(root)], check=True)
            return
        if "cpu" in controllers.split(",") and rel != "/" and not (root / controllers / "cpu.cfs_quota_us").exists():
            if not any(root.iterdir()):
                subprocess.run(["mount", "-t", "tmpfs", "cgroup", str(root)], check=True)
            (root / controllers).mkdir(exist_ok=True)
            subprocess.run(["mount", "-t", "cgroup", "-o", controllers, "none", str(root / controllers)], check=True)
            return


def _record(o: Outcome, deadline: float, label: int, *, method: str) -> dict[str, Any]:
    return {"method": method, "deadline_s": deadline, "plan_exit": o.plan.exit, "plan_cut": o.plan.cut,
            "where": o.where, "exit": o.exit, "predicted_s": o.plan.predicted_s,
            "bound_s": o.plan.bound_s, "latency_s": o.latency_s,
            "met": o.latency_s <= deadline, "correct": int(np.argmax(o.logits)) == label, "fallback": o.fallback,
            "bandwidth_est_bps": o.bandwidth_bps, "stage_s": o.stage_s, "edge_s": o.edge_s,
            "predicted_device_s": o.plan.device_s, "predicted_edge_s": o.plan.edge_s,
            "encoding": o.plan.encoding}


if __name__ == "__main__":
    sys.exit(main())
