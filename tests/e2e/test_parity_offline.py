"""The HTTP frontend adds nothing and loses nothing: greedy outputs equal vLLM's offline LLM on the same settings."""
from __future__ import annotations

import pytest

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "List three fruits:"]
CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Name a colour."}],
         [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
          {"role": "user", "content": "Tell me a fact about the Moon."}]]


@pytest.fixture(scope="module")
def offline(smollm2_path):
    from vllm import LLM

    llm = LLM(model=str(smollm2_path), dtype="float32", max_model_len=1024, enforce_eager=True, max_num_seqs=16,
              kv_cache_memory_bytes=256 * 2**20, seed=0)
    yield llm
    del llm


def test_completions_match_offline_generate(offline, openai_client, model_name):
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=24)
    for prompt in PROMPTS:
        expected = offline.generate([prompt], sp, use_tqdm=False)[0].outputs[0]
        got = openai_client.completions.create(model=model_name, prompt=prompt, temperature=0, max_tokens=24)
        assert got.choices[0].text == expected.text
        assert got.usage.completion_tokens == len(expected.token_ids)


def test_chat_matches_offline_chat(offline, openai_client, model_name):
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=40)
    for messages in CHATS:
        expected = offline.chat(messages, sp, use_tqdm=False)[0]
        got = openai_client.chat.completions.create(model=model_name, messages=messages, temperature=0,
                                                    max_tokens=40)
        assert got.choices[0].message.content == expected.outputs[0].text
        assert got.usage.prompt_tokens == len(expected.prompt_token_ids)
