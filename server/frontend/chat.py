"""Chat rendering: the model's chat template, tokenized by the server, with the token span of each message."""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass

from steerserve.server.http.errors import BadRequest


@dataclass(frozen=True)
class RenderedChat:
    text: str
    ids: list[int]
    role_spans: dict[str, list[tuple[int, int]]]  # role -> token ranges [start, end) of its messages' contents


def render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> RenderedChat:
    """The chat rendered and tokenized, with each message's token span: O(text + messages x log tokens).
    CPU-bound (the template, the tokenizer): the server calls it in a worker thread."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
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
