"""The app around the routes: readiness while the engine loads or after it failed, /openapi.json describing
every request body, and metrics labelled by route template."""
from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path

import httpx
import pytest

from steerserve.server.http.app import create_app
from steerserve.server.http.auth import KeyStore
from steerserve.server.http.protocol import ChatCompletionRequest, CompletionRequest
from steerserve.server.stores.profiles import ProfileStore
from steerserve.server.stores.tenants import TenantSettingsUpdate
from tests.http.fake_engine import NAME, FakeEngine
from tests.http.test_validation import assert_openai_error

pytestmark = pytest.mark.anyio

CHAT = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8000")


async def test_ready_only_once_the_engine_is(tmp_path: Path, tokenizer):
    release = threading.Event()

    def slow_engine() -> FakeEngine:
        release.wait(30)
        return FakeEngine(tokenizer)

    app = create_app(slow_engine, KeyStore.open(), ProfileStore(tmp_path / "profiles.db"))
    async with app.router.lifespan_context(app), client(app) as c:
        assert (await c.get("/health")).json() == {"status": "ok"}
        for r in (await c.get("/ready"), await c.get("/v1/models"), await c.post("/v1/chat/completions", json=CHAT)):
            assert_openai_error(r, 503)
            assert r.json()["error"]["message"] == "the model is still loading"
        release.set()
        for _ in range(3000):
            if (r := await c.get("/ready")).status_code == 200:
                break
            await asyncio.sleep(0.01)
        assert r.json() == {"status": "ready", "model": NAME}
        app.state.steerserve.engine.healthy = False
        r = await c.get("/ready")
        assert_openai_error(r, 503)
        assert r.json()["error"]["message"] == "engine unhealthy: the fake engine is down"


async def test_an_engine_that_fails_to_start_is_reported(tmp_path: Path):
    failures = []

    def broken() -> FakeEngine:
        raise RuntimeError("no such model")

    app = create_app(broken, KeyStore.open(), ProfileStore(tmp_path / "profiles.db"),
                     on_engine_failure=lambda: failures.append(1))
    async with app.router.lifespan_context(app), client(app) as c:
        for _ in range(3000):
            if failures:
                break
            await asyncio.sleep(0.01)
        assert failures == [1]
        r = await c.get("/ready")
        assert_openai_error(r, 503)
        assert r.json()["error"]["message"] == "the engine failed to start: no such model"
        assert (await c.get("/health")).status_code == 200


def resolve(doc: dict, schema: dict) -> dict:
    while "$ref" in schema:
        assert schema["$ref"].startswith("#/components/schemas/"), schema
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def fields(model) -> set[str]:
    return {f.alias or name for name, f in model.model_fields.items()}


async def test_openapi_describes_every_request_body(served):
    async with served.client(None) as c:
        doc = (await c.get("/openapi.json")).json()
    paths = doc["paths"]

    def body(path: str, method: str, media: str = "application/json") -> dict:
        request_body = paths[path][method]["requestBody"]
        assert request_body["required"] is True
        return resolve(doc, request_body["content"][media]["schema"])

    for path, model in (("/v1/chat/completions", ChatCompletionRequest), ("/v1/completions", CompletionRequest)):
        schema = body(path, "post")
        assert set(schema["properties"]) == fields(model) and {"model", "steering"} <= set(schema["required"]) | \
            set(schema["properties"])
        assert "model" in schema["required"] and schema.get("additionalProperties") is False
    assert {"messages", "response_format", "top_logprobs"} <= set(body("/v1/chat/completions", "post")["properties"])
    assert {"prompt", "echo", "suffix"} <= set(body("/v1/completions", "post")["properties"])
    assert set(body("/v1/tenants/{tenant}/settings", "put")["properties"]) == fields(TenantSettingsUpdate)
    assert {"version", "logits", "attention", "experts", "prompt"} <= \
        set(body("/v1/steering/profiles/{name}", "put")["properties"])
    assert set(body("/v1/adapters/{name}", "put")["properties"]) == {"path", "kind"}
    assert body("/v1/adapters/{name}", "put", "multipart/form-data")["type"] == "object"
    assert body("/v1/steering/urial/prefixes/{name}", "put", "text/plain") == {"type": "string"}
    refs = re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', str(doc).replace("'", '"'))
    assert refs and set(refs) <= set(doc["components"]["schemas"])  # every reference resolves
    bodiless = [(p, m) for p, ops in paths.items() for m, op in ops.items() if m in ("post", "put")
                and "requestBody" not in op]
    assert bodiless == []


def sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_label_requests_by_route_template(served):
    async with served.client("alice") as alice:
        await alice.get("/v1/steering/profiles/one")  # 404
        await alice.get("/v1/steering/profiles/two")
        await alice.put("/v1/steering/profiles/three", json={"logits": {"bias": {"7": 1.0}}})
        await alice.get("/v1/tenants/alice/settings")
        await alice.get("/v1/chat/completions")  # 405: the path's route, not "other"
        for i in range(5):
            await alice.get(f"/v1/nothing/{i}")
        await alice.post("/v1/chat/completions", json=CHAT)
    async with served.client("scraper") as scraper:
        text = (await scraper.get("/metrics")).text
    requests = "steerserve_requests_total"
    assert sample(text, requests, route="/v1/steering/profiles/{name}", status="404") == 2
    assert sample(text, requests, route="/v1/steering/profiles/{name}", status="200") == 1
    assert sample(text, requests, route="/v1/tenants/{tenant}/settings", status="200") == 1
    assert sample(text, requests, route="/v1/chat/completions", status="405") == 1
    assert sample(text, requests, route="/v1/chat/completions", status="200") == 1
    assert sample(text, requests, route="other", status="404") == 5
    assert sample(text, "steerserve_request_latency_seconds_count", route="/v1/steering/profiles/{name}") == 3
    assert sample(text, "steerserve_generation_tokens_total", route="/v1/chat/completions") == 1
    assert re.search(r'^steerserve_requests_in_flight\{route="/metrics"\} 1\.0$', text, re.M)
    templates = {route.path for route in served.app.routes} | {"other"}
    labels = set(re.findall(r'route="([^"]*)"', text))
    assert labels <= templates and "/v1/steering/profiles/one" not in labels


async def test_steering_schema_is_published(served):
    async with served.client(None) as c:
        schema = (await c.get("/v1/steering/schema")).json()
    assert set(schema["properties"]) >= {"version", "logits", "attention", "experts", "prompt"}


async def test_metrics_count_requests_and_tokens_by_tenant_and_steering_family(served):
    async with served.client("alice") as alice, served.client("bob") as bob:
        await alice.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3})
        await alice.post("/v1/chat/completions", json={**CHAT, "steering": {"logits": {"bias": {"7": 1.0}}}})
        await bob.post("/v1/chat/completions", json={**CHAT, "steering": {"logits": {"bias": {"7": 1.0}}}})
        await bob.post("/v1/chat/completions", json={**CHAT, "steering": {"logits": {"bias": {"7": 1.0}}},
                                                      "max_tokens": -1})  # refused: not admitted, not counted
    async with served.client("ops") as ops:
        text = (await ops.get("/metrics")).text
    assert sample(text, "steerserve_tenant_requests_total", tenant="alice", steered="false") == 1
    assert sample(text, "steerserve_tenant_requests_total", tenant="alice", steered="true") == 1
    assert sample(text, "steerserve_tenant_requests_total", tenant="bob", steered="true") == 1
    assert sample(text, "steerserve_steering_requests_total", family="logits") == 2
    assert sample(text, "steerserve_tenant_tokens_total", tenant="alice", kind="generation") == 4
    assert sample(text, "steerserve_tenant_tokens_total", tenant="bob", kind="generation") == 1
    assert sample(text, "steerserve_decode_seconds_per_token_count", steered="false") == 1  # only one had 2+ tokens
