"""Prompt-level steering in the server process: URIAL rendering and clean-up, and conjugate prompting's chain of
engine calls (translate in, generate, translate back), behind the same interface as `generation.Generation`.

The methods' pure parts (spec, templates, transforms) live in `steering/urial.py` and `steering/conjugate.py`;
this module turns them into engine calls. Streaming (documented in the README):
- URIAL: the answer streams as it is generated, minus the tail that could still be the closing fence
  (`urial.StreamCleaner`); the stop strings never reach the client (vLLM holds back their prefixes).
- conjugate: the prompt is translated first (no output yet); then, with `translate_back`, the answer is
  generated whole and its back-translation streams token by token (a deterministic inverse arrives as one chunk
  per choice); without `translate_back`, the answer in the target language streams as it is generated.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from functools import lru_cache
from typing import Any

from steerserve.server.engine.async_engine import Engine
from steerserve.server.frontend import generation as gen
from steerserve.server.frontend.request_steering import Steering, spec_error
from steerserve.server.http.auth import Principal
from steerserve.server.http.errors import BadRequest, Forbidden
from steerserve.server.http.metrics import Metrics
from steerserve.server.http.protocol import ChatCompletionRequest, sampling_params, structured_output
from steerserve.server.stores.prefixes import MAX_PREFIX_BYTES, PrefixStore, describe  # noqa: F401
from steerserve.server.stores.tenants import TenantStore
from steerserve.steering import conjugate as conj
from steerserve.steering import urial
from steerserve.steering.model import SpecError

ROUTE = "/v1/chat/completions"


# --- registered URIAL prefixes ---------------------------------------------------------------------------------

# PrefixStore (server/stores/prefixes.py) is re-exported here for the routes and the CLI.


# --- checks every route makes ----------------------------------------------------------------------------------

def authorize(steering: Steering, who: Principal, tenants: TenantStore) -> None:
    """Conjugate prompting is a known safety bypass: only tenants an admin has allowed may use it."""
    prompt = steering.spec.prompt
    if prompt is not None and prompt.conjugate is not None and not tenants.get(who.tenant).allow_conjugate:
        raise Forbidden(f"conjugate prompting is not enabled for tenant '{who.tenant}': it can bypass a model's "
                        "safety training, so an admin must allow it (PUT /v1/tenants/{tenant}/settings "
                        '{"allow_conjugate": true})', param="steering.prompt.conjugate", code="conjugate_not_allowed")


def check_request(steering: Steering, req, route: str) -> None:
    """Prompt methods need messages (chat completions); intermediate texts need conjugate prompting."""
    prompt = steering.spec.prompt
    if prompt is not None and route != ROUTE:
        method, why = ("urial", "URIAL renders a conversation (system, user and assistant messages) into its "
                       "template, so it needs messages") if prompt.urial else \
                      ("conjugate", "conjugate prompting translates the messages of a chat")
        raise BadRequest(f"steering.prompt.{method}: {why}; use /v1/chat/completions", code="invalid_steering",
                         param=f"steering.prompt.{method}")
    stats = getattr(req, "steering_stats", None)
    if stats is not None and stats.conjugate and (prompt is None or prompt.conjugate is None):
        raise BadRequest("steering_stats.conjugate: this request uses no conjugate prompting",
                         param="steering_stats.conjugate")


def render_chat_template(eng: Engine, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    if not getattr(eng.tokenizer, "chat_template", None):
        raise BadRequest(f"{eng.info.name} has no chat template (a base model): send "
                         '"steering": {"prompt": {"urial": {}}} to chat with it through URIAL, or use /v1/completions',
                         param="messages")
    try:
        return eng.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja raises template-defined errors (e.g. "roles must alternate")
        raise BadRequest(f"the chat template rejected these messages: {exc}", param="messages") from None


@lru_cache(maxsize=64)
def _prefix_ids(tokenizer, prefix: str) -> tuple[int, ...]:
    # The prefix is tokenized on its own, so its tokens (and KV blocks) are the same whatever history follows.
    return tuple(tokenizer.encode(prefix, add_special_tokens=True))


# --- one chat request with prompt methods ------------------------------------------------------------------------

class PromptRun:
    """A chat request with prompt methods: the same interface as `Generation` (`id`, `created`, `deltas()`,
    `collect()`, `usage()`), plus `stats()`; it may make several engine calls, all counted in `usage()`."""

    def __init__(self, eng: Engine, metrics: Metrics, req: ChatCompletionRequest, steering: Steering,
                 prefixes: PrefixStore):
        self.eng, self.metrics, self.req, self.steering = eng, metrics, req, steering
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.calls: list[gen.Generation] = []
        prompt = steering.spec.prompt
        assert prompt is not None
        self.urial, self.conjugate = prompt.urial, prompt.conjugate
        self.messages = [(m.role, m.text()) for m in req.messages]
        self.intermediate: dict[str, Any] = {}
        try:
            self.prefix = self._prefix(prefixes) if self.urial else None
            if self.urial:  # the history's structure is known now: refuse it before any engine call
                urial.render(self.prefix, self.messages)
            if self.conjugate:
                self._check_conjugate()
                if not self.urial:  # a model without a chat template needs URIAL: say so before translating
                    render_chat_template(eng, [{"role": "user", "content": ""}])
        except SpecError as exc:
            raise spec_error(exc) from None

    def _prefix(self, prefixes: PrefixStore) -> str:
        assert self.urial is not None
        field = "steering.prompt.urial"
        text = prefixes.get(self.urial.variant)
        if text is None:
            known = ", ".join(p["name"] for p in prefixes.list())
            raise SpecError(f"{field}.variant", f"no URIAL prefix named {self.urial.variant!r} (known: {known})")
        return urial.select_prefix(text, self.urial.examples, f"{field}.examples")

    def _check_conjugate(self) -> None:
        c, field = self.conjugate, "steering.prompt.conjugate"
        assert c is not None
        if c.translator not in ("self", self.eng.info.name):
            raise SpecError(f"{field}.translator", f"no model {c.translator[:80]!r} is served here; use 'self' or "
                                                   f"'{self.eng.info.name}'")
        if self.req.logprobs:
            raise SpecError(f"{field}", "logprobs are not available with conjugate prompting (the text returned is "
                                        "a translation, not the sampled tokens)")
        if self.req.response_format is not None and self.req.response_format.type != "text" and c.translate_back:
            raise SpecError(f"{field}.translate_back", "response_format cannot hold through a back-translation; "
                                                       "set translate_back to false")

    # --- the engine calls ---

    def usage(self) -> dict[str, Any]:
        prompt = sum(g.prompt_tokens for g in self.calls)
        completion = sum(g.completion_tokens for g in self.calls)
        cached = sum(sum(g.cached_tokens.values()) for g in self.calls)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def stats(self) -> dict[str, Any] | None:
        asked = self.req.steering_stats
        if not (asked and asked.conjugate and self.conjugate):
            return None
        return {"conjugate": {"language": self.conjugate.language, "translator": self.conjugate.translator,
                              "engine_calls": sum(len(g.prompts) for g in self.calls), **self.intermediate}}

    def _generation(self, prompts: list[gen.Prompt], params) -> gen.Generation:
        g = gen.Generation(self.eng, self.metrics, ROUTE, prompts, params, "chatcmpl", self.steering.salt_for,
                           tenant=self.steering.tenant, steered=True)
        self.calls.append(g)
        return g

    async def _main(self, messages: list[tuple[str, str]]) -> AsyncIterator[gen.Delta]:
        """The answer's deltas: URIAL-rendered (and cleaned), or through the model's chat template. Rendering and
        tokenization run in a worker thread (a long history must not hold up the event loop)."""
        prompt, req = await asyncio.to_thread(self._main_prompt, messages)
        top = req.top_logprobs or 0
        params = sampling_params(req, prompt_len=len(prompt.ids), max_model_len=self.eng.info.max_model_len,
                                 vocab_size=self.eng.info.vocab_size, logprobs=top if req.logprobs else None,
                                 structured=structured_output(req.response_format),
                                 extra_args=self.steering.extra_args())
        g = self._generation([prompt], params)
        return _cleaned(g.deltas()) if self.prefix is not None else g.deltas()

    def _main_prompt(self, messages: list[tuple[str, str]]) -> tuple[gen.Prompt, ChatCompletionRequest]:
        if self.prefix is not None:
            prefix, rest = urial.render(self.prefix, messages)
            ids = [*_prefix_ids(self.eng.tokenizer, prefix), *self.eng.tokenizer.encode(rest, add_special_tokens=False)]
            prompt = gen.Prompt(ids, prefix + rest)
            stops = list(dict.fromkeys([*(self.req.stop or []), *urial.STOP_STRINGS]))
            req = self.req.model_copy(update={"stop": stops})
        else:
            text = render_chat_template(self.eng, [{"role": r, "content": t} for r, t in messages],
                                        self.req.add_generation_prompt)
            prompt = gen.Prompt(self.eng.tokenizer.encode(text, add_special_tokens=False), text)
            req = self.req
        return prompt, req

    async def _translate(self, texts: list[str], source: str, target: str) -> list[str]:
        """Each text translated by the translator model (one engine call per non-empty text), collected."""
        todo = [i for i, t in enumerate(texts) if t.strip()]
        out = list(texts)
        if not todo:
            return out
        prompts = [self._translation_prompt(texts[i], source, target) for i in todo]
        g = self._generation(prompts, self._translation_params(prompts))
        for i, choice in zip(todo, await g.collect(), strict=True):
            out[i] = choice.text.strip()
        return out

    def _translation_prompt(self, text: str, source: str, target: str) -> gen.Prompt:
        instruction = conj.translation_prompt(text, source, target)
        tok = self.eng.tokenizer
        if getattr(tok, "chat_template", None):
            rendered = render_chat_template(self.eng, [{"role": "user", "content": instruction}])
            return gen.Prompt(tok.encode(rendered, add_special_tokens=False), rendered)
        rendered = instruction + "\n\n"
        return gen.Prompt(tok.encode(rendered, add_special_tokens=True), rendered)

    def _translation_params(self, prompts: list[gen.Prompt]):
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        longest = max(len(p.ids) for p in prompts)
        room = self.eng.info.max_model_len - longest
        if room < 1:
            raise BadRequest(f"This model's maximum context length is {self.eng.info.max_model_len} tokens, but a "
                             f"translation prompt has {longest} tokens.", param="messages",
                             code="context_length_exceeded")
        return SamplingParams(temperature=0, max_tokens=min(room, 2 * longest + 64),
                              output_kind=RequestOutputKind.DELTA)

    # --- the Generation interface ---

    async def deltas(self) -> AsyncIterator[gen.Delta]:
        c = self.conjugate
        messages = self.messages
        if c is not None:
            texts = [t for _, t in messages]
            if c.language in conj.DETERMINISTIC:
                translated = [conj.transform(c.language, t) for t in texts]  # type: ignore[arg-type]
            else:
                translated = await self._translate(texts, conj.SOURCE_LANGUAGE, c.language)
            messages = [(r, t) for (r, _), t in zip(messages, translated, strict=True)]
            self.intermediate["messages"] = [{"role": r, "content": t} for r, t in messages]
        answer = await self._main(messages)
        if c is None or not c.translate_back:
            answers: dict[int, str] = {}
            async for d in answer:
                answers[d.index] = answers.get(d.index, "") + d.text
                yield d
            if c is not None:
                self.intermediate["answers"] = [answers[i] for i in sorted(answers)]
            return

        choices: dict[int, gen.Choice] = {}
        async for d in answer:
            choices.setdefault(d.index, gen.Choice(d.index)).add(d)
        ordered = [choices[i] for i in sorted(choices)]
        self.intermediate["answers"] = [ch.text for ch in ordered]
        if c.language in conj.DETERMINISTIC:
            back = [conj.transform(c.language, ch.text, inverse=True) for ch in ordered]  # type: ignore[arg-type]
            self.intermediate["answers_back"] = back
            for ch, text in zip(ordered, back, strict=True):
                yield gen.Delta(ch.index, text, [], None, ch.finish_reason)
            return

        # Streamed back-translation: one engine call per non-empty answer; a choice's finish reason is its answer's.
        todo = [ch for ch in ordered if ch.text.strip()]
        for ch in ordered:
            if not ch.text.strip():
                yield gen.Delta(ch.index, "", [], None, ch.finish_reason)
        back_texts = {ch.index: "" for ch in ordered}
        if todo:
            prompts = [self._translation_prompt(ch.text, c.language, conj.SOURCE_LANGUAGE) for ch in todo]
            g = self._generation(prompts, self._translation_params(prompts))
            cleaners = {ch.index: _Stripped() for ch in todo}
            async for d in g.deltas():
                ch = todo[d.index]
                text = cleaners[ch.index].feed(d.text, d.finish_reason is not None)
                back_texts[ch.index] += text
                yield gen.Delta(ch.index, text, d.token_ids, None, ch.finish_reason if d.finish_reason else None)
        self.intermediate["answers_back"] = [back_texts[i] for i in sorted(back_texts)]

    async def collect(self) -> list[gen.Choice]:
        choices = [gen.Choice(i) for i in range(self.req.n)]
        async for d in self.deltas():
            choices[d.index].add(d)
        return choices


async def _cleaned(deltas: AsyncIterator[gen.Delta]) -> AsyncIterator[gen.Delta]:
    """URIAL's clean-up on a stream of deltas, per choice."""
    cleaners: dict[int, urial.StreamCleaner] = {}
    async for d in deltas:
        cleaner = cleaners.setdefault(d.index, urial.StreamCleaner())
        yield gen.Delta(d.index, cleaner.feed(d.text, d.finish_reason is not None), d.token_ids, d.logprobs,
                        d.finish_reason)


class _Stripped:
    """`str.strip` on a stream: leading whitespace is dropped, trailing whitespace held back until more follows."""

    def __init__(self) -> None:
        self.text, self.sent = "", 0

    def feed(self, delta: str, final: bool = False) -> str:
        self.text += delta
        body = self.text.strip() if final else self.text.lstrip()
        out = body if final else body[:len(body.rstrip())]
        new, self.sent = out[self.sent:], max(self.sent, len(out))
        return new
