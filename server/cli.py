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
    fetch.add_argument("name", choices=["smollm2"])

    keys = commands.add_parser("keys", help="manage API keys (only their sha256 is stored)")
    keys_cmd = keys.add_subparsers(dest="keys_command", required=True)
    add = keys_cmd.add_parser("add", help="create a key for a tenant; prints it once, stores only its hash")
    add.add_argument("--file", type=Path, required=True, help="key file (.yaml, .yml or .json); created 0600")
    add.add_argument("--tenant", required=True)
    add.add_argument("--role", choices=["user", "admin"], required=True)
    add.add_argument("--name", help="label for the key (who or what uses it)")

    ftri = commands.add_parser("ftri", help="rank MoE experts by how their routing separates a behaviour class "
                                            "(fTRI); writes a ranked list, a heatmap and a steering profile")
    ftri.add_argument("--model", type=Path, required=True, help="a local HF MoE checkpoint directory")
    ftri.add_argument("--sets", type=Path, nargs="+", required=True,
                      help='JSONL prompt sets, one {"prompt": ..., "label"?: ...} per line; label: the file stem')
    ftri.add_argument("--target", required=True, help="the class whose experts to find")
    ftri.add_argument("--classify", nargs="*", default=[], metavar="CLASS=REGEX",
                      help="with one set: classes from the greedy responses, the first matching regex wins")
    ftri.add_argument("--generated-tokens", type=int, default=0,
                      help="also count routing over the first N-1 generated tokens (default: prompt tokens only)")
    ftri.add_argument("--max-tokens", type=int, default=32, help="response length for --classify")
    ftri.add_argument("--top-k", type=int, default=10, help="experts switched off in the written profile")
    ftri.add_argument("--no-chat", action="store_true", help="send prompts raw, without the chat template")
    ftri.add_argument("--out", type=Path, required=True)

    args = parser.parse_args(argv)
    if args.command == "ftri":
        from .ftri import run as run_ftri

        report = run_ftri(args.model, args.sets, args.target, args.out, classify_rules=args.classify,
                          generated_tokens=args.generated_tokens, max_tokens=args.max_tokens, top_k=args.top_k,
                          chat=not args.no_chat)
        for r in report["ranked"][:args.top_k]:
            print(f"{r['expert']:>8s}  score {r['score']:+.4f}  target {r['freq_target']:.3f}  rest {r['freq_rest']:.3f}")
        print(f"wrote {args.out}/ftri.json, ftri.png, profile.json")
        return 0
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
    if args.command == "models":
        from .models import ModelFetchError, fetch_smollm2

        try:
            print(fetch_smollm2(Settings.load().cache))
        except ModelFetchError as exc:
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
