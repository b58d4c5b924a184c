"""LoRA adapters in a real vLLM engine on a tiny random fp32 Llama, mixed with logits steering in one batch.

Every row of a heterogeneous batch (different adapters, with and without steering, base rows) must equal HF
transformers + PEFT with that row's adapter and the same additive logit bias; base rows must be bit-identical to
a base-only run. The vLLM-CPU base-row bug (docs/adapters.md) is shown with our fix removed, and gone with it.
"""
from __future__ import annotations

import gc

import pytest
import torch
import vllm

from steerserve.server.engine import lora_ops_patch
from steerserve.steering.plan import LogitsPlan, Plan
from tests.tiny_models import build_tiny_llama, build_tiny_lora

PROMPTS = [
    "The license grants",
    "Copyright (C) 2007 Free Software Foundation, Inc. Everyone is permitted to copy and distribute",
    "You may convey a work based on the Program, or the modifications to produce it, in the form of source code",
    "Preamble",
]
MAX_TOKENS = 6
BIAS = Plan("bias", LogitsPlan(bias_ids=(5, 300, 1979), bias_values=(3.0, 2.5, -4.0)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-lora")
    base = build_tiny_llama(root / "llama", seed=0)
    adapters = {"a": build_tiny_lora(root / "lora-a", base, seed=1, rank=8),
                "b": build_tiny_lora(root / "lora-b", base, seed=2, rank=4, targets=("q_proj", "v_proj", "down_proj"))}
    return base, adapters


@pytest.fixture(scope="module")
def llm(tiny):
    from steerserve.server.engine.processor import SteeringLogitsProcessor

    base, _ = tiny
    lora_ops_patch.apply()
    # max_loras=2 with two adapters in one batch: every slot is occupied, the condition of the base-row bug.
    engine = vllm.LLM(model=str(base), dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=8,
                      kv_cache_memory_bytes=64 * 2**20, enable_lora=True, max_loras=2, max_lora_rank=8,
                      max_cpu_loras=2, logits_processors=[SteeringLogitsProcessor],
                      logprobs_mode="processed_logprobs", seed=0)
    yield engine
    del engine
    gc.collect()


def lora(name: str, tiny) -> object:
    from vllm.lora.request import LoRARequest

    return LoRARequest(f"tiny-{name}", {"a": 1, "b": 2}[name], str(tiny[1][name]))


def params(plan: Plan | None):
    return vllm.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=0, ignore_eos=True,
                               extra_args=plan.to_extra_args() if plan else None)


def run(llm, rows, tiny):
    """rows: (prompt index, adapter name or None, plan or None) -> [(token ids, logprobs)] in one generate call."""
    outs = llm.generate([PROMPTS[p] for p, _, _ in rows], [params(plan) for _, _, plan in rows],
                        lora_request=[lora(a, tiny) if a else None for _, a, _ in rows], use_tqdm=False)
    result = []
    for out in outs:
        comp = out.outputs[0]
        result.append((list(comp.token_ids), [lp[t].logprob for t, lp in zip(comp.token_ids, comp.logprobs,
                                                                             strict=True)]))
    return result


@pytest.fixture(scope="module")
def hf(tiny):
    """HF + PEFT references by adapter name (None: the base model) and the tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, adapters = tiny

    def load(adapter):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
        return (PeftModel.from_pretrained(model, adapters[adapter]) if adapter else model).eval()

    return {name: load(name) for name in (None, "a", "b")}, AutoTokenizer.from_pretrained(base)


def hf_greedy(model, prompt_ids: list[int], plan: Plan | None) -> tuple[list[int], list[float]]:
    ids, tokens, logprobs = list(prompt_ids), [], []
    for _ in range(MAX_TOKENS):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float().clone()
        if plan is not None:
            for token, value in zip(plan.logits.bias_ids, plan.logits.bias_values, strict=True):
                logits[token] += value
        lp = logits.log_softmax(-1)
        token = int(lp.argmax())
        tokens.append(token)
        logprobs.append(lp[token].item())
        ids.append(token)
    return tokens, logprobs


def test_heterogeneous_batch_matches_hf_peft_per_row(llm, hf, tiny):
    models, tok = hf
    rows = [(0, "a", None), (1, None, None), (2, "b", BIAS), (3, "a", BIAS), (0, None, BIAS), (1, "b", None),
            (2, None, None), (3, "b", None)]
    got = run(llm, rows, tiny)
    worst = 0.0
    for (prompt, adapter, plan), (tokens, logprobs) in zip(rows, got, strict=True):
        want_tokens, want_logprobs = hf_greedy(models[adapter], tok(PROMPTS[prompt]).input_ids, plan)
        assert tokens == want_tokens, f"row {prompt, adapter, plan and plan.fingerprint}: greedy path differs"
        diff = max(abs(g - w) for g, w in zip(logprobs, want_logprobs, strict=True))
        worst = max(worst, diff)
        assert diff < 1e-4, f"row {prompt, adapter}: |dlogprob| {diff}"
    # The adapters must change the model, or this test could not tell a row that lost its adapter.
    for adapter in ("a", "b"):
        assert any(hf_greedy(models[adapter], tok(p).input_ids, None)[0] != hf_greedy(models[None], tok(p).input_ids,
                                                                                      None)[0] for p in PROMPTS)
    print(f"max |dlogprob| vLLM LoRA vs HF+PEFT fp32: {worst:.2e}")


def test_base_rows_equal_a_base_only_run(llm, tiny):
    base_rows = [(p, None, plan) for p in range(len(PROMPTS)) for plan in (None, BIAS)]
    alone = run(llm, base_rows, tiny)
    mixed_rows = [r for pair in zip(base_rows, [(p % 4, "ab"[p % 2], None) for p in range(len(base_rows))],
                                    strict=True) for r in pair]
    mixed = run(llm, mixed_rows, tiny)
    assert mixed[0::2] == alone  # exact: token ids and logprobs


@pytest.mark.parametrize("fixed", [True, False], ids=["with-fix", "without-fix"])
def test_base_row_with_every_slot_full(llm, tiny, fixed):
    """[a, base, b] with max_loras=2: the last slot is occupied. Without the fix the base row gets adapter b."""
    alone = run(llm, [(1, None, None)], tiny)[0]
    if not fixed:
        lora_ops_patch.remove()
    try:
        mixed = run(llm, [(0, "a", None), (1, None, None), (2, "b", None)], tiny)[1]
    finally:
        lora_ops_patch.apply()
    if fixed:
        assert mixed == alone
    else:  # the bug this fix exists for: if vLLM fixes it upstream, this case fails and the fix can go
        assert mixed != alone
