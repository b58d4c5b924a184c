"""The attention family of the spec: validation against the model, compilation into plans, span binding, salts."""
from __future__ import annotations

import math

import pytest

from steerserve.server.frontend.request_steering import Steering
from steerserve.steering import spec as S
from steerserve.steering.attention import bind_spans
from steerserve.steering.model import ModelFacts, SpecError
from steerserve.steering.plan import Plan

MODEL = ModelFacts(tokenizer=None, vocab_size=100, num_layers=30, num_heads=9, num_kv_heads=3)


def compiled(raw: dict, model: ModelFacts = MODEL) -> Plan:
    return S.compile_spec(S.merge([S.parse({"attention": raw}, "steering")]), model)


@pytest.mark.parametrize("raw, field, says", [
    ({"sink": {"gamma": 0}}, "steering.attention.sink.gamma", "greater than 0"),
    ({"sink": {"gamma": -1.0}}, "steering.attention.sink.gamma", "greater than 0"),
    ({"sink": {"layers": [-1]}}, "steering.attention.sink.layers.0", "greater than or equal"),
    ({"sink": {"layers": "some"}}, "steering.attention.sink.layers", "'all'"),
    ({"sink": {"per_head": {"3-4": 2.0}}}, "steering.attention.sink.per_head", "<layer>.<head>"),
    ({"sink": {"per_head": {"3.4": 0.0}}}, "steering.attention.sink.per_head.3.4", "greater than 0"),
    ({"spans": []}, "steering.attention.spans", "at least 1"),
    ({"spans": [{"target": "tool", "alpha": 0.5}]}, "steering.attention.spans.0.target", "'user'"),
    ({"spans": [{"target": {"start": 5, "end": 2}, "alpha": 0.5}]}, "steering.attention.spans.0.target.end",
     "greater than start"),
    ({"spans": [{"target": "user", "alpha": 1.5}]}, "steering.attention.spans.0.alpha", "less than or equal"),
    ({"spans": [{"target": "user", "alpha": 0.0}]}, "steering.attention.spans.0.alpha", "greater than 0"),
    ({"sink": {"gamma": 2.0, "extra": 1}}, "steering.attention.sink.extra", "not permitted"),
])
def test_malformed_specs_name_the_field(raw, field, says):
    with pytest.raises(SpecError) as err:
        S.parse({"attention": raw}, "steering")
    assert err.value.field == field and says in err.value.reason


@pytest.mark.parametrize("raw, field, says", [  # says: the bad index and the model's size (30 layers x 9 heads)
    ({"sink": {"layers": [30]}}, "attention.sink.layers", ("layer 30 ", "30 layers")),
    ({"sink": {"heads": [9]}}, "attention.sink.heads", ("head 9 ", "9 heads")),
    ({"sink": {"per_head": {"30.0": 2.0}}}, "attention.sink.per_head.30.0", ("30 layers of 9 query heads",)),
    ({"sink": {"per_head": {"0.9": 2.0}}}, "attention.sink.per_head.0.9", ("30 layers of 9 query heads",)),
    ({"spans": [{"target": "user", "alpha": 0.5, "heads": [0, 12]}]}, "attention.spans.0.heads",
     ("head 12 ", "9 heads")),
])
def test_indices_are_checked_against_the_model(raw, field, says):
    with pytest.raises(SpecError) as err:
        compiled(raw)
    assert err.value.field == f"steering.{field}"
    assert all(part in err.value.reason for part in says), err.value.reason


def test_a_model_without_steerable_attention_refuses(monkeypatch):
    from dataclasses import replace

    with pytest.raises(SpecError, match="not available on this model: MLA"):
        compiled({"sink": {"gamma": 2.0}}, replace(MODEL, unsupported={"attention": "MLA"}))


def test_sink_table_follows_the_definition():
    plan = compiled({"sink": {"gamma": 2.0, "layers": [1, 4], "heads": [0, 8], "per_head": {"4.0": 0.5, "7.3": 3.0}}})
    table = plan.attention.sink_log_gains
    assert len(table) == 30 * 9
    for layer in range(30):
        for head in range(9):
            want = {(1, 0): 2.0, (1, 8): 2.0, (4, 8): 2.0, (4, 0): 0.5, (7, 3): 3.0}.get((layer, head), 1.0)
            assert table[layer * 9 + head] == pytest.approx(math.log(want)), (layer, head)
    assert Plan.from_extra_args(plan.to_extra_args()) == plan


def test_gamma_one_steers_nothing():
    assert compiled({"sink": {"gamma": 1.0}}).attention.is_noop()


def test_span_targets_bind_to_the_prompt():
    raw = {"spans": [{"target": "user", "alpha": 0.5, "layers": [2]}, {"target": {"start": 3, "end": 50}, "alpha": 0.9}]}
    spec = S.merge([S.parse({"attention": raw}, "steering")])
    plan = S.compile_spec(spec, MODEL)
    bound = bind_spans(spec.attention, plan.attention, [20], {"user": [(5, 9), (12, 15)], "system": [(1, 3)]})
    assert [sp.targets for sp in bound.spans] == [((5, 9), (12, 15)), ((3, 50),)]
    assert bound.spans[0].layers == (2,) and bound.spans[0].heads == tuple(range(9))
    assert bound.spans[1].log_alpha == pytest.approx(math.log(0.9))
    assert Plan.from_extra_args(plan.__class__(plan.fingerprint, attention=bound).to_extra_args()).attention == bound


@pytest.mark.parametrize("roles, lens, says", [
    (None, [20], "needs /v1/chat/completions"),
    ({"system": [(1, 3)]}, [20], "no user message"),
])
def test_role_targets_need_a_matching_chat_message(roles, lens, says):
    spec = S.merge([S.parse({"attention": {"spans": [{"target": "user", "alpha": 0.5}]}}, "steering")])
    with pytest.raises(SpecError, match=says) as err:
        bind_spans(spec.attention, S.compile_spec(spec, MODEL).attention, lens, roles)
    assert err.value.field == "steering.attention.spans.0.target"


def test_a_range_beyond_a_prompt_matches_nothing():
    spec = S.merge([S.parse({"attention": {"spans": [{"target": {"start": 8, "end": 12}, "alpha": 0.5}]}},
                            "steering")])
    plan = S.compile_spec(spec, MODEL)
    bind_spans(spec.attention, plan.attention, [9], None)  # token 8 exists
    with pytest.raises(SpecError, match="matches no token of a 8-token prompt"):
        bind_spans(spec.attention, plan.attention, [30, 8], None)  # every prompt must have the span


def test_salts_separate_attention_steering_and_span_prompt_lengths():
    plain = S.merge([])
    sink = S.merge([S.parse({"attention": {"sink": {"gamma": 2.0}}}, "s")])
    spans = S.merge([S.parse({"attention": {"spans": [{"target": {"start": 0, "end": 2}, "alpha": 0.5}]}}, "s")])
    assert Steering(sink, S.compile_spec(sink, MODEL), "alice").salt_for(10) != \
        Steering(plain, S.compile_spec(plain, MODEL), "alice").salt_for(10)
    a = Steering(sink, S.compile_spec(sink, MODEL), "alice")
    assert a.salt_for(10) == a.salt_for(20)  # key 0 is biased whatever the prompt length
    b = Steering(spans, S.compile_spec(spans, MODEL), "alice").bind([10], None)
    # A key that is a prompt key of one request can be a generated key of another: never share across lengths
    assert b.salt_for(10) != b.salt_for(20)


@pytest.mark.parametrize("raw, field", [
    ({"mode": {"kind": "relu"}}, "steering.attention.mode.kind"),
    ({"mode": {"kind": "lssar", "power": 0.5}}, "steering.attention.mode.power"),
    ({"mode": {"kind": "lssar", "layers": []}}, "steering.attention.mode.layers"),
])
def test_malformed_modes_name_the_field(raw, field):
    with pytest.raises(SpecError) as err:
        S.parse({"attention": raw}, "steering")
    assert err.value.field == field


def test_mode_compiles_to_its_layers():
    plan = compiled({"mode": {"kind": "lssar", "power": 3.0, "layers": [2, 0]}}).attention
    assert (plan.mode, plan.power, plan.mode_layers) == ("lssar", 3.0, (0, 2))
    assert Plan.from_extra_args(Plan("x", attention=plan).to_extra_args()).attention == plan
    assert compiled({"mode": {"kind": "softmax"}}).attention.is_noop()
    with pytest.raises(SpecError, match="30 layers"):
        compiled({"mode": {"kind": "lssa", "layers": [30]}})


def test_a_trained_mode_applies_to_every_request_and_only_overrides_are_experimental():
    from steerserve.server.frontend.request_steering import resolve
    from steerserve.server.http.auth import Principal

    who = Principal(tenant="alice", role="user")
    trained = {"attention": {"mode": {"kind": "lssar", "power": 15.0}}}
    plain = resolve({}, None, who, None, MODEL, trained)
    assert plain.plan.attention.mode == "lssar" and plain.plan.attention.mode_layers == tuple(range(30))
    assert plain.applied.endswith("methods=attention.mode")  # the model's own mode: not experimental
    override = resolve({}, {"attention": {"mode": {"kind": "lssar", "power": 3.0}}}, who, None, MODEL, trained)
    assert override.plan.attention.power == 3.0 and override.applied.endswith("; experimental=attention.mode")
    per_request = resolve({}, {"attention": {"mode": {"kind": "reweight"}}}, who, None, MODEL)
    assert per_request.applied.endswith("; experimental=attention.mode")
    assert resolve({}, {"attention": {"sink": {"gamma": 2.0}}}, who, None, MODEL).experimental == ()
