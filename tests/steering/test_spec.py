"""The steering spec: validation, merge precedence, fingerprints, cache salts, compilation on a real tokenizer."""
from __future__ import annotations

import pytest

from steerserve.steering import spec as S
from steerserve.steering.logits import HEWITT_TOKEN_DELTAS, hewitt_deltas
from steerserve.steering.model import ModelFacts, SpecError
from steerserve.steering.plan import EosRamp, Plan


@pytest.fixture(scope="module")
def smollm2(smollm2_path) -> ModelFacts:
    from transformers import AutoTokenizer

    return ModelFacts(AutoTokenizer.from_pretrained(smollm2_path), 49152, (2,))


def test_later_sources_win_per_method():
    profile = S.parse({"logits": {"bias": {"1": 1.0}, "rules": {"diversity": 1.0}}}, "p")
    body = S.parse({"logits": {"bias": {"2": 2.0}}}, "steering")
    merged = S.merge([profile, body]).logits
    assert merged.bias == {"2": 2.0} and merged.rules.diversity == 1.0


def test_fingerprint_is_stable_and_empty_for_no_steering():
    a = S.merge([S.parse({"logits": {"bias": {"1": 1.0, "2": 2.0}}}, "s")])
    b = S.merge([S.parse({"logits": {"bias": {"2": 2.0, "1": 1.0}}}, "s")])
    assert S.fingerprint(a) == S.fingerprint(b) != ""
    assert S.fingerprint(S.merge([])) == ""
    assert S.fingerprint(S.merge([S.parse({"logits": {"bias": {"1": 1.5}}}, "s")])) != S.fingerprint(a)


def test_cache_salt_separates_tenants_not_logits_steering():
    plain, steered = S.merge([]), S.merge([S.parse({"logits": {"bias": {"1": 1.0}}}, "s")])
    assert S.cache_salt(plain, "alice") != S.cache_salt(plain, "bob")
    # logits methods do not change the KV of a token sequence, so sharing its blocks is exact
    assert S.cache_salt(plain, "alice") == S.cache_salt(steered, "alice")


def test_hidden_state_families_enter_the_salt():
    assert set(S.HIDDEN_STATE_FAMILIES) <= set(S.SteeringSpec.model_fields)
    spec = S.SteeringSpec.model_construct(attention={"sink": {"gamma": 2.0}})
    assert S.cache_salt(spec, "alice") != S.cache_salt(S.merge([]), "alice")


@pytest.mark.parametrize("raw, field", [
    ({"logits": {"bias": {"1": float("inf")}}}, "s.logits.bias.1"),
    ({"logits": {"rules": {"eos_ramp": {"max": 1.0, "window": 0}}}}, "s.logits.rules.eos_ramp.window"),
    ({"logits": {"rules": {"diversity": -1}}}, "s.logits.rules.diversity"),
    ({"prompt": {"urial": {"examples": -1}}}, "s.prompt.urial.examples"),
    ({"prompt": {"urial": {"variant": "../etc"}}}, "s.prompt.urial.variant"),
    ({"prompt": {"conjugate": {"language": "xx"}}}, "s.prompt.conjugate.language"),
    ({"prompt": {"conjugate": {}}}, "s.prompt.conjugate.language"),
    ({"prompt": {"urial": {}, "other": {}}}, "s.prompt.other"),
    ([], "s"),
])
def test_parse_errors_name_the_field(raw, field):
    with pytest.raises(SpecError) as err:
        S.parse(raw, "s")
    assert err.value.field == field


def test_prompt_methods_make_no_plan_and_leave_the_salt_alone():
    plain = S.merge([])
    prompt = S.merge([S.parse({"prompt": {"urial": {"variant": "help"}, "conjugate": {"language": "fr"}}}, "s")])
    assert S.compile_spec(prompt, None) is None  # nothing for the worker (the model is not even consulted)
    assert S.cache_salt(prompt, "alice") == S.cache_salt(plain, "alice")
    assert prompt.methods() == ["prompt.conjugate", "prompt.urial"] and S.fingerprint(prompt) != ""


def test_hewitt_preset_maps_every_piece_onto_smollm2(smollm2):
    mapped, missing = hewitt_deltas(smollm2)
    assert missing == []
    tok = smollm2.tokenizer
    expected = {}
    for text, delta in HEWITT_TOKEN_DELTAS:
        (token,) = tok.encode(text, add_special_tokens=False)
        assert tok.decode([token]) == text
        expected[token] = expected.get(token, 0.0) + delta
    assert mapped == expected


def test_compile_resolves_text_and_ids(smollm2):
    spec = S.merge([S.parse({"logits": {"bias": {" Paris": 3.0, "100": -2.0},
                                        "rules": {"preset": "hewitt2024", "diversity": 0.5}}}, "s")])
    plan = S.compile_spec(spec, smollm2)
    bias = dict(zip(plan.logits.bias_ids, plan.logits.bias_values, strict=True))
    (paris,) = smollm2.tokenizer.encode(" Paris", add_special_tokens=False)
    assert bias[paris] == 3.0 and bias[100] == -2.0 and len(bias) == 17
    assert plan.logits.eos_ramp == EosRamp((2,), 15.0, 250) and plan.logits.diversity == 0.5
    assert Plan.from_extra_args(plan.to_extra_args()) == plan


def test_compile_rejects_what_the_tokenizer_cannot_do(smollm2):
    for key in ("Paris is", "49152", ""):
        with pytest.raises(SpecError) as err:
            S.compile_spec(S.merge([S.parse({"logits": {"bias": {key: 1.0}}}, "s")]), smollm2)
        assert err.value.field == f"steering.logits.bias.{key}"


def test_eos_ramp_grows_then_holds():
    ramp = EosRamp((2,), 15.0, 250)
    assert [ramp.bias(t) for t in (0, 125, 249, 250, 1000)] == [0.0, 7.5, 15.0 * 249 / 250, 15.0, 15.0]


def test_malformed_plans_are_rejected():
    for bad in ({"v": 2}, {"v": 1, "logits": {"bias_ids": [1], "bias_values": []}},
                {"v": 1, "logits": {"bias_ids": [1], "bias_values": [float("nan")]}}, "x"):
        with pytest.raises(ValueError):
            Plan.from_extra_args({"steerserve": bad})
    assert Plan.from_extra_args({}) is None and Plan.from_extra_args(None) is None
