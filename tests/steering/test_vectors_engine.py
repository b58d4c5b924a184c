"""Control vectors in a real vLLM engine on tiny random fp32 models (a Llama with a LoRA adapter and attention
steering beside, a Qwen2, a Qwen3-MoE), against HF transformers eager with forward hooks that apply the same
items from their definition (tests/vectors_reference.py).

Checked per model: mixed batches (several vectors and scales, add and ablate, tokens all / prompt / generated,
two rows sharing one vector's slot) with chunked prefill (a prompt over the 64-token step budget), prefix
caching (a second run reads the first run's cached blocks) and preemption (a KV cache too small for the batch);
greedy tokens equal and max |dlogprob| < 1e-4 (measured ~1e-5); unsteered rows (base, LoRA) bit-identical to an
unsteered-only run; every vector row differs from its unsteered output.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import vllm

from steerserve.server.engine import vectors_hook
from steerserve.steering import spec as S
from steerserve.steering.model import ModelFacts
from steerserve.steering.plan import cache_salt
from tests import attention_reference, experts_reference
from tests.tiny_models import TINY_LLAMA, _build, build_tiny_llama, build_tiny_lora, build_tiny_moe
from tests.vectors_reference import steered

LICENCE = ("You may convey a work based on the Program, or the modifications to produce it, in the form of source "
           "code under the terms of section 4, provided that you also meet all of these conditions: ")
PROMPTS = ["The license grants", "Preamble", LICENCE * 3, LICENCE, LICENCE * 2 + "THERE IS NO WARRANTY"]
MAX_TOKENS = 24
H = TINY_LLAMA["hidden_size"]
SINK = {"sink": {"gamma": 0.3}}
BLOCKS = 20  # KV blocks of 32 tokens: the batch below needs more at once, so vLLM preempts rows


def build_tiny_qwen2(dir, seed: int = 0):
    """A random fp32 Qwen2 (q/k/v biases), built like the tiny Llama."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = {k: v for k, v in TINY_LLAMA.items()}
    return _build(dir, "qwen2", seed, {}, lambda: Qwen2ForCausalLM(Qwen2Config(**cfg)))


def vectors_items(layers: int) -> dict[str, list[dict]]:
    rng = np.random.default_rng(1)
    v = [{str(layer): (rng.standard_normal(H) * 0.6).tolist() for layer in range(layers)} for _ in range(4)]
    last = layers - 1
    return {
        "add_all": [{"data": v[0], "scale": 0.8}],
        "ablate_then_add_generated": [{"data": v[1], "mode": "ablate", "layers": [0]},
                                      {"data": v[2], "scale": -1.5, "layers": [last], "tokens": "generated"}],
        "prompt_normalized_and_order": [{"data": v[3], "normalize": True, "scale": 6.0, "tokens": "prompt"},
                                        {"data": v[0], "mode": "ablate", "layers": [last]},
                                        {"data": v[1], "scale": 0.5, "layers": [0, last]}],
    }


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3_moe"])
def setup(request, tmp_path_factory):
    from transformers import AutoConfig, AutoTokenizer

    from steerserve.server.engine import lora_ops_patch
    from steerserve.server.engine.builder import steering_llm

    kind, root = request.param, tmp_path_factory.mktemp(f"vectors-{request.param}")
    path = {"llama": lambda: build_tiny_llama(root / "m", seed=0), "qwen2": lambda: build_tiny_qwen2(root / "m"),
            "qwen3_moe": lambda: build_tiny_moe(root / "m", "qwen3_moe", seed=0)}[kind]()
    lora = build_tiny_lora(root / "lora", path, seed=3) if kind == "llama" else None
    layers = AutoConfig.from_pretrained(path).num_hidden_layers
    tok = AutoTokenizer.from_pretrained(path)
    facts = ModelFacts(tok, 2048, (1,), num_layers=layers, num_heads=4, num_kv_heads=2,
                       extra={"vectors": {"hidden_size": H}})
    hf = experts_reference.load(path, kind) if kind == "qwen3_moe" else attention_reference.load(path)
    lora_args = dict(enable_lora=True, max_loras=1, max_lora_rank=8) if lora else {}
    with steering_llm(path, dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=8, block_size=32,
                      max_num_batched_tokens=64, enable_prefix_caching=True, num_gpu_blocks_override=BLOCKS,
                      logprobs_mode="processed_logprobs", seed=0, **lora_args) as engine:
        yield kind, engine, hf, tok, facts, layers, lora
        del engine
    if lora:
        lora_ops_patch.remove()


def request(setup, prompt: int, vectors: list[dict] | None = None, attention: dict | None = None,
            lora: bool = False):
    from vllm.lora.request import LoRARequest

    kind, _, _, tok, facts, _, lora_path = setup
    ids = tok(PROMPTS[prompt]).input_ids
    spec = {k: v for k, v in (("vectors", vectors), ("attention", attention)) if v}
    plan = S.compile_spec(S.merge([S.parse(spec, "steering")]), facts) if spec else None
    salt = cache_salt("tenant", plan, len(ids))  # as the server salts: steered KV is never shared
    params = vllm.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=0, ignore_eos=True,
                                 extra_args=plan.to_extra_args() if plan else None)
    return ({"prompt_token_ids": ids, "cache_salt": salt}, params,
            LoRARequest("tiny-lora", 1, str(lora_path)) if lora else None)


def run(llm, rows):
    outs = llm.generate([r[0] for r in rows], [r[1] for r in rows], lora_request=[r[2] for r in rows],
                        use_tqdm=False)
    return [(list(o.outputs[0].token_ids),
             [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs, strict=True)])
            for o in outs]


def reference(setup, prompt: int, tokens: list[int], items: list[dict] | None, attention: dict | None):
    kind, _, hf, tok, _, layers, _ = setup
    ids = tok(PROMPTS[prompt]).input_ids
    with torch.no_grad(), steered(hf, items, len(ids)):
        if kind == "qwen3_moe":
            return experts_reference.logprobs(hf, ids, tokens, None)
        return attention_reference.logprobs(hf, ids, tokens,
                                            attention_reference.reference_bias(attention, len(ids), layers, 4))


def test_vector_rows_match_hf_and_other_rows_are_untouched(setup):
    kind, llm, _, _, _, layers, lora = setup
    items = vectors_items(layers)
    cases = [(2, "add_all", None), (0, "ablate_then_add_generated", None), (4, "prompt_normalized_and_order", None),
             (3, "add_all", None), (1, "add_all", SINK if kind != "qwen3_moe" else None)]
    others = [request(setup, 0), request(setup, 3, lora=bool(lora)), request(setup, 2),
              request(setup, 1, attention=SINK if kind != "qwen3_moe" else None), request(setup, 4)]
    rows = [request(setup, p, items[name], attention) for p, name, attention in cases]
    mixed = [r for pair in zip(rows, others, strict=True) for r in pair]
    admitted = vectors_hook.ADMITTED[0]
    worst = 0.0
    for attempt in ("cold", "prefix cache warm"):
        got = run(llm, mixed)
        for (p, name, attention), (tokens, logprobs) in zip(cases, got[0::2], strict=True):
            ref = reference(setup, p, tokens, items[name], attention)
            label = f"{kind} {attempt} prompt {p} {name}"
            assert ref[:-1].argmax(-1).tolist() == tokens, f"{label}: greedy path differs"
            err = max(abs(lp - ref[i, t].item()) for i, (t, lp) in enumerate(zip(tokens, logprobs, strict=True)))
            worst = max(worst, err)
            assert err < 1e-4, f"{label}: |dlogprob| {err}"
    assert vectors_hook.ADMITTED[0] - admitted > 2 * len(cases), "no row was preempted and recomputed"
    alone = run(llm, others)
    for i, (a, b) in enumerate(zip(got[1::2], alone, strict=True)):
        if others[i][1].extra_args:  # attention's exact recompute pads keys to the batch's longest row
            assert a[0] == b[0] and max(abs(x - y) for x, y in zip(a[1], b[1], strict=True)) < 1e-5
        else:
            assert a == b, f"{kind}: unsteered row {i} changed beside vector rows"
    plain = run(llm, [request(setup, p, None, attention) for p, _, attention in cases])
    for (tokens, logprobs), (plain_tokens, plain_logprobs) in zip(got[0::2], plain, strict=True):
        assert tokens != plain_tokens or max(abs(a - b) for a, b in zip(logprobs, plain_logprobs, strict=True)) > 1e-2
    print(f"{kind}: max |dlogprob| vLLM vectors vs HF hooks, fp32: {worst:.2e}")
