"""Attention steering (sink, spans, mode): the method's registration. The math is steering/attention.py, the
engine side server/engine/attention_backend.py."""
from __future__ import annotations

from typing import Any

from ..attention import AttentionSpec, compile_attention
from ..plan import AttentionPlan, Plan
from .base import Method, Probe, moves


def facts(hf: Any, model_config: Any) -> dict[str, Any]:
    return {"unsupported": {"attention": "MLA attention is not steerable yet"}} if model_config.use_mla else {}


async def self_test(probe: Probe) -> bool:
    """gamma = e^-20 on every head must change the output."""
    cut = (-20.0,) * (probe.facts.num_layers * probe.facts.num_heads)
    return await moves(probe, Plan("selftest", AttentionPlan(cut)))


METHOD = Method("attention", spec=AttentionSpec, part=AttentionPlan, compile=compile_attention,
                label="attention steering", facts=facts, self_test=self_test)
