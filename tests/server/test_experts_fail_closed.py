"""Fail closed for expert steering: on a MoE model whose router hook is not installed, the start-up self-test
switches expert steering off, and a request with `experts` is refused (400) instead of served unsteered."""
from __future__ import annotations

import asyncio

import pytest

from steerserve.server.engine import router_hook
from steerserve.server.engine.async_engine import Engine
from steerserve.server.engine.processor import SteeringLogitsProcessor
from steerserve.server.engine.state import EngineState
from steerserve.server.settings import Settings
from steerserve.steering import spec as S
from steerserve.steering.model import SpecError
from tests.tiny_models import build_tiny_moe


class RouterHookThatNeverFires(SteeringLogitsProcessor):
    """Stands in for an engine whose router hook is missing: expert masks never reach the routers (the engine
    core runs in its own process, so the hook itself cannot be patched out from here)."""

    def __init__(self, vllm_config, device, is_pin_memory):
        super().__init__(vllm_config, device, is_pin_memory)
        # Publish expert rows to a copy the engine does not know: the router hook never sees them (the other
        # hooks' rows stay the engine's).
        detached = EngineState(self.state.hooks)
        detached.rows = {**self.state.rows, "experts": router_hook.ExpertRows()}
        self.state = detached


@pytest.mark.parametrize("hook", [False], ids=["hook-missing"])  # hook installed: tests/e2e/test_experts_api.py
def test_expert_steering_is_served_only_if_the_router_hook_fires(tmp_path, hook):
    model = build_tiny_moe(tmp_path / "mixtral", "mixtral")
    settings = Settings.load(dtype="float32", max_model_len=128, kv_cache_gib=0.05, max_num_seqs=4)

    async def start():
        engine = Engine(settings, model, logits_processor=None if hook else RouterHookThatNeverFires)
        try:
            await engine.verify_steering()
            return engine.facts
        finally:
            engine.shutdown()

    from steerserve.server.engine import plugin

    try:
        facts = asyncio.run(start())
    finally:
        plugin.unregister()  # later engines in this process get plain vLLM
    assert facts.moe_layers == (0, 1) and facts.num_experts == 8 and facts.experts_top_k == 2
    spec = S.merge([S.parse({"experts": {"off": ["1.3"]}}, "steering")])
    if hook:
        assert facts.experts_unsupported is None
        assert S.compile_spec(spec, facts).experts.off == ((1, 3),)
    else:
        assert facts.experts_unsupported
        with pytest.raises(SpecError) as info:
            S.compile_spec(spec, facts)
        assert info.value.field == "steering.experts" and "self-test" in info.value.reason
