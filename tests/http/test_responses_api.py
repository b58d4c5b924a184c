"""POST /v1/responses over HTTP on the fake engine: the Response object, the streamed events in OpenAI's order,
the prompt it renders (instructions and input as chat messages), steering as on chat, and the stateless 400s."""
from __future__ import annotations

import json

import pytest

from tests.http.fake_engine import NAME
from tests.http.test_validation import assert_openai_error

pytestmark = pytest.mark.anyio

BIAS = {"logits": {"bias": {"7": 3.5}}}


def events(r) -> list[dict]:
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]


async def test_text_input_answers_a_response_object(alice, served, tokenizer):
    r = await alice.post("/v1/responses", json={"model": NAME, "input": "hi", "max_output_tokens": 3,
                                                "instructions": "Be brief.", "temperature": 0.5, "top_p": 0.9,
                                                "metadata": {"k": "v"}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "response" and body["id"].startswith("resp_") and body["model"] == NAME
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    (item,) = body["output"]
    text = tokenizer.decode([served.engine.token]) * 3
    assert item["type"] == "message" and item["role"] == "assistant"
    assert item["content"] == [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    sent = served.engine.submitted[-1]
    assert body["usage"] == {"input_tokens": len(sent.prompt_ids), "input_tokens_details": {"cached_tokens": 0},
                             "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 0},
                             "total_tokens": len(sent.prompt_ids) + 3}
    assert (body["temperature"], body["top_p"], body["metadata"], body["store"]) == (0.5, 0.9, {"k": "v"}, False)
    # instructions are a system message, the text input one user message, rendered by the chat template
    expected = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert sent.prompt_text == expected
    assert (sent.params.max_tokens, sent.params.temperature, sent.params.top_p) == (3, 0.5, 0.9)


async def test_message_input_and_a_natural_stop(alice, served, tokenizer):
    served.engine.script = ["Par", "is."]
    messages = [{"role": "user", "content": "capital of France?"},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Paris",
                                                                      "annotations": []}]},
                {"role": "user", "content": [{"type": "input_text", "text": "again"}]}]
    r = await alice.post("/v1/responses", json={"model": NAME, "input": messages})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "completed" and r.json()["incomplete_details"] is None
    assert r.json()["output"][0]["content"][0]["text"] == "Paris."
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "capital of France?"},
                                              {"role": "assistant", "content": "Paris"},
                                              {"role": "user", "content": "again"}], tokenize=False,
                                             add_generation_prompt=True)
    assert served.engine.submitted[-1].prompt_text == expected


async def test_stream_sends_the_events_in_order(alice, served):
    served.engine.script = ["Hel", "lo", "!"]
    r = await alice.post("/v1/responses", json={"model": NAME, "input": "hi", "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    got = events(r)
    assert [e["type"] for e in got] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    assert [e["sequence_number"] for e in got] == list(range(len(got)))
    assert [e["delta"] for e in got if e["type"] == "response.output_text.delta"] == ["Hel", "lo", "!"]
    item_ids = {e["item_id"] for e in got if "item_id" in e}
    assert len(item_ids) == 1 and item_ids == {got[2]["item"]["id"]}
    assert got[0]["response"]["status"] == "in_progress" and got[0]["response"]["output"] == []
    final = got[-1]["response"]
    assert final["id"] == got[0]["response"]["id"] and final["status"] == "completed"
    assert final["output"] == [got[-2]["item"]] and got[-3]["part"]["text"] == got[-4]["text"] == "Hello!"
    assert final["usage"]["output_tokens"] == sum(len(served.engine.tokenizer.encode(p, add_special_tokens=False))
                                                  for p in ["Hel", "lo", "!"])


async def test_stream_cut_by_max_output_tokens_ends_incomplete(alice):
    r = await alice.post("/v1/responses", json={"model": NAME, "input": "hi", "stream": True,
                                                "max_output_tokens": 2})
    last = events(r)[-1]
    assert last["type"] == "response.incomplete" and last["response"]["status"] == "incomplete"


async def test_steering_as_on_chat(alice, served):
    body = {"model": NAME, "input": "hi", "max_output_tokens": 2}
    chat = await alice.post("/v1/chat/completions", json={"model": NAME, "max_tokens": 2, "steering": BIAS,
                                                          "messages": [{"role": "user", "content": "hi"}]})
    r = await alice.post("/v1/responses", json={**body, "steering": BIAS})
    assert r.status_code == 200 and r.headers["X-Steering-Applied"] == chat.headers["X-Steering-Applied"]
    assert "logits.bias" in r.headers["X-Steering-Applied"]
    assert served.engine.submitted[-1].params.extra_args == served.engine.submitted[-2].params.extra_args
    r = await alice.post("/v1/responses", json=body, headers={"X-Steering": json.dumps(BIAS)})
    assert r.headers["X-Steering-Applied"] == chat.headers["X-Steering-Applied"]
    r = await alice.post("/v1/responses", json={**body, "steering": {"logits": {"bias": {"7": 1e9}}}})
    assert_openai_error(r, 400, "steering.logits.bias")


@pytest.mark.parametrize(("extra", "param"), [
    ({"store": True}, "store"),
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"background": True}, "background"),
    ({"tools": [{"type": "function", "name": "f"}]}, "tools"),
    ({"max_output_tokens": 5000}, "max_output_tokens"),  # beyond the context: named as sent, not as max_tokens
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"n": 2}, "n"),
    ({"text": {"format": {"type": "json_object"}}}, "text.format"),
])
async def test_what_a_stateless_server_refuses_is_a_400_naming_the_field(alice, extra, param):
    r = await alice.post("/v1/responses", json={"model": NAME, "input": "hi", **extra})
    assert_openai_error(r, 400, param, named=False)


async def test_store_false_is_fine_and_the_model_is_checked(alice):
    r = await alice.post("/v1/responses", json={"model": NAME, "input": "hi", "store": False, "max_output_tokens": 1})
    assert r.status_code == 200 and r.json()["store"] is False
    r = await alice.post("/v1/responses", json={"model": "nope", "input": "hi"})
    assert_openai_error(r, 404, "model")
