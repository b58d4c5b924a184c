"""`steerserve tenants set|list` and `steerserve urial add|remove|list`: admin of the stores the server reads
(per-tenant switches, registered URIAL prefixes), under its data dir."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..settings import Settings


def add_parser(commands: argparse._SubParsersAction) -> None:
    tenants = commands.add_parser("tenants", help="admin switches per tenant (stored with the profiles)")
    tenants_cmd = tenants.add_subparsers(dest="tenants_command", required=True)
    tset = tenants_cmd.add_parser("set", help="change a tenant's settings")
    tset.add_argument("tenant")
    tset.add_argument("--allow-conjugate", action=argparse.BooleanOptionalAction, default=None,
                      help="allow conjugate prompting (a known safety bypass) for this tenant")
    tenants_cmd.add_parser("list", help="tenants with settings")
    for sub in (tset, tenants_cmd.choices["list"]):
        sub.add_argument("--data-dir", type=Path, help="the server's --data-dir (default: its default)")

    prefixes = commands.add_parser("urial", help="URIAL prefixes (built-in, and registered from files)")
    prefixes_cmd = prefixes.add_subparsers(dest="urial_command", required=True)
    padd = prefixes_cmd.add_parser("add", help="register a prefix file by name (used verbatim)")
    padd.add_argument("name")
    padd.add_argument("file", type=Path)
    prm = prefixes_cmd.add_parser("remove", help="remove a registered prefix")
    prm.add_argument("name")
    plist = prefixes_cmd.add_parser("list", help="built-in and registered prefixes")
    for sub in (padd, prm, plist):
        sub.add_argument("--data-dir", type=Path, help="the server's --data-dir (default: its default)")


def run(args: argparse.Namespace) -> int:
    """Print the result as JSON; 1 on a bad name or file, or removing a prefix that is not registered."""
    from steerserve.server.stores.database import DatabaseUnavailable

    data_dir = args.data_dir or Settings.load().data_dir
    try:
        return tenants(args, data_dir) if args.command == "tenants" else urial(args, data_dir)
    except (ValueError, OSError, DatabaseUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def tenants(args: argparse.Namespace, data_dir: Path) -> int:
    from steerserve.server.stores.tenants import TenantSettingsUpdate, TenantStore

    store = TenantStore(_database(data_dir))
    if args.tenants_command == "set":
        print(json.dumps({"tenant": args.tenant, **store.update(
            args.tenant, TenantSettingsUpdate(allow_conjugate=args.allow_conjugate)).model_dump()}))
    else:
        print(json.dumps(store.list(), indent=1))
    return 0


def urial(args: argparse.Namespace, data_dir: Path) -> int:
    from steerserve.server.frontend.prompt_methods import PrefixStore

    db = _database(data_dir)
    prefixes = PrefixStore(db, legacy_dir=data_dir / "urial" if db.dialect == "sqlite" else None)
    if args.urial_command == "add":
        print(json.dumps(prefixes.put(args.name, args.file.read_text(encoding="utf-8"))))
    elif args.urial_command == "remove":
        if not prefixes.delete(args.name):
            print(f"error: no registered prefix named {args.name!r}", file=sys.stderr)
            return 1
    else:
        print(json.dumps(prefixes.list(), indent=1))
    return 0


def _database(data_dir: Path):
    """The server's database: STEERSERVE_DATABASE_URL if set, else the profiles' SQLite file under `data_dir`."""
    from steerserve.server.stores.database import open_database

    return open_database(Settings.load().database_url or data_dir / "profiles.sqlite3")
