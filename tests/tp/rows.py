"""One row of a mixed steering batch, its plan as the server would send it, and its HF eager reference, for the
tensor-parallel tests. The references are the suite's independent ones: tests/attention_reference.py (eager
attention with the steering written out), tests/vectors_reference.py (layer output hooks), tests/experts_reference.py
(routers written out token by token), steering.iapt.hf_soft_prompts, PEFT for LoRA, logits + bias by hand."""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import vllm

from steerserve.steering import spec as S
from steerserve.steering.attention import bind_spans
from steerserve.steering.plan import LogitsPlan, Plan, cache_salt
from tests import attention_reference, experts_reference
from tests.vectors_reference import steered

LICENCE = ("You may convey a work based on the Program, or the modifications to produce it, in the form of source "
           "code under the terms of section 4, provided that you also meet all of these conditions: ")
# The last is longer than the 64-token step budget: prefilled in chunks beside decoding rows.
PROMPTS = ["The license grants", LICENCE, LICENCE * 3]


@dataclass(frozen=True)
class Row:
    prompt: int
    attention: dict | None = None
    vectors: list[dict] | None = None
    experts: dict | None = None
    logits: tuple[tuple[int, ...], tuple[float, ...]] | None = None
    iapt: str | None = None  # adapter directory
    lora: str | None = None  # adapter directory
    stats: str = ""  # routed-expert counts key

    @property
    def steered(self) -> bool:
        return bool(self.attention or self.vectors or self.experts or self.logits or self.iapt)


def prompt_ids(tok, row: Row) -> list[int]:
    from steerserve.steering.iapt import PLACEHOLDER_ID, SOFT_TOKENS

    return tok(PROMPTS[row.prompt]).input_ids + ([PLACEHOLDER_ID] * SOFT_TOKENS if row.iapt else [])


def plan_of(row: Row, tok, facts) -> Plan | None:
    """The plan the server would send (spec -> plan -> spans bound to the prompt, IAPT and stats parts added)."""
    from steerserve.server.engine import iapt_hook
    from steerserve.steering.methods.stats import StatsPlan

    ids = prompt_ids(tok, row)
    spec = {k: v for k, v in (("attention", row.attention), ("vectors", row.vectors), ("experts", row.experts)) if v}
    plan = None
    if spec:
        steering = S.merge([S.parse(spec, "steering")])
        plan = S.compile_spec(steering, facts)
        if row.attention:
            plan = plan.with_part(bind_spans(steering.attention, plan.attention, [len(ids)], None))
    if row.logits:
        plan = (plan or Plan("logits")).with_part(LogitsPlan(bias_ids=row.logits[0], bias_values=row.logits[1]))
    if row.iapt:
        plan = (plan or Plan("iapt")).with_part(iapt_hook.plan_part(row.iapt))
    if row.stats:
        plan = (plan or Plan("stats")).with_part(StatsPlan(row.stats))
    return plan


def request(row: Row, tok, facts, max_tokens: int):
    """(prompt, SamplingParams, LoRARequest | None) as the server submits this row."""
    from vllm.lora.request import LoRARequest

    ids = prompt_ids(tok, row)
    plan = plan_of(row, tok, facts)
    salt = cache_salt("tenant", plan, len(ids)) if plan else None
    params = vllm.SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=0, ignore_eos=True,
                                 extra_args=plan.to_extra_args() if plan else None,
                                 skip_reading_prefix_cache=True if row.iapt else None)
    return ({"prompt_token_ids": ids, **({"cache_salt": salt} if salt else {})}, params,
            LoRARequest("tiny-lora", 1, row.lora) if row.lora else None)


def run(llm, requests) -> list[tuple[list[int], list[float], int]]:
    """Greedy tokens, their logprobs and the prompt tokens read from the prefix cache, per request."""
    outs = llm.generate([r[0] for r in requests], [r[1] for r in requests],
                        lora_request=[r[2] for r in requests], use_tqdm=False)
    return [(list(o.outputs[0].token_ids),
             [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs, strict=True)],
             o.num_cached_tokens or 0) for o in outs]


def reference_logprobs(model, row: Row, tok, tokens: list[int], layers: int, heads: int,
                       moe: bool = False) -> torch.Tensor:
    """Teacher-forced HF eager logprobs of `tokens` after the row's prompt, with the row's steering applied from
    each family's own reference (`model`: attention_reference.load, plus experts_reference.install for MoE, or a
    PEFT model for a LoRA row)."""
    from steerserve.steering.iapt import SOFT_TOKENS, IaptModel, hf_soft_prompts

    ids = prompt_ids(tok, row)
    bias = attention_reference.reference_bias(row.attention, len(ids), layers, heads)
    mode = (row.attention or {}).get("mode")
    with torch.no_grad(), ExitStack() as stack:
        if row.vectors:
            stack.enter_context(steered(model, row.vectors, len(ids)))
        if row.iapt:
            stack.enter_context(hf_soft_prompts(model, IaptModel.load(Path(row.iapt)), [len(ids) - SOFT_TOKENS]))
        if moe:
            attention_reference._BIAS["bias"], attention_reference._MODE["mode"] = bias, mode
            lp = experts_reference.logprobs(model, ids, tokens, row.experts)
        else:
            lp = attention_reference.logprobs(model, ids, tokens, bias, mode)
    if row.logits:
        add = torch.zeros(lp.shape[-1], dtype=lp.dtype)
        add[list(row.logits[0])] = torch.tensor(row.logits[1], dtype=lp.dtype)
        lp = (lp + add).log_softmax(-1)
    return lp


def worst_error(label: str, ref: torch.Tensor, tokens: list[int], logprobs: list[float]) -> float:
    """max |d logprob| of the engine's greedy path against the reference; asserts the same greedy path."""
    assert ref[:-1].argmax(-1).tolist() == tokens, f"{label}: greedy path differs from the reference"
    return max(abs(lp - ref[i, t].item()) for i, (t, lp) in enumerate(zip(tokens, logprobs, strict=True)))
