"""One HTTP generation request in the engine: fan out prompts, merge their outputs, time tokens, render OpenAI JSON."""
from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from steerserve.server.adapters.pool import Lease
from steerserve.server.engine import faults
from steerserve.server.engine.async_engine import Engine
from steerserve.server.http.errors import SteeringFault
from steerserve.server.http.metrics import Metrics


@dataclass
class Prompt:
    ids: list[int]
    text: str | None = None


@dataclass
class Delta:
    """New output of one choice: text and tokens since the last delta, and the finish reason once finished."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict] | None
    finish_reason: str | None


@dataclass
class Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, d: Delta) -> None:
        self.text += d.text
        self.token_ids += d.token_ids
        self.logprobs += d.logprobs or []
        self.finish_reason = d.finish_reason or self.finish_reason


class Generation:
    """Runs prompts x n choices through the engine; `deltas()` yields them merged as they come."""

    def __init__(self, engine: Engine, metrics: Metrics, route: str, prompts: list[Prompt], params,
                 kind: str, cache_salt: Callable[[int], str | None] = lambda prompt_len: None,
                 adapter: Callable[[], Awaitable[Lease]] | None = None, tenant: str = "", steered: bool = False,
                 fault_key: str | None = None):
        """`adapter`: acquires the request's adapter lease (loading the adapter if cold); None for the base model.
        `tenant` and `steered` label the per-tenant token and decode-time metrics. `fault_key`: the key its plan
        carries for per-row faults (server/engine/faults.py); checked before every delta is handed out, so a
        request whose steering failed in the engine is stopped, never served unsteered."""
        self.engine, self.metrics, self.route, self.adapter = engine, metrics, route, adapter
        self.tenant, self.steered, self.fault_key = tenant, steered, fault_key
        self.prompts, self.params, self.n, self.cache_salt = prompts, params, params.n, cache_salt
        self.id = f"{kind}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.arrival = time.perf_counter()
        self.completion_tokens = 0
        self.cached_tokens: dict[int, int] = {}  # prompt index -> prompt tokens served from the prefix cache

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p.ids) for p in self.prompts)

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": sum(self.cached_tokens.values())}}

    async def deltas(self) -> AsyncIterator[Delta]:
        lease = await self.adapter() if self.adapter else None
        try:
            async with contextlib.aclosing(self._deltas(lease)) as deltas:  # closing us aborts the engine requests
                async for d in deltas:
                    yield d
        finally:
            if lease is not None:
                lease.release()

    async def _deltas(self, lease: Lease | None) -> AsyncIterator[Delta]:
        ttft, itl = self.metrics.ttft.labels(self.route), self.metrics.itl.labels(self.route)
        generated = self.metrics.generation_tokens.labels(self.route)
        self.metrics.prompt_tokens.labels(self.route).inc(self.prompt_tokens)
        self.metrics.tenant_tokens.labels(self.tenant, "prompt").inc(self.prompt_tokens)
        tenant_generated = self.metrics.tenant_tokens.labels(self.tenant, "generation")
        lora_request = lease.lora_request if lease else None
        streams = [self.engine.generate(p.ids, self.params, f"{self.id}-{i}", prompt_text=p.text,
                                        cache_salt=self.cache_salt(len(p.ids)), lora_request=lora_request)
                   for i, p in enumerate(self.prompts)]
        last = first = None
        async for job, out in _merge(streams):
            if lease is not None:
                lease.started()
            now = time.perf_counter()
            if last is None:
                ttft.observe(now - self.arrival)
                first = now
            else:
                itl.observe(now - last)
            last = now
            if out.num_cached_tokens is not None:
                self.cached_tokens.setdefault(job, out.num_cached_tokens)
            if self.fault_key is not None and (reason := faults.row_fault(self.fault_key)) is not None:
                faults.forget_row(self.fault_key)
                raise SteeringFault(self.id, reason)  # closing the merge aborts every engine request of ours
            for o in out.outputs:
                self.completion_tokens += len(o.token_ids)
                generated.inc(len(o.token_ids))
                tenant_generated.inc(len(o.token_ids))
                yield Delta(job * self.n + o.index, o.text, list(o.token_ids), o.logprobs, o.finish_reason)
        if first is not None and self.completion_tokens > 1:
            per_token = (last - first) / (self.completion_tokens - 1)
            self.metrics.decode_per_token.labels("true" if self.steered else "false").observe(per_token)

    async def collect(self) -> list[Choice]:
        choices = [Choice(i) for i in range(len(self.prompts) * self.n)]
        async for d in self.deltas():
            choices[d.index].add(d)
        return choices


async def _merge(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """Items of several async iterators as they arrive, tagged with the iterator's index. Cancelling or
    closing the merge cancels every source, which makes vLLM abort those requests."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                await queue.put((i, item))
            await queue.put((i, done))
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put((i, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _top(entry: dict, top: int) -> list[tuple[int, Any]]:
    """The `top` most likely (token id, Logprob) pairs of one vLLM logprob dict, best first."""
    return sorted(((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= top),
                  key=lambda pair: pair[1].rank)


def _token_text(lp: Any, token_id: int, tokenizer) -> str:
    return lp.decoded_token if lp.decoded_token is not None else tokenizer.decode([token_id])


def _logprob(lp: Any) -> float:
    return max(lp.logprob, -9999.0)  # JSON has no -inf


def chat_logprobs(token_ids: list[int], entries: list[dict], top: int, tokenizer) -> dict:
    content = []
    for token_id, entry in zip(token_ids, entries, strict=False):
        text = _token_text(entry[token_id], token_id, tokenizer)
        alternatives = [(_token_text(lp, t, tokenizer), _logprob(lp)) for t, lp in _top(entry, top)]
        content.append({
            "token": text, "logprob": _logprob(entry[token_id]), "bytes": list(text.encode()),
            "top_logprobs": [{"token": s, "logprob": v, "bytes": list(s.encode())} for s, v in alternatives],
        })
    return {"content": content}


def completion_logprobs(token_ids: list[int], entries: list[dict], top: int, tokenizer, offset: int = 0) -> dict:
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, entries, strict=False):
        text = _token_text(entry[token_id], token_id, tokenizer)
        tokens.append(text)
        token_logprobs.append(_logprob(entry[token_id]))
        tops.append({_token_text(lp, t, tokenizer): _logprob(lp) for t, lp in _top(entry, top)} if top else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}
