"""Typed steering specs: the request field `steering` (and profile bodies) as pydantic models with builders.

Every family the server applies is modelled (`logits`, `attention`, `experts`, `prompt`, `vectors`). Names, types and bounds
mirror the server's `GET /v1/steering/schema` exactly (tests/clients check it against the live server), so a spec that validates
here is only ever refused by the server for model-specific reasons (e.g. a bias key that is not one token).
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

Delta = Annotated[float, Field(ge=-100.0, le=100.0)]
TokenMap = Annotated[dict[str, Delta], Field(max_length=1024)]
Preset = Literal["hewitt2024"]


class _Spec(BaseModel):
    # As the server: unknown fields and NaN/inf are errors, and a spec is a value (hashable, shareable).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    def to_json(self) -> dict[str, Any]:
        """The wire form: JSON types, unset (None) fields left out."""
        return self.model_dump(mode="json", exclude_none=True)


class EosRamp(_Spec):
    """An end-of-sequence bias growing linearly from 0 to `max` over `window` generated tokens, then held."""

    max: float = Field(ge=-100.0, le=100.0, description="Bias on the end-of-sequence token(s) once the ramp is full.")
    window: int = Field(ge=1, le=100_000, description="Generated tokens over which the bias grows from 0 to max; "
                                                       "it stays at max afterwards.")


class _RulesMeta(type(BaseModel)):
    # `Rules.preset("hewitt2024")` reads best, but `preset` is also a field. Pydantic keeps field values on the
    # instance and nothing on the class, so a class-level lookup falls through to here and an instance's
    # `rules.preset` still returns the field's value.
    def __getattr__(cls, name: str) -> Any:
        if name == "preset" and cls.__dict__.get("__pydantic_complete__"):
            def preset(name: Preset, **overrides: Any) -> Rules:
                """A preset, with any of its rules replaced by `overrides` (eos_ramp, token_deltas, diversity)."""
                return cls(preset=name, **overrides)
            return preset
        return super().__getattr__(name)


class Rules(_Spec, metaclass=_RulesMeta):
    """Rule-based instruction following (Hewitt et al. 2024): a preset, your own rules, or a preset you override.

    `Rules.preset("hewitt2024")`, `Rules(eos_ramp=EosRamp(max=8, window=60))`,
    `Rules.preset("hewitt2024", diversity=0.5)`.
    """

    preset: Preset | None = None
    eos_ramp: EosRamp | None = None
    token_deltas: TokenMap | None = Field(None, description="Constant bias per token (text or id), every step.")
    diversity: float | None = Field(None, ge=0.0, le=100.0, description="Subtracted from every distinct token "
                                                                         "already generated in this response.")

    @model_validator(mode="after")
    def _not_empty(self) -> Rules:
        if self.preset is None and self.eos_ramp is None and self.token_deltas is None and self.diversity is None:
            raise ValueError("give a preset or at least one of eos_ramp, token_deltas, diversity")
        return self


class Logits(_Spec):
    """Logits-level steering: a plain per-token bias and/or rules. Token keys are one token's text or its id."""

    bias: TokenMap | None = Field(None, description='Additive logit bias per token: {"<token text or id>": float}. '
                                                    "Keys of decimal digits are token ids; other keys are text that "
                                                    "must encode to exactly one token.")
    rules: Rules | None = None


Gain = Annotated[float, Field(gt=0.0, le=1e6)]
Indices = Literal["all"] | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=4096)]


class Sink(_Spec):
    """ZeroTuning: multiply the attention weight of key 0 (the first prompt token) by gamma in the chosen decoder
    layers and query heads, renormalising each row. `per_head={"<layer>.<head>": gamma}` overrides gamma per pair.
    `Sink(gamma=2.0, layers=[0, 1, 2])`."""

    gamma: Gain = Field(1.0, description="Multiplies the attention weight of key 0 (the first prompt token) in the "
                                         "selected layers and query heads; each row is renormalised.")
    layers: Indices = Field("all", description="Decoder layer indices, or 'all'.")
    heads: Indices = Field("all", description="Query head indices (not KV heads), or 'all'.")
    per_head: dict[str, Gain] = Field(default_factory=dict, max_length=65536,
                                      description='Gamma per "<layer>.<head>"; overrides gamma for that pair, '
                                                  "whether or not the pair is in layers x heads.")

    @field_validator("per_head")
    @classmethod
    def _pair_keys(cls, value: dict[str, float]) -> dict[str, float]:
        for key in value:
            layer, _, head = key.partition(".")
            if not (layer.isdigit() and head.isdigit()):
                raise ValueError(f'per_head key {key!r} is not "<layer>.<head>"')
        return value


class KeyRange(_Spec):
    """Prompt token indices [start, end)."""

    start: int = Field(ge=0, description="First prompt token index of the span.")
    end: int = Field(gt=0, description="One past the last prompt token index of the span.")

    @model_validator(mode="after")
    def _after_start(self) -> KeyRange:
        if self.end <= self.start:
            raise ValueError("end must be greater than start")
        return self


class Span(_Spec):
    """Context steering: prompt keys outside `target` get their attention weight multiplied by alpha.
    `Span(target="user", alpha=0.8)`, `Span(target=KeyRange(start=3, end=40), alpha=0.5, layers=[10, 11])`."""

    target: Literal["system", "user", "assistant"] | KeyRange = Field(
        description="The highlighted span: every message of a chat role (its content tokens), or a range of "
                    "prompt token indices. Prompt keys outside it are down-weighted.")
    alpha: float = Field(gt=0.0, le=1.0, description="Multiplies the attention weight of prompt keys outside the "
                                                      "target, in the selected layers and query heads.")
    layers: Indices = "all"
    heads: Indices = "all"


class AttentionMode(_Spec):
    """The attention function (docs/methods/attention-modes.md), experimental on models not trained with it:
    `AttentionMode(kind="lssar", power=15)`."""

    kind: Literal["softmax", "lssa", "lssar", "reweight"] = Field(
        description="The attention function (docs/methods/attention-modes.md): softmax; "
                    "lssa (L2-normalised q, k, scores scaled by "
                    "ln d * ln N_i, softplus, L1 normalisation); lssar (lssa, then re-weighting); reweight (the "
                    "re-weighting ReLU(N_i a_ij - o_i)^p on softmax weights). Experimental on models not trained "
                    "with it.")
    power: float = Field(15.0, ge=1.0, le=64.0, description="The re-weighting exponent p.")
    layers: Indices = "all"


class Attention(_Spec):
    """Attention steering: `Attention(sink=Sink(gamma=2.0))`, `Attention(spans=[Span(target="user", alpha=0.8)])`."""

    mode: AttentionMode | None = None
    sink: Sink | None = None
    spans: list[Span] | None = Field(None, min_length=1, max_length=16,
                                     description="Each entry biases the prompt keys outside its own target.")


class Urial(_Spec):
    """URIAL: the chat rendered as in-context alignment examples for a base model (chat completions only)."""

    variant: Annotated[str, Field(pattern="^[A-Za-z0-9_.-]{1,64}$")] = Field(
        "default", description="The prefix: 'default', 'help' (no refusal example) or a prefix an admin registered.")
    examples: StrictInt | None = Field(None, ge=0, le=64, description="Keep only the prefix's first K examples "
                                                                      "(default: all of them).")


# Targets of conjugate prompting: language codes (translated by a model), then the two deterministic transforms.
Language = Literal["ar", "bn", "cs", "da", "de", "el", "es", "fi", "fr", "he", "hi", "hu", "id", "it", "ja", "ko", "ml",
                   "nl", "no", "pl", "pt", "ro", "ru", "sv", "sw", "th", "tr", "uk", "vi", "zh", "leetspeak", "piglatin"]


class Conjugate(_Spec):
    """Conjugate prompting: translate the prompt, generate, translate back. Needs the tenant's admin switch."""

    language: Language = Field(description="A language code (e.g. 'fr', 'ja', 'sw') or 'leetspeak' / 'piglatin'.")
    translator: str = Field("self", min_length=1, max_length=256,
                            description="The model that translates: 'self' (the served model) or a served model's name.")
    translate_back: StrictBool = Field(True, description="Translate the answer back into English.")


class Prompt(_Spec):
    """Prompt-level methods, e.g. `Prompt(urial=Urial(variant="help"))`."""

    urial: Urial | None = None
    conjugate: Conjugate | None = None


Pairs = Annotated[list[str], Field(max_length=65536)]
_PAIR = re.compile(r"^(\d{1,6})\.(\d{1,6})$")


class Experts(_Spec):
    """MoE expert steering: `Experts(off=["3.17"])` switches expert 17 of decoder layer 3 off (the next best
    expert takes its slot), `Experts(on=["3.5"], on_mode="dominant", scope="generation")` forces one on.
    Layers are decoder layer indices, not indices among MoE layers."""

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


Direction = Annotated[list[float], Field(min_length=1, max_length=65536)]


class VectorItem(_Spec):
    """One control vector: `VectorItem(name="calm", scale=4.0, layers=[8, 9, 10])` (a stored vector) or
    `VectorItem(data={"12": [...hidden_size floats]}, mode="ablate")` (inline, at most 8 layers). Layer l acts on
    the residual stream at the output of decoder layer l (llama.cpp's `direction.l`)."""

    name: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$",
                             description="A vector in the vector store (GET /v1/steering/vectors).")
    data: dict[str, Direction] | None = Field(
        None, min_length=1, max_length=8,
        description='Inline directions, {"<decoder layer>": [hidden_size floats]}, at most 8 layers; layer l acts '
                    "on the residual stream at the output of decoder layer l (llama.cpp's direction.l).")
    scale: float | None = Field(None, ge=-1e4, le=1e4, description="add: the multiplier of each direction "
                                "(default 1); ablate: absent or 1.")
    layers: Literal["all"] | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=1024)] \
        | None = Field(None, description='Decoder layers to steer (0-based); default or "all": every layer the '
                                         "vector has. A layer the vector lacks is an error.")
    tokens: Literal["all", "prompt", "generated"] | None = Field(
        None, description="all (default): every token; prompt: prompt tokens only; generated: generated tokens only.")
    mode: Literal["add", "ablate"] | None = Field(
        None, description="add (default): h + scale * v; ablate: h - (h . u) u with u = v / |v|.")
    normalize: bool | None = Field(None, description="add: scale each layer's direction to unit length first "
                                                     "(default false).")

    @model_validator(mode="after")
    def _one_source(self) -> VectorItem:
        if (self.name is None) == (self.data is None):
            raise ValueError("give exactly one of name (a stored vector) and data (inline directions)")
        if self.mode == "ablate" and self.scale not in (None, 1.0):
            raise ValueError("ablate removes the direction's component: scale must be absent or 1")
        return self


class Steering(_Spec):
    """A request's steering, e.g. `Steering(logits=Logits(bias={" Paris": 2.0}, rules=Rules.preset("hewitt2024")))`.

    Sent as the body field `steering`; also the body of a profile.
    """

    # Sent on the wire, so a future server that changes the spec's meaning can tell what this client meant.
    version: Literal[1] = 1
    logits: Logits | None = None
    attention: Attention | None = None
    experts: Experts | None = None
    prompt: Prompt | None = None
    vectors: Annotated[list[VectorItem], Field(max_length=16)] | None = None
