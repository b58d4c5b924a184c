"""What the generation routes call: admit a request (its model, adapter and steering), build its prompts and
sampling parameters, and hand back a `Run` the route answers with (whole or streamed)."""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from steerserve.server.adapters.pool import AdapterPool
from steerserve.server.adapters.registry import Adapter
from steerserve.server.frontend import generation as gen
from steerserve.server.frontend import prompt_methods as prompting
from steerserve.server.frontend import request_steering as steer
from steerserve.server.frontend.chat import render as render_chat
from steerserve.server.frontend.tool_calls import ToolCalling, template_tools
from steerserve.steering.iapt import PLACEHOLDER_ID, SOFT_TOKENS
from steerserve.steering.methods.stats import StatsPlan
from steerserve.steering.plan import PlanPart

from ..engine import faults
from ..engine import iapt_hook as iapt
from ..engine.async_engine import Engine, reads_prefix_cache
from ..engine.router_hook import read_counts
from .auth import Principal
from .errors import BadRequest, NotFound
from .limits import check_generation
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ToolDefinition,
    sampling_params,
    structured_output,
)
from .state import AppState

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


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

    # IAPT adapters (server/engine/iapt_hook.py): 4 placeholders after the instruction, the adapter in the plan (so no
    # prefix-cache reads, and a salt so no other request reads their blocks).
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

    def plan_part(self) -> PlanPart | None:
        return iapt.plan_part(self.adapter.path, self.adapter.engine_name) if self.iapt else None


@dataclass(frozen=True)
class Run:
    """An admitted generation, not started yet, and what its response says about it."""

    g: gen.Generation | prompting.PromptRun
    engine: Engine
    steering: steer.Steering
    served: Served
    stats_key: str | None  # set when the request asked for its routed-expert counts
    tools: ToolCalling | None = None  # set when the request has tools the model may call

    def headers(self) -> dict[str, str]:
        return self.served.headers(self.steering)

    def stats_json(self) -> dict:
        """The response extension: per MoE decoder layer, how often each expert was selected for this request's
        tokens that went through the model (prompt and generated tokens, all choices; the last sampled token is
        never run through the model)."""
        if not self.stats_key:
            return {}
        return {"steering_stats": {"routed_experts": read_counts(self.stats_key, self.engine.facts.moe_layers)}}


async def completion(state: AppState, who: Principal, req: CompletionRequest, headers: Mapping[str, str]) -> Run:
    """Admit a completion request. Its size is checked first (server/http/limits.py); tokenization runs in a
    worker thread, so a large prompt never holds up the event loop."""
    check_generation(req, state.input_limits)
    eng, steering, served = _admit(state, who, req, headers, COMPLETIONS)
    if req.echo:
        raise BadRequest("echo is not supported by this server", param="echo")
    prompts = await asyncio.to_thread(_completion_prompts, eng, served, req)
    stats = _stats_key(headers, req, eng)
    steering = _full(steering.bind([len(p.ids) for p in prompts], None), served, stats)
    key = _fault_key(steering)
    params = _params(eng, req, max(prompts, key=lambda p: len(p.ids)), req.logprobs, steering, key=key)
    g = gen.Generation(eng, state.metrics, COMPLETIONS, prompts, params, "cmpl", steering.salt_for, served.acquire,
                       who.tenant, steering.plan is not None, fault_key=key)
    return Run(g, eng, steering, served, stats)


def _completion_prompts(eng: Engine, served: Served, req: CompletionRequest) -> list[gen.Prompt]:
    prompts = []
    for p in req.prompts():
        ids = eng.tokenizer.encode(p) if isinstance(p, str) else list(p)
        if not ids:
            raise BadRequest("prompt must not be empty", param="prompt")
        if isinstance(p, list) and not all(0 <= t < eng.info.vocab_size for t in p):
            raise BadRequest(f"prompt token ids must be in [0, {eng.info.vocab_size})", param="prompt")
        prompts.append(gen.Prompt(served.prompt(ids, eng.info.max_model_len, "prompt"),
                                  p if isinstance(p, str) else None))
    return prompts


async def chat(state: AppState, who: Principal, req: ChatCompletionRequest, headers: Mapping[str, str]) -> Run:
    """Admit a chat request. Its size is checked first (server/http/limits.py); the chat template, tokenization
    and the messages' token spans run in a worker thread, so a long chat never holds up the event loop."""
    check_generation(req, state.input_limits)
    eng, steering, served = _admit(state, who, req, headers, CHAT)
    top = req.top_logprobs or 0
    stats = _stats_key(headers, req, eng)
    g: gen.Generation | prompting.PromptRun
    messages = [m.template_dict() for m in req.messages]
    tools = ToolCalling.prepare(state.tool_parser, eng.tokenizer, _dumped(req.messages), _dumped(req.tools),
                                _dumped(req.tool_choice), req.parallel_tool_calls)
    if steering.spec.prompt is not None:  # URIAL, conjugate prompting: see server/frontend/prompt_methods.py
        if stats:
            raise BadRequest("routed-expert counts are not available with prompt-level steering yet",
                             param="steering_stats.routed_experts")
        if tools:
            raise BadRequest("tools cannot be combined with prompt-level steering (steering.prompt)",
                             param="tools")
        g = prompting.PromptRun(eng, state.metrics, req, steering, state.prefixes)
    else:
        chat = await asyncio.to_thread(render_chat, eng.tokenizer, messages, req.add_generation_prompt,
                                       tools=_dumped(req.tools) if tools else None)
        prompt = gen.Prompt(served.prompt(chat.ids, eng.info.max_model_len, "messages"), chat.text)
        steering = _full(steering.bind([len(prompt.ids)], chat.role_spans), served, stats)
        structured = tools.structured if tools and tools.structured else structured_output(req.response_format)
        key = _fault_key(steering)
        params = _params(eng, req, prompt, top if req.logprobs else None, steering, structured, key,
                         skip_special_tokens=tools.skip_special_tokens if tools else True)
        if tools:
            tools.prompt_ids = prompt.ids
        g = gen.Generation(eng, state.metrics, CHAT, [prompt], params, "chatcmpl", steering.salt_for,
                           served.acquire, who.tenant, steering.plan is not None, fault_key=key)
    return Run(g, eng, steering, served, stats, tools)


def chat_tools(eng: Engine, tools: list[ToolDefinition] | None) -> list[dict] | None:
    """Tools to render into a chat (for /tokenize): as a chat completion renders them, or a 400."""
    return template_tools(eng.tokenizer, _dumped(tools))


def _dumped(value):
    """A request model (or list of them) as plain JSON data, None as None."""
    if isinstance(value, list):
        return [v.model_dump(exclude_none=True) for v in value]
    return value.model_dump(exclude_none=True) if hasattr(value, "model_dump") else value


def _admit(state: AppState, who: Principal, req, headers: Mapping[str, str], route: str
           ) -> tuple[Engine, steer.Steering, Served]:
    """The common start of a generation: check the model and adapter, resolve and check the steering."""
    eng, adapter_name = check_model(state.ready_engine(), req.model, headers.get("x-adapter"))
    served = Served(eng.info.name, who.tenant, state.adapter_of(who, adapter_name) if adapter_name else None,
                    state.pool)
    steering = steer.resolve(headers, req.steering, who, state.profiles, eng.facts, eng.model_steering,
                             state.vectors)
    prompting.authorize(steering, who, state.tenants)
    prompting.check_request(steering, req, route)
    if steering.spec.prompt is not None and served.adapter is not None:
        raise BadRequest("prompt-level steering (steering.prompt) cannot be combined with an adapter yet",
                         param="steering.prompt", code="invalid_steering")
    if steering.spec.prompt is not None and steering.spec.attention and steering.spec.attention.spans:
        raise BadRequest("span steering (steering.attention.spans) cannot be combined with prompt-level "
                         "methods yet: their targets refer to the chat template's tokens",
                         param="steering.attention.spans", code="invalid_steering")
    state.metrics.count_request(who.tenant, sorted({m.split(".")[0] for m in steering.spec.methods()}))
    return eng, steering, served


def check_model(eng: Engine, name: str, header: str | None = None) -> tuple[Engine, str | None]:
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


def _full(steering: steer.Steering, served: Served, stats_key: str | None) -> steer.Steering:
    """The request's whole plan: its steering, plus what the server adds (the IAPT adapter, the counts' key)."""
    return steering.with_part(served.plan_part()).with_part(StatsPlan(stats_key) if stats_key else None)


def _fault_key(steering: steer.Steering) -> str | None:
    """A fresh key naming this request in the engine if it carries a plan (which a hook may fail to apply for
    this row alone: server/engine/faults.py), else None."""
    return uuid.uuid4().hex if steering.plan is not None else None


def _params(eng: Engine, req, prompt: gen.Prompt, logprobs: int | None, steering: steer.Steering, structured=None,
            key: str | None = None, skip_special_tokens: bool = True):
    extra = steering.extra_args()
    if extra is not None and key is not None:
        extra = {**extra, faults.ROW_KEY: key}
    return sampling_params(req, prompt_len=len(prompt.ids), max_model_len=eng.info.max_model_len,
                           vocab_size=eng.info.vocab_size, logprobs=logprobs, structured=structured,
                           extra_args=extra, skip_prefix_cache=not reads_prefix_cache(steering.plan),
                           skip_special_tokens=skip_special_tokens)


def _stats_key(headers: Mapping[str, str], req, eng: Engine) -> str | None:
    """A fresh key if the request asks for its routed-expert counts (body `steering_stats` or the
    `X-Steering-Stats: routed_experts` header), else None."""
    header = headers.get("x-steering-stats")
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
