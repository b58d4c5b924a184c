"""The bundled `smollm2-tools` chat template: without tools it renders every chat exactly as SmolLM2's own
template (so serving with it changes nothing for requests without tools); with tools, what it renders for an
assistant's tool call is what vLLM's hermes parser reads back. And which templates count as supporting tools."""
from __future__ import annotations

import json

import pytest

from steerserve.server.frontend.chat import renders_tools
from steerserve.server.frontend.tool_calls import chat_template

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
CHATS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "Ünïcode ✓\nand lines"}],
    [{"role": "user", "content": "x"}, {"role": "system", "content": "late system"}],
]


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_without_tools_it_renders_as_smollm2s_own_template(smollm2, chat, generation_prompt):
    own = smollm2.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
    ours = smollm2.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt,
                                       chat_template=chat_template("smollm2-tools"))
    assert ours == own


def test_which_templates_support_tools(smollm2):
    assert not renders_tools(smollm2, TOOLS)  # SmolLM2-135M-Instruct's own template ignores tools
    tooled = smollm2.__class__.from_pretrained(smollm2.name_or_path)
    tooled.chat_template = chat_template("smollm2-tools")
    assert renders_tools(tooled, TOOLS)


def test_a_rendered_tool_call_is_what_the_hermes_parser_reads(smollm2):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.tool_parsers import ToolParserManager

    args = {"city": "Paris", "units": "celsius"}
    history = [{"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": "",
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": args}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    text = smollm2.apply_chat_template(history, tools=TOOLS, tokenize=False, chat_template=chat_template("smollm2-tools"))
    assert json.dumps(TOOLS[0]) in text and "<tool_response>\nsunny\n</tool_response>" in text
    turn = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    request = ChatCompletionRequest(messages=history[:1], tools=TOOLS, tool_choice="auto")
    parsed = ToolParserManager.get_tool_parser("hermes")(smollm2, request.tools).extract_tool_calls(turn, request)
    assert parsed.tools_called and len(parsed.tool_calls) == 1
    assert parsed.tool_calls[0].function.name == "get_weather"
    assert json.loads(parsed.tool_calls[0].function.arguments) == args


def test_set_template_reaches_vllms_pooled_engine_tokenizer(smollm2_path):
    """vLLM's engine tokenizer renders chats on a pool of copies made when it was built, so assigning
    `chat_template` alone changes nothing; `set_template` must."""
    from vllm.tokenizers import get_tokenizer
    from vllm.tokenizers.hf import maybe_make_thread_pool

    from steerserve.server.frontend.chat import set_template

    pooled = maybe_make_thread_pool(get_tokenizer(str(smollm2_path)), 2)
    pooled.chat_template = chat_template("smollm2-tools")
    assert not renders_tools(pooled, TOOLS)  # why set_template exists
    set_template(pooled, chat_template("smollm2-tools"))
    assert renders_tools(pooled, TOOLS)
    chat = CHATS[1]
    assert pooled.apply_chat_template(chat, tokenize=False) == pooled.apply_chat_template(
        chat, tokenize=False, chat_template=chat_template("smollm2-tools"))
