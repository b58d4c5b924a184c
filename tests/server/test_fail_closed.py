"""Fail closed: an engine whose worker hooks do not fire refuses to serve instead of serving unsteered."""
from __future__ import annotations

import asyncio

import pytest
import torch
from vllm.v1.sample.logits_processor import LogitsProcessor

from steerserve.server.engine import Engine
from steerserve.server.settings import Settings
from tests.tiny_models import build_tiny_llama


class HookThatNeverFires(LogitsProcessor):
    """Stands in for a runner where our processor is not installed: accepts plans, applies nothing."""

    def __init__(self, vllm_config, device, is_pin_memory):
        pass

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


def test_engine_without_active_hooks_refuses_to_serve(tmp_path):
    model = build_tiny_llama(tmp_path / "tiny")
    settings = Settings.load(dtype="float32", max_model_len=128, kv_cache_gib=0.05, max_num_seqs=4)

    async def start() -> None:
        engine = Engine(settings, model, logits_processor=HookThatNeverFires)
        try:
            await engine.verify_steering()
        finally:
            engine.shutdown()

    with pytest.raises(RuntimeError, match="steering hooks are not active"):
        asyncio.run(start())
