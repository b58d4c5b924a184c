"""Logits-level steering: plain per-token bias and the rule-based instruction-following adapter (Hewitt et al.
2024, docs/methods/logits.md). Spec, the Hewitt preset, and compilation into a `LogitsPlan`."""
from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, model_validator

from .model import ModelFacts, SpecError
from .plan import EosRamp, LogitsPlan
from .schema import Strict

Delta = Annotated[float, Field(ge=-100.0, le=100.0)]
TokenMap = Annotated[dict[str, Delta], Field(max_length=1024)]


class EosRampSpec(Strict):
    max: float = Field(ge=-100.0, le=100.0, description="Bias on the end-of-sequence token(s) once the ramp is full.")
    window: int = Field(ge=1, le=100_000, description="Generated tokens over which the bias grows from 0 to max; "
                                                       "it stays at max afterwards.")


class RulesSpec(Strict):
    """Either a preset, or your own rules, or a preset whose fields you override."""

    preset: Literal["hewitt2024"] | None = None
    eos_ramp: EosRampSpec | None = None
    token_deltas: TokenMap | None = Field(None, description="Constant bias per token (text or id), every step.")
    diversity: float | None = Field(None, ge=0.0, le=100.0, description="Subtracted from every distinct token "
                                                                         "already generated in this response.")

    @model_validator(mode="after")
    def _not_empty(self) -> RulesSpec:
        if self.preset is None and self.eos_ramp is None and self.token_deltas is None and self.diversity is None:
            raise ValueError("give a preset or at least one of eos_ramp, token_deltas, diversity")
        return self


class LogitsSpec(Strict):
    bias: TokenMap | None = Field(None, description='Additive logit bias per token: {"<token text or id>": float}. '
                                                    "Keys of decimal digits are token ids; other keys are text that "
                                                    "must encode to exactly one token.")
    rules: RulesSpec | None = None


# Hewitt et al.'s 15 uniform token deltas, written as text (Llama-2's "▁" is a leading space). Each maps onto
# the served tokenizer by its text; pieces that are not one token there are left out (see `hewitt_deltas`).
HEWITT_TOKEN_DELTAS: tuple[tuple[str, float], ...] = (
    ("<", -4), (" <", -4), ("|", -4), (" I", -5), ("I", -5), (" We", -3), ("What", -5), (" should", -6),
    (" *", 1), (" -", 1), ("   ", 1), (" #", 1), (" ##", 1), ("\n", 1), ("!", 1),
)
HEWITT_EOS_RAMP = EosRampSpec(max=15.0, window=250)
HEWITT_DIVERSITY = 1.5


def hewitt_deltas(model: ModelFacts) -> tuple[dict[int, float], list[str]]:
    """The preset's token deltas on this tokenizer, and the pieces that had no single-token equivalent."""
    mapped: dict[int, float] = {}
    missing: list[str] = []
    for text, delta in HEWITT_TOKEN_DELTAS:
        token = model.single_token(text)
        if token is None:
            missing.append(text)
        else:
            mapped[token] = mapped.get(token, 0.0) + delta
    return mapped, missing


def compile_logits(spec: LogitsSpec, model: ModelFacts, field: str = "logits") -> LogitsPlan:
    bias: dict[int, float] = {}

    def add(table: dict[str, float], where: str) -> None:
        for key, value in table.items():
            token = _token_id(key, model, f"{where}.{key}")
            bias[token] = bias.get(token, 0.0) + value

    if spec.bias:
        add(spec.bias, f"{field}.bias")
    ramp, diversity = None, 0.0
    if (r := spec.rules) is not None:
        preset = r.preset == "hewitt2024"  # a preset supplies each rule the spec does not give itself
        if r.token_deltas is not None:
            add(r.token_deltas, f"{field}.rules.token_deltas")
        elif preset:
            for token, delta in hewitt_deltas(model)[0].items():
                bias[token] = bias.get(token, 0.0) + delta
        ramp_spec = r.eos_ramp or (HEWITT_EOS_RAMP if preset else None)
        diversity = r.diversity if r.diversity is not None else (HEWITT_DIVERSITY if preset else 0.0)
        if ramp_spec is not None:
            if not model.eos_token_ids:
                raise SpecError(f"{field}.rules.eos_ramp", "the served model has no end-of-sequence token")
            ramp = EosRamp(tuple(model.eos_token_ids), ramp_spec.max, ramp_spec.window)
    nonzero = {t: v for t, v in sorted(bias.items()) if v != 0.0}
    return LogitsPlan(tuple(nonzero), tuple(nonzero.values()), ramp, diversity)


def _token_id(key: str, model: ModelFacts, field: str) -> int:
    if re.fullmatch(r"\d+", key):
        token = int(key)
        if token >= model.vocab_size:
            raise SpecError(field, f"token id {token} is outside the vocabulary [0, {model.vocab_size})")
        return token
    token = model.single_token(key)
    if token is None:
        pieces = model.tokenizer.encode(key, add_special_tokens=False)
        raise SpecError(field, f"{key!r} is {len(pieces)} tokens in this model's tokenizer, not exactly one; "
                               "give one token's text or a token id")
    return token
