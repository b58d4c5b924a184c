"""The FastAPI app: the engine built in the background, the routers (server/http/routes/), error mapping and
metrics."""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from steerserve.server.adapters.pool import AdapterPool
from steerserve.server.adapters.registry import AdapterStore, ServedModel
from steerserve.server.frontend import prompt_methods as prompting
from steerserve.server.frontend import tool_calls
from steerserve.server.frontend.chat import set_template
from steerserve.server.stores.profiles import ProfileStore
from steerserve.server.stores.tenants import TenantStore
from steerserve.server.stores.vectors import VectorStore, default_store
from steerserve.steering.spec import SteeringSpec

from ..engine.async_engine import Engine
from .admission import Admission, AdmissionMiddleware, Limits
from .auth import KeyStore
from .body import body_error, publish_schemas
from .errors import APIError, pydantic_to_api_error
from .limits import InputLimits, RequestGuard
from .metrics import Metrics, MetricsMiddleware
from .request_id import RequestIdMiddleware
from .routes import ROUTERS
from .routes import playground as playground_routes
from .routes.adapters import PathRegistration
from .state import AppState
from .streaming import ClientDisconnected

log = logging.getLogger("steerserve.server")
ENGINE_WATCH_SECONDS = 0.25  # how often the app checks that the engine is alive
DEAD_LINGER_SECONDS = 2.0  # after the engine died: answering 503 this long before the process exits


async def in_daemon_thread(fn: Callable[[], Engine]) -> Engine:
    """`fn()` in a daemon thread: unlike `asyncio.to_thread`, a server stopped while the engine is still being
    built does not wait for the build (asyncio joins its default executor's threads when the loop ends)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def settle(method, value) -> None:
        if not done.done():
            method(value)

    def build() -> None:
        try:
            result, method = fn(), done.set_result
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            result, method = exc, done.set_exception
        try:
            loop.call_soon_threadsafe(settle, method, result)
        except RuntimeError:  # the loop is gone: the server stopped while we were building
            pass

    threading.Thread(target=build, name="engine-build", daemon=True).start()
    return await done


def create_app(engine_factory: Callable[[], Engine], keys: KeyStore, profiles: ProfileStore,
               on_engine_failure: Callable[[], None] = lambda: None, adapters: AdapterStore | None = None,
               adapter_root: Path | None = None, tenants: TenantStore | None = None,
               prefixes: prompting.PrefixStore | None = None, playground: bool = True,
               tool_call_parser: str | None = None, chat_template: str | None = None,
               vectors: VectorStore | None = None, limits: Limits | None = None,
               input_limits: InputLimits | None = None, data_dir: Path | None = None) -> FastAPI:
    """The app. `engine_factory` builds the engine in a worker thread, so /health answers while it loads;
    `on_engine_failure` is called if it cannot be built, fails its steering self-test, or dies while serving
    (the CLI then exits non-zero; from the death on, /health, /ready and every engine route answer 503).
    `limits`: the admission bounds (server/http/admission.py). `adapters`: the adapter registry, served when the
    engine has LoRA enabled. Tenant settings, URIAL prefixes and control vectors live beside the profiles (in their
    database, the vector files under `data_dir`) unless given; `data_dir` defaults to the profiles' SQLite file's
    directory (a server database needs them all given). `playground`: serve the playground page
    (server/http/routes/playground.py); off, its routes do not exist (404). `tool_call_parser` (a vLLM tool parser name) enables chat `tools`; `chat_template` (its text)
    replaces the model's chat template. `input_limits`: what one request may send (server/http/limits.py; the
    settings' defaults if None)."""
    data_dir = data_dir or (profiles.path.parent if profiles.path is not None else None)
    if profiles.path is None and (prefixes is None or vectors is None or data_dir is None):
        raise ValueError("on a server database, pass the prefix and vector stores and the data dir explicitly")
    state = AppState(keys=keys, profiles=profiles, tenants=tenants or TenantStore(profiles.db),
                     prefixes=prefixes or prompting.PrefixStore(profiles.db, legacy_dir=data_dir / "urial"),
                     vectors=vectors or default_store(data_dir),
                     metrics=Metrics(lambda: state.engine.num_unfinished_requests() if state.engine else 0),
                     adapters=adapters, adapter_root=adapter_root, admission=Admission(limits),
                     input_limits=input_limits or InputLimits(), data_dir=data_dir)

    async def load_engine() -> None:
        try:
            eng = await in_daemon_thread(engine_factory)
            await eng.verify_steering()
            if chat_template is not None:
                set_template(eng.tokenizer, chat_template)
            if tool_call_parser is not None:  # an unknown parser, or one this tokenizer cannot serve, stops start-up
                tool_calls.parser_class(tool_call_parser, eng.tokenizer)
                state.tool_parser = tool_call_parser
            if eng.lora is not None and adapters is not None:
                state.base = await asyncio.to_thread(ServedModel.from_checkpoint, eng.info.path, eng.info.name,
                                                     eng.lora["max_lora_rank"])
                state.pool = AdapterPool(eng, adapters, state.metrics, eng.lora["max_loras"],
                                         eng.lora["max_cpu_loras"])
                for name, why in (await asyncio.to_thread(adapters.recheck, state.base)).items():
                    log.error("stored adapter %s is broken and will be refused: %s", name, why)
            state.engine = eng
            log.info("engine ready: serving %s", state.engine.info.name)
        except Exception as exc:  # readiness reports it; the process stays up to say why
            log.exception("engine failed to start")
            state.error = exc
            on_engine_failure()
            return
        while (reason := eng.dead()) is None:  # vLLM's monitor sets the flag as soon as the engine core exits
            await asyncio.sleep(ENGINE_WATCH_SECONDS)
        state.dead = reason
        log.error("the engine died while serving (%s): answering 503, exiting in %g s", reason, DEAD_LINGER_SECONDS)
        await asyncio.sleep(DEAD_LINGER_SECONDS)  # long enough for probes and balancers to see the 503s
        on_engine_failure()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = asyncio.create_task(load_engine())
        yield
        loader.cancel()
        if state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(title="steerserve", lifespan=lifespan)
    app.state.steerserve = state
    for router in ROUTERS:
        app.include_router(router)
    if playground:
        app.include_router(playground_routes.router)
    publish_schemas(app, SteeringSpec, PathRegistration)  # bodies the profile and adapter routes read themselves
    app.add_middleware(AdmissionMiddleware)
    app.add_middleware(RequestGuard, limits=state.input_limits, open_mode=keys.is_open)  # inside metrics: counted
    app.add_middleware(MetricsMiddleware, metrics=state.metrics, router=app.router)
    app.add_middleware(RequestIdMiddleware)  # outermost: every response carries X-Request-Id

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        """The router's own errors (an unknown path 404, a wrong method 405 with its Allow header) in OpenAI's shape."""
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse({"error": {"message": str(exc.detail), "type": kind, "param": None, "code": code}},
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ClientDisconnected)
    async def client_gone(_: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it; recorded in metrics as "client closed request"

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = body_error(request) or pydantic_to_api_error(exc)  # a body that is not JSON is reported first
        return JSONResponse(err.body(), status_code=err.status)

    return app
