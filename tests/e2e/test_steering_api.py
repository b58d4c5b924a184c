"""The steering API end to end: sources and their precedence, the applied header, profiles, tenants. Its pure
HTTP behaviour (auth, header and body errors, the schema) is tested in process, in tests/http/."""
from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import auth

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture()
def chat(http, model_name):
    def send(steering=None, headers=None, client=None, **extra):
        body = {"model": model_name, "messages": CAPITAL, "temperature": 0, "max_tokens": 6, **extra}
        if steering is not None:
            body["steering"] = steering
        return (client or http).post("/v1/chat/completions", json=body, headers=headers or {})
    return send


def forced(word: str) -> dict:
    """A spec that makes `word` (one token) the greedy choice at every step."""
    return {"logits": {"bias": {word: 100.0}}}


def text(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_unsteered_response_says_so(chat):
    r = chat()
    assert r.headers["x-steering-applied"] == "; methods="
    assert "Paris" in text(r)


def test_body_steering_is_applied_and_reported(chat):
    r = chat(forced(" banana"))
    assert text(r) == " banana" * 6
    fingerprint, methods = r.headers["x-steering-applied"].split("; ")
    assert len(fingerprint) == 16 and methods == "methods=logits.bias"


def test_header_steering_is_applied(chat):
    assert text(chat(headers={"X-Steering": json.dumps(forced(" apple"))})) == " apple" * 6


def test_openai_client_reaches_steering_through_extra_body(openai_client, model_name):
    r = openai_client.chat.completions.with_raw_response.create(
        model=model_name, messages=CAPITAL, temperature=0, max_tokens=3, extra_body={"steering": forced(" cherry")})
    assert r.parse().choices[0].message.content == " cherry" * 3
    assert r.headers["x-steering-applied"].endswith("methods=logits.bias")


def test_streaming_carries_steering_and_header(http, model_name):
    body = {"model": model_name, "messages": CAPITAL, "temperature": 0, "max_tokens": 4, "stream": True,
            "steering": forced(" plum")}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["x-steering-applied"].endswith("methods=logits.bias")
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == " plum" * 4


def test_precedence_profile_then_header_then_body(http, chat):
    assert http.put("/v1/steering/profiles/fruit", json=forced(" kiwi")).status_code == 200
    profile = {"X-Steering-Profile": "fruit"}
    header = {**profile, "X-Steering": json.dumps(forced(" lime"))}
    assert text(chat(headers=profile)) == " kiwi" * 6
    assert text(chat(headers=header)) == " lime" * 6
    assert text(chat(forced(" pear"), headers=header)) == " pear" * 6


def test_sources_merge_per_method(http, chat):
    rules = {"logits": {"rules": {"token_deltas": {" Paris": -100.0}}}}
    assert http.put("/v1/steering/profiles/no-paris", json=rules).status_code == 200
    r = chat(forced(" fig"), headers={"X-Steering-Profile": "no-paris"}, max_tokens=3)
    assert r.headers["x-steering-applied"].endswith("methods=logits.bias,logits.rules")
    only_rules = chat(headers={"X-Steering-Profile": "no-paris"}, max_tokens=12)
    assert "Paris" not in text(only_rules) and "Paris" in text(chat(max_tokens=12))


def test_completions_take_steering_too(http, model_name):
    r = http.post("/v1/completions", json={"model": model_name, "prompt": "Hello", "max_tokens": 3,
                                           "temperature": 0, "steering": forced(" grape")})
    assert r.json()["choices"][0]["text"] == " grape" * 3


@pytest.mark.parametrize("spec, field", [
    ({"logits": {"bias": {"two words": 1.0}}}, "steering.logits.bias.two words"),
    ({"logits": {"bias": {"49152": 1.0}}}, "steering.logits.bias.49152"),
    ({"logits": {"bias": {" a": 1000.0}}}, "steering.logits.bias. a"),
    ({"logits": {"rules": {}}}, "steering.logits.rules"),
    ({"logits": {"rules": {"preset": "nope"}}}, "steering.logits.rules.preset"),
    ({"attention": {"sink": {"gamma": 0}}}, "steering.attention.sink.gamma"),
    ({"experts": {"off": ["1.0"]}}, "steering.experts"),
    ({"unknown": 1}, "steering.unknown"),
    ({"version": 2}, "steering.version"),
])
def test_unappliable_steering_is_400_naming_the_field(chat, spec, field):
    r = chat(spec)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field and field in r.json()["error"]["message"]


def test_profiles_are_tenant_scoped(server, api_keys, chat):
    alice, bob, ops = (httpx.Client(base_url=server.url, headers=auth(api_keys[k])) for k in ("alice", "bob", "ops"))
    assert alice.put("/v1/steering/profiles/secret", json=forced(" tiger")).status_code == 200
    assert bob.get("/v1/steering/profiles/secret").status_code == 404
    assert chat(headers={"X-Steering-Profile": "secret"}, client=bob).status_code == 404
    assert "secret" not in [p["name"] for p in bob.get("/v1/steering/profiles").json()["data"]]
    assert bob.delete("/v1/steering/profiles/secret").status_code == 404
    assert text(chat(headers={"X-Steering-Profile": "secret"}, client=alice)) == " tiger" * 6
    # global profiles: admins write them, everyone reads them, a tenant's own profile shadows one
    assert bob.put("/v1/steering/profiles/house?scope=global", json=forced(" lemon")).status_code == 403
    assert ops.put("/v1/steering/profiles/house?scope=global", json=forced(" lemon")).status_code == 200
    assert text(chat(headers={"X-Steering-Profile": "house"}, client=bob)) == " lemon" * 6
    assert alice.put("/v1/steering/profiles/house", json=forced(" orange")).status_code == 200
    assert text(chat(headers={"X-Steering-Profile": "house"}, client=alice)) == " orange" * 6
    assert {p["scope"] for p in bob.get("/v1/steering/profiles").json()["data"] if p["name"] == "house"} == {"global"}


def test_tenants_do_not_share_prefix_cache(server, api_keys, model_name):
    prompt = "The history of the printing press begins " + "with movable type and ink, " * 60
    body = {"model": model_name, "prompt": prompt, "max_tokens": 1, "temperature": 0}

    def cached(key: str) -> int:
        r = httpx.post(f"{server.url}/v1/completions", json=body, headers=auth(api_keys[key]), timeout=60)
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    cached("alice")
    assert cached("alice") > 0, "the same tenant should hit its own prefix cache"
    assert cached("bob") == 0, "another tenant must not reuse alice's KV blocks"


def test_logits_steering_leaves_the_kv_of_later_requests_exact(http, model_name):
    """A steered request, then the same prompt unsteered: the unsteered logprobs equal an unsteered-only run."""
    prompt = "In the quiet library, the old clock " + "ticked and ticked again, " * 40
    body = {"model": model_name, "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 0}
    baseline = http.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]["token_logprobs"]
    http.post("/v1/completions", json={**body, "steering": forced(" zebra")})
    after = http.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]["token_logprobs"]
    assert after == pytest.approx(baseline, abs=1e-5)
