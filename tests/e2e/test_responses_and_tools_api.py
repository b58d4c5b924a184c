"""The Responses API, tool calling and the small vLLM routes end to end: the official `openai` client against the
shared SmolLM2 server (which serves tools through the bundled smollm2-tools template and vLLM's hermes parser).

A response is a chat completion underneath, so greedy answers must equal the chat route's for the same messages,
steered or not; a forced tool call must name the tool and carry arguments that are JSON; /tokenize must count
what the chat route reports as its prompt."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import auth

QUESTION = "What is the capital of France?"
# strict: the grammar then holds the arguments to the schema too (else only to JSON, and a 135M model rambles)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]
OWL = {"logits": {"bias": {" owl": 100.0}}}  # forces the token: the answer must change


def chat(client, model, messages, max_tokens=30, **kw):
    return client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens, **kw)


def test_a_response_is_the_chat_completion_of_its_messages(openai_client, model_name):
    r = openai_client.responses.create(model=model_name, input=QUESTION, instructions="Answer briefly.",
                                       temperature=0, max_output_tokens=30)
    c = chat(openai_client, model_name, [{"role": "system", "content": "Answer briefly."},
                                         {"role": "user", "content": QUESTION}])
    assert r.object == "response" and r.output_text and r.output_text == c.choices[0].message.content
    assert r.status == ("completed" if c.choices[0].finish_reason == "stop" else "incomplete")
    assert (r.usage.input_tokens, r.usage.output_tokens) == (c.usage.prompt_tokens, c.usage.completion_tokens)
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_message_input_and_max_output_tokens(openai_client, model_name):
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "And of Italy?"}]
    r = openai_client.responses.create(model=model_name, input=messages, temperature=0, max_output_tokens=2)
    c = chat(openai_client, model_name, messages, max_tokens=2)
    assert r.output_text == c.choices[0].message.content and r.usage.output_tokens == 2
    assert c.choices[0].finish_reason == "length"  # "Rome." is 3 tokens
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"


def test_stream_with_the_official_helper(openai_client, model_name):
    deltas, types = [], []
    with openai_client.responses.stream(model=model_name, input=QUESTION, temperature=0,
                                        max_output_tokens=30) as stream:
        for event in stream:
            types.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert final.output_text == "".join(deltas) == chat(openai_client, model_name,
                                                        [{"role": "user", "content": QUESTION}]).choices[0].message.content
    assert "Paris" in final.output_text


def test_steering_through_extra_body_and_headers_as_on_chat(openai_client, model_name):
    messages = [{"role": "user", "content": "Tell me about birds."}]
    steered = openai_client.chat.completions.with_raw_response.create(
        model=model_name, messages=messages, temperature=0, max_tokens=20, extra_body={"steering": OWL})
    r = openai_client.responses.with_raw_response.create(model=model_name, input="Tell me about birds.",
                                                         temperature=0, max_output_tokens=20,
                                                         extra_body={"steering": OWL})
    assert r.headers["X-Steering-Applied"] == steered.headers["X-Steering-Applied"]
    assert "logits.bias" in r.headers["X-Steering-Applied"]
    assert r.parse().output_text == steered.parse().choices[0].message.content
    plain = chat(openai_client, model_name, messages, max_tokens=20).choices[0].message.content
    assert r.parse().output_text != plain  # the bias changed the answer, so the comparison above means something
    by_header = openai_client.responses.create(model=model_name, input="Tell me about birds.", temperature=0,
                                               max_output_tokens=20, extra_headers={"X-Steering": json.dumps(OWL)})
    assert by_header.output_text == r.parse().output_text


@pytest.mark.parametrize(("kw", "param"), [({"previous_response_id": "resp_1"}, "previous_response_id"),
                                           ({"store": True}, "store")])
def test_a_stateless_server_refuses_stored_state(openai_client, model_name, kw, param):
    with pytest.raises(openai.BadRequestError) as err:
        openai_client.responses.create(model=model_name, input=QUESTION, **kw)
    assert err.value.body["param"] == param


def test_a_forced_tool_call(openai_client, model_name):
    r = chat(openai_client, model_name, ASK_WEATHER, tools=[WEATHER], tool_choice="required", max_tokens=60)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id and call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city"}


def test_a_streamed_tool_call(openai_client, model_name):
    named = {"type": "function", "function": {"name": "get_weather"}}
    stream = chat(openai_client, model_name, ASK_WEATHER, tools=[WEATHER], tool_choice=named, max_tokens=60,
                  stream=True)
    name, arguments, finish = None, "", None
    for chunk in stream:
        for call in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            assert call.index == 0
            name = name or call.function.name
            arguments += call.function.arguments or ""
        finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
    assert name == "get_weather" and set(json.loads(arguments)) == {"city"}
    assert finish == "stop"  # a named tool choice finishes with "stop", as OpenAI's does
    whole = chat(openai_client, model_name, ASK_WEATHER, tools=[WEATHER], tool_choice=named, max_tokens=60)
    assert json.loads(whole.choices[0].message.tool_calls[0].function.arguments) == json.loads(arguments)


def test_tokenize_counts_the_chat_prompt_and_models_retrieve(openai_client, model_name, http):
    c = chat(openai_client, model_name, [{"role": "user", "content": QUESTION}], max_tokens=1)
    t = http.post("/tokenize", json={"model": model_name, "messages": [{"role": "user", "content": QUESTION}]})
    assert t.status_code == 200 and t.json()["count"] == c.usage.prompt_tokens
    d = http.post("/detokenize", json={"tokens": t.json()["tokens"]})
    assert QUESTION in d.json()["prompt"]
    assert openai_client.models.retrieve(model_name).id == model_name


def test_request_id_reaches_the_server_log(server, api_keys):
    r = httpx.get(f"{server.url}/v1/models", headers={**auth(api_keys["alice"]), "X-Request-Id": "e2e-trace-1"})
    assert r.headers["X-Request-Id"] == "e2e-trace-1"
    assert any('"GET /v1/models" 200' in line and "request_id=e2e-trace-1" in line
               for line in server.log_path.read_text().splitlines())
