"""The cases issue #17 measured on a running server, over real HTTP: each was a 500, a 200 that should not have
been, or a 5.7 s stall of the event loop. Against the shared SmolLM2 server (keys on); the open-mode Host rule
against real uvicorn serving the app over the fake engine (no model needed to answer a 421)."""
from __future__ import annotations

import json
import statistics
import threading
import time

import httpx
import pytest

from tests.conftest import free_port

JSON = {"content-type": "application/json"}


def assert_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def test_the_measured_500s_are_400s(http, model_name):
    deep = b'{"model": "m", "messages": [], "steering": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert_error(http.post("/v1/chat/completions", content=deep, headers=JSON), 400, code="invalid_json")
    digits = json.dumps({"model": model_name, "messages": [{"role": "user", "content": "x"}]})[:-1]
    digits = digits.encode() + b', "max_tokens": ' + b"9" * 5000 + b"}"
    assert_error(http.post("/v1/chat/completions", content=digits, headers=JSON), 400, "max_tokens")
    for content in ("\ud800", "hello \udfff world"):  # json.dumps sends them as \ud800 escapes
        raw = json.dumps({"model": model_name, "messages": [{"role": "user", "content": content}]})
        assert_error(http.post("/v1/chat/completions", content=raw, headers=JSON), 400, "messages.0.content")
    raw = json.dumps({"model": model_name, "prompt": "\ud800"})
    assert_error(http.post("/v1/completions", content=raw, headers=JSON), 400, "prompt")
    assert http.get("/ready").status_code == 200


def test_a_json_body_as_text_plain_is_415(http, model_name):
    body = json.dumps({"model": model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        r = http.post("/v1/chat/completions", content=body, headers={"content-type": content_type or ""})
        assert_error(r, 415, "Content-Type", "unsupported_media_type")


def test_huge_headers_are_431(http):
    assert_error(http.get("/v1/models", headers={"x-padding": "a" * 40_000}), 431, "x-padding")


def test_metrics_need_a_metrics_key(server, http, api_keys):
    assert_error(httpx.get(f"{server.url}/metrics"), 401)
    assert_error(http.get("/metrics"), 403)  # alice, a user
    r = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {api_keys['scraper']}"})
    assert r.status_code == 200 and "steerserve_requests_total" in r.text


def test_a_long_chat_never_blocks_the_event_loop(server, http, model_name):
    """4,001 messages are refused at once; the largest allowed chat (2,048 messages, the --max-messages default)
    is rendered and tokenized off the event loop: /health answers within 100 ms throughout (the issue measured a
    5.7 s stall at 4,001 messages). Up to 3 attempts: on a loaded 2-core machine one poll can miss its slot, but
    a loop that the admission blocks misses in every attempt."""
    words = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"word{i}"} for i in range(4001)]
    start = time.perf_counter()
    r = http.post("/v1/chat/completions", json={"model": model_name, "messages": words})
    assert_error(r, 400, "messages", "array_above_max_length")
    assert time.perf_counter() - start < 1.0

    body = {"model": model_name, "messages": words[:2048], "max_tokens": 1}
    maxima = []
    for _ in range(3):  # a blocked loop stalls every attempt; a loaded machine's scheduling hiccup only one
        latencies, answer = health_during(server, http, body)
        # SmolLM2 at the session server's 1,024 tokens cannot take 2,048 messages: refused after rendering
        assert_error(answer, 400, code="context_length_exceeded")
        maxima.append(max(latencies))
        print(f"/health during a 2,048-message admission: {len(latencies)} polls, max {max(latencies) * 1000:.1f} "
              f"ms, median {statistics.median(latencies) * 1000:.1f} ms")
        assert len(latencies) >= 3
        if max(latencies) < 0.1:
            break
    assert min(maxima) < 0.1, maxima


def health_during(server, http, body: dict) -> tuple[list[float], httpx.Response]:
    """/health latencies, polled every 10 ms while `body` is posted by another thread, and its answer."""
    latencies: list[float] = []
    done = threading.Event()
    result: list[httpx.Response] = []

    def admit() -> None:
        try:
            result.append(http.post("/v1/chat/completions", json=body))
        finally:
            done.set()

    with httpx.Client(base_url=server.url, timeout=10) as poller:
        poller.get("/health")  # the connection is open before the measurement
        worker = threading.Thread(target=admit)
        worker.start()
        while not done.is_set():
            t = time.perf_counter()
            assert poller.get("/health").status_code == 200
            latencies.append(time.perf_counter() - t)
            time.sleep(0.01)
        worker.join()
    return latencies, result[0]


@pytest.fixture(scope="module")
def open_server(tmp_path_factory):
    """Real uvicorn (httptools) serving the app in open mode over the fake engine, in a thread."""
    import asyncio

    import uvicorn
    from transformers import AutoTokenizer

    from steerserve.server.http.app import create_app
    from steerserve.server.http.auth import KeyStore
    from steerserve.server.stores.profiles import ProfileStore
    from tests.http.fake_engine import FakeEngine
    from tests.tiny_models import build_tokenizer

    tmp = tmp_path_factory.mktemp("open")
    tokenizer = AutoTokenizer.from_pretrained(build_tokenizer(tmp / "tokenizer"))
    app = create_app(lambda: FakeEngine(tokenizer), KeyStore.open(), ProfileStore(tmp / "profiles.db"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(f"{url}/ready").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    yield url
    server.should_exit = True
    thread.join(10)


def test_open_mode_refuses_a_foreign_host(open_server):
    chat = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    r = httpx.post(f"{open_server}/v1/chat/completions", json=chat, headers={"Host": "evil.example"}, timeout=120)
    assert_error(r, 421, "Host", "misdirected_request")
    assert httpx.post(f"{open_server}/v1/chat/completions", json=chat, timeout=120).status_code == 200  # own Host
    r = httpx.post(f"{open_server}/v1/chat/completions", json=chat, headers={"Host": "localhost"}, timeout=120)
    assert r.status_code == 200
