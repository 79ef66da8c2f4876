"""``edged --config edged.toml``: the edge daemon's entry point."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from edged import config
from edged.server import run
from models.errors import ModelError
from protocol import session
from protocol.config import ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edged", description="coinfer edge daemon")
    parser.add_argument("--config", type=Path, help="TOML file with [edged] and [broker] tables")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    session.configure_logging(args.log_level)
    try:
        cfg = config.load(args.config) if args.config else config.EdgedConfig()
        asyncio.run(_main(cfg))
    except (ConfigError, ModelError, session.BrokerRefused) as exc:
        print(f"edged: error: {exc}", file=sys.stderr)
        return 2
    return 0


async def _main(cfg: config.EdgedConfig) -> None:
    shutdown = asyncio.Event()
    session.install_signal_handlers(shutdown)
    await run(cfg, shutdown=shutdown)


if __name__ == "__main__":
    sys.exit(main())
