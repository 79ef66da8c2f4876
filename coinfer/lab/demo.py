"""``coinfer demo`` (what ``make run`` runs): mosquitto, edged and deviced on this machine, real images."""

from __future__ import annotations

import asyncio
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from coinfer.lab.procs import Daemon, Mosquitto
from deviced.config import DevicedConfig
from deviced.engine import Outcome
from deviced.service import Client
from models.bundle import DEFAULT_BUNDLE, load_bundle
from models.data import load_fashion_mnist, read_inputs
from models.loaders import PI3_MODEL
from planner import policies
from planner.units import format_bandwidth, parse_bandwidth
from protocol.session import BrokerConfig, configure_logging


def run_demo(*, links: Sequence[str], deadline_s: float, images: int, mosquitto_conf: Path,
             bundle: Path = DEFAULT_BUNDLE, inputs: Path | None = None, policy: str = policies.DEFAULT,
             device_model: Path = PI3_MODEL) -> int:
    """Co-infer ``images`` inputs at each emulated uplink speed and print what happened: Fashion-MNIST test images
    through ``bundle``'s preprocessing, or the model inputs of ``inputs`` (``x``, and ``y`` for accuracy)."""
    configure_logging("warning")
    served = load_bundle(bundle)
    if inputs is not None:
        x, labels = read_inputs(inputs, served.input_shape)
        what = f"inputs from {inputs.name}"
    else:
        x_all, labels = load_fashion_mnist("test")
        x, what = served.preprocess(x_all[:images]), "Fashion-MNIST test images"
    x, labels = x[:images], None if labels is None else labels[:images]
    with (tempfile.TemporaryDirectory(prefix="coinfer-demo-") as tmp,
          Mosquitto.from_template(mosquitto_conf, Path(tmp)) as broker, _edged(Path(tmp), broker.port, bundle)):
        port = broker.port
        print(f"mosquitto on 127.0.0.1:{port} ({mosquitto_conf.name}), edged in its own process, deviced in this "
              f"one; bundle {served.name}, policy {policy}; {len(x)} {what} per uplink speed, deadline "
              f"{deadline_s * 1e3:.0f} ms")
        model = "Edgent's Raspberry Pi 3 latency model" if device_model == PI3_MODEL else f"{device_model}"
        print(f"emulated: the uplink, in the application (each upload delayed by bytes / rate); the device's "
              f"compute is this host's, planned with {model}; the device starts from the nominal link rate and "
              f"refines it from its own transfers (no probes)")
        print(f"\n{'uplink':>8} {'deadline':>8} {'n':>4}  {'plans (exit@where[/encoding]: count)':<44} {'pred ms':>8} "
              f"{'p50 ms':>7} {'p95 ms':>7} {'met':>6} {'accuracy':>8} {'fallbacks':>9} {'bw est':>9}")
        for link in links:
            outcomes, estimate = asyncio.run(_run_link(port, link, deadline_s, x, bundle, policy, device_model))
            _print_row(link, deadline_s, outcomes, labels, estimate)
    return 0


async def _run_link(port: int, link: str, deadline_s: float, x: np.ndarray, bundle: Path, policy: str,
                    device_model: Path) -> tuple[list[Outcome], float]:
    cfg = DevicedConfig(device_id="demo-device", broker=BrokerConfig(port=port), emulate_uplink=link,
                        initial_bandwidth=link, probe_interval_s=0, bundle=bundle, planner={"policy": policy},
                        latency_model=device_model)
    async with Client(cfg) as client:
        if not await client.wait_for_edge(30):
            raise RuntimeError("edged did not come online")
        outcomes = [await client.infer(xi, deadline=deadline_s) for xi in x]
        return outcomes, client.device.link.estimate.bandwidth_bps


def _print_row(link: str, deadline_s: float, outcomes: list[Outcome], labels: np.ndarray | None,
               estimate: float) -> None:
    plans = Counter(f"{o.plan.exit}@{o.plan.where}" + (f"/{o.plan.encoding}" if o.plan.encoding != "float32" else "")
                    for o in outcomes)
    lat = np.array([o.latency_s for o in outcomes]) * 1e3
    pred = np.mean([o.plan.predicted_s or 0.0 for o in outcomes]) * 1e3
    correct = (f"{np.mean([int(np.argmax(o.logits)) == int(y) for o, y in zip(outcomes, labels, strict=True)]):8.4f}"
               if labels is not None else f"{'-':>8}")
    met = np.mean([o.met for o in outcomes])
    fallbacks = sum(o.fallback not in (None, "no_edge") for o in outcomes)
    plan_text = ", ".join(f"{k}: {v}" for k, v in plans.most_common(3))
    print(f"{link:>8} {deadline_s * 1e3:>6.0f}ms {len(outcomes):>4}  {plan_text:<44} {pred:>8.1f} "
          f"{np.percentile(lat, 50):>7.1f} {np.percentile(lat, 95):>7.1f} {met:>6.1%} {correct} "
          f"{fallbacks:>9} {format_bandwidth(round(estimate, -3)):>9}", flush=True)


def _edged(tmp: Path, port: int, bundle: Path) -> Daemon:
    conf = tmp / "edged.toml"
    conf.write_text(f'[edged]\nedge_id = "demo-edge"\nbundles = ["{bundle.resolve()}"]\n\n[broker]\nport = {port}\n')
    return Daemon("edged.cli", ["--config", str(conf), "--log-level", "warning"])


def check_links(links: Sequence[str]) -> None:
    for link in links:
        parse_bandwidth(link)
