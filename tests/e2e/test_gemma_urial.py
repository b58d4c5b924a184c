"""URIAL on a real base model, Gemma-3-270M: only where `steerserve models fetch gemma3-270m` has been run (the
suite never needs it). Its own server: BOS is prepended, chats need URIAL, the prefix is cached."""
from __future__ import annotations

import httpx
import pytest

from steerserve.steering import urial
from tests.conftest import SERVER_ARGS, Server


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    from steerserve.server.models.store import ModelFetchError, resolve_model

    try:
        path = resolve_model("gemma3-270m")
    except ModelFetchError:
        pytest.skip("Gemma-3-270M is not fetched (steerserve models fetch gemma3-270m)")
    state = tmp_path_factory.mktemp("gemma")
    srv = Server(["--model", str(path), *SERVER_ARGS, "--data-dir", str(state / "data")], state / "server.log")
    try:
        yield path, srv.wait_ready()
    finally:
        srv.stop()


def test_urial_chat_on_a_base_model(gemma):
    path, srv = gemma
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    body = {"model": path.name, "temperature": 0, "max_tokens": 40,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    plain = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=120)
    assert plain.status_code == 400 and "urial" in plain.json()["error"]["message"]
    steered = {**body, "steering": {"prompt": {"urial": {}}}}
    first = httpx.post(f"{srv.url}/v1/chat/completions", json=steered, timeout=120).json()
    prefix, rest = urial.render(urial.BUILTIN_PREFIXES["default"], [("user", "What is the capital of France?")])
    ids = tok.encode(prefix) + tok.encode(rest, add_special_tokens=False)
    assert ids[0] == tok.bos_token_id and first["usage"]["prompt_tokens"] == len(ids)
    answer = first["choices"][0]["message"]["content"]
    assert answer and "# Query" not in answer and not answer.endswith("```")
    again = httpx.post(f"{srv.url}/v1/chat/completions", json=steered, timeout=120).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
