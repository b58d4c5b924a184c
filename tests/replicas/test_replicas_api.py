"""Everything the single server does, through `steerserve serve --replicas 2` (Ray Serve's proxy, the router,
two SmolLM2 engine replicas; the session's `replicas` fixture): the official openai client, streaming,
steering headers, errors, /ready, /metrics per replica, registrations made through one replica served by the
other, and adapter affinity. Each response names the replica that answered (X-Steerserve-Replica).

Cost: the fixture's start-up (two engines at once: ~3 min on the loaded 2-core machine, ~1.5 min quiet) plus
~30 s of requests."""
from __future__ import annotations

import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import auth
from tests.tiny_models import build_tiny_lora

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
MODEL = "smollm2-135m-instruct"
REPLICA = "x-steerserve-replica"


@pytest.fixture(scope="module")
def alice(replicas, api_keys):
    with httpx.Client(base_url=replicas.url, timeout=180, headers=auth(api_keys["alice"])) as client:
        yield client


def chat(client: httpx.Client, model: str = MODEL, headers: dict | None = None, **extra) -> httpx.Response:
    body = {"model": model, "messages": CAPITAL, "temperature": 0, "max_tokens": 8, **extra}
    return client.post("/v1/chat/completions", json=body, headers=headers or {})


def on_both(send, tries: int = 40) -> dict[str, httpx.Response]:
    """Calls `send()` until two different replicas have answered; one response per replica."""
    seen: dict[str, httpx.Response] = {}
    for _ in range(tries):
        r = send()
        seen.setdefault(r.headers[REPLICA], r)
        if len(seen) == 2:
            return seen
    raise AssertionError(f"only replica(s) {sorted(seen)} answered in {tries} requests")


def text(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_openai_client_and_streaming_through_the_replicas(replicas, api_keys):
    import openai

    client = openai.OpenAI(base_url=f"{replicas.url}/v1", api_key=api_keys["alice"], max_retries=0, timeout=180)
    answers = {}
    for _ in range(40):
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=CAPITAL, temperature=0,
                                                               max_tokens=12)
        answers.setdefault(raw.headers[REPLICA], raw.parse().choices[0].message.content)
        if len(answers) == 2:
            break
    assert len(answers) == 2
    first, second = answers.values()
    assert first == second and "Paris" in first  # greedy fp32: every replica gives the same answer
    stream = client.chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0, max_tokens=12,
                                            stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == first and len(pieces) > 2
    completion = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0,
                                           max_tokens=4)
    assert completion.choices[0].text.strip()


def test_steering_headers_and_errors_through_the_replicas(replicas, alice):
    r = chat(alice, headers={"X-Steering": json.dumps({"logits": {"bias": {" plum": 100.0}}})}, max_tokens=3)
    assert text(r) == " plum" * 3 and r.headers["x-steering-applied"].endswith("methods=logits.bias")
    bad = chat(alice, max_tokens="many")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
    bad = chat(alice, headers={"X-Steering": "{not json"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{replicas.url}/v1/models").status_code == 401  # no key


def test_ready_health_and_metrics_per_replica(replicas, alice, api_keys):
    assert alice.get("/ready").json() == {"status": "ready", "model": MODEL}
    assert alice.get("/health").status_code == 200
    answered = {}
    for replica, r in on_both(lambda: alice.get("/v1/models")).items():
        answered[replica] = r
    time.sleep(2.5)  # every replica has reported its metrics since
    assert httpx.get(f"{replicas.url}/metrics", headers=auth(api_keys["alice"])).status_code == 403  # as alone
    r = httpx.get(f"{replicas.url}/metrics", headers=auth(api_keys["scraper"]))
    assert r.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    served = {s.labels["replica"] for s in families["steerserve_requests"].samples}
    assert served == set(answered) == set(replicas.board())
    for replica in answered:  # each replica counts the /v1/models requests it answered
        count = sum(s.value for s in families["steerserve_requests"].samples if s.name.endswith("_total")
                    and s.labels["replica"] == replica and s.labels["route"] == "/v1/models"
                    and s.labels["status"] == "200")
        assert count >= 1


def test_registrations_through_one_replica_are_served_by_every_replica(replicas, alice, smollm2_path):
    put = alice.put("/v1/steering/profiles/plums", json={"logits": {"bias": {" plum": 100.0}}})
    assert put.status_code == 200
    served = on_both(lambda: chat(alice, headers={"X-Steering-Profile": "plums"}, max_tokens=2))
    assert {text(r) for r in served.values()} == {" plum" * 2}
    assert len({r.headers["x-steering-applied"] for r in served.values()}) == 1
    path = build_tiny_lora(replicas.adapter_root / "alice" / "shared", smollm2_path, seed=5, rank=8, std=0.05,
                           targets=("q_proj", "v_proj"))
    assert alice.put("/v1/adapters/shared", json={"path": str(path)}).status_code == 200
    listed = on_both(lambda: alice.get("/v1/adapters/shared"))
    assert all(r.status_code == 200 and r.json()["model"] == f"{MODEL}:shared" for r in listed.values())


def test_requests_for_one_adapter_stay_on_the_replica_that_holds_it(replicas, alice, smollm2_path, api_keys):
    """Ray Serve's model multiplexing keyed by the adapter registration: after the first request loads an
    adapter on one replica, its requests go there, so each adapter is loaded once in all (2 adapters, each
    replica keeps 2 resident). Without affinity each of 8 requests picks a replica at random."""
    def loads() -> float:
        r = httpx.get(f"{replicas.url}/metrics", headers=auth(api_keys["scraper"]))
        return sum(s.value for f in text_string_to_metric_families(r.text) if f.name == "steerserve_adapter_loads"
                   for s in f.samples if s.name.endswith("_total"))

    before = loads()
    for name, seed in (("aff0", 30), ("aff1", 31)):
        path = build_tiny_lora(replicas.adapter_root / "alice" / name, smollm2_path, seed=seed, rank=8, std=0.05,
                               targets=("q_proj", "v_proj"))
        assert alice.put(f"/v1/adapters/{name}", json={"path": str(path)}).status_code == 200
        first = chat(alice, f"{MODEL}:{name}", max_tokens=2)
        assert first.status_code == 200 and first.headers["x-adapter-applied"] == f"{name}; scope=tenant"
        time.sleep(2)  # the replica's resident adapters reach Ray Serve's routers
        where = {chat(alice, f"{MODEL}:{name}", max_tokens=2).headers[REPLICA] for _ in range(8)}
        assert where == {first.headers[REPLICA]}
    time.sleep(2.5)
    assert loads() - before == 2
