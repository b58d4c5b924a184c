"""The FastAPI app: OpenAI routes on our engine wrapper, health and readiness, metrics, and error mapping."""
from __future__ import annotations

import asyncio
import json
import logging
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from steerserve.steering import spec as steering_spec
from steerserve.steering.iapt import PLACEHOLDER_ID, SOFT_TOKENS

from .. import generation as gen
from .. import iapt, prompting, steer
from ..adapters import Adapter, AdapterInvalid, AdapterStore, ServedModel, validate_adapter_name
from ..chat import render as render_chat
from ..engine import Engine
from ..experts import STATS_KEY, read_counts
from ..pool import AdapterPool
from ..profiles import GLOBAL, ProfileStore, validate_name
from ..tenants import TenantSettingsUpdate, TenantStore
from .auth import KeyStore, Principal, valid_tenant
from .errors import APIError, BadRequest, Forbidden, NotFound, Unavailable, pydantic_to_api_error
from .metrics import Metrics, MetricsMiddleware
from .protocol import ChatCompletionRequest, CompletionRequest, sampling_params, structured_output

log = logging.getLogger("steerserve.server")

ROUTES = {"/health", "/ready", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
          "/v1/steering/schema", "/v1/steering/profiles", "/v1/adapters"}


class ClientDisconnected(Exception):
    pass


def create_app(engine_factory: Callable[[], Engine], keys: KeyStore, profiles: ProfileStore,
               on_engine_failure: Callable[[], None] = lambda: None, adapters: AdapterStore | None = None,
               adapter_root: Path | None = None, tenants: TenantStore | None = None,
               prefixes: prompting.PrefixStore | None = None) -> FastAPI:
    """The app. `engine_factory` builds the engine in a worker thread, so /health answers while it loads;
    `on_engine_failure` is called if it cannot be built or fails its steering self-test (the CLI then exits
    non-zero). `adapters`: the adapter registry, served when the engine has LoRA enabled. Tenant settings and
    URIAL prefixes live beside the profiles unless given."""
    tenants = tenants or TenantStore(profiles.path)
    prefixes = prefixes or prompting.PrefixStore(profiles.path.parent / "urial")
    state: dict[str, Any] = {"engine": None, "error": None, "pool": None, "base": None}
    metrics = Metrics(lambda: state["engine"].num_unfinished_requests() if state["engine"] else 0)

    async def load_engine() -> None:
        try:
            eng = await asyncio.to_thread(engine_factory)
            await eng.verify_steering()
            if eng.lora is not None and adapters is not None:
                state["base"] = await asyncio.to_thread(ServedModel.from_checkpoint, eng.info.path,
                                                        eng.info.name, eng.lora["max_lora_rank"])
                state["pool"] = AdapterPool(eng, adapters, metrics, eng.lora["max_loras"],
                                            eng.lora["max_cpu_loras"])
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

    async def admit(request: Request, schema: type[BaseModel]) -> tuple[Any, Engine, steer.Steering, Served]:
        """The common start of a generation route: authenticate, parse, check the model and adapter, resolve
        steering."""
        who = principal(request)
        req = await _parse(request, schema)
        eng, adapter_name = _check_model(engine(), req.model, request.headers.get("x-adapter"))
        served = Served(eng.info.name, who.tenant, adapter_of(who, adapter_name) if adapter_name else None,
                        state["pool"])
        steering = steer.resolve(request.headers, req.steering, who, profiles, eng.facts, eng.model_steering)
        prompting.authorize(steering, who, tenants)
        prompting.check_request(steering, req, request.url.path)
        if steering.spec.prompt is not None and served.adapter is not None:
            raise BadRequest("prompt-level steering (steering.prompt) cannot be combined with an adapter yet",
                             param="steering.prompt", code="invalid_steering")
        if steering.spec.prompt is not None and steering.spec.attention and steering.spec.attention.spans:
            raise BadRequest("span steering (steering.attention.spans) cannot be combined with prompt-level "
                             "methods yet: their targets refer to the chat template's tokens",
                             param="steering.attention.spans", code="invalid_steering")
        return req, eng, steering, served

    def pool() -> AdapterPool:
        engine()
        if state["pool"] is None or adapters is None:
            raise BadRequest("this server does not serve adapters (start it with --enable-lora)", param="model",
                             code="adapters_disabled")
        return state["pool"]

    def adapter_of(who: Principal, name: str) -> Adapter:
        pool()
        validate_adapter_name(name, param="model")
        adapter = adapters.resolve(who.tenant, name)
        if adapter is None:
            raise NotFound(f"adapter '{name}' not found", param="model", code="adapter_not_found")
        return adapter

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
        who = principal(request)
        info = engine().info
        data = [{"id": info.name, "object": "model", "created": 0, "owned_by": "steerserve",
                 "max_model_len": info.max_model_len}]
        if state["pool"] is not None and adapters is not None:
            data += [{"id": f"{info.name}:{a.name}", "object": "model", "created": int(a.created),
                      "owned_by": a.tenant if a.scope == "tenant" else "steerserve", "parent": info.name,
                      "root": info.name, "max_model_len": info.max_model_len}
                     for a in adapters.list(who.tenant) if not any(d["id"] == f"{info.name}:{a.name}" for d in data)]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req, eng, steering, served = await admit(request, CompletionRequest)
        if req.echo:
            raise BadRequest("echo is not supported by this server", param="echo")
        prompts = []
        for p in req.prompts():
            ids = eng.tokenizer.encode(p) if isinstance(p, str) else list(p)
            if not ids:
                raise BadRequest("prompt must not be empty", param="prompt")
            if isinstance(p, list) and not all(0 <= t < eng.info.vocab_size for t in p):
                raise BadRequest(f"prompt token ids must be in [0, {eng.info.vocab_size})", param="prompt")
            prompts.append(gen.Prompt(served.prompt(ids, eng.info.max_model_len, "prompt"),
                                      p if isinstance(p, str) else None))
        steering = steering.bind([len(p.ids) for p in prompts], None)
        stats = _stats_key(request, req, eng)
        params = _params(eng, req, max(prompts, key=lambda p: len(p.ids)), req.logprobs, steering, served,
                         stats_key=stats)
        g = gen.Generation(eng, metrics, "/v1/completions", prompts, params, "cmpl", served.salt(steering.salt_for),
                           served.acquire)
        top = req.logprobs or 0

        def choice_json(c: gen.Choice | gen.Delta, offset: int = 0) -> dict:
            lp = (gen.completion_logprobs(c.token_ids, c.logprobs, top, eng.tokenizer, offset)
                  if req.logprobs is not None else None)
            return {"index": c.index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason}

        head = {"id": g.id, "object": "text_completion", "created": g.created, "model": served.model}
        if not req.stream:
            choices = await _until_disconnect(request, g.collect())
            return JSONResponse({**head, "choices": [choice_json(c) for c in choices], "usage": g.usage(),
                                 **_stats_json(eng, stats)}, headers=served.headers(steering))

        sent = [0] * (len(prompts) * req.n)

        def chunk(d: gen.Delta) -> dict:
            sent[d.index] += len(d.text)
            return {**head, "choices": [choice_json(d, sent[d.index] - len(d.text))], "usage": None}

        return await _sse(request, g, [], chunk, head, req, served.headers(steering))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req, eng, steering, served = await admit(request, ChatCompletionRequest)
        top = req.top_logprobs or 0
        stats = _stats_key(request, req, eng)
        g: gen.Generation | prompting.PromptRun
        if steering.spec.prompt is not None:  # URIAL, conjugate prompting: see server/prompting.py
            if stats:
                raise BadRequest("routed-expert counts are not available with prompt-level steering yet",
                                 param="steering_stats.routed_experts")
            g = prompting.PromptRun(eng, metrics, req, steering, prefixes)
        else:
            chat = render_chat(eng.tokenizer, [{"role": m.role, "content": m.text()} for m in req.messages],
                               req.add_generation_prompt)
            prompt = gen.Prompt(served.prompt(chat.ids, eng.info.max_model_len, "messages"), chat.text)
            steering = steering.bind([len(prompt.ids)], chat.role_spans)
            params = _params(eng, req, prompt, top if req.logprobs else None, steering, served,
                             structured_output(req.response_format), stats)
            g = gen.Generation(eng, metrics, "/v1/chat/completions", [prompt], params, "chatcmpl",
                               served.salt(steering.salt_for), served.acquire)
        head = {"id": g.id, "object": "chat.completion", "created": g.created, "model": served.model}

        def logprobs_json(c: gen.Choice | gen.Delta) -> dict | None:
            return gen.chat_logprobs(c.token_ids, c.logprobs, top, eng.tokenizer) if req.logprobs else None

        if not req.stream:
            choices = await _until_disconnect(request, g.collect())
            return JSONResponse({**head, "choices": [
                {"index": c.index, "message": {"role": "assistant", "content": c.text},
                 "logprobs": logprobs_json(c), "finish_reason": c.finish_reason} for c in choices],
                "usage": g.usage(), **_stats(g), **_stats_json(eng, stats)}, headers=served.headers(steering))

        head = {**head, "object": "chat.completion.chunk"}

        roles = [{**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}], "usage": None} for i in range(req.n)]

        def chunk(d: gen.Delta) -> dict:
            return {**head, "choices": [{"index": d.index, "delta": {"content": d.text} if d.text else {},
                                         "logprobs": logprobs_json(d), "finish_reason": d.finish_reason}],
                    "usage": None}

        return await _sse(request, g, roles, chunk, head, req, served.headers(steering))

    @app.get("/v1/steering/schema")
    async def steering_schema() -> dict:
        return steering_spec.SteeringSpec.model_json_schema()

    def scope_of(who: Principal, scope: str, writing: bool, what: str = "steering profiles") -> str:
        if scope not in ("tenant", "global"):
            raise BadRequest("scope must be 'tenant' or 'global'", param="scope")
        if scope == "global" and writing and not who.is_admin:
            raise Forbidden(f"only admins manage global {what}", param="scope")
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

    # --- the adapter registry ------------------------------------------------------------------------------------
    def adapter_json(adapter: Adapter) -> dict:
        return {**adapter.public(), "model": f"{engine().info.name}:{adapter.name}", **pool().status(adapter)}

    @app.get("/v1/adapters")
    async def list_adapters(request: Request) -> dict:
        who = principal(request)
        pool()
        return {"object": "list", "data": [adapter_json(a) for a in adapters.list(who.tenant)]}

    @app.get("/v1/adapters/{name}")
    async def get_adapter(request: Request, name: str, scope: str | None = None) -> dict:
        who = principal(request)
        pool()
        validate_adapter_name(name)
        adapter = adapters.resolve(who.tenant, name) if scope is None else \
            adapters.get(scope_of(who, scope, writing=False, what="adapters"), name)
        if adapter is None:
            raise NotFound(f"adapter '{name}' not found", param="name", code="adapter_not_found")
        return adapter_json(adapter)

    @app.put("/v1/adapters/{name}")
    async def put_adapter(request: Request, name: str, scope: str = "tenant") -> dict:
        """Register (or replace) an adapter: JSON `{"path": "<dir on the server>", "kind": "lora" | "iapt"}`, or
        a multipart upload of its two files (the kind follows from their names)."""
        who = principal(request)
        validate_adapter_name(name)
        owner = scope_of(who, scope, writing=True, what="adapters")
        adapter_pool = pool()
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            kind, path = await _save_upload(request, adapters.upload_dir())
            owned = True
        else:
            kind, path, owned = *_path_registration(await request.body(), who, adapter_root), False
        try:
            new, old = await asyncio.to_thread(adapters.register, owner, name, kind, path, state["base"], owned)
        except BaseException:
            if owned:
                shutil.rmtree(path, ignore_errors=True)
            raise
        if old is not None:
            adapter_pool.retire(old)
        return adapter_json(new)

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(request: Request, name: str, scope: str = "tenant") -> dict:
        who = principal(request)
        validate_adapter_name(name)
        adapter_pool = pool()
        old = adapters.delete(scope_of(who, scope, writing=True, what="adapters"), name)
        if old is None:
            raise NotFound(f"adapter '{name}' not found", param="name", code="adapter_not_found")
        adapter_pool.retire(old)  # requests already using it finish with it
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


UPLOAD_FILES = {"lora": ("adapter_config.json", "adapter_model.safetensors"),
                "iapt": ("iapt_config.json", "iapt_model.safetensors")}
_EXPECTED = " or ".join(" and ".join(files) for files in UPLOAD_FILES.values())


async def _save_upload(request: Request, into: Path) -> tuple[str, Path]:
    """The multipart upload's adapter files written into `into` (a fresh directory, removed on failure), and
    the adapter kind their names say."""
    known = {name for files in UPLOAD_FILES.values() for name in files}
    try:
        form = await request.form()
        seen: set[str] = set()
        for field, value in form.multi_items():
            filename = getattr(value, "filename", None)
            if filename is None:
                raise BadRequest(f"form field {field!r} is not a file", param=field)
            target = Path(filename).name if Path(filename).name in known else field
            if target not in known or target in seen:
                raise BadRequest(f"unexpected upload {filename!r}: send {_EXPECTED}", param=field)
            seen.add(target)
            with (into / target).open("wb") as out:
                while chunk := await value.read(1 << 20):
                    out.write(chunk)
        await form.close()
        kinds = [kind for kind, files in UPLOAD_FILES.items() if seen <= set(files)]
        if not kinds:
            raise BadRequest(f"the uploaded files mix adapter kinds: send {_EXPECTED}", param="files")
    except BaseException:
        shutil.rmtree(into, ignore_errors=True)
        raise
    return kinds[0], into


def _path_registration(raw: bytes, who: Principal, adapter_root: Path | None) -> tuple[str, Path]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict) or not isinstance(body.get("path"), str):
        raise BadRequest("expected {\"path\": \"<adapter directory on the server>\", \"kind\": \"lora\" | \"iapt\"} "
                         "or a multipart upload", param="path")
    unknown = sorted(set(body) - {"path", "kind"})
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}", param=unknown[0])
    kind = body.get("kind", "lora")
    path = Path(body["path"]).expanduser().resolve()
    if not who.is_admin:  # a user must not make the server read (or probe) arbitrary paths
        root = adapter_root.resolve() if adapter_root else None
        if root is None or (path != root and root not in path.parents):
            raise Forbidden("users register adapters by path only inside the server's --adapter-root; upload the "
                            "files instead", param="path")
    if not path.is_dir():
        raise AdapterInvalid("files", f"{body['path']} is not a directory on the server")
    return kind, path


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


def _check_model(eng: Engine, name: str, header: str | None = None) -> tuple[Engine, str | None]:
    """The engine and the adapter a request names: `"<base>:<adapter>"` in `model` and/or `X-Adapter`."""
    base = eng.info.name
    adapter = name[len(base) + 1:] if name.startswith(base + ":") else None
    if name != base and adapter is None:
        raise NotFound(f"The model '{name}' does not exist; this server serves '{base}' (and '{base}:<adapter>').",
                       param="model", code="model_not_found")
    if header is not None:
        header = header.strip()
        if adapter is not None and header != adapter:
            raise BadRequest(f"model names adapter '{adapter}' but X-Adapter names '{header}'", param="X-Adapter")
        adapter = header
    if adapter == "":
        raise BadRequest("the adapter name is empty", param="model")
    return eng, adapter


@dataclass(frozen=True)
class Served:
    """What serves a request besides the base model: its adapter (None: the base model), and how it says so."""

    base: str
    tenant: str
    adapter: Adapter | None
    pool: AdapterPool | None

    @property
    def model(self) -> str:
        return f"{self.base}:{self.adapter.name}" if self.adapter else self.base

    @property
    def acquire(self) -> Callable[[], Any] | None:
        if self.adapter is None or self.pool is None:
            return None
        return lambda: self.pool.acquire(self.adapter, self.tenant)

    def headers(self, steering: steer.Steering) -> dict[str, str]:
        headers = {"X-Steering-Applied": steering.applied}
        if self.adapter is not None:
            headers["X-Adapter-Applied"] = f"{self.adapter.name}; scope={self.adapter.scope}"
        return headers

    # IAPT adapters (server/iapt.py): 4 placeholders after the instruction, the adapter in extra_args, no
    # prefix-cache reads, and a salt so no other request reads their blocks.
    @property
    def iapt(self) -> bool:
        return self.adapter is not None and self.adapter.kind == "iapt"

    def prompt(self, ids: list[int], max_model_len: int, param: str) -> list[int]:
        if not self.iapt:
            return ids
        if len(ids) + SOFT_TOKENS >= max_model_len:
            raise BadRequest(f"This model's maximum context length is {max_model_len} tokens; the prompt has "
                             f"{len(ids)} tokens and the IAPT adapter adds {SOFT_TOKENS} soft tokens, which leaves no "
                             "room to generate.", param=param, code="context_length_exceeded")
        return ids + [PLACEHOLDER_ID] * SOFT_TOKENS

    def extra_args(self) -> dict:
        return iapt.extra_args(self.adapter.path, self.adapter.engine_name) if self.iapt else {}

    def salt(self, salt_for: Callable[[int], str | None]) -> Callable[[int], str | None]:
        if not self.iapt:
            return salt_for
        return lambda prompt_len: f"iapt:{self.adapter.engine_name}|{salt_for(prompt_len) or ''}"


def _stats(g) -> dict:
    """The response's `steering_stats` (intermediate texts of prompt methods), when asked for and present."""
    stats = g.stats() if isinstance(g, prompting.PromptRun) else None
    return {"steering_stats": stats} if stats else {}


def _params(eng: Engine, req, prompt: gen.Prompt, logprobs: int | None, steering: steer.Steering, served: Served,
            structured=None, stats_key: str | None = None):
    extra = {**(steering.extra_args() or {}), **served.extra_args(), **({STATS_KEY: stats_key} if stats_key else {})}
    return sampling_params(req, prompt_len=len(prompt.ids), max_model_len=eng.info.max_model_len,
                           vocab_size=eng.info.vocab_size, logprobs=logprobs, structured=structured,
                           extra_args=extra or None, skip_prefix_cache=served.iapt)


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


async def _sse(request: Request, g: gen.Generation | prompting.PromptRun, preamble: list[dict],
               render: Callable[[gen.Delta], dict], head: dict, req, headers: dict[str, str]) -> Response:
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
                             headers={"Cache-Control": "no-cache", **headers})
