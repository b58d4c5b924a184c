"""Conjugate prompting's engine calls, seen through a recording layer around the real engine on SmolLM2: how
many calls, in which order, translating between which languages, what usage adds up to, and which streams."""
from __future__ import annotations

import asyncio
import gc
from types import SimpleNamespace

import pytest

from steerserve.server.engine.async_engine import Engine
from steerserve.server.frontend import request_steering as steer
from steerserve.server.frontend.prompt_methods import PrefixStore, PromptRun
from steerserve.server.http.errors import BadRequest
from steerserve.server.http.metrics import Metrics
from steerserve.server.http.protocol import ChatCompletionRequest
from steerserve.server.settings import Settings
from steerserve.steering import conjugate, urial
from steerserve.steering import spec as S
from steerserve.steering.plan import cache_salt

SALT = "tenant-salt"


class RecordingEngine:
    """The real engine, with every `generate` call recorded (prompt ids and text, sampling params, cache salt)."""

    def __init__(self, engine: Engine):
        self.engine, self.calls = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, prompt_ids, params, request_id, *, prompt_text=None, cache_salt=None, lora_request=None):
        self.calls.append(SimpleNamespace(ids=list(prompt_ids), text=prompt_text, params=params, salt=cache_salt,
                                          lora=lora_request))
        return self.engine.generate(prompt_ids, params, request_id, prompt_text=prompt_text, cache_salt=cache_salt,
                                    lora_request=lora_request)


@pytest.fixture(scope="module")
def engine(smollm2_path):
    loop = asyncio.new_event_loop()
    settings = Settings.load(dtype="float32", max_model_len=1024, kv_cache_gib=0.25, max_num_seqs=8)

    async def start() -> Engine:
        return Engine(settings, smollm2_path)

    eng = loop.run_until_complete(start())
    state = SimpleNamespace(loop=loop, rec=RecordingEngine(eng))
    yield state
    eng.shutdown()
    # Let the engine's output task see the shutdown and close its socket inside the loop; otherwise the zmq
    # context's finaliser waits for that socket forever (a hang seen at teardown).
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()
    state.rec = None  # drop every reference, so the engine is freed now and a later module can build its own
    del eng
    gc.collect()


def run(engine, tmp_path, steering: dict, messages: list[dict], stream: bool = False, **extra):
    """One chat request through PromptRun; returns (choices or deltas, the run, the recorded calls)."""
    engine.rec.calls = []
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": messages, "temperature": 0,
                                                "max_tokens": 16, "steering": steering,
                                                "steering_stats": {"conjugate": True}, **extra})
    spec = S.merge([S.parse(steering, "steering")])
    pr = PromptRun(engine.rec, Metrics(), req, steer.Steering(spec, None, SALT), PrefixStore(tmp_path / "prefixes.sqlite3"))

    async def deltas():
        return [d async for d in pr.deltas()]

    out = engine.loop.run_until_complete(deltas() if stream else pr.collect())
    return out, pr, engine.rec.calls


def translating(call, source: str, target: str) -> bool:
    return f"from {conjugate.LANGUAGES[source]} into {conjugate.LANGUAGES[target]}." in call.text


def test_translation_calls_count_order_and_languages(engine, tmp_path):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a planet."}]
    choices, pr, calls = run(engine, tmp_path, {"prompt": {"conjugate": {"language": "fr"}}}, messages)
    # one call per message into French, then the answer, then its translation back into English
    assert len(calls) == 4
    assert translating(calls[0], "en", "fr") and "You are terse." in calls[0].text
    assert translating(calls[1], "en", "fr") and "Name a planet." in calls[1].text
    stats = pr.stats()["conjugate"]
    assert not translating(calls[2], "en", "fr") and "Name a planet." not in calls[2].text
    assert all(m["content"] in calls[2].text for m in stats["messages"])  # the main call sees the translations
    assert translating(calls[3], "fr", "en") and stats["answers"][0] in calls[3].text
    assert choices[0].text == stats["answers_back"][0] and stats["engine_calls"] == 4
    assert {c.salt for c in calls} == {cache_salt(SALT, None, 0)}  # every call stays in the tenant's prefix-cache namespace
    # translations are greedy; the main call carries the request's own sampling settings
    assert [c.params.temperature for c in calls] == [0, 0, 0, 0] and calls[2].params.max_tokens == 16
    usage = pr.usage()
    assert usage["prompt_tokens"] == sum(len(c.ids) for c in calls)
    assert usage["completion_tokens"] > 0 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_each_choice_is_translated_back_by_its_own_call(engine, tmp_path):
    choices, pr, calls = run(engine, tmp_path, {"prompt": {"conjugate": {"language": "es"}}},
                             [{"role": "user", "content": "Say something."}], n=2, temperature=1.0, seed=3)
    assert len(calls) == 4 and calls[1].params.n == 2
    assert [translating(c, "es", "en") for c in calls[2:]] == [True, True]
    answers = pr.stats()["conjugate"]["answers"]
    assert [a in c.text for a, c in zip(answers, calls[2:], strict=True)] == [True, True]
    assert len(choices) == 2


def test_without_translate_back_there_is_no_third_call(engine, tmp_path):
    choices, pr, calls = run(engine, tmp_path, {"prompt": {"conjugate": {"language": "de", "translate_back": False}}},
                             [{"role": "user", "content": "Name a colour."}])
    assert len(calls) == 2 and translating(calls[0], "en", "de")
    assert choices[0].text == pr.stats()["conjugate"]["answers"][0]


@pytest.mark.parametrize("language", ["leetspeak", "piglatin"])
def test_deterministic_transforms_make_one_call(engine, tmp_path, language):
    question = "What is the tallest mountain?"
    choices, pr, calls = run(engine, tmp_path, {"prompt": {"conjugate": {"language": language}}},
                             [{"role": "user", "content": question}])
    assert len(calls) == 1 and conjugate.transform(language, question) in calls[0].text and question not in calls[0].text
    answer = pr.stats()["conjugate"]["answers"][0]
    assert choices[0].text == conjugate.transform(language, answer, inverse=True)


def test_conjugate_with_urial_renders_the_translated_chat(engine, tmp_path):
    spec = {"prompt": {"conjugate": {"language": "piglatin"}, "urial": {"examples": 1}}}
    _, _, calls = run(engine, tmp_path, spec, [{"role": "user", "content": "Hello there"}])
    prefix = urial.select_prefix(urial.BUILTIN_PREFIXES["default"], 1, "f")
    assert calls[0].text == prefix + "\n# Query:\n```\nello-Hay ere-thay\n```\n\n# Answer:\n```\n"
    assert set(urial.STOP_STRINGS) <= set(calls[0].params.stop)


def test_streamed_deltas_add_up_to_the_collected_answer(engine, tmp_path):
    spec = {"prompt": {"conjugate": {"language": "fr"}}}
    messages = [{"role": "user", "content": "Name a fruit."}]
    whole, _, _ = run(engine, tmp_path, spec, messages)
    deltas, _, calls = run(engine, tmp_path, spec, messages, stream=True)
    assert "".join(d.text for d in deltas) == whole[0].text and len(calls) == 3
    assert deltas[-1].finish_reason is not None and all(d.finish_reason is None for d in deltas[:-1])


def test_a_translation_prompt_beyond_the_context_is_a_400(engine, tmp_path):
    with pytest.raises(BadRequest) as err:
        run(engine, tmp_path, {"prompt": {"conjugate": {"language": "fr"}}},
            [{"role": "user", "content": "word " * 1100}])
    assert err.value.code == "context_length_exceeded"
