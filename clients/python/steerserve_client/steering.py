"""Typed steering specs: the request field `steering` (and profile bodies) as pydantic models with builders.

The models are generated from the server's steering schema (`_spec.py`, `make sdk-types`), so every family
and field the server accepts is here, with its types and bounds: a spec that validates here is only ever
refused by the server for model-specific reasons (e.g. a bias key that is not one token). This module is the
thin hand-written layer over them: the public names (`Logits` for the generated `LogitsSpec`, ...), builders
such as `Rules.preset(...)`, docstrings with examples, and the checks a JSON schema cannot express (a range's
end after its start, "<layer>.<head>" keys, ...). A family with no class here (a method newer than this layer)
still works after regeneration: `Steering(<family>={...})` validates against its generated models.
"""
from __future__ import annotations

import re
from typing import Any

from pydantic import field_validator, model_validator

from . import _spec


class EosRamp(_spec.EosRampSpec):
    """An end-of-sequence bias growing linearly from 0 to `max` over `window` generated tokens, then held."""


class _RulesMeta(type(_spec.RulesSpec)):
    # `Rules.preset("hewitt2024")` reads best, but `preset` is also a field. Pydantic keeps field values on the
    # instance and nothing on the class, so a class-level lookup falls through to here and an instance's
    # `rules.preset` still returns the field's value.
    def __getattr__(cls, name: str) -> Any:
        if name == "preset" and cls.__dict__.get("__pydantic_complete__"):
            def preset(name: str, **overrides: Any) -> Rules:
                """A preset, with any of its rules replaced by `overrides` (eos_ramp, token_deltas, diversity)."""
                return cls(preset=name, **overrides)
            return preset
        return super().__getattr__(name)


class Rules(_spec.RulesSpec, metaclass=_RulesMeta):
    """Rule-based instruction following (Hewitt et al. 2024): a preset, your own rules, or a preset you override.

    `Rules.preset("hewitt2024")`, `Rules(eos_ramp=EosRamp(max=8, window=60))`,
    `Rules.preset("hewitt2024", diversity=0.5)`.
    """

    @model_validator(mode="after")
    def _not_empty(self) -> Rules:
        if self.preset is None and self.eos_ramp is None and self.token_deltas is None and self.diversity is None:
            raise ValueError("give a preset or at least one of eos_ramp, token_deltas, diversity")
        return self


class Logits(_spec.LogitsSpec):
    """Logits-level steering: a plain per-token bias and/or rules. Token keys are one token's text or its id."""


class Sink(_spec.SinkSpec):
    """ZeroTuning: multiply the attention weight of key 0 (the first prompt token) by gamma in the chosen decoder
    layers and query heads, renormalising each row. `per_head={"<layer>.<head>": gamma}` overrides gamma per pair.
    `Sink(gamma=2.0, layers=[0, 1, 2])`."""

    @field_validator("per_head")
    @classmethod
    def _pair_keys(cls, value: dict[str, float]) -> dict[str, float]:
        for key in value:
            layer, _, head = key.partition(".")
            if not (layer.isdigit() and head.isdigit()):
                raise ValueError(f'per_head key {key!r} is not "<layer>.<head>"')
        return value


class KeyRange(_spec.KeyRange):
    """Prompt token indices [start, end)."""

    @model_validator(mode="after")
    def _after_start(self) -> KeyRange:
        if self.end <= self.start:
            raise ValueError("end must be greater than start")
        return self


class Span(_spec.SpanSpec):
    """Context steering: prompt keys outside `target` get their attention weight multiplied by alpha.
    `Span(target="user", alpha=0.8)`, `Span(target=KeyRange(start=3, end=40), alpha=0.5, layers=[10, 11])`."""


class AttentionMode(_spec.ModeSpec):
    """The attention function (docs/methods/attention-modes.md), experimental on models not trained with it:
    `AttentionMode(kind="lssar", power=15)`."""


class Attention(_spec.AttentionSpec):
    """Attention steering: `Attention(sink=Sink(gamma=2.0))`, `Attention(spans=[Span(target="user", alpha=0.8)])`."""


class Urial(_spec.UrialSpec):
    """URIAL: the chat rendered as in-context alignment examples for a base model (chat completions only)."""

    @field_validator("examples", mode="before")
    @classmethod
    def _whole_number(cls, value: Any) -> Any:
        # The server takes only a JSON integer here (StrictInt), which a schema cannot say.
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError("must be an integer")
        return value


class Conjugate(_spec.ConjugateSpec):
    """Conjugate prompting: translate the prompt, generate, translate back. Needs the tenant's admin switch."""


class Prompt(_spec.PromptSpec):
    """Prompt-level methods, e.g. `Prompt(urial=Urial(variant="help"))`."""


_PAIR = re.compile(r"^(\d{1,6})\.(\d{1,6})$")


class Experts(_spec.ExpertsSpec):
    """MoE expert steering: `Experts(off=["3.17"])` switches expert 17 of decoder layer 3 off (the next best
    expert takes its slot), `Experts(on=["3.5"], on_mode="dominant", scope="generation")` forces one on.
    Layers are decoder layer indices, not indices among MoE layers."""

    @field_validator("off", "on")
    @classmethod
    def _pairs(cls, value: list[str] | None) -> list[str] | None:
        for key in value or ():
            if not _PAIR.match(key):
                raise ValueError(f'{key!r} is not "<layer>.<expert>" (decoder layer index, expert index)')
        return value


class VectorItem(_spec.VectorItem):
    """One control vector: `VectorItem(name="calm", scale=4.0, layers=[8, 9, 10])` (a stored vector) or
    `VectorItem(data={"12": [...hidden_size floats]}, mode="ablate")` (inline). Layer l acts on the residual
    stream at the output of decoder layer l (llama.cpp's `direction.l`)."""

    @model_validator(mode="after")
    def _one_source(self) -> VectorItem:
        if (self.name is None) == (self.data is None):
            raise ValueError("give exactly one of name (a stored vector) and data (inline directions)")
        if self.mode == "ablate" and self.scale not in (None, 1.0):
            raise ValueError("ablate removes the direction's component: scale must be absent or 1")
        return self


class Steering(_spec.SteeringSpec):
    """A request's steering, e.g. `Steering(logits=Logits(bias={" Paris": 2.0}, rules=Rules.preset("hewitt2024")))`.

    Sent as the body field `steering`; also the body of a profile. `version` is sent on the wire, so a future
    server that changes the spec's meaning can tell what this client meant.
    """
