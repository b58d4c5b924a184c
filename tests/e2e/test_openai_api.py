"""The OpenAI API end to end: the official `openai` client against the real server on SmolLM2."""
from __future__ import annotations

import openai
import pytest

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_lists_the_served_model(openai_client, model_name):
    ids = [m.id for m in openai_client.models.list().data]
    assert ids[0] == model_name  # then the caller's adapters (other tests may have registered some)
    assert all(i.startswith(f"{model_name}:") for i in ids[1:])


def test_greedy_chat_knows_the_capital_of_france(openai_client, model_name):
    r = openai_client.chat.completions.create(model=model_name, messages=CAPITAL, temperature=0, max_tokens=30)
    choice = r.choices[0]
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.created > 0
    assert r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_reports_length_and_usage(openai_client, model_name):
    r = openai_client.completions.create(model=model_name, prompt="Once upon a time", max_tokens=7,
                                         temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 7 and r.usage.prompt_tokens > 0


def test_completion_with_several_prompts_keeps_their_order(openai_client, model_name):
    prompts = ["Once upon a time", "The capital of France is"]
    both = openai_client.completions.create(model=model_name, prompt=prompts, max_tokens=6, temperature=0)
    alone = [openai_client.completions.create(model=model_name, prompt=p, max_tokens=6, temperature=0)
             for p in prompts]
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.text for c in both.choices] == [a.choices[0].text for a in alone]


def test_streaming_chat_equals_non_streaming(openai_client, model_name):
    kwargs = dict(model=model_name, messages=CAPITAL, temperature=0, max_tokens=20)
    whole = openai_client.chat.completions.create(**kwargs)
    chunks = list(openai_client.chat.completions.create(**kwargs, stream=True,
                                                        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_streaming_completion_equals_non_streaming(openai_client, model_name):
    kwargs = dict(model=model_name, prompt="The three primary colours are", temperature=0, max_tokens=12)
    whole = openai_client.completions.create(**kwargs)
    chunks = list(openai_client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text



def test_stop_string_ends_generation_before_it(openai_client, model_name):
    r = openai_client.chat.completions.create(model=model_name, messages=CAPITAL, temperature=0, max_tokens=30,
                                              stop=[" Paris"])
    assert r.choices[0].finish_reason == "stop"
    assert "Paris" not in r.choices[0].message.content
    assert r.choices[0].message.content.startswith("The capital of France is")


def test_seed_makes_sampling_reproducible(openai_client, model_name):
    def sample(seed: int) -> str:
        r = openai_client.completions.create(model=model_name, prompt="My favourite animal is", temperature=1.0,
                                             max_tokens=24, seed=seed, extra_body={"ignore_eos": True})
        return r.choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(s) != first for s in (1, 2, 3))


def test_chat_logprobs_are_consistent(openai_client, model_name):
    r = openai_client.chat.completions.create(model=model_name, messages=CAPITAL, temperature=0, max_tokens=8,
                                              logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    # as in vLLM's server, the stop token that ended the answer is listed but not part of the text
    text = "".join(t.token for t in content)
    assert text in (r.choices[0].message.content, r.choices[0].message.content + "<|im_end|>")
    for t in content:
        assert len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
        # greedy: the chosen token is the most likely one
        assert t.token == t.top_logprobs[0].token and t.logprob == pytest.approx(t.top_logprobs[0].logprob)
        assert t.logprob <= 0


def test_completion_logprobs_have_offsets(openai_client, model_name):
    r = openai_client.completions.create(model=model_name, prompt="One, two, three,", temperature=0, max_tokens=6,
                                         logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(len(top) == 2 for top in lp.top_logprobs)


def test_json_schema_response_format_is_valid_json(openai_client, model_name):
    import json

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "country": {"enum": ["France", "Germany", "Spain"]},
                                               "is_capital": {"type": "boolean"}},
              "required": ["city", "country", "is_capital"], "additionalProperties": False}
    r = openai_client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Describe Paris as JSON."}], max_tokens=80,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    data = json.loads(r.choices[0].message.content)
    assert set(data) == {"city", "country", "is_capital"} and isinstance(data["is_capital"], bool)
    assert data["country"] in ("France", "Germany", "Spain") and len(data["city"]) <= 20


def test_unknown_model_is_404(openai_client):
    with pytest.raises(openai.NotFoundError) as err:
        openai_client.chat.completions.create(model="no-such-model", messages=CAPITAL)
    assert "no-such-model" in str(err.value)


def test_n_returns_distinct_indexed_choices(openai_client, model_name):
    r = openai_client.chat.completions.create(model=model_name, messages=CAPITAL, n=2, temperature=1.0,
                                              max_tokens=10, seed=7)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert all(c.message.content for c in r.choices)
