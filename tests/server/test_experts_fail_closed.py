"""Fail closed for expert steering: on a MoE model whose router hook is not installed, the start-up self-test
switches expert steering off, and a request with `experts` is refused (400) instead of served unsteered."""
from __future__ import annotations

import asyncio

import pytest

from steerserve.server import experts
from steerserve.server.engine import Engine
from steerserve.server.settings import Settings
from steerserve.steering import spec as S
from steerserve.steering.model import SpecError
from tests.tiny_models import build_tiny_moe


@pytest.mark.parametrize("hook", [False, True], ids=["hook-missing", "hook-installed"])
def test_expert_steering_is_served_only_if_the_router_hook_fires(tmp_path, monkeypatch, hook):
    model = build_tiny_moe(tmp_path / "mixtral", "mixtral")
    settings = Settings.load(dtype="float32", max_model_len=128, kv_cache_gib=0.05, max_num_seqs=4)
    experts.unregister()
    if not hook:
        monkeypatch.setattr(experts, "register", lambda: None)  # the plugin then installs no router hook

    async def start():
        engine = Engine(settings, model)
        try:
            await engine.verify_steering()
            return engine.facts
        finally:
            engine.shutdown()

    try:
        facts = asyncio.run(start())
    finally:
        experts.unregister()
        from vllm.v1.attention.backends.registry import _ATTN_OVERRIDES, AttentionBackendEnum

        _ATTN_OVERRIDES.pop(AttentionBackendEnum.CPU_ATTN, None)
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
