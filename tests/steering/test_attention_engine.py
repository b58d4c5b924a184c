"""Attention steering (sink scaling and span steering) in a real vLLM engine on a tiny random fp32 GQA Llama.

The reference is HF transformers' eager attention with the steering written out plainly here, from the spec's
definition (docs/methods/attention-sink-and-spans.md): ln(gamma) added to key 0's score, ln(alpha) to every
prompt key outside the target, in the chosen (layer, query head) pairs. Greedy tokens and logprobs must agree in
fp32 for mixed batches with chunked prefill, decode steps, staggered finishes and prefix caching; unsteered rows
must be bit-identical to an unsteered-only run.
"""
from __future__ import annotations

import math

import pytest
import torch
import vllm

from steerserve.steering import spec as S
from steerserve.steering.model import ModelFacts
from tests import attention_reference as reference
from tests.tiny_models import build_tiny_llama

LAYERS, HEADS = 2, 4  # tiny_models: 2 layers, 4 query heads over 2 KV heads
LICENCE = ("You may convey a work based on the Program, or the modifications to produce it, in the form of source "
           "code under the terms of section 4, provided that you also meet all of these conditions: ")
PROMPTS = [
    "The license grants",
    LICENCE,
    LICENCE * 3,  # > max_num_batched_tokens=64: prefilled in chunks next to decoding rows; > one 128-token block
    "Preamble",
    LICENCE * 2 + "THERE IS NO WARRANTY FOR THE PROGRAM",
]
SPECS = {
    "none": None,
    "sink_all": {"sink": {"gamma": 0.25}},
    "sink_heads": {"sink": {"gamma": 4.0, "layers": [1], "heads": [0, 3],
                            "per_head": {"0.1": 0.3, "0.2": math.exp(-20)}}},  # gamma -> 0: the sink nearly removed
    "spans": {"spans": [{"target": {"start": 3, "end": 9}, "alpha": 0.2, "heads": [1, 2]},
                        {"target": {"start": 0, "end": 2}, "alpha": 0.6, "layers": [0]}]},
    "sink_and_span": {"sink": {"gamma": 3.0, "layers": [0]},
                      "spans": [{"target": {"start": 1, "end": 5}, "alpha": 0.05}]},
    # attention modes (docs/methods/attention-modes.md), alone and with a sink gain on the unnormalised weights
    "lssa": {"mode": {"kind": "lssa"}},
    "lssar": {"mode": {"kind": "lssar", "power": 3.0, "layers": [1]}, "sink": {"gamma": 0.5}},
    "reweight": {"mode": {"kind": "reweight"}},
}


def facts(tok) -> ModelFacts:
    return ModelFacts(tok, 2048, (1,), num_layers=LAYERS, num_heads=HEADS, num_kv_heads=2)


def compile_for(spec: dict | None, tok, prompt_len: int):
    """The plan the server would send for this spec and prompt (spec -> plan -> spans bound to the prompt)."""
    if spec is None:
        return None
    steering = S.merge([S.parse({"attention": spec}, "steering")])
    plan = S.compile_spec(steering, facts(tok))
    from steerserve.steering.attention import bind_spans

    return plan.with_part(bind_spans(steering.attention, plan.attention, [prompt_len], None))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", seed=0)


@pytest.fixture(scope="module")
def llm(tiny_dir, steering_llms):
    return steering_llms(tiny_dir, dtype="float32", enforce_eager=True, max_model_len=1024, max_num_seqs=4,
                         max_num_batched_tokens=64, enable_prefix_caching=True, kv_cache_memory_bytes=128 * 2**20,
                         logprobs_mode="processed_logprobs", seed=0)


@pytest.fixture(scope="module")
def hf(tiny_dir):
    from transformers import AutoTokenizer

    return reference.load(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)


def reference_logprobs(model, prompt_ids: list[int], generated: list[int], spec) -> torch.Tensor:
    bias = reference.reference_bias(spec, len(prompt_ids), LAYERS, HEADS)
    return reference.logprobs(model, prompt_ids, generated, bias, (spec or {}).get("mode"))


def request(tok, prompt_ids: list[int], spec, max_tokens: int):
    plan = compile_for(spec, tok, len(prompt_ids))
    salt = S.digest([spec, len(prompt_ids)]) if spec else None  # as the server does: steered KV is never shared
    prompt = {"prompt_token_ids": prompt_ids, **({"cache_salt": salt} if salt else {})}
    params = vllm.SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=0, ignore_eos=True,
                                 extra_args=plan.to_extra_args() if plan else None)
    return prompt, params


def check_against_reference(model, out, spec, label: str) -> float:
    comp = out.outputs[0]
    tokens = list(comp.token_ids)
    ref = reference_logprobs(model, list(out.prompt_token_ids), tokens, spec)
    assert ref[:-1].argmax(-1).tolist() == tokens, f"{label}: greedy path differs from the reference"
    worst = 0.0
    for step, (t, lp) in enumerate(zip(tokens, comp.logprobs, strict=True)):
        err = abs(lp[t].logprob - ref[step, t].item())
        worst = max(worst, err)
        assert err < 1e-4, f"{label} step {step}: vLLM {lp[t].logprob} vs reference {ref[step, t].item()}"
    return worst


def test_mixed_batch_matches_reference_and_leaves_unsteered_rows_alone(llm, hf):
    model, tok = hf
    ids = [tok(p).input_ids for p in PROMPTS] + [[tok.bos_token_id]]  # and a 1-token prompt
    # A span whose target lies beyond a short prompt is refused (tested in test_spec); pair spans with long prompts.
    jobs = [(i, name) for name in SPECS for i in range(len(ids)) if "spans" not in (SPECS[name] or {}) or
            len(ids[i]) > 9]
    # Different lengths: rows finish at different steps, so the batch condenses and rows move.
    reqs = [request(tok, ids[i], SPECS[name], 4 + (k % 5)) for k, (i, name) in enumerate(jobs)]
    outs = llm.generate([p for p, _ in reqs], [sp for _, sp in reqs], use_tqdm=False)
    worst = max(check_against_reference(model, out, SPECS[name], f"{name}/prompt{i}")
                for (i, name), out in zip(jobs, outs, strict=True))
    print(f"max |dlogprob| steered vLLM vs HF reference: {worst:.2e}")

    alone = llm.generate([p for (_, n), (p, _) in zip(jobs, reqs, strict=True) if n == "none"],
                         [sp for (_, n), (_, sp) in zip(jobs, reqs, strict=True) if n == "none"], use_tqdm=False)
    mixed = [o for (_, n), o in zip(jobs, outs, strict=True) if n == "none"]
    for a, m in zip(alone, mixed, strict=True):
        assert list(a.outputs[0].token_ids) == list(m.outputs[0].token_ids)
        assert [lp[t].logprob for t, lp in zip(a.outputs[0].token_ids, a.outputs[0].logprobs, strict=True)] == \
            [lp[t].logprob for t, lp in zip(m.outputs[0].token_ids, m.outputs[0].logprobs, strict=True)]


def test_each_spec_changes_the_output(llm, hf):
    """Otherwise the reference comparison could pass with the steering dropped."""
    model, tok = hf
    ids = tok(LICENCE).input_ids
    base = reference_logprobs(model, ids, [], None)
    for name, spec in SPECS.items():
        if spec is not None:
            assert (reference_logprobs(model, ids, [], spec) - base).abs().max() > 1e-2, name


def test_prefix_cache_never_mixes_steered_and_unsteered_kv(llm, hf):
    model, tok = hf
    ids = tok(LICENCE * 5).input_ids  # > one 128-token block, so a prefix can be cached
    assert len(ids) > 128
    for spec in (SPECS["sink_all"], None, SPECS["sink_all"], None):
        prompt, params = request(tok, ids, spec, 3)
        out = llm.generate([prompt], [params], use_tqdm=False)[0]
        check_against_reference(model, out, spec, f"prefix-cache {spec}")
    # The repeats hit the cache (so the test exercised it), each within its own salt.
    assert out.num_cached_tokens and out.num_cached_tokens >= 128


def test_native_kernel_computes_only_the_unsteered_rows(llm, hf, monkeypatch):
    """Steered rows are computed once: vLLM's kernel never sees a steered row's tokens in a layer it steers (it
    would, if the backend recomputed them on top of the native output), and the rows still match the reference."""
    from steerserve.server.engine import vllm_compat

    native_impl = vllm_compat.cpu_attention_classes()[1]
    seen: list[int] = []
    forward = native_impl.forward

    def counting(self, layer, query, key, value, kv_cache, md, output, *args, **kwargs):
        if md is not None:
            seen.append(md.num_actual_tokens)
        return forward(self, layer, query, key, value, kv_cache, md, output, *args, **kwargs)

    monkeypatch.setattr(native_impl, "forward", counting)
    model, tok = hf
    ids = tok("Fresh words for this test only: the native kernel counts tokens. " * 3).input_ids
    steps = 4
    specs = {**SPECS, "layer1": {"sink": {"gamma": 2.0, "layers": [1]}}}
    # Unsteered rows between steered ones (a non-contiguous sub-batch); "layer1" steers layer 1 only.
    names = ["sink_all", "none", "spans", "layer1", "none"]
    reqs = [request(tok, ids[:len(ids) - k], specs[n], steps) for k, n in enumerate(names)]  # no shared prefix
    outs = llm.generate([p for p, _ in reqs], [sp for _, sp in reqs], use_tqdm=False)
    for name, out in zip(names, outs, strict=True):
        check_against_reference(model, out, specs[name], f"once/{name}")
    tokens = [len(ids) - k + steps - 1 for k in range(len(names))]  # tokens each row puts through attention
    unsteered = sum(t for t, n in zip(tokens, names, strict=True) if n == "none")
    # The "layer1" row may go to the kernel in layer 0; or not (decoding next to rows that steer layer 0, it is
    # computed with theirs, with a zero bias). Never a steered row in a layer it steers: that would add >= 77.
    assert LAYERS * unsteered <= sum(seen) <= LAYERS * unsteered + tokens[names.index("layer1")]

    seen.clear()  # every row steered in every layer: the native kernel has nothing to compute
    reqs = [request(tok, ids[: len(ids) - 8 - k], SPECS["sink_all"], steps) for k in range(3)]
    for out in llm.generate([p for p, _ in reqs], [sp for _, sp in reqs], use_tqdm=False):
        check_against_reference(model, out, SPECS["sink_all"], "once/all steered")
    assert sum(seen) == 0
