"""The FastAPI app: OpenAI routes on our engine wrapper, health and readiness, metrics, and error mapping."""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from steerserve.steering import spec as steering_spec

from . import generation as gen
from . import prompting, steer
from .auth import KeyStore, Principal, valid_tenant
from .engine import Engine
from .errors import APIError, BadRequest, Forbidden, NotFound, Unavailable, pydantic_to_api_error
from .metrics import Metrics, MetricsMiddleware
from .profiles import GLOBAL, ProfileStore, validate_name
from .protocol import ChatCompletionRequest, CompletionRequest, sampling_params, structured_output
from .tenants import TenantSettingsUpdate, TenantStore

log = logging.getLogger("steerserve.server")

ROUTES = {"/health", "/ready", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
          "/v1/steering/schema", "/v1/steering/profiles"}


class ClientDisconnected(Exception):
    pass


def create_app(engine_factory: Callable[[], Engine], keys: KeyStore, profiles: ProfileStore,
               on_engine_failure: Callable[[], None] = lambda: None, tenants: TenantStore | None = None,
               prefixes: prompting.PrefixStore | None = None) -> FastAPI:
    """The app. `engine_factory` builds the engine in a worker thread, so /health answers while it loads;
    `on_engine_failure` is called if it cannot be built or fails its steering self-test (the CLI then exits
    non-zero). Tenant settings and URIAL prefixes live beside the profiles unless given."""
    tenants = tenants or TenantStore(profiles.path)
    prefixes = prefixes or prompting.PrefixStore(profiles.path.parent / "urial")
    state: dict[str, Any] = {"engine": None, "error": None}
    metrics = Metrics(lambda: state["engine"].num_unfinished_requests() if state["engine"] else 0)

    async def load_engine() -> None:
        try:
            eng = await asyncio.to_thread(engine_factory)
            await eng.verify_steering()
            state["engine"] = eng
            log.info("engine ready: serving %s", state["engine"].info.name)
        except Exception as exc:  # readiness reports it; the process stays up to say why
            log.exception("engine failed to start")
            state["error"] = exc
            on_engine_failure()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = asyncio.create_task(load_engine())
        yield
        loader.cancel()
        if state["engine"] is not None:
            state["engine"].shutdown()

    app = FastAPI(title="steerserve", lifespan=lifespan)
    app.state.steerserve = state
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=ROUTES)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(ClientDisconnected)
    async def client_gone(_: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it; recorded in metrics as "client closed request"

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = pydantic_to_api_error(exc)
        return JSONResponse(err.body(), status_code=err.status)

    def engine() -> Engine:
        if state["engine"] is None:
            raise Unavailable("the model is still loading" if state["error"] is None
                              else f"the engine failed to start: {state['error']}")
        return state["engine"]

    def principal(request: Request) -> Principal:
        return keys.authenticate(request.headers.get("authorization"))

    async def admit(request: Request, schema: type[BaseModel]) -> tuple[Any, Engine, steer.Steering]:
        """The common start of a generation route: authenticate, parse, check the model, resolve steering."""
        who = principal(request)
        req = await _parse(request, schema)
        eng = _check_model(engine(), req.model)
        steering = steer.resolve(request.headers, req.steering, who, profiles, eng.facts)
        prompting.authorize(steering, who, tenants)
        prompting.check_request(steering, req, request.url.path)
        return req, eng, steering

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> dict:
        eng = engine()
        try:
            await eng.check_health()
        except Exception as exc:
            raise Unavailable(f"engine unhealthy: {exc}") from None
        return {"status": "ready", "model": eng.info.name}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        principal(request)
        info = engine().info
        return {"object": "list", "data": [{"id": info.name, "object": "model", "created": 0,
                                            "owned_by": "steerserve", "max_model_len": info.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req, eng, steering = await admit(request, CompletionRequest)
        if req.echo:
            raise BadRequest("echo is not supported by this server", param="echo")
        prompts = []
        for p in req.prompts():
            ids = eng.tokenizer.encode(p) if isinstance(p, str) else list(p)
            if not ids:
                raise BadRequest("prompt must not be empty", param="prompt")
            if isinstance(p, list) and not all(0 <= t < eng.info.vocab_size for t in p):
                raise BadRequest(f"prompt token ids must be in [0, {eng.info.vocab_size})", param="prompt")
            prompts.append(gen.Prompt(ids, p if isinstance(p, str) else None))
        params = _params(eng, req, max(prompts, key=lambda p: len(p.ids)), req.logprobs, steering)
        g = gen.Generation(eng, metrics, "/v1/completions", prompts, params, "cmpl", steering.cache_salt)
        top = req.logprobs or 0

        def choice_json(c: gen.Choice | gen.Delta, offset: int = 0) -> dict:
            lp = (gen.completion_logprobs(c.token_ids, c.logprobs, top, eng.tokenizer, offset)
                  if req.logprobs is not None else None)
            return {"index": c.index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason}

        head = {"id": g.id, "object": "text_completion", "created": g.created, "model": eng.info.name}
        if not req.stream:
            choices = await _until_disconnect(request, g.collect())
            return JSONResponse({**head, "choices": [choice_json(c) for c in choices], "usage": g.usage()},
                                headers={"X-Steering-Applied": steering.applied})

        sent = [0] * (len(prompts) * req.n)

        def chunk(d: gen.Delta) -> dict:
            sent[d.index] += len(d.text)
            return {**head, "choices": [choice_json(d, sent[d.index] - len(d.text))], "usage": None}

        return await _sse(request, g, [], chunk, head, req, steering)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req, eng, steering = await admit(request, ChatCompletionRequest)
        top = req.top_logprobs or 0
        g: gen.Generation | prompting.PromptRun
        if steering.spec.prompt is not None:  # URIAL, conjugate prompting: see server/prompting.py
            g = prompting.PromptRun(eng, metrics, req, steering, prefixes)
        else:
            text = _render_chat(eng, req)
            prompt = gen.Prompt(eng.tokenizer.encode(text, add_special_tokens=False), text)
            params = _params(eng, req, prompt, top if req.logprobs else None, steering,
                             structured_output(req.response_format))
            g = gen.Generation(eng, metrics, "/v1/chat/completions", [prompt], params, "chatcmpl",
                               steering.cache_salt)
        head = {"id": g.id, "object": "chat.completion", "created": g.created, "model": eng.info.name}

        def logprobs_json(c: gen.Choice | gen.Delta) -> dict | None:
            return gen.chat_logprobs(c.token_ids, c.logprobs, top, eng.tokenizer) if req.logprobs else None

        if not req.stream:
            choices = await _until_disconnect(request, g.collect())
            return JSONResponse({**head, "choices": [
                {"index": c.index, "message": {"role": "assistant", "content": c.text},
                 "logprobs": logprobs_json(c), "finish_reason": c.finish_reason} for c in choices],
                "usage": g.usage(), **_stats(g)}, headers={"X-Steering-Applied": steering.applied})

        head = {**head, "object": "chat.completion.chunk"}

        roles = [{**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}], "usage": None} for i in range(req.n)]

        def chunk(d: gen.Delta) -> dict:
            return {**head, "choices": [{"index": d.index, "delta": {"content": d.text} if d.text else {},
                                         "logprobs": logprobs_json(d), "finish_reason": d.finish_reason}],
                    "usage": None}

        return await _sse(request, g, roles, chunk, head, req, steering)

    @app.get("/v1/steering/schema")
    async def steering_schema() -> dict:
        return steering_spec.SteeringSpec.model_json_schema()

    def scope_of(who: Principal, scope: str, writing: bool) -> str:
        if scope not in ("tenant", "global"):
            raise BadRequest("scope must be 'tenant' or 'global'", param="scope")
        if scope == "global" and writing and not who.is_admin:
            raise Forbidden("only admins manage global steering profiles", param="scope")
        return GLOBAL if scope == "global" else who.tenant

    @app.get("/v1/steering/profiles")
    async def list_profiles(request: Request) -> dict:
        return {"object": "list", "data": profiles.list(principal(request).tenant)}

    @app.get("/v1/steering/profiles/{name}")
    async def get_profile(request: Request, name: str, scope: str | None = None) -> dict:
        who = principal(request)
        validate_name(name)
        spec = profiles.resolve(who.tenant, name) if scope is None else \
            profiles.get(scope_of(who, scope, writing=False), name)
        if spec is None:
            raise NotFound(f"steering profile '{name}' not found", param="name", code="profile_not_found")
        return {"name": name, "spec": spec}

    @app.put("/v1/steering/profiles/{name}")
    async def put_profile(request: Request, name: str, scope: str = "tenant") -> dict:
        who = principal(request)
        validate_name(name)
        owner = scope_of(who, scope, writing=True)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the profile is not valid JSON: {exc}", code="invalid_json") from None
        spec = steer.validate_profile(body, engine().facts)
        profiles.put(owner, name, spec)
        return {"name": name, "scope": scope, "spec": spec}

    @app.delete("/v1/steering/profiles/{name}")
    async def delete_profile(request: Request, name: str, scope: str = "tenant") -> dict:
        who = principal(request)
        validate_name(name)
        if not profiles.delete(scope_of(who, scope, writing=True), name):
            raise NotFound(f"steering profile '{name}' not found", param="name", code="profile_not_found")
        return {"name": name, "deleted": True}

    # --- tenant settings (admin-controlled switches) ---

    def tenant_of(who: Principal, tenant: str, writing: bool) -> str:
        if not valid_tenant(tenant):
            raise BadRequest("invalid tenant name: use 1-64 of A-Z a-z 0-9 _ . -", param="tenant")
        if not who.is_admin and (writing or tenant != who.tenant):
            raise Forbidden("only admins manage tenant settings" if writing else
                            "only admins read other tenants' settings", param="tenant")
        return tenant

    @app.get("/v1/tenants/{tenant}/settings")
    async def get_tenant_settings(request: Request, tenant: str) -> dict:
        tenant = tenant_of(principal(request), tenant, writing=False)
        return {"tenant": tenant, **tenants.get(tenant).model_dump()}

    @app.put("/v1/tenants/{tenant}/settings")
    async def put_tenant_settings(request: Request, tenant: str) -> dict:
        tenant = tenant_of(principal(request), tenant, writing=True)
        update = await _parse(request, TenantSettingsUpdate)
        return {"tenant": tenant, **tenants.update(tenant, update).model_dump()}

    # --- URIAL prefixes: built-in and registered by admins ---

    @app.get("/v1/steering/urial/prefixes")
    async def list_prefixes(request: Request) -> dict:
        principal(request)
        return {"object": "list", "data": prefixes.list()}

    @app.get("/v1/steering/urial/prefixes/{name}")
    async def get_prefix(request: Request, name: str) -> dict:
        principal(request)
        text = prefixes.get(name)
        if text is None:
            raise NotFound(f"URIAL prefix '{name}' not found", param="name", code="prefix_not_found")
        return {**prompting.describe(name, text, builtin=name in prompting.urial.BUILTIN_PREFIXES), "text": text}

    @app.put("/v1/steering/urial/prefixes/{name}")
    async def put_prefix(request: Request, name: str) -> dict:
        if not principal(request).is_admin:
            raise Forbidden("only admins register URIAL prefixes", param="name")
        try:
            return prefixes.put(name, (await request.body()).decode("utf-8"))
        except UnicodeDecodeError:
            raise BadRequest("the prefix must be UTF-8 text", param="body") from None
        except ValueError as exc:
            raise BadRequest(str(exc), param="name") from None

    @app.delete("/v1/steering/urial/prefixes/{name}")
    async def delete_prefix(request: Request, name: str) -> dict:
        if not principal(request).is_admin:
            raise Forbidden("only admins delete URIAL prefixes", param="name")
        try:
            deleted = prefixes.delete(name)
        except ValueError as exc:
            raise BadRequest(str(exc), param="name") from None
        if not deleted:
            raise NotFound(f"URIAL prefix '{name}' not found", param="name", code="prefix_not_found")
        return {"name": name, "deleted": True}

    return app


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    """The body as `model`: malformed JSON and schema violations are 400s naming the field."""
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise pydantic_to_api_error(exc) from None


def _check_model(eng: Engine, name: str) -> Engine:
    if name != eng.info.name:
        raise NotFound(f"The model '{name}' does not exist; this server serves '{eng.info.name}'.",
                       param="model", code="model_not_found")
    return eng


def _render_chat(eng: Engine, req: ChatCompletionRequest) -> str:
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    return prompting.render_chat_template(eng, messages, req.add_generation_prompt)


def _stats(g) -> dict:
    """The response's `steering_stats` (intermediate texts of prompt methods), when asked for and present."""
    stats = g.stats() if isinstance(g, prompting.PromptRun) else None
    return {"steering_stats": stats} if stats else {}


def _params(eng: Engine, req, prompt: gen.Prompt, logprobs: int | None, steering: steer.Steering, structured=None):
    return sampling_params(req, prompt_len=len(prompt.ids), max_model_len=eng.info.max_model_len,
                           vocab_size=eng.info.vocab_size, logprobs=logprobs, structured=structured,
                           extra_args=steering.extra_args())


async def _until_disconnect(request: Request, work):
    """Await `work`, cancelling it (which aborts its engine requests) if the client goes away first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientDisconnected()
    return _engine_result(task)


def _engine_result(task: asyncio.Future):
    try:
        return task.result()
    except APIError:
        raise
    except Exception as exc:
        raise _engine_error(exc) from exc


def _engine_error(exc: Exception) -> APIError:
    """vLLM rejects some requests only when they reach the engine; those are the client's errors (400)."""
    from vllm.exceptions import VLLMClientError

    cause = exc.__cause__ or exc
    if isinstance(cause, VLLMClientError | ValueError):
        return BadRequest(str(cause), param=getattr(cause, "parameter", None))
    log.exception("generation failed", exc_info=exc)
    return APIError(f"generation failed: {type(cause).__name__}")


async def _sse(request: Request, g: gen.Generation | prompting.PromptRun, preamble: list[dict],
               render: Callable[[gen.Delta], dict], head: dict, req, steering: steer.Steering) -> Response:
    """Server-sent events. The first delta is awaited before answering, so a request the engine rejects is still
    a 400 and not a broken stream."""
    deltas = g.deltas()
    try:
        first = await _until_disconnect(request, deltas.__anext__())
    except StopAsyncIteration:
        first = None
    include_usage = req.stream_options is not None and req.stream_options.include_usage

    async def body() -> AsyncIterator[str]:
        try:
            for chunk in preamble:
                yield f"data: {json.dumps(chunk)}\n\n"
            if first is not None:
                yield f"data: {json.dumps(render(first))}\n\n"
                async for d in deltas:
                    yield f"data: {json.dumps(render(d))}\n\n"
            if stats := _stats(g):
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': None, **stats})}\n\n"
            if include_usage:
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': g.usage()})}\n\n"
        except Exception as exc:  # the status line is gone; report in-band as OpenAI does
            err = exc if isinstance(exc, APIError) else _engine_error(exc)
            yield f"data: {json.dumps(err.body())}\n\n"
        finally:
            await deltas.aclose()
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Steering-Applied": steering.applied})
