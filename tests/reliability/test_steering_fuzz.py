"""Thousands of malformed steering specs through HTTP: always a 400 naming the field, never a 5xx, and valid
requests answer exactly as before."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=20) | st.floats(
    allow_nan=False, allow_infinity=False)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(
    st.text(max_size=12), c, max_size=4), max_leaves=12)

numbers = st.floats(allow_nan=False, allow_infinity=False) | st.integers(-10**6, 10**6) | st.just(1e308)
tokens = st.text(max_size=6) | st.integers(-5, 10**6).map(str)
near_valid = st.fixed_dictionaries({}, optional={
    "version": st.integers(-1, 3) | json_values,
    "logits": st.fixed_dictionaries({}, optional={
        "bias": st.dictionaries(tokens, numbers | json_values, max_size=5) | json_values,
        "rules": st.fixed_dictionaries({}, optional={
            "preset": st.sampled_from(["hewitt2024", "HEWITT", ""]) | json_values,
            "eos_ramp": st.fixed_dictionaries({"max": numbers, "window": st.integers(-5, 10**6)}) | json_values,
            "token_deltas": st.dictionaries(tokens, numbers, max_size=4) | json_values,
            "diversity": numbers | json_values,
        }) | json_values,
    }) | json_values,
    "prompt": st.fixed_dictionaries({}, optional={
        "urial": st.fixed_dictionaries({}, optional={
            "variant": st.sampled_from(["default", "help", "nope", "../x", ""]) | json_values,
            "examples": st.integers(-2, 70) | json_values,
        }) | json_values,
        "conjugate": st.fixed_dictionaries({}, optional={
            "language": st.sampled_from(["fr", "en", "piglatin", "xx"]) | json_values,
            "translator": st.sampled_from(["self", "other", ""]) | json_values,
            "translate_back": st.booleans() | json_values,
        }) | json_values,
    }) | json_values,
    "attention": json_values, "experts": json_values,
}) | st.dictionaries(st.text(max_size=10), json_values, max_size=3)

BASELINE = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0,
            "max_tokens": 8}


@pytest.fixture(scope="module")
def baseline(http, model_name) -> str:
    return http.post("/v1/chat/completions", json={"model": model_name, **BASELINE}).json()["choices"][0]["message"]


def check(r) -> None:
    assert r.status_code < 500, r.text
    if r.status_code == 403:  # conjugate prompting, which this tenant may not use
        assert r.json()["error"]["param"] == "steering.prompt.conjugate", r.text
    elif r.status_code != 200:
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] and err["param"].split(".")[0] in ("steering", "X-Steering"), err
        assert err["param"] in err["message"], err


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(spec=near_valid | json_values)
def test_fuzzed_body_specs(http, model_name, baseline, spec):
    check(http.post("/v1/chat/completions", json={"model": model_name, "messages": BASELINE["messages"],
                                                    "max_tokens": 1, "steering": spec}))


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(spec=near_valid | json_values)
def test_fuzzed_header_specs(http, model_name, baseline, spec):
    header = json.dumps(spec, ensure_ascii=True)
    check(http.post("/v1/completions", json={"model": model_name, "prompt": "Hi", "max_tokens": 1},
                    headers={"X-Steering": header}))


def test_valid_requests_unchanged_after_fuzzing(http, model_name, baseline):
    again = http.post("/v1/chat/completions", json={"model": model_name, **BASELINE}).json()
    assert again["choices"][0]["message"] == baseline
    assert http.get("/ready").status_code == 200
