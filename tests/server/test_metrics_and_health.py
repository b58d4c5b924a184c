"""/health, /ready and /metrics on the real server."""
from __future__ import annotations

import re

import pytest

from tests.conftest import auth


def sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_health_and_ready(http, model_name):
    assert http.get("/health").json() == {"status": "ok"}
    assert http.get("/ready").json() == {"status": "ready", "model": model_name}


@pytest.fixture
def scrape(http, api_keys):
    return lambda: http.get("/metrics", headers=auth(api_keys["scraper"])).text


def test_metrics_count_requests_tokens_and_latency(http, model_name, scrape):
    before = scrape()
    r = http.post("/v1/chat/completions", json={"model": model_name, "max_tokens": 5, "temperature": 0,
                                                "ignore_eos": True, "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200
    http.post("/v1/chat/completions", json={"model": model_name})  # a 400
    after = scrape()
    route = "/v1/chat/completions"
    assert sample(after, "steerserve_requests_total", route=route, status="200") == \
        sample(before, "steerserve_requests_total", route=route, status="200") + 1
    assert sample(after, "steerserve_requests_total", route=route, status="400") >= 1
    assert sample(after, "steerserve_generation_tokens_total", route=route) == \
        sample(before, "steerserve_generation_tokens_total", route=route) + 5
    assert sample(after, "steerserve_prompt_tokens_total", route=route) == \
        sample(before, "steerserve_prompt_tokens_total", route=route) + r.json()["usage"]["prompt_tokens"]
    for series in ("steerserve_time_to_first_token_seconds_count", "steerserve_inter_token_latency_seconds_count",
                   "steerserve_request_latency_seconds_count"):
        assert sample(after, series, route=route) > sample(before, series, route=route)
    assert re.search(r'^steerserve_requests_in_flight\{route="/metrics"\} 1\.0$', after, re.M)
