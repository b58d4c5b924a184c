"""The engine wrapper: one vLLM AsyncLLM, the served model's facts, and request submission by token ids."""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from .settings import Settings

log = logging.getLogger("steerserve.engine")


@dataclass(frozen=True)
class ModelInfo:
    """What the HTTP layer needs to know about the served model."""

    name: str
    path: Path
    max_model_len: int
    vocab_size: int


class Engine:
    """Owns the AsyncLLM. Prompts arrive already tokenized, so the server controls exactly what the model sees."""

    def __init__(self, settings: Settings, model_path: Path):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        name = settings.served_model_name or model_path.name
        args = AsyncEngineArgs(
            model=str(model_path),
            served_model_name=name,
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            kv_cache_memory_bytes=int(settings.kv_cache_gib * 2**30),
            enable_prefix_caching=settings.enable_prefix_caching,
            enforce_eager=settings.enforce_eager,
            seed=settings.seed,
            disable_log_stats=True,
        )
        log.info("starting vLLM on %s (dtype=%s, max_model_len=%d)", model_path, settings.dtype, settings.max_model_len)
        self.llm = AsyncLLM.from_engine_args(args)
        self.tokenizer = self.llm.get_tokenizer()
        config = self.llm.model_config
        self.info = ModelInfo(
            name=name, path=model_path, max_model_len=config.max_model_len, vocab_size=config.get_vocab_size()
        )

    def generate(self, prompt_ids: list[int], params, request_id: str, *, prompt_text: str | None = None,
                 cache_salt: str | None = None) -> AsyncIterator:
        """RequestOutputs for one request. Closing or cancelling the iterator aborts it in the engine."""
        from vllm.inputs.engine import tokens_input

        prompt = tokens_input(prompt_ids, prompt=prompt_text, cache_salt=cache_salt)
        return self.llm.generate(prompt, params, request_id)

    def num_unfinished_requests(self) -> int:
        return self.llm.get_num_unfinished_requests()

    async def check_health(self) -> None:
        await self.llm.check_health()

    def shutdown(self) -> None:
        self.llm.shutdown()
