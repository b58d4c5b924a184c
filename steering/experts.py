"""MoE expert steering (MoTE, docs/methods/experts.md): switch chosen (decoder layer, expert) pairs off or on, per request.

Semantics, per token and MoE layer, on the router's own scores (softmax or sigmoid of the gate logits, plus the
correction bias of DeepSeek-V3-style routers for *selection* only):
    off, substitute (default)  the expert cannot be selected: the next best expert takes its slot.
    off, drop                  normal top-k; then the expert's weight is zeroed and, if the router renormalises
                               its top-k weights, the rest are renormalised (all experts dropped: weight 0).
    on, natural (default)      always selected; weighted as the router weighs it among the selected experts.
    on, dominant               always selected, and the forced expert(s) take the token's whole routed weight
                               (the sum the router gives the selected set), split in proportion to their natural
                               weights; the other selected experts get weight 0.
Masks act on the selection scores (after the correction bias): an expert switched off scores -1e6 and one forced
on +1e6, so a switched-off expert is never chosen while at least top-k experts remain. Grouped top-k
(DeepSeek-V3) ranks groups by these masked scores too (the sum of a group's best two), so a forced expert's group
is kept first, and a forced expert is selected even if its group is not among the kept ones (more forced groups
than `topk_group`); in a group of two, one switched-off member sinks the group.
`scope`: "all" steers every token, "generation" only tokens at positions >= the prompt length (generated ones).

Layer indices are **decoder layer** indices of the model, not indices among its MoE layers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, field_validator

from .model import ModelFacts, SpecError
from .plan import ExpertsPlan
from .schema import Strict

_PAIR = re.compile(r"^(\d{1,6})\.(\d{1,6})$")
Pairs = Annotated[list[str], Field(max_length=65536)]
# Added to (on) or subtracted from (off) the selection scores, in fp64: finite, so group sums never see inf - inf,
# and far above any score (probabilities plus a correction bias) while keeping their order exactly.
SELECT_BIG = 1e6


class ExpertsSpec(Strict):
    off: Pairs | None = Field(None, description='Experts switched off, each "<layer>.<expert>" with <layer> the '
                                                "decoder layer index (not the index among MoE layers).")
    on: Pairs | None = Field(None, description='Experts forced on, each "<layer>.<expert>" (decoder layer index); '
                                               "at most top-k per layer.")
    off_mode: Literal["substitute", "drop"] | None = Field(
        None, description="substitute (default): the next best expert takes the slot; drop: normal top-k, then the "
                          "expert's weight is zeroed and the rest renormalised as the router does.")
    on_mode: Literal["natural", "dominant"] | None = Field(
        None, description="natural (default): weighted as the router weighs it; dominant: it takes all the weight.")
    scope: Literal["all", "generation"] | None = Field(
        None, description="all (default): every token; generation: only generated tokens.")

    @field_validator("off", "on")
    @classmethod
    def _pairs(cls, value: list[str] | None) -> list[str] | None:
        for key in value or ():
            if not _PAIR.match(key):
                raise ValueError(f'{key!r} is not "<layer>.<expert>" (decoder layer index, expert index)')
        return value


@dataclass(frozen=True)
class MoeLayout:
    """Where a model's routed experts are, read from its HF config."""

    layers: tuple[int, ...]  # decoder layers with routed experts
    num_experts: int
    top_k: int
    router: str  # "softmax_topk", "grouped_sigmoid_bias", ...


def moe_layout(hf: Any) -> MoeLayout | None:
    """The MoE layout of a HF text config, or None for a dense model (Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3)."""
    n_layers = hf.num_hidden_layers
    k = getattr(hf, "num_experts_per_tok", None)
    if getattr(hf, "num_experts", None) and hasattr(hf, "decoder_sparse_step"):  # Qwen2/3-MoE
        step, dense = getattr(hf, "decoder_sparse_step", 1), set(getattr(hf, "mlp_only_layers", []) or [])
        layers = tuple(i for i in range(n_layers) if i not in dense and (i + 1) % step == 0)
        return MoeLayout(layers, hf.num_experts, k, "softmax_topk")
    if getattr(hf, "n_routed_experts", None):  # DeepSeek-V2/V3, GLM-4.5 (always sigmoid with a correction bias)
        first, freq = getattr(hf, "first_k_dense_replace", 0), getattr(hf, "moe_layer_freq", 1)
        layers = tuple(i for i in range(n_layers) if i >= first and i % freq == 0)
        glm = getattr(hf, "model_type", "") == "glm4_moe"
        bias = "_bias" if glm or getattr(hf, "topk_method", "") == "noaux_tc" else ""
        scoring = "sigmoid" if glm else getattr(hf, "scoring_func", "softmax")
        router = f"grouped_{scoring}{bias}"  # vLLM always routes them grouped
        return MoeLayout(layers, hf.n_routed_experts, k, router)
    if getattr(hf, "num_local_experts", None):  # Mixtral
        return MoeLayout(tuple(range(n_layers)), hf.num_local_experts, k, "softmax_topk")
    return None


def _parse(keys: list[str] | None) -> list[tuple[int, int]]:
    return [(int(m[1]), int(m[2])) for m in (_PAIR.match(k) for k in keys or ()) if m]


def compile_experts(spec: ExpertsSpec, model: ModelFacts, field: str = "experts") -> ExpertsPlan:
    if not model.moe_layers:
        raise SpecError(field, "this model has no routed experts (a dense model): expert steering needs a MoE model")
    E, k = model.num_experts, model.experts_top_k
    moe = set(model.moe_layers)
    pairs = {}
    for name in ("off", "on"):
        got = _parse(getattr(spec, name))
        for idx, (layer, expert) in enumerate(got):
            where = f"{field}.{name}.{idx}"
            if layer not in moe:
                raise SpecError(where, f"decoder layer {layer} has no routed experts (layers are decoder layer "
                                       f"indices, not indices among MoE layers; MoE layers here: "
                                       f"{_ranges(model.moe_layers)})")
            if expert >= E:
                raise SpecError(where, f"expert {expert} is out of range: layer {layer} has {E} experts "
                                       f"(0..{E - 1})")
        pairs[name] = sorted(set(got))
    both = set(pairs["off"]) & set(pairs["on"])
    if both:
        layer, expert = min(both)
        raise SpecError(f"{field}.on", f'expert "{layer}.{expert}" is both on and off')
    for layer in moe:
        n_on = sum(1 for lay, _ in pairs["on"] if lay == layer)
        if n_on > k:
            raise SpecError(f"{field}.on", f"{n_on} experts forced on in layer {layer}, but the router selects "
                                           f"only {k} per token")
        n_off = sum(1 for lay, _ in pairs["off"] if lay == layer)
        if spec.off_mode != "drop" and n_off > E - k:
            raise SpecError(f"{field}.off", f"{n_off} experts off in layer {layer} leave fewer than the {k} the "
                                            f"router must select (of {E}); use off_mode 'drop' to zero them")
    return ExpertsPlan(off=tuple(pairs["off"]), on=tuple(pairs["on"]), off_drop=spec.off_mode == "drop",
                       on_dominant=spec.on_mode == "dominant", generation_only=spec.scope == "generation")


def _ranges(layers: tuple[int, ...]) -> str:
    if layers == tuple(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return ", ".join(map(str, layers))


# ---- the routing math, run in the engine for steered tokens (server/engine/router_hook.py) ----

@dataclass(frozen=True)
class RouterConfig:
    """What a router computes, read off vLLM's router object."""

    top_k: int
    renormalize: bool
    scoring: str  # "softmax" | "sigmoid"
    correction_bias: torch.Tensor | None
    num_groups: int | None  # grouped top-k, else None
    topk_groups: int | None
    scaling: float


def steered_routing(logits: torch.Tensor, cfg: RouterConfig, off: torch.Tensor, on: torch.Tensor,
                    drop: torch.Tensor, dominant: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [n, k] fp32, ids [n, k] int32) for n tokens. `off`, `on`: [n, E] bool masks; `drop`, `dominant`:
    [n] bool, the row's off_mode == drop and on_mode == dominant."""
    logits = logits.float()
    scores = logits.softmax(-1) if cfg.scoring == "softmax" else logits.sigmoid()
    select = scores if cfg.correction_bias is None else scores + cfg.correction_bias.float()[None, :]
    select = select.double() + on.double() * SELECT_BIG - (off & ~drop[:, None]).double() * SELECT_BIG
    if cfg.num_groups:
        n, E = select.shape
        grouped = select.view(n, cfg.num_groups, E // cfg.num_groups)
        group_scores = (grouped.topk(2, dim=-1)[0].sum(-1) if cfg.correction_bias is not None
                        else grouped.max(-1).values)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(cfg.topk_groups, dim=-1)[1], True)
        # a forced expert is selected even outside the kept groups
        select = select.masked_fill(~keep.repeat_interleave(E // cfg.num_groups, dim=1) & ~on, float("-inf"))
    ids = select.topk(cfg.top_k, dim=-1)[1]
    weights = scores.gather(1, ids)
    if cfg.renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    dropped = off.gather(1, ids) & drop[:, None]
    if dropped.any():
        weights = weights.masked_fill(dropped, 0.0)
        if cfg.renormalize:
            total = weights.sum(-1, keepdim=True)
            weights = torch.where(total > 0, weights / total.clamp_min(1e-30), weights)
    forced = on.gather(1, ids) & dominant[:, None]
    if forced.any():
        mine = (weights * forced).sum(-1, keepdim=True)
        share = torch.where(mine > 0, weights / mine.clamp_min(1e-30), forced.float() / forced.sum(-1, True).clamp_min(1))
        dominated = torch.where(forced, share * weights.sum(-1, keepdim=True), torch.zeros_like(weights))
        weights = torch.where(forced.any(-1, keepdim=True), dominated, weights)
    return weights * cfg.scaling, ids.to(torch.int32)
