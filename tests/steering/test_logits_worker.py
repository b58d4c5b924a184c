"""The worker's logits steering (server/engine/processor.py) in a real vLLM engine on a tiny random fp32 Llama.

Steered greedy decoding must equal an independent HF transformers reference with the rules written out plainly
here; unsteered requests must be bit-identical whatever else shares their batch; malformed plans are refused at the
engine boundary. A last, engine-free test drives the processor with synthetic batch updates, because the CPU
runner never issues SWAP moves.
"""
from __future__ import annotations

import gc
import random
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import vllm

from steerserve.steering.plan import EosRamp, LogitsPlan, Plan
from tests.tiny_models import EOS_ID, VOCAB_SIZE, build_tiny_llama

LICENCE = ("You may convey a work based on the Program, or the modifications to produce it, in the form of source "
           "code under the terms of section 4, provided that you also meet all of these conditions: ")
PROMPTS = [
    "The license grants",
    "Copyright (C) 2007 Free Software Foundation, Inc. Everyone is permitted to copy and distribute",
    LICENCE,  # ~50 tokens
    LICENCE * 3,  # longer than max_num_batched_tokens=64: prefilled in chunks, next to decoding rows
    "Preamble",
    LICENCE * 2 + "THERE IS NO WARRANTY FOR THE PROGRAM",
]
# Window 5 with max_tokens > 5: the EOS ramp saturates mid-generation and must stay at max afterwards.
RAMP_WINDOW = 5
PLANS = {
    "bias": Plan("bias", LogitsPlan(bias_ids=(5, 300, 1979), bias_values=(3.0, 2.5, -4.0))),
    "ramp": Plan("ramp", LogitsPlan(eos_ramp=EosRamp((EOS_ID,), 6.0, RAMP_WINDOW))),
    # +bias alone would make token 5 win every step; the penalty must break that repetition.
    "diversity": Plan("diversity", LogitsPlan(bias_ids=(5,), bias_values=(5.0,), diversity=3.0)),
    "all": Plan("all", LogitsPlan(bias_ids=(1979, 1290, 300), bias_values=(-4.0, -4.0, 3.0),
                                  eos_ramp=EosRamp((EOS_ID, 4), 5.0, RAMP_WINDOW), diversity=1.5)),
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", seed=0)


@pytest.fixture(scope="module")
def llm(tiny_dir):
    from steerserve.server.engine.processor import SteeringLogitsProcessor

    engine = vllm.LLM(model=str(tiny_dir), dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=4,
                      max_num_batched_tokens=64,  # chunked prefill, and rows that finish, queue and move
                      kv_cache_memory_bytes=128 * 2**20, logits_processors=[SteeringLogitsProcessor],
                      logprobs_mode="processed_logprobs", seed=0)
    yield engine
    del engine
    gc.collect()  # frees the engine now, so a later module can build its own in this process


@pytest.fixture(scope="module")
def hf(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(tiny_dir)


def params(plan: Plan | None, max_tokens: int):
    return vllm.SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=0, ignore_eos=True,
                               extra_args=plan.to_extra_args() if plan else None)


def tokens_and_logprobs(out) -> tuple[list[int], list[float]]:
    comp = out.outputs[0]
    return list(comp.token_ids), [lp[t].logprob for t, lp in zip(comp.token_ids, comp.logprobs, strict=True)]


def steer_reference(logits: torch.Tensor, plan: Plan | None, generated: list[int]) -> torch.Tensor:
    """The rules of docs/methods/logits.md / plan.py, one token id at a time; `generated` = this response's tokens so far,
    where -1 is a token sampled but not known yet (vLLM's async placeholder): it counts for t, not for diversity."""
    logits = logits.clone()
    if plan is None:
        return logits
    lg = plan.logits
    for token, value in zip(lg.bias_ids, lg.bias_values, strict=True):
        logits[token] += value
    if lg.eos_ramp is not None:
        t, ramp = len(generated), lg.eos_ramp
        for token in set(ramp.token_ids):
            logits[token] += ramp.max * min(t, ramp.window) / ramp.window
    for token in set(generated) - {-1}:
        logits[token] -= lg.diversity
    return logits


def ablations(plan: Plan) -> list[tuple[str, Plan]]:
    """The plan with one of its rules taken out, for each rule it has."""
    lg, out = plan.logits, []
    if lg.bias_ids:
        out.append(("bias", replace(lg, bias_ids=(), bias_values=())))
    if lg.eos_ramp is not None:
        out.append(("eos_ramp", replace(lg, eos_ramp=None)))
    if lg.diversity:
        out.append(("diversity", replace(lg, diversity=0.0)))
    return [(rule, Plan(plan.fingerprint, weaker)) for rule, weaker in out]


def hf_greedy(model, prompt_ids: list[int], plan: Plan | None, max_tokens: int) -> tuple[list[int], list[float]]:
    """Plain greedy loop, full forward every step, steering applied to the last position's logits."""
    ids, generated, logprobs = list(prompt_ids), [], []
    for _ in range(max_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        lp = steer_reference(logits, plan, generated).log_softmax(-1)
        token = int(lp.argmax())
        generated.append(token)
        logprobs.append(lp[token].item())
        ids.append(token)
    return generated, logprobs


@pytest.mark.parametrize("name", list(PLANS))
def test_steered_greedy_matches_hf_reference(llm, hf, name):
    model, tok = hf
    plan, max_tokens = PLANS[name], 14
    prompts = PROMPTS[:2]
    outs = llm.generate(prompts, [params(plan, max_tokens)] * len(prompts), use_tqdm=False)
    worst = 0.0
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.prompt_token_ids == tok(prompt).input_ids
        got_tokens, got_lps = tokens_and_logprobs(out)
        want_tokens, want_lps = hf_greedy(model, out.prompt_token_ids, plan, max_tokens)
        assert got_tokens == want_tokens, f"{name}: greedy path differs for {prompt[:30]!r}"
        for step, (got, want) in enumerate(zip(got_lps, want_lps, strict=True)):
            worst = max(worst, abs(got - want))
            assert abs(got - want) < 1e-4, f"{name} {prompt[:30]!r} step {step}: vLLM {got} vs reference {want}"
        # Every rule of the plan must change the greedy path, or this test could not catch it being dropped.
        for rule, weaker in ablations(plan):
            assert got_tokens != hf_greedy(model, out.prompt_token_ids, weaker, max_tokens)[0], f"{name}: {rule}"
        if plan.logits.eos_ramp is not None:
            # EOS is picked after the ramp has saturated, so the sampled logprob checks the held value.
            assert EOS_ID in got_tokens[RAMP_WINDOW + 1:], f"{name}: EOS never chosen past the window"
    print(f"{name}: max |dlogprob| vLLM vs reference {worst:.2e}")


def test_mixed_batch_isolation(llm):
    """Steered and plain rows share batches, chunked prefills, queueing and row moves without leaking."""
    plans = [None, PLANS["all"], Plan("noop"), PLANS["ramp"], PLANS["diversity"], None]  # "noop" steers nothing
    max_tokens = [9, 14, 3, 11, 6, 16]  # rows finish at different steps, so the persistent batch condenses
    mixed = llm.generate(PROMPTS, [params(p, m) for p, m in zip(plans, max_tokens, strict=True)], use_tqdm=False)

    plain = [i for i, p in enumerate(plans) if p is None or p.logits.is_noop()]
    alone_plain = llm.generate([PROMPTS[i] for i in plain], [params(None, max_tokens[i]) for i in plain],
                               use_tqdm=False)
    for i, out in zip(plain, alone_plain, strict=True):
        assert tokens_and_logprobs(mixed[i]) == tokens_and_logprobs(out), f"unsteered prompt {i} changed"
    for i, plan in enumerate(plans):
        if i not in plain:
            alone = llm.generate([PROMPTS[i]], [params(plan, max_tokens[i])], use_tqdm=False)[0]
            assert tokens_and_logprobs(mixed[i]) == tokens_and_logprobs(alone), f"steered prompt {i} changed"
            assert tokens_and_logprobs(mixed[i])[0] != tokens_and_logprobs(
                llm.generate([PROMPTS[i]], [params(None, max_tokens[i])], use_tqdm=False)[0])[0]


def test_malformed_plan_is_refused(llm):
    from vllm.exceptions import VLLMValidationError

    bad = {"steerserve": {"v": 1, "parts": {"logits": {"bias_ids": [5, 6], "bias_values": [1.0]}}}}
    with pytest.raises((ValueError, VLLMValidationError), match="differ in length"):
        llm.generate(["Preamble"], vllm.SamplingParams(max_tokens=2, extra_args=bad), use_tqdm=False)
    wrong_shape = {"steerserve": {"v": 1, "parts": {"logits": {"eos_ramp": {"max": 1.0}}}}}
    with pytest.raises((ValueError, VLLMValidationError), match="malformed"):
        llm.generate(["Preamble"], vllm.SamplingParams(max_tokens=2, extra_args=wrong_shape), use_tqdm=False)
    # The engine is still serving.
    assert len(llm.generate(["Preamble"], params(None, 2), use_tqdm=False)[0].outputs[0].token_ids) == 2


def test_row_operations_follow_the_persistent_batch():
    """Random removes, adds (reusing freed rows, some resumed with tokens already generated), condensing moves
    and SWAPs, replayed as vLLM would send them, plus token lists that carry placeholders or lose tokens: every
    row's logits must equal the reference for the request that sits in that row now."""
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    from steerserve.server.engine.processor import SteeringLogitsProcessor

    max_rows, rng = 6, random.Random(0)
    config = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=max_rows),
                             model_config=SimpleNamespace(get_vocab_size=lambda: VOCAB_SIZE,
                                                          hf_text_config=SimpleNamespace(num_hidden_layers=2,
                                                                                         num_attention_heads=4)))
    proc = SteeringLogitsProcessor(config, torch.device("cpu"), False)
    choices = [None, *PLANS.values()]
    batch: list[tuple[Plan | None, list[int]] | None] = []  # row -> (plan, generated tokens)
    for _ in range(200):
        removed = [i for i, r in enumerate(batch) if r is not None and rng.random() < 0.2]
        for i in removed:
            batch[i] = None
        added = []
        for _ in range(rng.randint(0, 2)):
            free = sorted(i for i, r in enumerate(batch) if r is None)
            if len(batch) - len(free) >= max_rows:
                break
            i = free[0] if free else len(batch)  # vLLM refills the lowest freed row first ...
            if free:
                removed.remove(i)  # ... and then no longer reports it as removed
            else:
                batch.append(None)
            plan = rng.choice(choices)
            resumed = [rng.choice([5, 47, EOS_ID]) for _ in range(rng.choice([0, 0, 3, 6]))]  # after preemption
            batch[i] = (plan, resumed)
            added.append((i, SimpleNamespace(extra_args=plan.to_extra_args() if plan else None), None, batch[i][1]))
        moved = []
        while None in batch:  # condense: the last occupied row fills the lowest hole
            while batch and batch[-1] is None:
                batch.pop()
            if None not in batch:
                break
            hole, last = batch.index(None), len(batch) - 1
            batch[hole], batch[last] = batch[last], None
            moved.append((last, hole, MoveDirectionality.UNIDIRECTIONAL))
        if len(batch) >= 2 and rng.random() < 0.5:  # the reordering some attention backends do
            a, b = rng.sample(range(len(batch)), 2)
            batch[a], batch[b] = batch[b], batch[a]
            moved.append((a, b, MoveDirectionality.SWAP))
        proc.update_state(BatchUpdate(len(batch), removed, added, moved) if removed or added or moved else None)

        if rng.random() < 0.5:  # vLLM fills in placeholders before sampling, or a step later
            for _plan, generated in batch:
                generated[:] = [rng.randrange(VOCAB_SIZE) if t < 0 else t for t in generated]
        logits = torch.randn(len(batch), VOCAB_SIZE)
        got = proc.apply(logits.clone())
        for row, (plan, generated) in enumerate(batch):
            if plan is None:
                assert torch.equal(got[row], logits[row])
            else:
                torch.testing.assert_close(got[row], steer_reference(logits[row], plan, generated))
        for _plan, generated in batch:  # each row samples a token; EOS and repeats are likely
            if generated and rng.random() < 0.1:
                del generated[-rng.randint(1, 2):]  # tokens taken back (e.g. a failed KV load)
            elif (generated and generated[-1] < 0) or rng.random() < 0.15:
                generated.append(-1)  # placeholders only ever form the tail
            else:
                generated.append(rng.choice([EOS_ID, 5, 47, rng.randrange(VOCAB_SIZE)]))
