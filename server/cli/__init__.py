"""The `steerserve` command: serve a model, and the offline tools around it (models, keys, profiling,
calibration, adapters, tenant and URIAL admin, fTRI, control vectors)."""
from __future__ import annotations

import argparse
import sys

from . import adapters, admin, calibrate, ftri, keys, models, profile, serve, vectors

# Each group module adds its command(s) with `add_parser(commands)` (commands: the top-level subparsers action)
# and runs one with `run(args) -> int` (the exit status). Its heavy imports stay inside `run`, so `--help` is fast.
# The order here is the order `steerserve --help` lists them in.
GROUPS = (serve, models, keys, profile, calibrate, adapters, admin, ftri, vectors)


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]), run the chosen command, return its exit status."""
    parser = argparse.ArgumentParser(prog="steerserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    runs = {}
    for group in GROUPS:
        before = set(commands.choices)
        group.add_parser(commands)
        runs.update(dict.fromkeys(set(commands.choices) - before, group.run))
    args = parser.parse_args(argv)
    return runs[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
