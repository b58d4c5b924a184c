"""What the generation routes answer over HTTP (on a fake engine): the OpenAI shapes, the steering headers, and
errors of the X-Steering headers."""
from __future__ import annotations

import json

import pytest

from tests.http.fake_engine import NAME
from tests.http.test_validation import assert_openai_error

pytestmark = pytest.mark.anyio

CHAT = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
BIAS = {"logits": {"bias": {"7": 3.5}}}


async def test_chat_and_completion_shapes(alice, served):
    r = await alice.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200 and r.json()["object"] == "chat.completion" and r.json()["id"].startswith("chatcmpl-")
    choice = r.json()["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 3
    assert served.engine.submitted[-1].prompt_text.endswith("<|im_start|>assistant\n")
    r = await alice.post("/v1/completions", json={"model": NAME, "prompt": ["a", "b"], "max_tokens": 2, "logprobs": 0})
    assert r.status_code == 200 and r.json()["object"] == "text_completion"
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]
    assert len(r.json()["choices"][0]["logprobs"]["token_logprobs"]) == 2


async def test_unsteered_response_says_so(alice):
    r = await alice.post("/v1/chat/completions", json=CHAT)
    assert r.headers["x-steering-applied"] == "; methods="


@pytest.mark.parametrize("where", ["body", "header", "profile"])
async def test_steered_response_names_its_methods(alice, where):
    headers, steering = {}, {}
    if where == "body":
        steering = {"steering": BIAS}
    elif where == "header":
        headers["X-Steering"] = json.dumps(BIAS)
    else:
        rules = {"logits": {"rules": {"diversity": 0.5}}}
        assert (await alice.put("/v1/steering/profiles/fruit", json=rules)).status_code == 200
        headers["X-Steering-Profile"] = "fruit"
    completion = {"model": NAME, "prompt": "x", "max_tokens": 2, **steering}
    for path, body in (("/v1/chat/completions", {**CHAT, **steering}), ("/v1/completions", completion)):
        r = await alice.post(path, json=body, headers=headers)
        assert r.status_code == 200, r.text
        fingerprint, methods = r.headers["x-steering-applied"].split("; ")
        assert len(fingerprint) == 16
        assert methods == ("methods=logits.rules" if where == "profile" else "methods=logits.bias")


async def test_streaming_carries_the_header_and_chunks(alice):
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}, "steering": BIAS}
    async with alice.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-steering-applied"].endswith("methods=logits.bias")
        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("value, reason", [("{not json", "not valid JSON"), ("[1]", "JSON object"),
                                           ("x" * 17000, "longer than")])
async def test_bad_header_spec_names_the_header(alice, value, reason):
    r = await alice.post("/v1/chat/completions", json=CHAT, headers={"X-Steering": value})
    assert_openai_error(r, 400, "X-Steering", "invalid_steering")
    assert r.json()["error"]["param"] == "X-Steering" and reason in r.json()["error"]["message"]


async def test_bad_profile_header_and_stats_header(alice):
    r = await alice.post("/v1/chat/completions", json=CHAT, headers={"X-Steering-Profile": "a,,b"})
    assert_openai_error(r, 400, "X-Steering-Profile")
    r = await alice.post("/v1/chat/completions", json=CHAT, headers={"X-Steering-Stats": "everything"})
    assert_openai_error(r, 400, "X-Steering-Stats")
    r = await alice.post("/v1/chat/completions", json=CHAT, headers={"X-Steering-Stats": "routed_experts"})
    assert_openai_error(r, 400, "X-Steering-Stats")
    assert "dense model" in r.json()["error"]["message"]


async def test_models_lists_the_served_model(alice):
    r = await alice.get("/v1/models")
    assert r.json() == {"object": "list", "data": [{"id": NAME, "object": "model", "created": 0,
                                                    "owned_by": "steerserve", "max_model_len": 1024}]}
