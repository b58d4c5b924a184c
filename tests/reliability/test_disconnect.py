"""A client that goes away mid-request aborts its engine request (checked on the engine's own count)."""
from __future__ import annotations

import re
import time

import httpx
import pytest

from tests.conftest import auth


@pytest.fixture(scope="module")
def scraper(server, api_keys):
    """A client with the metrics key (/metrics needs one)."""
    with httpx.Client(base_url=server.url, timeout=60, headers=auth(api_keys["scraper"])) as client:
        yield client


def unfinished(scraper) -> float:
    text = scraper.get("/metrics").text
    return float(re.search(r"^steerserve_engine_unfinished_requests (\S+)$", text, re.M).group(1))


def wait_for(predicate, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def long_chat(model_name: str, stream: bool) -> dict:
    return {"model": model_name, "messages": [{"role": "user", "content": "Count to a thousand."}],
            "max_tokens": 900, "ignore_eos": True, "temperature": 0, "stream": stream}


def test_stream_disconnect_aborts_engine_request(server, http, model_name, scraper):
    assert wait_for(lambda: unfinished(scraper) == 0)
    with httpx.Client(base_url=server.url, timeout=60, headers=http.headers) as client, \
            client.stream("POST", "/v1/chat/completions", json=long_chat(model_name, True)) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(line for line in lines if line.startswith("data:"))
        assert unfinished(scraper) == 1
    assert wait_for(lambda: unfinished(scraper) == 0), "the engine still holds the abandoned request"


def test_non_stream_disconnect_aborts_engine_request(server, http, model_name, scraper):
    assert wait_for(lambda: unfinished(scraper) == 0)
    try:
        httpx.post(f"{server.url}/v1/chat/completions", json=long_chat(model_name, False), timeout=1.5,
                   headers=http.headers)
    except httpx.TimeoutException:
        pass
    assert wait_for(lambda: unfinished(scraper) == 0), "the engine still holds the abandoned request"
    assert http.get("/ready").status_code == 200
