"""``deviced run`` (the daemon), ``deviced infer FILE --deadline 300ms`` (co-infer images from a shell) and
``deviced stream FILE --fleet F.workers.toml`` (stream images through a pipeline over several devices)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from deviced import config
from deviced.config import DEPLOYED_CONFIG
from deviced.errors import BrokerLost
from deviced.service import Client, RemoteClient, RemoteError, build_device, run
from deviced.stream import Stream, StreamError
from models.bundle import load_bundle
from models.data import CLASSES, read_idx, read_inputs
from models.errors import ModelError
from models.loaders import load_fleet
from planner.errors import PlannerError
from planner.fleet import Fleet
from planner.units import parse_duration
from protocol import session
from protocol.config import ConfigError

log = structlog.get_logger()
EDGE_WAIT_S = 3.0  # `deviced infer`: how long to wait for the broker, then for an edge's status and advert


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deviced", description="coinfer device daemon and client")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("infer", help="co-infer images (an IDX file, optionally .gz, or an .npy of uint8 28x28, for "
                                     "the Fashion-MNIST bundles) or any bundle's model inputs (--inputs)")
    s.add_argument("file", type=Path, nargs="?", help="Fashion-MNIST-style images (IDX or .npy of uint8 28x28)")
    s.add_argument("--inputs", type=Path, help="model inputs as they are, for any bundle: an .npz with x (N x the "
                                               "input shape) and optionally y (labels: accuracy is reported), or an "
                                               ".npy of x")
    s.add_argument("--config", type=Path, help="TOML file with [deviced] and [broker] tables")
    s.add_argument("--deadline", default=None, help="e.g. 300ms (default: the config's default_deadline)")
    s.add_argument("--count", type=int, default=10, help="first N images of the file")
    s.add_argument("--json", action="store_true", help="one JSON record per image")
    s.add_argument("--via-daemon", action="store_true",
                   help="send the images to a running `deviced run` over the broker instead of co-inferring in "
                        "this process")
    s.add_argument("--app", default="",
                   help="with --via-daemon: as this application (`coinfer broker add-app DEVICE.APP`), with its "
                        "password from /etc/coinfer/apps/APP.password or $COINFER_MQTT_PASSWORD")
    s.add_argument("--log-level", default="warning")
    t = sub.add_parser("stream", help="stream images through a pipeline over several devices' deviceds (this "
                                      "process is the stream's owner, the fleet's source)")
    t.add_argument("file", type=Path, help="an IDX file (optionally .gz) or a .npy array of uint8 28x28")
    t.add_argument("--fleet", type=Path, required=True,
                   help="the workers (a *.workers.toml file; its source must be this device's id)")
    t.add_argument("--workers", default="", help="use only these fleet workers, comma-separated (the source always)")
    t.add_argument("--config", type=Path, help="TOML file with [deviced] and [broker] tables")
    t.add_argument("--count", type=int, default=100, help="first N images of the file")
    t.add_argument("--exit", type=int, default=None, help="the exit to serve (default: the deepest)")
    t.add_argument("--method", default=None, help="pipeline planner method (default: exact up to 8 workers)")
    t.add_argument("--json", action="store_true", help="one JSON record per frame, then a summary record")
    t.add_argument("--log-level", default="warning")
    r = sub.add_parser("run", help="the long-running daemon: serves applications on the local MQTT request topic")
    r.add_argument("--config", type=Path, help="TOML file with [deviced] and [broker] tables")
    r.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    # `run` logs JSON lines to stdout (journald); `infer` keeps stdout for the answers
    session.configure_logging(args.log_level, stream=sys.stdout if args.command == "run" else sys.stderr)
    try:
        cfg = config.load(args.config) if args.config else config.DevicedConfig()
        if args.command == "run":
            asyncio.run(_run(cfg))
            return 0
        if args.command == "stream":
            fleet = load_fleet(args.fleet)
            if args.workers:
                fleet = fleet.subset([fleet.source, *args.workers.split(",")])
            return asyncio.run(_stream(cfg, fleet, _read_images(args.file)[: args.count], args))
        deadline = parse_duration(args.deadline or cfg.default_deadline)
        if (args.file is None) == (args.inputs is None):
            raise ValueError("give images (FILE) or model inputs (--inputs FILE), one of them")
        bundle = load_bundle(cfg.bundle)  # the input tensors are made here, whoever runs the model
        if args.inputs:
            x, y = read_inputs(args.inputs, bundle.input_shape)
        else:
            x, y = bundle.preprocess(_read_images(args.file)), None
        x, y = x[: args.count], None if y is None else y[: args.count]
        if args.via_daemon:
            client = (RemoteClient.from_config(args.config or DEPLOYED_CONFIG, app=args.app) if args.app else
                      RemoteClient(cfg.broker, cfg.device_id, prefix=cfg.topic_prefix))
            return asyncio.run(_infer_remote(client, x, y, deadline, as_json=args.json))
        return asyncio.run(_infer(cfg, x, y, deadline, as_json=args.json))
    except (ConfigError, ModelError, PlannerError, ValueError, OSError, RemoteError, TimeoutError,
            session.BrokerRefused, BrokerLost, StreamError) as exc:
        print(f"deviced: error: {exc or type(exc).__name__}", file=sys.stderr)
        return 2


async def _run(cfg: config.DevicedConfig) -> None:
    device = build_device(cfg)
    if cfg.metrics_port:
        device.metrics.serve(cfg.metrics_port, cfg.metrics_address)
    shutdown = asyncio.Event()
    session.install_signal_handlers(shutdown)
    async with session.Systemd().serving(f"device {cfg.device_id}: model loaded; connecting to "
                                         f"{cfg.broker.host}:{cfg.broker.port}") as systemd:
        await run(device, shutdown=shutdown, systemd=systemd)
    log.info("deviced_stopped", device_id=cfg.device_id)


def _read_images(path: Path) -> np.ndarray:
    images = np.asarray(np.load(path, allow_pickle=False) if path.suffix == ".npy" else read_idx(path))
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(f"{path}: expected uint8 images of 28x28, got {images.dtype} {images.shape}")
    return images


async def _infer(cfg: config.DevicedConfig, x: np.ndarray, y: np.ndarray | None, deadline: float, *,
                 as_json: bool) -> int:
    async with Client(cfg, daemon=False) as client:  # beside a running `deviced run`, never in its place
        try:
            await client.wait_connected(EDGE_WAIT_S)  # refused credentials raise: one line, exit 2
        except session.CredentialsRefused:
            raise
        except session.BrokerRefused as exc:  # no broker (yet): said, then every image answered on the device
            print(f"deviced: {exc}; answering on this device", file=sys.stderr)
        else:
            if not await client.wait_for_edge(EDGE_WAIT_S):
                print(f"deviced: no edge serving {client.device.bundle.name} answered within {EDGE_WAIT_S:g} s on "
                      f"{cfg.broker.host}:{cfg.broker.port}; answering on this device", file=sys.stderr)
        records = []
        for i, xi in enumerate(x):
            o = await client.infer(xi, deadline=deadline)
            records.append(_print(i, o.logits, o.record(), as_json=as_json))
    _summary(records, y)
    return 0


async def _infer_remote(client: RemoteClient, x: np.ndarray, y: np.ndarray | None, deadline: float, *,
                        as_json: bool) -> int:
    records = []
    async with client:
        for i, xi in enumerate(x):
            r = await client.infer(xi[None], deadline=deadline)
            records.append(_print(i, r.outputs["logits"], {
                "request_id": r.request_id, "exit": r.exit, "where": r.where, "edge_id": r.edge_id or None,
                "fallback": r.fallback or None, "latency_s": round(r.latency_s, 6), "deadline_s": r.deadline_s,
                "met": r.latency_s <= r.deadline_s}, as_json=as_json))
    _summary(records, y)
    return 0


def _summary(records: list[dict[str, Any]], y: np.ndarray | None) -> None:
    """One line on stderr: how many met, latency percentiles, predicted vs measured, accuracy when labelled."""
    if not records:
        return
    latency = np.array([r["latency_s"] for r in records]) * 1e3
    predicted = [r["plan"]["predicted_s"] * 1e3 for r in records if "plan" in r]
    where = Counter(r["where"] for r in records)
    text = (f"{len(records)} inputs: met {np.mean([r['met'] for r in records]):.0%}, latency p50 "
            f"{np.percentile(latency, 50):.1f} ms, p95 {np.percentile(latency, 95):.1f} ms"
            + (f" (predicted mean {np.mean(predicted):.1f} ms, measured {latency.mean():.1f})" if predicted else "")
            + "; " + ", ".join(f"{w} {n}" for w, n in where.most_common()))
    if y is not None:
        text += f"; accuracy {np.mean([r['class'] == int(label) for r, label in zip(records, y, strict=False)]):.4f}"
    print(text, file=sys.stderr)


async def _stream(cfg: config.DevicedConfig, fleet: Fleet, images: np.ndarray, args: argparse.Namespace) -> int:
    """Stream the images; one line (or JSON record) per frame in order, then a summary (stderr unless --json)."""
    async with Client(cfg) as client:  # the device's own session: it serves its own stage too
        started: list[Stream] = []
        start = time.monotonic()
        results = []
        async for r in client.stream(client.device.bundle.preprocess(images), fleet, exit_index=args.exit,
                                     method=args.method, on_start=started.append):
            results.append(r)
            record = r.record()
            if args.json:
                print(json.dumps(record), flush=True)
            elif r.ok:
                print(f"{r.index:>5} {CLASSES[record['class']]:<12} {r.latency_s * 1e3:8.1f} ms  from {r.worker} "
                      f"(epoch {r.epoch}, sent {r.attempts}x)", flush=True)
            else:
                print(f"{r.index:>5} ERROR {r.code}: {r.error}", flush=True)
        took = time.monotonic() - start
    stream = started[0]
    ok = [r for r in results if r.ok]
    summary: dict[str, Any] = {"frames": len(results), "results": len(ok), "errors": len(results) - len(ok),
               "duplicates_suppressed": stream.duplicates, "max_queued": stream.max_queued,
               "seconds": round(took, 3),
               "frames_per_s": round(len(results) / took, 3) if took > 0 else None,
               "latency_p50_s": round(float(np.median([r.latency_s for r in ok])), 4) if ok else None,
               "plans": stream.replans}
    if args.json:
        print(json.dumps({"summary": summary}))
    else:
        print(f"{summary['results']}/{summary['frames']} frames answered ({summary['errors']} errors) in "
              f"{took:.1f} s: {summary['frames_per_s']} frames/s, p50 latency "
              f"{(summary['latency_p50_s'] or 0) * 1e3:.1f} ms", file=sys.stderr)
        for p in stream.replans:
            stages = " | ".join(f"{'+'.join(w)}: {a}..{b}" for w, a, b in p["stages"])
            print(f"  epoch {p['epoch']} ({p['reason']}): {stages}; planned {p['frames_per_s']:.2f} frames/s",
                  file=sys.stderr)
    return 0 if len(ok) == len(results) else 1


def _print(i: int, logits: np.ndarray, record: dict[str, Any], *, as_json: bool) -> dict[str, Any]:
    """Print one answer (a line, or a JSON record); returns the record with its class."""
    label = int(np.argmax(logits))
    name = CLASSES[label] if logits.size == len(CLASSES) else f"class {label}"
    record = {"index": i, "class": label, "name": name, **record}
    if as_json:
        print(json.dumps(record))
    else:
        verdict = "met" if record["met"] else "MISSED"
        print(f"{i:>4} {name:<12} exit {record['exit']} on {record['where']:<8} "
              f"{record['latency_s'] * 1e3:7.1f} ms ({verdict} {record['deadline_s'] * 1e3:.0f} ms) "
              f"{record['fallback'] or ''}")
    return record


if __name__ == "__main__":
    sys.exit(main())
