"""The independent reference for expert steering: HF transformers' MoE models with each router's forward replaced by
the routing and the masks written out plainly, token by token, from the definitions (steering/experts.py docstring,
issue #6). Never imports the server's routing code."""
from __future__ import annotations

import math

import torch

BIG = 1e6  # how far a forced (switched-off) expert's selection score is raised (lowered)


def experts_of(spec: dict | None, layer: int) -> tuple[set[int], set[int]]:
    def pick(key):
        return {int(p.split(".")[1]) for p in (spec or {}).get(key, []) if int(p.split(".")[0]) == layer}

    return pick("off"), pick("on")


def route_token(logits: list[float], *, top_k: int, scoring: str, renormalize: bool, bias: list[float] | None,
                groups: int | None, topk_groups: int | None, scaling: float, off: set[int], on: set[int],
                drop: bool, dominant: bool) -> list[tuple[int, float]]:
    """[(expert, weight)] for one token, as the issue defines it."""
    E = len(logits)
    if scoring == "softmax":
        top = max(logits)
        z = sum(math.exp(x - top) for x in logits)
        score = [math.exp(x - top) / z for x in logits]
    else:
        score = [1 / (1 + math.exp(-x)) for x in logits]
    choice = [score[e] + (bias[e] if bias else 0.0) for e in range(E)]
    for e in range(E):  # substitute: a switched-off expert cannot be chosen; on: it always is
        if e in on:
            choice[e] += BIG
        if e in off and not drop:
            choice[e] -= BIG
    allowed = list(range(E))
    if groups:
        size = E // groups
        members = [list(range(g * size, (g + 1) * size)) for g in range(groups)]
        if bias:  # DeepSeek-V3: a group scores the sum of its best two
            rank = [sum(sorted((choice[e] for e in m), reverse=True)[:2]) for m in members]
        else:
            rank = [max(choice[e] for e in m) for m in members]
        best = sorted(range(groups), key=lambda g: -rank[g])[:topk_groups]
        kept = [e for g in best for e in members[g]]
        allowed = kept + [e for e in on if e not in kept]  # forced experts are chosen whatever their group
    chosen = sorted(allowed, key=lambda e: -choice[e])[:top_k]
    weight = {e: score[e] for e in chosen}
    if renormalize:
        total = sum(weight.values())
        weight = {e: w / total for e, w in weight.items()}
    if drop and any(e in off for e in chosen):  # drop: zero it, renormalise the rest as the router does
        weight = {e: (0.0 if e in off else w) for e, w in weight.items()}
        total = sum(weight.values())
        if renormalize and total > 0:
            weight = {e: w / total for e, w in weight.items()}
    forced = [e for e in chosen if e in on]
    if dominant and forced:  # the forced experts take the whole routed weight, in proportion to their own
        total, mine = sum(weight.values()), sum(weight[e] for e in forced)
        weight = {e: (weight[e] / mine * total if e in forced else 0.0) for e in chosen}
    return [(e, weight[e] * scaling) for e in chosen]


def install(model, kind: str) -> None:
    """Replace every MoE router's forward in a HF model with `route_token`, reading the current spec from
    `STATE`. `STATE["steered"]` is a [tokens] bool mask of the sequence being run (scope)."""
    cfg = model.config
    for idx, layer in enumerate(model.model.layers):
        gate = getattr(getattr(layer, "mlp", None), "gate", None) or getattr(
            getattr(layer, "block_sparse_moe", None), "gate", None)
        if gate is None or not hasattr(gate, "weight") or gate.weight.shape[0] < 2:
            continue
        params = dict(top_k=cfg.num_experts_per_tok, scoring="softmax", renormalize=True, bias=None, groups=None,
                      topk_groups=None, scaling=1.0)
        if kind == "qwen3_moe":
            params["renormalize"] = cfg.norm_topk_prob
        if kind in ("deepseek_v3", "glm4_moe"):
            params.update(scoring="sigmoid", renormalize=cfg.norm_topk_prob, groups=cfg.n_group,
                          topk_groups=cfg.topk_group, scaling=cfg.routed_scaling_factor,
                          bias=gate.e_score_correction_bias.tolist())
        gate.forward = _router(gate, idx, params)


STATE: dict = {"spec": None, "steered": None}


def _router(gate, layer: int, params: dict):
    def forward(hidden_states):
        h = hidden_states.reshape(-1, gate.weight.shape[1])
        logits = torch.nn.functional.linear(h.double(), gate.weight.double())
        spec = STATE["spec"]
        off, on = experts_of(spec, layer)
        drop = (spec or {}).get("off_mode") == "drop"
        dominant = (spec or {}).get("on_mode") == "dominant"
        ids, weights = [], []
        for t, row in enumerate(logits.tolist()):
            steered = bool(STATE["steered"][t])
            routed = route_token(row, **params, off=off if steered else set(), on=on if steered else set(),
                                 drop=drop, dominant=dominant)
            ids.append([e for e, _ in routed])
            weights.append([w for _, w in routed])
        return logits.float(), torch.tensor(weights, dtype=h.dtype), torch.tensor(ids)

    return forward


def load(path, kind: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    install(model, kind)
    return model


def logprobs(model, prompt_ids: list[int], generated: list[int], spec: dict | None) -> torch.Tensor:
    """Teacher-forced next-token logprobs after the prompt and after each generated token, with expert steering."""
    n = len(prompt_ids) + len(generated)
    steered = torch.ones(n, dtype=torch.bool)
    if (spec or {}).get("scope") == "generation":
        steered[: len(prompt_ids)] = False  # only tokens at positions >= the prompt length
    STATE.update(spec=spec, steered=steered)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + generated])).logits[0, len(prompt_ids) - 1:]
    return logits.double().log_softmax(-1)
