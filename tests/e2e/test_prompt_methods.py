"""Prompt-level methods end to end on the session's SmolLM2 server: URIAL (the exact prompt reaches the engine,
clean-up, streaming = non-streaming, prefix cache, registered prefixes, errors) and conjugate prompting (the
tenant switch, intermediate texts, usage, streaming)."""
from __future__ import annotations

import json

import httpx
import pytest

from steerserve.steering import conjugate, urial
from tests.conftest import auth

QUESTION = [{"role": "user", "content": "Name a planet."}]
URIAL = {"prompt": {"urial": {}}}


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture()
def client(server, api_keys):
    def make(who: str) -> httpx.Client:
        return httpx.Client(base_url=server.url, timeout=120, headers=auth(api_keys[who]))
    return make


def chat(http, model_name, steering, messages=QUESTION, **extra) -> httpx.Response:
    body = {"model": model_name, "messages": messages, "temperature": 0, "max_tokens": 40, "steering": steering,
            **extra}
    return http.post("/v1/chat/completions", json=body)


def streamed(http, model_name, steering, messages=QUESTION, **extra) -> tuple[str, list[dict]]:
    body = {"model": model_name, "messages": messages, "temperature": 0, "max_tokens": 40, "steering": steering,
            "stream": True, "stream_options": {"include_usage": True}, **extra}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
    return text, events


def content(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


# --- URIAL ---------------------------------------------------------------------------------------------------

def test_urial_sends_the_rendered_prompt_and_cleans_the_answer(http, model_name, tokenizer):
    messages = [{"role": "user", "content": "Name a planet."}, {"role": "assistant", "content": "Mars."},
                {"role": "user", "content": "Write Python code that prints its name."}]
    r = chat(http, model_name, {"prompt": {"urial": {"variant": "help"}}}, messages, max_tokens=60)
    # The same prompt, rendered here from URIAL's structure, through plain completions with URIAL's stop strings:
    prefix = urial.BUILTIN_PREFIXES["help"]
    rest = ("\n# Query:\n```\nName a planet.\n```\n" + "\n# Answer:\n```\nMars.\n```\n"
            + "\n# Query:\n```\nWrite Python code that prints its name.\n```\n" + "\n# Answer:\n```\n")
    ids = tokenizer.encode(prefix) + tokenizer.encode(rest, add_special_tokens=False)
    raw = http.post("/v1/completions", json={"model": model_name, "prompt": ids, "temperature": 0, "max_tokens": 60,
                                             "stop": ["# Query", "# User"]}).json()
    assert r.json()["usage"]["prompt_tokens"] == raw["usage"]["prompt_tokens"] == len(ids)
    assert content(r) == urial.clean(raw["choices"][0]["text"])
    assert r.headers["x-steering-applied"].endswith("methods=prompt.urial")


def test_urial_streaming_equals_non_streaming_and_leaks_no_fence(http, model_name):
    for messages in (QUESTION, [{"role": "user", "content": "Show a Python for loop in a code block."}]):
        whole = content(chat(http, model_name, URIAL, messages, max_tokens=48))
        text, events = streamed(http, model_name, URIAL, messages, max_tokens=48)
        assert text == whole
        assert "# Query" not in text and not text.endswith("`") and text == text.strip()
        assert events[-1]["usage"]["completion_tokens"] > 0


def test_urial_prefix_hits_the_prefix_cache(http, model_name):
    def cached(question: str) -> int:
        r = chat(http, model_name, URIAL, [{"role": "user", "content": question}], max_tokens=1)
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    cached("Warm the prefix up, please.")
    assert cached("A question never asked before: why is the sky blue?") >= 256  # the ~600-token prefix


def test_urial_needs_messages(http, model_name):
    r = http.post("/v1/completions", json={"model": model_name, "prompt": "Hi", "steering": URIAL})
    assert r.status_code == 400 and r.json()["error"]["param"] == "steering.prompt.urial"
    assert "needs messages" in r.json()["error"]["message"]


@pytest.mark.parametrize("steering, messages, param", [
    ({"prompt": {"urial": {"variant": "nope"}}}, QUESTION, "steering.prompt.urial.variant"),
    ({"prompt": {"urial": {"examples": 9}}}, QUESTION, "steering.prompt.urial.examples"),
    ({"prompt": {"urial": {"examples": "2"}}}, QUESTION, "steering.prompt.urial.examples"),
    (URIAL, [*QUESTION, {"role": "assistant", "content": "Mars"}], "messages"),
])
def test_urial_errors_name_the_field(http, model_name, steering, messages, param):
    r = chat(http, model_name, steering, messages)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_admins_register_prefixes_that_requests_use_by_name(client, model_name):
    ops, alice = client("ops"), client("alice")
    mine = "# Instruction\n\nAnswer in one word.\n\n" + "\n# Query:\n```\nColour of grass?\n```\n" \
           "\n# Answer:\n```\nGreen.\n```\n"
    assert alice.put("/v1/steering/urial/prefixes/oneword", content=mine).status_code == 403
    r = ops.put("/v1/steering/urial/prefixes/oneword", content=mine)
    assert r.status_code == 200 and r.json()["examples"] == 1
    assert ops.put("/v1/steering/urial/prefixes/default", content=mine).status_code == 400  # built-ins are fixed
    listed = {p["name"]: p for p in alice.get("/v1/steering/urial/prefixes").json()["data"]}
    assert listed["oneword"]["builtin"] is False and listed["default"]["builtin"] and listed["help"]["builtin"]
    assert alice.get("/v1/steering/urial/prefixes/oneword").json()["text"] == mine
    r = chat(alice, model_name, {"prompt": {"urial": {"variant": "oneword"}}}, max_tokens=3)
    assert r.json()["usage"]["prompt_tokens"] > 0 and content(r)
    r = chat(alice, model_name, {"prompt": {"urial": {"variant": "oneword", "examples": 0}}}, max_tokens=3)
    assert r.status_code == 200
    assert ops.delete("/v1/steering/urial/prefixes/oneword").status_code == 200
    assert chat(alice, model_name, {"prompt": {"urial": {"variant": "oneword"}}}).status_code == 400


# --- conjugate prompting -------------------------------------------------------------------------------------

@pytest.fixture()
def conjugate_allowed(client):
    """Tenant alice with conjugate prompting allowed by the admin, for the duration of a test."""
    ops = client("ops")
    r = ops.put("/v1/tenants/alice/settings", json={"allow_conjugate": True})
    assert r.status_code == 200 and r.json() == {"tenant": "alice", "allow_conjugate": True}
    yield
    assert ops.put("/v1/tenants/alice/settings", json={"allow_conjugate": False}).status_code == 200


def test_conjugate_needs_the_admin_switch(client, model_name):
    alice, bob, ops = client("alice"), client("bob"), client("ops")
    spec = {"prompt": {"conjugate": {"language": "piglatin"}}}
    r = chat(alice, model_name, spec)
    assert r.status_code == 403 and r.json()["error"]["param"] == "steering.prompt.conjugate"
    assert "admin" in r.json()["error"]["message"]
    assert alice.put("/v1/tenants/alice/settings", json={"allow_conjugate": True}).status_code == 403
    assert alice.get("/v1/tenants/bob/settings").status_code == 403
    assert alice.get("/v1/tenants/alice/settings").json()["allow_conjugate"] is False
    assert ops.put("/v1/tenants/alice/settings", json={"allow_conjugate": "yes"}).status_code == 400
    try:
        assert ops.put("/v1/tenants/alice/settings", json={"allow_conjugate": True}).status_code == 200
        assert chat(alice, model_name, spec).status_code == 200
        assert chat(bob, model_name, spec).status_code == 403  # per tenant
        # a profile cannot smuggle it past the switch either
        assert bob.put("/v1/steering/profiles/pig", json=spec).status_code == 200
        r = bob.post("/v1/chat/completions", headers={"X-Steering-Profile": "pig"},
                     json={"model": model_name, "messages": QUESTION, "max_tokens": 2})
        assert r.status_code == 403
    finally:
        ops.put("/v1/tenants/alice/settings", json={"allow_conjugate": False})


def test_conjugate_piglatin_makes_one_engine_call_and_inverts_the_answer(http, model_name, conjugate_allowed):
    spec = {"prompt": {"conjugate": {"language": "piglatin"}}}
    r = chat(http, model_name, spec, steering_stats={"conjugate": True})
    stats = r.json()["steering_stats"]["conjugate"]
    assert stats["engine_calls"] == 1
    assert stats["messages"] == [{"role": "user", "content": conjugate.to_piglatin("Name a planet.")}]
    assert content(r) == stats["answers_back"][0] == conjugate.from_piglatin(stats["answers"][0])
    assert "steering_stats" not in chat(http, model_name, spec).json()  # only when asked


def test_conjugate_streams_the_back_translation(http, model_name, conjugate_allowed):
    spec = {"prompt": {"conjugate": {"language": "de"}}}
    whole = chat(http, model_name, spec, steering_stats={"conjugate": True}, max_tokens=24).json()
    text, events = streamed(http, model_name, spec, steering_stats={"conjugate": True}, max_tokens=24)
    assert text == whole["choices"][0]["message"]["content"]
    assert sum(1 for e in events if e.get("choices") and e["choices"][0]["delta"].get("content")) > 1  # token by token
    stats = [e for e in events if "steering_stats" in e]
    assert stats[0]["steering_stats"] == whole["steering_stats"]
    assert events[-1]["usage"] == whole["usage"]  # every engine call counted (tests/server/test_prompting_calls.py)
    # without translate_back, the answer in the target language streams as generated
    text, _ = streamed(http, model_name, {"prompt": {"conjugate": {"language": "de", "translate_back": False}}},
                       max_tokens=24)
    assert text == whole["steering_stats"]["conjugate"]["answers"][0]


@pytest.mark.parametrize("steering, extra, status, param", [
    ({"prompt": {"conjugate": {"language": "fr", "translator": "gpt-4"}}}, {}, 400,
     "steering.prompt.conjugate.translator"),
    ({"prompt": {"conjugate": {"language": "fr"}}}, {"logprobs": True}, 400, "steering.prompt.conjugate"),
    (None, {"steering_stats": {"conjugate": True}}, 400, "steering_stats.conjugate"),
])
def test_conjugate_errors(http, model_name, conjugate_allowed, steering, extra, status, param):
    r = chat(http, model_name, steering, **extra)
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text


def test_conjugate_on_completions_is_400(http, model_name, conjugate_allowed):
    r = http.post("/v1/completions", json={"model": model_name, "prompt": "Hi",
                                           "steering": {"prompt": {"conjugate": {"language": "fr"}}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "steering.prompt.conjugate"
