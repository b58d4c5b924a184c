"""Expert steering: spec validation against the model (each refusal names its field), the plan round trip, and the
engine's vectorised routing against the plain per-token reference for every router kind and mode."""
from __future__ import annotations

import itertools

import pytest
import torch

from steerserve.steering import spec as S
from steerserve.steering.experts import RouterConfig, moe_layout, steered_routing
from steerserve.steering.model import ModelFacts, SpecError
from steerserve.steering.plan import Plan, cache_salt
from tests.experts_reference import route_token

# Qwen3-MoE-like: 4 decoder layers, layer 0 dense, 8 experts, top-2
MOE = ModelFacts(None, 100, num_layers=4, moe_layers=(1, 2, 3), num_experts=8, experts_top_k=2, router="softmax_topk")
DENSE = ModelFacts(None, 100, num_layers=4)


def compile_(experts: dict, model: ModelFacts = MOE) -> Plan | None:
    return S.compile_spec(S.merge([S.parse({"experts": experts}, "steering")]), model)


@pytest.mark.parametrize("experts, field, words", [
    ({"off": ["1.0"]}, "steering.experts", "dense"),
    ({"off": ["0.3"]}, "steering.experts.off.0", "decoder layer 0 has no routed experts"),
    ({"on": ["1.2", "4.1"]}, "steering.experts.on.1", "decoder layer 4"),
    ({"off": ["2.8"]}, "steering.experts.off.0", "expert 8 is out of range"),
    ({"off": ["2.3"], "on": ["2.3"]}, "steering.experts.on", "both on and off"),
    ({"on": ["1.1", "1.2", "1.3"]}, "steering.experts.on", "only 2 per token"),
    ({"off": [f"1.{e}" for e in range(7)]}, "steering.experts.off", "fewer than the 2"),
    ({"off": ["1-2"]}, "steering.experts.off", "<layer>.<expert>"),
    ({"off_mode": "zero"}, "steering.experts.off_mode", ""),
    ({"scope": "prompt"}, "steering.experts.scope", ""),
    ({"offf": ["1.1"]}, "steering.experts.offf", ""),
])
def test_unappliable_specs_name_their_field(experts, field, words):
    model = DENSE if words == "dense" else MOE
    with pytest.raises(SpecError) as info:
        compile_(experts, model)
    assert info.value.field == field and words in info.value.reason, info.value


def test_plan_round_trip_and_methods():
    plan = compile_({"off": ["3.1", "1.0", "1.0"], "on": ["2.7"], "off_mode": "drop", "on_mode": "dominant",
                     "scope": "generation"})
    assert plan.experts.off == ((1, 0), (3, 1)) and plan.experts.on == ((2, 7),)
    assert plan.experts.off_drop and plan.experts.on_dominant and plan.experts.generation_only
    assert Plan.from_extra_args(plan.to_extra_args()) == plan
    assert compile_({"off": ["1.0"], "off_mode": "drop"}).experts.off_drop  # drop may switch off all but none
    spec = S.merge([S.parse({"experts": {"off": ["1.0"], "scope": "all"}}, "steering")])
    assert spec.methods() == ["experts.off"]
    assert cache_salt("t", S.compile_spec(spec, MOE), 5) != cache_salt("t", None, 5)  # steered KV is never shared


def test_off_drop_lets_every_expert_go():
    assert len(compile_({"off": [f"1.{e}" for e in range(8)], "off_mode": "drop"}).experts.off) == 8


def test_moe_layout_from_hf_configs():
    from transformers import DeepseekV3Config, LlamaConfig, MixtralConfig, Qwen3MoeConfig

    assert moe_layout(LlamaConfig(num_hidden_layers=2)) is None
    m = moe_layout(MixtralConfig(num_hidden_layers=3, num_local_experts=4, num_experts_per_tok=2))
    assert (m.layers, m.num_experts, m.top_k, m.router) == ((0, 1, 2), 4, 2, "softmax_topk")
    q = moe_layout(Qwen3MoeConfig(num_hidden_layers=6, num_experts=8, decoder_sparse_step=2, mlp_only_layers=[3]))
    assert q.layers == (1, 5)
    d = DeepseekV3Config(num_hidden_layers=5, n_routed_experts=16, first_k_dense_replace=2)
    d.topk_method, d.scoring_func = "noaux_tc", "sigmoid"
    assert moe_layout(d).layers == (2, 3, 4) and moe_layout(d).router == "grouped_sigmoid_bias"


ROUTERS = {
    "softmax_renorm": RouterConfig(2, True, "softmax", None, None, None, 1.0),
    "softmax_plain": RouterConfig(2, False, "softmax", None, None, None, 1.0),
    "grouped_sigmoid_bias": RouterConfig(2, True, "sigmoid", torch.randn(8, generator=torch.Generator().manual_seed(1))
                                         * 0.3, 2, 1, 2.5),
    "grouped_softmax": RouterConfig(3, True, "softmax", None, 4, 2, 1.0),
}


@pytest.mark.parametrize("router", ROUTERS)
def test_vectorised_routing_matches_the_plain_reference(router):
    cfg = ROUTERS[router]
    gen = torch.Generator().manual_seed(0)
    n, E = 64, 8
    logits = torch.randn(n, E, generator=gen) * 2
    masks = [(set(), set()), ({0, 1}, set()), ({3}, {5}), (set(), {2, 6}), ({0, 1, 2, 3, 4, 5}, set()), ({7}, {0})]
    for (off, on), drop, dominant in itertools.product(masks, (False, True), (False, True)):
        if len(on) > cfg.top_k or (not drop and len(off) > E - cfg.top_k):  # refused at validation
            continue
        off_t = torch.zeros(n, E, dtype=torch.bool)
        on_t = torch.zeros(n, E, dtype=torch.bool)
        off_t[:, list(off)] = True
        on_t[:, list(on)] = True
        w, ids = steered_routing(logits, cfg, off_t, on_t, torch.full((n,), drop), torch.full((n,), dominant))
        for t in range(n):
            ref = route_token(logits[t].tolist(), top_k=cfg.top_k, scoring=cfg.scoring, renormalize=cfg.renormalize,
                              bias=cfg.correction_bias.tolist() if cfg.correction_bias is not None else None,
                              groups=cfg.num_groups, topk_groups=cfg.topk_groups, scaling=cfg.scaling, off=off, on=on,
                              drop=drop, dominant=dominant)
            got = dict(zip(ids[t].tolist(), w[t].tolist(), strict=True))
            assert set(got) == {e for e, _ in ref}, (router, off, on, drop, dominant, t)
            for e, weight in ref:
                assert abs(got[e] - weight) < 1e-5, (router, off, on, drop, dominant, t, e)
            if not drop:
                assert not set(got) & off  # substitute: never chosen
            assert on <= set(got)
