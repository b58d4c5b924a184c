"""A request's steering on the server side: gather its sources (profiles, header, body), merge, compile."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from steerserve.server.http.auth import Principal
from steerserve.server.http.body import parse_json
from steerserve.server.http.errors import BadRequest, NotFound
from steerserve.server.stores.profiles import ProfileStore
from steerserve.server.stores.vectors import VectorStore
from steerserve.steering import attention as attention_steering
from steerserve.steering import spec as steering
from steerserve.steering.model import ModelFacts, SpecError
from steerserve.steering.plan import Plan, PlanPart, cache_salt
from steerserve.steering.vectors import resolved

MAX_HEADER_BYTES = 16 * 1024


@dataclass(frozen=True)
class Steering:
    spec: steering.SteeringSpec
    plan: Plan | None
    tenant: str
    experimental: tuple[str, ...] = ()  # methods applied that the served model was not made for

    @property
    def applied(self) -> str:
        """The X-Steering-Applied header: the fingerprint and the methods applied (and which are experimental)."""
        header = f"{steering.fingerprint(self.spec)}; methods={','.join(self.spec.methods())}"
        return header + (f"; experimental={','.join(self.experimental)}" if self.experimental else "")

    def extra_args(self) -> dict[str, Any] | None:
        return self.plan.to_extra_args() if self.plan else None

    def bind(self, prompt_lens: Sequence[int], role_spans: dict[str, list[tuple[int, int]]] | None) -> Steering:
        """The steering for these prompts: span targets resolved (chat roles through `role_spans`, the token
        ranges of each role's message contents; None outside chat). A target that matches nothing is a 400."""
        if self.plan is None or self.spec.attention is None or not self.spec.attention.spans:
            return self
        try:
            attention = attention_steering.bind_spans(self.spec.attention, self.plan.attention, prompt_lens,
                                                      role_spans)
        except SpecError as exc:
            raise spec_error(exc) from None
        return replace(self, plan=self.plan.with_part(attention))

    def with_part(self, part: PlanPart | None) -> Steering:
        """This steering with a part the server adds to the plan itself (an IAPT adapter, routed-expert counts)."""
        if part is None:
            return self
        return replace(self, plan=(self.plan or Plan(steering.fingerprint(self.spec))).with_part(part))

    def salt_for(self, prompt_len: int) -> str:
        """The prefix-cache salt of one prompt (steering/plan.py `cache_salt`: the tenant and the plan's
        hidden-state parts, the IAPT adapter included)."""
        return cache_salt(self.tenant, self.plan, prompt_len)


def spec_error(exc: SpecError) -> BadRequest:
    return BadRequest(f"{exc.field}: {exc.reason}", param=exc.field, code="invalid_steering")


def resolve(headers, body_spec: Any, principal: Principal, profiles: ProfileStore, model: ModelFacts,
            model_steering: dict[str, Any] | None = None, vectors: VectorStore | None = None) -> Steering:
    """The merged, compiled steering of a request. Anything that cannot be applied is a 400 (or 404 for an
    unknown profile or stored vector): a request is never served silently unsteered. `model_steering` is what
    the served model always gets (its trained attention mode), merged first. Named control vectors are looked up
    in `vectors` for the request's tenant (its own, else a global one)."""
    sources: list[dict[str, Any]] = [steering.parse(model_steering, "model")] if model_steering else []
    wheres: list[str] = ["model"] if model_steering else []
    try:
        for name in _profile_names(headers.get("x-steering-profile")):
            stored = profiles.resolve(principal.tenant, name)
            if stored is None:
                raise NotFound(f"steering profile '{name}' not found", param="X-Steering-Profile",
                               code="profile_not_found")
            sources.append(steering.parse(stored, f"X-Steering-Profile[{name}]"))
            wheres.append(f"X-Steering-Profile[{name}]")
        if (header := headers.get("x-steering")) is not None:
            sources.append(steering.parse(_header_json(header), "X-Steering"))
            wheres.append("X-Steering")
        if body_spec is not None:
            sources.append(steering.parse(body_spec, "steering"))
            wheres.append("steering")
        spec = steering.merge(sources)
        # The vectors list comes wholesale from the last source that has one: that is where its items are.
        where = next((w for w, s in zip(reversed(wheres), reversed(sources), strict=True)
                      if "vectors" in s), "steering")
        resolve_vectors(spec, principal.tenant, vectors, where)
        plan = steering.compile_spec(spec, model)
    except SpecError as exc:
        raise spec_error(exc) from None
    trained = (model_steering or {}).get("attention", {}).get("mode")
    mode = spec.attention.mode.model_dump(mode="json") if spec.attention and spec.attention.mode else None
    experimental = ("attention.mode",) if mode and mode["kind"] != "softmax" and mode != _full_mode(trained) else ()
    return Steering(spec, plan, principal.tenant, experimental)


def _full_mode(mode: dict[str, Any] | None) -> dict[str, Any] | None:
    return attention_steering.ModeSpec.model_validate(mode).model_dump(mode="json") if mode else None


def validate_profile(raw: Any, model: ModelFacts, tenant: str = "", vectors: VectorStore | None = None,
                     ) -> dict[str, Any]:
    """A profile body, checked as a request's spec would be (on this model) before it is stored. Named vectors
    must exist for `tenant` now (404 otherwise); the profile keeps their names, so a request uses whatever the
    store holds under that name when it runs."""
    try:
        parsed = steering.parse(raw, "profile")
        spec = steering.merge([parsed])
        resolve_vectors(spec, tenant, vectors, "profile")
        steering.compile_spec(spec, model, "profile")
    except SpecError as exc:
        raise spec_error(exc) from None
    return parsed


def resolve_vectors(spec: steering.SteeringSpec, tenant: str, vectors: VectorStore | None, where: str) -> None:
    """Attach the store's vector to every named item of `spec.vectors`, in place (`steering.vectors.resolved`);
    an unknown name is a 404 naming the item's field, `<where>.vectors[i].name`."""
    items = getattr(spec, "vectors", None) or []
    for i, item in enumerate(items):
        if item.name is None:
            continue
        found = vectors.resolve(tenant, item.name) if vectors is not None else None
        if found is None:
            raise NotFound(f"steering vector '{item.name}' not found", param=f"{where}.vectors[{i}].name",
                           code="vector_not_found")
        items[i] = resolved(item, found[1])


def _profile_names(header: str | None) -> list[str]:
    if header is None:
        return []
    names = [n.strip() for n in header.split(",")]
    if not all(names):
        raise SpecError("X-Steering-Profile", "must be a comma-separated list of profile names")
    return names


def _header_json(header: str) -> Any:
    if len(header.encode("latin-1", "replace")) > MAX_HEADER_BYTES:
        raise SpecError("X-Steering", f"is longer than {MAX_HEADER_BYTES} bytes")
    if not header.isascii():
        raise SpecError("X-Steering", "must be ASCII JSON (escape other characters as \\uXXXX)")
    try:  # bounded like a body: nesting depth, integer digits, lone surrogates
        return parse_json(header, "the header")
    except BadRequest as exc:
        raise SpecError("X-Steering", exc.message) from None
