"""``coinfer bench pipeline --out DIR``: pipelined streams through real daemons on the fleet testbed (root).

Four Pi-class device namespaces (``testbed.Fleetbed``: each its own CPU quota and shaped links) and a hub with
the broker and an edge deviced (this host, unconstrained). Every worker runs ``deviced run``; the camera device
runs ``deviced stream`` over real Fashion-MNIST frames. What it measures:

- **scaling**: frames/s and per-frame latency over 1, 2, 3 and 4 devices, and each with the edge, against the
  planner's prediction for the plan it ran (the stream's last plan: the controller may correct a worker's
  speed once it has measured it), against the best single device and the camera + edge split;
- **faults**: one long stream over the four devices; one worker SIGKILLed mid-stream, later another throttled
  to a quarter of its CPU: frames sent, results, errors, duplicates delivered, out-of-order deliveries, time to
  recover, throughput before and after, the daemons' memory (RSS samples) and the stage queues' depth.

The workers' latency models are the testbed device's, calibrated on this host for a 10% quota
(``docs/results/edgent/device-latency-model.json``: the host's per-layer model x a fitted slowdown + a per-stage
overhead, under the quota), its quota set to each worker's; the edge's is the host's per-layer model. A short
calibration before each group of runs (the camera alone, then the camera and the edge, each streaming 30 frames)
scales the devices' and the edge's speeds to this host's speed at that moment (it drifts by tens of percent
within minutes); every multi-device prediction is then out of sample.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from coinfer.lab.procs import REPO
from coinfer.lab.testbed import BROKER_PORT, Fleetbed, Member, broker, process
from planner.pipeline import QUEUE_SLOTS

CALIBRATED = REPO / "docs" / "results" / "edgent"
BUNDLE = REPO / "models" / "bundles" / "fmnist56-branchy-alexnet"  # the bundle the device model was calibrated on
MEMBERS = (Member(name="cam", cpu_quota=0.10, uplink_bps=20e6, downlink_bps=20e6),
           Member(name="w1", cpu_quota=0.10, uplink_bps=10e6, downlink_bps=20e6),
           Member(name="w2", cpu_quota=0.20, uplink_bps=20e6, downlink_bps=40e6),
           Member(name="w3", cpu_quota=0.15, uplink_bps=40e6, downlink_bps=40e6))
EDGE = "edge"
WARMUP_FRAMES = 5  # results of a plan before its steady state
STEADY_MIN = 20  # results a steady-state rate is measured over
CALIBRATION_FRAMES = 30


def run(out: Path, *, frames: int = 100, fault_frames: int = 300, log: Callable[[str], None] = print
        ) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".work"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    images = tmp / "images.npy"
    from models.data import load_fashion_mnist

    np.save(images, load_fashion_mnist("test")[0][: max(frames, fault_frames)])
    doc: dict[str, Any] = {"frames": frames, "members": [_member(m) for m in MEMBERS]}
    with Fleetbed(MEMBERS) as bed, broker(tmp, bed.hub_host, bed.hub_argv):
        doc["emulation"] = bed.describe()
        with contextlib.ExitStack() as stack:
            workers = {m.name: stack.enter_context(_worker(bed, tmp, m.name)) for m in MEMBERS[1:]}
            workers[EDGE] = stack.enter_context(_worker(bed, tmp, EDGE))
            _wait_online(bed, [m.name for m in MEMBERS[1:]] + [EDGE])
            calibrations: list[dict[str, Any]] = []
            doc["calibrations"], doc["scaling"] = calibrations, {"devices": [], "devices+edge": []}
            names = [m.name for m in MEMBERS]
            for k in range(1, len(MEMBERS) + 1):
                fleet = _calibrate(bed, tmp, images, calibrations, log)  # this host's speed drifts within minutes
                for series, extra in (("devices", []), ("devices+edge", [EDGE])):
                    row = {"k": k, **_stream(bed, tmp, fleet, images, names[:k] + extra, frames)}
                    doc["scaling"][series].append(row)
                    log(f"  {series:<13} k={k}: measured {row['measured_fps']:6.2f} f/s, planned "
                        f"{row['planned_fps']:6.2f} ({row['fps_error']:+.1%}); latency p50 "
                        f"{row['latency_p50_s'] * 1e3:6.1f} ms "
                        f"(window x period {row['saturated_latency_s'] * 1e3:6.1f}; "
                        f"a frame alone {row['planned_latency_s'] * 1e3:6.1f}); "
                        f"{row['replans']} re-plan(s)")
            doc["baselines"] = _baselines(fleet, names)
            log("faults: four devices, one killed, then another throttled ...")
            fleet = _calibrate(bed, tmp, images, calibrations, log)
            doc["faults"] = _faults(bed, tmp, fleet, images, names, fault_frames, workers, log)
    (out / "testbed.json").write_text(json.dumps(doc, indent=1) + "\n")
    _plot(doc, out)
    shutil.rmtree(tmp, ignore_errors=True)
    return doc


def _member(m: Member) -> dict[str, Any]:
    return {"name": m.name, "cpu_quota": m.cpu_quota, "uplink_bps": m.uplink_bps, "downlink_bps": m.downlink_bps}


# ---- processes ----------------------------------------------------------------------------------------------------
def _config(bed: Fleetbed, tmp: Path, name: str) -> Path:
    conf = tmp / f"{name}.toml"
    conf.write_text(f'[deviced]\ndevice_id = "{name}"\nprobe_interval_s = 0\ncompute_knob = "none"\n'
                    f'bundle = "{BUNDLE}"\n\n'
                    f'[broker]\nhost = "{bed.hub_host}"\nport = {BROKER_PORT}\n')
    return conf


@contextlib.contextmanager
def _worker(bed: Fleetbed, tmp: Path, name: str) -> Iterator[subprocess.Popen[str]]:
    argv = [sys.executable, "-m", "deviced.cli", "run", "--config", str(_config(bed, tmp, name)), "--log-level",
            "warning"]
    with process(bed.hub_argv(argv) if name == EDGE else bed.argv(name, argv), cwd=REPO,
                 stdout=subprocess.DEVNULL) as proc:
        yield proc


def _wait_online(bed: Fleetbed, names: Sequence[str], timeout_s: float = 180.0) -> None:
    """Until every daemon's retained status says online (a worker under a 10% quota takes ~20 s to start)."""
    code = ("import sys, paho.mqtt.client as m\n"
            "want, seen = set(sys.argv[1].split(',')), set()\n"
            "def on(c, u, msg):\n"
            "    if b'online' in msg.payload: seen.add(msg.topic.split('/')[-2])\n"
            "    if seen >= want: c.disconnect()\n"
            "c = m.Client(m.CallbackAPIVersion.VERSION2)\n"
            "c.on_message = on\n"
            f"c.connect('{bed.hub_host}', {BROKER_PORT})\n"
            "c.subscribe('coinfer/dev/+/status')\n"
            "c.loop_forever()\n")
    subprocess.run(bed.hub_argv([sys.executable, "-c", code, ",".join(names)]), check=True, timeout=timeout_s)


def _calibrate(bed: Fleetbed, tmp: Path, images: Path, calibrations: list[dict[str, Any]],
               log: Callable[[str], None]) -> Path:
    """The fleet file at this host's speed now: the devices' speed from the camera alone streaming
    ``CALIBRATION_FRAMES`` frames, the edge's from the camera and the edge (measured / planned frames/s); each
    calibration is added to ``calibrations``."""
    cal = _stream(bed, tmp, _fleet_file(tmp, 1.0, 1.0), images, ["cam"], CALIBRATION_FRAMES)
    device = cal["measured_fps"] / cal["planned_fps"]
    edge_cal = _stream(bed, tmp, _fleet_file(tmp, device, 1.0), images, ["cam", EDGE], CALIBRATION_FRAMES)
    edge = edge_cal["measured_fps"] / edge_cal["planned_fps"]
    calibrations.append({"device_speed": device, "edge_speed": edge, "camera": cal, "edge": edge_cal})
    log(f"calibration: the camera alone {cal['measured_fps']:.2f} f/s vs planned {cal['planned_fps']:.2f}, with the "
        f"edge {edge_cal['measured_fps']:.2f} vs {edge_cal['planned_fps']:.2f}: speeds x{device:.2f} (devices), "
        f"x{edge:.2f} (edge)")
    return _fleet_file(tmp, device, edge)


def _fleet_file(tmp: Path, factor: float, edge_speed: float) -> Path:
    """The fleet: the calibrated device model at each member's quota, the host model for the edge."""
    device = json.loads((CALIBRATED / "device-latency-model.json").read_text())
    lines = ['source = "cam"', "max_group = 1", ""]
    for m in MEMBERS:
        model = dict(device, cpu_quota={**device["cpu_quota"], "quota_s": m.cpu_quota * device["cpu_quota"]
                                        ["period_s"]}, name=f"testbed-device-q{round(m.cpu_quota * 100)}")
        path = tmp / f"{model['name']}.json"
        path.write_text(json.dumps(model))
        lines += ["[[workers]]", f'name = "{m.name}"', f'latency_model = "{path.name}"', f"speed = {factor}",
                  'memory = "384MB"', f'uplink = "{int(m.uplink_bps)}bps"', f'downlink = "{int(m.downlink_bps)}bps"',
                  ""]
    shutil.copy(CALIBRATED / "edge-latency-model.json", tmp / "edge-model.json")
    lines += ["[[workers]]", f'name = "{EDGE}"', 'latency_model = "edge-model.json"', f"speed = {edge_speed}",
              'memory = "4GB"', 'uplink = "1Gbps"', 'downlink = "1Gbps"', "edge = true", ""]
    path = tmp / "fleet.workers.toml"
    path.write_text("\n".join(lines))
    return path


def _stream_argv(bed: Fleetbed, tmp: Path, fleet: Path, images: Path, workers: Sequence[str], count: int
                 ) -> list[str]:
    return bed.argv("cam", [sys.executable, "-m", "deviced.cli", "stream", str(images), "--fleet", str(fleet),
                            "--workers", ",".join(workers), "--count", str(count),
                            "--config", str(_config(bed, tmp, "cam")), "--json"])


def _stream(bed: Fleetbed, tmp: Path, fleet: Path, images: Path, workers: Sequence[str], count: int
            ) -> dict[str, Any]:
    done = subprocess.run(_stream_argv(bed, tmp, fleet, images, workers, count), cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines or "summary" not in lines[-1]:
        raise RuntimeError(f"deviced stream failed ({done.returncode}): {done.stderr[-2000:]}")
    return _summarise([r for r in lines if "frame" in r], lines[-1]["summary"])


def _summarise(records: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any]:
    ok = [r for r in records if "class" in r]
    last = summary["plans"][-1]
    # the steady state of the last plan: its frames after the first few (or the second half, if it had few)
    under_last = [r["finished_s"] for r in ok if r["epoch"] == last["epoch"]][WARMUP_FRAMES:]
    steady = under_last if len(under_last) >= STEADY_MIN else [r["finished_s"] for r in ok[len(ok) // 2:]]
    measured = (len(steady) - 1) / (steady[-1] - steady[0]) if len(steady) > 1 else 0.0
    return {"workers": sorted({w for stage in last["stages"] for w in stage[0]}), "frames": len(records),
            "steady_frames": len(steady),
            "results": len(ok), "errors": len(records) - len(ok), "measured_fps": measured,
            "planned_fps": last["frames_per_s"], "fps_error": measured / last["frames_per_s"] - 1,
            "first_planned_fps": summary["plans"][0]["frames_per_s"],
            "latency_p50_s": float(np.median([r["latency_s"] for r in ok])),
            "latency_p95_s": float(np.percentile([r["latency_s"] for r in ok], 95)),
            "planned_latency_s": last["latency_s"],
            # a saturated stream keeps its window full: by Little's law a frame takes window x period
            "saturated_latency_s": QUEUE_SLOTS * len(last["stages"]) / last["frames_per_s"],
            "replans": len(summary["plans"]) - 1,
            "plans": summary["plans"], "duplicates_suppressed": summary["duplicates_suppressed"],
            "max_queued": summary["max_queued"]}


def _baselines(fleet: Path, names: Sequence[str]) -> dict[str, Any]:
    """The planner's best single device, for the record beside the measured camera-alone and camera+edge runs."""
    from coinfer.bench.pipeline import load_chain
    from models.loaders import load_fleet
    from planner import pipeline

    f = load_fleet(fleet)
    chain = load_chain(BUNDLE)
    costs = pipeline.Costs(chain, f.subset(list(names)))
    single = {w.name: 1.0 / float(costs.period[i, 0, chain.n]) for i, w in enumerate(costs.fleet.workers)}
    best = max(single, key=lambda n: single[n])
    return {"single_device_planned_fps": single, "best_single_device": best}


# ---- faults -------------------------------------------------------------------------------------------------------
def _faults(bed: Fleetbed, tmp: Path, fleet: Path, images: Path, names: Sequence[str], count: int,
            workers: dict[str, subprocess.Popen[str]], log: Callable[[str], None]) -> dict[str, Any]:
    kill_at, throttle_at = count // 4, count // 2
    events: dict[str, float] = {}
    killed, throttled = "", ""
    rss: dict[str, list[int]] = {}
    stop = threading.Event()
    pids = {n: p.pid for n, p in workers.items() if n != EDGE}
    with process(_stream_argv(bed, tmp, fleet, images, names, count), cwd=REPO, stdout=subprocess.PIPE,
                 stderr=subprocess.DEVNULL) as owner:
        pids["cam"] = owner.pid
        sampler = threading.Thread(target=_sample_rss, args=(pids, rss, stop), daemon=True)
        sampler.start()
        assert owner.stdout is not None
        lines = []
        for line in owner.stdout:
            if not line.startswith("{"):
                continue
            lines.append(json.loads(line))
            results = sum(1 for r in lines if "frame" in r)
            last, at = lines[-1].get("worker", ""), lines[-1].get("finished_s", 0.0)  # the stream's clock
            if results >= kill_at and not killed and last in workers and last != EDGE:
                workers[last].kill()  # the last stage's worker: one the plan uses now
                killed, events["killed"] = last, at
                log(f"  frame {results}: {last} killed (SIGKILL)")
            if results >= throttle_at and not throttled and last in workers and last not in (EDGE, killed):
                quota = next(m.cpu_quota for m in MEMBERS if m.name == last)
                bed.set_quota(last, quota / 2)
                throttled, events["throttled"] = last, at
                log(f"  frame {results}: {last} throttled from {quota:.0%} to {quota / 2:.0%} of a core")
        owner.wait(timeout=60)
        stop.set()
    records = [r for r in lines if "frame" in r]
    summary = lines[-1]["summary"]
    indices = [r["frame"] for r in records]
    ok = [r for r in records if "class" in r]
    if not killed or not throttled:
        raise RuntimeError(f"the fault run found no worker to kill or throttle: {events}")
    kill_s, throttle_s = events["killed"], events["throttled"]

    def fps(a: float, b: float) -> float:
        times = [r["finished_s"] for r in ok if a <= r["finished_s"] < b]
        return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0

    after_kill = [r["finished_s"] for r in ok if r["finished_s"] > kill_s]
    replans = summary["plans"]
    doc = {"frames": count, "results": len(ok), "errors": len(records) - len(ok),
           "delivered": len(records), "duplicates_delivered": len(indices) - len(set(indices)),
           "out_of_order": sum(1 for a, b in itertools.pairwise(indices) if b < a),
           "duplicates_suppressed": summary["duplicates_suppressed"],
           "max_attempts": max(r["attempts"] for r in records),
           "killed": killed, "killed_at_s": kill_s, "throttled": throttled, "throttled_at_s": throttle_s,
           "first_result_after_kill_s": (after_kill[0] - kill_s) if after_kill else None,
           "fps_before_kill": fps(ok[WARMUP_FRAMES]["finished_s"], kill_s),
           "fps_between": fps(kill_s + 2.0, throttle_s), "fps_after_throttle": fps(throttle_s + 4.0, 1e9),
           "plans": [{k: p[k] for k in ("epoch", "reason", "lost", "drift", "resent", "took_s", "frames_per_s",
                                        "stages")} for p in replans],
           "max_queued": summary["max_queued"],
           "rss_mb": {n: {"min": min(v) / 1e6, "max": max(v) / 1e6, "samples": len(v)} for n, v in rss.items() if v},
           "records": records}
    log(f"  {doc['results']}/{count} results, {doc['errors']} errors, {doc['duplicates_delivered']} duplicates, "
        f"{doc['out_of_order']} out of order; f/s before {doc['fps_before_kill']:.2f}, between "
        f"{doc['fps_between']:.2f}, after throttling {doc['fps_after_throttle']:.2f}; "
        f"re-plans: {[p['reason'] for p in replans[1:]]}")
    return doc


def _sample_rss(pids: dict[str, int], rss: dict[str, list[int]], stop: threading.Event) -> None:
    while not stop.wait(1.0):
        for name, pid in pids.items():
            with contextlib.suppress(OSError, ValueError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        rss.setdefault(name, []).append(int(line.split()[1]) * 1024)


# ---- the figure ---------------------------------------------------------------------------------------------------
def _plot(doc: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for series, colour in (("devices", "tab:blue"), ("devices+edge", "tab:orange")):
        rows = doc["scaling"][series]
        a.plot([r["k"] for r in rows], [r["planned_fps"] for r in rows], "-", color=colour, label=f"{series} planned")
        a.plot([r["k"] for r in rows], [r["measured_fps"] for r in rows], "o", color=colour, mfc="none",
               label=f"{series} measured")
    a.set_xlabel("Pi-class devices (testbed)")
    a.set_ylabel("frames/s")
    a.set_title("pipelined stream through deviced, AlexNet exit 5", fontsize=9)
    a.legend(fontsize=7)
    f = doc["faults"]
    ok = [r for r in f["records"] if "class" in r]
    t = np.array([r["finished_s"] for r in ok])
    centres = np.arange(2.0, t[-1], 1.0)
    b.plot(centres, [np.sum((t > c - 2) & (t <= c)) / 2.0 for c in centres], "-", color="tab:blue")
    b.axvline(f["killed_at_s"], color="tab:red", ls="--", label=f"{f['killed']} killed")
    b.axvline(f["throttled_at_s"], color="tab:purple", ls=":", label=f"{f['throttled']} throttled to half")
    b.set_xlabel("s")
    b.set_ylabel("results/s (2 s window)")
    b.set_title(f"faults: {f['results']}/{f['frames']} results, {f['duplicates_delivered']} duplicates, "
                f"{f['out_of_order']} out of order", fontsize=9)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "testbed.png", dpi=110)
    plt.close(fig)
