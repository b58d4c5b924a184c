"""`steerserve keys add`: create an API key in a key file (only its sha256 is stored)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(commands: argparse._SubParsersAction) -> None:
    keys = commands.add_parser("keys", help="manage API keys (only their sha256 is stored)")
    keys_cmd = keys.add_subparsers(dest="keys_command", required=True)
    add = keys_cmd.add_parser("add", help="create a key for a tenant; prints it once, stores only its hash")
    add.add_argument("--file", type=Path, required=True, help="key file (.yaml, .yml or .json); created 0600")
    add.add_argument("--tenant", required=True)
    add.add_argument("--role", choices=["user", "admin", "metrics"], required=True,
                     help="user: a tenant's API; admin: everything; metrics: /metrics only (a scraper)")
    add.add_argument("--name", help="label for the key (who or what uses it)")


def run(args: argparse.Namespace) -> int:
    """Print the new key once; 1 when the key file cannot be read or written."""
    from ..http.auth import add_key

    try:
        print(add_key(args.file, args.tenant, args.role, name=args.name))
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
