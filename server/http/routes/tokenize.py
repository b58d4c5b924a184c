"""vLLM's `/tokenize` and `/detokenize`, with the same bodies and answers: a text prompt, or chat messages rendered
by the chat template exactly as `/v1/chat/completions` renders them (so `count` is that request's prompt length).

`/tokenize` takes `{"prompt": str, "add_special_tokens": true}` or `{"messages": [...], "add_generation_prompt":
true, "add_special_tokens": false, "tools": [...]}`, each with optional `model` and `return_token_strs`, and answers
`{"count", "max_model_len", "tokens", "token_strs"}`; `/detokenize` takes `{"tokens": [int]}` and answers
`{"prompt"}`. vLLM's `chat_template`, `chat_template_kwargs` and multimodal fields are not accepted here (a 400
naming the field): the served template is the only one."""
from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter
from pydantic import Field, model_validator

from steerserve.server.frontend.chat import render as render_chat

from .. import serving
from ..body import JSONRoute
from ..errors import BadRequest
from ..protocol import ChatMessage, Strict, ToolDefinition
from ..state import Caller, ReadyEngine

router = APIRouter(route_class=JSONRoute, tags=["tokenize"])


class TokenizeRequest(Strict):
    """A text `prompt` or chat `messages` (exactly one)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = Field(None, description="Default: true for a prompt, false for messages "
                                            "(the chat template adds its own), as in vLLM.")
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool | None = False
    tools: list[ToolDefinition] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        if self.prompt is not None and (self.tools or self.continue_final_message):
            raise ValueError("tools and continue_final_message go with messages only")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        return self


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


def _token_ids(eng, body: TokenizeRequest) -> list[int]:
    tok = eng.tokenizer
    if body.prompt is not None:
        return list(tok(body.prompt, add_special_tokens=body.add_special_tokens is not False)["input_ids"])
    chat = render_chat(tok, [m.template_dict() for m in body.messages], body.add_generation_prompt,
                       tools=serving.chat_tools(eng, body.tools), continue_final=body.continue_final_message)
    if body.add_special_tokens:
        return list(tok(chat.text, add_special_tokens=True)["input_ids"])
    return chat.ids


@router.post("/tokenize")
async def tokenize(who: Caller, eng: ReadyEngine, body: TokenizeRequest) -> dict:
    if body.model is not None:
        serving.check_model(eng, body.model)
    tok = eng.tokenizer
    ids = await asyncio.to_thread(_token_ids, eng, body)  # CPU-bound (template, tokenizer): off the event loop
    return {"count": len(ids), "max_model_len": eng.info.max_model_len, "tokens": ids,
            "token_strs": tok.convert_ids_to_tokens(ids) if body.return_token_strs else None}


@router.post("/detokenize")
async def detokenize(who: Caller, eng: ReadyEngine, body: DetokenizeRequest) -> dict:
    if body.model is not None:
        serving.check_model(eng, body.model)
    if any(t >= eng.info.vocab_size for t in body.tokens):
        raise BadRequest(f"tokens must be token ids in [0, {eng.info.vocab_size})", param="tokens")
    return {"prompt": eng.tokenizer.decode(body.tokens)}
