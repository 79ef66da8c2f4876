"""Console entry point of deviced."""

import sys


def main() -> int:
    print("deviced: the daemon is not built yet (see the 'edged and deviced' issue); "
          "use `coinfer plan` / `coinfer sweep` for planning", file=sys.stderr)
    return 1
