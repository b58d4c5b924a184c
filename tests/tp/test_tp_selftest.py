"""The start-up self-tests under tensor parallelism: the server's own engine (`Engine`, settings
`tensor_parallel_size=2`) on a tiny Mixtral-style MoE runs every method's probe through both ranks; a hook that
fails on rank 1 only switches its method off (a 400 naming it), while every other method stays on. Cost: one
TP=2 engine (~40 s to start on 2 cores) and its self-tests (~10 s)."""
from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from steerserve.server.engine import tp
from steerserve.server.engine.async_engine import Engine
from steerserve.server.engine.processor import SteeringLogitsProcessor
from steerserve.server.settings import Settings
from steerserve.steering import spec as S
from steerserve.steering.model import SpecError
from tests.tiny_models import build_tiny_moe
from tests.tp.conftest import TP


def _broken(plan, prompt_len, ctx):
    raise RuntimeError("attention admit broken on this rank (test)")


class AttentionBrokenOnRankOne(SteeringLogitsProcessor):
    """Rank 1's attention hook cannot admit any row; rank 0 steers as usual, so the probe's output still moves:
    only the fault report from rank 1 can tell the server."""

    def __init__(self, vllm_config, device, is_pin_memory):
        super().__init__(vllm_config, device, is_pin_memory)
        if tp.current().rank == 1:
            self.state.hooks = tuple(replace(h, admit=_broken) if h.family == "attention" else h
                                     for h in self.state.hooks)


def test_a_hook_failing_on_one_rank_switches_its_method_off(tmp_path):
    from steerserve.server.engine import plugin

    model = build_tiny_moe(tmp_path / "mixtral", "mixtral", num_key_value_heads=1)
    settings = Settings.load(dtype="float32", max_model_len=128, kv_cache_gib=0.05, max_num_seqs=4,
                             tensor_parallel_size=TP)

    async def start():
        engine = Engine(settings, model, logits_processor=AttentionBrokenOnRankOne)
        try:
            await engine.verify_steering()
            return engine.facts
        finally:
            engine.shutdown()

    try:
        facts = asyncio.run(start())
    finally:
        plugin.unregister()  # later engines in this process get plain vLLM
    assert "attention admit broken" in facts.unsupported.get("attention", "")
    for family in ("experts", "vectors"):
        assert family not in facts.unsupported, f"{family} went off: {facts.unsupported[family]}"
    with pytest.raises(SpecError) as info:
        S.compile_spec(S.merge([S.parse({"attention": {"sink": {"gamma": 0.5}}}, "steering")]), facts)
    assert info.value.field == "steering.attention" and "attention admit broken" in info.value.reason
    S.compile_spec(S.merge([S.parse({"experts": {"off": ["1.3"]}}, "steering")]), facts)  # still served
