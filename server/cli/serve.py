"""`steerserve serve`: serve a model over the OpenAI HTTP API until stopped."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import typing
from pathlib import Path

from ..settings import Settings


def add_parser(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="serve a model over the OpenAI HTTP API")
    serve.add_argument("--config", type=Path, help="YAML file of settings (flags and STEERSERVE_* env win)")
    add_settings_flags(serve)


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per settings field (`max_model_len` -> `--max-model-len`); unset flags defer to env/YAML/defaults."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kind = typing.get_args(field.annotation) or (field.annotation,)
        if bool in kind:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=field.description)
        elif typing.get_origin(field.annotation) is typing.Literal:
            parser.add_argument(flag, dest=name, choices=kind, type=type(kind[0]), default=None, help=field.description)
        else:
            convert = next((t for t in (int, float, Path) if t in kind), str)
            parser.add_argument(flag, dest=name, type=convert, default=None, help=field.description)


def run(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    return serve_forever(Settings.load(args.config, **overrides))


def serve_forever(settings: Settings) -> int:
    """Serve until stopped: 0 after a clean shutdown, 1 on a startup error or when the engine failed."""
    # vLLM logs to stdout by default; a server's diagnostics belong on stderr, where a supervisor looks for why it
    # stopped (the engine's own traceback included). Set before vLLM is imported, inherited by its processes.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    import uvicorn

    from steerserve.server.adapters.registry import AdapterStore
    from steerserve.server.frontend.tool_calls import chat_template
    from steerserve.server.models.store import ModelFetchError, resolve_model
    from steerserve.server.stores.profiles import ProfileStore

    from ..engine.async_engine import Engine
    from ..http.app import create_app
    from ..http.auth import KeyStore, check_bind
    from ..http.limits import Limits

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("steerserve")
    try:
        keys = KeyStore.load(settings.api_keys) if settings.api_keys else KeyStore.open()
        check_bind(settings.host, keys)
        model_path = resolve_model(settings.model, settings.cache)
        template = chat_template(settings.chat_template) if settings.chat_template else None
    except (ModelFetchError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if keys.is_open:
        log.warning("no API keys configured (--api-keys): open mode, every request is the 'default' tenant "
                    "with admin rights; listening on loopback only")
    profiles = ProfileStore(settings.data_dir / "profiles.sqlite3")
    adapters = AdapterStore(settings.data_dir / "adapters.sqlite3", settings.data_dir / "adapters")
    failed = []

    def stop_serving() -> None:
        failed.append(True)
        server.should_exit = True

    app = create_app(lambda: Engine(settings, model_path), keys, profiles, on_engine_failure=stop_serving,
                     adapters=adapters, adapter_root=settings.adapter_root, playground=settings.playground,
                     tool_call_parser=settings.tool_call_parser, chat_template=template,
                     limits=Limits.from_settings(settings))
    # Our own access log line carries the request id (server/http/request_id.py); uvicorn's would repeat it.
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                                           access_log=False))
    server.run()
    return 1 if failed else 0
