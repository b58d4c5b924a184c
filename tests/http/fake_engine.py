"""A stand-in for server/engine/async_engine.py's `Engine` with no model behind it, for tests of pure HTTP behaviour (auth,
validation, error shapes, headers, OpenAPI, metrics). Never use it to test what steering does to a model."""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from steerserve.server.engine.async_engine import ModelInfo
from steerserve.steering.model import ModelFacts

NAME = "fake-model"
MAX_MODEL_LEN = 1024


@dataclass
class Submitted:
    """One request as the engine received it."""

    prompt_ids: list[int]
    params: Any
    request_id: str
    prompt_text: str | None
    cache_salt: str | None


@dataclass
class FakeEngine:
    """The interface the routes use. Every request generates `max_tokens` copies of one token per choice, one
    token per engine step (vLLM's DELTA output kind), and finishes with "length"; or, when `script` is set, its
    texts one per step (as many as max_tokens allows), finishing with "stop" after the last."""

    tokenizer: Any
    token: int = 42
    healthy: bool = True
    submitted: list[Submitted] = field(default_factory=list)
    shut_down: bool = False
    script: list[str] | None = None
    died: str | None = None  # set to make `dead()` report an engine death

    def __post_init__(self) -> None:
        vocab = len(self.tokenizer)
        self.info = ModelInfo(NAME, Path("/nonexistent/fake-model"), MAX_MODEL_LEN, vocab)
        self.facts = ModelFacts(self.tokenizer, vocab, (self.tokenizer.eos_token_id,), num_layers=2, num_heads=4,
                                num_kv_heads=2)
        self.lora = None  # adapters off
        self.model_steering = None
        self.iapt_unsupported = "adapters are off"

    async def generate(self, prompt_ids: list[int], params, request_id: str, *, prompt_text: str | None = None,
                       cache_salt: str | None = None, lora_request=None) -> AsyncIterator[Any]:
        self.submitted.append(Submitted(list(prompt_ids), params, request_id, prompt_text, cache_salt))
        if self.script is not None:
            for step, piece in enumerate(self.script[:params.max_tokens]):
                finish = "stop" if step == len(self.script) - 1 else "length" if step == params.max_tokens - 1 else None
                ids = self.tokenizer.encode(piece, add_special_tokens=False)
                yield SimpleNamespace(num_cached_tokens=0 if step == 0 else None, outputs=[
                    SimpleNamespace(index=i, text=piece, token_ids=ids, logprobs=None, finish_reason=finish)
                    for i in range(params.n)])
            return
        text = self.tokenizer.decode([self.token])
        for step in range(params.max_tokens):
            last = step == params.max_tokens - 1
            logprobs = ([{self.token: SimpleNamespace(logprob=-0.25, rank=1, decoded_token=text)}]
                        if params.logprobs is not None else None)
            yield SimpleNamespace(num_cached_tokens=0 if step == 0 else None, outputs=[
                SimpleNamespace(index=i, text=text, token_ids=[self.token], logprobs=logprobs,
                                finish_reason="length" if last else None) for i in range(params.n)])

    async def verify_steering(self) -> None:
        pass

    async def check_health(self) -> None:
        if not self.healthy:
            raise RuntimeError("the fake engine is down")

    def dead(self) -> str | None:
        return self.died

    def num_unfinished_requests(self) -> int:
        return 0

    def shutdown(self) -> None:
        self.shut_down = True
