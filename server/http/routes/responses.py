"""OpenAI's Responses API, `POST /v1/responses`: text generation, whole or streamed, served by the chat path.

A request becomes a chat completion (`serving.chat`), so the model, adapters, steering (the body's `steering`
field, `X-Steering`, `X-Steering-Profile`, answered in `X-Steering-Applied`), prompt methods, limits and errors
are exactly those of `/v1/chat/completions`: `instructions` is a system message before `input`, `input` is a
string (one user message) or a list of messages, `max_output_tokens` is `max_tokens`. An error about a chat
field names the Responses field it came from.

Stateless: nothing is stored, so `store: true`, `previous_response_id` and `background: true` are a 400 (the
official client sends none of them unless asked). Tools, reasoning and structured `text` formats are not served
here yet (a 400 naming the field); tool calling is on chat completions.

Streaming sends OpenAI's typed events, in order: `response.created`, `response.in_progress`,
`response.output_item.added`, `response.content_part.added`, one `response.output_text.delta` per engine delta,
`response.output_text.done`, `response.content_part.done`, `response.output_item.done`, then
`response.completed` (or `response.incomplete` when `max_output_tokens` cut the answer), each with its
`sequence_number`."""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field

from steerserve.server.frontend import generation as gen

from .. import serving
from ..body import JSONRoute
from ..errors import APIError, BadRequest
from ..protocol import ChatCompletionRequest, ChatMessage, Strict
from ..state import Caller, State
from ..streaming import sse, until_disconnect

router = APIRouter(route_class=JSONRoute, tags=["openai"])

# chat fields an error may name -> the Responses field they come from
FIELDS = {"messages": "input", "max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens"}


class InputText(Strict):
    type: Literal["input_text", "output_text", "text"]
    text: str
    annotations: list[Any] | None = None  # output_text sent back from an earlier response


class InputMessage(Strict):
    """One message of `input` (OpenAI's EasyInputMessage or a message item)."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]
    id: str | None = None  # an earlier response's output item, sent back
    status: str | None = None

    def chat(self) -> ChatMessage:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return ChatMessage(role=self.role, content=text)


class TextFormat(Strict):
    type: Literal["text"]


class TextConfig(Strict):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(Strict):
    model: str
    input: str | list[InputMessage] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    background: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    text: TextConfig | None = None
    truncation: Literal["disabled"] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: bool | None = None
    steering: dict[str, Any] | None = None  # steerserve's extension, as on chat completions

    def chat(self) -> ChatCompletionRequest:
        """The chat completion this request is served as (after `check`)."""
        messages = [ChatMessage(role="system", content=self.instructions)] if self.instructions is not None else []
        messages += ([ChatMessage(role="user", content=self.input)] if isinstance(self.input, str)
                     else [m.chat() for m in self.input])
        fields = {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_output_tokens,
                  "user": self.user, "steering": self.steering}
        return ChatCompletionRequest(model=self.model, messages=messages, stream=self.stream,
                                     **{k: v for k, v in fields.items() if v is not None})

    def check(self) -> None:
        """What a stateless server without tools on this route refuses, each a 400 naming the field."""
        if self.store:
            raise BadRequest("store: this server does not store responses; send store: false (or leave it out)",
                             param="store", code="unsupported_value")
        if self.previous_response_id is not None:
            raise BadRequest("previous_response_id: this server does not store responses, so there is no earlier "
                             "one to continue; send the whole conversation as input", param="previous_response_id",
                             code="unsupported_value")
        if self.background:
            raise BadRequest("background: this server answers responses in the foreground only", param="background",
                             code="unsupported_value")
        if self.tools:
            raise BadRequest("tools: tool calling is served on /v1/chat/completions, not on /v1/responses yet",
                             param="tools", code="unsupported_value")


def response_json(body: ResponsesRequest, rid: str, created: float, model: str, status: str,
                  output: list[dict], usage: dict | None) -> dict:
    """OpenAI's Response object."""
    return {
        "id": rid, "object": "response", "created_at": created, "model": model, "status": status,
        "completed_at": time.time() if status != "in_progress" else None,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {}, "output": output, "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": None, "reasoning": None, "store": False,
        "temperature": body.temperature if body.temperature is not None else 1.0,
        "text": {"format": {"type": "text"}}, "tool_choice": body.tool_choice or "auto", "tools": [],
        "top_p": body.top_p if body.top_p is not None else 1.0, "truncation": "disabled", "usage": usage,
        "user": body.user, "background": False,
    }


def message_item(item_id: str, text: str, status: str) -> dict:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status != "in_progress" \
        else []
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}


def usage_json(usage: dict[str, Any]) -> dict:
    return {"input_tokens": usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]},
            "output_tokens": usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["total_tokens"]}


@router.post("/v1/responses")
async def create_response(request: Request, who: Caller, state: State, body: ResponsesRequest) -> Response:
    body.check()
    state.admission.admit(request, who.tenant)  # 429 over a bound; released when the response is done
    timeout = state.admission.limits.request_timeout
    chat = body.chat()
    try:
        run = await serving.chat(state, who, chat, request.headers)
    except APIError as exc:  # name the field the client sent, not the chat field it became
        exc.param = FIELDS.get(exc.param, exc.param) if exc.param else exc.param
        raise
    g = run.g
    rid, item_id, created = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}", time.time()

    def final(choice: gen.Choice) -> dict:
        status = "incomplete" if choice.finish_reason == "length" else "completed"
        return response_json(body, rid, created, run.served.model, status,
                             [message_item(item_id, choice.text, status)], usage_json(g.usage()))

    if not body.stream:
        choice = (await until_disconnect(request, g.collect(), timeout))[0]
        return JSONResponse(final(choice), headers=run.headers())

    seq = iter(range(1 << 62))
    choice = gen.Choice(0)
    where = {"item_id": item_id, "output_index": 0}
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    started = response_json(body, rid, created, run.served.model, "in_progress", [], None)
    preamble = [{"type": "response.created", "response": started, "sequence_number": next(seq)},
                {"type": "response.in_progress", "response": started, "sequence_number": next(seq)},
                {"type": "response.output_item.added", "output_index": 0,
                 "item": message_item(item_id, "", "in_progress"), "sequence_number": next(seq)},
                {"type": "response.content_part.added", **where, "content_index": 0, "part": part,
                 "sequence_number": next(seq)}]

    def delta(d: gen.Delta) -> dict:
        choice.add(d)
        return {"type": "response.output_text.delta", **where, "content_index": 0, "delta": d.text,
                "logprobs": [], "sequence_number": next(seq)}

    def epilogue() -> list[dict]:
        done = final(choice)
        item = done["output"][0]
        return [{"type": "response.output_text.done", **where, "content_index": 0, "text": choice.text,
                 "logprobs": [], "sequence_number": next(seq)},
                {"type": "response.content_part.done", **where, "content_index": 0, "part": item["content"][0],
                 "sequence_number": next(seq)},
                {"type": "response.output_item.done", "output_index": 0, "item": item, "sequence_number": next(seq)},
                {"type": f"response.{done['status']}", "response": done, "sequence_number": next(seq)}]

    return await sse(request, g, preamble, delta, {}, chat, run.headers(), epilogue=epilogue,  # usage: last event
                     timeout=timeout)
