"""The steering spec: validation, merge precedence, fingerprints, cache salts, compilation on a real tokenizer."""
from __future__ import annotations

import pytest

from steerserve.steering import spec as S
from steerserve.steering.logits import HEWITT_TOKEN_DELTAS, hewitt_deltas
from steerserve.steering.methods import part_types
from steerserve.steering.methods.iapt import IaptPlan
from steerserve.steering.methods.vectors import probe_plan
from steerserve.steering.model import ModelFacts, SpecError
from steerserve.steering.plan import AttentionPlan, EosRamp, ExpertsPlan, Plan, cache_salt


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
    steered = S.compile_spec(S.merge([S.parse({"logits": {"bias": {"1": 1.0}}}, "s")]), ModelFacts(None, 100))
    assert not steered.logits.is_noop()
    assert cache_salt("alice", None, 5) != cache_salt("bob", None, 5)
    # logits methods do not change the KV of a token sequence, so sharing its blocks is exact
    assert cache_salt("alice", None, 5) == cache_salt("alice", steered, 5)


def test_hidden_state_families_enter_the_salt():
    hidden = {family for family, part in part_types().items() if part.HIDDEN_STATE}
    assert hidden == {"attention", "experts", "iapt", "vectors"}
    examples = {"attention": AttentionPlan((0.5,)), "experts": ExpertsPlan(off=((1, 2),)),
                "iapt": IaptPlan("/a", "a"), "vectors": probe_plan(8, 4).vectors}
    for family in hidden:
        assert cache_salt("alice", Plan("x", examples[family]), 5) != cache_salt("alice", None, 5), family
        assert cache_salt("alice", Plan("x", part_types()[family]()), 5) == cache_salt("alice", None, 5), family


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
    assert S.compile_spec(plain, None) is None  # so both get the salt of an unsteered request
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
    for bad in ({"v": 2, "parts": {}}, {"v": 1}, {"v": 1, "parts": {"logits": {"bias_ids": [1], "bias_values": []}}},
                {"v": 1, "parts": {"logits": {"bias_ids": [1], "bias_values": [float("nan")]}}},
                {"v": 1, "parts": {"nonsense": {}}}, {"v": 1, "parts": {"iapt": {"path": 3}}}, "x"):
        with pytest.raises(ValueError):
            Plan.from_extra_args({"steerserve": bad})
    assert Plan.from_extra_args({}) is None and Plan.from_extra_args(None) is None
