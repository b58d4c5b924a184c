"""The steering spec of one request: its schema, the merge of its sources, fingerprints, and compilation.

Sources, later winning per method (`logits.bias`, `logits.rules`, ...): named profiles, the `X-Steering`
header, the body field `steering`. Each source is validated on its own, so an error names where it came from.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, create_model

from .methods import METHODS, by_family
from .methods.prompt import PromptSpec
from .model import ModelFacts, SpecError
from .plan import Plan, digest
from .schema import Strict

__all__ = ["PromptSpec", "SteeringSpec", "compile_spec", "digest", "fingerprint", "merge", "parse"]


class _SteeringSpecBase(Strict):
    version: Literal[1] = 1

    def methods(self) -> list[str]:
        """The methods this spec applies, as `family.method` names."""
        families = by_family()
        out = []
        for family, value in self.model_dump(exclude_none=True, exclude={"version"}).items():
            out += [f"{family}.{method}" for method in families[family].names(value)]
        return sorted(out)


# A request's steering: one optional field per registered method that has a spec; an empty spec steers nothing.
SteeringSpec = create_model(
    "SteeringSpec", __base__=_SteeringSpecBase, __doc__="A request's steering. Every family is optional; an empty "
    "spec steers nothing.",
    **{m.family: (m.spec | None, Field(None, description=m.description)) for m in METHODS if m.spec is not None})

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
    merged: dict[str, Any] = {}
    for source in sources:
        for family, methods in source.items():
            if isinstance(methods, list):  # a list family (vectors): the later list replaces the earlier one
                merged[family] = methods
            else:
                merged.setdefault(family, {}).update(methods)
    return SteeringSpec.model_validate(merged)


def fingerprint(spec: SteeringSpec) -> str:
    """A short stable hash of everything a spec asks for; "" for an empty spec."""
    body = spec.model_dump(exclude_none=True, exclude={"version"}, mode="json")
    return digest(body) if body else ""


def compile_spec(spec: SteeringSpec, model: ModelFacts, field: str = "steering") -> Plan | None:
    """The worker plan for a spec on this model, or None when nothing in it runs in the worker."""
    parts = [m.compile_part(getattr(spec, m.family), model, f"{field}.{m.family}") for m in METHODS
             if m.part is not None and m.spec is not None and getattr(spec, m.family)]
    return Plan(fingerprint(spec), *parts) if parts else None
