"""MoE expert steering (off, on): the method's registration. The math is steering/experts.py, the engine side
server/engine/router_hook.py."""
from __future__ import annotations

from typing import Any

from ..experts import ExpertsSpec, compile_experts, moe_layout
from ..plan import ExpertsPlan, Plan
from .base import Method, Probe, moves


def facts(hf: Any, model_config: Any) -> dict[str, Any]:
    layout = moe_layout(hf)
    if layout is None:
        return {}
    return dict(moe_layers=layout.layers, num_experts=layout.num_experts, experts_top_k=layout.top_k,
                router=layout.router)


def names(value: dict[str, Any]) -> list[str]:
    """off and on are the methods; off_mode, on_mode and scope only qualify them."""
    return [m for m in value if m in ("off", "on")]


async def self_test(probe: Probe) -> bool:
    """Two probes (the first and the last E - k experts off in every MoE layer) route every token to disjoint
    expert sets, so at least one differs from the natural routing unless the router hook never fired."""
    f = probe.facts
    n_off = f.num_experts - f.experts_top_k
    moved = False
    for experts in (range(n_off), range(f.experts_top_k, f.num_experts)):
        off = tuple((layer, e) for layer in f.moe_layers for e in experts)
        moved |= await moves(probe, Plan("selftest", ExpertsPlan(off=off)))
    return moved


METHOD = Method("experts", spec=ExpertsSpec, part=ExpertsPlan, compile=compile_experts, names=names,
                label="expert steering", facts=facts, available=lambda f: bool(f.moe_layers), self_test=self_test)
