"""Bad input on the real server leaves it healthy. Each case's status, error shape and named field are checked in
process (tests/http/test_validation.py, the same cases); here they go through uvicorn to the real engine."""
from __future__ import annotations

import json

import pytest

from tests.http.test_validation import BAD, MALFORMED, NAN_TEMPERATURE, chat


@pytest.fixture()
def post(http, model_name):
    def send(body: dict | None, raw: bytes | None = None, path: str = "/v1/chat/completions"):
        data = raw if raw is not None else json.dumps(body).replace("__MODEL__", model_name).encode()
        return http.post(path, content=data, headers={"content-type": "application/json"})
    return send


def test_server_still_answers_after_bad_input(post, http):
    for case, (body, _) in BAD.items():
        r = post(body)
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}, case
    for raw in [*MALFORMED, NAN_TEMPERATURE]:
        assert post(None, raw=raw).status_code == 400, raw
    assert http.get("/ready").status_code == 200
    r = post(chat(temperature=0))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
