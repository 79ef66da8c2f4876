"""``coinfer``: the tool CLI. Its commands are the tables of ``coinfer.commands`` (model tools, planning,
operations, benchmarks); this module builds the parser from them and is the one place their errors become a
line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from coinfer.commands import bench, models, ops, planning
from coinfer.lab.testbed import TestbedError
from models.errors import ModelError
from planner.errors import PlannerError

COMMANDS = (*models.COMMANDS, *planning.COMMANDS, *ops.COMMANDS, *bench.COMMANDS)
ERRORS = (ModelError, PlannerError, TestbedError)  # a clear one-line error, exit status 2


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except ERRORS as exc:
        print(f"coinfer: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="coinfer", description="coinfer: device-edge DNN co-inference tools")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        s = sub.add_parser(command.name, help=command.help)
        command.arguments(s)
        s.set_defaults(func=command.run)
    return p


if __name__ == "__main__":
    sys.exit(main())
