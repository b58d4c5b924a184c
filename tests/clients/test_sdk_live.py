"""The client SDK against the real server (the session's SmolLM2 fixture): steered calls, profiles, streaming,
typed errors, and the steering schema's agreement with the server's."""
from __future__ import annotations

import asyncio

import pytest
import steerserve_client as sc
from steerserve_client import EosRamp, Logits, Rules, Steering

from .schemas import differences, resolve

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
RESERVED: set[str] = set()  # families the server reserves and the SDK does not model yet


def forced(word: str) -> Steering:
    """A spec that makes `word` (one token) the greedy choice at every step."""
    return Steering(logits=Logits(bias={word: 100.0}))


@pytest.fixture(scope="module")
def client(server, api_keys):
    with sc.SteerClient(server.url, api_keys["alice"], max_retries=0, timeout=120) as c:
        yield c


def test_a_big_bias_forces_the_output_and_the_applied_header_says_so(client):
    r = client.chat(CAPITAL, steering=forced(" banana"), temperature=0, max_tokens=4)
    assert r.text == " banana" * 4
    assert r.applied.methods == ("logits.bias",) and len(r.applied.fingerprint) == 16
    again = client.chat(CAPITAL, steering=forced(" banana"), temperature=0, max_tokens=1)
    other = client.chat(CAPITAL, steering=forced(" cherry"), temperature=0, max_tokens=1)
    assert again.applied == r.applied and other.applied.fingerprint != r.applied.fingerprint


def test_unsteered_chat_is_plain_openai(client):
    r = client.chat(CAPITAL, temperature=0, max_tokens=12)
    assert "Paris" in r.text and r.applied == sc.Applied("", ()) and r.usage.completion_tokens <= 12


def test_rules_preset_and_completions(client):
    r = client.chat(CAPITAL, steering=Steering(logits=Logits(rules=Rules.preset("hewitt2024"))), temperature=0,
                    max_tokens=8)
    assert r.applied.methods == ("logits.rules",)
    c = client.complete("Hello", steering=forced(" grape"), temperature=0, max_tokens=3)
    assert c.text == " grape" * 3 and c.applied.methods == ("logits.bias",)


def test_streaming_yields_the_steered_text_and_the_applied_header(client):
    with client.chat(CAPITAL, steering=forced(" plum"), temperature=0, max_tokens=4, stream=True,
                     stream_options={"include_usage": True}) as stream:
        assert stream.applied.methods == ("logits.bias",)
        chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == " plum" * 4
    assert chunks[-1].usage.completion_tokens == 4


def test_profile_round_trip(client):
    name = "sdk-round-trip"
    spec = Steering(logits=Logits(bias={" kiwi": 100.0}, rules=Rules(eos_ramp=EosRamp(max=8, window=60))))
    put = client.profiles.put(name, spec)
    assert (put.name, put.scope, put.steering) == (name, "tenant", spec)
    assert client.profiles.get(name).steering == spec
    assert client.profiles.get(name, scope="tenant").steering == spec
    assert (name, "tenant") in [(p.name, p.scope) for p in client.profiles.list()]
    r = client.chat(CAPITAL, profiles=[name], temperature=0, max_tokens=3)
    assert r.text == " kiwi" * 3 and r.applied.methods == ("logits.bias", "logits.rules")
    # a later source replaces a profile's method: the body's bias wins over the profile's
    assert client.chat(CAPITAL, profiles=name, steering=forced(" lime"), temperature=0, max_tokens=2).text == \
        " lime" * 2
    client.profiles.delete(name)
    with pytest.raises(sc.ProfileNotFound) as info:
        client.profiles.get(name)
    assert info.value.status == 404
    with pytest.raises(sc.ProfileNotFound) as info:
        client.chat(CAPITAL, profiles=[name], max_tokens=1)
    assert info.value.param == "X-Steering-Profile"


def test_a_spec_the_model_cannot_apply_is_a_steering_error_naming_the_field(client):
    with pytest.raises(sc.SteeringError) as info:
        client.chat(CAPITAL, steering=Steering(logits=Logits(bias={"two words": 1.0})), max_tokens=1)
    assert (info.value.param, info.value.status) == ("steering.logits.bias.two words", 400)
    assert "two words" in info.value.message
    with pytest.raises(sc.SteeringError) as info:
        client.chat(CAPITAL, steering={"attention": {"sink": {"layers": [99]}}}, max_tokens=1)  # via a plain dict
    assert info.value.param == "steering.attention.sink.layers"
    with pytest.raises(sc.SteeringError) as info:
        client.chat(CAPITAL, steering={"experts": {"off": ["1.0"]}}, max_tokens=1)  # dense model, via a plain dict
    assert info.value.param == "steering.experts"
    with pytest.raises(sc.SteeringError) as info:
        client.profiles.put("sdk-bad", Steering(logits=Logits(bias={"two words": 1.0})))
    assert info.value.param.startswith("profile.logits.bias")
    with pytest.raises(sc.InvalidRequest) as info:
        client.chat(CAPITAL, max_tokens=1, extra_body={"no_such_field": 1})
    assert type(info.value) is sc.InvalidRequest and info.value.param == "no_such_field"


def test_wrong_key_and_wrong_role_are_typed(server, api_keys):
    with sc.SteerClient(server.url, "sk-steer-wrong", max_retries=0) as stranger:
        with pytest.raises(sc.AuthenticationError) as info:
            stranger.chat(CAPITAL, model="smollm2-135m-instruct", max_tokens=1)
        assert info.value.status == 401
        with pytest.raises(sc.AuthenticationError):
            stranger.profiles.list()
    with sc.SteerClient(server.url, api_keys["bob"], max_retries=0) as bob:
        with pytest.raises(sc.PermissionDenied) as info:
            bob.profiles.put("sdk-house", forced(" lemon"), scope="global")
        assert (info.value.status, info.value.param) == (403, "scope")


def test_sdk_schema_agrees_with_the_live_server(client):
    """Drift guard: the SDK models exactly the server's non-reserved families, field for field."""
    server = client.schema()
    sdk = Steering.model_json_schema()
    assert set(server["properties"]) - RESERVED == set(sdk["properties"]), "a family was added or removed"
    server_top = {**server, "properties": {k: v for k, v in server["properties"].items() if k not in RESERVED}}
    assert differences(resolve(sdk, sdk.get("$defs", {})), resolve(server_top, server.get("$defs", {}))) == []


def test_async_client_against_the_server(server, api_keys):
    async def main() -> None:
        async with sc.AsyncSteerClient(server.url, api_keys["alice"], max_retries=0, timeout=120) as client:
            r = await client.chat(CAPITAL, steering=forced(" banana"), temperature=0, max_tokens=2)
            assert r.text == " banana" * 2
            stream = await client.chat(CAPITAL, steering=forced(" plum"), temperature=0, max_tokens=2, stream=True)
            async with stream:
                assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == " plum" * 2
            with pytest.raises(sc.ProfileNotFound):
                await client.profiles.get("sdk-missing")

    asyncio.run(main())
