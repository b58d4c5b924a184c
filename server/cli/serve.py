"""`steerserve serve`: serve a model over the OpenAI HTTP API until stopped."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import threading
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
    settings = Settings.load(args.config, **overrides)
    if settings.replicas is not None:  # Ray is imported only here (server/replicas/)
        from ..replicas.launch import serve_replicas

        return serve_replicas(settings)
    return serve_forever(settings)


def serve_forever(settings: Settings) -> int:
    """Serve until stopped, then end the process: status 0 after a clean shutdown, 1 on a startup error or when the
    engine failed (at start-up or while serving)."""
    # vLLM logs to stdout by default; a server's diagnostics belong on stderr, where a supervisor looks for why it
    # stopped (the engine's own traceback included). Set before vLLM is imported, inherited by its processes.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    import uvicorn

    from steerserve.server.frontend.tool_calls import chat_template
    from steerserve.server.models.store import ModelFetchError, resolve_model
    from steerserve.server.stores.database import DatabaseUnavailable

    from ..http.auth import KeyStore, check_bind
    from .app_from_settings import build_app, open_stores

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("steerserve")
    try:
        keys = KeyStore.load(settings.api_keys) if settings.api_keys else KeyStore.open()
        check_bind(settings.host, keys)
        model_path = resolve_model(settings.model, settings.cache)
        template = chat_template(settings.chat_template) if settings.chat_template else None
    except (ModelFetchError, ValueError, OSError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if keys.is_open:
        log.warning("no API keys configured (--api-keys): open mode, every request is the 'default' tenant "
                    "with admin rights; listening on loopback only")
    try:  # one shared database (--database-url), else the SQLite files under --data-dir, as always
        stores = open_stores(settings)
    except DatabaseUnavailable as exc:
        print(f"error: database: {exc}", file=sys.stderr)
        return 1
    except (RuntimeError, ValueError, OSError, ImportError) as exc:  # a bad URL, an unwritable artifact store
        print(f"error: {exc}", file=sys.stderr)
        return 1
    failed = []

    def stop_serving() -> None:
        failed.append(True)
        server.should_exit = True
        # A dead engine may not shut down cleanly: the supervisor gets the process back within a bounded time.
        deadline = threading.Timer(EXIT_AFTER_ENGINE_DEATH_S, os._exit, (1,))
        deadline.daemon = True  # it must not itself keep a process that shut down cleanly alive
        deadline.start()

    app = build_app(settings, model_path, keys, template, stop_serving, stores)
    # Our own access log line carries the request id (server/http/request_id.py); uvicorn's would repeat it.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=ABORT_GRACE_S, access_log=False)
    server = draining_server(uvicorn.Server, config, app.state.steerserve.admission, settings.shutdown_timeout)
    server.run()
    code = 1 if failed else 0
    # The engine is shut down (or was never built): whatever it may have left running (a build still in
    # progress when the stop came, its engine process, helper threads) must neither keep a stopped server alive
    # nor outlive it.
    import psutil

    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.kill()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


EXIT_AFTER_ENGINE_DEATH_S = 20.0  # the most a server whose engine died takes to exit (status 1)
ABORT_GRACE_S = 2.0  # after the drain: how long uvicorn waits for connections before cancelling them


def draining_server(base: type, config, admission, shutdown_timeout: float):
    """uvicorn's server, with a graceful drain on SIGTERM or SIGINT: new generation requests get a 503 and /ready
    a 503 at once; the admitted ones may finish for up to `shutdown_timeout` seconds; then the server stops,
    cancelling what is still running (which aborts its engine requests), shuts the engine down and exits 0.
    A second signal stops at once."""
    import asyncio
    import signal

    log = logging.getLogger("steerserve")

    class DrainingServer(base):
        drain_task = None

        async def serve(self, sockets=None):
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig: int, frame) -> None:
            # Not recorded in `_captured_signals`: uvicorn would re-raise it after the shutdown (exit -15, not 0).
            if self.drain_task is not None or self.should_exit:
                self.should_exit = True
                self.force_exit = self.force_exit or sig == signal.SIGINT or self.drain_task is not None
                return
            log.info("%s: draining (up to %g s for requests in progress)", signal.Signals(sig).name,
                     shutdown_timeout)
            admission.draining = True
            self.drain_task = self.loop.call_soon_threadsafe(self._drain)

        def _drain(self) -> None:
            async def drain() -> None:
                if not await admission.drain(shutdown_timeout):
                    log.warning("shutdown: %d requests still in progress after %g s: aborting them",
                                admission.total, shutdown_timeout)
                self.should_exit = True
            self.drain_task = asyncio.ensure_future(drain())

    return DrainingServer(config)
