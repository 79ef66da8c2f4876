"""``deviced infer FILE --deadline 300ms``: co-infer images from the command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from deviced import config
from deviced.service import Client
from models.data import CLASSES, preprocess, read_idx
from models.errors import ModelError
from planner.errors import PlannerError
from planner.units import parse_duration
from protocol import session
from protocol.config import ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deviced", description="coinfer device daemon and client")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("infer", help="co-infer images: an IDX file (optionally .gz) or a .npy array of uint8 28x28")
    s.add_argument("file", type=Path)
    s.add_argument("--config", type=Path, help="TOML file with [deviced] and [broker] tables")
    s.add_argument("--deadline", default=None, help="e.g. 300ms (default: the config's default_deadline)")
    s.add_argument("--count", type=int, default=10, help="first N images of the file")
    s.add_argument("--json", action="store_true", help="one JSON record per image")
    s.add_argument("--log-level", default="warning")
    sub.add_parser("run", help="the long-running daemon (serving local applications over MQTT): not built yet")
    args = parser.parse_args(argv)
    if args.command == "run":
        print("deviced: the daemon's local request topic is not built yet; use `deviced infer` or the Python "
              "client deviced.service.Client", file=sys.stderr)
        return 1
    session.configure_logging(args.log_level, stream=sys.stderr)  # stdout carries the answers
    try:
        cfg = config.load(args.config) if args.config else config.DevicedConfig()
        deadline = parse_duration(args.deadline or cfg.default_deadline)
        images = _read_images(args.file)[: args.count]
        return asyncio.run(_infer(cfg, preprocess(images), deadline, as_json=args.json))
    except (ConfigError, ModelError, PlannerError, ValueError, OSError) as exc:
        print(f"deviced: error: {exc}", file=sys.stderr)
        return 2


def _read_images(path: Path) -> np.ndarray:
    images = np.asarray(np.load(path, allow_pickle=False) if path.suffix == ".npy" else read_idx(path))
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(f"{path}: expected uint8 images of 28x28, got {images.dtype} {images.shape}")
    return images


async def _infer(cfg: config.DevicedConfig, x: np.ndarray, deadline: float, *, as_json: bool) -> int:
    async with Client(cfg) as client:
        await client.wait_for_edge(3.0)
        for i, xi in enumerate(x):
            o = await client.infer(xi, deadline=deadline)
            label = int(np.argmax(o.logits))
            if as_json:
                print(json.dumps({"index": i, "class": label, "name": CLASSES[label], **o.record()}))
            else:
                verdict = "met" if o.met else "MISSED"
                print(f"{i:>4} {CLASSES[label]:<12} exit {o.exit} on {o.where:<8} {o.latency_s * 1e3:7.1f} ms "
                      f"({verdict} {deadline * 1e3:.0f} ms) {o.fallback or ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
