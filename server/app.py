"""The FastAPI app: OpenAI routes on our engine wrapper, health and readiness, metrics, and error mapping."""
from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from steerserve.steering import spec as steering_spec

from . import generation as gen
from . import steer
from .auth import KeyStore, Principal
from .chat import render as render_chat
from .engine import Engine
from .errors import APIError, BadRequest, Forbidden, NotFound, Unavailable, pydantic_to_api_error
from .experts import STATS_KEY, read_counts
from .metrics import Metrics, MetricsMiddleware
from .profiles import GLOBAL, ProfileStore, validate_name
from .protocol import ChatCompletionRequest, CompletionRequest, sampling_params, structured_output

log = logging.getLogger("steerserve.server")

ROUTES = {"/health", "/ready", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
          "/v1/steering/schema", "/v1/steering/profiles"}


class ClientDisconnected(Exception):
    pass


def create_app(engine_factory: Callable[[], Engine], keys: KeyStore, profiles: ProfileStore,
               on_engine_failure: Callable[[], None] = lambda: None) -> FastAPI:
    """The app. `engine_factory` builds the engine in a worker thread, so /health answers while it loads;
    `on_engine_failure` is called if it cannot be built or fails its steering self-test (the CLI then exits
    non-zero)."""
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
        return req, eng, steer.resolve(request.headers, req.steering, who, profiles, eng.facts)

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
        steering = steering.bind([len(p.ids) for p in prompts], None)
        stats = _stats_key(request, req, eng)
        params = _params(eng, req, max(prompts, key=lambda p: len(p.ids)), req.logprobs, steering, stats_key=stats)
        g = gen.Generation(eng, metrics, "/v1/completions", prompts, params, "cmpl", steering.salt_for)
        top = req.logprobs or 0

        def choice_json(c: gen.Choice | gen.Delta, offset: int = 0) -> dict:
            lp = (gen.completion_logprobs(c.token_ids, c.logprobs, top, eng.tokenizer, offset)
                  if req.logprobs is not None else None)
            return {"index": c.index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason}

        head = {"id": g.id, "object": "text_completion", "created": g.created, "model": eng.info.name}
        if not req.stream:
            choices = await _until_disconnect(request, g.collect())
            return JSONResponse({**head, "choices": [choice_json(c) for c in choices], "usage": g.usage(),
                                 **_stats_json(eng, stats)}, headers={"X-Steering-Applied": steering.applied})

        sent = [0] * (len(prompts) * req.n)

        def chunk(d: gen.Delta) -> dict:
            sent[d.index] += len(d.text)
            return {**head, "choices": [choice_json(d, sent[d.index] - len(d.text))], "usage": None}

        return await _sse(request, g, [], chunk, head, req, steering)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req, eng, steering = await admit(request, ChatCompletionRequest)
        chat = render_chat(eng.tokenizer, [{"role": m.role, "content": m.text()} for m in req.messages],
                           req.add_generation_prompt)
        prompt = gen.Prompt(chat.ids, chat.text)
        steering = steering.bind([len(prompt.ids)], chat.role_spans)
        top = req.top_logprobs or 0
        stats = _stats_key(request, req, eng)
        params = _params(eng, req, prompt, top if req.logprobs else None, steering,
                         structured_output(req.response_format), stats)
        g = gen.Generation(eng, metrics, "/v1/chat/completions", [prompt], params, "chatcmpl", steering.salt_for)
        head = {"id": g.id, "object": "chat.completion", "created": g.created, "model": eng.info.name}

        def logprobs_json(c: gen.Choice | gen.Delta) -> dict | None:
            return gen.chat_logprobs(c.token_ids, c.logprobs, top, eng.tokenizer) if req.logprobs else None

        if not req.stream:
            choices = await _until_disconnect(request, g.collect())
            return JSONResponse({**head, "choices": [
                {"index": c.index, "message": {"role": "assistant", "content": c.text},
                 "logprobs": logprobs_json(c), "finish_reason": c.finish_reason} for c in choices],
                "usage": g.usage(), **_stats_json(eng, stats)}, headers={"X-Steering-Applied": steering.applied})

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


def _params(eng: Engine, req, prompt: gen.Prompt, logprobs: int | None, steering: steer.Steering, structured=None,
            stats_key: str | None = None):
    extra = steering.extra_args()
    if stats_key:
        extra = {**(extra or {}), STATS_KEY: stats_key}
    return sampling_params(req, prompt_len=len(prompt.ids), max_model_len=eng.info.max_model_len,
                           vocab_size=eng.info.vocab_size, logprobs=logprobs, structured=structured,
                           extra_args=extra)


def _stats_key(request: Request, req, eng: Engine) -> str | None:
    """A fresh key if the request asks for its routed-expert counts (body `steering_stats` or the
    `X-Steering-Stats: routed_experts` header), else None."""
    header = request.headers.get("x-steering-stats")
    if header is not None and header.strip() not in ("routed_experts", ""):
        raise BadRequest("X-Steering-Stats: the only statistic is 'routed_experts'", param="X-Steering-Stats")
    if not ((req.steering_stats and req.steering_stats.routed_experts) or (header or "").strip()):
        return None
    field = "steering_stats.routed_experts" if header is None else "X-Steering-Stats"
    if not eng.facts.moe_layers:
        raise BadRequest(f"{field}: this model has no routed experts (a dense model)", param=field)
    if req.stream:
        raise BadRequest(f"{field}: routed-expert counts come with non-streaming responses only", param=field)
    return uuid.uuid4().hex


def _stats_json(eng: Engine, key: str | None) -> dict:
    """The response extension: per MoE decoder layer, how often each expert was selected for this request's
    tokens that went through the model (prompt and generated tokens, all choices; the last sampled token is
    never run through the model)."""
    return {"steering_stats": {"routed_experts": read_counts(key, eng.facts.moe_layers)}} if key else {}


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


async def _sse(request: Request, g: gen.Generation, preamble: list[dict], render: Callable[[gen.Delta], dict],
               head: dict, req, steering: steer.Steering) -> Response:
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
