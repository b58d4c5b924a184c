"""The `steerserve` command: serve a model, fetch the embedded default."""
from __future__ import annotations

import argparse
import logging
import sys
import typing
from pathlib import Path

from .settings import Settings


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per settings field (`max_model_len` -> `--max-model-len`); unset flags defer to env/YAML/defaults."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kind = typing.get_args(field.annotation) or (field.annotation,)
        if bool in kind:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=field.description)
        elif typing.get_origin(field.annotation) is typing.Literal:
            parser.add_argument(flag, dest=name, choices=kind, default=None, help=field.description)
        else:
            convert = next((t for t in (int, float, Path) if t in kind), str)
            parser.add_argument(flag, dest=name, type=convert, default=None, help=field.description)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="steerserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve a model over the OpenAI HTTP API")
    serve.add_argument("--config", type=Path, help="YAML file of settings (flags and STEERSERVE_* env win)")
    _add_settings_flags(serve)

    models = commands.add_parser("models", help="manage local models")
    models_cmd = models.add_subparsers(dest="models_command", required=True)
    fetch = models_cmd.add_parser("fetch", help="download, verify and convert a known model into the cache")
    fetch.add_argument("name", choices=["smollm2", "gemma3-270m"],
                       help="smollm2 (the default model) or gemma3-270m (a base model, for URIAL; Gemma Terms of Use)")

    keys = commands.add_parser("keys", help="manage API keys (only their sha256 is stored)")
    keys_cmd = keys.add_subparsers(dest="keys_command", required=True)
    add = keys_cmd.add_parser("add", help="create a key for a tenant; prints it once, stores only its hash")
    add.add_argument("--file", type=Path, required=True, help="key file (.yaml, .yml or .json); created 0600")
    add.add_argument("--tenant", required=True)
    add.add_argument("--role", choices=["user", "admin"], required=True)
    add.add_argument("--name", help="label for the key (who or what uses it)")

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

    args = parser.parse_args(argv)
    if args.command == "serve":
        overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
        return serve_forever(Settings.load(args.config, **overrides))
    if args.command == "keys":
        from .auth import add_key

        try:
            print(add_key(args.file, args.tenant, args.role, name=args.name))
        except (ValueError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.command in ("tenants", "urial"):
        return _admin_command(args)
    if args.command == "models":
        from .models import KNOWN_MODELS, ModelFetchError, fetch

        try:
            print(fetch(KNOWN_MODELS[args.name], Settings.load().cache))
        except ModelFetchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


def _admin_command(args: argparse.Namespace) -> int:
    """`tenants` and `urial`: the same stores the server reads, under its data dir."""
    import json

    data_dir = args.data_dir or Settings.load().data_dir
    try:
        if args.command == "tenants":
            from .tenants import TenantSettingsUpdate, TenantStore

            store = TenantStore(data_dir / "profiles.sqlite3")
            if args.tenants_command == "set":
                print(json.dumps({"tenant": args.tenant, **store.update(
                    args.tenant, TenantSettingsUpdate(allow_conjugate=args.allow_conjugate)).model_dump()}))
            else:
                print(json.dumps(store.list(), indent=1))
            return 0
        from .prompting import PrefixStore

        prefixes = PrefixStore(data_dir / "urial")
        if args.urial_command == "add":
            print(json.dumps(prefixes.put(args.name, args.file.read_text(encoding="utf-8"))))
        elif args.urial_command == "remove":
            if not prefixes.delete(args.name):
                print(f"error: no registered prefix named {args.name!r}", file=sys.stderr)
                return 1
        else:
            print(json.dumps(prefixes.list(), indent=1))
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def serve_forever(settings: Settings) -> int:
    import uvicorn

    from .app import create_app
    from .auth import KeyStore, check_bind
    from .engine import Engine
    from .models import ModelFetchError, resolve_model
    from .profiles import ProfileStore

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("steerserve")
    try:
        keys = KeyStore.load(settings.api_keys) if settings.api_keys else KeyStore.open()
        check_bind(settings.host, keys)
        model_path = resolve_model(settings.model, settings.cache)
    except (ModelFetchError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if keys.is_open:
        log.warning("no API keys configured (--api-keys): open mode, every request is the 'default' tenant "
                    "with admin rights; listening on loopback only")
    profiles = ProfileStore(settings.data_dir / "profiles.sqlite3")
    failed = []

    def stop_serving() -> None:
        failed.append(True)
        server.should_exit = True

    app = create_app(lambda: Engine(settings, model_path), keys, profiles, on_engine_failure=stop_serving)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level))
    server.run()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
