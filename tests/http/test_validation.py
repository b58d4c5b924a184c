"""Bad input is a 400 (never FastAPI's 422) in OpenAI's error shape and names the field; bodies are read as they
always were (any content type, NaN refused by the schema); checks run in order: caller, then body."""
from __future__ import annotations

import json

import pytest

from tests.http.fake_engine import MAX_MODEL_LEN, NAME

pytestmark = pytest.mark.anyio

JSON = {"content-type": "application/json"}
MSG = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return {"model": "__MODEL__", "messages": MSG, "max_tokens": 4, **fields}


# case: (body, the field the error names); also sent to the real server by tests/reliability/test_bad_input.py
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
}
NAN_TEMPERATURE = b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}'
MALFORMED = [b"{bad json", b"", b"[1, 2]", b"\xff\xfe", b"null", b'"text"']


def encode(body: dict, model: str) -> bytes:
    return json.dumps(body).replace("__MODEL__", model).encode()


async def post(client, body: dict | None, raw: bytes | None = None, path: str = "/v1/chat/completions",
               content_type: str | None = "application/json"):
    data = raw if raw is not None else encode(body, NAME)
    return await client.post(path, content=data, headers={"content-type": content_type} if content_type else {})


def assert_openai_error(r, status: int, param: str | None = None, code: str | None = None, named: bool = True):
    """`r` is OpenAI's error object with this status; `param` and `code` as given, the message naming `param`
    unless not `named`."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(r.json()) == {"error"} and set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                           404: "not_found_error", 429: "requests", 500: "server_error", 503: "service_unavailable",
                           504: "timeout"}.get(status, "invalid_request_error")
    if param is not None:
        assert err["param"] is not None and err["param"].startswith(param), err
        assert param in err["message"] or not named, err
    if code is not None:
        assert err["code"] == code, err


@pytest.mark.parametrize("case", list(BAD))
async def test_bad_field_is_400_naming_it(alice, case):
    body, param = BAD[case]
    assert_openai_error(await post(alice, body), 400, param)


async def test_nan_is_refused_by_the_schema(alice):
    assert_openai_error(await post(alice, None, raw=NAN_TEMPERATURE), 400, "temperature", "invalid_value")


@pytest.mark.parametrize("raw", MALFORMED)
async def test_malformed_body_is_400(alice, raw):
    r = await post(alice, None, raw=raw)
    assert_openai_error(r, 400, code="invalid_json")
    assert r.json()["error"]["param"] is None
    message = r.json()["error"]["message"]
    assert message.startswith("the request body is not valid JSON: ") if raw in (b"{bad json", b"", b"\xff\xfe") \
        else message == "the request body must be a JSON object"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/tenants/alice/settings"])
async def test_body_errors_are_never_422(served, path):
    method = "PUT" if "tenants" in path else "POST"
    async with served.client("ops") as ops:
        for raw in [*MALFORMED, b'{"frobnicate": 1}', b'{"model": 5}']:
            r = await ops.request(method, path, content=raw, headers={"content-type": "application/json"})
            assert_openai_error(r, 400)


@pytest.mark.parametrize("content_type", ["text/plain", None, "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
async def test_a_json_body_needs_the_json_content_type(alice, content_type):
    """A web page's simple cross-site request can send text/plain, a form or multipart, never
    application/json: each is a 415 naming Content-Type, before the body is read."""
    r = await post(alice, chat(temperature=0), content_type=content_type)
    assert_openai_error(r, 415, "Content-Type", "unsupported_media_type", named=False)
    r = await post(alice, chat(temperature=0), content_type="Application/JSON; charset=utf-8")
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


async def test_unknown_field_names_it(alice):
    r = await post(alice, {"model": NAME, "prompt": "x", "best_of": 1, "wat": 2}, path="/v1/completions")
    assert_openai_error(r, 400, "wat", "invalid_value")
    assert r.json()["error"]["message"].startswith("wat: Extra inputs are not permitted")


async def test_completion_prompt_errors(alice):
    assert_openai_error(await post(alice, {"model": NAME, "prompt": []}, path="/v1/completions"), 400, "prompt")
    assert_openai_error(await post(alice, {"model": NAME, "prompt": [10**9]}, path="/v1/completions"), 400, "prompt")
    assert_openai_error(await post(alice, {"model": NAME, "prompt": "x", "suffix": "y"}, path="/v1/completions"),
                        400)


async def test_too_long_prompt_says_the_numbers(alice):
    r = await post(alice, chat(messages=[{"role": "user", "content": "word " * 2000}], max_tokens=None))
    assert_openai_error(r, 400, code="context_length_exceeded")
    assert str(MAX_MODEL_LEN) in r.json()["error"]["message"]


async def test_prompt_plus_max_tokens_over_context_is_400(alice):
    r = await post(alice, chat(max_tokens=5000))
    assert_openai_error(r, 400, "max_tokens")
    assert str(MAX_MODEL_LEN) in r.json()["error"]["message"] and "5000" in r.json()["error"]["message"]


async def test_unknown_model_is_404(alice):
    assert_openai_error(await post(alice, {**chat(), "model": "gpt-4"}), 404, "model", "model_not_found")


async def test_unknown_route_and_method(alice):
    """The router's own errors are OpenAI's error object too (schemathesis found the bare {"detail": ...})."""
    assert_openai_error(await alice.get("/v1/nothing"), 404, code="not_found")
    assert_openai_error(await alice.get("/v1/adapters/a%2Fb/c"), 404, code="not_found")
    r = await alice.get("/v1/chat/completions")
    assert_openai_error(r, 405, code="method_not_allowed")
    assert r.headers["allow"] == "POST"


async def test_the_caller_is_checked_before_the_body(served):
    async with served.client(None) as anonymous, served.client("bob") as bob:
        for raw in (b"{bad json", b'{"frobnicate": 1}'):
            assert_openai_error(await post(anonymous, None, raw=raw), 401)
            # a user writing tenant settings: 403 whatever the body; a bad tenant name: 400 naming the tenant
            r = await bob.put("/v1/tenants/bob/settings", content=raw)
            assert_openai_error(r, 403, "tenant")
            async with served.client("ops") as ops:
                assert_openai_error(await ops.put("/v1/tenants/bad name!/settings", content=raw), 400, "tenant")


async def test_tenant_settings_body_is_checked(served):
    async with served.client("ops") as ops:
        assert_openai_error(await ops.put("/v1/tenants/bob/settings", json={"allow_conjugate": "yes"}), 400,
                            "allow_conjugate")
        assert_openai_error(await ops.put("/v1/tenants/bob/settings", json={"allow": True}), 400, "allow")
        assert_openai_error(await ops.put("/v1/tenants/bob/settings", content=b"[]", headers=JSON), 400,
                            code="invalid_json")
        r = await ops.put("/v1/tenants/bob/settings", json={"allow_conjugate": True}, headers={"content-type": ""})
        assert_openai_error(r, 415, "Content-Type", "unsupported_media_type", named=False)
        r = await ops.put("/v1/tenants/bob/settings", json={"allow_conjugate": True})
        assert r.status_code == 200 and r.json() == {"tenant": "bob", "allow_conjugate": True}
        assert (await ops.put("/v1/tenants/bob/settings", json={})).json()["allow_conjugate"] is True


async def test_invalid_profiles_are_rejected_on_put(alice):
    r = await alice.put("/v1/steering/profiles/bad", json={"logits": {"bias": {"two words": 1}}})
    assert_openai_error(r, 400, "profile.logits.bias.two words", "invalid_steering")
    r = await alice.put("/v1/steering/profiles/bad", content=b"{nope", headers={"content-type": "application/json"})
    assert_openai_error(r, 400, code="invalid_json")
    assert r.json()["error"]["message"].startswith("the profile is not valid JSON: ")
    assert (await alice.put("/v1/steering/profiles/bad name!", json={"logits": {"bias": {"7": 1}}})).status_code \
        in (400, 404)
    assert (await alice.get("/v1/steering/profiles/bad")).status_code == 404
