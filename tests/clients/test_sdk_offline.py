"""The client SDK without a server: what goes on the wire, what comes back, how errors map, the public API.

Every call runs through an in-process `httpx.MockTransport` that records each request and answers as the
steerserve server would.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import httpx
import pytest
import steerserve_client as sc
from pydantic import ValidationError
from steerserve_client import (
    Attention,
    Conjugate,
    EosRamp,
    Experts,
    KeyRange,
    Logits,
    Rules,
    Sink,
    Span,
    Steering,
    Urial,
)

BASE = "http://steer.test"
KEY = "sk-steer-test"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
APPLIED = "0123456789abcdef; methods=logits.bias,logits.rules"


def chat_json(content: str = " banana") -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                         "finish_reason": "length"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}


def sse(*events: dict) -> bytes:
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


def chunk(content: str) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": {"content": content}, "logprobs": None, "finish_reason": None}]}


def error(status: int, param: str | None, message: str = "bad", code: str | None = None) -> httpx.Response:
    kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
            404: "not_found_error", 503: "service_unavailable"}[status]
    return httpx.Response(status, json={"error": {"message": message, "type": kind, "param": param, "code": code}})


class Wire:
    """Records requests; answers each with `reply(request)` (default: a steered chat completion)."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.reply: Callable[[httpx.Request], httpx.Response] = lambda _: httpx.Response(
            200, json=chat_json(), headers={"X-Steering-Applied": APPLIED})

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "served", "object": "model",
                                                                          "created": 0, "owned_by": "steerserve"}]})
        return self.reply(request)

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]

    def body(self) -> dict:
        return json.loads(self.last.content)


@pytest.fixture()
def wire() -> Wire:
    return Wire()


@pytest.fixture()
def client(wire: Wire) -> sc.SteerClient:
    http = httpx.Client(transport=httpx.MockTransport(wire))
    return sc.SteerClient(BASE, KEY, model="m", max_retries=0, http_client=http)


# --- public API ---------------------------------------------------------------------------------------------

def test_public_api_is_pinned():
    assert sc.__all__ == [
        "APIConnectionError", "Adapter", "AdapterNotFound", "Adapters", "Applied", "AsyncAdapters", "AsyncProfiles",
        "AsyncSteerClient", "AsyncSteeredStream", "AsyncVectors", "Attention",
        "AttentionMode", "AuthenticationError", "Conjugate", "EosRamp", "Experts", "InvalidRequest", "KeyRange", "Logits",
        "NotFound", "PermissionDenied", "Profile", "ProfileNotFound", "Profiles", "Prompt", "Rules", "ServerError",
        "Sink", "Span", "SteerClient", "SteerServeError", "SteeredResponse", "SteeredStream", "Steering",
        "SteeringError", "StoredVector", "Urial", "VectorItem", "VectorNotFound", "Vectors", "__version__",
        "adapter_model",
    ]
    assert sc.__all__ == sorted(sc.__all__)
    public = {n for n in vars(sc) if not n.startswith("_")} - {"adapters", "client", "errors", "profiles", "results",
                                                                   "steering", "vectors"}
    assert public | {"__version__"} == set(sc.__all__), "every public name is in __all__ and vice versa"


def test_sdk_imports_nothing_of_the_server():
    import subprocess
    import sys
    code = ("import sys, steerserve_client; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'vllm', 'steerserve')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- steering models ----------------------------------------------------------------------------------------

def test_builders_read_naturally_and_serialise_without_unset_fields():
    spec = Steering(logits=Logits(bias={" Paris": 2.0}, rules=Rules.preset("hewitt2024")))
    assert spec.to_json() == {"version": 1, "logits": {"bias": {" Paris": 2.0}, "rules": {"preset": "hewitt2024"}}}
    rules = Rules(eos_ramp=EosRamp(max=8, window=60), token_deltas={"42": -1.5}, diversity=0.5)
    assert rules.to_json() == {"eos_ramp": {"max": 8.0, "window": 60}, "token_deltas": {"42": -1.5}, "diversity": 0.5}
    assert Rules.preset("hewitt2024", diversity=0.5).to_json() == {"preset": "hewitt2024", "diversity": 0.5}
    assert Rules(preset="hewitt2024").preset == "hewitt2024"  # the instance still reads the field


@pytest.mark.parametrize("build", [
    lambda: Logits(bias={" a": 101.0}),
    lambda: Logits(bias={" a": float("nan")}),
    lambda: Logits(bias={" a": float("inf")}),
    lambda: Logits(bias={str(i): 1.0 for i in range(1025)}),
    lambda: Logits(temperature=2.0),
    lambda: Rules(),
    lambda: Rules(preset="nope"),
    lambda: Rules(diversity=-1),
    lambda: EosRamp(max=8, window=0),
    lambda: Steering(version=2),
    lambda: Steering(prompt={"urial": {"examples": -1}}),
    lambda: Experts(off=["1"]),
    lambda: Experts(on=["1.2"], on_mode="strong"),
    lambda: Sink(gamma=0),
    lambda: Sink(per_head={"1-2": 2.0}),
    lambda: Span(target="tool", alpha=0.5),
    lambda: Span(target=KeyRange(start=4, end=4), alpha=0.5),
    lambda: Attention(spans=[]),
    lambda: Urial(examples=-1),
    lambda: Urial(variant="../x"),
    lambda: Conjugate(language="en"),
    lambda: Conjugate(language="fr", translate_back="yes"),
])
def test_invalid_specs_are_refused_locally(build):
    with pytest.raises(ValidationError):
        build()


def test_specs_are_values():
    a = Steering(logits=Logits(bias={" a": 1.0}))
    assert a == Steering.model_validate(a.to_json())
    with pytest.raises(ValidationError):
        a.logits = None


# --- what goes on the wire ----------------------------------------------------------------------------------

def test_chat_sends_steering_in_the_body_and_profiles_in_a_header(client, wire):
    spec = Steering(logits=Logits(bias={" banana": 100.0}))
    r = client.chat(MESSAGES, steering=spec, profiles=["concise", "house"], temperature=0, max_tokens=3)
    req = wire.last
    assert (req.method, str(req.url)) == ("POST", f"{BASE}/v1/chat/completions")
    assert wire.body() == {"model": "m", "messages": MESSAGES, "temperature": 0, "max_tokens": 3,
                           "steering": {"version": 1, "logits": {"bias": {" banana": 100.0}}}}
    assert req.headers["X-Steering-Profile"] == "concise,house"
    assert req.headers["Authorization"] == f"Bearer {KEY}"
    assert r.text == " banana" and r.choices[0].finish_reason == "length"
    assert r.applied == sc.Applied("0123456789abcdef", ("logits.bias", "logits.rules")) and r.applied.steered


def test_unsteered_call_sends_nothing_extra(client, wire):
    wire.reply = lambda _: httpx.Response(200, json=chat_json("Paris"), headers={"X-Steering-Applied": "; methods="})
    r = client.chat(MESSAGES)
    assert wire.body() == {"model": "m", "messages": MESSAGES}
    assert "X-Steering-Profile" not in wire.last.headers
    assert r.applied == sc.Applied("", ()) and not r.applied.steered


def test_dict_specs_pass_through_and_caller_extras_are_kept(client, wire):
    client.chat(MESSAGES, steering={"logits": {"bias": {"42": 1}}}, profiles="one",
                extra_body={"ignore_eos": True}, extra_headers={"X-Trace": "t1"})
    assert wire.body()["steering"] == {"logits": {"bias": {"42": 1}}} and wire.body()["ignore_eos"] is True
    assert wire.last.headers["X-Steering-Profile"] == "one" and wire.last.headers["X-Trace"] == "t1"


def test_complete_sends_prompt_and_reads_text(client, wire):
    wire.reply = lambda _: httpx.Response(200, json={
        "id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "text": " grape", "logprobs": None, "finish_reason": "length"}]},
        headers={"X-Steering-Applied": "abc; methods=logits.bias"})
    r = client.complete("Hello", steering=Steering(logits=Logits(bias={" grape": 9.0})), max_tokens=1)
    assert str(wire.last.url) == f"{BASE}/v1/completions"
    assert wire.body()["prompt"] == "Hello" and wire.body()["steering"]["logits"]["bias"] == {" grape": 9.0}
    assert r.text == " grape" and r.applied.methods == ("logits.bias",)


def test_model_defaults_to_the_served_one(wire):
    http = httpx.Client(transport=httpx.MockTransport(wire))
    client = sc.SteerClient(f"{BASE}/v1/", KEY, max_retries=0, http_client=http)  # /v1 and a slash are fine
    client.chat(MESSAGES)
    client.chat(MESSAGES)
    assert [r.url.path for r in wire.requests] == ["/v1/models", "/v1/chat/completions", "/v1/chat/completions"]
    assert wire.body()["model"] == "served"


def test_streaming_yields_chunks_and_the_applied_header_first(client, wire):
    wire.reply = lambda _: httpx.Response(200, content=sse(chunk(" plum"), chunk(" plum")), headers={
        "X-Steering-Applied": APPLIED, "content-type": "text/event-stream"})
    with client.chat(MESSAGES, steering=Steering(logits=Logits(bias={" plum": 50.0})), stream=True) as stream:
        assert stream.applied.fingerprint == "0123456789abcdef"
        text = "".join(c.choices[0].delta.content for c in stream)
    assert text == " plum plum" and wire.body()["stream"] is True and "steering" in wire.body()


def test_an_error_inside_a_stream_is_typed(client, wire):
    bad = {"error": {"message": "steering.logits: boom", "type": "invalid_request_error",
                     "param": "steering.logits", "code": None}}
    wire.reply = lambda _: httpx.Response(200, content=sse(chunk(" a"), bad),
                                          headers={"content-type": "text/event-stream"})
    stream = client.chat(MESSAGES, stream=True)
    assert stream.applied is None  # not a steerserve answer: no header, so nothing claimed
    with pytest.raises(sc.SteeringError) as info:
        list(stream)
    assert info.value.param == "steering.logits" and info.value.status is None


# --- errors -------------------------------------------------------------------------------------------------

ERRORS = [
    (error(400, "steering.logits.bias.two words", "steering.logits.bias.two words: 2 tokens"), sc.SteeringError,
     "steering.logits.bias.two words"),
    (error(400, "X-Steering-Profile", "must be a comma-separated list"), sc.SteeringError, "X-Steering-Profile"),
    (error(400, "X-Steering", "is not valid JSON"), sc.SteeringError, "X-Steering"),
    (error(400, "max_tokens", "max_tokens: too big"), sc.InvalidRequest, "max_tokens"),
    (error(401, None, "invalid API key"), sc.AuthenticationError, None),
    (error(403, "scope", "only admins"), sc.PermissionDenied, "scope"),
    (error(404, "X-Steering-Profile", "steering profile 'x' not found", "profile_not_found"), sc.ProfileNotFound,
     "X-Steering-Profile"),
    (error(404, "model", "The model 'x' does not exist", "model_not_found"), sc.NotFound, "model"),
    (error(503, None, "the model is still loading"), sc.ServerError, None),
    (httpx.Response(502, text="<html>bad gateway</html>"), sc.ServerError, None),
]


@pytest.mark.parametrize("response, kind, param", ERRORS)
def test_openai_errors_map_to_typed_errors(client, wire, response, kind, param):
    wire.reply = lambda _: response
    with pytest.raises(kind) as info:
        client.chat(MESSAGES)
    exc = info.value
    assert type(exc) is kind and isinstance(exc, sc.SteerServeError)
    assert (exc.param, exc.status) == (param, response.status_code)
    if response.headers.get("content-type") == "application/json":
        assert exc.message == response.json()["error"]["message"]


@pytest.mark.parametrize("response, kind, param", ERRORS)
def test_admin_errors_map_the_same_way(client, wire, response, kind, param):
    wire.reply = lambda _: response
    with pytest.raises(kind) as info:
        client.profiles.get("x")
    assert type(info.value) is kind and (info.value.param, info.value.status) == (param, response.status_code)


def test_a_steering_error_names_the_field_in_its_text():
    exc = sc.SteeringError("steering.logits.bias.x", "is 2 tokens", 400)
    assert "steering.logits.bias.x" in str(exc) and (exc.param, exc.message, exc.status) == (
        "steering.logits.bias.x", "is 2 tokens", 400)


def test_a_profile_put_rejected_for_its_spec_is_a_steering_error(client, wire):
    wire.reply = lambda _: error(400, "profile.logits.bias.two words", "profile.logits.bias.two words: 2 tokens")
    with pytest.raises(sc.SteeringError, match="two words"):
        client.profiles.put("p", {"logits": {"bias": {"two words": 1.0}}})


def test_unreachable_server_is_a_connection_error():
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    client = sc.SteerClient(BASE, KEY, model="m", max_retries=0,
                            http_client=httpx.Client(transport=httpx.MockTransport(refuse)))
    with pytest.raises(sc.APIConnectionError):
        client.chat(MESSAGES)
    with pytest.raises(sc.APIConnectionError):
        client.profiles.list()


# --- profiles and schema ------------------------------------------------------------------------------------

def test_profile_calls_on_the_wire(client, wire):
    spec = Steering(logits=Logits(rules=Rules(eos_ramp=EosRamp(max=8, window=60))))
    stored = {"logits": {"rules": {"eos_ramp": {"max": 8.0, "window": 60}}}}
    wire.reply = lambda _: httpx.Response(200, json={"name": "concise", "scope": "global", "spec": stored})
    p = client.profiles.put("concise", spec, scope="global")
    assert (wire.last.method, wire.last.url.path, dict(wire.last.url.params)) == (
        "PUT", "/v1/steering/profiles/concise", {"scope": "global"})
    assert json.loads(wire.last.content) == spec.to_json()
    assert wire.last.headers["Authorization"] == f"Bearer {KEY}"
    assert p.scope == "global" and p.steering.logits.rules.eos_ramp == EosRamp(max=8, window=60)

    wire.reply = lambda _: httpx.Response(200, json={"name": "a b/c", "spec": stored})
    assert client.profiles.get("a b/c").spec == stored
    assert wire.last.url.raw_path == b"/v1/steering/profiles/a%20b%2Fc" and not wire.last.url.params

    wire.reply = lambda _: httpx.Response(200, json={"object": "list", "data": [
        {"name": "concise", "scope": "tenant", "spec": stored, "updated": 1.5}]})
    assert [(p.name, p.scope, p.updated) for p in client.profiles.list()] == [("concise", "tenant", 1.5)]

    wire.reply = lambda _: httpx.Response(200, json={"name": "concise", "deleted": True})
    assert client.profiles.delete("concise") is None
    assert (wire.last.method, dict(wire.last.url.params)) == ("DELETE", {"scope": "tenant"})


def test_schema_is_fetched(client, wire):
    wire.reply = lambda _: httpx.Response(200, json={"type": "object"})
    assert client.schema() == {"type": "object"} and wire.last.url.path == "/v1/steering/schema"


# --- asyncio ------------------------------------------------------------------------------------------------

def test_async_client_chat_stream_and_profiles(wire):
    async def main() -> None:
        http = httpx.AsyncClient(transport=httpx.MockTransport(wire))
        async with sc.AsyncSteerClient(BASE, KEY, max_retries=0, http_client=http) as client:
            r = await client.chat(MESSAGES, steering=Steering(logits=Logits(bias={" banana": 9.0})), profiles=["p"])
            assert r.text == " banana" and r.applied.methods == ("logits.bias", "logits.rules")
            assert wire.body()["model"] == "served" and wire.last.headers["X-Steering-Profile"] == "p"

            wire.reply = lambda _: httpx.Response(200, content=sse(chunk(" a"), chunk(" b")), headers={
                "X-Steering-Applied": APPLIED, "content-type": "text/event-stream"})
            async with await client.chat(MESSAGES, stream=True) as stream:
                assert stream.applied.steered
                assert [c.choices[0].delta.content async for c in stream] == [" a", " b"]

            wire.reply = lambda _: error(404, "name", "steering profile 'x' not found", "profile_not_found")
            with pytest.raises(sc.ProfileNotFound):
                await client.profiles.get("x")
            wire.reply = lambda _: error(400, "steering.logits", "nope")
            with pytest.raises(sc.SteeringError):
                await client.chat(MESSAGES)
        await http.aclose()

    asyncio.run(main())


def test_prompt_methods_on_the_wire():
    spec = Steering(prompt=sc.Prompt(urial=Urial(variant="help", examples=2), conjugate=Conjugate(language="piglatin")))
    assert spec.to_json() == {"version": 1, "prompt": {
        "urial": {"variant": "help", "examples": 2},
        "conjugate": {"language": "piglatin", "translator": "self", "translate_back": True}}}
