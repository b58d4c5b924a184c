"""Attention steering: ZeroTuning's head-wise sink scaling and context span steering
(docs/methods/attention-sink-and-spans.md).

Both are additive log-biases on chosen keys, per (decoder layer, query head):
    sink:  s[l, h, i, 0] += ln gamma[l, h]                         (key 0 = the first prompt token)
    spans: s[l, h, i, j] += ln alpha  for prompt keys j outside the target span, in the selected layers/heads
equivalently, those keys' softmax weights are multiplied by gamma (alpha) and each row renormalised. Query heads,
not KV heads: under GQA several query heads share a KV head, and each is steered on its own.

`mode` swaps the attention function itself (LSSA / LSSAR / re-weighting, docs/methods/attention-modes.md).
With a mode, sink and span gains multiply the unnormalised weights (softplus(s) for lssa/lssar, exp(s) for
softmax/reweight) before the L1 normalisation and before any re-weighting; for softmax that is exactly the
additive log-bias above.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Annotated, Literal

from pydantic import Field, field_validator

from .model import ModelFacts, SpecError
from .plan import AttentionPlan, SpanBias
from .schema import Strict

Gain = Annotated[float, Field(gt=0.0, le=1e6)]
Indices = Literal["all"] | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=4096)]
ROLES = ("system", "user", "assistant")


class SinkSpec(Strict):
    gamma: Gain = Field(1.0, description="Multiplies the attention weight of key 0 (the first prompt token) in the "
                                         "selected layers and query heads; each row is renormalised.")
    layers: Indices = Field("all", description="Decoder layer indices, or 'all'.")
    heads: Indices = Field("all", description="Query head indices (not KV heads), or 'all'.")
    # `{}` rather than a default factory, so the published schema says the default (the SDK is generated from it).
    per_head: dict[str, Gain] = Field({}, max_length=65536,
                                      description='Gamma per "<layer>.<head>"; overrides gamma for that pair, '
                                                  "whether or not the pair is in layers x heads.")

    @field_validator("per_head")
    @classmethod
    def _pair_keys(cls, value: dict[str, float]) -> dict[str, float]:
        for key in value:
            if not _pair(key):
                raise ValueError(f'per_head key {key!r} is not "<layer>.<head>"')
        return value


class KeyRange(Strict):
    start: int = Field(ge=0, description="First prompt token index of the span.")
    end: int = Field(gt=0, description="One past the last prompt token index of the span.")

    @field_validator("end")
    @classmethod
    def _after_start(cls, end: int, info) -> int:
        if "start" in info.data and end <= info.data["start"]:
            raise ValueError("end must be greater than start")
        return end


class SpanSpec(Strict):
    target: Literal["system", "user", "assistant"] | KeyRange = Field(
        description="The highlighted span: every message of a chat role (its content tokens), or a range of "
                    "prompt token indices. Prompt keys outside it are down-weighted.")
    alpha: float = Field(gt=0.0, le=1.0, description="Multiplies the attention weight of prompt keys outside the "
                                                      "target, in the selected layers and query heads.")
    layers: Indices = "all"
    heads: Indices = "all"


class ModeSpec(Strict):
    kind: Literal["softmax", "lssa", "lssar", "reweight"] = Field(
        description="The attention function (docs/methods/attention-modes.md): softmax; "
                    "lssa (L2-normalised q, k, scores scaled by "
                    "ln d * ln N_i, softplus, L1 normalisation); lssar (lssa, then re-weighting); reweight (the "
                    "re-weighting ReLU(N_i a_ij - o_i)^p on softmax weights). Experimental on models not trained "
                    "with it.")
    power: float = Field(15.0, ge=1.0, le=64.0, description="The re-weighting exponent p.")
    layers: Indices = "all"


class AttentionSpec(Strict):
    mode: ModeSpec | None = None
    sink: SinkSpec | None = None
    spans: list[SpanSpec] | None = Field(None, min_length=1, max_length=16,
                                         description="Each entry biases the prompt keys outside its own target.")


def _pair(key: str) -> tuple[int, int] | None:
    layer, _, head = key.partition(".")
    return (int(layer), int(head)) if layer.isdigit() and head.isdigit() else None


def _select(value: Literal["all"] | list[int], size: int, field: str, what: str) -> list[int]:
    if value == "all":
        return list(range(size))
    bad = [i for i in value if i >= size]
    if bad:
        raise SpecError(field, f"{what} {bad[0]} is out of range: this model has {size} {what}s (0..{size - 1})")
    return sorted(set(value))


def sink_log_gains(spec: SinkSpec, model: ModelFacts, field: str) -> list[float]:
    """The dense row-major [layers x heads] table of ln gamma."""
    L, H = model.num_layers, model.num_heads
    table = [0.0] * (L * H)
    for layer in _select(spec.layers, L, f"{field}.layers", "layer"):
        for head in _select(spec.heads, H, f"{field}.heads", "head"):
            table[layer * H + head] = math.log(spec.gamma)
    for key, gamma in spec.per_head.items():
        layer, head = _pair(key)  # type: ignore[misc]  # the validator checked the shape
        if layer >= L or head >= H:
            raise SpecError(f"{field}.per_head.{key}", f"no such (layer, head): this model has {L} layers of "
                                                       f"{H} query heads")
        table[layer * H + head] = math.log(gamma)
    return table


def compile_attention(spec: AttentionSpec, model: ModelFacts, field: str = "attention") -> AttentionPlan:
    """The plan, with chat-role span targets still unresolved (see `bind_spans`): spans carry no targets yet."""
    gains = sink_log_gains(spec.sink, model, f"{field}.sink") if spec.sink else []
    spans = []
    for k, sp in enumerate(spec.spans or ()):
        where = f"{field}.spans.{k}"
        layers = _select(sp.layers, model.num_layers, f"{where}.layers", "layer")
        heads = _select(sp.heads, model.num_heads, f"{where}.heads", "head")
        spans.append(SpanBias((), math.log(sp.alpha), tuple(layers), tuple(heads)))
    mode, power, mode_layers = "softmax", 15.0, ()
    if spec.mode is not None and spec.mode.kind != "softmax":
        mode, power = spec.mode.kind, spec.mode.power
        mode_layers = tuple(_select(spec.mode.layers, model.num_layers, f"{field}.mode.layers", "layer"))
    return AttentionPlan(tuple(gains) if any(gains) else (), tuple(spans), mode, power, mode_layers)


def bind_spans(spec: AttentionSpec, plan: AttentionPlan, prompt_lens: Sequence[int],
               role_spans: dict[str, list[tuple[int, int]]] | None, field: str = "steering.attention") -> AttentionPlan:
    """Resolve each span's target against the actual prompt(s): chat roles through `role_spans` (token ranges of
    each message's content, from the rendered chat template; None outside chat), explicit ranges clipped to each
    prompt. A target that covers no token of some prompt is an error."""
    if not spec.spans:
        return plan
    bound = []
    for k, (sp, bias) in enumerate(zip(spec.spans, plan.spans, strict=True)):
        where = f"{field}.spans.{k}.target"
        if isinstance(sp.target, str):
            if role_spans is None:
                raise SpecError(where, f"a chat-role target ({sp.target!r}) needs /v1/chat/completions; "
                                       "give a {start, end} token range for completions")
            targets = tuple(r for r in role_spans.get(sp.target, []) if r[1] > r[0])
            if not targets:
                raise SpecError(where, f"the prompt has no {sp.target} message content to highlight")
        else:
            shortest = min(prompt_lens)
            if sp.target.start >= shortest:
                raise SpecError(where, f"range [{sp.target.start}, {sp.target.end}) matches no token of a "
                                       f"{shortest}-token prompt")
            targets = ((sp.target.start, sp.target.end),)
        bound.append(SpanBias(targets, bias.log_alpha, bias.layers, bias.heads))
    return replace(plan, spans=tuple(bound))
