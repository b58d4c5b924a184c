"""The SDK's steering types are generated from the server's schema: the committed steerserve_client/_spec.py is
exactly what `make sdk-types` writes today, and a family the server gains reaches the SDK by that one command,
with no hand-written SDK code (the hand-written layer, steering.py, keeps working over the regenerated models).

Offline: the generator runs in a subprocess on the server's schema, and the regenerated SDK is imported from a
temporary copy in a fresh interpreter."""
from __future__ import annotations

import difflib
import importlib.util
import json
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, Field, ValidationError, create_model

from steerserve.steering.schema import Strict
from steerserve.steering.spec import SteeringSpec

from .schemas import differences, resolve

ROOT = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("generate_types", ROOT / "clients/python/generate_types.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _generator()


def test_the_committed_types_are_a_fresh_generation():
    committed, fresh = gen.OUTPUT.read_text(), gen.generate(gen.server_schema())
    diff = "".join(list(difflib.unified_diff(committed.splitlines(True), fresh.splitlines(True), "committed",
                                             "fresh"))[:60])
    assert committed == fresh, (f"{gen.OUTPUT.name} is stale (generator {version(gen.GENERATOR)}): run "
                                f"`make sdk-types` and commit the result\n{diff}")


# A family the server does not have, shaped like a real one: a list of items, each with a bounded name, a
# dict of bounded lists inside an optional field, a literal-or-list union and a bool.
class NovelItem(Strict):
    name: str | None = Field(None, min_length=1, max_length=32, pattern=r"^[a-z]+$")
    data: dict[str, list[float]] | None = Field(None, min_length=1, max_length=4)
    layers: Literal["all"] | list[int] = "all"
    strong: bool = False


ServerWithNovel = create_model("SteeringSpec", __base__=SteeringSpec,
                               novel=(list[NovelItem] | None, Field(None, max_length=3, description="A new family.")))

PROBE = """
import json, sys
from pydantic import ValidationError
import steerserve_client as sc
assert sc.__file__.startswith(sys.argv[1]), sc.__file__
spec = sc.Steering(novel=[{"name": "happy", "data": {"3": [0.5, -0.5]}}, {"name": "sad", "strong": True}],
                   logits=sc.Logits(rules=sc.Rules.preset("hewitt2024")))
refused = []
for bad in ([{"name": "x"}] * 4, [{"name": "Not ok"}], [{"data": {}}], [{"nope": 1}], [{"strong": "yes"}],
            [{"data": {"1": [float("nan")]}}]):
    try:
        sc.Steering(novel=bad)
    except ValidationError:
        refused.append(bad)
print(json.dumps({"wire": spec.to_json(), "item": type(spec.novel[0]).__name__,
                  "rules": type(spec.logits.rules).__name__, "refused": len(refused),
                  "schema": sc.Steering.model_json_schema()}))
"""


def test_a_new_server_family_reaches_the_sdk_by_regeneration_alone(tmp_path):
    server = ServerWithNovel.model_json_schema()
    text = gen.generate(server)
    assert text != gen.OUTPUT.read_text()  # so the freshness test above would send whoever added it here
    package = tmp_path / "steerserve_client"
    shutil.copytree(gen.OUTPUT.parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "_spec.py").write_text(text)
    out = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n{PROBE}",
                          str(tmp_path)], capture_output=True, text=True, check=True)
    probe = json.loads(out.stdout)
    assert probe["wire"] == {"version": 1, "logits": {"rules": {"preset": "hewitt2024"}}, "novel": [
        {"name": "happy", "data": {"3": [0.5, -0.5]}, "layers": "all", "strong": False},
        {"name": "sad", "layers": "all", "strong": True}]}
    assert (probe["item"], probe["rules"]) == ("NovelItem", "Rules")  # generated model; hand-written layer intact
    assert probe["refused"] == 6
    sdk = probe["schema"]
    assert differences(resolve(sdk, sdk["$defs"]), resolve(server, server["$defs"])) == []


def test_a_parsed_spec_is_made_of_the_public_classes_at_every_depth():
    """What the server sends back (a profile's spec) parses into `Rules`, `Span`, `KeyRange`, ..., not into the
    generated models they stand over: a public class's parents are retyped to it (steerserve_client/_base.py)."""
    import steerserve_client as sc

    wire = {"logits": {"bias": {"1": 1.0}, "rules": {"eos_ramp": {"max": 8, "window": 60}}},
            "attention": {"mode": {"kind": "lssar"}, "sink": {"gamma": 2.0},
                          "spans": [{"target": {"start": 1, "end": 3}, "alpha": 0.5}]},
            "experts": {"off": ["3.17"]},
            "prompt": {"urial": {"variant": "help"}, "conjugate": {"language": "fr"}}}
    spec = sc.Steering.model_validate(wire)

    def models(value):
        if isinstance(value, BaseModel):
            yield value
            for name in type(value).model_fields:
                yield from models(getattr(value, name))
        elif isinstance(value, list):
            for item in value:
                yield from models(item)

    found = {type(m).__name__: type(m).__module__ for m in models(spec)}
    assert found == dict.fromkeys(["Steering", "Logits", "Rules", "EosRamp", "Attention", "AttentionMode", "Sink",
                                   "Span", "KeyRange", "Experts", "Prompt", "Urial", "Conjugate"],
                                  "steerserve_client.steering")
    assert spec.attention.spans[0].target == sc.KeyRange(start=1, end=3)
    with pytest.raises(ValidationError, match="end must be greater"):  # the public class's own check applies
        sc.Steering.model_validate({"attention": {"spans": [{"target": {"start": 3, "end": 3}, "alpha": 0.5}]}})
