"""The SDK's steering models cannot drift from the server's spec: the whole JSON schema the server publishes
(GET /v1/steering/schema, `SteeringSpec.model_json_schema()`) is compared with the SDK's, offline, and the
comparison is shown to catch any single change to any model of the server's spec."""
from __future__ import annotations

import json

from steerserve_client import Steering

from steerserve.steering.spec import SteeringSpec

from .schemas import differences, family, resolve


def test_schema_comparison_catches_added_removed_renamed_and_retyped_fields():
    ours = Steering.model_json_schema()
    assert differences(family(ours, "logits"), family(ours, "logits")) == []
    renamed = json.loads(json.dumps(ours).replace('"diversity"', '"diversty"'))
    retyped = json.loads(json.dumps(ours).replace('"maximum": 100000', '"maximum": 1000'))
    added = json.loads(json.dumps(ours))
    added["$defs"]["EosRamp"]["properties"]["shape"] = {"type": "string"}
    for other in (renamed, retyped, added):
        assert differences(family(ours, "logits"), family(other, "logits")), other
    assert resolve({"$ref": "#/$defs/A", "title": "x"}, {"A": {"type": "integer", "description": "d"}}) == {
        "type": "integer"}


def whole(schema: dict) -> dict:
    return resolve(schema, schema.get("$defs", {}))


def server_schema() -> dict:
    """What the server publishes at GET /v1/steering/schema: its spec model's JSON schema."""
    return SteeringSpec.model_json_schema()


def test_sdk_models_every_family_and_field_of_the_server_schema():
    """Drift guard, offline twin of the live one: the whole schema, every family and every field (name, type,
    required or not, default, bounds, enums, patterns, nested models), recursively; only titles and
    descriptions may differ."""
    server, sdk = server_schema(), Steering.model_json_schema()
    assert set(sdk["properties"]) == set(server["properties"]) >= {"version", "logits", "attention", "experts",
                                                                   "prompt"}
    assert differences(whole(sdk), whole(server)) == []


def server_mutations(server: dict):
    """(what, schema) for each single change the server's spec could make: on every model (each $def and the
    top level), a field added; on every field, the field removed, its requiredness flipped, a bound added."""
    def variant(edit) -> dict:
        copy = json.loads(json.dumps(server))
        edit(copy)
        return copy

    def node(schema: dict, name: str | None) -> dict:
        return schema if name is None else schema["$defs"][name]

    for name in [None, *server["$defs"]]:
        model, label = node(server, name), name or "SteeringSpec"
        if "properties" not in model:
            continue
        yield f"{label}: field added", variant(lambda s, n=name: node(s, n)["properties"].update(new={"type": "integer"}))
        for field in model["properties"]:
            def drop(s, n=name, f=field):
                m = node(s, n)
                del m["properties"][f]
                m["required"] = [r for r in m.get("required", []) if r != f]

            def flip(s, n=name, f=field):
                m = node(s, n)
                req = m.get("required", [])
                m["required"] = [r for r in req if r != f] if f in req else [*req, f]

            yield f"{label}.{field}: removed", variant(drop)
            yield f"{label}.{field}: required flipped", variant(flip)
            yield f"{label}.{field}: bound changed", variant(
                lambda s, n=name, f=field: node(s, n)["properties"][f].update(maximum=12345.5))


def test_the_drift_guard_sees_any_change_to_any_server_model():
    server, sdk = server_schema(), Steering.model_json_schema()
    mutations = list(server_mutations(server))
    models = {what.split(":")[0].split(".")[0] for what, _ in mutations}
    assert models == {"SteeringSpec", *server["$defs"]} and len(server["$defs"]) >= 10  # every model, every family
    missed = [what for what, mutated in mutations if not differences(whole(sdk), whole(mutated))]
    assert missed == []
