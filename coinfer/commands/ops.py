"""Operations: ``demo`` (what ``make run`` runs), ``testbed``, ``broker``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from coinfer.commands import Command
from coinfer.lab.procs import REPO
from models import loaders
from models.bundle import DEFAULT_BUNDLE
from planner import policies, units


def _demo_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--links", default="100kbps,2Mbps", help="emulated uplink speeds, comma-separated")
    s.add_argument("--deadline", default="200ms")
    s.add_argument("--images", type=int, default=300)
    s.add_argument("--mosquitto-conf", type=Path, default=REPO / "mosquitto.conf")
    s.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="the bundle edged and deviced serve")
    s.add_argument("--inputs", type=Path, help="model inputs as they are: an .npz with x (N x the bundle's input "
                                               "shape) and optionally y (labels: accuracy), or an .npy of x "
                                               "(default: Fashion-MNIST test images, for the shipped bundles)")
    s.add_argument("--policy", default=policies.DEFAULT, choices=sorted(set(policies.POLICIES) - {"fixed"}),
                   help=f"deviced's planning policy (default {policies.DEFAULT}; mincut for a DAG model)")
    s.add_argument("--device-model", type=Path, default=loaders.PI3_MODEL,
                   help="the device's latency model (default: Edgent's Raspberry Pi 3; `coinfer fit` makes one)")


def _testbed_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("action", choices=["up", "down"])
    s.add_argument("--uplink", default="1Mbps")
    s.add_argument("--cpu-quota", type=float, default=0.1)


def _broker_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("action", choices=["init", "add-device", "add-edge", "add-app", "revoke", "list", "scrape-config"])
    s.add_argument("ident", nargs="?",
                   help="device or edge id (add-device, add-edge, revoke); DEVICE.APP for add-app (e.g. pi-1.camera)")
    s.add_argument("--domain", default="lan", help="scrape-config: targets are ID.DOMAIN:PORT unless --target")
    s.add_argument("--target", action="append", default=[], metavar="ID=HOST:PORT",
                   help="scrape-config: where one edge or device serves its metrics (repeat)")
    s.add_argument("--out", type=Path, help="scrape-config: write here instead of printing")
    s.add_argument("--dir", type=Path, default=Path("/etc/mosquitto/coinfer"), help="the broker's coinfer folder")
    s.add_argument("--host", action="append", default=[],
                   help="init: a DNS name or IP devices use to reach the broker (repeat for several)")
    s.add_argument("--prefix", default="coinfer", help="topic prefix of the deployment")


def cmd_demo(args: argparse.Namespace) -> int:
    from coinfer.lab import demo

    links = args.links.split(",")
    demo.check_links(links)
    return demo.run_demo(links=links, deadline_s=units.parse_duration(args.deadline), images=args.images,
                         mosquitto_conf=args.mosquitto_conf, bundle=args.bundle, inputs=args.inputs,
                         policy=args.policy, device_model=args.device_model)


def cmd_testbed(args: argparse.Namespace) -> int:
    from coinfer.lab import testbed

    if args.action == "down":
        testbed.check_privileges()
        testbed.down()
        print("testbed removed")
        return 0
    bed = testbed.Testbed(testbed.Emulation.with_quota(args.cpu_quota, uplink_bps=units.parse_bandwidth(args.uplink)))
    bed.up()
    for key, value in bed.describe().items():
        print(f"{key}: {value}")
    print(f"edge side:   {' '.join(bed.edge_argv(['CMD']))}\ndevice side: {' '.join(bed.device_argv(['CMD']))}\n"
          f"change the link: ip netns exec {testbed.NS_DEVICE} tc qdisc change dev {testbed.VETH_DEVICE} root "
          f"{' '.join(testbed.tbf_args(5e5))}\nremove: coinfer testbed down")
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    from coinfer.ops import broker
    from protocol.errors import MalformedMessage

    try:
        if args.action == "init":
            for path in broker.init(args.dir, args.host):
                print(f"wrote {path}")
            print(f"next: install deploy/mosquitto/coinfer.conf as /etc/mosquitto/conf.d/coinfer.conf, then "
                  f"`coinfer broker add-edge ID` and `coinfer broker add-device ID`; copy {args.dir / 'ca.crt'} to "
                  f"each device")
        elif args.action == "list":
            for e in broker.entries(args.dir):
                print(f"{e.role:<7} {e.ident:<24} prefix {e.prefix}")
        elif args.action == "scrape-config":
            targets = dict(t.split("=", 1) for t in args.target if "=" in t)
            if len(targets) != len(args.target):
                raise ValueError("--target takes ID=HOST:PORT")
            text = broker.scrape_config(broker.entries(args.dir), domain=args.domain, targets=targets)
            if args.out:
                args.out.write_text(text)
                print(f"wrote {args.out}")
            else:
                print(text, end="")
        elif args.ident is None:
            print(f"coinfer: error: broker {args.action} needs an id", file=sys.stderr)
            return 2
        elif args.action == "revoke":
            e = broker.revoke(args.dir, args.ident)
            print(f"revoked {e.role} {e.ident}; now `systemctl reload mosquitto` (SIGHUP) to refuse it")
        else:
            entry = broker.Entry(args.action.removeprefix("add-"), args.ident, args.prefix)
            _, secret = broker.add(args.dir, entry)
            print(f"{entry.role} {entry.ident}: its password is in {secret} (mode 0600). {_install_hint(entry)}, "
                  f"then delete it here.")
            for access, topic in entry.rules():
                print(f"  {access:<9} {topic}")
            print("now `systemctl reload mosquitto` (SIGHUP) to apply")
    except (broker.BrokerSetupError, MalformedMessage, ValueError, OSError) as exc:
        print(f"coinfer: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _install_hint(entry: Any) -> str:
    """Where a provisioned password goes on the machine that uses it (deploy/install.sh's file names)."""
    if entry.role == "app":
        app = entry.ident.rsplit(".", 1)[1]
        return (f"Copy it to the device as /etc/coinfer/apps/{app}.password (mode 0640, group: the Unix group the "
                f"application runs as)")
    daemon = "edged" if entry.role == "edge" else "deviced"
    return f"Copy it to the {entry.role} as /etc/coinfer/{daemon}.password (mode 0600)"


COMMANDS = (
    Command("demo", "mosquitto + edged + deviced on this machine, co-inference on real images", _demo_args,
            cmd_demo),
    Command("testbed", "the emulated device + link (network namespaces, tc tbf, CPU cgroup; root)", _testbed_args,
            cmd_testbed),
    Command("broker", "provision the production broker: certificates, per-device credentials and ACLs",
            _broker_args, cmd_broker),
)
