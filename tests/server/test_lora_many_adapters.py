"""Many distinct LoRA adapters in one batch of a real vLLM engine (the batched ops: kernels/segmented_lora.py).

Five adapters of different ranks and target modules fill every slot (max_loras=5, so the last slot, the one the
vLLM-CPU base-row bug leaks, is busy) and share batches with base rows, prompts of different lengths prefilled in
one step, then decoded together. Every row must equal HF transformers + PEFT with that row's adapter, and the base
rows must be bit-identical to a base-only run.
"""
from __future__ import annotations

import gc

import pytest
import torch
import vllm

from steerserve.server.engine import lora_ops_patch
from tests.tiny_models import build_tiny_llama, build_tiny_lora

PROMPTS = [
    "The license grants",
    "Copyright (C) 2007 Free Software Foundation, Inc. Everyone is permitted to copy and distribute",
    "You may convey a work based on the Program, or the modifications to produce it, in the form of source code",
    "Preamble",
    "Each licensee is addressed as you",
]
MAX_TOKENS = 5
ADAPTERS = {  # name: (seed, rank, targets)
    "r8-all": (11, 8, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    "r4-qv": (12, 4, ("q_proj", "v_proj")),
    "r2-mlp": (13, 2, ("gate_proj", "up_proj", "down_proj")),
    "r8-kod": (14, 8, ("k_proj", "o_proj", "down_proj")),
    "r6-all": (15, 6, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
}
# (prompt, adapter or None): every adapter, one twice, base rows between them, unsorted.
ROWS = [(0, "r6-all"), (1, None), (2, "r4-qv"), (3, "r8-all"), (4, None), (1, "r2-mlp"), (0, "r8-kod"),
        (3, "r6-all"), (2, None), (4, "r4-qv")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-many-lora")
    base = build_tiny_llama(root / "llama", seed=0)
    return base, {name: build_tiny_lora(root / name, base, seed=seed, rank=rank, targets=targets)
                  for name, (seed, rank, targets) in ADAPTERS.items()}


@pytest.fixture(scope="module")
def llm(tiny):
    lora_ops_patch.apply()
    engine = vllm.LLM(model=str(tiny[0]), dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=12,
                      kv_cache_memory_bytes=64 * 2**20, enable_lora=True, max_loras=len(ADAPTERS), max_lora_rank=8,
                      max_cpu_loras=len(ADAPTERS), seed=0)
    yield engine
    del engine
    gc.collect()


def run(llm, rows, tiny) -> list[tuple[list[int], list[float]]]:
    from vllm.lora.request import LoRARequest

    ids = {name: i + 1 for i, name in enumerate(ADAPTERS)}
    params = vllm.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=0, ignore_eos=True)
    outs = llm.generate([PROMPTS[p] for p, _ in rows], params, use_tqdm=False,
                        lora_request=[LoRARequest(a, ids[a], str(tiny[1][a])) if a else None for _, a in rows])
    return [(list(o.outputs[0].token_ids), [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids,
                                                                            o.outputs[0].logprobs, strict=True)])
            for o in outs]


def hf_greedy(model, prompt_ids: list[int]) -> tuple[list[int], list[float]]:
    ids, tokens, logprobs = list(prompt_ids), [], []
    for _ in range(MAX_TOKENS):
        with torch.no_grad():
            lp = model(input_ids=torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
        token = int(lp.argmax())
        tokens.append(token)
        logprobs.append(lp[token].item())
        ids.append(token)
    return tokens, logprobs


def test_every_row_matches_hf_peft_with_its_own_adapter(llm, tiny):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, paths = tiny
    tok = AutoTokenizer.from_pretrained(base)
    got = run(llm, ROWS, tiny)
    worst = 0.0
    for name in [None, *ADAPTERS]:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
        model = (PeftModel.from_pretrained(model, paths[name]) if name else model).eval()
        for (prompt, adapter), (tokens, logprobs) in zip(ROWS, got, strict=True):
            if adapter != name:
                continue
            want_tokens, want_logprobs = hf_greedy(model, tok(PROMPTS[prompt]).input_ids)
            assert tokens == want_tokens, f"row {prompt, adapter}: greedy path differs from HF+PEFT"
            diff = max(abs(g - w) for g, w in zip(logprobs, want_logprobs, strict=True))
            worst = max(worst, diff)
            assert diff < 1e-4, f"row {prompt, adapter}: |dlogprob| {diff}"
    print(f"max |dlogprob| vLLM, {len(ADAPTERS)} distinct adapters vs HF+PEFT fp32: {worst:.2e}")


def test_base_rows_equal_a_base_only_run(llm, tiny):
    base_rows = [(p, None) for p in range(len(PROMPTS))]
    alone = run(llm, base_rows, tiny)
    names = list(ADAPTERS)
    mixed_rows = [r for p in range(len(PROMPTS)) for r in ((p, names[p]), (p, None), (4 - p, names[-1 - p]))]
    mixed = run(llm, mixed_rows, tiny)
    assert mixed[1::3] == alone  # exact: token ids and logprobs
    # Every adapter changes its row, or a row that lost its adapter could pass the HF+PEFT test above.
    assert all(m != a for m, a in zip(mixed[0::3], alone, strict=True))
