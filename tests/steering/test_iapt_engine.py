"""IAPT adapters in a real vLLM engine on a tiny random fp32 Llama, in batches with LoRA, steered and base rows.

The reference is HF transformers eager with the adapter's soft tokens written into each layer's input by
`hf_soft_prompts` (whole sequence at once; the engine pools across chunks and steps, from vLLM's split residual
stream) and, for rows that also steer attention, the attention reference of tests/attention_reference.py.
Checked: greedy tokens and logprobs per IAPT row, with chunked prefill (a prompt longer than the step budget) and
prefix caching on; other rows bit-identical to a run without IAPT rows; the adapter changes the output at all.
"""
from __future__ import annotations

import pytest
import torch
import vllm

from steerserve.server.engine import iapt_hook
from steerserve.steering.iapt import PLACEHOLDER_ID, SOFT_TOKENS, IaptModel, hf_soft_prompts
from steerserve.steering.plan import Plan
from tests import attention_reference as reference
from tests.steering.test_attention_engine import HEADS, LAYERS, compile_for
from tests.tiny_models import build_tiny_iapt, build_tiny_llama, build_tiny_lora

LICENCE = ("You may convey a work based on the Program, or the modifications to produce it, in the form of source "
           "code under the terms of section 4, provided that you also meet all of these conditions: ")
PROMPTS = ["The license grants", "Preamble", LICENCE * 3]  # the last > max_num_batched_tokens: chunked prefill
SINK = {"sink": {"gamma": 0.3}}
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-iapt")
    base = build_tiny_llama(root / "llama", seed=0)
    return base, {"a": build_tiny_iapt(root / "iapt-a", base, seed=1),
                  "b": build_tiny_iapt(root / "iapt-b", base, seed=2, bottleneck=8, shared=True)}, \
        build_tiny_lora(root / "lora", base, seed=3)


@pytest.fixture(scope="module")
def llm(tiny):
    from steerserve.server.engine import lora_ops_patch
    from steerserve.server.engine.builder import steering_llm

    with steering_llm(tiny[0], dtype="float32", enforce_eager=True, max_model_len=1024, max_num_seqs=8,
                      max_num_batched_tokens=64, enable_prefix_caching=True, kv_cache_memory_bytes=128 * 2**20,
                      enable_lora=True, max_loras=1, max_lora_rank=8, logprobs_mode="processed_logprobs",
                      seed=0) as engine:
        yield engine
        del engine
    lora_ops_patch.remove()


@pytest.fixture(scope="module")
def hf(tiny):
    from transformers import AutoTokenizer

    return reference.load(tiny[0]), AutoTokenizer.from_pretrained(tiny[0])


def row(tok, tiny, prompt: int, adapter: str | None = None, spec: dict | None = None, lora: bool = False):
    """One request as the server sends it: IAPT rows get the placeholders, the adapter's path, no prefix-cache
    reads and a salt; steered rows their plan and salt."""
    from vllm.lora.request import LoRARequest

    ids = tok(PROMPTS[prompt]).input_ids + ([PLACEHOLDER_ID] * SOFT_TOKENS if adapter else [])
    plan = compile_for(spec, tok, len(ids))
    full = (plan or Plan("")).with_part(iapt_hook.plan_part(tiny[1][adapter])) if adapter else plan
    extra = full.to_extra_args() if full else {}
    salt = "|".join(filter(None, [f"iapt-{adapter}" if adapter else "", plan.fingerprint if plan else ""]))
    params = vllm.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=0, ignore_eos=True,
                                 extra_args=extra or None, skip_reading_prefix_cache=True if adapter else None)
    prompt_in = {"prompt_token_ids": ids, **({"cache_salt": salt} if salt else {})}
    return prompt_in, params, LoRARequest("tiny-lora", 1, str(tiny[2])) if lora else None


def run(llm, rows):
    outs = llm.generate([r[0] for r in rows], [r[1] for r in rows], lora_request=[r[2] for r in rows],
                        use_tqdm=False)
    return [(list(o.outputs[0].token_ids),
             [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs, strict=True)])
            for o in outs]


def reference_logprobs(model, tiny, prompt_ids: list[int], generated: list[int], adapter: str, spec) -> torch.Tensor:
    iapt = IaptModel.load(tiny[1][adapter])
    bias = reference.reference_bias(spec, len(prompt_ids), LAYERS, HEADS)
    with torch.no_grad(), hf_soft_prompts(model, iapt, [len(prompt_ids) - SOFT_TOKENS]):
        return reference.logprobs(model, prompt_ids, generated, bias)


CASES = [(2, "a", None), (0, "b", None), (1, "a", SINK), (2, "b", SINK), (0, "a", None)]


def test_iapt_rows_match_the_reference_in_a_mixed_batch(llm, hf, tiny):
    model, tok = hf
    assert len(tok(PROMPTS[2]).input_ids) + SOFT_TOKENS > 64 * 2  # three chunks at least (64-token steps)
    others = [row(tok, tiny, 0), row(tok, tiny, 1, lora=True), row(tok, tiny, 2, spec=SINK), row(tok, tiny, 0)]
    rows = [row(tok, tiny, p, a, s) for p, a, s in CASES]
    mixed = [r for pair in zip(rows, others + [others[0]], strict=True) for r in pair]
    got = run(llm, mixed)
    worst = 0.0
    for (p, adapter, spec), (tokens, logprobs) in zip(CASES, got[0::2], strict=True):
        ids = tok(PROMPTS[p]).input_ids + [PLACEHOLDER_ID] * SOFT_TOKENS
        ref = reference_logprobs(model, tiny, ids, tokens, adapter, spec)
        assert ref[:-1].argmax(-1).tolist() == tokens, f"{p, adapter, spec}: greedy path differs"
        err = max(abs(lp - ref[i, t].item()) for i, (t, lp) in enumerate(zip(tokens, logprobs, strict=True)))
        worst = max(worst, err)
        assert err < 1e-4, f"{p, adapter, spec}: |dlogprob| {err}"
    # The other rows are what they are without IAPT rows beside them: base and LoRA rows exactly; the steered
    # row's exact recompute pads keys to the batch's longest row, so its sums may round differently.
    alone = run(llm, others + [others[0]])
    for i, ((tokens, logprobs), (want_tokens, want_logprobs)) in enumerate(zip(got[1::2], alone, strict=True)):
        if i == 2:
            assert tokens == want_tokens
            assert max(abs(a - b) for a, b in zip(logprobs, want_logprobs, strict=True)) < 1e-5
        else:
            assert (tokens, logprobs) == (want_tokens, want_logprobs), f"row {i} changed beside IAPT rows"
    print(f"max |dlogprob| vLLM IAPT vs HF reference, fp32: {worst:.2e}")


def test_the_adapter_changes_the_output_and_repeats_exactly(llm, hf, tiny):
    """Without its adapter (placeholders only) the same prompt gives other tokens, or this suite could not tell a
    row that lost its adapter; a repeat (prefix cache warm from the first run) gives the same output."""
    _, tok = hf
    from vllm import SamplingParams

    for p in range(len(PROMPTS)):
        ids = tok(PROMPTS[p]).input_ids + [PLACEHOLDER_ID] * SOFT_TOKENS
        plain = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                                         ignore_eos=True), use_tqdm=False)
        first = run(llm, [row(tok, tiny, p, "a")])
        assert list(plain[0].outputs[0].token_ids) != first[0][0]
        assert run(llm, [row(tok, tiny, p, "a")]) == first
