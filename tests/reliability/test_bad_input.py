"""Bad input is a 400 in OpenAI's error shape, names the field, and leaves the server healthy."""
from __future__ import annotations

import json

import pytest

MSG = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return {"model": "__MODEL__", "messages": MSG, "max_tokens": 4, **fields}


BAD = {
    "max_tokens negative": (chat(max_tokens=-1), "max_tokens"),
    "max_tokens wrong type": (chat(max_tokens="ten"), "max_tokens"),
    "temperature out of range": (chat(temperature=5), "temperature"),
    "top_p zero": (chat(top_p=0), "top_p"),
    "empty messages": (chat(messages=[]), "messages"),
    "unknown role": (chat(messages=[{"role": "wizard", "content": "x"}]), "messages"),
    "messages not a list": (chat(messages="hello"), "messages"),
    "unknown top-level field": (chat(frobnicate=True), "frobnicate"),
    "unknown field in stream_options": (chat(stream=True, stream_options={"include_usage": True, "x": 1}),
                                        "stream_options"),
    "stream_options without stream": (chat(stream_options={"include_usage": True}), None),
    "n too large": (chat(n=1000), "n"),
    "n > 1 with greedy": (chat(n=2, temperature=0), None),
    "top_logprobs without logprobs": (chat(top_logprobs=2), None),
    "logit_bias key not a token id": (chat(logit_bias={"abc": 1}), "logit_bias"),
    "logit_bias id out of vocabulary": (chat(logit_bias={"99999999": 1}), "logit_bias"),
    "json_schema without schema": (chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
                                   "response_format"),
    "empty stop string": (chat(stop=[""]), "stop"),
    "nan temperature": (None, "temperature"),  # raw body below: NaN is not JSON, but Python's json emits it
}


@pytest.fixture()
def post(http, model_name):
    def send(body: dict | None, raw: bytes | None = None, path: str = "/v1/chat/completions"):
        data = raw if raw is not None else json.dumps(body).replace("__MODEL__", model_name).encode()
        return http.post(path, content=data, headers={"content-type": "application/json"})
    return send


def assert_openai_error(r, status: int, param: str | None = None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] is not None and err["param"].startswith(param), err
        assert param in err["message"]


@pytest.mark.parametrize("case", list(BAD))
def test_bad_field_is_400_naming_it(post, case):
    body, param = BAD[case]
    if body is None:
        r = post(None, raw=b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}')
        assert r.status_code == 400
        return
    assert_openai_error(post(body), 400, param)


@pytest.mark.parametrize("raw", [b"{bad json", b"", b"[1, 2]", b"\xff\xfe", b"null", b'"text"'])
def test_malformed_body_is_400(post, raw):
    assert_openai_error(post(None, raw=raw), 400)


def test_completion_prompt_errors(post):
    assert_openai_error(post({"model": "__MODEL__", "prompt": []}, path="/v1/completions"), 400, "prompt")
    assert_openai_error(post({"model": "__MODEL__", "prompt": [10**9]}, path="/v1/completions"), 400, "prompt")
    assert_openai_error(post({"model": "__MODEL__", "prompt": "x", "suffix": "y"}, path="/v1/completions"), 400)


def test_too_long_prompt_says_the_numbers(post):
    r = post(chat(messages=[{"role": "user", "content": "word " * 2000}], max_tokens=None))
    assert_openai_error(r, 400)
    message = r.json()["error"]["message"]
    assert "1024" in message and r.json()["error"]["code"] == "context_length_exceeded"


def test_prompt_plus_max_tokens_over_context_is_400(post):
    r = post(chat(max_tokens=5000))
    assert_openai_error(r, 400, "max_tokens")
    assert "1024" in r.json()["error"]["message"] and "5000" in r.json()["error"]["message"]


def test_unknown_route_and_method(http):
    assert http.get("/v1/nothing").status_code == 404
    assert http.get("/v1/chat/completions").status_code == 405


def test_server_still_answers_after_bad_input(post, http):
    for body, _ in BAD.values():
        if body is not None:
            post(body)
    assert http.get("/ready").status_code == 200
    r = post(chat(temperature=0))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
