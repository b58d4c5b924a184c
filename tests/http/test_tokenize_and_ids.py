"""vLLM's /tokenize and /detokenize (checked against the HF tokenizer and the chat route's own prompt), GET
/v1/models/{id}, and X-Request-Id on every response (echoed or made) and in the request's log line."""
from __future__ import annotations

import logging
import re

import pytest

from tests.http.fake_engine import MAX_MODEL_LEN, NAME
from tests.http.test_validation import assert_openai_error

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


async def test_tokenize_a_prompt_as_the_tokenizer_does(alice, tokenizer):
    r = await alice.post("/tokenize", json={"model": NAME, "prompt": "Hello world", "return_token_strs": True})
    assert r.status_code == 200, r.text
    ids = tokenizer("Hello world")["input_ids"]  # add_special_tokens defaults to true for a prompt, as in vLLM
    assert ids[0] == tokenizer.bos_token_id
    assert r.json() == {"count": len(ids), "max_model_len": MAX_MODEL_LEN, "tokens": ids,
                        "token_strs": tokenizer.convert_ids_to_tokens(ids)}
    r = await alice.post("/tokenize", json={"prompt": "Hello world", "add_special_tokens": False})
    assert r.json()["tokens"] == ids[1:] and r.json()["token_strs"] is None


async def test_tokenize_messages_gives_the_chat_prompt(alice, served, tokenizer):
    r = await alice.post("/tokenize", json={"model": NAME, "messages": MESSAGES})
    await alice.post("/v1/chat/completions", json={"model": NAME, "messages": MESSAGES, "max_tokens": 1})
    assert r.json()["tokens"] == served.engine.submitted[-1].prompt_ids  # what chat completions sends the engine
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert r.json()["tokens"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    r = await alice.post("/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False,
                                            "continue_final_message": True})
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, continue_final_message=True)
    assert r.json()["tokens"] == tokenizer(text, add_special_tokens=False)["input_ids"]


async def test_detokenize_inverts_tokenize(alice, tokenizer):
    ids = (await alice.post("/tokenize", json={"prompt": "Round trip, twice.", "add_special_tokens": False})
           ).json()["tokens"]
    r = await alice.post("/detokenize", json={"model": NAME, "tokens": ids})
    assert r.status_code == 200 and r.json() == {"prompt": "Round trip, twice."}
    assert r.json()["prompt"] == tokenizer.decode(ids)


@pytest.mark.parametrize(("route", "body", "param"), [
    ("/tokenize", {}, None),
    ("/tokenize", {"prompt": "a", "messages": MESSAGES}, None),
    ("/tokenize", {"prompt": "a", "chat_template": "{{ 1 }}"}, "chat_template"),  # only the served template
    ("/tokenize", {"messages": MESSAGES, "continue_final_message": True}, None),
    ("/tokenize", {"prompt": "a", "model": "other"}, "model"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": [10**9]}, "tokens"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
])
async def test_bad_tokenize_bodies_are_4xx_naming_the_field(alice, route, body, param):
    r = await alice.post(route, json=body)
    assert_openai_error(r, 404 if body.get("model") == "other" else 400, param, named=False)


async def test_tokenize_needs_a_key(served):
    async with served.client(None) as anonymous:
        assert_openai_error(await anonymous.post("/tokenize", json={"prompt": "a"}), 401)


async def test_get_one_model(alice):
    listed = (await alice.get("/v1/models")).json()["data"]
    r = await alice.get(f"/v1/models/{NAME}")
    assert r.status_code == 200 and r.json() == listed[0]
    assert_openai_error(await alice.get("/v1/models/other"), 404, "model", code="model_not_found", named=False)
    assert_openai_error(await alice.get(f"/v1/models/{NAME}:ahoy"), 404, "model", named=False)  # adapters are off


async def test_request_id_is_echoed_or_made_and_logged(alice, caplog):
    with caplog.at_level(logging.INFO, logger="steerserve.access"):
        r = await alice.get("/v1/models", headers={"X-Request-Id": "trace-42/abc"})
        made = await alice.post("/v1/chat/completions", json={"model": NAME, "messages": MESSAGES, "max_tokens": 1})
        bad = await alice.get("/health", headers={"X-Request-Id": "has spaces"})
        error = await alice.post("/v1/chat/completions", json={"model": NAME})
        stream = await alice.post("/v1/responses", json={"model": NAME, "input": "hi", "stream": True,
                                                         "max_output_tokens": 2})
    assert r.headers["X-Request-Id"] == "trace-42/abc"
    ids = [x.headers["X-Request-Id"] for x in (made, bad, error, stream)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and len(set(ids)) == 4
    assert error.status_code == 400 and stream.status_code == 200
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "steerserve.access"]
    assert any('"GET /v1/models" 200' in line and line.endswith("request_id=trace-42/abc") for line in lines)
    for rid, status in zip(ids, (200, 200, 400, 200), strict=True):
        assert sum(line.endswith(f"request_id={rid}") and f" {status} " in line for line in lines) == 1, lines
