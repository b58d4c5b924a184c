"""Every steering family and both adapter kinds under tensor parallelism (TP=2, two CPU ranks) on a tiny random
fp32 GQA Llama (4 query heads over 2 KV heads: each rank holds 2 query heads and 1 KV head), against HF
transformers eager with each family's independent reference (tests/tp/rows.py).

One mixed batch holds base rows, a LoRA row, attention sink / span / mode rows (per-head tables cut per rank),
control-vector rows, a logits row and IAPT rows (one with a sink beside it), with chunked prefill (a prompt over
the 64-token step budget) and prefix caching (the batch runs twice; the second run reads cached blocks). Checked:
greedy tokens equal to the reference and max |d logprob| < 1e-4 (measured ~5e-6; TP=1 against the same references:
tests/steering/); base and LoRA rows bit-identical to an unsteered-only TP=2 run. Cost: one TP=2 engine (~35 s to
start on 2 cores) and ~30 s of generation and references. `make test-tp-full` (STEERSERVE_TP_FULL=1) also
compares the batch row by row with a TP=1 engine.
"""
from __future__ import annotations

import os

import pytest

from steerserve.steering.model import ModelFacts
from tests import attention_reference
from tests.steering.test_attention_engine import SPECS as ATTENTION
from tests.steering.test_vectors_engine import vectors_items
from tests.tiny_models import TINY_LLAMA, build_tiny_iapt, build_tiny_llama, build_tiny_lora
from tests.tp.conftest import TP
from tests.tp.rows import Row, reference_logprobs, request, run, worst_error

LAYERS, HEADS, KV_HEADS = TINY_LLAMA["num_hidden_layers"], TINY_LLAMA["num_attention_heads"], 2
MAX_TOKENS = 5
FULL = os.environ.get("STEERSERVE_TP_FULL") == "1"
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=16, max_num_batched_tokens=64,
              block_size=32, enable_prefix_caching=True, kv_cache_memory_bytes=64 * 2**20, enable_lora=True,
              max_loras=1, max_lora_rank=8, logprobs_mode="processed_logprobs", seed=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp-llama")
    base = build_tiny_llama(root / "llama", seed=0)
    return base, build_tiny_iapt(root / "iapt", base, seed=1), build_tiny_lora(root / "lora", base, seed=3)


@pytest.fixture(scope="module")
def llm(tiny):
    from steerserve.server.engine import lora_ops_patch
    from steerserve.server.engine.builder import steering_llm

    with steering_llm(tiny[0], tensor_parallel_size=TP, **ENGINE) as engine:
        yield engine
        del engine
    lora_ops_patch.remove()


@pytest.fixture(scope="module")
def hf(tiny):
    from peft import PeftModel
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny[0])
    facts = ModelFacts(tok, 2048, (1,), num_layers=LAYERS, num_heads=HEADS, num_kv_heads=KV_HEADS,
                       extra={"vectors": {"hidden_size": TINY_LLAMA["hidden_size"]}})
    base = attention_reference.load(tiny[0])
    lora = PeftModel.from_pretrained(attention_reference.load(tiny[0]), tiny[2]).eval()
    return base, lora, tok, facts


def rows(tiny) -> dict[str, Row]:
    vectors = vectors_items(LAYERS)
    return {
        "base short": Row(0), "base long": Row(2), "lora": Row(1, lora=str(tiny[2])),
        "sink per head": Row(2, attention=ATTENTION["sink_heads"]),
        "spans on heads 1, 2": Row(1, attention=ATTENTION["spans"]),
        "lssar mode + sink": Row(0, attention=ATTENTION["lssar"]),
        "vectors add": Row(2, vectors=vectors["add_all"]),
        "vectors ablate + add": Row(1, vectors=vectors["ablate_then_add_generated"]),
        "logits bias": Row(0, logits=((5, 300, 1979), (3.0, 2.5, -4.0))),
        "iapt": Row(2, iapt=str(tiny[1])),
        "iapt + sink": Row(1, attention={"sink": {"gamma": 0.3}}, iapt=str(tiny[1])),
    }


def test_mixed_batch_of_every_family_matches_hf_and_leaves_unsteered_rows_alone(llm, hf, tiny):
    base, lora, tok, facts = hf
    batch = rows(tiny)
    requests = [request(row, tok, facts, MAX_TOKENS) for row in batch.values()]
    worst, cached = 0.0, 0
    for attempt in ("cold", "prefix cache warm"):
        got = run(llm, requests)
        for (name, row), (tokens, logprobs, n_cached) in zip(batch.items(), got, strict=True):
            ref = reference_logprobs(lora if row.lora else base, row, tok, tokens, LAYERS, HEADS)
            err = worst_error(f"TP={TP} {attempt} {name}", ref, tokens, logprobs)
            assert err < 1e-4, f"TP={TP} {attempt} {name}: |d logprob| {err}"
            worst = max(worst, err)
            cached += n_cached if attempt != "cold" else 0
    assert cached >= 64, "the second run read nothing from the prefix cache"
    print(f"TP={TP} llama: max |d logprob| vs HF eager over every family: {worst:.2e}")

    unsteered = [(name, r) for name, r in zip(batch, requests, strict=True) if not batch[name].steered]
    alone = run(llm, [r for _, r in unsteered])
    mixed = dict(zip(batch, got, strict=True))
    for (name, _), (tokens, logprobs, _) in zip(unsteered, alone, strict=True):
        assert (tokens, logprobs) == mixed[name][:2], f"{name} changed beside steered rows"


@pytest.mark.skipif(not FULL, reason="make test-tp-full")
def test_tp2_equals_tp1_row_by_row(llm, hf, tiny):
    from steerserve.server.engine.builder import steering_llm

    _, _, tok, facts = hf
    batch = rows(tiny)
    requests = [request(row, tok, facts, MAX_TOKENS) for row in batch.values()]
    two = run(llm, requests)
    with steering_llm(tiny[0], tensor_parallel_size=1, **ENGINE) as single:
        one = run(single, requests)
        del single
    worst = 0.0
    for name, (tokens, logprobs, _), (want_tokens, want_logprobs, _) in zip(batch, two, one, strict=True):
        assert tokens == want_tokens, f"{name}: TP={TP} and TP=1 differ in greedy tokens"
        worst = max(worst, max(abs(a - b) for a, b in zip(logprobs, want_logprobs, strict=True)))
    assert worst < 1e-4
    print(f"TP={TP} vs TP=1 llama, every family: max |d logprob| {worst:.2e}")
