"""Tool calling on chat completions over HTTP, on the fake engine with scripted model output: vLLM's `hermes`
parser turning `<tool_call>` text into `tool_calls` (whole and streamed), the forced-call constraint handed to
the engine, and every way a request with tools is refused (a 400 naming the field, never ignored tools)."""
from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from steerserve.server.frontend.tool_calls import chat_template
from steerserve.server.http.app import create_app
from steerserve.server.http.auth import KeyStore
from steerserve.server.stores.profiles import ProfileStore
from tests.http.conftest import App, _started
from tests.http.fake_engine import NAME, FakeEngine
from tests.http.test_responses_api import events
from tests.http.test_validation import assert_openai_error

pytestmark = pytest.mark.anyio

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
ASK = {"model": NAME, "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER],
       "max_tokens": 64}
CALL = ['<tool_call>\n{"name": "get_weather", ', '"arguments": {"city": ', '"Paris"}}\n</tool_call>']


@pytest.fixture
async def tooled(tmp_path: Path, tokenizer, api_keys) -> AsyncIterator[App]:
    """The app serving tools: the hermes parser and the bundled smollm2-tools template (set on a copy of the
    session's tokenizer, as the app sets it on its engine's)."""
    engine = FakeEngine(copy.deepcopy(tokenizer))
    app = create_app(lambda: engine, KeyStore.load(Path(api_keys["file"])), ProfileStore(tmp_path / "profiles.db"),
                     tool_call_parser="hermes", chat_template=chat_template("smollm2-tools"))
    async with app.router.lifespan_context(app):
        await _started(app)
        assert app.state.steerserve.error is None, app.state.steerserve.error
        yield App(app, engine, api_keys)


async def test_a_tool_call_comes_back_as_tool_calls(tooled):
    tooled.engine.script = CALL
    async with tooled.client() as alice:
        r = await alice.post("/v1/chat/completions", json=ASK)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    sent = tooled.engine.submitted[-1]
    assert json.dumps(WEATHER["function"]["parameters"]) in sent.prompt_text  # the template showed the tool
    assert sent.params.skip_special_tokens is False  # the parser asked to keep special tokens


async def test_streamed_tool_call_deltas_add_up_to_the_call(tooled):
    tooled.engine.script = CALL
    async with tooled.client() as alice:
        r = await alice.post("/v1/chat/completions", json={**ASK, "stream": True})
    chunks = [c for c in events(r) if c.get("choices")]
    calls = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    assert calls and calls[0]["id"] and calls[0]["function"]["name"] == "get_weather"
    assert {tc["index"] for tc in calls} == {0} and sum("id" in tc for tc in calls) == 1
    assert json.loads("".join(tc["function"].get("arguments", "") for tc in calls)) == {"city": "Paris"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert not any(c["choices"][0]["delta"].get("content") for c in chunks[1:])  # no <tool_call> text leaked


async def test_plain_text_stays_content(tooled):
    tooled.engine.script = ["It is ", "sunny."]
    async with tooled.client() as alice:
        r = await alice.post("/v1/chat/completions", json=ASK)
        s = await alice.post("/v1/chat/completions", json={**ASK, "stream": True})
    choice = r.json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "It is sunny."} and choice["finish_reason"] == "stop"
    chunks = [c for c in events(s) if c.get("choices")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "It is sunny."
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
async def test_a_forced_call_constrains_sampling(tooled, choice):
    tooled.engine.script = CALL
    async with tooled.client() as alice:
        r = await alice.post("/v1/chat/completions", json={**ASK, "tool_choice": choice})
    assert r.status_code == 200, r.text
    structured = tooled.engine.submitted[-1].params.structured_outputs
    assert structured is not None and "get_weather" in json.dumps(structured.structural_tag or structured.json)
    out = r.json()["choices"][0]
    assert out["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert out["finish_reason"] == ("tool_calls" if choice == "required" else "stop")  # as OpenAI and vLLM


async def test_tool_choice_none_renders_no_tools(tooled, served):
    tooled.engine.script = CALL
    async with tooled.client() as alice:
        r = await alice.post("/v1/chat/completions", json={**ASK, "tool_choice": "none"})
    assert "get_weather" not in tooled.engine.submitted[-1].prompt_text
    assert "tool_calls" not in r.json()["choices"][0]["message"]
    async with served.client() as alice:  # and so is fine where tools are not served at all
        r = await alice.post("/v1/chat/completions", json={**ASK, "tool_choice": "none"})
    assert r.status_code == 200


async def test_history_with_tool_calls_and_results_is_rendered(tooled):
    messages = [*ASK["messages"],
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    async with tooled.client() as alice:
        r = await alice.post("/v1/chat/completions", json={**ASK, "messages": messages})
    assert r.status_code == 200, r.text
    prompt = tooled.engine.submitted[-1].prompt_text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in prompt


async def test_without_a_parser_tools_are_a_400(served):
    async with served.client() as alice:
        r = await alice.post("/v1/chat/completions", json=ASK)
    # the fake model's own template ignores tools: said first, since no parser could help
    assert_openai_error(r, 400, "tools", code="tools_unsupported")
    assert "template" in r.json()["error"]["message"]


async def test_a_template_that_ignores_tools_is_a_400_even_with_a_parser(tmp_path, tokenizer, api_keys):
    engine = FakeEngine(tokenizer)
    app = create_app(lambda: engine, KeyStore.load(Path(api_keys["file"])), ProfileStore(tmp_path / "p.db"),
                     tool_call_parser="hermes")
    async with app.router.lifespan_context(app):
        await _started(app)
        async with App(app, engine, api_keys).client() as alice:
            r = await alice.post("/v1/chat/completions", json=ASK)
    assert_openai_error(r, 400, "tools", code="tools_unsupported")
    assert not engine.submitted


async def test_no_parser_with_a_tools_template_is_a_400(tmp_path, tokenizer, api_keys):
    engine = FakeEngine(copy.deepcopy(tokenizer))
    app = create_app(lambda: engine, KeyStore.load(Path(api_keys["file"])), ProfileStore(tmp_path / "p.db"),
                     chat_template=chat_template("smollm2-tools"))
    async with app.router.lifespan_context(app):
        await _started(app)
        async with App(app, engine, api_keys).client() as alice:
            r = await alice.post("/v1/chat/completions", json=ASK)
    assert_openai_error(r, 400, "tools", code="tools_unsupported")
    assert "--tool-call-parser" in r.json()["error"]["message"]


async def test_an_unknown_parser_stops_start_up(tmp_path, tokenizer, api_keys):
    failed = []
    app = create_app(lambda: FakeEngine(tokenizer), KeyStore.load(Path(api_keys["file"])),
                     ProfileStore(tmp_path / "p.db"), on_engine_failure=lambda: failed.append(1),
                     tool_call_parser="no-such-parser")
    async with app.router.lifespan_context(app):
        await _started(app)
    assert failed and "no-such-parser" in str(app.state.steerserve.error)


@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice.function.name"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"steering": {"prompt": {"urial": {}}}}, "tools"),
])
async def test_bad_tool_requests_are_a_400_naming_the_field(tooled, extra, param):
    async with tooled.client() as alice:
        r = await alice.post("/v1/chat/completions", json={**ASK, **extra})
    assert_openai_error(r, 400, param, named=False)
