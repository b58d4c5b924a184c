"""Chat rendering: the model's chat template, tokenized by the server, with the token span of each message."""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import Any

from steerserve.server.http.errors import BadRequest


@dataclass(frozen=True)
class RenderedChat:
    text: str
    ids: list[int]
    role_spans: dict[str, list[tuple[int, int]]]  # role -> token ranges [start, end) of its messages' contents


def render(tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool, *,
           tools: list[dict[str, Any]] | None = None, continue_final: bool = False) -> RenderedChat:
    """`tools`: OpenAI tool definitions for the template (check `renders_tools` first); `continue_final`: leave
    the last message open for the model to continue (vLLM's `continue_final_message`). O(text + messages x log tokens) for the spans; CPU-bound (the template,
    the tokenizer): the server calls it in a worker thread."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             tools=tools, continue_final_message=continue_final)
    except Exception as exc:  # jinja raises template-defined errors (e.g. "roles must alternate")
        raise BadRequest(f"the chat template rejected these messages: {exc}", param="messages") from None
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    starts, ends = [a for a, _ in offsets], [b for _, b in offsets]  # non-decreasing: tokens in text order
    role_spans: dict[str, list[tuple[int, int]]] = {}
    pos = 0
    for m in messages:
        # Contents appear in the rendered text in message order; a template that rewrites a content (e.g. trims
        # it) leaves that message without a span, and a span target naming only such messages is a 400.
        start = text.find(m["content"], pos) if m["content"] else -1
        if start < 0:
            continue
        end = pos = start + len(m["content"])
        first, last = bisect_right(ends, start), bisect_left(starts, end) - 1  # tokens overlapping [start, end)
        if first <= last:
            role_spans.setdefault(m["role"], []).append((first, last + 1))
    return RenderedChat(text, ids, role_spans)


def renders_tools(tokenizer, tools: list[dict[str, Any]]) -> bool:
    """Whether the chat template shows `tools` to the model: a template that renders a chat the same with and
    without them ignores tools, and a request with tools must then be refused rather than served without them."""
    probe = [{"role": "user", "content": "hi"}]
    try:
        with_tools = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True, tools=tools)
    except Exception:  # a template that fails on tools does not support them (or not these: said as a 400)
        return False
    return with_tools != tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)


def set_template(tokenizer, template: str) -> None:
    """Make `template` the chat template every rendering with `tokenizer` uses (chats, prompt methods, tools).

    Setting `tokenizer.chat_template` alone is not enough: vLLM's engine tokenizer answers `apply_chat_template`
    from a pool of copies made when it was built. So the instance's `apply_chat_template` passes the template
    explicitly unless a caller names one."""
    original = tokenizer.apply_chat_template

    def apply_chat_template(conversation, *args, **kwargs):
        if kwargs.get("chat_template") is None:
            kwargs["chat_template"] = template
        return original(conversation, *args, **kwargs)

    tokenizer.chat_template = template
    tokenizer.apply_chat_template = apply_chat_template
