"""The steering spec of one request: its schema, the merge of its sources, fingerprints, and compilation.

Sources, later winning per method (`logits.bias`, `logits.rules`, ...): named profiles, the `X-Steering`
header, the body field `steering`. Each source is validated on its own, so an error names where it came from.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import Field, ValidationError

from .attention import AttentionSpec, compile_attention
from .conjugate import ConjugateSpec
from .experts import ExpertsSpec, compile_experts
from .logits import LogitsSpec, compile_logits
from .model import ModelFacts, SpecError
from .plan import Plan
from .schema import Strict
from .urial import UrialSpec

# Families whose methods change hidden states: they enter the prefix-cache salt. Logits-only and prompt-only
# methods do not change the KV of a given token sequence.
HIDDEN_STATE_FAMILIES = ("attention", "experts")
# Families applied by the worker (a plan); the others run in the server process (`prompt`: server/prompting.py).
WORKER_FAMILIES = ("logits", "attention", "experts")


class PromptSpec(Strict):
    """Prompt-level methods: they change what the model is asked, not the model (no worker plan)."""

    urial: UrialSpec | None = Field(None, description="URIAL: render the chat as in-context alignment examples "
                                                      "for a base model (chat completions only).")
    conjugate: ConjugateSpec | None = Field(None, description="Conjugate prompting: translate the prompt, generate, "
                                                              "translate the answer back (chat completions only; "
                                                              "needs the tenant's allow_conjugate switch).")


class SteeringSpec(Strict):
    """A request's steering. Every family is optional; an empty spec steers nothing."""

    version: Literal[1] = 1
    logits: LogitsSpec | None = None
    attention: AttentionSpec | None = None
    experts: ExpertsSpec | None = None
    prompt: PromptSpec | None = None

    def methods(self) -> list[str]:
        """The methods this spec applies, as `family.method` names."""
        out = []
        for family, value in self.model_dump(exclude_none=True, exclude={"version"}).items():
            # experts: off/on are the methods; off_mode, on_mode, scope only qualify them
            out += [f"{family}.{method}" for method in value if family != "experts" or method in ("off", "on")]
        return sorted(out)


def parse(raw: Any, where: str) -> dict[str, Any]:
    """One source's spec, validated, as a dict of its families (None-free). Raises SpecError naming the field
    as `<where>.<path>`."""
    if not isinstance(raw, dict):
        raise SpecError(where, "must be a JSON object")
    try:
        spec = SteeringSpec.model_validate(raw)
    except ValidationError as exc:
        # A value that fits no member of a union gets one error per member, each with the member's tag in its
        # path; the deepest one says most (e.g. `end` inside a range), and tags are not fields a user wrote.
        errors = exc.errors()
        err = max(errors, key=lambda e: len(e["loc"]) if e["loc"][: len(errors[0]["loc"]) - 1] ==
                  errors[0]["loc"][:-1] else 0)
        path = ".".join(str(p) for p in err["loc"] if not _union_tag(p))
        raise SpecError(f"{where}.{path}" if path else where, err["msg"].removeprefix("Value error, ")) from None
    return spec.model_dump(exclude_none=True, exclude={"version"}, mode="json")


def _union_tag(part: Any) -> bool:
    return isinstance(part, str) and ("[" in part or part in {"KeyRange"})


def merge(sources: list[dict[str, Any]]) -> SteeringSpec:
    """Merge parsed sources in order; a later source replaces an earlier one's method wholesale."""
    merged: dict[str, dict[str, Any]] = {}
    for source in sources:
        for family, methods in source.items():
            merged.setdefault(family, {}).update(methods)
    return SteeringSpec.model_validate(merged)


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def fingerprint(spec: SteeringSpec) -> str:
    """A short stable hash of everything a spec asks for; "" for an empty spec."""
    body = spec.model_dump(exclude_none=True, exclude={"version"}, mode="json")
    return digest(body) if body else ""


def cache_salt(spec: SteeringSpec, tenant: str) -> str:
    """vLLM's prefix-cache salt: tenants never share KV blocks, nor do requests whose hidden states differ."""
    hidden = spec.model_dump(include=set(HIDDEN_STATE_FAMILIES), exclude_none=True, mode="json")
    return digest({"tenant": tenant, "hidden": hidden})


def compile_spec(spec: SteeringSpec, model: ModelFacts, field: str = "steering") -> Plan | None:
    """The worker plan for a spec on this model, or None when nothing in it runs in the worker."""
    if not any(getattr(spec, family) for family in WORKER_FAMILIES):
        return None
    fp = fingerprint(spec)
    parts: dict[str, Any] = {}
    if spec.logits:
        parts["logits"] = compile_logits(spec.logits, model, f"{field}.logits")
    if spec.attention:
        parts["attention"] = compile_attention(spec.attention, model, f"{field}.attention")
    if spec.experts:
        parts["experts"] = compile_experts(spec.experts, model, f"{field}.experts")
    return Plan(fingerprint=fp, **parts)
