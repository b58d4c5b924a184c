"""OpenAI's routes: /v1/models, /v1/completions and /v1/chat/completions (whole or streamed)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from steerserve.server.frontend import generation as gen

from .. import serving
from ..auth import Principal
from ..body import JSONRoute
from ..errors import NotFound
from ..protocol import ChatCompletionRequest, CompletionRequest
from ..state import AppState, Caller, State
from ..streaming import prompt_stats, sse, until_disconnect

router = APIRouter(route_class=JSONRoute, tags=["openai"])


@router.get("/v1/models")
async def models(who: Caller, state: State) -> dict:
    return {"object": "list", "data": model_cards(who, state)}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, who: Caller, state: State) -> dict:
    """One model of the list (the base model, or `<base>:<adapter>` for an adapter the caller may use)."""
    card = next((m for m in model_cards(who, state) if m["id"] == model_id), None)
    if card is None:
        raise NotFound(f"The model '{model_id}' does not exist", param="model", code="model_not_found")
    return card


def model_cards(who: Principal, state: AppState) -> list[dict]:
    """The models `who` may name: the base model and, with adapters on, each adapter visible to their tenant."""
    info = state.ready_engine().info
    data = [{"id": info.name, "object": "model", "created": 0, "owned_by": "steerserve",
             "max_model_len": info.max_model_len}]
    if state.pool is not None and state.adapters is not None:
        data += [{"id": f"{info.name}:{a.name}", "object": "model", "created": int(a.created),
                  "owned_by": a.tenant if a.scope == "tenant" else "steerserve", "parent": info.name,
                  "root": info.name, "max_model_len": info.max_model_len}
                 for a in state.adapters.list(who.tenant) if not any(d["id"] == f"{info.name}:{a.name}" for d in data)]
    return data


@router.post(serving.COMPLETIONS)
async def completions(request: Request, who: Caller, state: State, body: CompletionRequest) -> Response:
    state.admission.admit(request, who.tenant)  # 429 over a bound; released when the response is done
    run = await serving.completion(state, who, body, request.headers)
    g, tokenizer, top = run.g, run.engine.tokenizer, body.logprobs or 0
    timeout = state.admission.limits.request_timeout

    def choice_json(c: gen.Choice | gen.Delta, offset: int = 0) -> dict:
        lp = (gen.completion_logprobs(c.token_ids, c.logprobs, top, tokenizer, offset)
              if body.logprobs is not None else None)
        return {"index": c.index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason}

    head = {"id": g.id, "object": "text_completion", "created": g.created, "model": run.served.model}
    if not body.stream:
        choices = await until_disconnect(request, g.collect(), timeout)
        return JSONResponse({**head, "choices": [choice_json(c) for c in choices], "usage": g.usage(),
                             **run.stats_json()}, headers=run.headers())

    sent = [0] * (len(g.prompts) * body.n)

    def chunk(d: gen.Delta) -> dict:
        sent[d.index] += len(d.text)
        return {**head, "choices": [choice_json(d, sent[d.index] - len(d.text))], "usage": None}

    return await sse(request, g, [], chunk, head, body, run.headers(), timeout=timeout)


@router.post(serving.CHAT)
async def chat_completions(request: Request, who: Caller, state: State, body: ChatCompletionRequest) -> Response:
    state.admission.admit(request, who.tenant)  # 429 over a bound; released when the response is done
    run = await serving.chat(state, who, body, request.headers)
    g, tokenizer, top = run.g, run.engine.tokenizer, body.top_logprobs or 0
    timeout = state.admission.limits.request_timeout
    head = {"id": g.id, "object": "chat.completion", "created": g.created, "model": run.served.model}

    def logprobs_json(c: gen.Choice | gen.Delta) -> dict | None:
        return gen.chat_logprobs(c.token_ids, c.logprobs, top, tokenizer) if body.logprobs else None

    def message(c: gen.Choice) -> tuple[dict, str | None]:
        if run.tools is None:
            return {"role": "assistant", "content": c.text}, c.finish_reason
        return run.tools.message(c.text, c.token_ids, c.finish_reason)

    if not body.stream:
        choices = await until_disconnect(request, g.collect(), timeout)
        return JSONResponse({**head, "choices": [
            {"index": c.index, "message": m, "logprobs": logprobs_json(c), "finish_reason": finish}
            for c in choices for m, finish in [message(c)]],
            "usage": g.usage(), **prompt_stats(g), **run.stats_json()}, headers=run.headers())

    head = {**head, "object": "chat.completion.chunk"}
    roles = [{**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None}], "usage": None} for i in range(body.n)]

    def chunk(d: gen.Delta) -> dict:
        delta, finish = ({"content": d.text} if d.text else {}), d.finish_reason
        if run.tools is not None:
            delta, finish = run.tools.delta(d.index, d.text, d.token_ids, d.finish_reason)
        return {**head, "choices": [{"index": d.index, "delta": delta or {}, "logprobs": logprobs_json(d),
                                     "finish_reason": finish}], "usage": None}

    return await sse(request, g, roles, chunk, head, body, run.headers(), timeout=timeout)
