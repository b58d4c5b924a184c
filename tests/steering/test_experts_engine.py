"""Expert steering in a real vLLM engine on tiny random fp32 MoE models (Mixtral, Qwen3-MoE, GLM-4.5-style).

The reference is HF transformers with every router's forward replaced by the issue's routing rules written out
plainly, token by token (tests/experts_reference.py). Greedy tokens and logprobs must agree in fp32 for each off
and on mode and scope, in mixed batches with unsteered rows, which must stay bit-identical to an unsteered-only run;
with prefix caching and chunked prefill. The DeepSeek-V3 router (grouped top-k over sigmoid scores with a
correction bias) is compared in fp32 through GLM-4.5 (`glm4_moe`), which routes exactly that way behind plain GQA
attention; DeepSeek-V3 itself runs in the engine in bf16 only, checked by exact routing invariants
(test_experts_deepseek.py): vLLM-CPU's MLA refuses fp32 weights ("expect weight to be bfloat16 ..."), and bf16
noise would swamp a logprob comparison.
"""
from __future__ import annotations

import pytest
import vllm

from steerserve.steering import spec as S
from steerserve.steering.experts import moe_layout
from steerserve.steering.model import ModelFacts
from tests import experts_reference as reference
from tests.tiny_models import build_tiny_moe

LICENCE = ("You may convey a work based on the Program, or the modifications to produce it, in the form of source "
           "code under the terms of section 4, provided that you also meet all of these conditions: ")
PROMPTS = ["The license grants", LICENCE, LICENCE * 3]  # the last > max_num_batched_tokens: chunked prefill
KINDS = ["mixtral", "qwen3_moe", "glm4_moe"]  # glm4_moe: the DeepSeek-V3 router, GQA attention


def specs(a: int, b: int) -> dict[str, dict | None]:
    """Specs over the two MoE decoder layers a < b of a model with 8 experts, top-2."""
    return {
        "none": None,
        "off": {"off": [f"{a}.0", f"{a}.1", f"{a}.5", f"{b}.3"]},
        "off_drop": {"off": [f"{a}.0", f"{a}.1", f"{a}.5", f"{b}.3"], "off_mode": "drop"},
        "on": {"on": [f"{a}.6", f"{b}.2", f"{b}.4"]},
        "on_dominant": {"on": [f"{a}.6", f"{b}.2"], "on_mode": "dominant"},
        "generation": {"off": [f"{a}.2", f"{a}.3"], "on": [f"{b}.7"], "off_mode": "drop", "on_mode": "dominant",
                       "scope": "generation"},
    }


@pytest.fixture(scope="module", params=KINDS)
def setup(request, tmp_path_factory):
    kind = request.param
    path = build_tiny_moe(tmp_path_factory.mktemp(kind) / kind, kind, seed=0)
    from transformers import AutoConfig, AutoTokenizer

    from steerserve.server.engine.builder import steering_llm

    layout = moe_layout(AutoConfig.from_pretrained(path))
    tok = AutoTokenizer.from_pretrained(path)
    facts = ModelFacts(tok, 2048, (1,), num_layers=layout and len(layout.layers), moe_layers=layout.layers,
                       num_experts=layout.num_experts, experts_top_k=layout.top_k, router=layout.router)
    with steering_llm(path, dtype="float32", enforce_eager=True, max_model_len=1024, max_num_seqs=4,
                      max_num_batched_tokens=64, enable_prefix_caching=True, kv_cache_memory_bytes=128 * 2**20,
                      logprobs_mode="processed_logprobs", seed=0) as engine:
        yield kind, engine, reference.load(path, kind), tok, facts, layout
        del engine


def request(tok, facts, prompt_ids: list[int], spec, max_tokens: int):
    plan = S.compile_spec(S.merge([S.parse({"experts": spec}, "steering")]), facts) if spec else None
    salt = S.digest(spec) if spec else None  # as the server does: steered KV is never shared
    prompt = {"prompt_token_ids": prompt_ids, **({"cache_salt": salt} if salt else {})}
    params = vllm.SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=0, ignore_eos=True,
                                 extra_args=plan.to_extra_args() if plan else None)
    return prompt, params


def check_against_reference(model, out, spec, label: str) -> float:
    comp = out.outputs[0]
    tokens = list(comp.token_ids)
    ref = reference.logprobs(model, list(out.prompt_token_ids), tokens, spec)
    assert ref[:-1].argmax(-1).tolist() == tokens, f"{label}: greedy path differs from the reference"
    worst = 0.0
    for step, (t, lp) in enumerate(zip(tokens, comp.logprobs, strict=True)):
        err = abs(lp[t].logprob - ref[step, t].item())
        worst = max(worst, err)
        assert err < 1e-4, f"{label} step {step}: vLLM {lp[t].logprob} vs reference {ref[step, t].item()}"
    return worst


def test_mixed_batch_matches_reference_and_leaves_unsteered_rows_alone(setup):
    kind, llm, model, tok, facts, layout = setup
    table = specs(*layout.layers[:2])
    ids = [tok(p).input_ids for p in PROMPTS]
    jobs = [(i, name) for name in table for i in range(len(ids))]
    # Different lengths: rows finish at different steps, so the batch condenses and rows move.
    reqs = [request(tok, facts, ids[i], table[name], 4 + (k % 5)) for k, (i, name) in enumerate(jobs)]
    outs = llm.generate([p for p, _ in reqs], [sp for _, sp in reqs], use_tqdm=False)
    worst = max(check_against_reference(model, out, table[name], f"{kind} {name}/prompt{i}")
                for (i, name), out in zip(jobs, outs, strict=True))
    print(f"{kind}: max |dlogprob| steered vLLM vs HF reference: {worst:.2e}")

    plain = [(p, sp) for (_, n), (p, sp) in zip(jobs, reqs, strict=True) if n == "none"]
    alone = llm.generate([p for p, _ in plain], [sp for _, sp in plain], use_tqdm=False)
    mixed = [o for (_, n), o in zip(jobs, outs, strict=True) if n == "none"]
    for a, m in zip(alone, mixed, strict=True):
        assert list(a.outputs[0].token_ids) == list(m.outputs[0].token_ids)
        assert [lp[t].logprob for t, lp in zip(a.outputs[0].token_ids, a.outputs[0].logprobs, strict=True)] == \
            [lp[t].logprob for t, lp in zip(m.outputs[0].token_ids, m.outputs[0].logprobs, strict=True)]


def test_each_spec_changes_the_output(setup):
    """Otherwise the reference comparison could pass with the steering dropped."""
    kind, llm, model, tok, facts, layout = setup
    ids = tok(LICENCE).input_ids
    base = reference.logprobs(model, ids, [1, 2, 3], None)
    for name, spec in specs(*layout.layers[:2]).items():
        if spec is not None:
            assert (reference.logprobs(model, ids, [1, 2, 3], spec) - base).abs().max() > 1e-2, f"{kind} {name}"


def test_prefix_cache_never_mixes_steered_and_unsteered_kv(setup):
    kind, llm, model, tok, facts, layout = setup
    ids = tok(LICENCE * 5).input_ids  # > one 128-token block, so a prefix can be cached
    spec = specs(*layout.layers[:2])["off"]
    for s in (spec, None, spec, None):
        prompt, params = request(tok, facts, ids, s, 3)
        out = llm.generate([prompt], [params], use_tqdm=False)[0]
        check_against_reference(model, out, s, f"prefix-cache {s}")
    assert out.num_cached_tokens and out.num_cached_tokens >= 128
